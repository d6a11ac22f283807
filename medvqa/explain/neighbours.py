"""Example-based explanation: the k training cases nearest to a question in the model's own
feature space (the vector its answer head reads), with their questions and answers — CMDPI's
"similar images" made visible.

An index holds a training split's unit-norm features in fp16 with each case's id, question, answer
and image path relative to the dataset folder (no images), and names the weights it was computed
from. The shipped checkpoints' indexes are shipped under assets/neighbours/ (`python -m medvqa
index`), so the cases show without the dataset folder; any other checkpoint's is built once, in
the background (`IndexBuilds`), and cached under the user cache dir."""
from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import torch

from medvqa.predict import SHIPPED

SHIPPED_INDEXES = SHIPPED.parent / "neighbours"
BUILD_CHUNK = 256   # records per progress step of a background build


def weights_digest(ckpt) -> str:
    """Cheap identity of a checkpoint's weights: size and first MiB of each weights file."""
    files = sorted(Path(ckpt).glob("*.safetensors"))   # the model and any tuned backbone blocks
    return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=64)
def _digest(files: tuple) -> str:
    """Keyed by each file's (path, size, mtime): a click reads no MiB again, a rewritten file is read anew."""
    h = hashlib.sha1()
    for f, size, _ in files:
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20) + str(size).encode())
    return h.hexdigest()[:16]


def cached_index_path(ckpt) -> Path:
    from medvqa.models.encoders import cache_dir

    return cache_dir() / "neighbours" / f"{Path(ckpt).name}-{weights_digest(ckpt)}.npz"


def build_index(predictor, records, root=None, progress: bool = True, on_chunk=None) -> dict:
    """The index of `records` in `predictor`'s feature space; image paths are stored relative to
    `root` (a dataset folder, or the folder of a 'folder' dataset's CSV) when given.
    `on_chunk(done, total)` is called after each chunk of records."""
    feats = []
    for i in range(0, len(records), BUILD_CHUNK):
        feats.append(predictor.features_records(records[i:i + BUILD_CHUNK], progress=progress)[0])
        if on_chunk:
            on_chunk(min(i + BUILD_CHUNK, len(records)), len(records))
    f = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    f = f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-8)                      # (N, D) unit rows
    base = None if root is None else Path(root) if Path(root).is_dir() else Path(root).parent   # 'folder': a CSV
    rel = (lambda p: str(Path(p).relative_to(base))) if base is not None else str
    meta = [{"qid": r.qid, "image": rel(r.image), "question": r.question, "answer": r.answer} for r in records]
    return {"features": f.astype(np.float16), "records": meta, "weights": weights_digest(predictor.path),
            "dataset": predictor.config.get("dataset")}


def save_index(index: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: index[k] for k in ("records", "weights", "dataset")}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, features=index["features"], meta=np.array(json.dumps(meta)))
    tmp.replace(path)   # atomic: a reader never sees half a file
    return path


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        # fp32 in memory: numpy has no fast fp16 matmul
        return {**meta, "features": z["features"].astype(np.float32)}


def load_index(ckpt) -> dict | None:
    """The index of checkpoint folder `ckpt`, shipped or cached, if one matches its weights."""
    weights = weights_digest(ckpt)
    for path in (SHIPPED_INDEXES / f"{Path(ckpt).name}.npz", cached_index_path(ckpt)):
        if path.is_file() and (index := _read(str(path), path.stat().st_mtime))["weights"] == weights:
            return index
    return None


def load_or_build_index(predictor, dataset: str, root, split: str = "train", progress: bool = True) -> dict:
    """load_index, else built over `dataset`'s `split` at `root` and cached (blocking: for the CLI;
    the app builds through IndexBuilds)."""
    from medvqa.data import load_split

    index = load_index(predictor.path)
    if index is None:
        index = build_index(predictor, load_split(dataset, root, split).records, root, progress)
        save_index(index, cached_index_path(predictor.path))
        index = load_index(predictor.path)
    return index


class IndexBuilds:
    """Background index builds, one thread per checkpoint, with progress: a click never waits for one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}    # checkpoint path -> {"done", "total", "error"}

    def start(self, ckpt, dataset: str, root) -> None:
        key = str(Path(ckpt).resolve())
        with self._lock:
            if key in self._state and not self._state[key].get("error"):
                return
            self._state[key] = {"done": 0, "total": None, "error": None}
        threading.Thread(target=self._run, args=(key, dataset, root), daemon=True,
                         name=f"index-{Path(key).name}").start()

    def _run(self, key, dataset, root):
        from medvqa.data import load_split
        from medvqa.predict import Predictor

        def step(done, total):
            self._state[key].update(done=done, total=total)
        try:
            records = load_split(dataset, root, "train").records
            step(0, len(records))
            save_index(build_index(Predictor.load(key), records, root, False, step), cached_index_path(key))
        except Exception as e:  # shown in the app instead of the cases; a later ask retries
            self._state[key]["error"] = f"{e.__class__.__name__}: {e}"

    def progress(self, ckpt) -> dict | None:
        """{"done", "total", "error"} of a build started here, or None."""
        return self._state.get(str(Path(ckpt).resolve()))


def nearest(index: dict, vector: np.ndarray, k: int = 5) -> list[dict]:
    """Cosine top-k -> [{qid, image, question, answer, similarity}], most similar first."""
    v = vector / max(float(np.linalg.norm(vector)), 1e-8)
    # torch, not numpy: numpy's OpenBLAS threads spin on after a product and took the cores from the
    # next backbone pass (55 -> 113-157 ms, docs/experiments.md)
    sim = (torch.from_numpy(index["features"]).float() @ torch.from_numpy(v.astype(np.float32))).numpy()  # (N,)
    top = np.argsort(-sim)[:k]
    return [{**index["records"][i], "similarity": round(float(sim[i]), 4)} for i in top]
