"""The audit step of the evaluation: the sites' DP audit releases, summarised, and (simulation
only) the figures drawn from the sites' local diagnostics files.

Everything here is post-processing of what the sites released (free in privacy), except the
site-local figures, which a simulation may draw because all sites run on this machine (the
figures say so).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ldm_core.config import RunConfig
from ldm_core.evaluation import ATTACKS, AUDIT_RELEASE_KEYS, audit_estimates
from ldm_core.volumes import display_view
from server import report
from server.real_data import SimulatedSites
from server.run_metrics import AuditSummary, PrivacyBlock

__all__ = ["SITE_LOCAL_NOTE", "AuditFn", "add_audit_epsilon", "clear_stale_audit",
           "site_local_figures", "summarise_audits"]

# Asks every site for its audit of the final model; one dict per site: {"site": id, **release}
# with the release keys of ldm_core.evaluation.attacks.AUDIT_RELEASE_KEYS.
AuditFn = Callable[[], list[dict[str, Any]]]
# Values of an old, non-DP audit: dropped before each evaluation so that none is ever shown as
# this evaluation's (the current audit keys are dropped by resetting PrivacyBlock.audit).
_STALE_PRIVACY_KEYS = ("memorized_fraction_pixel", "mia_tpr_at_0_1pct_fpr")
_STALE_BLOCKS = ("mia", "nn_audit", "nn_audit_pixel", "audit_sites")
SITE_LOCAL_NOTE = ("site-local diagnostics, visible here only because all sites run on this "
                   "machine")


def clear_stale_audit(metrics: dict[str, Any], privacy: PrivacyBlock) -> None:
    """Forget every earlier audit value, so a failed or skipped audit never shows old ones."""
    privacy.audit = AuditSummary()
    for key in _STALE_PRIVACY_KEYS:
        privacy.extra.pop(key, None)
    for key in _STALE_BLOCKS:
        metrics.pop(key, None)


def summarise_audits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json `privacy` values from the sites' DP audit releases (post-processing only).

    `mia_auc` / `mia_tpr_at_1pct_fpr` / `mia_fpr_at_threshold`: means over sites of the best
    attack's (highest DP AUC, per site) values; the TPR and FPR are at the site's data-independent
    threshold (1 % of its own generated samples score below it), so the FPR is near, not at, 1 %.
    `mia_noise_std`: the largest per-site noise std of a released fraction. `memorized_fraction`
    / `memorized_fraction_holdout`: mean DP near-copy fractions of training (members) and unseen
    holdout records (the chance level). `audit_sites`: per site, per attack.
    Decode with :meth:`server.run_metrics.AuditSummary.from_json`.
    """
    if not results:
        raise ValueError("no audit results: every site refused or failed the audit")
    per_site: dict[str, Any] = {}
    for r in results:
        if "site" not in r:
            raise ValueError("an audit result has no 'site' key; the coordinator must tag each "
                             "site's release with {'site': site_id, ...}")
        est = audit_estimates(r)
        per_site[str(r["site"])] = {
            **est,
            "released": {k: float(r[k]) for k in AUDIT_RELEASE_KEYS},
        }
    sites = list(per_site.values())

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    return {
        "mia_auc": mean([s["attacks"][s["best_attack"]]["auc"] for s in sites]),
        "mia_tpr_at_1pct_fpr": mean([s["attacks"][s["best_attack"]]["tpr"] for s in sites]),
        "mia_fpr_at_threshold": mean([s["attacks"][s["best_attack"]]["fpr"] for s in sites]),
        "mia_noise_std": max(s["noise_std"] for s in sites),
        "memorized_fraction": mean([s["near_copy_fraction"] for s in sites]),
        "memorized_fraction_holdout": mean([s["near_copy_fraction_holdout"] for s in sites]),
        "audit_attacks": list(ATTACKS),
        "audit_sites": per_site,
    }


def add_audit_epsilon(privacy: PrivacyBlock, results: Sequence[dict[str, Any]], *,
                      release: str = "audit") -> None:
    """A release after training ("audit" or "evaluation") is charged to each site's ledger:
    show the epsilon after it, and say which release it includes."""
    if privacy.sites is None:
        return
    for r in results:
        site = str(r.get("site"))
        entry = privacy.sites.get(site)
        if entry is not None and isinstance(r.get("epsilon"), (int, float)):
            flag = ({"epsilon_includes_evaluation": True} if release == "evaluation"
                    else {"epsilon_includes_audit": True})
            privacy.sites[site] = replace(
                entry, epsilon=max(entry.epsilon or 0.0, float(r["epsilon"])), **flag)


def site_local_figures(sites: SimulatedSites, cfg: RunConfig, run_id: str | None, *,
                       since: float) -> dict[str, Any]:
    """Simulation only: ROC, score histograms and closest pairs from the sites' local files."""
    diags = _local_diagnostics(sites, run_id, since=since)
    if not diags:
        return {}
    attacks = {s: d["attacks"] for s, d in diags.items()}
    figures = {"roc": report.roc_figure(attacks, note=SITE_LOCAL_NOTE),
               "score_histograms": report.score_histogram_figure(attacks, note=SITE_LOCAL_NOTE)}
    pairs = _closest_pairs(diags, sites, cfg)
    if pairs is not None:
        figures["closest_pairs"] = pairs
    return figures


def _local_diagnostics(sites: SimulatedSites, run_id: str | None, *, since: float
                       ) -> dict[str, dict[str, Any]]:
    """Each site's local audit diagnostics file, read straight from its folder.

    With `run_id` the file of that audit; otherwise the newest one written since `since` (a file
    left by an older audit is never shown as this one's).
    """
    out: dict[str, dict[str, Any]] = {}
    for k in range(sites.n_sites):
        site = sites.site(k)
        folder = Path(site.state_dir) / "audits"
        if run_id is not None:
            path = folder / f"{run_id}.json"
            candidates = [path] if path.is_file() else []
        else:
            candidates = sorted((p for p in folder.glob("*.json")
                                 if p.stat().st_mtime >= since - 1.0),
                                key=lambda p: p.stat().st_mtime)
        if candidates:
            out[site.site_id] = {**json.loads(candidates[-1].read_text()), "_index": k}
    return out


def _closest_pairs(diags: dict[str, dict[str, Any]], sites: SimulatedSites, cfg: RunConfig
                   ) -> Any:
    """Closest (generated, training) pairs; the training images come from the data the
    evaluation already loaded (SimulatedSites keeps it), not from a second read."""
    pairs, dists = [], []
    for d in diags.values():
        found = (d.get("near_copy") or {}).get("closest_pairs") or []
        if not found:
            continue
        train = sites.site_data(int(d["_index"]), cfg).train.images
        for p in found[:4]:
            sample = np.asarray(p["sample_uint8"], dtype=np.float64) / 127.5 - 1.0
            pairs.append((sample, display_view(train[int(p["train_index"])][None])[0, 0].numpy()))
            dists.append(float(p["distance"]))
    if not pairs:
        return None
    order = np.argsort(dists)[:8]
    return report.closest_pairs_figure([pairs[i] for i in order], [dists[i] for i in order],
                                       title=f"closest (generated, training) pairs; "
                                             f"{SITE_LOCAL_NOTE}")
