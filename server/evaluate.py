"""Coordinator-side evaluation of a finished run: synthetic export, fidelity, utility, privacy.

Where each number is computed:
- synthetic set: at the coordinator, from the global generator (class-balanced, no private input);
- privacy audits (membership inference, memorisation): at each site, same function whether the
  request comes over Flower (`query` message, task "audit") or, for `fedldm evaluate` on a
  simulated run, by a direct call; only aggregates come back;
- fidelity and utility need real images at the coordinator: in simulation the coordinator may
  load the sites' data (it is all on one machine); in deployment only a `--reference` set held
  by the coordinator is used, and without one these sections say "not measured".
"""

from __future__ import annotations

import csv
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
    evaluate_utility,
    feature_spaces,
    fidelity_report,
    merge_mia,
    merge_nn_audits,
    train_reference_classifier,
)
from ldm_core.models import resolve_device
from ldm_core.sampling import generate_images
from server import report
from server.datacard import INIT_NOTES, write_datacard
from server.federation import load_final
from server.run_folder import RunFolder

AuditFn = Callable[[torch.Tensor], list[dict[str, Any]]]


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
                 show_progress: bool = True) -> dict[str, Any]:
    """Evaluate the final generator in `out`; updates metrics.json, writes report.html."""
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
    if audit is not None:
        say("privacy audits at the sites (membership inference, nearest neighbours)")
        results = audit(syn_x)
        if results:
            mia = merge_mia([r["mia"] for r in results])
            nn = merge_nn_audits([r["nn_audit"] for r in results])
            nn_pix = merge_nn_audits([r["nn_audit_pixel"] for r in results])
            ev["mia"], ev["nn_audit"], ev["nn_audit_pixel"] = mia, nn, nn_pix
            ev["audit_sites"] = {r["site"]: {"mia_auc": r["mia"]["auc"],
                                             "memorized_fraction":
                                                 r["nn_audit"]["memorized_fraction"]}
                                 for r in results}
            privacy.update({"mia_auc": mia["auc"],
                            "mia_tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
                            "mia_tpr_at_0_1pct_fpr": mia["tpr_at_0_1pct_fpr"],
                            "memorized_fraction": nn["memorized_fraction"],
                            "memorized_fraction_pixel": nn_pix["memorized_fraction"]})
            figures["roc"] = report.roc_figure(mia)
            worst = max(results, key=lambda r: r["nn_audit"]["memorized_fraction"])
            nn["histogram_site"] = worst["site"]
            figures["nn_histogram"] = report.nn_histogram_figure(worst["nn_audit"])
            if sites is not None and real is not None:
                figures["closest_pairs"] = _closest_pairs(results, sites, cfg, syn_x)
    privacy["disclosures"] = _disclosures(cfg, audited=audit is not None)
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


def _closest_pairs(results: list[dict[str, Any]], sites: Any, cfg: RunConfig,
                   syn_x: torch.Tensor) -> Any:
    """Simulation only: the coordinator can show site images because it holds them anyway."""
    from client.tasks import load_data

    pairs, dists = [], []
    for r in results:
        k = int(str(r["site"]).rsplit("-", 1)[-1])
        train = load_data(sites.site(k), cfg).train.images
        for p in r["nn_audit"]["closest_pairs"][:4]:
            pairs.append((syn_x[p["synthetic"], 0].numpy(), train[p["train"], 0].numpy()))
            dists.append(float(p["distance"]))
    order = np.argsort(dists)[:8]
    return report.closest_pairs_figure([pairs[i] for i in order], [dists[i] for i in order])


def _disclosures(cfg: RunConfig, *, audited: bool) -> list[str]:
    out = [
        "Model weights: released after DP-SGD (Opacus, Poisson sampling), charged to each "
        "site's ledger before training.",
        "Training-curve losses: one DP Gaussian-mechanism release per site and round "
        "(clipped per-sample loss), charged to the ledger." if cfg.privacy.private else
        "Training-curve losses: released without noise (non-private run).",
        "Latent scale factor: DP Gaussian mechanism on clipped per-sample latent second "
        "moments, charged to the ledger.",
        "Dataset sizes and class counts: not released; FedAvg weights sites equally and the "
        "synthetic set is class-balanced by design.",
        "DP unit: one image. Several slices of one patient are several records, so the "
        "per-patient guarantee is weaker (group privacy).",
    ]
    if audited:
        out.append("Audit aggregates (membership-inference AUC/ROC and loss histograms, "
                   "nearest-neighbour distance histograms and indices of the closest training "
                   "images): computed from private data and NOT covered by the DP guarantee; "
                   "a site can refuse audits with allow-audit=false.")
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


