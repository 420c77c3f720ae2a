"""Per-record attack scores computed from the generator itself (lower = more member-like).

Two models are trained on private records, so both are attacked:

* ``denoiser``: the class-conditional denoising loss of the global denoiser at a few fixed
  timesteps spread over the schedule, averaged over a few noise draws (Yeom et al. 2018's loss
  attack; Carlini et al. 2023 found small-to-moderate noise levels leak most). Models fit their
  training members better, so members tend to score lower.
* ``autoencoder``: the DP-trained autoencoder's reconstruction error (L1, the term it was trained
  on) through its posterior mean: an autoencoder that memorised a record reconstructs it better.

Why every score is a function of the record alone (plus public, data-independent randomness):
the site's DP release counts records whose score passes a test, and its sensitivity analysis
(``ldm_core.evaluation.attacks``) needs adding or removing one record to change only that
record's own 0/1 values. So the noise draws are the *same* tensors for every record (drawn once
from ``seed``, never from a record's position in its batch or split), and both networks are
GroupNorm-only, so a record's score does not depend on which other records share its batch. The
same noise for every record is also the lower-variance choice for comparing two records (common
random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from ldm_core.config import ModelConfig
from ldm_core.losses import diffusion_loss
from ldm_core.models import embed_index, make_train_scheduler

__all__ = [
    "DENOISER_DRAWS",
    "DENOISER_T_FRACTIONS",
    "autoencoder_scores",
    "denoiser_scores",
    "denoiser_timesteps",
]

# Noise levels as fractions of the training schedule (low, moderate, high noise) and the number
# of noise draws per level; 3 x 4 = 12 forward passes per record.
DENOISER_T_FRACTIONS = (0.05, 0.2, 0.5)
DENOISER_DRAWS = 4


def denoiser_timesteps(cfg: ModelConfig,
                       fractions: Sequence[float] = DENOISER_T_FRACTIONS) -> tuple[int, ...]:
    """The fixed timesteps the denoiser attack uses for `cfg`'s schedule (distinct, sorted)."""
    if not fractions or any(not 0.0 <= f < 1.0 for f in fractions):
        raise ValueError(f"timestep fractions must be non-empty and in [0, 1), got {fractions}")
    steps = {min(cfg.num_train_timesteps - 1, round(f * cfg.num_train_timesteps))
             for f in fractions}
    return tuple(sorted(steps))


def _check_batch(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
        shape = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"images must be a [N,1,H,W] (volumes: [N,1,D,H,W]) tensor, got "
                         f"{shape}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}: "
                         "pass one class label per image")


def _model_device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def denoiser_scores(
    ae: AutoencoderKL,
    dm: DiffusionModelUNet,
    cfg: ModelConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale_factor: float,
    seed: int = 0,
    fractions: Sequence[float] = DENOISER_T_FRACTIONS,
    draws: int = DENOISER_DRAWS,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean conditional denoising loss per image ([N] float64 on CPU; lower = better fit).

    The record's own label conditions the denoiser (the attacker of a conditional model knows
    it). The noise tensors are drawn once from ``seed`` and shared by all records (module doc).
    """
    _check_batch(images, labels)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    ts = denoiser_timesteps(cfg, fractions)
    sched = make_train_scheduler(cfg)
    device = _model_device(dm)
    ae.eval()
    dm.eval()
    gen = torch.Generator().manual_seed(int(seed))
    shape = cfg.latent_shape
    noises = [torch.randn(shape, generator=gen) for _ in range(len(ts) * draws)]
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(_model_device(ae))
        y = embed_index(cfg, labels[i:i + batch_size]).to(device)  # any site
        z = (ae.encode(x)[0] * scale_factor).to(device)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        for j, t in enumerate(ts):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            for k in range(draws):
                noise = noises[j * draws + k].to(device).expand_as(z).contiguous()
                total += diffusion_loss(dm, sched, z, y, timesteps=tt, noise=noise).double()
        out.append((total / (len(ts) * draws)).cpu())
    return torch.cat(out)


@torch.no_grad()
def autoencoder_scores(ae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 256
                       ) -> torch.Tensor:
    """Per-image L1 reconstruction error through the posterior mean ([N] float64; lower = member).

    Deterministic (no reparameterisation noise), so it is a function of the record alone.
    """
    _check_batch(images)
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    ae.eval()
    device = _model_device(ae)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        recon = ae.decode(ae.encode(x)[0])
        out.append((recon - x).abs().flatten(1).mean(dim=1).double().cpu())
    return torch.cat(out)
