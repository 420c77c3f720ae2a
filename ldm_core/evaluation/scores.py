"""Per-sample scores the privacy audits need from the generator itself.

The membership-inference score is the denoising loss of the *global* denoiser on an image at
fixed timesteps with fixed noise: models fit their training members better, so a lower loss
hints at membership. Fixed timesteps/noise make the score a deterministic function of the
image, so members and non-members are scored identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from ldm_core.config import ModelConfig
from ldm_core.losses import diffusion_loss
from ldm_core.models import make_train_scheduler

MIA_TIMESTEPS = (20, 50, 100, 200, 400)


@torch.no_grad()
def denoising_scores(
    ae: AutoencoderKL,
    dm: DiffusionModelUNet,
    cfg: ModelConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale_factor: float,
    timesteps: Sequence[int] = MIA_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean conditional denoising loss per image over `timesteps` ([N], lower = better fit)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    sched = make_train_scheduler(cfg)
    ts = [t for t in timesteps if 0 <= t < cfg.num_train_timesteps]
    if not ts:
        raise ValueError(f"no timestep of {list(timesteps)} is below {cfg.num_train_timesteps}")
    ae.eval()
    dm.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        z = ae.encode(x)[0] * scale_factor
        total = torch.zeros(x.shape[0])
        for j, t in enumerate(ts):
            # noise depends on (seed, position in the set, timestep index) only
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i * 31 + j)
            noise = torch.randn(z.shape, generator=gen)
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            total += diffusion_loss(dm, sched, z, y, timesteps=tt, noise=noise)
        out.append(total / len(ts))
    return torch.cat(out) if out else torch.zeros(0)
