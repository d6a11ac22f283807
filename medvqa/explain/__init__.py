from medvqa.explain.gradcam import METHODS, explain, overlay

__all__ = ["METHODS", "explain", "overlay"]
