"""Explanations. pytorch-grad-cam takes seconds to import, so it loads only when a map is asked
for: the CLI and the app can list the method names without it."""
# "rollout": gradient-weighted attention rollout (Chefer et al., 2021) read from the CLS row;
# "token-rollout": the same rollout read from every output token the head is sensitive to. Ours;
# the rest pytorch-grad-cam's.
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "rollout", "token-rollout",
                "scorecam", "ablationcam")
# The default everywhere a user does not choose: it localised best in the pointing game on SLAKE
# validation (README, Decisions).
DEFAULT_METHOD = "rollout"
SLOW_METHODS = ("scorecam", "ablationcam")   # one forward per feature channel: seconds to minutes on CPU

__all__ = ["DEFAULT_METHOD", "METHOD_NAMES", "SLOW_METHODS", "explain", "overlay"]


def __getattr__(name):
    if name in ("explain", "overlay"):
        from medvqa.explain import gradcam

        return getattr(gradcam, name)
    raise AttributeError(f"module 'medvqa.explain' has no attribute {name!r}")
