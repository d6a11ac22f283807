"""UMAP of a model's fused features, coloured by question type, organ, answer type or
correctness, for one or two checkpoints side by side with the same UMAP parameters and seed
(CMDPI Fig. 9). The silhouette score of each colouring, in the 2-D embedding that is plotted,
is the number behind the picture."""
from __future__ import annotations

import numpy as np

COLORINGS = ("question_type", "organ", "answer_type", "correct")


def labels_for(records, correct, coloring: str) -> np.ndarray:
    if coloring == "correct":
        return np.where(correct, "right", "wrong")
    if coloring == "question_type":  # VQA-RAD lists several ("PRES, POS"): colour by the first
        return np.array([(r.question_type or "unknown").split(",")[0].strip() for r in records])
    return np.array([getattr(r, coloring) or "unknown" for r in records])


def embed(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    import umap

    return umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed).fit_transform(features)


def silhouette(xy: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    keep = np.isin(labels, [l for l in set(labels) if (labels == l).sum() >= 2])
    if len(set(labels[keep])) < 2:
        return None
    return round(float(silhouette_score(xy[keep], labels[keep])), 4)


def plot(panels: list[dict], coloring: str, out, dpi: int = 300):
    """panels: [{"title", "xy", "labels", "silhouette"}] -> one PNG/SVG/PDF, panels side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted({l for p in panels for l in p["labels"]})
    cmap = matplotlib.colormaps["tab20"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for i, c in enumerate(cats):
            m = p["labels"] == c
            ax.scatter(p["xy"][m, 0], p["xy"][m, 1], s=6, color=cmap(i % 20), label=c, alpha=0.8, linewidths=0)
        ax.set_title(f"{p['title']}\nsilhouette ({coloring}) = {p['silhouette']}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
