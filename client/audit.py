"""Site-side privacy audit of the final model: exact results stay here, one DP release leaves.

Why it works this way (security review): the coordinator used to send images labelled
"synthetic" and receive nearest-neighbour distances, training-set indices and histograms, so it
could send a training image and read "distance 0.0" back; and the membership numbers were
quantised histograms. Now the coordinator sends only the model. The site

1. refuses unless its own node config allows audits (``allow-audit``);
2. charges ONE Gaussian mechanism (``privacy.audit_noise_multiplier``) to its ledger, before
   any private data is read, so a ledger that cannot afford it stops the audit here;
3. scores at most ``m = privacy.audit_records`` members (train split) and ``m`` non-members
   (holdout split), each drawn uniformly without replacement with secret randomness, with the
   shipped attacks (denoiser loss, autoencoder reconstruction loss) and a near-copy test against
   ``privacy.audit_samples`` samples it generates itself from the model;
4. releases only the vector ``ldm_core.evaluation.attacks.AUDIT_RELEASE_KEYS``: counts divided
   by the public ``m`` (never by the true split size, so the size stays private unless read from
   the noisy ``members_fraction``), with Gaussian noise calibrated to the vector's sensitivity
   (derivation: ``ldm_core.evaluation.attacks.audit_sensitivity``);
5. writes exact diagnostics (ROC curves, histograms, closest pairs with indices) for its own
   staff to ``<state_dir>/audits/<run_id>.json`` (mode 0600); they never go into the reply.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import tasks
from client.site_config import SiteConfig
from common import files
from ldm_core.config import RunConfig
from ldm_core.data import SiteData
from ldm_core.dp_random import PrivacyRng
from ldm_core.evaluation.attacks import (
    ATTACKS,
    AUDIT_NOISED_KEYS,
    AUDIT_RELEASE_KEYS,
    NEAR_COPY_RATIO,
    audit_counts,
    audit_sensitivity,
    dp_audit_release,
    exact_roc,
    near_copy_test,
    sample_threshold,
)
from ldm_core.evaluation.features import extract_features, random_feature_extractor
from ldm_core.evaluation.scores import autoencoder_scores, denoiser_scores
from ldm_core.models import resolve_device
from ldm_core.privacy import gaussian_mechanism_entry
from ldm_core.sampling import generate_images
from ldm_core.volumes import display_view

__all__ = ["AUDIT_RELEASE_KEYS", "diagnostics_path", "site_audit"]

NONFINITE_SCORE = 1e300  # what a record whose score overflowed scores (lower = more member-like)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# Closest (record, generated sample) pairs kept in the site-local diagnostics.
N_PAIRS = 8
HIST_BINS = 40


def diagnostics_path(site: SiteConfig, run_id: str) -> Path:
    """Where ``site_audit`` writes the site-local diagnostics of ``run_id``."""
    _check_run_id(run_id)
    return site.state_dir / "audits" / f"{run_id}.json"


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run_id {run_id!r} must be 1-200 characters of letters, digits, '.', "
                         "'_' or '-' (it names the diagnostics file)")


def site_audit(site: SiteConfig, cfg: RunConfig, ae: torch.nn.Module, dm: torch.nn.Module,
               scale_factor: float, *, run_id: str, rng: PrivacyRng, seed: int,
               data: SiteData | None = None) -> dict[str, float]:
    """Audit the final model at this site; return the DP release (keys ``AUDIT_RELEASE_KEYS``).

    ``rng`` supplies every privacy-relevant draw (which records are scored, the generated
    samples, the release noise); ``seed`` only fixes the attack's noise tensors, which are the
    same for every record (``ldm_core.evaluation.scores``), so scores are comparable across
    sites and runs. Raises ``PermissionError`` when the site disallows audits and lets
    ``BudgetExceededError`` through (nothing is loaded then). See the module doc for the steps.

    Sensitivity (full derivation: ``ldm_core.evaluation.attacks.audit_sensitivity``): the noised
    vector is, in counts, per attack ``U_a / m`` (Mann-Whitney pairs), members and non-members
    at or below ``tau_a``; then members and non-members flagged as near-copies, ``|M|`` and
    ``|H|``. A record is a member or a non-member and moves only its own flags, its own pairs
    (at most ``m`` of them, so ``U_a / m`` by at most 1) and its split's size: ``2A + 2``
    coordinates by at most 1 each, so ``Delta = sqrt(2A + 2)`` (``sqrt(6)`` for A = 2 attacks).
    Thresholds and generated samples do not depend on the records; subsampling to ``m`` with
    secret randomness turns one addition into at most one replacement, which moves no more.
    Each count gets ``N(0, (sigma * Delta)^2)`` noise, one ``gaussian_mechanism_entry(sigma)``;
    the released fractions therefore carry noise of std ``sigma * Delta / m`` (``noise_std``).
    """
    if not site.allow_audit:
        raise PermissionError(f"site {site.site_id} does not allow audits (node config "
                              "allow-audit=false); set allow-audit=true at the site to permit one")
    _check_run_id(run_id)
    tasks.check_permitted(site, cfg)
    if data is None:  # before the charge: a mismatched site pays nothing
        tasks.check_data_kind(site, cfg)
    sigma = float(cfg.privacy.audit_noise_multiplier)
    # Charge first: a crash after this line over-counts, never under-counts; a budget that
    # cannot afford the release stops us before any private record is read.
    ledger = tasks.open_ledger(site)
    epsilon = ledger.charge([gaussian_mechanism_entry(sigma)], run_id=run_id, phase="audit",
                            round=0)

    # `data` lets a caller that already holds this site's splits (the simulation's evaluation)
    # skip a second read; it is only touched after the charge either way.
    data = tasks.load_data(site, cfg) if data is None else data
    tasks.check_classes(site, cfg, data)
    m = int(cfg.privacy.audit_records)
    device = resolve_device(site.device)
    ae, dm = ae.to(device).eval(), dm.to(device).eval()
    pick = rng.generator()
    mem_idx = _subsample(data.train.images.shape[0], m, pick)
    non_idx = _subsample(data.holdout.images.shape[0], m, pick)
    # Records as the autoencoder reads them (with the mask channel of a paired model): the
    # attacks score what the model was trained on.
    sets = {
        "members": (data.train.model_input(mem_idx), data.train.labels[mem_idx]),
        "nonmembers": (data.holdout.model_input(non_idx), data.holdout.labels[non_idx]),
    }
    n_samples = int(cfg.privacy.audit_samples)
    sample_labels = torch.arange(n_samples) % cfg.model.n_classes
    sample_images = generate_images(
        ae, dm, cfg.model, sample_labels, scale_factor=scale_factor, steps=cfg.dm.ddim_steps,
        guidance_scale=cfg.dm.guidance_scale, seed=rng.next_seed(), device=device,
        clip=cfg.dm.clip_latent, all_channels=True)
    sets["samples"] = (sample_images, sample_labels)

    scores: dict[str, dict[str, np.ndarray]] = {a: {} for a in ATTACKS}
    for name, (x, y) in sets.items():
        scores["denoiser"][name] = denoiser_scores(
            ae, dm, cfg.model, x, y, scale_factor=scale_factor, seed=seed).numpy()
        scores["autoencoder"][name] = autoencoder_scores(ae, x).numpy()
        if name == "samples":
            continue
        # A record whose score overflowed gets a fixed public score instead of failing the
        # audit: an error reply would tell the model's author, without noise, that it happened.
        for a in ATTACKS:
            scores[a][name] = np.nan_to_num(scores[a][name], nan=NONFINITE_SCORE,
                                            posinf=NONFINITE_SCORE, neginf=-NONFINITE_SCORE)
    taus = {a: sample_threshold(scores[a]["samples"]) for a in ATTACKS}

    extractor = random_feature_extractor(seed=0, spatial_dims=cfg.model.spatial_dims).to(device)
    feats = {name: _features(extractor, x) for name, (x, _) in sets.items()}
    near = {name: near_copy_test(feats[name], feats["samples"])
            for name in ("members", "nonmembers")}

    counts = audit_counts(
        records=m,
        member_scores={a: scores[a]["members"] for a in ATTACKS},
        nonmember_scores={a: scores[a]["nonmembers"] for a in ATTACKS},
        thresholds=taus,
        member_near_copy=near["members"]["flags"],
        nonmember_near_copy=near["nonmembers"]["flags"],
    )
    release = dp_audit_release(counts, records=m, noise_multiplier=sigma,
                               generator=rng.generator(), epsilon=epsilon)
    _write_private(diagnostics_path(site, run_id), json.dumps(_diagnostics(
        site=site, run_id=run_id, rng=rng, sigma=sigma, data_sizes=(
            data.train.images.shape[0], data.holdout.images.shape[0]),
        mem_idx=mem_idx, counts=counts, release=release, scores=scores, taus=taus, near=near,
        sample_images=sample_images), indent=1))
    return {k: float(release[k]) for k in AUDIT_RELEASE_KEYS}


def _subsample(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``m`` of ``range(n)`` uniformly without replacement (all when ``n <= m``), sorted."""
    if n <= m:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=generator)[:m]).values


def _features(extractor: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    if images.shape[0] == 0:
        return np.zeros((0, int(getattr(extractor, "out_dim", 1))))
    return extract_features(extractor, images[:, :1])  # near copies: the image channel


def _histogram(scores: dict[str, np.ndarray]) -> dict[str, list[float] | list[int]]:
    """Exact scores binned on one grid per attack (site-local diagnostics only)."""
    allv = np.concatenate([v for v in scores.values() if v.size]) if any(
        v.size for v in scores.values()) else np.zeros(1)
    edges = np.histogram_bin_edges(allv, bins=HIST_BINS)
    out: dict[str, list[float] | list[int]] = {"edges": edges.tolist()}
    for name, v in scores.items():
        out[name] = np.histogram(v, bins=edges)[0].astype(int).tolist()
    return out


def _diagnostics(*, site: SiteConfig, run_id: str, rng: PrivacyRng, sigma: float,
                 data_sizes: tuple[int, int], mem_idx: torch.Tensor, counts: np.ndarray,
                 release: dict[str, float], scores: dict[str, dict[str, np.ndarray]],
                 taus: dict[str, float], near: dict[str, dict[str, np.ndarray]],
                 sample_images: torch.Tensor) -> dict[str, Any]:
    """Everything the site's staff may want to inspect; stays in the site's state folder."""
    m = int(release["records"])
    attacks: dict[str, Any] = {}
    for a in ATTACKS:
        s = scores[a]
        roc = (exact_roc(s["members"], s["nonmembers"])
               if s["members"].size and s["nonmembers"].size else None)
        attacks[a] = {"threshold": taus[a], "roc": roc, "histogram": _histogram(s),
                      "samples_below_threshold": float((s["samples"] <= taus[a]).mean())}
    nm = near["members"]
    order = np.argsort(nm["d1"], kind="stable")[:N_PAIRS]
    # Volumes: their three orthogonal mid slices (the figure's view), not 32^3 numbers a pair.
    pixels = ((display_view(sample_images).clamp(-1, 1) + 1) * 127.5).round().to(
        torch.uint8)[:, 0].numpy()
    pairs = [{"train_index": int(mem_idx[i]), "sample_index": int(nm["nearest"][i]),
              "distance": float(nm["d1"][i]), "second_distance": float(nm["d2"][i]),
              "near_copy": bool(nm["flags"][i]),
              "sample_uint8": pixels[int(nm["nearest"][i])].tolist()} for i in order]
    return {
        "note": "SITE-LOCAL diagnostics: exact values computed from private records. Never send "
                "this file to the coordinator; only the noised 'released' values left the site.",
        "site_id": site.site_id,
        "run_id": run_id,
        "time": time.time(),
        "privacy_rng": rng.mode,
        "records_m": m,
        "train_size": int(data_sizes[0]),
        "holdout_size": int(data_sizes[1]),
        "noise_multiplier": sigma,
        "sensitivity": audit_sensitivity(),
        "noise_std": release["noise_std"],
        "exact": {k: float(v) / m for k, v in zip(AUDIT_NOISED_KEYS, counts, strict=True)},
        "released": release,
        "attacks": attacks,
        "near_copy": {
            "ratio_threshold": NEAR_COPY_RATIO,
            "members_flagged": int(nm["flags"].sum()),
            "nonmembers_flagged": int(near["nonmembers"]["flags"].sum()),
            "closest_pairs": pairs,
        },
    }


def _write_private(path: Path, text: str) -> None:
    """Atomic write readable by the owner only (0600): a crash leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    files.write_text_atomic(path, text, mode=0o600)
