"""Coordinator-side evaluation of a finished run: synthetic export, fidelity, utility, privacy.

The pipeline (:func:`evaluate_run`) runs in named steps, each taking what the previous ones made:
generate -> utility -> fidelity -> audit -> report. The final model is loaded once by the caller
(:meth:`server.run_folder.Run.load_final`) and the real images once per evaluation
(:mod:`server.real_data`).

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
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common import files
from ldm_core.config import RunConfig
from ldm_core.data import split_channels
from ldm_core.evaluation import (
    evaluate_utility,
    feature_spaces,
    fidelity_report,
    train_reference_classifier,
)
from ldm_core.evaluation.segmentation import segmentation_utility
from ldm_core.evaluation.site_eval import Layout
from ldm_core.evaluation.utility import judge_epochs
from ldm_core.models import resolve_device
from ldm_core.sampling import generate_images
from ldm_core.volumes import display_view, grid_affine, write_nifti
from server import report
from server.acceptance import acceptance_block, parse_acceptance
from server.datacard import write_datacard
from server.eval_audit import (
    SITE_LOCAL_NOTE,
    AuditFn,
    add_audit_epsilon,
    clear_stale_audit,
    site_local_figures,
    summarise_audits,
)
from server.eval_sites import SiteEvalFn, site_utility, synthetic_for_sites, tstr_classifier
from server.eval_text import PRIVACY_RANDOMNESS_SECURE, disclosures, privacy_unit, run_table
from server.real_data import RealSets, RealSource, ReferenceSet, SimulatedSites, subsample
from server.run_folder import FinalModel, Run
from server.run_metrics import AuditSummary, Fidelity, PrivacyBlock, SyntheticInfo, Utility

__all__ = ["PRIVACY_RANDOMNESS_SECURE", "SITE_LOCAL_NOTE", "AuditFn", "EvalOptions",
           "RealSets", "RealSource", "Synthetic", "evaluate_run", "export_synthetic",
           "generate_synthetic", "summarise_audits", "to_uint8"]

_PRIMARY_SPACE_NOTE = ("a fixed, seeded random-init CNN (no download); 'classifier' = "
                       "penultimate layer of the TRTR classifier")


@dataclass(frozen=True)
class EvalOptions:
    per_class: int | None = None
    # Default synthetic size: the largest real class, capped (sampling is the slow part on
    # CPUs; TSTR resamples the synthetic set to the real training counts anyway).
    per_class_cap: int = 300
    # Real training images used per utility arm and for fidelity (a seeded, class-stratified
    # subsample of what the generator saw): keeps the evaluation to minutes on a CPU.
    max_real_train: int = 1000
    # None: three seeds for images, one for volumes (a 3D judge costs ~10x a 2D one per image
    # on a CPU and trains 90 epochs; the interval is then the bootstrap one over test patients).
    utility_seeds: tuple[int, ...] | None = None
    # None: the judge's default for the run's data (12 epochs for images, 90 for volumes,
    # ldm_core.evaluation.utility.judge_epochs).
    utility_epochs: int | None = None
    ddim_steps: int | None = None
    guidance_scale: float | None = None
    reference: Path | None = None
    # Simulation: leave the sites' real images where they are and measure utility the way a
    # deployment does (server.eval_sites), to see what its DP noise costs.
    at_sites: bool = False


@dataclass(frozen=True)
class Synthetic:
    """The exported synthetic set and how it was drawn."""

    images: torch.Tensor
    labels: torch.Tensor
    info: SyntheticInfo
    masks: torch.Tensor | None = None  # paired runs: [N,1,H,W] in {0, 1}, aligned with images


@dataclass
class Evaluation:
    """What the steps share: inputs, and the figures they add for the report."""

    run: Run
    final: FinalModel
    opts: EvalOptions
    device: torch.device
    say: Callable[[str], None]
    show_progress: bool
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> RunConfig:
        return self.final.cfg


def generate_synthetic(cfg: RunConfig, ae: torch.nn.Module, dm: torch.nn.Module, scale: float,
                       per_class: int, *, seed: int, device: torch.device, steps: int,
                       guidance: float, eta: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Class-balanced images, labels, and for a paired model (mask_channels) their masks.
    ``eta`` > 0 samples stochastically (benchmarks/sampling_sweep.py: it did not pay)."""
    labels = torch.arange(cfg.model.n_classes).repeat_interleave(per_class)
    x = generate_images(ae, dm, cfg.model, labels, scale_factor=scale, steps=steps,
                        guidance_scale=guidance, seed=seed + 10_000, device=device,
                        show_progress=True, clip=cfg.dm.clip_latent, all_channels=True,
                        eta=eta)
    images, masks = split_channels(x)
    return images, labels, masks


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


def export_synthetic(folder: Path, images: torch.Tensor, labels: torch.Tensor,
                     class_names: Sequence[str], masks: torch.Tensor | None = None,
                     voxel_mm: float | None = None) -> Path:
    """PNG per image under <class>/ plus manifest.csv (path,label) - the same layout fedldm
    reads, so the synthetic set can be fed straight back into `fedldm` or any loader. Paired
    sets also write each mask (0/255) under masks/<class>/ and a `mask` column. Volumes are
    written as NIfTI (``syn_NNNNNN.nii.gz``, values 0-255 like the PNGs) on the grid's RAS
    affine (ldm_core.volumes.grid_affine): voxels of the run's `voxel_mm`, or a nominal 1 mm
    where each scan's field of view was fitted to the grid."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    mask_px = None if masks is None else (masks[:, 0] > 0).to(torch.uint8).numpy() * 255
    volume = images.ndim == 5
    affine = grid_affine(images.shape[-1], voxel_mm or 1.0) if volume else None

    def save(arr: np.ndarray, path: Path) -> None:
        if volume:
            write_nifti(arr.astype(np.float32), affine, path)
        else:
            Image.fromarray(arr, mode="L").save(path)

    rows = []
    for i, (img, y) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        name = class_names[y]
        (folder / name).mkdir(exist_ok=True)
        rel = f"{name}/syn_{i:06d}" + (".nii.gz" if volume else ".png")
        save(img, folder / rel)
        if mask_px is None:
            rows.append((rel, name))
            continue
        (folder / "masks" / name).mkdir(parents=True, exist_ok=True)
        save(mask_px[i], folder / "masks" / rel)
        rows.append((rel, name, f"masks/{rel}"))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["path", "label"] if mask_px is None else ["path", "label", "mask"])
    w.writerows(rows)
    return files.write_text_atomic(folder / "manifest.csv", buf.getvalue())


# ---------------------------------------------------------------------------------- steps
def load_real(ev: Evaluation, source: RealSource | None) -> RealSets | None:
    """Real images for utility and fidelity (None: the coordinator holds none)."""
    if source is None:
        return None
    ev.say("loading real images")
    return subsample(source.load(ev.cfg), ev.opts.max_real_train, seed=ev.cfg.seed)


def step_generate(ev: Evaluation, real: RealSets | None) -> Synthetic:
    """Draw the class-balanced synthetic set and export it to RUN/synthetic."""
    cfg, opts = ev.cfg, ev.opts
    per_class = opts.per_class or min(opts.per_class_cap, (
        int(torch.bincount(real.train[1], minlength=cfg.model.n_classes).max())
        if real is not None else opts.per_class_cap))
    steps = opts.ddim_steps or cfg.dm.ddim_steps
    guidance = cfg.dm.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
    ev.say(f"generating {per_class * cfg.model.n_classes} synthetic images ({steps} DDIM steps, "
           f"guidance {guidance})")
    f = ev.final
    x, y, m = generate_synthetic(cfg, f.ae, f.dm, f.scale_factor, per_class, seed=cfg.seed,
                                 device=ev.device, steps=steps, guidance=guidance)
    export_synthetic(ev.run.synthetic, x, y, cfg.class_names, masks=m,
                     voxel_mm=cfg.model.voxel_mm)
    return Synthetic(x, y, SyntheticInfo(int(x.shape[0]), per_class, steps, guidance), masks=m)


def _with_defaults(opts: EvalOptions, spatial_dims: int) -> EvalOptions:
    """The options with the utility judge's defaults for the run's data filled in, once."""
    return replace(opts, utility_epochs=judge_epochs(spatial_dims, opts.utility_epochs),
                   utility_seeds=opts.utility_seeds or ((0, 1, 2) if spatial_dims == 2 else (0,)))


def step_utility(ev: Evaluation, real: RealSets, syn: Synthetic) -> tuple[Utility, Any]:
    """TRTR / TSTR / TRS; also returns the TRTR classifier (a fidelity feature space)."""
    opts, cfg = ev.opts, ev.cfg
    ev.say(f"utility: TRTR / TSTR / TRS over seeds {list(opts.utility_seeds)} "
           f"({opts.utility_epochs} epochs each)")
    ref_clf = train_reference_classifier(real.train, n_classes=cfg.model.n_classes,
                                         seed=opts.utility_seeds[0],
                                         epochs=opts.utility_epochs, device=ev.device)
    result = evaluate_utility(real.train, (syn.images, syn.labels), real.test,
                              n_classes=cfg.model.n_classes, seeds=opts.utility_seeds,
                              epochs=opts.utility_epochs, device=ev.device,
                              reference_model=ref_clf, show_progress=ev.show_progress)
    utility = Utility.from_json({**result, "real_source": real.source})
    assert utility is not None
    ev.figures["utility"] = report.utility_bars_figure(utility.to_json())
    return utility, ref_clf


def step_segmentation(ev: Evaluation, real: RealSets | None, syn: Synthetic) -> dict[str, Any]:
    """Dice TSTR/TRTR of a segmenter on the real test pairs (paired runs), or why not."""
    if real is None:
        return {"not_measured": "the coordinator holds no real image/mask pairs (segmentation "
                                "is measured in simulation or with a --reference set; the "
                                "sites' evaluation scores classifiers only)"}
    if real.train_masks is None or real.test_masks is None:
        return {"not_measured": f"{real.source} has no masks"}
    assert syn.masks is not None
    opts = ev.opts
    ev.say(f"segmentation utility: TRTR / TSTR Dice over seeds {list(opts.utility_seeds)}")
    try:
        result = segmentation_utility(
            (real.train[0], real.train_masks), (syn.images, syn.masks),
            (real.test[0], real.test_masks, real.test[2]), seeds=opts.utility_seeds,
            device=ev.device, show_progress=ev.show_progress)
    except ValueError as exc:
        return {"not_measured": str(exc)}
    names = ev.cfg.class_names
    rows: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for c, n in enumerate(names):
        for kind, (x, y, m) in (("real", (real.train[0], real.train[1], real.train_masks)),
                                ("synthetic", (syn.images, syn.labels, syn.masks))):
            rows[f"{n} ({kind})"] = display_view(x[y == c][:8]).numpy()
            masks[f"{n} ({kind})"] = display_view(m[y == c][:8]).numpy()
    ev.figures["segmentation_pairs"] = report.image_grid_figure(
        rows, "image/mask pairs: real (top) vs synthetic (bottom); red = mask outline",
        masks_by_class=masks)
    return result


def step_fidelity(ev: Evaluation, real: RealSets, syn: Synthetic, ref_clf: Any) -> Fidelity:
    ev.say("fidelity: FID/KID, precision/recall, density/coverage, SSIM diversity")
    raw = fidelity_report(real.train[0], real.train[1], syn.images, syn.labels,
                          extractors=feature_spaces(seed=0, classifier=ref_clf,
                                                    spatial_dims=ev.cfg.model.spatial_dims),
                          seed=ev.cfg.seed)
    ev.figures["samples"] = _real_vs_synthetic(real.train, (syn.images, syn.labels),
                                               ev.cfg.class_names)
    return Fidelity.from_report(raw, "random_cnn", _PRIMARY_SPACE_NOTE)


def step_site_utility(ev: Evaluation, syn: Synthetic, site_eval: SiteEvalFn,
                      privacy: PrivacyBlock) -> dict[str, Any]:
    """Utility and recall measured at the sites (deployment without a reference set)."""
    cfg, opts = ev.cfg, ev.opts
    ev.say(f"utility at the sites: training the TSTR classifier on {syn.images.shape[0]} "
           f"synthetic images ({opts.utility_epochs} epochs), then each site that allows it "
           "scores it and one it trains with DP-SGD on its own test patients (one DP release)")
    clf = tstr_classifier(syn.images, syn.labels, cfg.model.n_classes,
                          seed=opts.utility_seeds[0], epochs=opts.utility_epochs,
                          device=ev.device)
    results = site_eval(clf, synthetic_for_sites(syn.images, syn.labels))
    add_audit_epsilon(privacy, [r for r in results if "error" not in r], release="evaluation")
    missing = [r["error"] for r in results if "error" in r]
    try:
        utility, fidelity = site_utility(
            results, Layout(cfg.model.n_classes, cfg.privacy.eval_bins),
            n_synthetic=int(syn.images.shape[0]), seed=opts.utility_seeds[0],
            epochs=opts.utility_epochs)
    except ValueError:
        note = ("not measured: no site returned an evaluation (a site must allow it with "
                "allow-evaluate=true" + (f"; replies: {missing}" if missing else "") + ")")
        return {"utility_note": note, "fidelity_note": note}
    ev.figures["utility"] = report.utility_bars_figure(utility)
    return {"utility": utility, "fidelity": fidelity}


def step_audit(ev: Evaluation, audit: AuditFn, sites: SimulatedSites | None,
               audit_run_id: str | None, privacy: PrivacyBlock) -> None:
    """Ask the sites for their DP audit releases; summarise them into `privacy`."""
    ev.say("privacy audits at the sites (one DP release each: membership inference, near "
           "copies)")
    started = time.time()
    results = audit()
    if not results:
        return
    privacy.audit = AuditSummary.from_json(summarise_audits(results))
    add_audit_epsilon(privacy, results)
    if sites is not None:
        ev.figures.update(site_local_figures(sites, ev.cfg, audit_run_id, since=started))


def step_report(ev: Evaluation, metrics: dict[str, Any], privacy: PrivacyBlock) -> None:
    """metrics.json, report.html and the synthetic set's DATACARD.md."""
    ev.say("writing report.html, metrics.json and DATACARD.md")
    metrics["privacy"] = privacy.to_json()
    spec = (metrics.get("meta") or {}).get("accept")  # declared before training
    metrics["acceptance"] = acceptance_block(metrics, parse_acceptance(spec) if spec else None)
    ev.figures["training_curves"] = report.training_curves_figure(metrics.get("training", []))
    ev.figures["epsilon"] = report.epsilon_figure(privacy.rounds or [], budget=privacy.budget())
    ev.run.save_metrics(metrics)
    report.write_report(ev.run.root, metrics, ev.figures)
    write_datacard(ev.run.datacard, metrics, ev.cfg)


# ---------------------------------------------------------------------------------- pipeline
def evaluate_run(run: Run | Path, *, final: FinalModel | None = None,
                 sites: SimulatedSites | None = None, audit: AuditFn | None = None,
                 options: EvalOptions | None = None, show_progress: bool = True,
                 audit_run_id: str | None = None, site_eval: SiteEvalFn | None = None
                 ) -> dict[str, Any]:
    """Evaluate the final generator of `run`; updates metrics.json, writes report.html.

    `site_eval` (deployment) measures utility and recall at the sites when the coordinator
    holds no real images (server.eval_sites).

    `final` is the already loaded final model (loaded here when None). `sites` (simulation
    only) is the real source unless `options.reference` names one, and lets the report read the
    sites' local audit diagnostics: with `audit_run_id`, `<site state>/audits/<audit_run_id>.json`;
    without, the newest diagnostics file written during this evaluation.
    """
    run = run if isinstance(run, Run) else Run(run)
    final = final or run.load_final()
    opts = _with_defaults(options or EvalOptions(), final.cfg.model.spatial_dims)
    log = run.logger()
    t0 = time.monotonic()
    ev = Evaluation(run, final, opts, resolve_device(final.cfg.device), _say(show_progress, log),
                    show_progress)
    metrics = run.load_metrics()
    source: RealSource | None = ReferenceSet(opts.reference) if opts.reference is not None \
        else None if opts.at_sites else sites

    # Where the evaluation's time goes (benchmarks/run_profile.py reads it with the rounds').
    steps: dict[str, float] = {}
    lap = [time.monotonic()]

    def done(name: str) -> None:
        now = time.monotonic()
        steps[name] = round(now - lap[0], 1)
        lap[0] = now

    real = load_real(ev, source)
    done("load real data")
    syn = step_generate(ev, real)
    done("generate")
    blocks: dict[str, Any] = {"synthetic": syn.info.to_json()}
    privacy = PrivacyBlock.from_json(metrics.get("privacy"))
    clear_stale_audit(metrics, privacy)
    if real is not None:
        utility, ref_clf = step_utility(ev, real, syn)
        done("utility")
        blocks["utility"] = utility.to_json()
        if syn.masks is not None:
            blocks["utility"]["segmentation"] = step_segmentation(ev, real, syn)
            done("segmentation")
        blocks["fidelity"] = step_fidelity(ev, real, syn, ref_clf).to_json()
        done("fidelity")
    else:
        ev.figures["samples"] = report.image_grid_figure(
            _by_class(syn.images, syn.labels, ev.cfg.class_names), "synthetic")
        if site_eval is not None:
            blocks.update(step_site_utility(ev, syn, site_eval, privacy))
            done("utility at the sites")
        else:
            blocks["utility_note"] = blocks["fidelity_note"] = (
                "not measured: the coordinator holds no real images (pass --reference PATH)")
        if syn.masks is not None and isinstance(blocks.get("utility"), dict):
            blocks["utility"]["segmentation"] = step_segmentation(ev, None, syn)
    for key in ("utility", "fidelity", "utility_note", "fidelity_note"):
        metrics.pop(key, None)  # a block from an earlier evaluation must not survive this one

    if audit is not None:
        step_audit(ev, audit, sites, audit_run_id, privacy)
        done("audit")
    meta = metrics.get("meta", {})
    privacy.disclosures = disclosures(ev.cfg, audited=audit is not None, meta=meta,
                                      evaluated="utility" in blocks and site_eval is not None)
    privacy.unit = privacy_unit(meta)
    privacy.randomness = meta.get("privacy_randomness", PRIVACY_RANDOMNESS_SECURE)
    metrics.update(blocks)
    metrics["evaluation_seconds"] = round(time.monotonic() - t0, 1)
    metrics["run"] = run_table(metrics, ev.cfg, run.root)
    metrics["evaluation_steps_seconds"] = steps
    step_report(ev, metrics, privacy)
    ev.say(f"evaluation done in {metrics['evaluation_seconds']:.0f}s")
    return metrics


def _say(show: bool, log: Any) -> Callable[[str], None]:
    def say(msg: str) -> None:
        log.info(msg)
        if show:
            print(f"[evaluate] {msg}", flush=True)

    return say


def _by_class(x: torch.Tensor, y: torch.Tensor, names: Sequence[str], k: int = 8
              ) -> dict[str, np.ndarray]:
    """Up to k images per class as a figure shows them (volumes: their orthogonal mid slices)."""
    return {n: display_view(x[y == c][:k]).numpy() for c, n in enumerate(names)}


def _real_vs_synthetic(real: tuple[torch.Tensor, torch.Tensor],
                       syn: tuple[torch.Tensor, torch.Tensor], names: Sequence[str]) -> Any:
    rows: dict[str, np.ndarray] = {}
    for c, n in enumerate(names):
        rows[f"{n} (real)"] = display_view(real[0][real[1] == c][:8]).numpy()
        rows[f"{n} (synthetic)"] = display_view(syn[0][syn[1] == c][:8]).numpy()
    return report.image_grid_figure(rows, "real (top) vs synthetic (bottom), per class")
