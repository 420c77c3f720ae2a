"""The plain-language parts of an evaluation: what was disclosed, the DP unit, the run table.

Kept apart from the numeric steps because this wording is reviewed on its own (ethics boards
read it): every value computed from private data and released is listed with its accounting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_core.config import RunConfig
from server.datacard import code_note, init_note
from server.run_metrics import RoundRecord

__all__ = ["PRIVACY_RANDOMNESS_SECURE", "disclosures", "privacy_unit", "run_table"]

PRIVACY_RANDOMNESS_SECURE = (
    "secure: each site draws Poisson sampling and DP noise from its own OS entropy; the run's "
    "seed drives only initialisation, timesteps and evaluation")


def privacy_unit(meta: dict[str, Any]) -> str:
    """The unit the DP guarantee protects; deployments hold patient ids only where sites do."""
    if meta.get("has_patient_ids", True):
        return "patient (all of a patient's images together)"
    return ("image: the data has no patient ids, so each image was treated as its own patient; "
            "several images of one patient get a weaker, group-privacy guarantee")


def disclosures(cfg: RunConfig, *, audited: bool, meta: dict[str, Any] | None = None,
                evaluated: bool = False) -> list[str]:
    meta = meta or {}
    randomness = meta.get("privacy_randomness", PRIVACY_RANDOMNESS_SECURE)
    out = [
        "Model weights: released after DP-SGD (Opacus, Poisson sampling), charged to each "
        "site's ledger before training.",
        "Training-curve losses: one DP Gaussian-mechanism release per site and round "
        "(clipped per-patient loss), charged to the ledger." if cfg.privacy.private else
        "Training-curve losses: released without noise (non-private run).",
        "Latent scale factor: DP Gaussian mechanism on clipped per-patient latent second "
        "moments, charged to the ledger.",
        "Autoencoder reconstruction quality: DP Gaussian mechanism on the holdout patients' "
        "clipped per-patient PSNR and SSIM, charged to the ledger as a release of its own.",
        "Dataset sizes and class counts: not released; FedAvg weights sites equally and the "
        "synthetic set is class-balanced by design.",
        f"DP unit: {privacy_unit(meta)}.",
        f"Privacy randomness: {randomness}.",
    ]
    if audited:
        out.append(
            "Privacy audit: one DP Gaussian-mechanism release per site (per attack: AUC "
            "statistic, TPR and FPR at a threshold set on the site's own generated samples; "
            "near-copy fractions; split sizes, all over a public record count), charged to each "
            "site's ledger (phase 'audit') before the site reads its data. The coordinator sends "
            "only the model; indices, distances, curves and exact values stay in the site's "
            "local diagnostics file. A site can refuse audits with allow-audit=false.")
    if evaluated:
        out.append(
            "Evaluation at the sites: per site, the DP-SGD steps of its own TRTR classifier and "
            "one DP Gaussian-mechanism release of counts over its test patients (score "
            "histograms and confusion matrices of the synthetic-trained and the site-trained "
            "classifier, recall in a fixed feature space), charged to each site's ledger "
            "(phase 'evaluate') before the site reads its data. A site can refuse with "
            "allow-evaluate=false.")
    return out


def run_table(metrics: dict[str, Any], cfg: RunConfig, out: Path) -> dict[str, Any]:
    """metrics.json `run`: the settings table at the top of the report."""
    meta = metrics.get("meta", {})
    rounds = [RoundRecord.from_json(r) for r in metrics.get("rounds", [])]
    return {
        "name": out.name, "preset": cfg.preset, "image size": cfg.model.image_size,
        "classes": ", ".join(cfg.class_names), "sites": meta.get("sites_connected", "?"),
        "data": meta.get("data", "?"), "partition": meta.get("partition", "?"),
        "autoencoder rounds": sum(1 for r in rounds if r.phase == "autoencoder"),
        "diffusion rounds": sum(1 for r in rounds if r.phase == "diffusion"),
        "requested epsilon": "inf (NOT private)" if not cfg.privacy.private
        else cfg.privacy.epsilon,
        "delta": cfg.privacy.delta, "latent scale factor":
            (metrics.get("latent_scale") or {}).get("scale_factor"),
        "patient ids": meta.get("patient_note") or "yes",
        "autoencoder start": init_note(cfg.ae_init, paired=cfg.model.mask_channels > 0,
                                       trained=cfg.autoencoder.rounds > 0),
        "denoiser start": init_note(cfg.dm_init, trained=cfg.diffusion.rounds > 0),
        "code": code_note(meta),
    }
