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

import math
from dataclasses import dataclass

import torch

from client.ledger import PrivacyLedger
from client.site_config import SiteConfig
from ldm_core.config import PhaseConfig, RunConfig
from ldm_core.data import ImageSet, SiteData, load_site
from ldm_core.dp_random import PrivacyRng, privacy_rng_for
from ldm_core.losses import autoencoder_loss, diffusion_loss, multiplicity_diffusion_loss
from ldm_core.models import (
    make_autoencoder,
    make_denoiser,
    make_train_scheduler,
    resolve_device,
)
from ldm_core.privacy import (
    History,
    calibrate_noise,
    dp_sum_and_count,
    gaussian_mechanism_entry,
)
from ldm_core.training import SamplingPlan, dp_train, sampling_plan

PHASES = ("autoencoder", "diffusion")
# Per-sample loss clip for the DP release of training-curve values (losses above are rare).
LOSS_CLIP = 2.0


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers of every release this site makes in one run."""

    target_epsilon: float
    delta: float
    ae: float
    dm: float
    metric: float
    scale: float
    ae_plan: SamplingPlan
    dm_plan: SamplingPlan
    audit: float = 0.0

    def phase_sigma(self, phase: str) -> float:
        return self.ae if phase == "autoencoder" else self.dm

    def phase_plan(self, phase: str) -> SamplingPlan:
        return self.ae_plan if phase == "autoencoder" else self.dm_plan


def load_data(site: SiteConfig, cfg: RunConfig) -> SiteData:
    scheme, n_sites = (("iid", 1) if site.partition == "all"
                       else (site.partition, site.n_sites))
    return load_site(site.data, site_index=site.site_index if n_sites > 1 else 0,
                     n_sites=n_sites, scheme=scheme, image_size=cfg.model.image_size,
                     seed=site.data_seed, holdout_fraction=site.holdout_fraction,
                     test_fraction=site.test_fraction, progress=site.show_progress)


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
    """Calibrate all noise multipliers once for the whole run plan (both phases).

    Inputs are the configuration, the site's budget and what earlier runs spent: never the data.
    Reserved releases (latent scale factor, one training-curve value per round, the audit when
    the site allows audits) are fixed Gaussian mechanisms; the two training phases share the rest.
    """
    ae_plan = sampling_plan(cfg.autoencoder)
    dm_plan = sampling_plan(cfg.diffusion)
    target = site.effective_target(cfg.privacy.epsilon)
    if math.isinf(target):
        return NoisePlan(target, site.delta, 0.0, 0.0, 0.0, 0.0, ae_plan, dm_plan)
    metric = cfg.privacy.scale_noise_multiplier / 2
    scale = cfg.privacy.scale_noise_multiplier
    audit = cfg.privacy.audit_noise_multiplier
    # Retry reserve: a round that crashed between its charge and its stored reply is charged
    # again when retried; planning `retry` extra rounds per phase (and releases) means a killed
    # run can still finish within the target. Unused reserve is budget left unspent.
    retry = cfg.privacy.retry_reserve_rounds
    ae_rounds, dm_rounds = (r + retry if r > 0 else 0 for r in
                            (cfg.autoencoder.rounds, cfg.diffusion.rounds))
    reserved = prior_history(ledger, run_id) + [gaussian_mechanism_entry(scale)] * (1 + retry) + \
        [gaussian_mechanism_entry(metric)] * (ae_rounds + dm_rounds) + \
        ([gaussian_mechanism_entry(audit)] if site.allow_audit else [])
    phases = [(p.sample_rate, p.steps * r) for p, r in ((ae_plan, ae_rounds), (dm_plan, dm_rounds))]
    share = cfg.privacy.ae_share
    sig_ae, sig_dm = calibrate_noise(phases, target_epsilon=target, delta=site.delta,
                                     shares=[share, 1 - share], reserved=reserved)
    return NoisePlan(target, site.delta, sig_ae, sig_dm, metric, scale, ae_plan, dm_plan,
                     audit if site.allow_audit else 0.0)


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
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return torch.stack([values[rows].mean() for rows in index.values()])


def _dp_mean(values: torch.Tensor, *, clip: float, sigma: float, rng: PrivacyRng) -> float:
    if sigma == 0.0:
        return float(values.clamp(0, clip).mean())
    total, count = dp_sum_and_count(values.clamp(0, clip).unsqueeze(1), clip=clip,
                                    noise_multiplier=sigma, generator=rng.generator())
    return float(total[0]) / max(float(count), 1.0)


@dataclass(frozen=True)
class RoundResult:
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
) -> RoundResult:
    """One local round of DP-SGD on the site's train split; returns DP weights + DP loss.

    `seed` drives only what is not privacy-relevant; Poisson sampling, DP noise and the loss
    release draw from the site's privacy source.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
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
    phase_cfg = cfg.autoencoder if phase == "autoencoder" else cfg.diffusion
    if phase == "autoencoder":
        model = make_autoencoder(cfg.model)
        model.load_state_dict(weights)
        tensors: tuple[torch.Tensor, ...] = (data.train.images,)
        loss_fn = ae_loss_fn(cfg)
    else:
        if ae_weights is None:
            raise ValueError("diffusion round without autoencoder weights")
        ae = make_autoencoder(cfg.model)
        ae.load_state_dict(ae_weights)
        latents = encode(ae, data.train.images, scale_factor, device)
        model = make_denoiser(cfg.model)
        model.load_state_dict(weights)
        tensors = (latents, data.train.labels)
        loss_fn = dm_loss_fn(cfg, phase_cfg)
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
        per_sample = _eval_losses(model, tensors, phase, cfg, seed, device)
    loss = _dp_mean(per_patient_mean(per_sample, groups), clip=LOSS_CLIP, sigma=noise.metric,
                    rng=rng)
    return RoundResult(
        weights={k: v.detach().cpu() for k, v in model.state_dict().items()},
        loss=loss, epsilon=ledger.epsilon(), budget_epsilon=ledger.budget_epsilon,
        delta=ledger.delta, noise_multiplier=sigma, steps=stats.steps,
        sample_rate=plan.sample_rate,
    )


def ae_loss_fn(cfg: RunConfig):  # noqa: ANN202 - a closure with the LossFn signature
    m = cfg.model

    def fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
           ) -> torch.Tensor:
        x = batch[0]
        noise = torch.randn((x.shape[0], m.latent_channels, m.latent_size, m.latent_size),
                            generator=gen).to(x.device)
        return autoencoder_loss(model, x, kl_weight=cfg.dm.kl_weight, noise=noise)

    return fn


def dm_loss_fn(cfg: RunConfig, phase_cfg: PhaseConfig):  # noqa: ANN202
    sched = make_train_scheduler(cfg.model)
    null = cfg.model.n_classes

    def fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
           ) -> torch.Tensor:
        z, y = batch
        drop = torch.rand(y.shape[0], generator=gen).to(y.device) < cfg.dm.label_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        return multiplicity_diffusion_loss(model, sched, z, y, k=phase_cfg.noise_multiplicity,
                                           generator=gen)

    return fn


def _eval_losses(model: torch.nn.Module, tensors: tuple[torch.Tensor, ...], phase: str,
                 cfg: RunConfig, seed: int, device: torch.device) -> torch.Tensor:
    """Per-sample loss of the trained model on the train split (input to a DP mean)."""
    gen = torch.Generator().manual_seed(seed + 3)
    model.eval().to(device)
    out = []
    m = cfg.model
    sched = make_train_scheduler(m)
    for i in range(0, tensors[0].shape[0], 256):
        chunk = [t[i:i + 256].to(device) for t in tensors]
        if phase == "autoencoder":
            x = chunk[0]
            noise = torch.randn((x.shape[0], m.latent_channels, m.latent_size, m.latent_size),
                                generator=gen).to(device)
            out.append(autoencoder_loss(model, x, kl_weight=cfg.dm.kl_weight, noise=noise).cpu())
        else:
            z, y = chunk
            t = torch.randint(0, m.num_train_timesteps, (z.shape[0],), generator=gen).to(device)
            n = torch.randn(z.shape, generator=gen).to(device)
            out.append(diffusion_loss(model, sched, z, y, timesteps=t, noise=n).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode(ae: torch.nn.Module, images: torch.Tensor, scale_factor: float,
           device: torch.device) -> torch.Tensor:
    """Posterior means, scaled: the denoiser trains on unit-variance latents."""
    ae.eval().to(device)
    out = [ae.encode(images[i:i + 256].to(device))[0].cpu() for i in range(0, len(images), 256)]
    return torch.cat(out) * scale_factor


@dataclass(frozen=True)
class LatentStats:
    second_moment_sum: float
    count: float
    epsilon: float


def latent_stats(site: SiteConfig, cfg: RunConfig, *, run_id: str,
                 ae_weights: dict[str, torch.Tensor]) -> LatentStats:
    """DP release of the mean squared latent (for the scale factor 1/std), charged first.

    Each patient contributes the mean squared latent value of its images, clipped to
    `scale_clip`; the sum and the count go out through one Gaussian mechanism
    (ldm_core.privacy.dp_sum_and_count) whose noise comes from the site's privacy source.
    """
    ledger = open_ledger(site)
    noise = plan_noise(site, cfg, ledger, run_id)
    ledger.charge([gaussian_mechanism_entry(noise.scale)] if noise.scale > 0 else
                  [(0.0, 1.0, 1)], run_id=run_id, phase="latent-scale", round=0)
    data = load_data(site, cfg)
    check_classes(site, cfg, data)
    ae = make_autoencoder(cfg.model)
    ae.load_state_dict(ae_weights)
    z = encode(ae, data.train.images, 1.0, resolve_device(site.device))
    per_image = z.pow(2).flatten(1).mean(dim=1)
    per_sample = per_patient_mean(per_image, patient_groups(data, data.train)).clamp(
        0, cfg.privacy.scale_clip)
    if noise.scale == 0.0:
        total, count = float(per_sample.sum()), float(per_sample.shape[0])
    else:
        rng = site_privacy_rng(site, run_id, "latent-scale", 0)
        s, count = dp_sum_and_count(per_sample.unsqueeze(1), clip=cfg.privacy.scale_clip,
                                    noise_multiplier=noise.scale, generator=rng.generator())
        total = float(s[0])
    return LatentStats(second_moment_sum=total, count=float(count), epsilon=ledger.epsilon())
