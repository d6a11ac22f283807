"""Check: do a tuned checkpoint's stored blocks (8-bit differences or float16, as encode_tuned chose) answer as the float32
blocks trained, and does the Predictor (the whole tuned backbone, float32) answer as training saw it
(cached float16 block inputs)?

Reads the float32 weights from the run's train_state.pt, so it needs a run whose saved epoch is its
last (e.g. `train ... --epochs 1`). Prints one JSON line: per comparison the largest logit and
probability difference and the top-1 agreement over the split's questions.

    python benchmarks/tuned_logits.py --checkpoint runs/k2 --workdir runs/k2-work --root ../shared/data/vqa_rad
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medvqa.config import EncoderConfig, preset_from_dict
from medvqa.data import load_image, load_split
from medvqa.data.features import collate
from medvqa.models.encoders import Encoders
from medvqa.predict import Predictor
from medvqa.train.data import prepare
from medvqa.train.tuning import TunedBackbone, load_trained, starts, tuned_blocks


@torch.inference_mode()
def backbone_logits(p: Predictor, enc: Encoders, records, batch_size: int = 16) -> torch.Tensor:
    """(n, C) logits of the Predictor's model on `records`, the images through `enc` end to end."""
    out = []
    for i in range(0, len(records), batch_size):
        rs = records[i:i + batch_size]
        g, loc = enc.encode_image(enc.preprocess([load_image(r.image) for r in rs]))
        batch = {"image_tokens": torch.cat([g[:, None], loc], 1), **enc.question_inputs([r.question for r in rs])}
        out.append(p.model(batch)["logits"].float())
    return torch.cat(out)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_logit": round(float((a - b).abs().max()), 6),
            "max_abs_prob": round(float((a.softmax(-1) - b.softmax(-1)).abs().max()), 6),
            "top1_agree": round(100 * float((a.argmax(-1) == b.argmax(-1)).float().mean()), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="the run's folder with train_state.pt")
    ap.add_argument("--dataset", default="vqa-rad")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--split", default="test")
    a = ap.parse_args()

    p = Predictor.load(a.checkpoint)
    records = load_split(a.dataset, a.root, a.split).records
    stored = backbone_logits(p, p.encoders, records)

    # The float32 blocks as trained: the run's last state, mapped to the backbone's names.
    enc32 = Encoders(EncoderConfig(**vars(p.preset.encoders)))
    blocks = tuned_blocks(p.preset.train)
    live = TunedBackbone(copy.deepcopy(p.model), enc32, blocks)
    live.load_state_dict(torch.load(a.workdir / "train_state.pt", weights_only=True)["model"])
    enc32.load_tuned({k: v.float() for k, v in live.backbone_tensors().items()})
    fp32 = backbone_logits(p, enc32, records)

    # The training path: cached float16 inputs of block L-K through the stored blocks.
    enc = Encoders(EncoderConfig(**vars(p.preset.encoders)))
    preset = preset_from_dict(p.config["preset"])
    data = prepare(a.dataset, a.root, preset, enc, p.config["vocab_protocol"], progress=False,
                   starts=starts(enc, blocks))
    ds = {"train": data.train, "validate": data.val, "test": data.test}[a.split]
    trained = load_trained(a.checkpoint, enc)
    with torch.inference_mode():
        cached = torch.cat([trained({k: v for k, v in b.items() if k != "label"})["logits"].float()
                            for b in DataLoader(ds, batch_size=64, collate_fn=collate)])
    print(json.dumps({"checkpoint": str(a.checkpoint), "split": a.split, "n": len(records), "blocks": blocks,
                      "stored_vs_float32": compare(stored, fp32), "training_path_vs_predictor": compare(cached, stored)}))


if __name__ == "__main__":
    main()
