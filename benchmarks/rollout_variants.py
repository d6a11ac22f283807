"""Probe: pointing-game hit rates of several readouts of one gradient-weighted rollout per question
(CLS row vs output-token gradient × activation, signed or its magnitude, propagated through R, gradient-free rollout, start
blocks 2/4/6, each with and without σ = 1 patch smoothing), on a SLAKE split. Chose the default
smoothing on validation (README, Decisions).

    python benchmarks/rollout_variants.py CHECKPOINT validate [LIMIT]   # prints one JSON line
"""
import json
import sys

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from medvqa.predict import Predictor
from medvqa.data import load_split
from medvqa.explain.pointing import pointing_cases, hit, center_hit
from medvqa.explain.gradcam import ImageToLogits, eager_attention
from medvqa.data.images import load_image

ckpt, split = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
p = Predictor.load(ckpt); enc = p.encoders; model = p.model.eval()
cases = pointing_cases(load_split("slake", "../shared/data/slake", split).records)[:int(sys.argv[3]) if len(sys.argv) > 3 else None]
g = enc.grid
hits = {}


def up(m, size):
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BILINEAR), dtype=np.float32)


for c in cases:
    im = load_image(c.record.image)
    w = ImageToLogits(enc, model, enc.question_inputs([c.record.question])).eval()
    x = enc.preprocess([im])
    with torch.no_grad():
        target = int(w(x).argmax(-1))
    vit = enc.image
    with eager_attention(vit):
        out = vit(pixel_values=x.detach().requires_grad_(True), output_attentions=True)
        hs = out.last_hidden_state; hs.retain_grad()
        attn = out.attentions
        for a in attn: a.retain_grad()
        w.head(hs)[0, target].backward()
    T = attn[0].shape[-1]
    maps = {}
    for start in (2, 4, 6):
        R = torch.eye(T); R0 = torch.eye(T)
        for a in attn[start:]:
            R = R + (a.grad * a).clamp(min=0).mean(1)[0].detach() @ R
            R0 = R0 + a.mean(1)[0].detach() @ R0
        r = (hs.grad * hs).sum(-1)[0].clamp(min=0).detach()          # (T,)
        maps[f"cls{start}"] = R[0, -g*g:]
        maps[f"gxa{start}"] = (r @ R)[-g*g:]
        maps[f"gxa_abs{start}"] = ((hs.grad * hs).sum(-1)[0].abs().detach() @ R)[-g*g:]   # token-rollout
        maps[f"gxa_noid{start}"] = (r @ (R - torch.eye(T)))[-g*g:]
        maps[f"attnroll_cls{start}"] = R0[0, -g*g:]
    maps["gxa_out"] = ((hs.grad * hs).sum(-1)[0].clamp(min=0).detach())[-g*g:]
    for k in list(maps):
        m = maps[k].reshape(g, g).numpy()
        maps[k] = m
        maps[k + "_s1"] = gaussian_filter(m, 1.0)
    for k, m in maps.items():
        hits.setdefault(k, []).append(hit(up(m, c.size), c.boxes))
    hits.setdefault("centre", []).append(center_hit(c))
res = {k: round(100 * float(np.mean(v)), 2) for k, v in hits.items()}
print(json.dumps({"ckpt": ckpt, "split": split, "n": len(cases), "res": res}))
