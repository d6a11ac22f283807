"""Models by name, like open_clip's factory: `build(name, preset, n_classes, **extra)`."""
from __future__ import annotations

from medvqa.config import image_grid
from medvqa.models.baseline import Baseline
from medvqa.models.cmdpi import CMDPI
from medvqa.models.cmi_mtl import CMIMTL


def _cmi_mtl(preset, n_classes, ahead_vocab=None, **_):
    return CMIMTL(preset.cmi_mtl, preset.encoders, n_classes, ahead_vocab=ahead_vocab)


def _cmdpi(preset, n_classes, text_vocab=None, **_):
    return CMDPI(preset.cmdpi, preset.encoders, n_classes, image_grid(preset.encoders), text_vocab=text_vocab)


def _baseline(preset, n_classes, **_):
    return Baseline(preset.baseline, preset.encoders, n_classes)


MODELS = {"cmi-mtl": _cmi_mtl, "cmdpi": _cmdpi, "baseline": _baseline}


def build(name: str, preset, n_classes: int, **extra):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](preset, n_classes, **extra)
