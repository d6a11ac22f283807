"""Probe: does training the image backbone's last k blocks help, over frozen features?

Trains a model (default: the baseline) on VQA-RAD with DINOv2-S's last k blocks and final norm
trainable, from cached inputs of block 12-k, and prints one JSON line: validation (the held-out
train slice, as `medvqa train`) and test accuracy. `--k 0` is the frozen control on the same
batching. Batches hold whole images (all training questions of ~batch-size/q images), so a
trainable block runs once per image: per-question batches made a block cost ~90 s per epoch on
one core. Not a product path: nothing here is saved as a shippable checkpoint.

    python benchmarks/unfreeze_probe.py --k 1 --out runs/unfreeze/k1
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from medvqa.config import get_preset
from medvqa.data.images import load_image
from medvqa.models.encoders import Encoders
from medvqa.models.registry import build
from medvqa.train import trainer
from medvqa.train.checkpoint import load_weights
from medvqa.train.data import prepare


class TopBlocks(nn.Module):
    """Backbone blocks [12-k:] + final norm (trainable) in front of a medvqa model."""

    def __init__(self, encoders, model, k: int):
        super().__init__()
        self.blocks = copy.deepcopy(encoders.image.encoder.layer[len(encoders.image.encoder.layer) - k:]).requires_grad_(True)
        self.norm = copy.deepcopy(encoders.image.layernorm).requires_grad_(True)
        self.model, self.loss_weights = model, model.loss_weights
        self.pretrained_prefixes = ("blocks.", "norm.")   # trained at lr_pretrained

    def forward(self, batch):
        if not len(self.blocks):
            return self.model(batch)
        ids, inv = torch.unique(batch["image_id"], return_inverse=True)
        first = torch.zeros(len(ids), dtype=torch.long).scatter_(0, inv, torch.arange(len(inv)))
        h = batch["image_tokens"][first]                                  # (U, 1+N, Di): each image once
        for b in self.blocks:
            h = b(h)
        return self.model(batch | {"image_tokens": self.norm(h)[inv]})


class ImageBatches:
    """Whole images per batch, shuffled per epoch (the trainer's batch_sampler protocol)."""

    def __init__(self, records, per_batch: int, seed: int):
        self.by_image, self.per_batch, self.seed, self.epoch = {}, per_batch, seed, 0
        for i, r in enumerate(records):
            self.by_image.setdefault(r.image, []).append(i)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _batches(self):
        images = sorted(self.by_image)
        random.Random(self.seed + self.epoch).shuffle(images)
        out, cur = [], []
        for im in images:
            cur += self.by_image[im]
            if len(cur) >= self.per_batch:
                out, cur = out + [cur], []
        return out + ([cur] if cur else [])

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return len(self._batches())


@torch.inference_mode()
def block_inputs(encoders, paths, k: int) -> dict:
    """path -> {"tokens": (1+N, Di) float16}, the input of block 12-k (checked against the frozen path)."""
    out = {}
    for i in range(0, len(paths), 16):
        px = encoders.preprocess([load_image(Path(p).read_bytes()) for p in paths[i:i + 16]])
        o = encoders.image(pixel_values=px, output_hidden_states=True)
        hs = o.hidden_states[len(o.hidden_states) - 1 - k]
        if i == 0:
            h = hs
            for b in encoders.image.encoder.layer[len(encoders.image.encoder.layer) - k:]:
                h = b(h)
            assert torch.allclose(encoders.image.layernorm(h), o.last_hidden_state, atol=1e-4)
        out |= {p: {"tokens": hs[j].half()} for j, p in enumerate(paths[i:i + 16])}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="baseline")
    ap.add_argument("--root", default="../shared/data/vqa_rad")
    ap.add_argument("--k", type=int, default=1, help="trainable last blocks (0: frozen control)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr-pretrained", type=float, default=2e-5)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    preset = get_preset("offline")
    t = preset.train
    t.epochs, t.lr_pretrained = a.epochs, a.lr_pretrained
    torch.manual_seed(t.seed)
    enc = Encoders(preset.encoders)
    data = prepare("vqa-rad", a.root, preset, enc, "all")
    sets = (data.train, data.val, data.test)
    if a.k:
        feats = block_inputs(enc, sorted({r.image for ds in sets for r in ds.records}), a.k)
        for ds in sets:
            ds.image_feats = feats
    model = TopBlocks(enc, build(a.model, preset, len(data.vocab), ahead_vocab=data.ahead_vocab), a.k)

    t0 = time.time()
    res = trainer.fit(model, data.train, data.val, t, a.out, {"model": a.model, "k": a.k},
                      batch_sampler=ImageBatches(data.train.records, t.batch_size, t.seed))
    load_weights(model, a.out / "best")
    r = trainer.accuracy(model, data.test)
    print(json.dumps({"model": a.model, "k": a.k, "lr_pretrained": a.lr_pretrained, "best_epoch": res.best["epoch"],
                      "val": res.best["val_overall"], "test": {x: r[x] for x in ("open", "closed", "overall")},
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
