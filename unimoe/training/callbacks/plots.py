"""Routing figures in the style of the paper's Figures 4 and 5 (matplotlib, no pyplot state).

* :func:`expert_load_figure`: per task, a layers x experts heatmap of the routing share
  (share of a layer's routing decisions that went to each dynamic expert, null included;
  a balanced router gives ``1 / E`` everywhere). Shows task specialisation (Fig. 5).
* :func:`activated_experts_figure`: per layer, the distribution of the number of REAL
  experts a token used (0 = only null: FFN skipped) and its mean (Fig. 4).

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, so they work
headless and never touch a global pyplot backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unimoe.atomic import atomic_path


def expert_load_figure(
    shares: np.ndarray, groups: Sequence[str], expert_labels: Sequence[str], layers: Sequence[int], title: str
) -> Figure:
    """shares [G, L, E] (rows sum to 1 where a group had tokens) -> one heatmap per group."""
    g, n_layers, n_experts = shares.shape
    cols = min(g, 2)
    rows = -(-g // cols)
    width = cols * (1.2 + 0.5 * n_experts) + 1.2
    height = rows * max(2.4, 1.3 + 0.3 * n_layers) + 0.6
    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    vmax = max(float(np.nanmax(shares)) if shares.size else 0.0, 1e-6)
    image = None
    for ax, name, table in zip(axes, groups, shares):
        image = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="upper")
        ax.set_title(name)
        ax.set_xticks(range(n_experts), list(expert_labels), rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n_layers), [str(i) for i in layers], fontsize=7)
        ax.set_ylabel("layer")
        if n_layers * n_experts <= 160:
            for (row, col), value in np.ndenumerate(table):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * vmax else "black")
    for ax in axes[g:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:g]), shrink=0.8, label="routing share (balanced = 1/E)")
    fig.suptitle(title)
    return fig


def activated_experts_figure(hist: np.ndarray, layers: Sequence[int], title: str) -> Figure:
    """hist [L, R+1] token counts by number of real experts used -> heatmap + mean per layer."""
    n_layers, bins = hist.shape
    totals = hist.sum(1, keepdims=True)
    dist = np.divide(hist, totals, out=np.zeros_like(hist, dtype=float), where=totals > 0)  # [L, R+1]
    mean = (dist * np.arange(bins)).sum(1)  # [L]
    fig = Figure(figsize=(10, max(2.6, 1.6 + 0.3 * n_layers)), constrained_layout=True)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(dist, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(dist.max()), 1e-6))
    left.set_xticks(range(bins), [str(k) for k in range(bins)])
    left.set_yticks(range(n_layers), [str(i) for i in layers], fontsize=7)
    left.set_xlabel("real experts per token (0 = null only)")
    left.set_ylabel("layer")
    left.set_title("share of tokens")
    if n_layers * bins <= 200:
        for (row, col), value in np.ndenumerate(dist):
            left.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if value < 0.6 * max(float(dist.max()), 1e-6) else "black")
    fig.colorbar(image, ax=left, shrink=0.8)
    right.plot(mean, list(range(n_layers)), marker="o")
    right.set_yticks(range(n_layers), [str(i) for i in layers], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("mean activated real experts")
    right.set_xlim(0, max(bins - 1, 1))
    right.grid(alpha=0.3)
    right.set_title("mean per layer")
    fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """PNG written under a temporary name, then renamed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
