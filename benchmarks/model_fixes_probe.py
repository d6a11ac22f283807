"""Probe: the measurements behind docs/decisions.md, Model defects fixed (CMCL's unimodal pass, CMDPI's caption
negatives, the AHead's mask M). Not a product path; prints one block per part.

    python benchmarks/model_fixes_probe.py qqformer    # cost of CMCL's image-only queries
    python benchmarks/model_fixes_probe.py captions    # identical pseudo-captions per batch
    python benchmarks/model_fixes_probe.py questions   # CMCL: one question text on two images per batch
    python benchmarks/model_fixes_probe.py batches     # images per whole-image batch (a tuned backbone's)
    python benchmarks/model_fixes_probe.py mask        # how far the shipped checkpoints' M moved
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
DATASETS = (("vqa-rad", "vqa_rad", "cmi-mtl-vqa-rad"), ("slake", "slake", "cmi-mtl-slake"))


def qqformer(reps: int = 8):
    """Forward + backward at the offline widths (d 256, K 32, 2 layers, 4 heads), B 32, 257 image
    tokens, 20 question tokens; the minimum over `reps`."""
    from medvqa.models.qformer import QQFormer

    torch.manual_seed(0)
    qq = QQFormer(256, 32, 2, 4).train()
    v, t, pad = torch.randn(32, 257, 256), torch.randn(32, 20, 256), torch.zeros(32, 20, dtype=torch.bool)
    runs = {"question-aware pass only (before)": lambda: qq(v, t, pad).sum(),
            "+ a separate image-only pass": lambda: qq(v, t, pad).sum() + qq(v, None, None).sum(),
            "one pass, unimodal block mask (shipped)": lambda: sum(z.sum() for z in qq(v, t, pad, unimodal=True))}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for k, f in runs.items():
            s = time.perf_counter()
            f().backward()
            best[k] = min(best[k], time.perf_counter() - s)
    for k, b in best.items():
        print(f"{k:42s} {b:.3f} s")


def captions(batch: int = 32, draws: int = 1000):
    """Pseudo-captions of each train split: distinct strings, and rows of a uniformly drawn batch
    that share their text with another row."""
    from medvqa.data import load_split
    from medvqa.data.captions import pseudo_captions

    for name, folder, _ in DATASETS:
        texts = [c.question for c in pseudo_captions(load_split(name, DATA / folder, "train").records)]
        rng = random.Random(0)
        shared = [sum(n for n in collections.Counter(rng.sample(texts, batch)).values() if n > 1) for _ in range(draws)]
        print(f"{name}: {len(texts)} pseudo-captions, {len(set(texts))} distinct; in a batch of {batch} "
              f"({draws} draws) {sum(shared) / draws:.1f} rows share their text on average")


def questions(batch: int = 32, draws: int = 1000):
    """CMCL's negatives: rows of a uniformly drawn batch of train questions whose question text is also
    in the batch on another image (same-image pairs were masked already)."""
    from medvqa.data import load_split

    for name, folder, _ in DATASETS:
        recs = load_split(name, DATA / folder, "train").records
        rng = random.Random(0)
        shared = 0
        for _ in range(draws):
            b = rng.sample(recs, batch)
            images = collections.defaultdict(set)
            for r in b:
                images[r.question].add(r.image)
            shared += sum(len(images[r.question] - {r.image}) > 0 for r in b)
        print(f"{name}: {len(recs)} train questions, {len(set(r.question for r in recs))} distinct; in a batch of "
              f"{batch} ({draws} draws) {shared / draws:.1f} rows share their text with a row on another image")


def batches(batch: int = 32):
    """Rows and distinct images in the whole-image batches a tuned backbone trains on (ImageBatchSampler,
    seed 0; VQA-RAD on the 90 % the held-out protocol trains on): CMCL's other images per batch."""
    from medvqa.data import holdout, load_split
    from medvqa.train.samplers import ImageBatchSampler

    for name, folder, _ in DATASETS:
        recs = load_split(name, DATA / folder, "train").records
        if name == "vqa-rad":
            recs = holdout(recs, 0.1, 0)[0]
        bs = list(ImageBatchSampler([r.image for r in recs], batch, seed=0))
        images = [len({recs[i].image for i in b}) for b in bs]
        print(f"{name}: {len(bs)} batches, {sum(map(len, bs)) / len(bs):.1f} rows and {sum(images) / len(bs):.1f} "
              f"distinct images a batch on average (fewest {min(images)})")


def mask():
    """The shipped M: range, and the last position that ever moved against the longest question."""
    from safetensors.torch import load_file

    from medvqa.data import load_split
    from medvqa.models.encoders import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    for name, folder, ck in DATASETS:
        M = load_file(str(ROOT / "assets" / "checkpoints" / ck / "model.safetensors"))["ahead.M"].float()
        moved = int(((M - 1).abs() > 1e-6).nonzero().max())
        longest = max(len(tok(r.question, truncation=True, max_length=40)["input_ids"])
                      for r in load_split(name, DATA / folder, "train").records)
        print(f"{ck}: M in [{M.min():.3f}, {M.max():.3f}] over {len(M)} positions; last moved {moved}; "
              f"longest train question {longest} tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = {"qqformer": qqformer, "captions": captions, "questions": questions, "batches": batches,
             "mask": mask}
    ap.add_argument("part", choices=list(parts))
    parts[ap.parse_args().part]()
