"""Probe: how much of a model's answer the image decides. 16 test images × 16 test questions, every pair
answered; the variance of the fused vector and of the logits over the grid is split into an image main
effect, a question main effect and their interaction (two-way ANOVA shares, summed over dimensions).
Not a product path. Run from the repository root:

    python benchmarks/image_share_probe.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvqa.data import load_split                                    # noqa: E402
from medvqa.data.cache import FeatureCache                            # noqa: E402
from medvqa.data.features import FeatureDataset, collate              # noqa: E402
from medvqa.predict import Predictor                                  # noqa: E402
from medvqa.train.data import answer_token_ids                        # noqa: E402

PAIRS = (("vqa-rad", "vqa_rad"), ("slake", "slake"))


def shares(F):
    """F (I, Q, D) -> [image, question, interaction] shares of its total variance."""
    g = F.mean((0, 1), keepdim=True)
    im, qm = F.mean(1, keepdim=True) - g, F.mean(0, keepdim=True) - g
    total = ((F - g) ** 2).sum()
    parts = (im.expand_as(F), qm.expand_as(F), F - g - im - qm)
    return [round(float((x ** 2).sum() / total), 3) for x in parts]


def grid(p, records, n=16):
    """The batch of n distinct images × n distinct questions (image-major)."""
    enc = p.encoders
    cache = FeatureCache(enc, progress=False)
    answers = answer_token_ids(enc.tokenizer, sorted({r.answer_norm for r in records}), p.preset.cmi_mtl.max_answer_len)
    ds = FeatureDataset(records, p.vocab, cache.images([r.image for r in records]),
                        cache.questions([r.question for r in records]), answers)
    def first(key):   # the first record of each of the first n distinct keys
        seen = {}
        for i, r in enumerate(records):
            seen.setdefault(key(r), i)
        return list(seen.values())[:n]
    images, questions = first(lambda r: r.image), first(lambda r: r.question)
    return collate([dict(ds[q], image_tokens=ds[i]["image_tokens"]) for i in images for q in questions]), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    a = ap.parse_args()
    for dataset, folder in PAIRS:
        records = load_split(dataset, a.data / folder, "test").records
        for model in ("cmi-mtl", "baseline"):
            p = Predictor.load(f"{model}-{dataset}")
            batch, n = grid(p, records)
            m = p.model.eval()
            with torch.no_grad():
                fused, logits = m.forward_features(batch)["fused"], m(batch)["logits"]
            top1 = logits.view(n, n, -1).argmax(-1)                                          # (images, questions)
            moved = float((top1 != top1.roll(1, 0)).float().mean())
            print(f"{model}-{dataset}: [image, question, interaction] shares: fused {shares(fused.view(n, n, -1))}, "
                  f"logits {shares(logits.view(n, n, -1))}; top-1 moved by another image {moved:.3f}")


if __name__ == "__main__":
    main()
