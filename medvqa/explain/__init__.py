"""Explanations. pytorch-grad-cam takes seconds to import, so it loads only when a map is asked
for: the CLI and the app can list the method names without it."""
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam", "ablationcam")
SLOW_METHODS = ("scorecam", "ablationcam")   # one forward per feature channel: seconds to minutes on CPU

__all__ = ["METHOD_NAMES", "SLOW_METHODS", "METHODS", "explain", "overlay"]


def __getattr__(name):
    if name in ("METHODS", "explain", "overlay"):
        from medvqa.explain import gradcam

        return getattr(gradcam, name)
    raise AttributeError(f"module 'medvqa.explain' has no attribute {name!r}")
