"""The run report: one self-contained ``report.html`` that says how faithful, useful and private
the synthetic data is, in numbers, plots and plain sentences.

Self-contained means: inline CSS, figures embedded as base64 PNGs, no script and no external URL,
so the file can be mailed to an ethics board or opened on an air-gapped machine. Figures are
drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot, no global backend state).

``metrics`` layout read by the report (every block optional; a missing block reads "not measured"
and its verdict is FAIL, because a run that cannot show all three properties is not finished):

* ``run``: flat ``{name: value}`` shown as the run table (preset, sites, rounds, image size ...);
* ``fidelity``: ``ldm_core.evaluation.fidelity_report`` output;
* ``utility``: ``ldm_core.evaluation.evaluate_utility`` output;
* ``mia``: ``membership_inference`` or ``merge_mia`` output;
* ``nn_audit``: ``nearest_neighbour_audit`` or ``merge_nn_audits`` output;
* ``privacy``: ``{"sites": {site: {"epsilon", "delta", "budget_epsilon"}}}`` or
  ``{"rounds": [{site, phase, round, epsilon}], "budget_epsilon": float, "delta": float}``,
  plus ``"disclosures": [str]`` - every other value computed from private data and released
  (latent scale factor, class counts ...) and how it is accounted for (ledger or fixed by design).

Known figure names are placed in their section: ``samples``, ``utility``, ``epsilon``, ``roc``,
``nn_histogram``, ``closest_pairs``, ``training_curves``; any other name goes under "Other figures".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

__all__ = [
    "THRESHOLDS",
    "closest_pairs_figure",
    "epsilon_figure",
    "image_grid_figure",
    "nn_histogram_figure",
    "roc_figure",
    "training_curves_figure",
    "utility_bars_figure",
    "verdicts",
    "write_report",
]

# Verdict thresholds. Heuristics chosen to be explainable, not statistical tests.
THRESHOLDS: dict[str, float] = {
    # TSTR AUC / TRTR AUC: synthetic-trained classifier keeps >= 90 % of real performance.
    "utility_ratio_pass": 0.90,
    "utility_ratio_fail": 0.75,
    # Precision/recall relative to two halves of the real set (see fidelity_report real_split);
    # absolute values are used only when that baseline is missing.
    "fidelity_rel_precision_pass": 0.8,
    "fidelity_rel_recall_pass": 0.6,
    "fidelity_rel_precision_fail": 0.5,
    "fidelity_rel_recall_fail": 0.25,
    "fidelity_abs_precision_pass": 0.6,
    "fidelity_abs_recall_pass": 0.4,
    "fidelity_abs_precision_fail": 0.3,
    "fidelity_abs_recall_fail": 0.1,
    # Mean within-class SSIM of synthetic minus real: higher = less diverse (collapse/copies).
    "diversity_gap_weak": 0.10,
    "diversity_gap_fail": 0.20,
    # Membership-inference AUC: 0.5 is chance.
    "mia_auc_pass": 0.60,
    "mia_auc_fail": 0.70,
    # Memorised fraction vs the rate expected by chance (the audit quantile, usually 5 %):
    # PASS up to max(1.5x, chance + 2 binomial SE), FAIL above max(3x, chance + 4 SE).
    "memorized_pass_factor": 1.5,
    "memorized_fail_factor": 3.0,
}

_SECTIONS = [
    ("verdict", "Verdict"),
    ("run", "Run"),
    ("samples", "Synthetic samples"),
    ("fidelity", "Fidelity: does it look real?"),
    ("utility", "Utility: does it train a good model?"),
    ("privacy", "Privacy: does it leak its training patients?"),
    ("training", "Training"),
    ("other-figures", "Other figures"),
    ("method", "How to read this report"),
    ("raw-metrics", "Raw metrics"),
]
_FIGURE_SECTION = {
    "samples": "samples",
    "utility": "utility",
    "epsilon": "privacy",
    "roc": "privacy",
    "nn_histogram": "privacy",
    "closest_pairs": "privacy",
    "training_curves": "training",
}
_ARMS = (("trtr", "TRTR (real)"), ("tstr", "TSTR (synthetic)"), ("trs", "TRS (real+synthetic)"))
_STATUS_RANK = {"PASS": 0, "WEAK": 1, "FAIL": 2}


# ----------------------------------------------------------------------------------- figures
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
        for arm, arm_label in _ARMS:
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


# ---------------------------------------------------------------------------------- verdicts
def _final_epsilons(privacy: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{site: {epsilon, delta, budget_epsilon}}`` from either privacy layout (see module doc)."""
    if "sites" in privacy:
        return {str(k): dict(v) for k, v in privacy["sites"].items()}
    out: dict[str, dict[str, float]] = {}
    for e in privacy.get("rounds", []):
        site = out.setdefault(str(e["site"]), {"epsilon": 0.0})
        site["epsilon"] = max(site["epsilon"], float(e["epsilon"]))
        if "budget_epsilon" in privacy:
            site["budget_epsilon"] = float(privacy["budget_epsilon"])
        if "delta" in privacy:
            site["delta"] = float(privacy["delta"])
    return out


def _fidelity_space(fidelity: Mapping[str, Any]) -> str | None:
    spaces = [k for k, v in fidelity.items() if k != "diversity" and isinstance(v, Mapping)]
    if not spaces:
        return None
    return "classifier" if "classifier" in spaces else spaces[0]


def _verdict_utility(m: Mapping[str, Any]) -> tuple[str, str]:
    u = m.get("utility")
    if not u or "ratio" not in u:
        return "FAIL", "Utility was not measured, so usefulness of the synthetic data is unknown."
    t = THRESHOLDS
    ratio = float(u["ratio"])
    status = (
        "PASS"
        if ratio >= t["utility_ratio_pass"]
        else "FAIL"
        if ratio < t["utility_ratio_fail"]
        else "WEAK"
    )
    ci = u.get("tstr_auc_ci") or [float("nan")] * 2
    return status, (
        f"A classifier trained only on synthetic images reaches AUC {u['tstr_auc']:.3f} "
        f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}) on real test patients, against {u['trtr_auc']:.3f} "
        f"when trained on real images: {ratio:.0%} of real-data performance."
    )


def _verdict_fidelity(m: Mapping[str, Any]) -> tuple[str, str]:
    fid_block = m.get("fidelity") or {}
    space = _fidelity_space(fid_block)
    if space is None:
        return "FAIL", "Fidelity was not measured, so we cannot say the images look real."
    f = fid_block[space]
    t = THRESHOLDS
    p, r = float(f["precision"]), float(f["recall"])
    ref = f.get("real_split")
    if ref and ref.get("precision", 0) > 0 and ref.get("recall", 0) > 0:
        pv, rv, kind = p / ref["precision"], r / ref["recall"], "rel"
        ref_txt = (
            f" Two halves of the real data score {ref['precision']:.2f}/{ref['recall']:.2f} "
            "on the same measure."
        )
    else:
        pv, rv, kind, ref_txt = p, r, "abs", ""
    if pv >= t[f"fidelity_{kind}_precision_pass"] and rv >= t[f"fidelity_{kind}_recall_pass"]:
        status = "PASS"
    elif pv < t[f"fidelity_{kind}_precision_fail"] or rv < t[f"fidelity_{kind}_recall_fail"]:
        status = "FAIL"
    else:
        status = "WEAK"
    return status, (
        f"In the {space} feature space, {p:.0%} of synthetic images fall inside the region of "
        f"real images (precision) and they cover {r:.0%} of the real images' variety "
        f"(recall).{ref_txt}"
    )


def _verdict_diversity(m: Mapping[str, Any]) -> tuple[str, str] | None:
    div = (m.get("fidelity") or {}).get("diversity")
    if not div or not div.get("real") or not div.get("synthetic"):
        return None
    real = float(np.mean(list(div["real"].values())))
    synth = float(np.mean(list(div["synthetic"].values())))
    gap = synth - real
    status = (
        "FAIL"
        if gap > THRESHOLDS["diversity_gap_fail"]
        else "WEAK"
        if gap > THRESHOLDS["diversity_gap_weak"]
        else "PASS"
    )
    return status, (
        f"Images of the same class resemble each other with mean SSIM {synth:.2f} in the synthetic "
        f"set and {real:.2f} in the real set (higher = less varied)."
    )


def _verdict_mia(m: Mapping[str, Any]) -> tuple[str, str]:
    mia = m.get("mia")
    if not mia or "auc" not in mia:
        return "FAIL", "No membership-inference attack was run, so empirical leakage is unknown."
    auc = float(mia["auc"])
    t = THRESHOLDS
    status = "PASS" if auc <= t["mia_auc_pass"] else "FAIL" if auc > t["mia_auc_fail"] else "WEAK"
    tpr = float(mia.get("tpr_at_1pct_fpr", float("nan")))
    return status, (
        f"An attacker guessing from the model's denoising loss whether a patient image was used in "
        f"training is right with AUC {auc:.3f} (0.5 = coin flip); at a 1% false-alarm rate it "
        f"finds {tpr:.1%} of training images (chance: 1%)."
    )


def _verdict_memorisation(m: Mapping[str, Any]) -> tuple[str, str]:
    audit = m.get("nn_audit")
    if not audit or "memorized_fraction" not in audit:
        return (
            "FAIL",
            "No nearest-neighbour audit was run, so copying of training images is unchecked.",
        )
    frac = float(audit["memorized_fraction"])
    exp = float(audit.get("expected_fraction", 0.05))
    # binomial noise of the fraction plus that of the threshold (a quantile of n_holdout values)
    n_syn = max(1, int(audit.get("n_synthetic", 1)))
    n_hold = int(audit.get("n_holdout", 0))
    se = math.sqrt(exp * (1 - exp) * (1 / n_syn + (1 / n_hold if n_hold > 0 else 0.0)))
    t = THRESHOLDS
    if frac <= max(t["memorized_pass_factor"] * exp, exp + 2 * se):
        status = "PASS"
    elif frac > max(t["memorized_fail_factor"] * exp, exp + 4 * se):
        status = "FAIL"
    else:
        status = "WEAK"
    return status, (
        f"{frac:.1%} of synthetic images are closer to a training image than {exp:.0%} of unseen "
        f"real images are; a generator that does not copy would show about {exp:.0%}."
    )


def _verdict_epsilon(m: Mapping[str, Any]) -> tuple[str, str]:
    sites = _final_epsilons(m.get("privacy") or {})
    if not sites:
        return "FAIL", "No privacy accounting was reported, so there is no formal DP guarantee."
    eps = {s: float(v.get("epsilon", float("inf"))) for s, v in sites.items()}
    worst = max(eps, key=lambda s: eps[s])
    if not math.isfinite(eps[worst]):
        return "FAIL", f"Site {worst} trained without differential privacy (epsilon = infinity)."
    over = [
        s for s, v in sites.items() if eps[s] > float(v.get("budget_epsilon", float("inf"))) + 1e-9
    ]
    budgets = [float(v["budget_epsilon"]) for v in sites.values() if "budget_epsilon" in v]
    delta = sites[worst].get("delta")
    delta_txt = f"delta {float(delta):.0e}" if delta is not None else "delta not reported"
    if over:
        return "FAIL", f"Sites {', '.join(over)} spent more privacy budget than they allowed."
    if len(budgets) < len(sites):
        return "WEAK", (
            f"Largest spent epsilon is {eps[worst]:.2f} at site {worst} ({delta_txt}), but not "
            "every site reported its budget."
        )
    return "PASS", (
        f"Every site stayed within its privacy budget; the largest spent epsilon is "
        f"{eps[worst]:.2f} at site {worst} ({delta_txt}, "
        f"budget {float(sites[worst]['budget_epsilon']):g})."
    )


def _shortfall(aspect: str, m: Mapping[str, Any]) -> str:
    """A short plain clause saying what a non-PASS aspect means for a user of the data."""
    try:
        if aspect == "Utility":
            return (
                f"a classifier trained on it keeps only {float(m['utility']['ratio']):.0%} of the "
                "AUC of one trained on real images"
            )
        if aspect == "Fidelity":
            block = m["fidelity"][_fidelity_space(m["fidelity"])]
            return (
                f"{1 - float(block['precision']):.0%} of synthetic images look unlike any real "
                f"image and they reproduce {float(block['recall']):.0%} of the real variety"
            )
        if aspect == "Diversity":
            return "images within a class are more alike than real ones (mode collapse or copies)"
        if aspect == "Formal privacy (DP)":
            return "the formal privacy guarantee is missing or a site exceeded its budget"
        if aspect == "Membership inference":
            return (
                "an attacker can partly tell training patients from others "
                f"(AUC {float(m['mia']['auc']):.2f})"
            )
        if aspect == "Memorisation":
            audit = m["nn_audit"]
            return (
                f"{float(audit['memorized_fraction']):.0%} of synthetic images sit unusually close "
                f"to a training image (chance: {float(audit.get('expected_fraction', 0.05)):.0%}), "
                "so some may be near-copies"
            )
    except (KeyError, TypeError, ValueError):
        pass
    return f"{aspect.lower()} was not measured"


def verdicts(metrics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(aspect, PASS|WEAK|FAIL, plain-language sentence)`` rows, ending with the shortfalls row.

    Thresholds are in :data:`THRESHOLDS` (documented there and in the report's method section).
    A missing measurement is a FAIL: the product claim needs all three of fidelity, utility and
    privacy backed by numbers.
    """
    rows: list[tuple[str, str, str]] = []
    checks = [
        ("Utility", _verdict_utility(metrics)),
        ("Fidelity", _verdict_fidelity(metrics)),
        ("Diversity", _verdict_diversity(metrics)),
        ("Formal privacy (DP)", _verdict_epsilon(metrics)),
        ("Membership inference", _verdict_mia(metrics)),
        ("Memorisation", _verdict_memorisation(metrics)),
    ]
    for aspect, result in checks:
        if result is not None:
            rows.append((aspect, result[0], result[1]))
    short = [(a, s) for a, s, _ in rows if s != "PASS"]
    if short:
        worst = max((s for _, s in short), key=_STATUS_RANK.__getitem__)
        parts = "; ".join(_shortfall(a, metrics) for a, _ in short)
        rows.append(("Where it falls short", worst, f"{parts[0].upper()}{parts[1:]}."))
    else:
        rows.append(
            (
                "Where it falls short",
                "PASS",
                "No aspect fell below its threshold. Fidelity numbers come from random or "
                "in-house feature spaces, not Inception, and are only comparable between runs "
                "that use the same extractor.",
            )
        )
    return rows


# ------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1d232a;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{margin:0 0 4px;font-size:26px}h2{border-bottom:2px solid #e3e6ea;padding-bottom:4px;
margin-top:36px;font-size:20px}h3{font-size:16px;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #dde1e6;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;min-width:48px;text-align:center;padding:2px 8px;border-radius:4px;
font-weight:700;color:#fff}.PASS{background:#2e7d32}.WEAK{background:#ed8c00}
.FAIL{background:#c62828}.muted{color:#66707a}figure{margin:12px 0}
figure img{max-width:100%;border:1px solid #e3e6ea}figcaption{font-size:13px;color:#66707a}
pre{background:#f6f7f9;padding:10px;overflow-x:auto;font-size:12px}
"""


def _png_bytes(fig: Any) -> bytes:
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


def _img_tag(name: str, fig: Any) -> str:
    data = base64.b64encode(_png_bytes(fig)).decode("ascii")
    cap = html.escape(name.replace("_", " "))
    return (
        f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_fmt(c)}</td>'
            if isinstance(c, (int, float))
            else f"<td>{_fmt(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_NOT_MEASURED = '<p class="muted">Not measured in this run.</p>'


def _run_html(m: Mapping[str, Any]) -> str:
    run = m.get("run")
    if not run:
        return _NOT_MEASURED
    return _table(["setting", "value"], [(k, v) for k, v in run.items()])


def _fidelity_html(m: Mapping[str, Any]) -> str:
    fid_block = m.get("fidelity")
    if not fid_block:
        return _NOT_MEASURED
    keys = ["fid", "kid", "kid_std", "precision", "recall", "density", "coverage"]
    rows = []
    for space, block in fid_block.items():
        if space == "diversity" or not isinstance(block, Mapping):
            continue
        rows.append([f"{space}: real vs synthetic"] + [block.get(k, float("nan")) for k in keys])
        ref = block.get("real_split")
        if ref:
            rows.append(
                [f"{space}: real half vs real half"] + [ref.get(k, float("nan")) for k in keys]
            )
    out = (
        "<p>FID/KID: lower is closer (0 = same distribution). Precision: share of synthetic images "
        "that look like some real image. Recall and coverage: share of the real variety the "
        "synthetic set reproduces. Density is about 1 when both sets match. The 'real half' rows "
        "show what a perfect generator would score.</p>" + _table(["feature space"] + keys, rows)
    )
    div = fid_block.get("diversity")
    if div:
        classes = sorted(set(div.get("real", {})) | set(div.get("synthetic", {})), key=str)
        out += "<h3>Within-class similarity (mean pairwise SSIM, lower = more diverse)</h3>"
        out += _table(
            ["class", "real", "synthetic"],
            [
                (
                    c,
                    div.get("real", {}).get(c, float("nan")),
                    div.get("synthetic", {}).get(c, float("nan")),
                )
                for c in classes
            ],
        )
    return out


def _utility_html(m: Mapping[str, Any]) -> str:
    u = m.get("utility")
    if not u:
        return _NOT_MEASURED
    rows = [
        (
            label,
            u.get(f"{a}_auc", float("nan")),
            u.get(f"{a}_auc_ci", ""),
            u.get(f"{a}_acc", float("nan")),
            u.get(f"{a}_acc_ci", ""),
        )
        for a, label in _ARMS
        if f"{a}_auc" in u
    ]
    out = (
        "<p>The same small CNN, trained with the same recipe on real images (TRTR), on synthetic "
        "images matched to the real class counts (TSTR) and on both (TRS), scored on real test "
        "patients. Values are those of the seed ensemble (probabilities averaged over the "
        "seeds' models); 95% intervals come from resampling test patients.</p>"
        + _table(["training data", "macro AUC", "AUC 95% CI", "accuracy", "accuracy 95% CI"], rows)
    )
    out += _table(
        ["TSTR/TRTR ratio", "95% CI", "train images", "synthetic images", "test images", "seeds"],
        [
            (
                u.get("ratio", float("nan")),
                u.get("ratio_ci", ""),
                u.get("n_train", ""),
                u.get("n_synthetic", ""),
                u.get("n_test", ""),
                str(u.get("seeds", "")),
            )
        ],
    )
    per_class = u.get("per_class")
    if per_class:
        n = max(len(v) for v in per_class.values())
        out += "<h3>One-vs-rest AUC per class</h3>" + _table(
            ["class"] + [lbl for a, lbl in _ARMS if a in per_class],
            [[c] + [per_class[a][c] for a, _ in _ARMS if a in per_class] for c in range(n)],
        )
    return out


def _privacy_html(m: Mapping[str, Any]) -> str:
    out = "<h3>Formal guarantee (differential privacy)</h3>"
    sites = _final_epsilons(m.get("privacy") or {})
    if sites:
        out += _table(
            ["site", "epsilon spent", "delta", "epsilon budget"],
            [
                (
                    s,
                    v.get("epsilon", float("nan")),
                    v.get("delta", float("nan")),
                    v.get("budget_epsilon", float("nan")),
                )
                for s, v in sites.items()
            ],
        )
    else:
        out += _NOT_MEASURED
    disclosures = (m.get("privacy") or {}).get("disclosures")
    out += "<h3>Other values released from private data</h3>"
    if disclosures:
        out += "<ul>" + "".join(f"<li>{html.escape(str(d))}</li>" for d in disclosures) + "</ul>"
    else:
        out += '<p class="muted">None declared.</p>'
    out += "<h3>Membership inference (loss attack, per-site aggregates)</h3>"
    mia = m.get("mia")
    if mia:
        out += _table(
            ["AUC", "TPR at 1% FPR", "TPR at 0.1% FPR", "members", "non-members", "pooling"],
            [
                (
                    mia.get("auc"),
                    mia.get("tpr_at_1pct_fpr"),
                    mia.get("tpr_at_0_1pct_fpr"),
                    mia.get("n_members", ""),
                    mia.get("n_nonmembers", ""),
                    mia.get("method", "single site"),
                )
            ],
        )
    else:
        out += _NOT_MEASURED
    out += "<h3>Nearest-neighbour memorisation audit</h3>"
    audit = m.get("nn_audit")
    if audit:
        out += _table(
            [
                "memorised fraction",
                "expected by chance",
                "threshold",
                "synthetic",
                "train",
                "holdout",
            ],
            [
                (
                    audit.get("memorized_fraction"),
                    audit.get("expected_fraction"),
                    audit.get("threshold", float("nan")),
                    audit.get("n_synthetic", ""),
                    audit.get("n_train", ""),
                    audit.get("n_holdout", ""),
                )
            ],
        )
    else:
        out += _NOT_MEASURED
    return out


def _method_html() -> str:
    t = THRESHOLDS
    items = [
        f"Utility: PASS when TSTR/TRTR AUC ratio &ge; {t['utility_ratio_pass']}, FAIL below "
        f"{t['utility_ratio_fail']}.",
        f"Fidelity: precision/recall relative to the real-half baseline; PASS when &ge; "
        f"{t['fidelity_rel_precision_pass']} / {t['fidelity_rel_recall_pass']}, FAIL below "
        f"{t['fidelity_rel_precision_fail']} / {t['fidelity_rel_recall_fail']} (absolute "
        f"{t['fidelity_abs_precision_pass']} / {t['fidelity_abs_recall_pass']} and "
        f"{t['fidelity_abs_precision_fail']} / {t['fidelity_abs_recall_fail']} without a "
        "baseline). "
        "Feature spaces are a seeded random CNN and our own classifier (no downloaded Inception "
        "network), so values are comparable only between runs using the same extractor.",
        f"Diversity: WEAK when synthetic within-class SSIM exceeds the real one by "
        f"{t['diversity_gap_weak']}, FAIL by {t['diversity_gap_fail']}.",
        "Formal privacy: PASS when every site's cumulative epsilon (all rounds, both phases) is "
        "within its budget; FAIL when a site exceeded it or trained without DP.",
        f"Membership inference: PASS at AUC &le; {t['mia_auc_pass']}, FAIL above "
        f"{t['mia_auc_fail']}. A low AUC does not prove privacy; the DP epsilon is the guarantee.",
        f"Memorisation: PASS up to {t['memorized_pass_factor']}&times; the chance rate (or chance "
        f"+ 2 standard errors), FAIL above {t['memorized_fail_factor']}&times; (or chance + 4 SE).",
        "A measurement that is missing counts as FAIL.",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_report(
    run_dir: Path | str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Any],
    *,
    title: str = "fedldm run report",
) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and return its path.

    ``figures`` maps names to matplotlib ``Figure`` objects or image arrays; see the module doc
    for the names placed in sections and for the ``metrics`` layout. The file is written to a
    temporary name and renamed, so a crash never leaves a half-written report.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = verdicts(metrics)
    verdict_html = (
        "<table><tr><th>aspect</th><th>status</th><th>what it means</th></tr>"
        + "".join(
            f"<tr><td><b>{html.escape(aspect)}</b></td>"
            f'<td><span class="badge {status}">{status}</span></td>'
            f"<td>{html.escape(sentence)}</td></tr>"
            for aspect, status, sentence in rows
        )
        + "</table>"
    )
    by_section: dict[str, list[str]] = {sid: [] for sid, _ in _SECTIONS}
    for name, fig in figures.items():
        by_section[_FIGURE_SECTION.get(name, "other-figures")].append(_img_tag(name, fig))
    body = {
        "verdict": verdict_html,
        "run": _run_html(metrics),
        "samples": "" if by_section["samples"] else _NOT_MEASURED,
        "fidelity": _fidelity_html(metrics),
        "utility": _utility_html(metrics),
        "privacy": _privacy_html(metrics),
        "training": "" if by_section["training"] else _NOT_MEASURED,
        "other-figures": "" if by_section["other-figures"] else '<p class="muted">None.</p>',
        "method": _method_html(),
        "raw-metrics": "<details><summary>metrics.json as used for this report</summary><pre>"
        + html.escape(json.dumps(metrics, indent=2, default=_json_default))
        + "</pre></details>",
    }
    sections = "".join(
        f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{body[sid]}'
        f"{''.join(by_section[sid])}</section>"
        for sid, heading in _SECTIONS
    )
    subtitle = str((metrics.get("run") or {}).get("name", run_dir.name))
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="muted">{html.escape(subtitle)}</p>'
        f"{sections}</main></body></html>"
    )
    path = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path
