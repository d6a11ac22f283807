"""Example-based explanation: the k training cases nearest to a question in the model's own
feature space (the vector its answer head reads), with their questions and answers — CMDPI's
"similar images" made visible. The index covers a training split and is cached per checkpoint
weights under the user cache dir."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def _index_path(predictor) -> Path:
    from medvqa.models.encoders import cache_dir

    h = hashlib.sha1()
    for f in sorted(Path(predictor.path).glob("*.safetensors")):   # the model and any tuned backbone blocks
        h.update(f.read_bytes()[: 1 << 20] + str(f.stat().st_size).encode())
    digest = h.hexdigest()[:16]
    return cache_dir() / "neighbours" / f"{Path(predictor.path).name}-{digest}"


def build_index(predictor, records, progress: bool = True) -> dict:
    feats, _ = predictor.features_records(records, progress=progress)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-8)
    meta = [{"qid": r.qid, "image": r.image, "question": r.question, "answer": r.answer} for r in records]
    return {"features": feats.astype(np.float32), "records": meta}


def load_or_build_index(predictor, dataset: str, root, split: str = "train", progress: bool = True) -> dict:
    from medvqa.data import load_split

    path = _index_path(predictor)
    if (path / "features.npy").is_file():
        return {"features": np.load(path / "features.npy"), "records": json.loads((path / "records.json").read_text())}
    index = build_index(predictor, load_split(dataset, root, split).records, progress)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "features.npy", index["features"])
    (path / "records.json").write_text(json.dumps(index["records"]))
    return index


def nearest(index: dict, vector: np.ndarray, k: int = 5) -> list[dict]:
    """Cosine top-k -> [{qid, image, question, answer, similarity}], most similar first."""
    v = vector / max(float(np.linalg.norm(vector)), 1e-8)
    sim = index["features"] @ v.astype(np.float32)
    top = np.argsort(-sim)[:k]
    return [{**index["records"][i], "similarity": round(float(sim[i]), 4)} for i in top]
