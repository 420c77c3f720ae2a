"""Site-side work behind the ClientApp handlers, without Flower types (so it is testable).

Every function here follows the same privacy discipline:
1. compute the noise for the *whole* run plan from the site's own budget and the configured plan
   (never from the data, so every fresh ClientApp process gets the same sigma and nothing it
   releases depends on the site's size);
2. charge the ledger for exactly what is about to be released (training steps, or one Gaussian
   mechanism for a statistic) -- durable before anything runs;
3. only then touch the data, and release only DP outputs (weights, noisy sums), drawing every
   privacy-relevant random bit from the site's own privacy source (`privacy_rng`), never from a
   seed in the message.
The unit of privacy is the patient when the data has patient ids, else the image.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from client.ledger import PrivacyLedger
from client.site_config import SiteConfig
from ldm_core.config import RunConfig
from ldm_core.data import (
    DataWarning,
    ImageSet,
    SiteData,
    holds_volumes,
    load_site,
    rows_by_patient,
)
from ldm_core.dp_random import PrivacyRng, privacy_rng_for
from ldm_core.evaluation.fidelity import PSNR_CAP_DB, reconstruction_quality
from ldm_core.logs import file_logger
from ldm_core.models import encode, resolve_device
from ldm_core.phases import AUTOENCODER, PHASES, get_phase
from ldm_core.privacy import (
    History,
    calibrate_noise,
    dp_sum_and_count,
    gaussian_mechanism_entry,
)
from ldm_core.training import SamplingPlan, dp_train, frozen_names, sampling_plan

# Per-sample loss clip for the DP release of training-curve values (losses above are rare).
LOSS_CLIP = 2.0
# Gaussian releases charged by the latent-stats query: the latent second moment and the
# autoencoder's reconstruction quality (`latent_stats`).
LATENT_RELEASES = 2


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers of every release this site makes in one run.

    Training noise and sampling plans are keyed by phase name (ldm_core.phases.PHASES), so a new
    phase needs no new field here.
    """

    target_epsilon: float
    delta: float
    sigmas: Mapping[str, float]
    plans: Mapping[str, SamplingPlan]
    metric: float
    scale: float
    audit: float = 0.0
    # The site evaluation's release (0 = the site does not allow evaluations, or no DP).
    evaluate: float = 0.0

    def phase_sigma(self, phase: str) -> float:
        return self.sigmas[phase]

    def phase_plan(self, phase: str) -> SamplingPlan:
        return self.plans[phase]


def evaluation_entries(cfg: RunConfig) -> list[tuple[float, float, int]]:
    """Ledger entries of one site evaluation (client.site_eval): the DP-SGD steps of the site's
    TRTR classifier, then the one Gaussian release of the score counts."""
    p = cfg.privacy
    return [(p.eval_trtr_noise_multiplier, p.eval_trtr_sample_rate, p.eval_trtr_steps),
            gaussian_mechanism_entry(p.eval_noise_multiplier)]


def check_permitted(site: SiteConfig, cfg: RunConfig) -> None:
    """Refuse, before any charge or read, a run that asks for data the site has not offered.

    A paired run (model.mask_channels > 0) reads the site's lesion masks; without the site's
    `allow-masks` the coordinator could otherwise learn, from success or failure, whether a site
    holds masks at all -- a bit no ledger accounts for.
    """
    if cfg.model.mask_channels > 0 and not site.allow_masks:
        raise PermissionError(
            f"site {site.site_id} does not allow paired image/mask runs (node config "
            "allow-masks=false); start the site with --allow-masks to train on its masks")


def check_data_kind(site: SiteConfig, cfg: RunConfig) -> None:
    """Refuse, before any charge, a run of the other dimensionality (a 3D run at a site of 2D
    images, or the reverse), from the file list alone (no pixel is read), so a misconfigured
    run costs the site no budget."""
    volumes = holds_volumes(site.data)
    if volumes != (cfg.model.spatial_dims == 3):
        held, wanted = ("volumes", "2D images") if volumes else ("2D images", "volumes")
        raise ValueError(f"site {site.site_id}: {site.data} holds {held} but the run "
                         f"(model.spatial_dims={cfg.model.spatial_dims}) trains on {wanted}; "
                         "point the site at matching data or start a run of the other kind")


# Hashes of the DataWarnings already written to a site's log, kept in its state dir: in a
# deployment every message runs in a fresh process, so memory cannot remember them.
_LOGGED_NAME = "data-warnings.sha256"


def _log_data_warning(site: SiteConfig, message: str) -> bool:
    """Write `message` to the site's site.log unless it is there already; True if new."""
    digest = hashlib.sha256(message.encode()).hexdigest()
    seen = site.state_dir / _LOGGED_NAME
    if seen.exists() and digest in seen.read_text().split():
        return False
    file_logger(site.state_dir / "site.log").warning("data: %s", message)
    with seen.open("a") as f:
        f.write(digest + "\n")
    return True


_REGISTRY: dict[Any, Any] = {}  # other warnings keep their once-per-place default


def load_data(site: SiteConfig, cfg: RunConfig) -> SiteData:
    """The site's splits, with the loader's DataWarnings (e.g. scans cropped by the run's voxel
    size) written once to the site's own site.log and console: the operator reads those, the
    coordinator never sees them."""
    check_permitted(site, cfg)
    check_data_kind(site, cfg)
    scheme, n_sites = (("iid", 1) if site.partition == "all"
                       else (site.partition, site.n_sites))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_site(site.data, site_index=site.site_index if n_sites > 1 else 0,
                         n_sites=n_sites, scheme=scheme, image_size=cfg.model.image_size,
                         seed=site.data_seed, holdout_fraction=site.holdout_fraction,
                         test_fraction=site.test_fraction, progress=site.show_progress,
                         masks=cfg.model.mask_channels > 0, voxel_mm=cfg.model.voxel_mm)
    for w in caught:
        if not issubclass(w.category, DataWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   registry=_REGISTRY)
        elif _log_data_warning(site, str(w.message)):
            # Shown, never raised (even under -W error): whether a site's data triggers it must
            # not decide whether its reply succeeds, which the coordinator would see.
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return data


def check_classes(site: SiteConfig, cfg: RunConfig, data: SiteData) -> None:
    if tuple(data.class_names) != tuple(cfg.class_names):
        raise ValueError(
            f"site {site.site_id}: classes in {site.data} are {list(data.class_names)} but the "
            f"run expects {list(cfg.class_names)}; rename the class folders/labels to match"
        )


def open_ledger(site: SiteConfig) -> PrivacyLedger:
    site.state_dir.mkdir(parents=True, exist_ok=True)
    return PrivacyLedger.open(site.ledger_path, budget_epsilon=site.epsilon, delta=site.delta,
                              site_id=site.site_id)


def prior_history(ledger: PrivacyLedger, run_id: str) -> History:
    """What earlier runs spent: this run's noise is calibrated on top of it."""
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in ledger.entries() if e["run_id"] != run_id]


def plan_noise(site: SiteConfig, cfg: RunConfig, ledger: PrivacyLedger, run_id: str
               ) -> NoisePlan:
    """The site's noise plan for run `run_id`, on top of what its earlier runs spent."""
    return plan_for(site, cfg, prior_history(ledger, run_id))


def plan_for(site: SiteConfig, cfg: RunConfig, prior: History) -> NoisePlan:
    """Calibrate all noise multipliers once for the whole run plan (every phase).

    Inputs are the configuration, the site's budget and what earlier runs spent: never the data.
    Reserved releases (latent scale factor, one training-curve value per round, the audit when
    the site allows audits, the evaluation when it allows evaluations) are fixed mechanisms; the
    training phases share the rest, each by its `Phase.budget_share`.
    """
    phases = list(PHASES.values())
    plans = {p.name: sampling_plan(p.config(cfg)) for p in phases}
    target = site.effective_target(cfg.privacy.epsilon)
    if math.isinf(target):
        return NoisePlan(target, site.delta, {p.name: 0.0 for p in phases}, plans, 0.0, 0.0)
    metric = cfg.privacy.scale_noise_multiplier / 2
    scale = cfg.privacy.scale_noise_multiplier
    audit = cfg.privacy.audit_noise_multiplier
    # Retry reserve: a round that crashed between its charge and its stored reply is charged
    # again when retried; planning `retry` extra rounds per phase (and releases) means a killed
    # run can still finish within the target. Unused reserve is budget left unspent.
    retry = cfg.privacy.retry_reserve_rounds
    rounds = {p.name: (r + retry if (r := p.config(cfg).rounds) > 0 else 0) for p in phases}
    reserved = list(prior) + \
        [gaussian_mechanism_entry(scale)] * (LATENT_RELEASES * (1 + retry)) + \
        [gaussian_mechanism_entry(metric)] * sum(rounds.values()) + \
        ([gaussian_mechanism_entry(audit)] if site.allow_audit else []) + \
        (evaluation_entries(cfg) if site.allow_evaluate else [])
    planned = [(plans[p.name].sample_rate, plans[p.name].steps * rounds[p.name]) for p in phases]
    sigmas = calibrate_noise(planned, target_epsilon=target, delta=site.delta,
                             shares=[p.budget_share(cfg) for p in phases], reserved=reserved)
    return NoisePlan(target, site.delta, dict(zip(rounds, sigmas, strict=True)), plans, metric,
                     scale, audit if site.allow_audit else 0.0,
                     cfg.privacy.eval_noise_multiplier if site.allow_evaluate else 0.0)


def site_privacy_rng(site: SiteConfig, *salt: object) -> PrivacyRng:
    """The site's privacy randomness: OS entropy, unless the SITE configured a seed (simulation
    only; `fedldm site start` and deployed node configs refuse it)."""
    return privacy_rng_for(site.reproducible_seed, site.site_id, *salt)


def patient_groups(data: SiteData, images: ImageSet) -> tuple[str, ...] | None:
    """Patient id per image when the data has them (the DP unit), else None (unit = image)."""
    return images.patients if data.has_patient_ids else None


def per_patient_mean(values: torch.Tensor, groups: tuple[str, ...] | None) -> torch.Tensor:
    """Average per-image values per patient: one row per privacy unit before clipping."""
    if groups is None:
        return values
    return torch.stack([values[rows].mean() for rows in rows_by_patient(groups, len(values))])


def _dp_mean(values: torch.Tensor, *, clip: float, sigma: float, rng: PrivacyRng) -> float:
    total, count = _dp_rows(values.clamp(0, clip).unsqueeze(1), clip=clip, sigma=sigma, rng=rng)
    return float(total[0]) / max(count, 1.0)


@dataclass(frozen=True)
class RoundResult:
    # The phase's weights after the round, without the parameters `train_only` froze (those
    # are the coordinator's own, returned bit for bit; they do not travel back).
    weights: dict[str, torch.Tensor]
    loss: float
    epsilon: float
    budget_epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    sample_rate: float


def train_round(
    site: SiteConfig,
    cfg: RunConfig,
    *,
    phase: str,
    server_round: int,
    run_id: str,
    weights: dict[str, torch.Tensor],
    ae_weights: dict[str, torch.Tensor] | None = None,
    scale_factor: float = 1.0,
    seed: int = 0,
    site_slot: int | None = None,
) -> RoundResult:
    """One local round of DP-SGD on the site's train split; returns DP weights + DP loss.

    `phase` names a registered phase (ldm_core.phases): it says which model trains on which
    tensors with which loss; everything privacy-related below is the same for every phase.
    `seed` drives only what is not privacy-relevant; Poisson sampling, DP noise and the loss
    release draw from the site's privacy source.
    """
    spec = get_phase(phase)
    phase = spec.name
    if site_slot is not None and not 0 <= site_slot < cfg.model.site_slots:
        raise ValueError(f"site slot {site_slot} outside the model's {cfg.model.site_slots} "
                         "site slots")
    check_permitted(site, cfg)
    check_data_kind(site, cfg)
    model = spec.make_model(cfg.model)
    # A train_only piece that names no parameter fails here, before the charge, not in dp_train.
    frozen = frozen_names(model, spec.config(cfg).train_only)
    ledger = open_ledger(site)
    noise = plan_noise(site, cfg, ledger, run_id)
    sigma, plan = noise.phase_sigma(phase), noise.phase_plan(phase)
    # Charge first, before the data is even read: a crash after this line over-counts, never
    # under-counts.
    ledger.charge([(sigma, plan.sample_rate, plan.steps), gaussian_mechanism_entry(noise.metric)],
                  run_id=run_id, phase=phase, round=server_round)
    rng = site_privacy_rng(site, run_id, phase, server_round)
    data = load_data(site, cfg)
    check_classes(site, cfg, data)
    groups = patient_groups(data, data.train)
    device = resolve_device(site.device)
    phase_cfg = spec.config(cfg)
    ae: torch.nn.Module | None = None
    if spec.needs_autoencoder:
        if ae_weights is None:
            raise ValueError(f"{phase} round without autoencoder weights")
        ae = AUTOENCODER.make_model(cfg.model)
        ae.load_state_dict(ae_weights)
    tensors = spec.train_inputs(data.train, autoencoder=ae, scale_factor=scale_factor,
                                device=device, site=site_slot)
    model.load_state_dict(weights)
    loss_fn = spec.train_loss(cfg)
    stats = dp_train(model, tensors, loss_fn, phase=phase_cfg, plan=plan, noise_multiplier=sigma,
                     seed=seed, device=device, privacy_rng=rng, groups=groups,
                     images_per_step=cfg.privacy.patient_images_per_step,
                     max_patient_images=cfg.privacy.max_patient_images,
                     desc=f"{site.site_id} {phase} r{server_round}",
                     show_progress=site.show_progress)
    if sigma > 0 and (stats.noise_multiplier != sigma
                      or stats.max_grad_norm != phase_cfg.max_grad_norm):
        raise RuntimeError(f"the DP optimizer used noise {stats.noise_multiplier} and clip "
                           f"{stats.max_grad_norm}, but the ledger was charged for noise {sigma} "
                           f"and clip {phase_cfg.max_grad_norm}: refusing to release the weights")
    with torch.no_grad():
        per_sample = spec.eval_losses(model, tensors, cfg, seed, device)
    loss = _dp_mean(per_patient_mean(per_sample, groups), clip=LOSS_CLIP, sigma=noise.metric,
                    rng=rng)
    return RoundResult(
        weights={k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen},
        loss=loss, epsilon=ledger.epsilon(), budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta, noise_multiplier=sigma, steps=stats.steps,
        sample_rate=plan.sample_rate,
    )


@dataclass(frozen=True)
class LatentStats:
    second_moment_sum: float
    count: float
    epsilon: float
    # The autoencoder's reconstruction quality on the holdout patients: noisy sums of clipped
    # per-patient [PSNR / PSNR_CAP_DB, SSIM] and the noisy patient count (one Gaussian release).
    recon_psnr_sum: float = 0.0
    recon_ssim_sum: float = 0.0
    recon_count: float = 0.0


def latent_stats(site: SiteConfig, cfg: RunConfig, *, run_id: str,
                 ae_weights: dict[str, torch.Tensor]) -> LatentStats:
    """DP releases after the autoencoder phase, both charged first, before any data is read.

    1. The mean squared latent (for the scale factor 1/std): each train patient contributes the
       mean squared latent value of its images, clipped to `scale_clip`.
    2. The autoencoder's reconstruction quality on the holdout patients: each contributes its
       mean [PSNR / PSNR_CAP_DB, SSIM], clipped to [0, 1] each (row norm <= sqrt 2).

    Each goes out through one Gaussian mechanism (ldm_core.privacy.dp_sum_and_count) with the
    `scale_noise_multiplier` and noise from the site's privacy source. The two releases read
    disjoint patients (train, holdout) and each patient's split depends on that patient alone,
    so parallel composition would allow charging one; both are charged (conservative).
    """
    check_permitted(site, cfg)
    check_data_kind(site, cfg)
    ledger = open_ledger(site)
    noise = plan_noise(site, cfg, ledger, run_id)
    ledger.charge([gaussian_mechanism_entry(noise.scale)] * LATENT_RELEASES if noise.scale > 0
                  else [(0.0, 1.0, 1)], run_id=run_id, phase="latent-scale", round=0)
    data = load_data(site, cfg)
    check_classes(site, cfg, data)
    ae = AUTOENCODER.make_model(cfg.model)
    ae.load_state_dict(ae_weights)
    z = encode(ae, data.train.model_input(), 1.0, resolve_device(site.device))
    per_image = z.pow(2).flatten(1).mean(dim=1)
    per_sample = per_patient_mean(per_image, patient_groups(data, data.train)).clamp(
        0, cfg.privacy.scale_clip)
    rng = site_privacy_rng(site, run_id, "latent-scale", 0) if noise.scale > 0 else None
    sums, count = _dp_rows(per_sample.unsqueeze(1), clip=cfg.privacy.scale_clip,
                           sigma=noise.scale, rng=rng)
    psnr, ssim = reconstruction_quality(ae, data.holdout.model_input(),
                                        resolve_device(site.device))
    groups = patient_groups(data, data.holdout)
    rows = torch.zeros(0, 2) if len(psnr) == 0 else torch.stack(
        [per_patient_mean(psnr / PSNR_CAP_DB, groups).clamp(0.0, 1.0),
         per_patient_mean(ssim, groups).clamp(0.0, 1.0)], dim=1)
    rec, rec_count = _dp_rows(rows, clip=math.sqrt(2.0), sigma=noise.scale, rng=rng)
    return LatentStats(second_moment_sum=float(sums[0]), count=count, epsilon=ledger.epsilon(),
                       recon_psnr_sum=float(rec[0]), recon_ssim_sum=float(rec[1]),
                       recon_count=rec_count)


def _dp_rows(rows: torch.Tensor, *, clip: float, sigma: float, rng: PrivacyRng | None
             ) -> tuple[torch.Tensor, float]:
    """Sum and count of per-patient rows: one Gaussian release (ldm_core.privacy.
    dp_sum_and_count, which also zeroes a non-finite row), or exact when DP is off."""
    if rng is None or sigma == 0.0:
        return rows.double().sum(dim=0), float(rows.shape[0])
    return dp_sum_and_count(rows, clip=clip, noise_multiplier=sigma, generator=rng.generator())
