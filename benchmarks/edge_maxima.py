"""Probe: how often a saliency map's maximum lies in the outermost ring of patches (one patch wide,
23.4 % of a 16×16 grid's area), one question per distinct test image (the first 120). A border
maximum is rarely anatomy; this needs no boxes, so it also reads VQA-RAD.

    python benchmarks/edge_maxima.py CHECKPOINT DATASET ROOT METHOD [METHOD ...]   # prints one JSON line
"""
import sys, json, numpy as np, torch
from medvqa.predict import Predictor
from medvqa.data import load_split, load_image
torch.set_num_threads(1)
ck, ds, root, methods = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
p = Predictor.load(ck); g = p.encoders.grid
recs = load_split(ds, root, "test").records
seen, ims = set(), []
for r in recs:
    if r.image not in seen: seen.add(r.image); ims.append(r)
out = {}
for m in methods:
    edge = []
    for r in ims[:120]:
        im = load_image(r.image)
        cam = p.explain(im, r.question, method=m)
        H, W = cam.shape
        y, x = np.unravel_index(int(cam.argmax()), cam.shape)
        edge.append(min(y, H - 1 - y) < H / g or min(x, W - 1 - x) < W / g)
    out[m] = round(100 * float(np.mean(edge)), 1)
print(json.dumps({"ck": ck, "n": len(ims[:120]), "edge_max_pct": out, "ring_area_pct": round(100 * (1 - ((g - 2) / g) ** 2), 1)}))
