"""Verdicts for the run report: PASS / WEAK / FAIL per aspect, each with a plain sentence.

The thresholds are heuristics chosen to be explainable to an ethics board, not statistical tests;
they live in :data:`THRESHOLDS` and are restated in the report's method section. Every function
here reads the report's ``metrics`` layout (documented in :mod:`server.report`) and writes no HTML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["THRESHOLDS", "fidelity_space", "final_epsilons", "verdicts"]

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
_STATUS_RANK = {"PASS": 0, "WEAK": 1, "FAIL": 2}


def final_epsilons(privacy: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{site: {epsilon, delta, budget_epsilon}}`` from either privacy layout (server.report)."""
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


def fidelity_space(fidelity: Mapping[str, Any]) -> str | None:
    """The feature space verdicts read: ``classifier`` when measured, else the first one."""
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
    space = fidelity_space(fid_block)
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
    sites = final_epsilons(m.get("privacy") or {})
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
            block = m["fidelity"][fidelity_space(m["fidelity"])]
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
