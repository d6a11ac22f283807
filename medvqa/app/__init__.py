"""The Gradio workbench: one module per tab; `build()` assembles them."""

__all__ = ["build"]


def __getattr__(name):
    # Lazy, so `python -m medvqa.app.features` (or `.screenshots`) runs its module once, not after
    # the package has already imported it through main (runpy's "found in sys.modules" warning).
    if name == "build":
        from medvqa.app.main import build
        return build
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
