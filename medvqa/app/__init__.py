"""The Gradio workbench: one module per tab; `build()` assembles them."""
from medvqa.app.main import build

__all__ = ["build"]
