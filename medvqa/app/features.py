"""Features: UMAP of two checkpoints' fused features side by side (CMDPI Fig. 9: the head-mixup
effect), interactive (hover shows the question, the answer and the model's prediction), with the
silhouette score of each colouring.

Embeddings of the shipped checkpoints on their test split are precomputed into
`assets/embeddings/<checkpoint>.json`, so the tab opens in seconds with no dataset present;
for other checkpoints they are computed once when the dataset folder is there and cached under
the user cache dir. Each file names the weights it was computed from, so a retrained checkpoint
never shows the old one's points."""
from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import gradio as gr
import numpy as np

from medvqa.app.common import ASSETS
from medvqa.explain.umap import COLORINGS

SHIPPED_POINTS = ASSETS / "embeddings"


def _cached(name: str) -> Path:
    from medvqa.models.encoders import cache_dir

    return cache_dir() / "embeddings" / f"{name}.json"


def weights_id(ckpt: Path) -> str:
    """Hash of the whole weights file (a fine-tune may change only some tensors), and of the tuned
    backbone blocks where there are any (medvqa.train.tuning)."""
    from medvqa.train.checkpoint import TUNED_FILE

    h = hashlib.sha1((Path(ckpt) / "model.safetensors").read_bytes())
    if (Path(ckpt) / TUNED_FILE).is_file():
        h.update((Path(ckpt) / TUNED_FILE).read_bytes())
    return h.hexdigest()[:16]


def compute_points(ckpt: Path, root: Path, seed: int = 0) -> dict:
    """Test-split UMAP of one checkpoint: coordinates, every colouring, hover text, silhouettes."""
    from medvqa.data import load_split
    from medvqa.explain.umap import embed, labels_for, silhouette
    from medvqa.predict import Predictor

    p = Predictor.load(ckpt)
    records = load_split(p.config["dataset"], root, "test").records
    feats, correct = p.features_records(records, progress=False)
    xy = embed(feats, seed=seed)
    labels = {c: labels_for(records, correct, c).tolist() for c in COLORINGS}
    return {"checkpoint": Path(ckpt).name, "weights": weights_id(ckpt), "dataset": p.config["dataset"],
            "split": "test", "seed": seed,
            "xy": np.round(xy, 3).tolist(), "labels": labels,
            "silhouette": {c: silhouette(xy, np.array(labels[c])) for c in COLORINGS},
            "hover": [f"{html.escape(r.question)}<br>answer: {html.escape(r.answer)}" for r in records]}


def load_points(ckpt: Path, root: Path | None = None) -> dict | None:
    weights = weights_id(ckpt)
    for f in (SHIPPED_POINTS / f"{Path(ckpt).name}.json", _cached(Path(ckpt).name)):
        if f.is_file() and (pts := json.loads(f.read_text())).get("weights") == weights:
            return pts
    if root is None or not Path(root).is_dir():
        return None
    return write_points(ckpt, root, _cached(Path(ckpt).name))


def write_points(ckpt: Path, root: Path, out: Path) -> dict:
    """compute_points, stored at `out`: the user cache, or assets/embeddings/ for a shipped checkpoint."""
    pts = compute_points(ckpt, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(pts))
    return pts


def figure(panels: list[dict], coloring: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[
        f"{p['checkpoint']} · silhouette ({coloring}) = {p['silhouette'][coloring]}" for p in panels])
    cats = sorted({l for p in panels for l in p["labels"][coloring]})
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]
    for col, p in enumerate(panels, 1):
        xy, lab = np.array(p["xy"]), np.array(p["labels"][coloring])
        for i, c in enumerate(cats):
            m = lab == c
            if m.any():
                fig.add_trace(go.Scattergl(x=xy[m, 0], y=xy[m, 1], mode="markers", name=c, legendgroup=c,
                                           showlegend=col == 1, marker={"size": 5, "color": palette[i % len(palette)]},
                                           text=[h for h, k in zip(p["hover"], m) if k], hoverinfo="text"),
                          row=1, col=col)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(height=520, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def all_checkpoints() -> list[str]:
    """Every installed checkpoint (also variants such as cmdpi-vqa-rad-no-mixup) and the fine-tuned ones."""
    from medvqa.app.common import checkpoints_dir, user_checkpoints_dir

    found = sorted(checkpoints_dir().glob("*/config.json")) + sorted(user_checkpoints_dir().glob("*/config.json"))
    return [str(p.parent) for p in found]


def build_tab():
    from medvqa.app.common import BUILTIN, data_root

    with gr.Tab("Features"):
        gr.Markdown("UMAP of the feature each model's answer head reads (CMDPI: the answer slot h_D; "
                    "CMI-MTL / baseline: the fused vector), on the test split. Compare CMDPI with and without "
                    "head mixup: the silhouette score says how separated the colouring's groups are.")
        cks = all_checkpoints()
        names = {Path(c).name: c for c in cks}
        default = [n for n in ("cmdpi-vqa-rad", "cmdpi-vqa-rad-no-mixup") if n in names] or list(names)[:2]
        with gr.Row():
            left = gr.Dropdown(list(names), value=default[0] if default else None, label="Checkpoint A")
            right = gr.Dropdown(list(names), value=default[-1] if len(default) > 1 else None, label="Checkpoint B")
            coloring = gr.Dropdown(list(COLORINGS), value="question_type", label="Colour by")
            show = gr.Button("Show", variant="primary")
        def on_show(a, b, coloring):
            if coloring not in COLORINGS:
                raise gr.Error(f"choose a colouring: {', '.join(COLORINGS)}")
            panels = []
            for n in dict.fromkeys(x for x in (a, b) if x):
                if n not in names:
                    raise gr.Error(f"no checkpoint {n!r}")
                try:   # a checkpoint removed since the app started, a damaged cached embedding, unreadable data
                    cfg = json.loads((Path(names[n]) / "config.json").read_text())
                    root = data_root() / BUILTIN.get(cfg["dataset"], cfg["dataset"])
                    pts = load_points(Path(names[n]), root)
                except (OSError, ValueError, KeyError) as e:   # DataError and JSON errors are ValueErrors
                    raise gr.Error(f"{n}: cannot show its features ({e})") from None
                if pts is None:
                    raise gr.Error(f"{n}: no precomputed embedding and no {cfg['dataset']} folder to compute one")
                panels.append(pts)
            if not panels:
                raise gr.Error("choose a checkpoint")
            return figure(panels, coloring)

        def initial():
            """The head-mixup pair on open, from the shipped points (no dataset needed); None without them."""
            try:
                return on_show(default[0], default[-1], "question_type") if default else None
            except gr.Error:
                return None

        plot = gr.Plot(value=initial())
        show.click(on_show, [left, right, coloring], plot, api_visibility="private")



if __name__ == "__main__":  # after retraining a shipped checkpoint: rewrite assets/embeddings/NAME.json
    import sys

    from medvqa.data import DataError

    if len(sys.argv) != 3 or not (Path(sys.argv[1]) / "model.safetensors").is_file() or not Path(sys.argv[2]).is_dir():
        sys.exit("usage: python -m medvqa.app.features CHECKPOINT_DIR DATASET_ROOT "
                 "(a checkpoint folder and a dataset folder)")
    ckpt, out = Path(sys.argv[1]), SHIPPED_POINTS / f"{Path(sys.argv[1]).name}.json"
    try:
        write_points(ckpt, Path(sys.argv[2]), out)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")
