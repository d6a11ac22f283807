"""What every tab shares: the shipped checkpoints per dataset, and the example gallery."""
from __future__ import annotations

import json
from pathlib import Path

from medvqa.predict import SHIPPED, checkpoints_dir

ASSETS = SHIPPED.parent
DATASETS = {"vqa-rad": "VQA-RAD", "slake": "SLAKE", "folder": "your cases (fine-tuned here)"}
N_SLOTS = 4           # model columns: CMI-MTL, CMDPI, baseline, and the newest fine-tuned here
MODEL_ORDER = ("cmi-mtl", "cmdpi", "baseline")   # shown left to right when present
MODEL_TITLES = {"cmi-mtl": "CMI-MTL", "cmdpi": "CMDPI", "baseline": "Baseline"}


def user_checkpoints_dir() -> Path:
    """Where the Fine-tune tab writes its checkpoints."""
    from medvqa.review import data_dir

    return data_dir() / "checkpoints"


def checkpoints_for(dataset: str) -> list[Path]:
    """Shipped checkpoints trained on `dataset`, papers' models first, then the newest one
    fine-tuned in this app on the same dataset."""
    found = [p for p in (checkpoints_dir() / f"{m}-{dataset}" for m in MODEL_ORDER) if (p / "config.json").is_file()]
    mine = sorted((p for p in user_checkpoints_dir().glob("*/config.json")
                   if json.loads(p.read_text()).get("dataset") == dataset), key=lambda p: p.stat().st_mtime)
    return found + [mine[-1].parent] if mine else found


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
