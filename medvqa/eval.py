"""Accuracy open / closed / overall by ground-truth answer type, breakdowns, ECE, and how sure
a difference between two models is.

Exact match of the normalised predicted answer with the normalised ground truth (DESIGN §5).
Every question counts: a question with no prediction is wrong, never skipped.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from medvqa.calibration import expected_calibration_error
from medvqa.data.datasets import InputError, normalize_answer


def _right(pred, record) -> bool:
    return pred is not None and normalize_answer(pred) == record.answer_norm


def _pct(hits: list) -> float:
    return round(100.0 * sum(hits) / len(hits), 2) if hits else float("nan")


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of an accuracy k / n, in percent (sound near 0 and 100, unlike ±2 s.e.)."""
    if n == 0:
        return [float("nan"), float("nan")]
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(100 * max(0.0, mid - half), 2), round(100 * min(1.0, mid + half), 2)]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact test: two-sided binomial p of the discordant pairs split only_a : only_b
    under "either is as likely", to 3 significant digits."""
    m = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m) if m else 1.0
    return float(f"{p:.3g}")


def bootstrap_mean_ci(x, n_boot: int = 10000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean of x (per-question values or paired differences)."""
    x = np.asarray(x, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))     # (n_boot, n)
    means = x[idx].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_comparison(records, preds_a: dict, preds_b: dict, n_boot: int = 10000, seed: int = 0) -> dict:
    """Model A against model B on the same questions: the accuracy difference A − B in points, its
    95 % paired-bootstrap interval (questions resampled together), and McNemar's exact test on the
    questions only one of them gets right — the test that fits two models answering one test set."""
    a = np.array([_right(preds_a.get(r.qid), r) for r in records], dtype=np.float64)   # (n,)
    b = np.array([_right(preds_b.get(r.qid), r) for r in records], dtype=np.float64)
    n = len(a)
    if n == 0:
        raise InputError("no questions to compare")
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    lo, hi = bootstrap_mean_ci(100.0 * (a - b), n_boot, seed)
    return {"n": n, "a": round(100 * float(a.mean()), 2), "b": round(100 * float(b.mean()), 2),
            "difference": round(100 * float(a.mean() - b.mean()), 2),
            "difference_ci95": [round(lo, 2), round(hi, 2)],
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


def seen_in_train(records, train_records) -> list[bool]:
    """Per question: does its image already carry the same answer among the train questions?
    (VQA-RAD: every test image is a train image; 105 of 179 open and 235 of 272 closed test answers
    were already given for their image in train. SLAKE: test images are new, so none.)"""
    seen = {(r.image, r.answer_norm) for r in train_records}
    return [(r.image, r.answer_norm) in seen for r in records]


def swap_images(records, seed: int = 0) -> list:
    """Each question paired with another image of the same split, drawn at random (fixed by `seed`),
    never its own: the blind-image control. What a model still gets right this way it answers
    from the question alone (a language prior); what it loses rested on the image."""
    images = sorted({r.image for r in records})
    if len(images) < 2:
        raise InputError("swapping images needs at least two different images in the split")
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        while (im := images[rng.integers(len(images))]) == r.image:
            pass
        out.append(replace(r, image=im))
    return out


def evaluate(records, predictions: dict, confidences: dict | None = None, seen: list[bool] | None = None) -> dict:
    """`predictions`: qid -> answer text; `confidences`: qid -> top-1 probability (optional);
    `seen`: per record, from `seen_in_train` (optional) -> a `by_seen` breakdown."""
    hits = {"OPEN": [], "CLOSED": []}
    by_organ, by_qtype, by_seen = defaultdict(list), defaultdict(list), defaultdict(list)
    conf, ok_for_conf, missing = [], [], 0
    for i, r in enumerate(records):
        pred = predictions.get(r.qid)
        missing += pred is None
        ok = _right(pred, r)
        hits[r.answer_type].append(ok)
        by_organ[r.organ or "unknown"].append(ok)
        # VQA-RAD question types can be lists ("PRES, POS"): count the question under each.
        for qt in (r.question_type or "unknown").split(","):
            by_qtype[qt.strip()].append(ok)
        if seen is not None:
            by_seen["image+answer seen in train" if seen[i] else "new answer for its image"].append(ok)
        if confidences is not None and r.qid in confidences:
            conf.append(float(confidences[r.qid]))
            ok_for_conf.append(ok)
    everything = hits["OPEN"] + hits["CLOSED"]
    out = {
        "open": _pct(hits["OPEN"]), "closed": _pct(hits["CLOSED"]), "overall": _pct(everything),
        "overall_ci95": wilson_interval(sum(everything), len(everything)),
        "n": len(everything), "n_open": len(hits["OPEN"]), "n_closed": len(hits["CLOSED"]),
        "missing_predictions": missing,
        "by_organ": {k: {"acc": _pct(v), "n": len(v)} for k, v in sorted(by_organ.items())},
        "by_question_type": {k: {"acc": _pct(v), "n": len(v)} for k, v in sorted(by_qtype.items())},
    }
    if seen is not None:
        out["by_seen"] = {k: {"acc": _pct(by_seen[k]), "n": len(by_seen[k])}
                          for k in ("image+answer seen in train", "new answer for its image") if k in by_seen}
    if conf:
        out["ece"] = round(expected_calibration_error(conf, ok_for_conf), 2)
    return out
