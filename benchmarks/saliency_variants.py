"""Probe: pointing-game hits of many saliency readouts from one forward + backward per question, to
choose maps on SLAKE validation (docs/experiments.md, Saliency). Per question it keeps the 12 DINOv2 blocks'
attention probabilities, the inputs of every block's norm1 and the final tokens with their gradients
for the predicted answer's logit, and the head's question-conditioned attention per head (CMI-MTL's
QQ-Former cross-attention, the baseline's pooling), then scores:

  roll{s}       gradient-weighted rollout from block s (Chefer et al. 2021), CLS row
  rollm{s}      the same with the outlier tokens' key columns removed from every Ā (nothing flows through them)
  raw{s}        attention rollout without gradients (Abnar & Zuidema 2020)
  gc{l} / lc{l} / gxa{l}   Grad-CAM / LayerCAM / |Σ_c ∇⊙h| on the norm1 input of block l (12: the final tokens)
  head{l}.{h}   one head's gradient-weighted CLS row (∇A ⊙ A)⁺ at block l; cls{l}.{h}: its raw CLS attention
  qa / qa{l}.{h}   the head's own question-conditioned attention (mean; one QQ-Former layer and head)

and every key again with the outlier tokens' map values set to the map's minimum ("…_om"), each
smoothed by σ = 1 patch ("…_s1"). Outliers: patch tokens whose final norm exceeds the image's
median by more than 6 median absolute deviations (scaled to σ).

    python benchmarks/saliency_variants.py CHECKPOINT SPLIT [LIMIT|0] [KEY,KEY…] > hits.json   # hits per key
"""
import json
import sys

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from medvqa.data import load_split
from medvqa.explain.gradcam import eager_attention, outlier_tokens as outliers
from medvqa.explain.pointing import center_hit, hit, pointing_cases, random_hit_probability
from medvqa.predict import Predictor
from probe_common import case_inputs, up

ckpt, split = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
p = Predictor.load(ckpt)
enc, model = p.encoders, p.model.eval()
cases = pointing_cases(load_split("slake", "/work/shared/data/slake", split).records)
cases = cases[:int(sys.argv[3])] if len(sys.argv) > 3 and int(sys.argv[3]) else cases
keys = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else ()            # key prefixes to score (default all)
g = enc.grid
blocks = enc.image.encoder.layer


def head_attention(batch):
    """The head's question-conditioned attention over the image tokens, per layer and head: {key: (1+N,)}."""
    qq = getattr(model, "qqformer", None)
    if qq is None:
        if hasattr(model, "_attend"):
            return {"qa": model._attend(batch)[2][0, :, 0]}
        return {}
    v, t = model.proj_v(batch["image_tokens"]), model.proj_t(batch["text_tokens"])
    t_pad = batch["text_mask"] == 0
    q, t = qq.queries.expand(1, -1, -1), t if qq.use_text else None
    out, K = {}, q.shape[1]
    for i, layer in enumerate(qq.layers):   # QQFormerLayer.forward with the per-head weights kept
        x = q if t is None else torch.cat([q, t], 1)
        pad = None if t is None else torch.cat([torch.zeros_like(t_pad[:, :1]).expand(-1, K), t_pad], 1)
        h = layer.norm_sa(x)
        x = x + layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        q, t = x[:, :K], (None if t is None else x[:, K:])
        h = layer.norm_ca(q)
        ca, w = layer.cross_attn(h, v, v, need_weights=True, average_attn_weights=False)   # w: (1, H, K, 1+N)
        q = q + ca
        q = q + layer.ffn(layer.norm_ff(q))
        for hd in range(w.shape[1]):
            out[f"qa{i}.{hd}"] = w[0, hd].mean(0)
    out["qa"] = torch.stack([v for k, v in out.items()]).mean(0)
    return out


def unit(m):
    return (m - m.min()) / (m.max() - m.min() + 1e-12)


GATED = ("roll4", "roll8", "tok4", "rh4", "qa", "lc4", "lc8", "gc4", "gc12", "gxa4", "hw")


hits = {}
for c in cases:
    w, x, target = case_inputs(enc, model, c.record)
    acts = []                                                                    # each block's norm1 input

    def keep(module, inputs, output):
        inputs[0].retain_grad()
        acts.append(inputs[0])
    hooks = [b.norm1.register_forward_hook(keep) for b in blocks]
    with eager_attention(enc.image):
        out = enc.image(pixel_values=x.detach().requires_grad_(True), output_attentions=True)
        hs = out.last_hidden_state
        hs.retain_grad()
        for a in out.attentions:
            a.retain_grad()
        w.head(hs)[0, target].backward()
    for hk in hooks:
        hk.remove()
    attn, T = out.attentions, hs.shape[1]
    out_mask = outliers(hs[0, 1:].detach())                                      # (N,)
    maps = {}
    for s in (0, 2, 4, 6, 8):
        R, Rm, R0 = torch.eye(T), torch.eye(T), torch.eye(T)
        for li, a in enumerate(attn[s:], start=s):
            ga = (a.grad * a).clamp(min=0).mean(1)[0].detach()                   # (T, T)
            keep = torch.ones(T)
            keep[1:] = (~outliers(acts[li][0, 1:].detach())).float()
            R = R + ga @ R
            Rm = Rm + (ga * keep) @ Rm
            R0 = R0 + a.mean(1)[0].detach() @ R0
        maps[f"roll{s}"], maps[f"rollm{s}"], maps[f"raw{s}"] = R[0, 1:], Rm[0, 1:], R0[0, 1:]
    for li, h in enumerate([*acts, hs]):
        gr, h = h.grad[0, 1:].detach(), h[0, 1:].detach()                        # (N, D)
        maps[f"gc{li}"] = (h * gr.mean(0)).sum(-1).clamp(min=0)
        maps[f"lc{li}"] = (h * gr.clamp(min=0)).sum(-1).clamp(min=0)
        maps[f"gxa{li}"] = (h * gr).sum(-1).abs()
    for li, a in enumerate(attn):
        ga = (a.grad * a).clamp(min=0)[0, :, 0, 1:].detach()                     # (heads, N)
        for hd in range(ga.shape[0]):
            maps[f"head{li}.{hd}"] = ga[hd]
            maps[f"cls{li}.{hd}"] = a[0, hd, 0, 1:].detach()
    with torch.no_grad():
        for k, v in head_attention(w.batch(w.image_tokens(x))).items():
            maps[k] = v[-g * g:]
    last = attn[-1]
    hw = (last.grad * last).clamp(min=0)[0, :, 0].sum(-1).detach()             # (heads,): gradient relevance
    maps["hw"] = (hw[:, None] * last[0, :, 0, 1:].detach()).sum(0)            # heads mixed by it
    R = torch.eye(T)
    for a in attn[4:-1]:
        R = R + (a.grad * a).clamp(min=0).mean(1)[0].detach() @ R
    maps["rh4"] = (last[0, 2, 0].detach() @ R)[1:]                             # head 2 of the last block, then Ā
    maps["tok4"] = ((hs.grad * hs)[0].sum(-1).abs().detach() @ (R + (last.grad * last).clamp(min=0).mean(1)[0].detach()
                                                                 @ R))[1:]
    for k in list(maps):
        if keys and not k.startswith(keys) and not k.startswith("cls11"):
            del maps[k]
    for k in list(maps):
        m = maps.pop(k).reshape(-1).float().clone()
        mo = m.clone()
        mo[out_mask] = m.min()
        for kk, mm in ((k, m), (k + "_om", mo)):
            mm = mm.reshape(g, g).numpy()
            maps[kk], maps[kk + "_s1"], maps[kk + "_s2"] = mm, gaussian_filter(mm, 1.0), gaussian_filter(mm, 2.0)
    for base in GATED:                              # the model's map gated by one backbone head's attention
        for hd in (0, 2, 4):
            if base + "_s1" in maps:
                maps[f"{base}*{hd}"] = unit(maps[base + "_s1"]) * unit(maps[f"cls11.{hd}_s1"])
    for k, m in maps.items():
        hits.setdefault(k, []).append(bool(hit(up(m, c.size), c.boxes)))
    hits.setdefault("centre", []).append(bool(center_hit(c)))
    hits.setdefault("_outliers", []).append(int(out_mask.sum()))
    hits.setdefault("_random", []).append(random_hit_probability(c))
print(json.dumps({"ckpt": ckpt, "split": split, "n": len(cases), "hits": hits}))
