"""Calibrated confidence: temperature scaling (Guo et al. 2017), ECE and reliability bins.

Every model turns its answer logits into probabilities by one softmax over the vocabulary; the
shown probability is softmax(logits / T) with one scalar T > 0 per checkpoint, fitted by minimising
the NLL on held-out questions (the validation split, or the held-out slice of train) — never on test.
Dividing by T keeps the order of the logits, so the predicted answer never changes.
T lives in the checkpoint's config.json (`temperature`, `temperature_source`, `temperature_fit`). A checkpoint may
carry a second one, `temperature_yes_no`, for the questions whose top answer is yes or no (`temperature` then
serves the rest): two answers against hundreds are two regimes, and the kind is known before T is applied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

N_BINS = 15               # ECE and reliability diagrams: equal-width confidence bins over [0, 1]
UNCERTAIN_BELOW = 0.5     # a calibrated top-1 probability under this is shown as "uncertain", with the runner-up
NO_HELD_OUT = ("none: trained on all of train, so no held-out questions are left to fit T on "
               "(`medvqa calibrate --transfer-from` carries the T of the same recipe trained with a held-out slice)")


YES_NO = ("yes", "no")   # the answers that `temperature_yes_no` serves as top-1
KEPT_AT_ONE = "so T = 1 is kept"   # the gate's words in `temperature_source` (`gate`, `kept_at_one`)
# The fewest held-out questions (with an answer in the vocabulary) a T may be fitted on. On a handful the NLL's
# minimum runs off when they are all right or all wrong (a 12-case fine-tune fitted T = 2e6 on one question), and
# the ECE the gate compares falls into 15 bins of one or two questions each; 30 is the usual small-sample floor.
# The shipped fits used 306 (VQA-RAD's held-out slice) and 1053 (SLAKE's validation split, ~360 answered yes/no).
MIN_FIT_QUESTIONS = 30


def probabilities(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(…, C) logits -> (…, C) softmax(logits / T); T one scalar or one per row, (…,)."""
    t = temperature.unsqueeze(-1) if torch.is_tensor(temperature) else temperature
    return (logits.float() / t).softmax(-1)


def yes_no_rows(logits: torch.Tensor, answers: list[str]) -> torch.Tensor:
    """(N, C) logits -> (N,) bool: the top-1 answer is yes or no (the same at every T)."""
    return torch.tensor([a in YES_NO for a in answers], dtype=torch.bool)[logits.argmax(-1)]


def row_temperatures(logits: torch.Tensor, answers: list[str], cfg: dict) -> torch.Tensor:
    """(N, C) logits -> (N,) the T of each row from config.json's entries."""
    t = torch.full((len(logits),), float(cfg.get("temperature", 1.0)))
    if cfg.get("temperature_yes_no") is not None:
        t[yes_no_rows(logits, answers)] = float(cfg["temperature_yes_no"])
    return t


def describe(cfg: dict) -> str:
    """'T = 1.41' or 'T = 1.41, yes/no 1.91', as every surface names the checkpoint's temperature."""
    t = f"T = {float(cfg.get('temperature', 1.0)):.3g}"
    return t + (f", yes/no {float(cfg['temperature_yes_no']):.3g}" if cfg.get("temperature_yes_no") is not None else "")


def top1(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits -> (N,) predicted class, (N,) its probability at temperature T."""
    conf, idx = probabilities(logits, temperature).max(-1)
    return idx, conf


def expected_calibration_error(confidence, correct, n_bins: int = N_BINS) -> float:
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


def reliability_bins(confidence, correct, n_bins: int = N_BINS) -> list[dict]:
    """Per-bin (mean confidence, accuracy, count) for a reliability diagram."""
    conf, ok = np.asarray(confidence, float), np.asarray(correct, float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return [{"bin": b, "confidence": float(conf[bins == b].mean()), "accuracy": float(ok[bins == b].mean()),
             "n": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> float:
    """Mean negative log-likelihood of the true answers at temperature T, a scalar or (N,) (labels -1, out of
    vocabulary, left out)."""
    keep = labels >= 0
    t = temperature[keep].unsqueeze(-1) if torch.is_tensor(temperature) else temperature
    return float(F.cross_entropy(logits[keep].float() / t, labels[keep]))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) on (N, C) logits and (N,) labels.
    The NLL is convex in 1 / T, so L-BFGS on log T finds the one minimum."""
    keep = labels >= 0
    z, y = logits[keep].float(), labels[keep]
    if not len(y):
        raise ValueError("no held-out question has an answer in the model's vocabulary: nothing to fit T on")
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def labels_of(records, vocab) -> torch.Tensor:
    """(N,) answer indices of dataset records, -1 where the answer is not in the vocabulary."""
    return torch.tensor([vocab.encode(r.answer_norm) for r in records], dtype=torch.long)


def fit_report(logits: torch.Tensor, labels: torch.Tensor, source: str, yes_no: torch.Tensor | None = None) -> dict:
    """Fit T on held-out (logits, labels) -> the config.json entries, with the NLL and ECE it moved
    on those same questions (a check that the fit did something, not a test result). With `yes_no`
    ((N,) bool, from `yes_no_rows`): one T for those rows, `temperature_yes_no`, and one for the rest.
    The gate: a fitted T is applied only if it lowers the ECE on its own fit questions. T minimises the
    NLL, but what a reader sees is the shown confidence; where the NLL's T makes that worse even on the
    questions it was fitted on (logits too far apart for one T to bend, docs/decisions.md), T = 1 is kept.
    Before it: a T fitted on fewer than MIN_FIT_QUESTIONS questions is not applied either (each of a pair on its own),
    and none is fitted where no question has its answer in the vocabulary (`--vocab train`, say)."""
    known = labels >= 0   # the questions a fit uses
    parts = [known] if yes_no is None else [known & ~yes_no, known & yes_no]
    if not all(r.any() for r in parts):
        return {"temperature": 1.0, "temperature_source": f"{source}; no held-out question"
                + ("" if yes_no is None else " of one kind (yes/no top answer or not)")
                + " has its answer in the model's vocabulary, so T = 1 is used"
                + ("" if yes_no is None or not known.any() else "; one T for all answers may fit (calibrate without --yes-no)")}
    fitted = {"temperature": round(fit_temperature(logits, labels), 4)}
    if yes_no is not None:
        fitted = {"temperature": round(fit_temperature(logits[~yes_no], labels[~yes_no]), 4),
                  "temperature_yes_no": round(fit_temperature(logits[yes_no], labels[yes_no]), 4)}
        t = torch.where(yes_no, fitted["temperature_yes_no"], fitted["temperature"])
    else:
        t = fitted["temperature"]
    idx, raw = top1(logits)
    ok = (idx == labels).numpy()
    fit = {"n": int(len(labels)),
           "nll_before": round(nll(logits, labels), 4), "nll_after": round(nll(logits, labels, t), 4),
           "ece_before": round(expected_calibration_error(raw.numpy(), ok), 2),
           "ece_after": round(expected_calibration_error(top1(logits, t)[1].numpy(), ok), 2)}
    n = min(int(r.sum()) for r in parts)
    entries = gate(fitted, fit, source) if n >= MIN_FIT_QUESTIONS else {
        "temperature": 1.0, "temperature_fit": fit | {"rejected": fitted},
        "temperature_source": f"{source}; its fitted {describe(fitted)} is not applied: {n} questions are too few "
                              f"to fit T on (at least {MIN_FIT_QUESTIONS}), so T = 1 is used"}
    # a pair fails together; one T, on all the questions, might not
    if yes_no is not None and "rejected" in entries["temperature_fit"] and known.sum() >= MIN_FIT_QUESTIONS:
        entries["temperature_source"] += "; one T for all answers may pass (calibrate without --yes-no)"
    return entries


def gate(fitted: dict, fit: dict, source: str) -> dict:
    """The config.json entries of a fitted T (`fitted`: temperature[, temperature_yes_no]) and its fit record:
    `fitted` if it lowered the ECE on its own fit questions (strictly, to two decimals), else T = 1 with
    `fit["rejected"]` naming it (a pair of Ts is kept or rejected together)."""
    if fit["ece_after"] < fit["ece_before"]:
        return fitted | {"temperature_source": source, "temperature_fit": fit}
    return {"temperature": 1.0, "temperature_source": f"{source}; its fitted {describe(fitted)} did not lower the "
            f"ECE on those questions ({fit['ece_before']:.2f} -> {fit['ece_after']:.2f}), {KEPT_AT_ONE}",
            "temperature_fit": fit | {"rejected": fitted}}


def kept_at_one(cfg: dict) -> bool:
    """The checkpoint's fitted T failed the gate (its own or, transferred, its source's), so it shows T = 1."""
    return KEPT_AT_ONE in cfg.get("temperature_source", "")


def write_temperature(ckpt: Path, entries: dict) -> dict:
    """Put `entries` (temperature, temperature_source, temperature_fit) into `ckpt`/config.json,
    keeping every other key: written to a temporary file beside it, then swapped in whole."""
    path = Path(ckpt) / "config.json"
    cfg = json.loads(path.read_text())
    for k in ("temperature_fit", "temperature_yes_no"):   # a transferred or one-T fit must not keep an older one's
        cfg.pop(k, None)
    cfg.update(entries)
    tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=1))
    os.replace(tmp, path)
    return cfg


def percent(p: float) -> str:
    """A probability as the app shows it: whole percent, never "100 %" nor "0 %" (rounding would claim certainty)."""
    v = round(100 * float(p))
    return "> 99 %" if v >= 100 else "< 1 %" if v <= 0 else f"{v} %"
