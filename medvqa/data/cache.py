"""On-disk feature cache: encode each image / question once with a frozen backbone, reuse forever.

Keys are (backbone + preprocessing) for the folder and the content hash (file bytes or question
text) for the file, so a changed image or a different backbone never reads stale features.
Layout: <cache>/features/<key>/<hash[:2]>/<hash>.safetensors, written atomically. Augmented
training views (view ≥ 1, `medvqa.data.images.augment`) live under their own key; view 0 is the
image itself.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from medvqa.data.images import AUGMENT_VERSION, augment, load_image


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _view(payload):
    """(path, augmentation seed or None) -> the image or its augmented view."""
    path, seed = payload
    im = load_image(path)
    return augment(im, seed) if seed else im


def _view_key(key: str, view: int) -> str:
    return f"{key}-{AUGMENT_VERSION}-view{view}" if view else key


def _atomic_save(tensors: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class FeatureCache:
    def __init__(self, encoders, root: Path | None = None, batch_size: int = 16, progress: bool = True):
        from medvqa.models.encoders import cache_dir

        self.enc = encoders
        self.root = Path(root) if root else cache_dir() / "features"
        self.batch_size = batch_size
        self.progress = progress
        self.hits = self.misses = 0
        self._digests = {}   # path -> content hash, so K views of an image read and hash it once

    def _image_items(self, paths, view: int) -> list:
        """(path, digest, (path, augmentation seed or None)) per distinct path; the file is read
        again only when a miss is encoded."""
        items = []
        for p in dict.fromkeys(paths):
            if p not in self._digests:
                self._digests[p] = _sha1(Path(p).read_bytes())
            d = self._digests[p]
            items.append((p, d, (p, f"{d}-{view}" if view else None)))
        return items

    def _path(self, key: str, digest: str) -> Path:
        return self.root / key / digest[:2] / f"{digest}.safetensors"

    def _fill(self, items: list, key: str, encode, desc: str) -> dict:
        """items: (name, digest, payload). Returns name -> dict of tensors, encoding only misses."""
        out, todo = {}, []
        for name, digest, payload in items:
            p = self._path(key, digest)
            if p.is_file():
                out[name] = load_file(str(p))
                self.hits += 1
            else:
                todo.append((name, digest, payload))
        self.misses += len(todo)
        bar = tqdm(total=len(todo), desc=desc, disable=None if self.progress and todo else True, leave=False)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            with torch.inference_mode():
                feats = encode([c[2] for c in chunk])
            for j, (name, digest, _) in enumerate(chunk):
                t = {k: v[j] for k, v in feats.items()}
                _atomic_save(t, self._path(key, digest))
                out[name] = t
            bar.update(len(chunk))
        bar.close()
        return out

    def images(self, paths, view: int = 0, start: int | None = None) -> dict:
        """path -> {"tokens": (1+N, Di) float16} (CLS first) of the image (view 0) or of its
        augmented training view `view`: the backbone's output, or with `start` the input of block
        `start` (for training the blocks from there on, medvqa.train.tuning)."""
        def encode(payloads):
            px = self.enc.preprocess([_view(p) for p in payloads])
            if start is not None:
                return {"tokens": self.enc.image_states(px, start).half()}
            g, loc = self.enc.encode_image(px)
            return {"tokens": torch.cat([g[:, None], loc], 1).half()}
        desc = "caching image features" + (f" (view {view})" if view else "") + (f" (block {start} input)"
                                                                                if start is not None else "")
        return self._fill(self._image_items(paths, view), _view_key(self.enc.image_key(start), view), encode, desc)

    def pixels(self, paths, size: int, view: int = 0) -> dict:
        """path -> (3, size, size) uint8: the image (or its view `view`) as the encoder sees it
        (squash, bicubic), for pixel-reconstruction targets."""
        import numpy as np
        from PIL import Image

        def encode(payloads):
            ims = [np.asarray(_view(p).resize((size, size), Image.BICUBIC)) for p in payloads]
            return {"pixels": torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()}
        out = self._fill(self._image_items(paths, view), _view_key(f"pixels-{size}-squash-bicubic", view), encode,
                         "caching pixel targets")
        return {k: v["pixels"] for k, v in out.items()}

    def questions(self, questions, start: int | None = None) -> dict:
        """question -> {"tokens": (L, Dt) float16, "pooled": (Dt,), "input_ids": (L,)} (unpadded);
        with `start`, "tokens" is the input of text block `start` and there is no "pooled" (the
        tuned blocks make it)."""
        items = [(q, _sha1(q.encode()), q) for q in dict.fromkeys(questions)]

        def encode(qs):
            t = self.enc.tokenize(qs)
            if start is None:
                pooled, h = self.enc.encode_text(t["input_ids"], t["attention_mask"])
            else:
                pooled, h = None, self.enc.text_states(t["input_ids"], t["attention_mask"], start)
            lens = t["attention_mask"].sum(1)
            # Unpad per question so the cached entry does not depend on the batch it was encoded in.
            return {"tokens": [h[i, :lens[i]].half() for i in range(len(qs))],
                    "input_ids": [t["input_ids"][i, :lens[i]] for i in range(len(qs))]} | (
                {"pooled": pooled.half()} if pooled is not None else {})
        return self._fill(items, self.enc.text_key(start), encode, "caching question features")
