"""Does storing a checkpoint in float16 move its answers?

`save_checkpoint` stores a model over 20 MB in float16 (CMI-MTL), so the epoch is chosen on float32 weights
but the test is read from rounded ones. This perturbs every weight of a loaded checkpoint by up to half a
float16 step (relative 2^-11, uniform) and counts the test answers that change, a few draws each.
A proxy: it perturbs the parameters (not the buffers), and weights small enough for float16 to flush or
round coarsely are perturbed like the rest.

    python benchmarks/fp16_rounding.py --checkpoint cmi-mtl-vqa-rad --dataset vqa-rad --root ../shared/data/vqa_rad
"""
from __future__ import annotations

import argparse

import torch

from medvqa.data.datasets import load_split
from medvqa.predict import Predictor


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--draws", type=int, default=3)
    a = ap.parse_args()
    p = Predictor.load(a.checkpoint)
    records = load_split(a.dataset, a.root, "test").records
    answers = p.logits_records(records, progress=False).argmax(-1)
    saved = {k: v.clone() for k, v in p.model.state_dict().items()}
    changed = []
    for seed in range(a.draws):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in p.model.parameters():
                w.add_(w * (torch.rand(w.shape, generator=g) - 0.5) * 2 ** -10)
        changed.append(int((p.logits_records(records, progress=False).argmax(-1) != answers).sum()))
        p.model.load_state_dict(saved)
    print({"checkpoint": a.checkpoint, "questions": len(records), "answers_changed_per_draw": changed})


if __name__ == "__main__":
    main()
