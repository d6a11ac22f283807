"""Probe: pointing-game hit rates of several readouts of one gradient-weighted rollout per question
(CLS row vs output-token gradient × activation, signed or its magnitude, propagated through R, gradient-free rollout, start
blocks 2/4/6, each with and without σ = 1 patch smoothing), on a SLAKE split. Chose the default
smoothing on validation (docs/decisions.md). For a model with a QQ-Former (CMI-MTL) also the
head's own reading: its cross-attention from the K queries to the image tokens, gradient-weighted
((∇A ⊙ A)⁺, mean over heads, summed over layers), summed over queries ("q") or weighted by each
query's |∇z·z| ("qw"), taken through the ViT rollout R or read directly ("…direct"), and the
gradient-free mean cross-attention ("qattn").

    python benchmarks/rollout_variants.py CHECKPOINT validate [LIMIT]   # prints one JSON line
"""
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from medvqa.predict import Predictor
from medvqa.data import load_split
from medvqa.explain.pointing import pointing_cases, hit, center_hit
from medvqa.explain.gradcam import eager_attention
from probe_common import case_inputs, up

ckpt, split = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
p = Predictor.load(ckpt); enc = p.encoders; model = p.model.eval()
cases = pointing_cases(load_split("slake", "../shared/data/slake", split).records)[:int(sys.argv[3]) if len(sys.argv) > 3 else None]
g = enc.grid
hits = {}


for c in cases:
    w, x, target = case_inputs(enc, model, c.record)
    vit = enc.image
    cross = []                                  # QQ-Former cross-attention probabilities, (1, heads, K, T) each
    qq = getattr(model, "qqformer", None)
    for layer in (qq.layers if qq is not None else []):
        def fwd(q, k, v, _m=layer.cross_attn, **kw):
            # nn.MultiheadAttention, written out (eval, no mask) so that A is on the gradient's path
            W, b, H = _m.in_proj_weight, _m.in_proj_bias, _m.num_heads
            split = lambda x: x.reshape(x.shape[0], x.shape[1], H, -1).transpose(1, 2)      # (1, H, n, d/H)
            Q, K_, V = (split(F.linear(x, w_, b_)) for x, w_, b_ in zip((q, k, v), W.chunk(3), b.chunk(3)))
            a = torch.softmax(Q @ K_.transpose(-1, -2) / Q.shape[-1] ** 0.5, -1)             # (1, H, K, T)
            a.retain_grad(); cross.append(a)
            o = (a @ V).transpose(1, 2).reshape(q.shape)
            return _m.out_proj(o), None
        layer.cross_attn.forward = fwd
    zout = []                                   # the QQ-Former's output z, (1, K, d)

    def keep(m, i, o):
        o.retain_grad(); zout.append(o)         # returns None: the output is not replaced
    hook = qq.register_forward_hook(keep) if qq is not None else None
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
        if start == 4:
            R4 = R
    if cross:
        A = sum((a.grad * a).clamp(min=0).mean(1)[0] for a in cross).detach()      # (K, T)
        wq = (zout[0].grad * zout[0])[0].sum(-1).abs().detach()                   # (K,)
        for name, row in (("q", A.sum(0)), ("qw", wq @ A)):
            maps[name + "4"] = (row @ R4)[-g*g:]
            maps[name + "direct"] = row[-g*g:]
        maps["qattn"] = sum(a.mean(1)[0] for a in cross).sum(0).detach()[-g*g:]
        for layer in qq.layers:
            del layer.cross_attn.forward                                          # back to the class's forward
        hook.remove()
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
