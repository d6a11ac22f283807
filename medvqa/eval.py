"""Accuracy open / closed / overall by ground-truth answer type, breakdowns, and ECE.

Exact match of the normalised predicted answer with the normalised ground truth (DESIGN §5).
Every question counts: a question with no prediction is wrong, never skipped.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from medvqa.data.datasets import normalize_answer


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence, equal-width bins over [0, 1], in percent."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(ok[m].mean() - conf[m].mean())
    return 100.0 * ece


def reliability_bins(confidence, correct, n_bins: int = 15) -> list[dict]:
    """Per-bin (mean confidence, accuracy, count) for a reliability diagram."""
    conf, ok = np.asarray(confidence, float), np.asarray(correct, float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return [{"bin": b, "confidence": float(conf[bins == b].mean()), "accuracy": float(ok[bins == b].mean()),
             "n": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]


def _pct(hits: list) -> float:
    return round(100.0 * sum(hits) / len(hits), 2) if hits else float("nan")


def evaluate(records, predictions: dict, confidences: dict | None = None) -> dict:
    """`predictions`: qid -> answer text; `confidences`: qid -> top-1 probability (optional)."""
    hits = {"OPEN": [], "CLOSED": []}
    by_organ, by_qtype = defaultdict(list), defaultdict(list)
    conf, ok_for_conf, missing = [], [], 0
    for r in records:
        pred = predictions.get(r.qid)
        missing += pred is None
        ok = pred is not None and normalize_answer(pred) == r.answer_norm
        hits[r.answer_type].append(ok)
        by_organ[r.organ or "unknown"].append(ok)
        # VQA-RAD question types can be lists ("PRES, POS"): count the question under each.
        for qt in (r.question_type or "unknown").split(","):
            by_qtype[qt.strip()].append(ok)
        if confidences is not None and r.qid in confidences:
            conf.append(float(confidences[r.qid]))
            ok_for_conf.append(ok)
    everything = hits["OPEN"] + hits["CLOSED"]
    out = {
        "open": _pct(hits["OPEN"]), "closed": _pct(hits["CLOSED"]), "overall": _pct(everything),
        "n": len(everything), "n_open": len(hits["OPEN"]), "n_closed": len(hits["CLOSED"]),
        "missing_predictions": missing,
        "by_organ": {k: {"acc": _pct(v), "n": len(v)} for k, v in sorted(by_organ.items())},
        "by_question_type": {k: {"acc": _pct(v), "n": len(v)} for k, v in sorted(by_qtype.items())},
    }
    if conf:
        out["ece"] = round(expected_calibration_error(conf, ok_for_conf), 2)
    return out
