"""DATACARD.md for the synthetic set: what made it, how private, how good, and its limits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ldm_core.config import RunConfig
from server.run_metrics import (
    ArmResult,
    AuditSummary,
    Fidelity,
    PrivacyBlock,
    SyntheticInfo,
    Utility,
)


def code_note(meta: dict[str, Any] | None) -> str:
    """Which code trained the run (metrics.json `meta.code`, every version in order)."""
    return ", then ".join((meta or {}).get("code")
                          or ["not recorded (a run made before fedldm kept it)"])


# Where the weights started (public pretraining is a prior, not a release of private data).
INIT_NOTES = {
    "random": "random initialisation",
    "public-phantoms": "pretrained on public procedural phantoms (no patient data)",
    "public-generic": "pretrained on public procedural phantoms and generic procedural images "
                      "(shapes, rings, textures; a modality-agnostic prior, no patient data)",
    "public-healthy-phantoms": "pretrained without labels on healthy public phantoms (anatomy, "
                               "no lesion, no label){then}; on the built-in demo data those "
                               "phantoms come from the demo's own generator, so the demo's "
                               "anatomy owes much to public data and only lesions and labels "
                               "must be learned privately",
}
FINE_TUNED = ", then fine-tuned on the sites' data"
NOT_TRAINED = (", used as it is: not trained on the sites' data (0 rounds, no privacy budget "
               "spent on training it; the releases computed with it are charged as usual)")


def init_note(init: str, *, paired: bool = False, trained: bool = True) -> str:
    """Where a phase's weights started: a built-in start, or a prior file and its public source
    (from its sidecar, when the file is readable where the report is written). `paired`: the
    autoencoder of an image/mask run (the shipped one then also saw the phantoms' masks).
    `trained`: whether the phase ran any round on the sites' data (a prior kept frozen did
    not, and the card must not say it was fine-tuned)."""
    then = FINE_TUNED if trained else NOT_TRAINED
    if init == "public-phantoms" and paired:
        return ("pretrained on public procedural phantoms and their lesion masks (no patient "
                "data; where no paired prior ships for the architecture, the image-only one with "
                f"a blank mask channel){then}")
    if init == "random":
        return INIT_NOTES[init]
    if init in INIT_NOTES:
        text = INIT_NOTES[init]
        return text.format(then=then) if "{then}" in text else text + then
    from ldm_core.pretrain import prior_meta

    meta = prior_meta(init)
    # The folder's name and a hash of its file list identify the set without publishing the
    # coordinator's directory layout.
    source = (f"{meta.get('images', '?')} public images from '{Path(str(meta['data'])).name}' "
              f"(file-list sha256 {str(meta.get('listing_sha256', '?'))[:12]})" if "data" in meta
              else "a public set (the prior's sidecar is not readable here)")
    return f"pretrained on {source} (prior file {Path(init).name}){then}"


def _f(x: Any, nd: int = 3) -> str:
    if isinstance(x, (int, float)):
        return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{nd}f}"
    return str(x) if x is not None else "not measured"


def _ci(arm: ArmResult | None) -> str:
    if arm is None:
        return _f(None)
    ci = arm.auc_ci
    return f"{_f(arm.auc)} (95% CI {_f(ci[0])}-{_f(ci[1])})" if ci else _f(arm.auc)


def _audit_lines(audit: AuditSummary) -> list[str]:
    """The empirical audit, stated as what it is: noisy DP releases and lower bounds on leakage."""
    if audit.mia_auc is None:
        return ["- Empirical privacy audit: not measured (no site was audited)."]
    noise = _f(audit.mia_noise_std)
    frac, chance = audit.memorized_fraction, audit.memorized_fraction_holdout
    lines = [
        f"- Membership inference (best of the denoiser-loss and autoencoder-reconstruction "
        f"attacks, mean over sites): AUC {_f(audit.mia_auc)} (0.5 = chance); at a "
        f"threshold that flags {_f(audit.mia_fpr_at_threshold)} of unseen images it flags "
        f"{_f(audit.mia_tpr_at_1pct_fpr)} of training images (chance: the same fraction).",
        f"- Near copies (a generated sample three times closer than the next, per record): "
        f"{_f(frac)} of audited training images vs {_f(chance)} of unseen images (chance).",
        f"- Every audit figure is a differentially private release by the site (Gaussian noise, "
        f"std {noise} per site and value, charged to its ledger), so small differences are "
        "noise.",
        "- Attack results are lower bounds on leakage: they show what these attacks found, "
        "never that no attack can succeed. The DP epsilon above is the guarantee.",
    ]
    if frac is not None and chance is not None and frac <= chance:
        lines.append("- A near-copy fraction at or below chance means this test found no "
                     "copies; it reflects low fidelity as much as privacy (samples that "
                     "resemble no real image copy none).")
    return lines


def _acceptance_lines(acc: Any) -> list[str]:
    """## Acceptance: the go/no-go decision against the criteria declared before training."""
    if not isinstance(acc, dict):
        return []
    go = "GO" if acc.get("go") else "NO-GO"
    if not acc.get("declared"):
        failed = ", ".join(acc.get("failed") or []) or "none"
        return ["## Acceptance", f"- **{go}** against the report's default thresholds (no "
                f"criteria were declared before training); failing aspects: {failed}.", ""]
    out = ["## Acceptance",
           f"- **{go}** against the criteria declared before training: `{acc.get('spec', '')}`."
           f" Rule: {acc.get('rule', '')}.",
           "", "| criterion | measured | 95% CI | outcome |", "|---|---|---|---|"]
    for r in acc.get("criteria") or []:
        ci = r.get("ci")
        interval = f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "-"
        out.append(f"| `{r.get('criterion')}` | {_f(r.get('value'))} | {interval} | "
                   f"{'met' if r.get('met') else 'NOT met'} |")
    return [*out, ""]


def _grid(cfg: RunConfig) -> str:
    s = cfg.model.image_size
    return f"{s}x{s} px" if cfg.model.spatial_dims == 2 else f"{s}x{s}x{s} voxel volumes"


def _released(meta: Any) -> list[tuple[str, str]]:
    """(phase, "mean of rounds a-b") for each phase that released a tail average."""
    if not isinstance(meta, dict):
        return []
    return [(phase, str(meta[f"{phase}_released"])) for phase in ("autoencoder", "diffusion")
            if isinstance(meta.get(f"{phase}_released"), str)]


def write_datacard(path: Path, metrics: dict[str, Any], cfg: RunConfig) -> Path:
    """Write the synthetic set's DATACARD.md from metrics.json's typed blocks."""
    priv = PrivacyBlock.from_json(metrics.get("privacy"))
    u = Utility.from_json(metrics.get("utility")) or Utility({})
    fid = Fidelity.from_json(metrics.get("fidelity"))
    headline = fid.headline if fid is not None else {}
    syn = SyntheticInfo.from_json(metrics.get("synthetic"))
    lines = [
        "# Synthetic dataset data card", "",
        "## What generated it",
        f"- A latent diffusion model (MONAI AutoencoderKL + DiffusionModelUNet, preset "
        f"`{cfg.preset}`, {_grid(cfg)}) trained with "
        "federated learning (Flower) across the sites below; no image left a site.",
        f"- Sampling: DDIM, {syn.ddim_steps} steps, classifier-free guidance "
        f"{syn.guidance_scale}; {syn.n} images, {syn.per_class} per class "
        f"({', '.join(cfg.class_names)}), class-balanced by design.",
        "- Starting weights: autoencoder " + init_note(
            cfg.ae_init, paired=cfg.model.mask_channels > 0, trained=cfg.autoencoder.rounds > 0)
        + f"; denoiser {init_note(cfg.dm_init, trained=cfg.diffusion.rounds > 0)}.",
        f"- Code: {code_note(metrics.get('meta'))}.",
        *(f"- Released {phase} model: {text} (the average of those rounds' global models; "
          "each was already sent to the sites, so averaging costs no privacy)."
          for phase, text in _released(metrics.get("meta"))),
        ("- Files: `<class>/syn_NNNNNN.png` (8-bit grayscale) and `manifest.csv` (path,label)"
         if cfg.model.spatial_dims == 2 else
         "- Files: `<class>/syn_NNNNNN.nii.gz` (NIfTI, float32 values 0-255, RAS, nominal 1 mm "
         "isotropic voxels: the sites' scans were each fitted to the grid, so the physical "
         "voxel size is not one number) and `manifest.csv` (path,label)"
         if cfg.model.voxel_mm is None else
         f"- Files: `<class>/syn_NNNNNN.nii.gz` (NIfTI, float32 values 0-255, RAS, "
         f"{cfg.model.voxel_mm:g} mm isotropic voxels, the grid every site resampled its scans "
         f"to: {cfg.model.image_size} voxels = "
         f"{cfg.model.image_size * cfg.model.voxel_mm:g} mm a side) and `manifest.csv` "
         "(path,label)")
        + ("; each image's lesion mask (0/255, pixel-aligned, decoded from the same latent) "
           f"at `masks/<class>/syn_NNNNNN.{'png' if cfg.model.spatial_dims == 2 else 'nii.gz'}`"
           ", column `mask`." if cfg.model.mask_channels
           else "."), "",
        *_acceptance_lines(metrics.get("acceptance")),
        "## Privacy",
    ]
    if not cfg.privacy.private:
        lines.append("- **NOT PRIVATE**: trained with epsilon = inf (no differential privacy). "
                     "Do not share outside the institutions that own the data.")
    if str(priv.randomness or "").startswith("SEEDED"):
        lines.append("- **NOT PRIVATE against anyone who knows the seed**: the sites' privacy "
                     "randomness was seeded (reproducible mode, tests and research only).")
    lines.append(f"- Unit of privacy: {priv.unit or 'see the disclosures below'}.")
    lines.append("| site | epsilon spent | budget | delta |")
    lines.append("|---|---|---|---|")
    for site, s in sorted((priv.sites or {}).items()):
        lines.append(f"| {site} | {_f(s.epsilon)} | {_f(s.budget_epsilon)} | {s.delta} |")
    lines += ["", *_audit_lines(priv.audit)]
    lines += [
        "", "### What else left the sites",
    ] + [f"- {d}" for d in priv.disclosures or []] + [
        "", "## Quality",
        *_quality_lines(u, headline, metrics),
        "", "## Intended use and limits",
        "- Intended: method development, augmentation experiments, teaching, sharing a "
        "faithful-looking stand-in where real images cannot travel.",
        "- Not intended: clinical decisions, or as evidence about any real patient.",
        "- The formal guarantee protects the unit stated above (the patient when patient ids "
        "exist). Empirical audits can only show leaks, not their absence.",
        "- Fidelity numbers use a no-download random-CNN feature space: compare them only "
        "between runs of this tool, not with published FIDs.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _segmentation_lines(seg: dict[str, Any] | None) -> list[str]:
    if not seg:
        return []
    if "not_measured" in seg:
        return [f"- Segmentation utility: not measured ({seg['not_measured']})."]
    def dice(arm: str) -> str:
        lo, hi = seg.get(f"{arm}_dice_ci") or (float("nan"), float("nan"))
        return f"{_f(seg.get(f'{arm}_dice'))} [{_f(lo)}, {_f(hi)}]"
    return [f"- Segmentation utility (UNet trained on synthetic pairs, tested on real patients' "
            f"lesions): Dice TSTR {dice('tstr')} vs TRTR {dice('trtr')}; ratio "
            f"{_f(seg.get('ratio'))}; mask/image alignment Dice "
            f"{_f(seg.get('alignment_dice'))}."]


def _quality_lines(u: Utility, headline: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Utility and fidelity lines; a deployment's site-measured values say how they were got."""
    if u.measured_at == "sites":
        recall = ((metrics.get("fidelity") or {}).get("sites") or {}).get("recall")
        return [
            f"- Utility, measured at the sites ({', '.join(u.sites or [])}; missing: "
            f"{len(u.sites_missing or [])}) from one DP release each, intervals of the DP noise "
            f"only: TSTR AUC {_ci(u.arms.get('tstr'))} vs TRTR {_ci(u.arms.get('trtr'))} "
            f"(TRTR: {u.trtr_kind}); ratio {_f(u.ratio)}.",
            f"- Fidelity, measured at the sites: recall {_f(recall)}; precision, FID and the "
            "other fidelity measures cannot be released with DP and were not measured.",
            *_segmentation_lines(u.segmentation),
        ]
    return [*_segmentation_lines(u.segmentation),
        f"- Utility (classifier trained on synthetic, tested on real patients): TSTR AUC "
        f"{_ci(u.arms.get('tstr'))} vs TRTR {_ci(u.arms.get('trtr'))}; ratio {_f(u.ratio)}; "
        f"real + synthetic (TRS) {_ci(u.arms.get('trs'))}.",
        f"- Fidelity (random-CNN feature space): FID {_f(headline.get('fid'), 2)}, precision "
        f"{_f(headline.get('precision'))}, recall {_f(headline.get('recall'))}, density "
        f"{_f(headline.get('density'))}, coverage {_f(headline.get('coverage'))}.",
    ]
