"""Models by name, like open_clip's factory: `build(name, preset, n_classes, ahead_vocab=…, text_vocab=…)`."""
from __future__ import annotations

from medvqa.config import image_grid
from medvqa.models.baseline import Baseline
from medvqa.models.cmdpi import CMDPI
from medvqa.models.cmi_mtl import CMIMTL

MODELS = ("baseline", "cmdpi", "cmi-mtl")


def build(name: str, preset, n_classes: int, *, ahead_vocab: list[int] | None = None,
          text_vocab: list[int] | None = None):
    """ahead_vocab: the answer-token ids CMI-MTL's AHead generates over; text_vocab: the token ids
    CMDPI reconstructs. A checkpoint's config carries both for every model; each model takes its own.
    Any other keyword is a TypeError, not silently dropped."""
    if name == "cmi-mtl":
        return CMIMTL(preset.cmi_mtl, preset.encoders, n_classes, ahead_vocab=ahead_vocab)
    if name == "cmdpi":
        return CMDPI(preset.cmdpi, preset.encoders, n_classes, image_grid(preset.encoders), text_vocab=text_vocab)
    if name == "baseline":
        return Baseline(preset.baseline, preset.encoders, n_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
