"""Generic procedural images: what a modality-agnostic autoencoder prior learns to compress.

An autoencoder pretrained only on brain phantoms learns to draw brain phantoms: on real images
of another look it blurs what it has never seen (on real brain MRI at 32 px it reconstructs at
24.0 dB against 28.4 dB on phantoms). Half of the generic prior's public images are these
instead: overlapping soft or sharp ellipses and rings of any brightness and size, smooth and
fine textures inside them, background gradients and fields, noise, blur and a random gamma,
each image scaled to the full range. None of it is anatomy, and none of it comes from a
patient: it teaches the latent space edges, blobs, rings and textures at every contrast, which
is what any medical modality is made of at this resolution (docs/benchmarks.md section 10b:
+2.8 dB on real MRI for -0.3 dB on phantoms).
"""

from __future__ import annotations

import numpy as np
import torch

from ldm_core.phantoms import _blur, _col, _edge, _smooth_noise

SHAPES = 6  # ellipses a canvas may hold (each present with probability 0.7)


def generic_images(n: int, image_size: int, seed: int) -> torch.Tensor:
    """[n, 1, S, S] in [-1, 1]: generic procedural images, a function of ``seed`` alone."""
    if n < 1 or image_size < 8:
        raise ValueError(f"generic_images needs n >= 1 and image_size >= 8, got {n}, "
                         f"{image_size}")
    rng = np.random.default_rng(seed)
    axis = np.linspace(-1, 1, image_size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    img = (_col(rng.uniform(0, 0.3, n))
           + _col(rng.uniform(0, 0.4, n)) * _smooth_noise(rng, n, image_size, 0.3) * 0.5)
    slope = rng.uniform(-0.3, 0.3, (n, 2)).astype(np.float32)
    img = img + _col(slope[:, 0]) * xx + _col(slope[:, 1]) * yy
    px = 2.0 / image_size
    for _ in range(SHAPES):
        on = rng.random(n) < 0.7
        cx, cy = rng.uniform(-0.7, 0.7, (2, n))
        a, b = rng.uniform(0.05, 0.8, (2, n))
        theta = rng.uniform(0, np.pi, n)
        c, s = np.cos(theta), np.sin(theta)
        u = (_col(c) * (xx - _col(cx)) + _col(s) * (yy - _col(cy))) / _col(a)
        v = (-_col(s) * (xx - _col(cx)) + _col(c) * (yy - _col(cy))) / _col(b)
        r = np.sqrt(u ** 2 + v ** 2)
        width = _col(rng.uniform(0.5, 3.0, n) * px) / _col(np.minimum(a, b))
        inside = _edge(1 - r, width)
        ring = rng.random(n) < 0.3
        inner = _edge(_col(rng.uniform(0.5, 0.9, n)) - r, width)
        shape = np.where(_col(ring) > 0, inside - inner, inside)
        texture = 1 + _col(rng.uniform(0, 0.5, n)) * _smooth_noise(
            rng, n, image_size, rng.uniform(0.03, 0.15))
        img = img + _col(on) * shape * _col(rng.uniform(-0.6, 1.0, n)) * texture
    img = img + _col(rng.uniform(0, 0.08, n)) * rng.standard_normal(img.shape).astype(np.float32)
    img = _blur(img, rng.uniform(0.01, 1.2, n).astype(np.float32))
    lo = np.percentile(img, 1, axis=(1, 2), keepdims=True)
    hi = np.percentile(img, 99.5, axis=(1, 2), keepdims=True)
    img = np.clip((img - lo) / (hi - lo + 1e-6), 0, 1) ** _col(rng.uniform(0.6, 1.6, n))
    return torch.from_numpy(img * 2 - 1).float().unsqueeze(1)
