"""MONAI network and scheduler factories.

Networks come from MONAI (a project decision: never hand-write a UNet or a scheduler).
Everything here is
GroupNorm-only, so Opacus can compute per-sample gradients and no BatchNorm statistics leak.
The denoiser gets one extra class embedding (index ``n_classes``) as the "null" label used for
classifier-free guidance. With site-conditional generation (``site_slots = S > 0``) the
embedding index encodes a (class, site) pair: ``class + (n_classes + 1) * site``, where class
``n_classes`` is "no class" and site ``S`` is "any site" (`embed_index`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from ldm_core.config import ModelConfig

# scaled_linear_beta with these ends is MONAI's latent-diffusion recipe (Pinaya et al.).
SCHEDULE = {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}


def make_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    """KL autoencoder without attention: attention blocks cost memory and add nothing at 64 px.

    With ``mask_channels`` the mask is an extra input and output channel (paired generation)."""
    levels = len(cfg.ae_channels)
    return AutoencoderKL(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.image_channels,
        out_channels=cfg.image_channels,
        channels=tuple(cfg.ae_channels),
        latent_channels=cfg.latent_channels,
        num_res_blocks=(cfg.ae_res_blocks,) * levels,
        attention_levels=(False,) * levels,
        norm_num_groups=cfg.ae_norm_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def make_denoiser(cfg: ModelConfig) -> DiffusionModelUNet:
    """Class-conditional UNet; ``num_class_embeds = n_classes + 1`` (the last one is null),
    times ``site_slots + 1`` with site-conditional generation (`embed_index`)."""
    return DiffusionModelUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        channels=tuple(cfg.dm_channels),
        attention_levels=tuple(cfg.dm_attention),
        num_res_blocks=cfg.dm_res_blocks,
        norm_num_groups=cfg.dm_norm_groups,
        num_head_channels=cfg.dm_head_channels,
        num_class_embeds=(cfg.n_classes + 1) * (cfg.site_slots + 1),
    )


@torch.no_grad()
def encode(ae: torch.nn.Module, images: torch.Tensor, scale_factor: float,
           device: torch.device, chunk: int = 256) -> torch.Tensor:
    """Posterior means, scaled: the denoiser trains on unit-variance latents.

    Chunked so a whole site's train split fits in memory; the result is back on the CPU.
    """
    ae.eval().to(device)
    out = [ae.encode(images[i:i + chunk].to(device))[0].cpu()
           for i in range(0, len(images), chunk)]
    return torch.cat(out) * scale_factor


def make_train_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                         prediction_type=cfg.prediction_type, **SCHEDULE)


def make_sample_scheduler(cfg: ModelConfig, steps: int, clip: float = 3.0) -> DDIMScheduler:
    """DDIM that reads the denoiser's output as training defined it, and clips its x0 estimate.

    `prediction_type` must match the training scheduler's: a DDIM that reads a velocity as noise
    samples head-shaped blobs from a good model (tests/ldm_core/test_sampling.py guards this).
    Latents are unit-scaled, so clipping x0 to +-clip (clip <= 0: off) keeps every plausible
    value and only stops an imperfect (e.g. DP-trained) denoiser's error at high noise, divided
    by sqrt(alpha_bar) ~ 0.07, from running away.
    """
    sched = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        clip_sample=clip > 0,
        clip_sample_min=-abs(clip),
        clip_sample_max=abs(clip),
        prediction_type=cfg.prediction_type,
        **SCHEDULE,
    )
    sched.set_timesteps(min(steps, cfg.num_train_timesteps))
    return sched


def any_site(cfg: ModelConfig) -> int:
    """The site value meaning "any site" (what generation uses unless asked for a site)."""
    return cfg.site_slots


def embed_index(cfg: ModelConfig, labels: torch.Tensor,
                sites: torch.Tensor | int | None = None) -> torch.Tensor:
    """The denoiser's class-embedding index of (class, site) pairs.

    ``labels`` are classes (``n_classes`` = no class); ``sites`` site slots (``site_slots`` =
    any site; None = any site). Without site conditioning the index is the class itself and a
    site other than "any" is an error (the model has no site embeddings).
    """
    if isinstance(sites, torch.Tensor) and sites.shape != labels.shape:
        raise ValueError(f"sites {tuple(sites.shape)} must match labels {tuple(labels.shape)}")
    s = torch.full_like(labels, any_site(cfg)) if sites is None else (
        torch.full_like(labels, int(sites)) if isinstance(sites, int) else sites.to(labels))
    if cfg.site_slots == 0:
        if bool((s != 0).any()):
            raise ValueError("this model was trained without site conditioning "
                             "(model.site_slots = 0): it cannot generate a given site")
        return labels
    if bool(((s < 0) | (s > cfg.site_slots)).any()):
        raise ValueError(f"site slots must be in [0, {cfg.site_slots}] "
                         f"({cfg.site_slots} = any site)")
    return labels + (cfg.n_classes + 1) * s


def null_label(cfg: ModelConfig) -> int:
    """No class at any site: the unconditional branch of classifier-free guidance."""
    return cfg.n_classes + (cfg.n_classes + 1) * any_site(cfg)


def resolve_device(name: str) -> torch.device:
    """`auto` takes a GPU when there is one: hospitals train on GPUs, CI on CPUs."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was asked for, but torch sees no CUDA GPU; "
                           "use --device cpu or auto, or install a CUDA build of torch")
    return torch.device(name)
