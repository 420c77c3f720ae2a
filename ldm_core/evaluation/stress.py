"""Stress-testing a classifier on controlled variation: image shifts and how they are scored.

A model that holds up on its own test set may still break on a scanner with more noise, a softer
kernel or another contrast. The synthetic generator gives an unlimited, labelled supply to probe
that with: the same labelled images, shifted in one controlled way at a time. The shifts here are
deterministic given a generator (a reproducible probe, not a privacy mechanism), act on images in
[-1, 1] ``[N, 1, H, W]`` (or volumes ``[N, 1, D, H, W]``: the blur is then isotropic in 3D) and
return images in the same range.

Scores are macro one-vs-rest AUC and accuracy of the user's model, with 95 % intervals from a
bootstrap over images (synthetic images are independent draws, there are no patients to group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_core.evaluation.utility import _ci, bootstrap_counts, weighted_ovr_auc

__all__ = ["SHIFTS", "Shift", "apply_shift", "score_predictions"]


@dataclass(frozen=True)
class Shift:
    """One controlled variation: a family (what changes) and a level (by how much)."""

    family: str
    level: float

    @property
    def name(self) -> str:
        return f"{self.family} {self.level:g}"


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur along every spatial axis (2 for images, 3 for volumes), edges
    replicated: a softer reconstruction kernel acts on the whole grid, not slice by slice."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    dims, channels = x.ndim - 2, x.shape[1]
    conv = F.conv2d if dims == 2 else F.conv3d
    out = F.pad(x, (radius, radius) * dims, mode="replicate")
    for axis in reversed(range(dims)):  # last axis first, as the 2D probe always did
        shape = [1] * dims
        shape[axis] = -1
        out = conv(out, k.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return out


def _noise(x: Tensor, level: float, g: torch.Generator) -> Tensor:
    return x + level * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _gamma(x: Tensor, level: float) -> Tensor:
    """Contrast by a gamma curve on [0, 1]: < 1 brightens dark tissue, > 1 darkens it."""
    return ((x + 1) / 2).clamp(0, 1).pow(level) * 2 - 1


def _gain(x: Tensor, level: float) -> Tensor:
    """Intensity scaling about the background (-1): a scanner's overall brightness."""
    return (x + 1) * level - 1


_FAMILIES: dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "noise": _noise,
    "blur": lambda x, s, g: _gaussian_blur(x, s),
    "contrast": lambda x, s, g: _gamma(x, s),
    "intensity": lambda x, s, g: _gain(x, s),
}

# The default probe: levels that stay plausible for MRI (a few % noise up to strong, blur up to
# ~1.5 px, gamma 0.6-1.6, gain +-25 %).
SHIFTS: tuple[Shift, ...] = (
    Shift("noise", 0.05), Shift("noise", 0.1), Shift("noise", 0.2),
    Shift("blur", 0.5), Shift("blur", 1.0), Shift("blur", 1.5),
    Shift("contrast", 0.6), Shift("contrast", 0.8), Shift("contrast", 1.25), Shift("contrast", 1.6),
    Shift("intensity", 0.75), Shift("intensity", 0.9), Shift("intensity", 1.1),
    Shift("intensity", 1.25),
)


def apply_shift(images: Tensor, shift: Shift, generator: torch.Generator) -> Tensor:
    """``images`` shifted by ``shift``, clipped back to [-1, 1]."""
    if shift.family not in _FAMILIES:
        raise ValueError(f"unknown shift family {shift.family!r}; known: {sorted(_FAMILIES)}")
    if not shift.level > 0:
        raise ValueError(f"shift level must be > 0, got {shift.level}")
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [N, C, H, W] or volumes [N, C, D, H, W], got shape "
                         f"{tuple(images.shape)}")
    return _FAMILIES[shift.family](images.float(), shift.level, generator).clamp(-1, 1)


def score_predictions(labels: np.ndarray, proba: np.ndarray, *, groups: np.ndarray | None = None,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """Macro one-vs-rest AUC and accuracy with 95 % bootstrap intervals.

    ``groups`` (e.g. patient ids as integer codes) makes the bootstrap resample groups, so
    slices of one patient move together; without it each image is its own unit.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"proba must be [N, C] for {y.shape[0]} labels, got {p.shape}")
    codes = np.arange(y.size) if groups is None else np.unique(groups, return_inverse=True)[1]
    n_units = int(codes.max()) + 1 if codes.size else 0
    counts = bootstrap_counts(n_units, n_boot, seed)
    w = np.vstack([np.ones((1, y.size)), counts[:, codes].astype(np.float64)])
    present = [c for c in range(p.shape[1]) if (y == c).any() and (y != c).any()]
    auc = np.mean([weighted_ovr_auc(y == c, p[:, c], w) for c in present], axis=0) if present \
        else np.full(w.shape[0], np.nan)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    acc = (w @ correct) / w.sum(axis=1)
    return {"auc": float(auc[0]), "auc_ci": _ci(auc[1:]), "acc": float(acc[0]),
            "acc_ci": _ci(acc[1:]), "n": int(y.size)}
