"""Pointing game on SLAKE: does the saliency maximum fall inside the box of the organ or lesion
the question (or its answer) names? Boxes come from each image's `detection.json`
(`[{"Liver": [x, y, w, h]}, …]`, source pixels). "kidney" names both kidneys (side dropped).

Baselines: the image centre as the pointed location, and a uniformly random point, whose
expected hit rate is the fraction of the image the named boxes cover (computed exactly).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Case:
    record: object
    boxes: list            # [(name, (x, y, w, h))] of the named structures
    size: tuple            # (width, height) of the image


def _aliases(name: str) -> set[str]:
    n = name.lower()
    return {n, re.sub(r"^(left|right) ", "", n)}


def pointing_cases(records) -> list[Case]:
    """Records whose question or answer names a structure boxed in the image's detection.json."""
    cases, det_cache = [], {}
    for r in records:
        det_path = Path(r.image).parent / "detection.json"
        if det_path not in det_cache:
            try:
                det_cache[det_path] = [(k, tuple(v)) for d in json.loads(det_path.read_text()) for k, v in d.items()]
            except (OSError, json.JSONDecodeError, AttributeError):
                det_cache[det_path] = []
        text = f" {r.question} {r.answer} ".lower()
        named = [(k, b) for k, b in det_cache[det_path]
                 if any(re.search(r"\b" + re.escape(a) + r"\b", text) for a in _aliases(k))]
        if named:
            with Image.open(r.image) as im:
                cases.append(Case(r, named, im.size))
    return cases


def _inside(x: float, y: float, boxes) -> bool:
    return any(bx <= x < bx + bw and by <= y < by + bh for _, (bx, by, bw, bh) in boxes)


def hit(cam: np.ndarray, boxes) -> bool:
    """cam: H×W at the image's own size; the hit test is at the maximum's pixel centre."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return _inside(x + 0.5, y + 0.5, boxes)


def center_hit(case: Case) -> bool:
    w, h = case.size
    return _inside(w / 2, h / 2, case.boxes)


def random_hit_probability(case: Case) -> float:
    """Exact chance that a uniformly random pixel lies in the union of the named boxes."""
    w, h = case.size
    mask = np.zeros((h, w), bool)
    for _, (bx, by, bw, bh) in case.boxes:
        mask[max(0, int(by)):int(np.ceil(by + bh)), max(0, int(bx)):int(np.ceil(bx + bw))] = True
    return float(mask.mean())


def pointing_game(predictors: dict, cases: list[Case], methods=None, layers=(None,), progress: bool = True) -> dict:
    """predictors: name -> Predictor; methods: default each model's own map (`Predictor.default_method`,
    what the app shows). Returns hit rates (percent) per model, method and CAM layer,
    with a 95 % interval and a paired test against the centre point (McNemar, on the questions only
    one of the two hits), and the centre- and random-point baselines. A method a model does not
    support (query-attention on CMDPI) is listed under "skipped"."""
    from tqdm.auto import tqdm

    from medvqa.explain import GRADIENT_FREE
    from medvqa.eval import mcnemar_exact, wilson_interval
    from medvqa.explain.gradcam import default_layer

    centre = [center_hit(c) for c in cases]
    results, skipped = [], []
    for name, p in predictors.items():
        for method in methods or [p.default_method]:
            if method not in p.methods:
                skipped.append({"model": name, "method": method})
                continue
            resolved = [default_layer(p.encoders, method) if layer is None else layer for layer in layers]  # as numbers
            for layer in [None] if method in GRADIENT_FREE else resolved:
                hits = [hit(p.explain(c.record.image, c.record.question, method=method, layer=layer), c.boxes)
                        for c in tqdm(cases, desc=f"{name} {method} {layer}", disable=None if progress else True,
                                      leave=False)]
                n_hits = sum(hits)
                only_map = sum(h and not c for h, c in zip(hits, centre))
                only_centre = sum(c and not h for h, c in zip(hits, centre))
                results.append({"model": name, "method": method, "layer": layer, "hits": n_hits,
                                "hit_rate": round(100 * n_hits / len(hits), 2) if hits else None,
                                "hit_rate_ci95": wilson_interval(n_hits, len(hits)),
                                "vs_centre": {"only_map": only_map, "only_centre": only_centre,
                                              "mcnemar_p": mcnemar_exact(only_map, only_centre)}})
    return {"n": len(cases), "results": results, "skipped": skipped,
            "baseline_center": round(100 * float(np.mean(centre)), 2) if cases else None,
            "baseline_random": (round(100 * float(np.mean([random_hit_probability(c) for c in cases])), 2)
                                if cases else None)}
