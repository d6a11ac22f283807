"""One temperature against two (yes/no top answers apart from the rest), chosen on SLAKE validate.

    PYTHONPATH=. python benchmarks/calibration_kinds.py --root ../shared/data/slake --split validate   # the choice
    PYTHONPATH=. python benchmarks/calibration_kinds.py --root ../shared/data/slake --split test       # read after it

On validate: each scheme's ECE over 2-fold cross-fitting (T fitted on one half, ECE of the pooled out-of-fold
confidences), 5 random halvings (seed 0-4), mean. On test: each scheme fitted on all of validate.
The kind of a question is that of its top-1 answer (yes / no or other), known at inference, and T never
changes the argmax, so accuracy is unchanged.
"""
import argparse
import json

import numpy as np
import torch

from medvqa.calibration import expected_calibration_error, fit_temperature, labels_of, top1
from medvqa.data import load_split
from medvqa.predict import Predictor

CHECKPOINTS = ("baseline-slake", "cmdpi-slake", "cmi-mtl-slake", "cmdpi-slake-no-mixup")


def kinds(p, logits):
    """(N,) bool: the top-1 answer is yes or no."""
    yn = torch.tensor([a in ("yes", "no") for a in p.vocab.answers])
    return yn[logits.argmax(-1)]


def fit(scheme, z, y, k):
    """-> per-row T for rows of kind k, from (z, y, k) fitted rows."""
    if scheme == "one":
        t = fit_temperature(z, y)
        return lambda kk: torch.full((len(kk),), t)
    ts = {b: fit_temperature(z[k == b], y[k == b]) for b in (True, False)}
    return lambda kk: torch.where(kk, torch.tensor(ts[True]), torch.tensor(ts[False]))


def ece(z, y, t):
    idx, conf = top1(z / t[:, None])
    return expected_calibration_error(conf.numpy(), (idx == y).numpy())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", choices=("validate", "test"), required=True)
    a = ap.parse_args()
    val = load_split("slake", a.root, "validate").records
    out = {}
    for name in CHECKPOINTS:
        p = Predictor.load(name)
        zv, yv = p.logits_records(val, progress=False), labels_of(val, p.vocab)
        kv = kinds(p, zv)
        row = {}
        if a.split == "validate":
            for scheme in ("one", "two"):
                scores = []
                for seed in range(5):
                    half = torch.from_numpy(np.random.default_rng(seed).permutation(len(yv)) % 2 == 0)
                    t = torch.empty(len(yv))
                    for f in (half, ~half):
                        keep = ~f & (yv >= 0)      # fit on the other half, answers in the vocabulary
                        t[f] = fit(scheme, zv[keep], yv[keep], kv[keep])(kv[f])
                    scores.append(ece(zv, yv, t))
                row[scheme] = round(float(np.mean(scores)), 2)
        else:
            test = load_split("slake", a.root, "test").records
            zt, yt = p.logits_records(test, progress=False), labels_of(test, p.vocab)
            kt = kinds(p, zt)
            keep = yv >= 0
            for scheme in ("one", "two"):
                row[scheme] = round(ece(zt, yt, fit(scheme, zv[keep], yv[keep], kv[keep])(kt)), 2)
            row["T_yes_no"] = round(fit_temperature(zv[keep & kv], yv[keep & kv]), 4)
            row["T_other"] = round(fit_temperature(zv[keep & ~kv], yv[keep & ~kv]), 4)
        out[name] = row
        print(name, row, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
