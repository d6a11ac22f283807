"""How low can temperature scaling take each shipped checkpoint's test ECE at all? An oracle bound, not a fit.

    PYTHONPATH=. python benchmarks/oracle_temperature.py --data ../shared/data --out benchmarks/oracle-temperature.json

For each checkpoint: the test ECE at its shipped T(s), and the smallest test ECE over a grid of one T, and of two
(yes/no top answers apart, as `calibrate --yes-no`), with the T(s) that reach it. The oracle T is chosen *on test*,
so it is never shipped and says nothing about what a held-out fit would give: it only bounds it. Where even the
oracle stays above a bar, no temperature on the grid (0.5 to 8, 2.3 % steps) meets that bar on this test set
(the binned ECE jumps with T, so a finer grid could find a little lower).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medvqa.calibration import expected_calibration_error, labels_of, row_temperatures, top1, yes_no_rows
from medvqa.data import load_split
from medvqa.predict import Predictor

CHECKPOINTS = {"baseline-vqa-rad": "vqa_rad", "cmi-mtl-vqa-rad": "vqa_rad", "cmdpi-vqa-rad": "vqa_rad",
               "cmdpi-vqa-rad-no-mixup": "vqa_rad", "baseline-slake": "slake", "cmi-mtl-slake": "slake",
               "cmdpi-slake": "slake", "cmdpi-slake-no-mixup": "slake"}
GRID = np.round(np.exp(np.linspace(np.log(0.5), np.log(8.0), 121)), 4)   # T from 0.5 to 8, 2.3 % steps


def ece(z, ok_of, t) -> float:
    """(N, C) logits, per-row T (N,) -> test ECE of the top-1 confidence (ok_of: (N,) bool, T-independent)."""
    return expected_calibration_error(top1(z, t)[1].numpy(), ok_of)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding vqa_rad/ and slake/")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    out = {}
    for name, folder in CHECKPOINTS.items():
        p = Predictor.load(name)
        recs = load_split(p.config["dataset"], a.data / folder, "test").records
        z = p.logits_records(recs, progress=False)                               # (N, C)
        ok = (z.argmax(-1) == labels_of(recs, p.vocab)).numpy()
        yn = yes_no_rows(z, p.vocab.answers)                                      # (N,) bool
        one = [ece(z, ok, torch.full((len(z),), t)) for t in GRID]
        # two Ts: both kinds share the ECE's bins, so the pair is searched jointly: every 4th grid point, then the
        # full grid within 4 steps of the best pair
        pair = lambda ty, to: (ece(z, ok, torch.where(yn, ty, to)), float(ty), float(to))
        _, ty0, to0 = min(pair(ty, to) for ty in GRID[::4] for to in GRID[::4])
        near = lambda t0: GRID[max(0, int(np.searchsorted(GRID, t0)) - 4):int(np.searchsorted(GRID, t0)) + 5]
        t1 = float(GRID[int(np.argmin(one))])
        two = min([pair(ty, to) for ty in near(ty0) for to in near(to0)] + [pair(t1, t1)])   # never above one T
        out[name] = {"n": len(z), "shipped_T": p.config.get("temperature", 1.0),
                     "shipped_T_yes_no": p.config.get("temperature_yes_no"),
                     "ece_T1": round(ece(z, ok, torch.ones(len(z))), 2),
                     "ece_shipped": round(ece(z, ok, row_temperatures(z, p.vocab.answers, p.config)), 2),
                     "oracle_one_T": {"ece": round(min(one), 2), "T": t1},
                     "oracle_two_T": {"ece": round(two[0], 2), "T_yes_no": two[1], "T": two[2]}}
        print(name, json.dumps(out[name]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
