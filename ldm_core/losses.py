"""Per-sample losses: every function returns a tensor of shape [B].

The caller reduces. Keeping the reduction outside is what makes the loss consistent with what
Opacus clips (one gradient per sample), and what lets the membership-inference audit reuse the
very same denoising loss per image.
"""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(dim=1)


def kl_per_sample(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) averaged over latent elements, per sample."""
    var = z_sigma.pow(2).clamp_min(1e-8)
    return _per_sample_mean(0.5 * (z_mu.pow(2) + var - torch.log(var) - 1.0))


def autoencoder_loss(
    ae: AutoencoderKL, x: torch.Tensor, *, kl_weight: float, noise: torch.Tensor
) -> torch.Tensor:
    """L1 reconstruction + KL, per sample. `noise` is the reparameterisation noise (passed in).

    A paired input (image channel, then mask channels in -1/+1) scores its masks with
    `balanced_mask_l1`, averaged with the image channel's L1.
    """
    z_mu, z_sigma = ae.encode(x)
    z = z_mu + z_sigma * noise
    recon = ae.decode(z)
    if x.shape[1] == 1:
        error = _per_sample_mean((recon - x).abs())
    else:
        error = (_per_sample_mean((recon[:, :1] - x[:, :1]).abs())
                 + balanced_mask_l1(recon[:, 1:], x[:, 1:])) / 2
    return error + kl_weight * kl_per_sample(z_mu, z_sigma)


def balanced_mask_l1(recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 of a -1/+1 mask, lesion and background pixels weighted half each.

    Why: lesions cover a few percent of a slice, so a plain L1 is minimised by drawing no lesion
    at all (measured: a paired autoencoder trained 300 steps without DP reconstructed every
    lesion mask as empty, Dice 0). Balancing the two classes makes a missed lesion cost as much
    as a wrong background. A sample with no lesion pixel is scored on its background alone.
    """
    error = (recon - mask).abs().flatten(1)
    fg = (mask > 0).flatten(1).to(error.dtype)
    n_fg, n_bg = fg.sum(1), (1 - fg).sum(1)
    on_fg = (error * fg).sum(1) / n_fg.clamp(min=1)
    on_bg = (error * (1 - fg)).sum(1) / n_bg.clamp(min=1)
    return torch.where(n_fg > 0, (on_fg + on_bg) / 2, on_bg)


def diffusion_loss(
    unet: DiffusionModelUNet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """MSE per sample against the scheduler's target (noise, or velocity for v-prediction)."""
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)
    pred = unet(noisy, timesteps, class_labels=labels)
    target = (scheduler.get_velocity(latents, noise, timesteps)
              if scheduler.prediction_type == "v_prediction" else noise)
    return _per_sample_mean((pred - target).pow(2))


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, *,
                     logit: tuple[float, float] | None = None) -> torch.Tensor:
    """n training timesteps: uniform, or logit-normal with logit = (mean, std).

    A logit-normal draw reweights the denoising objective towards one band of noise levels
    (as in rectified-flow training); under DP every step is expensive, so where the steps go
    matters. The draw comes from the training generator, never from the privacy noise's.
    """
    if logit is None:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    mean, std = logit
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def multiplicity_diffusion_loss(
    unet: DiffusionModelUNet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    generator: torch.Generator,
    timestep_logit: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Mean over K (timestep, noise) draws per sample, as K forward calls of the same rows.

    Under Opacus' hooks mode the K forward calls followed by ONE backward accumulate into a single
    per-sample gradient, which is then clipped once: a sample's influence stays bounded by the
    clip norm. Replicating samples as K extra batch rows would instead clip each row on its own
    and multiply the sample's true sensitivity by K, unseen by the accountant
    (docs/architecture.md, "Privacy accounting").
    """
    b = latents.shape[0]
    total = torch.zeros(b, device=latents.device)
    for _ in range(k):
        t = sample_timesteps(b, scheduler.num_train_timesteps, generator,
                             logit=timestep_logit).to(latents.device)
        n = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device)
        total = total + diffusion_loss(unet, scheduler, latents, labels, timesteps=t, noise=n)
    return total / k
