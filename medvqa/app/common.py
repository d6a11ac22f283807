"""What every tab shares: the shipped checkpoints per dataset, and the example gallery."""
from __future__ import annotations

import json
from pathlib import Path

from medvqa.predict import SHIPPED, checkpoints_dir

ASSETS = SHIPPED.parent
DATASETS = {"vqa-rad": "VQA-RAD", "slake": "SLAKE"}
MODEL_ORDER = ("cmi-mtl", "cmdpi", "baseline")   # shown left to right when present
MODEL_TITLES = {"cmi-mtl": "CMI-MTL", "cmdpi": "CMDPI", "baseline": "Baseline"}


def checkpoints_for(dataset: str) -> list[Path]:
    """Shipped checkpoints trained on `dataset`, papers' models first."""
    found = [checkpoints_dir() / f"{m}-{dataset}" for m in MODEL_ORDER]
    return [p for p in found if (p / "config.json").is_file()]


def model_title(ckpt: Path) -> str:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    return MODEL_TITLES.get(cfg["model"], cfg["model"])


def examples() -> list[dict]:
    path = ASSETS / "examples" / "examples.json"
    if not path.is_file():
        return []
    out = []
    for e in json.loads(path.read_text()):
        e["path"] = str(ASSETS / "examples" / e["image"])
        out.append(e)
    return out
