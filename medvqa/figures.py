"""The papers' figures and tables from checkpoints, one call: `medvqa figures`.

  accuracy.md / accuracy.tex      open / closed / overall per checkpoint (Tables 1-3 layout)
  by_organ.*, by_question_type.*  per-group accuracy bars per checkpoint (CMDPI Figs. 10-11)
  reliability.*                   reliability diagrams with ECE per checkpoint, before / after temperature scaling
  cam_grid.*                      Grad-CAM of chosen cases for each checkpoint (CMI-MTL Fig. 2 style)
  umap.*                          UMAP of the first two checkpoints side by side (CMDPI Fig. 9)
Every figure as PNG at 300 dpi plus SVG and PDF; `figures.json` holds the numbers behind them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMATS = ("png", "svg", "pdf")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[str]:
    paths = []
    for ext in FORMATS:
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=300, bbox_inches="tight")
        paths.append(str(p))
    _plt().close(fig)
    return paths


def accuracy_tables(results: dict) -> tuple[str, str]:
    """results: name -> evaluate() output -> (Markdown, LaTeX)."""
    md = ["| model | open | closed | overall | 95 % interval | ECE (calibrated) |", "|---|---|---|---|---|---|"]
    tex = [r"\begin{tabular}{lrrrrr}", r"\toprule",
           r"Model & Open & Closed & Overall & 95\,\% interval & ECE (calibrated) \\", r"\midrule"]
    for name, r in results.items():
        lo, hi = r["overall_ci95"]
        md.append(f"| {name} | {r['open']:.2f} | {r['closed']:.2f} | {r['overall']:.2f} | {lo:.2f}–{hi:.2f} | "
                  f"{r.get('ece', float('nan')):.2f} |")
        tex.append(f"{name.replace('_', chr(92) + '_')} & {r['open']:.2f} & {r['closed']:.2f} & {r['overall']:.2f} & "
                   f"{lo:.2f}--{hi:.2f} & {r.get('ece', float('nan')):.2f} \\\\")
    tex += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(md) + "\n", "\n".join(tex) + "\n"


def group_bars(results: dict, key: str, out: Path) -> list[str]:
    """Grouped bars: one group per organ / question type (with n), one bar per checkpoint."""
    plt = _plt()
    groups = sorted({g for r in results.values() for g in r[key]})
    w = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(groups) * max(1, len(results)) / 2 + 3), 4))
    x = np.arange(len(groups))
    for i, (name, r) in enumerate(results.items()):
        ax.bar(x + i * w, [r[key].get(g, {}).get("acc", 0) for g in groups], w, label=name)
    n = next(iter(results.values()))[key]
    ax.set_xticks(x + w * (len(results) - 1) / 2, [f"{g}\n(n={n.get(g, {}).get('n', 0)})" for g in groups],
                  rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, out, key)


def reliability(calib: dict, out: Path) -> list[str]:
    """calib: name -> {"before" / "after": (bins from calibration.reliability_bins, ece), "temperature": 'T = …'}.
    One column per checkpoint; the top row at T = 1, the bottom row at the checkpoint's T."""
    from medvqa.calibration import N_BINS

    plt = _plt()
    fig, axes = plt.subplots(2, len(calib), figsize=(4 * len(calib), 8), squeeze=False)
    for j, (name, c) in enumerate(calib.items()):
        for i, (when, label) in enumerate((("before", "T = 1"), ("after", c["temperature"]))):
            bins, ece = c[when]
            ax = axes[i][j]
            ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
            ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / N_BINS, alpha=0.7,
                   edgecolor="black", linewidth=0.5)
            ax.set_title(f"{name}, {label}\nECE = {ece:.2f}%", fontsize=9)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
    fig.tight_layout()
    return _save(fig, out, "reliability")


def cam_grid(predictors: dict, records, out: Path, method: str = "gradcam") -> list[str]:
    """Rows: cases (question, ground truth); columns: the image, then each model's map and answer."""
    from medvqa.calibration import percent
    from medvqa.data import load_image
    from medvqa.explain import overlay

    plt = _plt()
    cols = 1 + len(predictors)
    fig, axes = plt.subplots(len(records), cols, figsize=(3 * cols, 3.2 * len(records)), squeeze=False)
    for i, r in enumerate(records):
        im = load_image(r.image)
        axes[i][0].imshow(im)
        axes[i][0].set_title(f"{r.question[:48]}\nGT: {r.answer}", fontsize=7)
        for j, (name, p) in enumerate(predictors.items(), 1):
            a = p.answer(im, r.question)
            axes[i][j].imshow(overlay(im, p.explain(im, r.question, method=method), 0.5))
            axes[i][j].set_title(f"{name}: {a.text} ({percent(a.score)})", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, out, "cam_grid")


def make_all(checkpoints: list, dataset: str, root, split: str, out, cam_cases: int = 4, umap: bool = True,
             progress: bool = True) -> dict:
    from medvqa.calibration import describe, expected_calibration_error, reliability_bins
    from medvqa.data import load_split
    from medvqa.eval import evaluate
    from medvqa.predict import Predictor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_split(dataset, root, split).records
    preds = {Path(str(c)).name: Predictor.load(c) for c in checkpoints}
    results, calib, files = {}, {}, {}
    for name, p in preds.items():
        logits = p.logits_records(records, progress=progress)
        answers, conf = p.read_logits(records, logits)
        results[name] = evaluate(records, answers, conf)
        ok = [answers[r.qid] == r.answer_norm for r in records]
        calib[name] = {"temperature": describe(p.config)}
        for when, t in (("before", 1.0), ("after", None)):   # None: the checkpoint's own T
            at_t = p.read_logits(records, logits, t)[1]
            c = [at_t[r.qid] for r in records]
            calib[name][when] = (reliability_bins(c, ok), expected_calibration_error(c, ok))
    md, tex = accuracy_tables(results)
    (out / "accuracy.md").write_text(md)
    (out / "accuracy.tex").write_text(tex)
    files["accuracy"] = [str(out / "accuracy.md"), str(out / "accuracy.tex")]
    files["by_organ"] = group_bars(results, "by_organ", out)
    files["by_question_type"] = group_bars(results, "by_question_type", out)
    files["reliability"] = reliability(calib, out)
    if cam_cases:
        step = max(1, len(records) // cam_cases)   # spread over the split, deterministic
        files["cam_grid"] = cam_grid(preds, records[::step][:cam_cases], out)
    umap_info = None
    if umap and len(preds) >= 2:
        from medvqa.explain.umap import embed, labels_for, plot, silhouette

        panels, umap_info = [], {}
        for name, p in list(preds.items())[:2]:
            feats, correct = p.features_records(records, progress=progress)
            xy = embed(feats)
            labels = labels_for(records, correct, "question_type")
            umap_info[name] = silhouette(xy, labels)
            panels.append({"title": name, "xy": xy, "labels": labels, "silhouette": umap_info[name]})
        files["umap"] = []
        for ext in FORMATS:
            plot(panels, "question_type", out / f"umap.{ext}")
            files["umap"].append(str(out / f"umap.{ext}"))
    summary = {"dataset": dataset, "split": split, "n": len(records), "files": files,
               "accuracy": {k: {m: v[m] for m in ("open", "closed", "overall", "ece")} for k, v in results.items()},
               "calibration": {k: {"temperature": c["temperature"], "ece_before": round(c["before"][1], 2),
                                   "ece_after": round(c["after"][1], 2)} for k, c in calib.items()},
               "umap_silhouette_question_type": umap_info}
    (out / "figures.json").write_text(json.dumps(summary, indent=1))
    return summary
