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

from server.run_metrics import (
    AuditSummary,
    Fidelity,
    PrivacyBlock,
    Reconstruction,
    SitePrivacy,
    Utility,
)

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
    # The global autoencoder's SSIM on the sites' holdout patients (DP release): below the FAIL
    # line the latent space cannot hold the images, whatever the denoiser learns.
    "autoencoder_ssim_pass": 0.70,
    "autoencoder_ssim_fail": 0.40,
    # Mean within-class SSIM of synthetic minus real: higher = less diverse (collapse/copies).
    "diversity_gap_weak": 0.10,
    "diversity_gap_fail": 0.20,
    # Membership-inference AUC (mean over sites of the best attack's DP value): 0.5 is chance.
    "mia_auc_pass": 0.60,
    "mia_auc_fail": 0.70,
    # When the DP noise on that mean (std) exceeds this, the audit cannot tell PASS: WEAK.
    "mia_noise_weak": 0.10,
    # Near-copy fraction of training records minus that of unseen holdout records (chance):
    # WEAK above max(2 noise SE, 0.02), FAIL above max(4 noise SE, 0.05).
    "near_copy_weak_excess": 0.02,
    "near_copy_fail_excess": 0.05,
}
_STATUS_RANK = {"PASS": 0, "WEAK": 1, "FAIL": 2}


def final_epsilons(privacy: Mapping[str, Any]) -> dict[str, SitePrivacy]:
    """``{site: SitePrivacy}`` from the ``privacy.sites`` table (the only layout producers write:
    the coordinator keeps it current after every round)."""
    return dict(PrivacyBlock.from_json(privacy).sites or {})


def fidelity_space(fidelity: Mapping[str, Any]) -> str | None:
    """The feature space verdicts read: ``classifier`` when measured, else the first one."""
    block = Fidelity.from_json(fidelity)
    return block.verdict_space() if block is not None else None


def _verdict_utility(m: Mapping[str, Any]) -> tuple[str, str]:
    u = Utility.from_json(m.get("utility"))
    if u is None or u.ratio is None:
        return "FAIL", "Utility was not measured, so usefulness of the synthetic data is unknown."
    t = THRESHOLDS
    ratio = float(u.ratio)
    status = (
        "PASS"
        if ratio >= t["utility_ratio_pass"]
        else "FAIL"
        if ratio < t["utility_ratio_fail"]
        else "WEAK"
    )
    tstr, trtr = u.arm("tstr"), u.arm("trtr")
    ci = tstr.auc_ci or [float("nan")] * 2
    return status, (
        f"A classifier trained only on synthetic images reaches AUC {tstr.auc:.3f} "
        f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}) on real test patients, against {trtr.auc:.3f} "
        f"when trained on real images: {ratio:.0%} of real-data performance."
    )


def _verdict_fidelity(m: Mapping[str, Any]) -> tuple[str, str]:
    fid_block = Fidelity.from_json(m.get("fidelity"))
    space = fid_block.verdict_space() if fid_block is not None else None
    if fid_block is None or space is None:
        return "FAIL", "Fidelity was not measured, so we cannot say the images look real."
    f = fid_block.spaces[space]
    t = THRESHOLDS
    p, r = f.precision, f.recall
    if not math.isfinite(p):  # measured at the sites: recall only (server.eval_sites)
        status = ("PASS" if r >= t["fidelity_abs_recall_pass"] else
                  "FAIL" if r < t["fidelity_abs_recall_fail"] else "WEAK")
        return status, (
            f"Measured at the sites: the synthetic images cover {r:.0%} of the real test "
            "images' variety (recall, from DP counts). Precision cannot be released with DP "
            "and was not measured.")
    ref = f.real_split
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


def _verdict_autoencoder(m: Mapping[str, Any]) -> tuple[str, str] | None:
    """Is the latent space good enough to hold the images? Runs from before this release
    was made have no block and get no row."""
    rec = Reconstruction.from_json(m.get("reconstruction"))
    if rec is None:
        return None
    if rec.ssim is None or rec.psnr_db is None:
        return "WEAK", ("The DP noise swamped the sites' holdout counts, so the autoencoder's "
                        "reconstruction quality is unknown (too few holdout patients).")
    t = THRESHOLDS
    # Judged on the 95% interval of the DP noise: noise alone never makes a PASS or a FAIL.
    half = 1.96 * rec.ssim_se if rec.ssim_se is not None else math.inf
    status = ("PASS" if rec.ssim - half >= t["autoencoder_ssim_pass"] else
              "FAIL" if rec.ssim + half < t["autoencoder_ssim_fail"] else "WEAK")
    se = f" (+- {rec.ssim_se:.2f} from the DP noise)" if rec.ssim_se is not None else ""
    return status, (f"The shared autoencoder reconstructs the sites' unseen holdout images at "
                    f"SSIM {rec.ssim:.2f}{se} and PSNR {rec.psnr_db:.1f} dB: generated images "
                    "cannot be sharper than this.")


def _verdict_latent_scale(m: Mapping[str, Any]) -> tuple[str, str] | None:
    """A row only when the scale factor's DP release went wrong (clamped or swamped): a run
    then looks fine in every log line while its denoiser learned mis-scaled latents."""
    note = (m.get("latent_scale") or {}).get("note")
    if not note:
        return None
    return "WEAK", f"Latent scale factor: {note[0].upper()}{note[1:]}."


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


def _audit(m: Mapping[str, Any]) -> AuditSummary:
    return AuditSummary.from_json(m.get("privacy") or {})


def _mean_noise(audit: AuditSummary) -> float:
    """Std of the DP noise on a mean over sites of one released fraction."""
    noise = audit.mia_noise_std if audit.mia_noise_std is not None else float("nan")
    return noise / math.sqrt(max(1, len(audit.audit_sites)))


def _or_nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _verdict_mia(m: Mapping[str, Any]) -> tuple[str, str]:
    audit = _audit(m)
    if audit.mia_auc is None:
        return "FAIL", "No membership-inference attack was run, so empirical leakage is unknown."
    auc = audit.mia_auc
    tpr = _or_nan(audit.mia_tpr_at_1pct_fpr)
    fpr = _or_nan(audit.mia_fpr_at_threshold)
    noise = _mean_noise(audit)
    t = THRESHOLDS
    status = "PASS" if auc <= t["mia_auc_pass"] else "FAIL" if auc > t["mia_auc_fail"] else "WEAK"
    sentence = (
        f"The best of the shipped attacks (denoiser loss, autoencoder reconstruction) tells "
        f"training images from unseen ones with AUC {auc:.3f} (0.5 = coin flip); at a threshold "
        f"that flags {fpr:.1%} of unseen images it flags {tpr:.1%} of training images. These are "
        f"DP releases (noise std about {noise:.3f} on these means) and lower bounds on leakage: "
        "they show what these attacks found, never that no attack can succeed."
    )
    if status == "PASS" and not noise <= t["mia_noise_weak"]:
        status = "WEAK"
        sentence += " The noise is too large for this audit to count as a pass."
    return status, sentence


def _verdict_memorisation(m: Mapping[str, Any]) -> tuple[str, str]:
    audit = _audit(m)
    if audit.memorized_fraction is None:
        return (
            "FAIL",
            "No near-copy audit was run, so copying of training images is unchecked.",
        )
    frac = audit.memorized_fraction
    chance = audit.memorized_fraction_holdout or 0.0
    # difference of two means over sites, each with the per-site noise
    se = _mean_noise(audit) * math.sqrt(2.0)
    se = se if math.isfinite(se) else 0.0
    excess = frac - chance
    t = THRESHOLDS
    if excess > max(4 * se, t["near_copy_fail_excess"]):
        status = "FAIL"
    elif excess > max(2 * se, t["near_copy_weak_excess"]):
        status = "WEAK"
    else:
        status = "PASS"
    head = (
        f"{frac:.1%} of audited training images have one generated sample much closer than any "
        f"other (ratio test), against {chance:.1%} of unseen images (what chance gives; DP noise "
        f"std about {se:.3f} on the difference)."
    )
    if status == "PASS":
        where = ("At or below chance" if excess <= 0
                 else "Above chance only within the DP noise")
        return status, head + (
            f" {where}, this test found no copies; that reflects low fidelity as much "
            "as privacy (a generator whose samples resemble no real image copies none), and it "
            "is a lower bound on leakage, not proof of its absence."
        )
    return status, head + " Some synthetic images may be near-copies of training images."


def _verdict_epsilon(m: Mapping[str, Any]) -> tuple[str, str]:
    sites = final_epsilons(m.get("privacy") or {})
    if not sites:
        return "FAIL", "No privacy accounting was reported, so there is no formal DP guarantee."
    inf = float("inf")
    eps = {s: v.epsilon if v.epsilon is not None else inf for s, v in sites.items()}
    worst = max(eps, key=lambda s: eps[s])
    if not math.isfinite(eps[worst]):
        return "FAIL", f"Site {worst} trained without differential privacy (epsilon = infinity)."
    over = [
        s for s, v in sites.items()
        if eps[s] > (v.budget_epsilon if v.budget_epsilon is not None else inf) + 1e-9
    ]
    budgets = [v.budget_epsilon for v in sites.values() if v.budget_epsilon is not None]
    delta = sites[worst].delta
    delta_txt = f"delta {float(delta):.0e}" if delta is not None else "delta not reported"
    if over:
        return "FAIL", f"Sites {', '.join(over)} spent more privacy budget than they allowed."
    flagged = [s for s, v in sites.items() if v.flags]
    if flagged:
        return "FAIL", (f"Privacy figures from {', '.join(flagged)} were refused as impossible "
                        "(see the privacy section): their spend cannot be vouched for.")
    if len(budgets) < len(sites):
        return "WEAK", (
            f"Largest spent epsilon is {eps[worst]:.2f} at site {worst} ({delta_txt}), but not "
            "every site reported its budget."
        )
    return "PASS", (
        f"Every site stayed within its privacy budget; the largest spent epsilon is "
        f"{eps[worst]:.2f} at site {worst} ({delta_txt}, "
        f"budget {float(sites[worst].budget_epsilon or inf):g})."
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
            if not math.isfinite(float(block.get("precision", math.nan))):
                return (f"the synthetic images reproduce {float(block['recall']):.0%} of the "
                        "real variety (precision not measured)")
            return (
                f"{1 - float(block['precision']):.0%} of synthetic images look unlike any real "
                f"image and they reproduce {float(block['recall']):.0%} of the real variety"
            )
        if aspect == "Autoencoder":
            return ("the autoencoder loses detail of real images "
                    f"(holdout SSIM {float(m['reconstruction']['ssim']):.2f}), which caps "
                    "fidelity and utility")
        if aspect == "Latent scale":
            return ("the latent scale factor was set by its clamp, not measured (its DP release "
                    "was swamped by noise), so the denoiser may have trained on mis-scaled "
                    "latents")
        if aspect == "Diversity":
            return "images within a class are more alike than real ones (mode collapse or copies)"
        if aspect == "Formal privacy (DP)":
            return ("the formal privacy guarantee is missing, a site exceeded its budget or a "
                    "site reported figures the coordinator could not believe")
        if aspect == "Membership inference":
            auc = float(m["privacy"]["mia_auc"])
            if auc <= THRESHOLDS["mia_auc_pass"]:
                return "the DP audit was too noisy to tell whether attackers can spot training "\
                    f"patients (AUC {auc:.2f})"
            return f"an attacker can partly tell training patients from others (AUC {auc:.2f})"
        if aspect == "Memorisation":
            priv = m["privacy"]
            return (
                f"{float(priv['memorized_fraction']):.0%} of audited training images have a "
                "generated near-copy (unseen images: "
                f"{float(priv.get('memorized_fraction_holdout', 0.0)):.0%})"
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
        ("Autoencoder", _verdict_autoencoder(metrics)),
        ("Latent scale", _verdict_latent_scale(metrics)),
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
