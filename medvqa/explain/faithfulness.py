"""Deletion / insertion (Petsiuk et al., RISE): does removing the pixels a saliency map ranks
first destroy the answer's confidence faster than removing them in random order, and does
inserting them first restore it faster?

The image is taken at the backbone's input size; "removed" pixels take the value of a blurred
copy (a zero image would be out of distribution for a radiograph), and "inserted" pixels are
revealed on that blurred copy. AUC = mean probability of the originally predicted answer over
the fractions 0, 1/steps, …, 1 (trapezoid rule). Lower deletion AUC and higher insertion AUC
than the random order mean the map is faithful to the model.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def _auc(y: np.ndarray) -> float:
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)))


def random_patch_order(s: int, grid: int, rng) -> np.ndarray:
    """The S×S pixels (flat indices) in a random order of whole patches of a grid×grid map (raster
    order inside a patch): the random control at the map's own resolution, since a map that can only
    rank patches would otherwise be compared with a salt-and-pepper deletion no map can make."""
    cell = np.minimum(np.arange(s) * grid // s, grid - 1)                                       # (S,) patch row/col
    patch = (cell[:, None] * grid + cell[None, :]).ravel()                                      # (S·S,)
    rank = np.empty(grid * grid, int)
    rank[rng.permutation(grid * grid)] = np.arange(grid * grid)
    return np.lexsort((np.arange(s * s), rank[patch]))


def curves(predictor, image: Image.Image, question: str, cam: np.ndarray, steps: int = 10, seed: int = 0,
           grid: int | None = None) -> dict:
    """-> {"deletion", "insertion", "deletion_random", "insertion_random"}: AUCs for one case. `grid`: the
    map's own patch grid, whose patches the random order removes whole (default: single pixels)."""
    s = predictor.preset.encoders.image_size
    im = np.asarray(image.convert("RGB").resize((s, s), Image.BICUBIC)).astype(np.float32)       # (S, S, 3)
    blur = np.asarray(Image.fromarray(im.astype(np.uint8)).filter(ImageFilter.GaussianBlur(s / 20))).astype(np.float32)
    sal = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((s, s), Image.BILINEAR)).ravel()
    target = int(predictor.probs([image], [question])[0].argmax())
    rng = np.random.default_rng(seed)
    orders = {"": np.argsort(-sal, kind="stable"),
              "_random": random_patch_order(s, grid, rng) if grid else rng.permutation(s * s)}
    out = {}
    for suffix, order in orders.items():
        rank = np.empty(s * s, int)
        rank[order] = np.arange(s * s)
        rank = rank.reshape(s, s, 1)
        fracs = np.linspace(0, 1, steps + 1)
        dele = [Image.fromarray(np.where(rank < f * s * s, blur, im).astype(np.uint8)) for f in fracs]
        ins = [Image.fromarray(np.where(rank < f * s * s, im, blur).astype(np.uint8)) for f in fracs]
        p = predictor.probs(dele + ins, [question] * (2 * len(fracs)))[:, target].numpy()
        out["deletion" + suffix], out["insertion" + suffix] = _auc(p[:len(fracs)]), _auc(p[len(fracs):])
    return out


def deletion_insertion(predictors: dict, records, methods=None, steps: int = 10, progress: bool = True) -> dict:
    """Mean AUCs per model and method (default: each model's own map) over the records, with the
    random-order baselines (whole patches of the map's grid in a random order) and a 95 %
    bootstrap interval of the paired difference map − random over the questions (deletion: below 0
    is faithful; insertion: above 0). A method a model does not support is listed under "skipped"."""
    from tqdm.auto import tqdm

    from medvqa.data import load_image
    from medvqa.eval import bootstrap_mean_ci

    results, skipped = [], []
    for name, p in predictors.items():
        for method in methods or [p.default_method]:   # default: the model's own map
            if method not in p.methods:
                skipped.append({"model": name, "method": method})
                continue
            rows = []
            for r in tqdm(records, desc=f"{name} {method}", disable=None if progress else True, leave=False):
                im = load_image(r.image)
                rows.append(curves(p, im, r.question, p.explain(im, r.question, method=method), steps,
                                   grid=p.encoders.grid))
            mean = {k: round(float(np.mean([x[k] for x in rows])), 4) for k in rows[0]} if rows else {}
            diff_ci = {f"{k}_vs_random_ci95": [round(v, 4)
                                               for v in bootstrap_mean_ci([x[k] - x[k + "_random"] for x in rows])]
                       for k in ("deletion", "insertion")} if rows else {}
            results.append({"model": name, "method": method, **{f"{k}_auc": v for k, v in mean.items()}, **diff_ci})
    return {"n": len(records), "steps": steps, "results": results, "skipped": skipped}
