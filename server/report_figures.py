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
    "ci_error_bars",
    "new_figure",
    "closest_pairs_figure",
    "epsilon_figure",
    "image_grid_figure",
    "png_bytes",
    "roc_figure",
    "score_histogram_figure",
    "training_curves_figure",
    "utility_bars_figure",
]

# Utility experiment arms: metric-key prefix and display label, in display order.
UTILITY_ARMS = (
    ("trtr", "TRTR (real)"),
    ("tstr", "TSTR (synthetic)"),
    ("trs", "TRS (real+synthetic)"),
)


def new_figure(width: float, height: float) -> Figure:
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
    images_by_class: Mapping[str, np.ndarray], title: str = "", *, max_per_class: int = 8,
    masks_by_class: Mapping[str, np.ndarray] | None = None,
) -> Figure:
    """One row per class, up to ``max_per_class`` images each ([n,H,W] or [n,1,H,W] in [-1,1]);
    a row with masks (same shape, 0/1) draws each mask's outline in red over its image."""
    if not images_by_class:
        raise ValueError("images_by_class is empty: pass {class_name: images}")
    rows = len(images_by_class)
    cols = max(1, min(max_per_class, max(len(v) for v in images_by_class.values())))
    fig = new_figure(1.2 * cols + 1.2, 1.2 * rows + 0.5)
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
                row_masks = (masks_by_class or {}).get(name)
                if row_masks is not None and c < len(row_masks):
                    m = np.asarray(row_masks[c], dtype=np.float64).reshape(imgs[c].shape[-2:])
                    if m.any():
                        ax.contour(m, levels=[0.5], colors="red", linewidths=0.8)
        axes[r][0].set_ylabel(str(name), rotation=0, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def training_curves_figure(training: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per phase, one line per site (keys: phase, round, site, loss)."""
    if not training:
        raise ValueError("training is empty: need entries with phase, round, site, loss")
    phases = list(dict.fromkeys(str(e["phase"]) for e in training))
    fig = new_figure(5.0 * len(phases), 3.4)
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
    fig = new_figure(7.0, 3.6)
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


def ci_error_bars(value: float, ci: Sequence[float] | None) -> tuple[float, float]:
    if not ci or len(ci) != 2 or not all(math.isfinite(c) for c in ci):
        return 0.0, 0.0
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def utility_bars_figure(utility: Mapping[str, Any]) -> Figure:
    """TRTR / TSTR / TRS bars for AUC and accuracy with their 95 % patient-bootstrap CIs."""
    fig = new_figure(8.0, 3.4)
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
            errs.append(ci_error_bars(v, utility.get(f"{arm}_{metric}_ci")))
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


def _site_grid(n: int, width: float = 3.6, height: float = 3.3) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = new_figure(width * cols, height * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def roc_figure(site_attacks: Mapping[str, Mapping[str, Any]], *, note: str = "") -> Figure:
    """Exact membership-inference ROC per site and attack, FPR on a log axis.

    ``site_attacks`` maps a site to ``{attack: {"roc": {"fpr", "tpr", "auc", ...}}}`` (the
    site-local diagnostics of ``client.audit``). The log FPR axis starts below 1 % (at
    ``min(1e-3, 1 / (2 * non-members))``) because low-FPR is where an attack is dangerous; the
    operating point at FPR = 0 is drawn at the axis' left edge.
    """
    if not site_attacks:
        raise ValueError("site_attacks is empty: pass {site: {attack: {'roc': ...}}}")
    fig, axes = _site_grid(len(site_attacks))
    for ax, (site, attacks) in zip(axes, site_attacks.items(), strict=True):
        lo = 1e-3
        for name, block in attacks.items():
            roc = (block or {}).get("roc")
            if not roc:
                continue
            fpr = np.asarray(roc["fpr"], dtype=np.float64)
            tpr = np.asarray(roc["tpr"], dtype=np.float64)
            n_non = int(roc.get("n_nonmembers") or 0)
            if n_non > 0:
                lo = min(lo, 0.5 / n_non)
            ax.step(np.maximum(fpr, lo), tpr, where="post",
                    label=f"{name} (AUC {float(roc['auc']):.3f}, TPR@1% "
                          f"{float(roc.get('tpr_at_1pct_fpr', float('nan'))):.2f})")
        grid = np.geomspace(lo, 1.0, 50)
        ax.plot(grid, grid, "k--", lw=0.8, label="chance")
        ax.axvline(0.01, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(lo, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(str(site), fontsize=10)
        ax.set_xlabel("false positive rate (log)")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("exact membership-inference ROC" + (f"\n({note})" if note else ""), fontsize=9)
    return fig


def score_histogram_figure(site_attacks: Mapping[str, Mapping[str, Any]], *,
                           note: str = "") -> Figure:
    """Attack-score distributions per site: members, non-members, the site's generated samples.

    Reads ``{site: {attack: {"histogram": {"edges", "members", "nonmembers", "samples"},
    "threshold"}}}`` (site-local diagnostics); the dashed line is the data-independent threshold
    (1 % of generated samples score below it). One panel per (site, attack).
    """
    panels = [(site, name, block) for site, attacks in site_attacks.items()
              for name, block in attacks.items() if (block or {}).get("histogram")]
    if not panels:
        raise ValueError("no histograms: pass {site: {attack: {'histogram': ...}}}")
    fig, axes = _site_grid(len(panels), 3.4, 2.8)
    for ax, (site, name, block) in zip(axes, panels, strict=True):
        hist = block["histogram"]
        edges = np.asarray(hist["edges"], dtype=np.float64)
        for key, label in (("members", "members (train)"), ("nonmembers", "non-members"),
                           ("samples", "generated")):
            counts = np.asarray(hist.get(key, []), dtype=np.float64)
            if counts.size != edges.size - 1 or counts.sum() <= 0:
                continue
            ax.stairs(counts / (counts.sum() * np.diff(edges)), edges, label=label, lw=1.3)
        if "threshold" in block:
            ax.axvline(float(block["threshold"]), color="crimson", ls="--", lw=1,
                       label="threshold")
        ax.set_title(f"{site}: {name}", fontsize=9)
        ax.set_xlabel("score (lower = more member-like)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("attack scores" + (f"\n({note})" if note else ""), fontsize=9)
    return fig


def closest_pairs_figure(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    distances: Sequence[float] | None = None,
    *,
    title: str = "",
) -> Figure:
    """Top row: generated images; bottom row: their nearest training images; spot copies by eye."""
    if not pairs:
        raise ValueError("pairs is empty: pass (synthetic_image, train_image) tuples")
    n = len(pairs)
    fig = new_figure(1.4 * n + 1.4, 3.2)
    axes = fig.subplots(2, n, squeeze=False)
    for i, (synth, train) in enumerate(pairs):
        for row, img in ((0, synth), (1, train)):
            ax = axes[row][i]
            ax.imshow(_to_display(img), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        if distances is not None:
            axes[0][i].set_title(f"d={float(distances[i]):.2f}", fontsize=8)
    axes[0][0].set_ylabel("generated")
    axes[1][0].set_ylabel("nearest train")
    if title:
        fig.suptitle(title, fontsize=8)
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
