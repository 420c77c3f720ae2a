"""Class-conditional sample grids from the global generator (the run's `samples.png`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm_core.config import RunConfig  # noqa: E402
from ldm_core.sampling import generate_images  # noqa: E402
from ldm_core.volumes import display_view  # noqa: E402


def class_grid(images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...],
               per_class: int) -> np.ndarray:
    """[rows=classes, cols=per_class] mosaic as one float array in [0, 1]."""
    h, w = images.shape[-2:]
    grid = np.ones((len(class_names) * (h + 2), per_class * (w + 2)), dtype=np.float32)
    for c in range(len(class_names)):
        imgs = images[labels == c][:per_class]
        for j, img in enumerate(imgs):
            grid[c * (h + 2):c * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = \
                (img[0].numpy() + 1) / 2
    return grid


def save_grid_png(path: Path, grid: np.ndarray, class_names: tuple[str, ...], title: str,
                  cell: int) -> None:
    rows = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4.0, grid.shape[1] / 40), max(2.0, grid.shape[0] / 40)),
                           dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(cell + 2) * r + cell / 2 for r in range(rows)], class_names)
    ax.set_xticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_samples_png(path: Path, cfg: RunConfig, ae: torch.nn.Module, dm: torch.nn.Module,
                      scale_factor: float, *, per_class: int = 8, seed: int = 0,
                      device: torch.device | None = None, title: str = "") -> torch.Tensor:
    device = device or torch.device("cpu")
    labels = torch.arange(cfg.model.n_classes).repeat_interleave(per_class)
    images = generate_images(ae, dm, cfg.model, labels, scale_factor=scale_factor,
                             steps=cfg.dm.ddim_steps, guidance_scale=cfg.dm.guidance_scale,
                             seed=seed, device=device, clip=cfg.dm.clip_latent)
    grid = class_grid(display_view(images), labels, cfg.class_names, per_class)
    save_grid_png(path, grid, cfg.class_names, title or "class-conditional samples (DDIM + CFG)",
                  cfg.model.image_size)
    return images
