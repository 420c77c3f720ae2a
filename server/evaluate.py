"""Coordinator-side evaluation of a finished run: synthetic export, fidelity, utility, privacy.

Where each number is computed:
- synthetic set: at the coordinator, from the global generator (class-balanced, no private input);
- privacy audits (membership inference, near copies): at each site, same function whether the
  request comes over Flower (`query` message, task "audit") or, for `fedldm evaluate` on a
  simulated run, by a direct call (client.audit.site_audit). The coordinator sends only the
  model; each site generates its own samples, charges one Gaussian mechanism to its ledger and
  returns a fixed vector of noised fractions (ldm_core.evaluation.attacks.AUDIT_RELEASE_KEYS).
  Exact curves and closest pairs stay in the site's local diagnostics file; in a simulation, where
  all sites run on this machine, the report may read those files (and says so on the figures);
- fidelity and utility need real images at the coordinator: in simulation the coordinator may
  load the sites' data (it is all on one machine); in deployment only a `--reference` set held
  by the coordinator is used, and without one these sections say "not measured".
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm_core.config import RunConfig
from ldm_core.data import load_images, scan, split_by_patient
from ldm_core.evaluation import (
    ATTACKS,
    AUDIT_RELEASE_KEYS,
    audit_estimates,
    evaluate_utility,
    feature_spaces,
    fidelity_report,
    train_reference_classifier,
)
from ldm_core.models import resolve_device
from ldm_core.sampling import generate_images
from server import report
from server.datacard import INIT_NOTES, write_datacard
from server.federation import load_final
from server.run_folder import RunFolder

# Asks every site for its audit of the final model; one dict per site: {"site": id, **release}
# with the release keys of ldm_core.evaluation.attacks.AUDIT_RELEASE_KEYS.
AuditFn = Callable[[], list[dict[str, Any]]]
# metrics.json audit values: dropped before each evaluation so that none of a previous audit (or
# of the old, non-DP audit: the last two) is ever shown as this evaluation's.
_STALE_PRIVACY_KEYS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_fpr_at_threshold", "mia_noise_std",
                       "memorized_fraction", "memorized_fraction_holdout", "audit_attacks",
                       "audit_sites", "memorized_fraction_pixel", "mia_tpr_at_0_1pct_fpr")
_STALE_BLOCKS = ("mia", "nn_audit", "nn_audit_pixel", "audit_sites")
SITE_LOCAL_NOTE = ("site-local diagnostics, visible here only because all sites run on this "
                   "machine")


@dataclass(frozen=True)
class EvalOptions:
    per_class: int | None = None
    # Default synthetic size: the largest real class, capped (sampling is the slow part on
    # CPUs; TSTR resamples the synthetic set to the real training counts anyway).
    per_class_cap: int = 300
    # Real training images used per utility arm and for fidelity (a seeded, class-stratified
    # subsample of what the generator saw): keeps the evaluation to minutes on a CPU.
    max_real_train: int = 1000
    utility_seeds: tuple[int, ...] = (0, 1, 2)
    utility_epochs: int = 12
    ddim_steps: int | None = None
    guidance_scale: float | None = None
    reference: Path | None = None


@dataclass(frozen=True)
class RealSets:
    """Real images visible to the coordinator's evaluation (train = what the generator saw)."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]
    source: str


def generate_synthetic(cfg: RunConfig, ae: torch.nn.Module, dm: torch.nn.Module, scale: float,
                       per_class: int, *, seed: int, device: torch.device, steps: int,
                       guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(cfg.model.n_classes).repeat_interleave(per_class)
    images = generate_images(ae, dm, cfg.model, labels, scale_factor=scale, steps=steps,
                             guidance_scale=guidance, seed=seed + 10_000, device=device,
                             show_progress=True, clip=cfg.dm.clip_latent)
    return images, labels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


def export_synthetic(folder: Path, images: torch.Tensor, labels: torch.Tensor,
                     class_names: Sequence[str]) -> Path:
    """PNG per image under <class>/ plus manifest.csv (path,label) - the same layout fedldm
    reads, so the synthetic set can be fed straight back into `fedldm` or any loader."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    rows = []
    for i, (img, y) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        name = class_names[y]
        (folder / name).mkdir(exist_ok=True)
        rel = f"{name}/syn_{i:06d}.png"
        Image.fromarray(img, mode="L").save(folder / rel)
        rows.append((rel, name))
    tmp = folder / ".manifest.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    tmp.replace(folder / "manifest.csv")
    return folder / "manifest.csv"


def real_from_sites(sites: Any, n_sites: int, cfg: RunConfig) -> RealSets:
    from client.tasks import load_data

    parts = [load_data(sites.site(k), cfg) for k in range(n_sites)]
    train = (torch.cat([p.train.images for p in parts]), torch.cat([p.train.labels for p in parts]))
    test = (torch.cat([p.test.images for p in parts]), torch.cat([p.test.labels for p in parts]),
            tuple(f"{p.site_id}/{q}" for p in parts for q in p.test.patients))
    return RealSets(train, test, "union of the simulated sites' train and test splits")


def real_from_reference(path: Path, cfg: RunConfig) -> RealSets:
    index = scan(path)
    if tuple(index.class_names) != tuple(cfg.class_names):
        raise ValueError(f"reference set {path} has classes {list(index.class_names)}, the run "
                         f"has {list(cfg.class_names)}")
    splits = split_by_patient(index.records, holdout_fraction=0.0, test_fraction=0.3, seed=0) \
        if not any(r.split for r in index.records) else \
        split_by_patient(index.records, holdout_fraction=0.0, seed=0)
    tr = load_images(splits["train"], cfg.model.image_size)
    te = load_images(splits["test"], cfg.model.image_size)
    patients = tuple(str(r.patient or r.path) for r in splits["test"])
    return RealSets(tr, (te[0], te[1], patients), f"coordinator reference set {path}")


def evaluate_run(out: Path, *, sites: Any = None, n_sites: int = 0,
                 audit: AuditFn | None = None, options: EvalOptions | None = None,
                 show_progress: bool = True, audit_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate the final generator in `out`; updates metrics.json, writes report.html.

    `audit_run_id` names the run id the sites' audit used; in a simulation (`sites` given) the
    report then reads `<site state>/audits/<audit_run_id>.json` for the exact ROC and closest
    pairs. Without it, the newest diagnostics file written during this evaluation is used.
    """
    opts = options or EvalOptions()
    folder = RunFolder(out)
    log = folder.logger()
    t0 = time.monotonic()
    cfg, ae, dm, scale = load_final(out)
    device = resolve_device(cfg.device)
    metrics = folder.load_metrics()
    say = _say(show_progress, log)

    real = None
    if opts.reference is not None:
        real = real_from_reference(opts.reference, cfg)
    elif sites is not None:
        real = real_from_sites(sites, n_sites, cfg)
    if real is not None:
        real = _subsample(real, opts.max_real_train, seed=cfg.seed)
    per_class = opts.per_class or min(opts.per_class_cap, (
        int(torch.bincount(real.train[1], minlength=cfg.model.n_classes).max())
        if real is not None else opts.per_class_cap))
    steps = opts.ddim_steps or cfg.dm.ddim_steps
    guidance = cfg.dm.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
    say(f"generating {per_class * cfg.model.n_classes} synthetic images ({steps} DDIM steps, "
        f"guidance {guidance})")
    syn_x, syn_y = generate_synthetic(cfg, ae, dm, scale, per_class, seed=cfg.seed, device=device,
                                      steps=steps, guidance=guidance)
    export_synthetic(out / "synthetic", syn_x, syn_y, cfg.class_names)
    figures: dict[str, Any] = {}
    ev: dict[str, Any] = {"synthetic": {"n": int(syn_x.shape[0]), "per_class": per_class,
                                        "ddim_steps": steps, "guidance_scale": guidance}}

    if real is not None:
        say(f"utility: TRTR / TSTR / TRS over seeds {list(opts.utility_seeds)} "
            f"({opts.utility_epochs} epochs each)")
        ref_clf = train_reference_classifier(real.train, n_classes=cfg.model.n_classes,
                                             seed=opts.utility_seeds[0],
                                             epochs=opts.utility_epochs, device=device)
        ev["utility"] = evaluate_utility(real.train, (syn_x, syn_y), real.test,
                                         n_classes=cfg.model.n_classes,
                                         seeds=opts.utility_seeds, epochs=opts.utility_epochs,
                                         device=device, reference_model=ref_clf)
        ev["utility"]["real_source"] = real.source
        say("fidelity: FID/KID, precision/recall, density/coverage, SSIM diversity")
        fid = fidelity_report(real.train[0], real.train[1], syn_x, syn_y,
                              extractors=feature_spaces(seed=0, classifier=ref_clf), seed=cfg.seed)
        primary = fid["random_cnn"]
        fid.update({k: primary[k] for k in ("fid", "kid", "precision", "recall", "density",
                                            "coverage")})
        fid["primary_space"] = ("random_cnn: a fixed, seeded random-init CNN (no download); "
                                "'classifier' = penultimate layer of the TRTR classifier")
        ev["fidelity"] = fid
        figures["samples"] = _real_vs_synthetic(real.train, (syn_x, syn_y), cfg.class_names)
        figures["utility"] = report.utility_bars_figure(ev["utility"])
    else:
        figures["samples"] = report.image_grid_figure(_by_class(syn_x, syn_y, cfg.class_names),
                                                      "synthetic")
        ev["utility_note"] = ev["fidelity_note"] = (
            "not measured: the coordinator holds no real images (pass --reference PATH)")

    privacy = metrics.setdefault("privacy", {})
    for key in _STALE_PRIVACY_KEYS:
        privacy.pop(key, None)
    for key in _STALE_BLOCKS:
        metrics.pop(key, None)
    if audit is not None:
        say("privacy audits at the sites (one DP release each: membership inference, near "
            "copies)")
        started = time.time()
        results = audit()
        if results:
            privacy.update(summarise_audits(results))
            _add_audit_epsilon(privacy, results)
            if sites is not None:
                diags = _local_diagnostics(sites, n_sites, audit_run_id, since=started)
                if diags:
                    figures["roc"] = report.roc_figure(
                        {s: d["attacks"] for s, d in diags.items()}, note=SITE_LOCAL_NOTE)
                    figures["score_histograms"] = report.score_histogram_figure(
                        {s: d["attacks"] for s, d in diags.items()}, note=SITE_LOCAL_NOTE)
                    pairs = _closest_pairs(diags, sites, cfg)
                    if pairs is not None:
                        figures["closest_pairs"] = pairs
    privacy["disclosures"] = _disclosures(cfg, audited=audit is not None,
                                          meta=metrics.get("meta", {}))
    privacy["unit"] = _privacy_unit(metrics.get("meta", {}))
    privacy["randomness"] = metrics.get("meta", {}).get("privacy_randomness",
                                                        PRIVACY_RANDOMNESS_SECURE)
    metrics.update(ev)
    metrics["evaluation_seconds"] = round(time.monotonic() - t0, 1)
    metrics["run"] = _run_table(metrics, cfg, out)
    figures["training_curves"] = report.training_curves_figure(metrics.get("training", []))
    figures["epsilon"] = report.epsilon_figure(privacy.get("rounds", []),
                                               budget=_budget(privacy))
    folder.save_metrics(metrics)
    report.write_report(out, metrics, figures)
    write_datacard(out / "synthetic" / "DATACARD.md", metrics, cfg)
    say(f"evaluation done in {metrics['evaluation_seconds']:.0f}s")
    return metrics


def _subsample(real: RealSets, cap: int, *, seed: int) -> RealSets:
    """At most `cap` training images, same class proportions, chosen with a fixed seed."""
    x, y = real.train
    if x.shape[0] <= cap:
        return real
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c)[:, 0]
        k = max(1, round(cap * idx.numel() / y.numel()))
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    sel = torch.sort(torch.cat(keep)).values
    return RealSets((x[sel], y[sel]), real.test,
                    f"{real.source} (a class-stratified subsample of {sel.numel()} of "
                    f"{x.shape[0]} training images)")


def _say(show: bool, log: Any) -> Callable[[str], None]:
    def say(msg: str) -> None:
        log.info(msg)
        if show:
            print(f"[evaluate] {msg}", flush=True)

    return say


def _budget(privacy: dict[str, Any]) -> float | None:
    budgets = [s.get("budget_epsilon") for s in privacy.get("sites", {}).values()]
    budgets = [b for b in budgets if isinstance(b, (int, float)) and math.isfinite(b)]
    return min(budgets) if budgets else None


def _by_class(x: torch.Tensor, y: torch.Tensor, names: Sequence[str], k: int = 8
              ) -> dict[str, np.ndarray]:
    return {n: x[y == c][:k].numpy() for c, n in enumerate(names)}


def _real_vs_synthetic(real: tuple[torch.Tensor, torch.Tensor],
                       syn: tuple[torch.Tensor, torch.Tensor], names: Sequence[str]) -> Any:
    rows: dict[str, np.ndarray] = {}
    for c, n in enumerate(names):
        rows[f"{n} (real)"] = real[0][real[1] == c][:8].numpy()
        rows[f"{n} (synthetic)"] = syn[0][syn[1] == c][:8].numpy()
    return report.image_grid_figure(rows, "real (top) vs synthetic (bottom), per class")


def summarise_audits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json `privacy` values from the sites' DP audit releases (post-processing only).

    `mia_auc` / `mia_tpr_at_1pct_fpr` / `mia_fpr_at_threshold`: means over sites of the best
    attack's (highest DP AUC, per site) values; the TPR and FPR are at the site's data-independent
    threshold (1 % of its own generated samples score below it), so the FPR is near, not at, 1 %.
    `mia_noise_std`: the largest per-site noise std of a released fraction. `memorized_fraction`
    / `memorized_fraction_holdout`: mean DP near-copy fractions of training (members) and unseen
    holdout records (the chance level). `audit_sites`: per site, per attack.
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


def _add_audit_epsilon(privacy: dict[str, Any], results: Sequence[dict[str, Any]]) -> None:
    """The audit release is charged to each site's ledger: show the epsilon after it."""
    table = privacy.get("sites")
    if not isinstance(table, dict):
        return
    for r in results:
        entry = table.get(str(r.get("site")))
        if isinstance(entry, dict) and isinstance(r.get("epsilon"), (int, float)):
            entry["epsilon"] = max(float(entry.get("epsilon", 0.0)), float(r["epsilon"]))
            entry["epsilon_includes_audit"] = True


def _local_diagnostics(sites: Any, n_sites: int, run_id: str | None, *, since: float
                       ) -> dict[str, dict[str, Any]]:
    """Simulation only: each site's local audit diagnostics file, read straight from its folder.

    With `run_id` the file of that audit; otherwise the newest one written since `since` (a file
    left by an older audit is never shown as this one's).
    """
    out: dict[str, dict[str, Any]] = {}
    for k in range(n_sites):
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


def _closest_pairs(diags: dict[str, dict[str, Any]], sites: Any, cfg: RunConfig) -> Any:
    """Simulation only: closest (generated, training) pairs from the sites' local files."""
    from client.tasks import load_data

    pairs, dists = [], []
    for d in diags.values():
        found = (d.get("near_copy") or {}).get("closest_pairs") or []
        if not found:
            continue
        train = load_data(sites.site(int(d["_index"])), cfg).train.images
        for p in found[:4]:
            sample = np.asarray(p["sample_uint8"], dtype=np.float64) / 127.5 - 1.0
            pairs.append((sample, train[int(p["train_index"]), 0].numpy()))
            dists.append(float(p["distance"]))
    if not pairs:
        return None
    order = np.argsort(dists)[:8]
    return report.closest_pairs_figure([pairs[i] for i in order], [dists[i] for i in order],
                                       title=f"closest (generated, training) pairs; "
                                             f"{SITE_LOCAL_NOTE}")


PRIVACY_RANDOMNESS_SECURE = (
    "secure: each site draws Poisson sampling and DP noise from its own OS entropy; the run's "
    "seed drives only initialisation, timesteps and evaluation")


def _privacy_unit(meta: dict[str, Any]) -> str:
    """The unit the DP guarantee protects; deployments hold patient ids only where sites do."""
    if meta.get("has_patient_ids", True):
        return "patient (all of a patient's images together)"
    return ("image: the data has no patient ids, so each image was treated as its own patient; "
            "several images of one patient get a weaker, group-privacy guarantee")


def _disclosures(cfg: RunConfig, *, audited: bool, meta: dict[str, Any] | None = None
                 ) -> list[str]:
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
        "Dataset sizes and class counts: not released; FedAvg weights sites equally and the "
        "synthetic set is class-balanced by design.",
        f"DP unit: {_privacy_unit(meta)}.",
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
    return out


def _run_table(metrics: dict[str, Any], cfg: RunConfig, out: Path) -> dict[str, Any]:
    meta = metrics.get("meta", {})
    rounds = metrics.get("rounds", [])
    return {
        "name": out.name, "preset": cfg.preset, "image size": cfg.model.image_size,
        "classes": ", ".join(cfg.class_names), "sites": meta.get("sites_connected", "?"),
        "data": meta.get("data", "?"), "partition": meta.get("partition", "?"),
        "autoencoder rounds": sum(1 for r in rounds if r["phase"] == "autoencoder"),
        "diffusion rounds": sum(1 for r in rounds if r["phase"] == "diffusion"),
        "requested epsilon": "inf (NOT private)" if not cfg.privacy.private
        else cfg.privacy.epsilon,
        "delta": cfg.privacy.delta, "latent scale factor":
            (metrics.get("latent_scale") or {}).get("scale_factor"),
        "patient ids": meta.get("patient_note") or "yes",
        "autoencoder start": INIT_NOTES[cfg.ae_init],
        "denoiser start": INIT_NOTES[cfg.dm_init],
    }


