"""Figures for the run report: matplotlib builders and the PNG encoding that embeds them.

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot, no global backend
state), so building one never opens a window or changes a process-wide setting. The plot builders
take one block of the report's ``metrics`` (layout in :mod:`server.report`), the image builders
take images in [-1, 1]; all return a ``Figure``. :func:`png_bytes` turns such a figure, or a plain
image array, into the PNG that the HTML embeds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

__all__ = [
    "UTILITY_ARMS",
    "closest_pairs_figure",
    "epsilon_figure",
    "image_grid_figure",
    "nn_histogram_figure",
    "png_bytes",
    "roc_figure",
    "training_curves_figure",
    "utility_bars_figure",
]

# Utility experiment arms: metric-key prefix and display label, in display order.
UTILITY_ARMS = (
    ("trtr", "TRTR (real)"),
    ("tstr", "TSTR (synthetic)"),
    ("trs", "TRS (real+synthetic)"),
)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_display(img: np.ndarray) -> np.ndarray:
    """[H,W] float image for imshow(vmin=-1, vmax=1) from [H,W], [1,H,W] or [H,W,1]."""
    arr = np.asarray(img, dtype=np.float64)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"expected a single-channel image [H,W] or [1,H,W], got {img.shape}")
    return arr


def image_grid_figure(
    images_by_class: Mapping[str, np.ndarray], title: str = "", *, max_per_class: int = 8
) -> Figure:
    """One row per class, up to ``max_per_class`` images each ([n,H,W] or [n,1,H,W] in [-1,1])."""
    if not images_by_class:
        raise ValueError("images_by_class is empty: pass {class_name: images}")
    rows = len(images_by_class)
    cols = max(1, min(max_per_class, max(len(v) for v in images_by_class.values())))
    fig = _new_figure(1.2 * cols + 1.2, 1.2 * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (name, imgs) in enumerate(images_by_class.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(imgs):
                ax.imshow(_to_display(imgs[c]), cmap="gray", vmin=-1, vmax=1)
        axes[r][0].set_ylabel(str(name), rotation=0, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def training_curves_figure(training: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per phase, one line per site (keys: phase, round, site, loss)."""
    if not training:
        raise ValueError("training is empty: need entries with phase, round, site, loss")
    phases = list(dict.fromkeys(str(e["phase"]) for e in training))
    fig = _new_figure(5.0 * len(phases), 3.4)
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    for ax, phase in zip(axes, phases, strict=True):
        entries = [e for e in training if str(e["phase"]) == phase]
        losses = []
        for site in dict.fromkeys(str(e["site"]) for e in entries):
            pts = sorted(
                (int(e["round"]), float(e["loss"])) for e in entries if str(e["site"]) == site
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=site)
            losses += [p[1] for p in pts]
        if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")
        ax.set_title(f"phase: {phase}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def epsilon_figure(
    privacy_rounds: Sequence[Mapping[str, Any]], *, budget: float | None = None
) -> Figure:
    """Cumulative epsilon per site over phases (keys: site, phase, round, epsilon).

    ``budget`` (if finite) is drawn as a dashed line.
    """
    if not privacy_rounds:
        raise ValueError("privacy_rounds is empty: need entries with site, phase, round, epsilon")
    phases = list(dict.fromkeys(str(e["phase"]) for e in privacy_rounds))
    steps = sorted({(phases.index(str(e["phase"])), int(e["round"])) for e in privacy_rounds})
    pos = {s: i + 1 for i, s in enumerate(steps)}
    fig = _new_figure(7.0, 3.6)
    ax = fig.subplots()
    for site in dict.fromkeys(str(e["site"]) for e in privacy_rounds):
        pts = sorted(
            (pos[(phases.index(str(e["phase"])), int(e["round"]))], float(e["epsilon"]))
            for e in privacy_rounds
            if str(e["site"]) == site
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=site)
    for i, phase in enumerate(phases):
        first = min(p for (ph, _), p in pos.items() if ph == i)
        if i > 0:
            ax.axvline(first - 0.5, color="grey", lw=0.8, ls=":")
        ax.annotate(phase, (first, 0), xytext=(2, 2), textcoords="offset points", fontsize=8)
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color="crimson", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel("round (all phases, in order)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _err(value: float, ci: Sequence[float] | None) -> tuple[float, float]:
    if not ci or len(ci) != 2 or not all(math.isfinite(c) for c in ci):
        return 0.0, 0.0
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def utility_bars_figure(utility: Mapping[str, Any]) -> Figure:
    """TRTR / TSTR / TRS bars for AUC and accuracy with their 95 % patient-bootstrap CIs."""
    fig = _new_figure(8.0, 3.4)
    axes = fig.subplots(1, 2)
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    for ax, metric, label in zip(axes, ("auc", "acc"), ("macro AUC", "accuracy"), strict=True):
        names, vals, errs = [], [], []
        for arm, arm_label in UTILITY_ARMS:
            if f"{arm}_{metric}" not in utility:
                continue
            v = float(utility[f"{arm}_{metric}"])
            names.append(arm_label.replace(" (", "\n("))
            vals.append(v)
            errs.append(_err(v, utility.get(f"{arm}_{metric}_ci")))
        if not names:
            ax.set_visible(False)
            continue
        x = np.arange(len(names))
        ax.bar(x, vals, color=colors[: len(names)], yerr=np.array(errs).T, capsize=5)
        for xi, v in zip(x, vals, strict=True):
            ax.text(xi, v / 2, f"{v:.3f}", ha="center", color="white", fontweight="bold")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if "ratio" in utility:
        fig.suptitle(f"TSTR / TRTR AUC ratio = {float(utility['ratio']):.3f}")
    return fig


def roc_figure(mia: Mapping[str, Any]) -> Figure:
    """Membership-inference ROC on linear and log-log axes (low-FPR is where attacks matter)."""
    fpr = np.asarray(mia["fpr"], dtype=np.float64)
    tpr = np.asarray(mia["tpr"], dtype=np.float64)
    fig = _new_figure(8.0, 3.6)
    axes = fig.subplots(1, 2)
    label = f"attack (AUC {float(mia['auc']):.3f})"
    axes[0].plot(fpr, tpr, label=label)
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    axes[0].set_title("ROC")
    keep = (fpr > 0) & (tpr > 0)
    axes[1].loglog(fpr[keep], tpr[keep], label=label)
    grid = np.geomspace(1e-4, 1, 50)
    axes[1].loglog(grid, grid, "k--", lw=0.8, label="chance")
    axes[1].set_xlim(1e-4, 1)
    axes[1].set_ylim(1e-4, 1)
    axes[1].set_title("ROC, log scale (low FPR)")
    for ax in axes:
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return fig


def nn_histogram_figure(audit: Mapping[str, Any]) -> Figure:
    """Nearest-neighbour distance distributions on shared bins, with the memorisation threshold."""
    edges = np.asarray(audit["bin_edges"], dtype=np.float64)
    fig = _new_figure(7.0, 3.6)
    ax = fig.subplots()
    series = (
        ("hist_synth_train", "synthetic -> nearest train"),
        ("hist_synth_holdout", "synthetic -> nearest holdout"),
        ("hist_holdout_train", "holdout -> nearest train (reference)"),
    )
    for key, label in series:
        counts = np.asarray(audit[key], dtype=np.float64)
        total = counts.sum()
        dens = counts / (total * np.diff(edges)) if total > 0 else counts
        ax.stairs(dens, edges, label=label, lw=1.5)
    ax.axvline(float(audit["threshold"]), color="crimson", ls="--", lw=1, label="threshold")
    ax.set_xlabel("feature-space distance")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def closest_pairs_figure(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], distances: Sequence[float] | None = None
) -> Figure:
    """Top row: synthetic images; bottom row: their nearest training images; spot copies by eye."""
    if not pairs:
        raise ValueError("pairs is empty: pass (synthetic_image, train_image) tuples")
    n = len(pairs)
    fig = _new_figure(1.4 * n + 1.4, 3.2)
    axes = fig.subplots(2, n, squeeze=False)
    for i, (synth, train) in enumerate(pairs):
        for row, img in ((0, synth), (1, train)):
            ax = axes[row][i]
            ax.imshow(_to_display(img), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        if distances is not None:
            axes[0][i].set_title(f"d={float(distances[i]):.2f}", fontsize=8)
    axes[0][0].set_ylabel("synthetic")
    axes[1][0].set_ylabel("nearest train")
    return fig


def png_bytes(fig: Any) -> bytes:
    """PNG of a matplotlib Figure or of an image array (uint8, or float in [0,1] / [-1,1])."""
    buf = io.BytesIO()
    if isinstance(fig, Figure):
        if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        return buf.getvalue()
    arr = np.asarray(fig)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"figure arrays must be [H,W] or [H,W,3|4] images, got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.min() < 0:
            arr = (arr + 1.0) / 2.0
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if max(img.size) < 256:  # small images (e.g. 32 px samples) would be unreadable at 1:1
        scale = -(-256 // max(img.size))
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(buf, format="PNG")
    return buf.getvalue()
