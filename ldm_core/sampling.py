"""Explicit DDIM sampling loop with classifier-free guidance.

The loop is written out (rather than hidden in an inferer) so that guidance, the null label and
the seeded noise are visible and testable: the same seed gives the same images.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from tqdm.auto import tqdm

from ldm_core.config import ModelConfig
from ldm_core.data import split_channels
from ldm_core.models import embed_index, make_sample_scheduler, null_label


@torch.no_grad()
def sample_latents(
    unet: DiffusionModelUNet,
    cfg: ModelConfig,
    labels: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    device: torch.device,
    clip: float = 3.0,
    site: int | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM from Gaussian noise with classifier-free guidance.

    The denoiser's output (epsilon or velocity, per cfg.prediction_type) is guided as
    out = out_null + w * (out_label - out_null); both targets are linear in the score, so the
    same formula holds for either. ``labels`` are classes; ``site`` a site slot of a
    site-conditional model (None: any site, models.embed_index). ``eta`` is DDIM's
    stochasticity: 0 is the deterministic sampler, 1 the ancestral (DDPM-like) one, whose fresh
    noise at every step is drawn from ``generator`` too (through a device generator seeded from
    it), so a seed still fixes the images.
    """
    unet.eval().to(device)
    sched = make_sample_scheduler(cfg, steps, clip)
    b = labels.shape[0]
    shape = (b, *cfg.latent_shape)
    z = torch.randn(shape, generator=generator).to(device)
    labels = embed_index(cfg, labels, site).to(device)
    null = torch.full_like(labels, null_label(cfg))
    step_gen = None
    if eta > 0:
        step_gen = torch.Generator(device=device).manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator)))
    for t in sched.timesteps:
        tt = torch.full((b,), int(t), device=device, dtype=torch.long)
        if guidance_scale == 1.0:
            out = unet(z, tt, class_labels=labels)
        else:
            both = unet(torch.cat([z, z]), torch.cat([tt, tt]),
                        class_labels=torch.cat([labels, null]))
            out_c, out_u = both.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        z, _ = sched.step(out, int(t), z, eta=eta, generator=step_gen)
    return z


@torch.no_grad()
def generate_images(
    ae: AutoencoderKL,
    unet: DiffusionModelUNet,
    cfg: ModelConfig,
    labels: torch.Tensor,
    *,
    scale_factor: float,
    steps: int,
    guidance_scale: float,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    show_progress: bool = False,
    clip: float = 3.0,
    site: int | None = None,
    all_channels: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """Images in [-1, 1], shape [N, 1, H, W], one per label, deterministic given `seed`;
    ``site`` asks a site-conditional model for one site's style (None: any site).

    A paired model (``cfg.mask_channels``) also decodes a mask channel; ``all_channels`` keeps
    it, as the autoencoder's own input form (the audits score generated records that way);
    `generate_pairs` returns it as a binary mask."""
    gen = torch.Generator().manual_seed(seed)
    ae.eval().to(device)
    out = []
    chunks = range(0, labels.shape[0], batch_size)
    for i in tqdm(chunks, desc="sampling", disable=not show_progress, leave=False):
        z = sample_latents(
            unet,
            cfg,
            labels[i : i + batch_size],
            steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            device=device,
            clip=clip,
            site=site,
            eta=eta,
        )
        x = ae.decode(z / scale_factor).clamp(-1, 1).cpu()
        out.append(x if all_channels else x[:, :1])
    if not out:
        return torch.zeros(0, cfg.image_channels if all_channels else 1,
                           *(cfg.image_size,) * cfg.spatial_dims)
    return torch.cat(out)


def generate_pairs(ae: AutoencoderKL, unet: DiffusionModelUNet, cfg: ModelConfig,
                   labels: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,1,H,W] in [-1, 1] and their masks [N,1,H,W] in {0, 1}, decoded from one
    latent each (so they are aligned by construction); keyword arguments as `generate_images`.
    """
    if not cfg.mask_channels:
        raise ValueError("generate_pairs needs a paired model (model.mask_channels = 1); this "
                         "run generates images only")
    x = generate_images(ae, unet, cfg, labels, all_channels=True, **kwargs)
    images, masks = split_channels(x)
    assert masks is not None
    return images, masks
