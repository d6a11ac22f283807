"""Models by name, like open_clip's factory: `build(name, preset, n_classes, **extra)`."""
from __future__ import annotations

from medvqa.models.baseline import Baseline
from medvqa.models.cmi_mtl import CMIMTL


def _cmi_mtl(preset, n_classes, ahead_vocab=None, **_):
    return CMIMTL(preset.cmi_mtl, preset.encoders, n_classes, ahead_vocab=ahead_vocab)


def _baseline(preset, n_classes, **_):
    return Baseline(preset.baseline, preset.encoders, n_classes)


MODELS = {"cmi-mtl": _cmi_mtl, "baseline": _baseline}


def build(name: str, preset, n_classes: int, **extra):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](preset, n_classes, **extra)
