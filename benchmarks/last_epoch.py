"""Control for a refit: a finished run's *last* epoch as a checkpoint folder (not its selected best).

`train` saves the epoch chosen on validation; its work dir keeps the last epoch's state for resume.
This writes that state (the weight average when the run used `--ema`) with the run's config, so
`medvqa eval` can score it. It separates "more data" from "last epoch instead of the best" when a
`--val-fraction 0` refit is compared with a held-out run.

    python benchmarks/last_epoch.py --run runs/cmdpi-vqa-rad-ema-s1 --checkpoint runs/ckpt/cmdpi-vqa-rad-ema-s1 --out runs/last/cmdpi-s1
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medvqa.train.checkpoint import load_checkpoint, save_checkpoint


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the run's work dir (holds train_state.pt)")
    ap.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the run saved (config, architecture)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    model, config, metrics = load_checkpoint(a.checkpoint)
    st = torch.load(a.run / "train_state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(st["model"])
    if "ema" in st:
        model.load_state_dict(st["ema"]["shadow"], strict=False)
    save_checkpoint(a.out, model, config | {"selection": f"none: the last epoch ({st['epoch']}) of {a.run}"},
                    {"last_epoch": st["epoch"]})
    print(f"wrote {a.out} (epoch {st['epoch']}{', weight average' if 'ema' in st else ''})")


if __name__ == "__main__":
    main()
