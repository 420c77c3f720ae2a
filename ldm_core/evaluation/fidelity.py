"""Fidelity of a synthetic image set: does it look like the real data, and is it diverse?

Distribution metrics (FID, KID, precision/recall/density/coverage) act on features ``[N, D]``
from an extractor in ``ldm_core.evaluation.features``; their values are only comparable within the
same feature space (same extractor and seed). Diversity is measured in pixel space with SSIM.

* FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to both feature sets. Biased
  for small N (it shrinks as N grows), so compare FIDs only at equal sample sizes.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over random
  subsets; unbiased at small N, can be slightly negative when the distributions match.
* PRDC (Naeem et al. 2020): precision (fake samples inside the real manifold = quality), recall
  (real samples inside the fake manifold), density (precision robust to outliers, ~1 when equal)
  and coverage (fraction of real neighbourhoods containing a fake sample = mode coverage).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.spatial.distance import cdist
from torch import Tensor

__all__ = ["PSNR_CAP_DB", "fid", "fidelity_report", "kid", "prdc", "psnr", "reconstruction_quality",
           "ssim", "ssim_diversity"]

#: PSNR above this is "perfect" for the reconstruction release: the public cap that bounds one
#: patient's contribution (clipped to [0, cap], released as psnr / cap).
PSNR_CAP_DB = 50.0


def _check_pair(a: np.ndarray, b: np.ndarray, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Validate two feature matrices with equal width and enough rows; return float64 copies."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    for name, x in (("first", a), ("second", b)):
        if x.ndim != 2:
            raise ValueError(f"{name} feature set must be 2-D [N, D], got shape {x.shape}")
        if x.shape[0] < min_rows:
            raise ValueError(f"{name} feature set needs at least {min_rows} rows, got {x.shape[0]}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} feature set contains NaN or inf; check the extractor input")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sets have different widths ({a.shape[1]} vs {b.shape[1]}): "
            "use the same extractor for both"
        )
    return a, b


def fid(a: np.ndarray, b: np.ndarray, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b``.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))``. When N < D the covariances are
    singular and ``sqrtm`` can return non-finite values; then ``eps`` is added to both diagonals
    (as in the reference implementation). Small imaginary parts from round-off are dropped, and
    the result is clipped at 0 (it can dip to -1e-10 for identical sets).
    """
    a, b = _check_pair(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

    Each subset draws ``min(subset_size, len(a), len(b))`` rows from each set without replacement
    using ``numpy.random.default_rng(seed)``, so the value is reproducible.
    """
    a, b = _check_pair(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off_diag = m * (m - 1)
        mmd = (
            (k_xx.sum() - np.trace(k_xx)) / off_diag
            + (k_yy.sum() - np.trace(k_yy)) / off_diag
            - 2.0 * k_xy.mean()
        )
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _kth_nn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row (self excluded)."""
    d = cdist(x, x)
    # column 0 after sorting is the self-distance 0, so the k-th neighbour sits at index k
    return np.partition(d, k, axis=1)[:, k]


def prdc(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    Manifolds are unions of balls around each sample with radius = distance to its k-th nearest
    neighbour in the same set. Identical sets give precision = recall = coverage = 1 and
    density ~ (k+1)/k (each real ball holds itself plus k neighbours); disjoint sets give ~0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real, fake = _check_pair(real, fake, min_rows=k + 1)
    real_radius = _kth_nn_radius(real, k)
    fake_radius = _kth_nn_radius(fake, k)
    d_rf = cdist(real, fake)  # [N_real, N_fake]
    inside_real = d_rf <= real_radius[:, None]  # fake j inside real ball i
    precision = inside_real.any(axis=0).mean()
    recall = (d_rf <= fake_radius[None, :]).any(axis=1).mean()
    density = inside_real.sum() / (k * fake.shape[0])
    coverage = (d_rf.min(axis=1) <= real_radius).mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }


def _gaussian_window(size: int, sigma: float, dims: int = 2) -> Tensor:
    """The separable Gaussian window of SSIM: `size` taps along each of `dims` axes."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    window = g
    for _ in range(dims - 1):
        window = window[..., None] * g
    return window.to(torch.float32)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-pair PSNR in dB ``[N]`` for images ``[N, C, H, W]`` in [-1, 1] (data range 2),
    capped at ``PSNR_CAP_DB`` (identical images would be infinite)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP_DB)


@torch.no_grad()
def reconstruction_quality(ae: torch.nn.Module, images: Tensor, device: torch.device,
                           chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB) and SSIM of the autoencoder's deterministic reconstruction (the
    posterior mean decoded): how much the latent space can hold before any denoiser is
    trained. A poor value here caps TSTR and fidelity whatever the denoiser does.

    `images` is the autoencoder's input; with a mask channel (paired generation) only the
    image channel (0) is scored: the mask is judged by the segmentation utility."""
    ae.eval().to(device)
    p, q = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(device)
        rec = ae.reconstruct(x).clamp(-1.0, 1.0)[:, :1]
        x = x[:, :1]
        p.append(psnr(rec, x).cpu())
        q.append(ssim(rec, x).cpu())
    empty = torch.zeros(0)
    return (torch.cat(p) if p else empty), (torch.cat(q) if q else empty)


def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pair SSIM ``[N]`` for images ``[N, C, H, W]`` or volumes ``[N, C, D, H, W]`` in
    [-1, 1] (data range 2).

    Gaussian-window SSIM (Wang et al. 2004) with 'valid' filtering (a cubic window for
    volumes); the window shrinks to the largest odd size that fits images smaller than
    ``window_size``. Channels are averaged.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"ssim needs images [N,C,H,W] or volumes [N,C,D,H,W], got shape "
                         f"{tuple(x.shape)}")
    dims = x.ndim - 2
    size = min(window_size, *x.shape[2:])
    size = size if size % 2 == 1 else size - 1
    if size < 1:
        raise ValueError(f"images of shape {tuple(x.shape)} are too small for SSIM")
    channels = x.shape[1]
    window = _gaussian_window(size, sigma, dims).to(x.device).expand(channels, 1,
                                                                     *(size,) * dims)
    conv = F.conv2d if dims == 2 else F.conv3d
    x = x.float()
    y = y.float()

    def filt(t: Tensor) -> Tensor:
        return conv(t, window, groups=channels)

    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)


def ssim_diversity(
    images: Tensor, labels: Tensor, *, pairs: int = 200, seed: int = 0
) -> dict[int, float]:
    """Mean SSIM between random pairs of distinct images of the same class, per class.

    Lower means more diverse; a value near 1 means the class collapsed to near-copies (mode
    collapse or memorisation of one image). Classes with fewer than two images are left out.
    Uses all pairs when a class has at most ``pairs`` distinct pairs, else ``pairs`` random ones.
    """
    if images.ndim not in (4, 5) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            "ssim_diversity needs images [N,C,H,W] (or volumes) and labels [N] of equal N, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    rng = np.random.default_rng(seed)
    labels_np = labels.detach().cpu().numpy()
    out: dict[int, float] = {}
    for cls in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == cls)
        n = idx.size
        if n < 2:
            continue
        if n * (n - 1) // 2 <= pairs:
            i, j = np.triu_indices(n, k=1)
        else:
            i = rng.integers(0, n, size=pairs)
            j = (i + rng.integers(1, n, size=pairs)) % n  # j != i
        first = images[torch.as_tensor(idx[i])]
        second = images[torch.as_tensor(idx[j])]
        out[int(cls)] = float(ssim(first, second).mean())
    return out


def _real_split_baseline(real_f: np.ndarray, *, k: int, seed: int) -> dict[str, float]:
    """Metrics between two random halves of the real features (the 'perfect generator' score)."""
    perm = np.random.default_rng(seed).permutation(real_f.shape[0])
    half = real_f.shape[0] // 2
    a, b = real_f[perm[:half]], real_f[perm[half : 2 * half]]
    kid_mean, _ = kid(a, b, seed=seed)
    out = {"fid": fid(a, b), "kid": kid_mean}
    out.update(prdc(a, b, k=max(1, min(k, half - 1))))
    return out


def fidelity_report(
    real_images: Tensor,
    real_labels: Tensor,
    fake_images: Tensor,
    fake_labels: Tensor,
    *,
    extractors: Mapping[str, Callable[[Tensor], np.ndarray]],
    seed: int = 0,
    k: int = 5,
) -> dict:
    """All fidelity metrics, one block per feature space, plus pixel-space diversity.

    Returns ``{space: {fid, kid, kid_std, precision, recall, density, coverage, n_real, n_fake,
    real_split}, "diversity": {"real": {class: ssim}, "synthetic": {class: ssim}}}``.
    ``real_split`` holds the same metrics for two seeded random halves of the real set: what a
    perfect generator would score at (half) this sample size, so readers can calibrate numbers
    that have no absolute scale in a random feature space (absent with fewer than 4 real images).
    ``k`` is capped at ``min(N) - 1`` so tiny sets still run. FID is biased by N: compare runs at
    equal set sizes.
    """
    if not extractors:
        raise ValueError("extractors is empty: pass e.g. ldm_core.evaluation.feature_spaces()")
    if "diversity" in extractors:
        raise ValueError("'diversity' is reserved in the report; rename that feature space")
    n_min = min(real_images.shape[0], fake_images.shape[0])
    if n_min < 2:
        raise ValueError(f"need at least 2 real and 2 synthetic images, got {n_min} in one set")
    report: dict = {}
    for name, extractor in extractors.items():
        real_f = np.asarray(extractor(real_images), dtype=np.float64)
        fake_f = np.asarray(extractor(fake_images), dtype=np.float64)
        kid_mean, kid_std = kid(real_f, fake_f, seed=seed)
        block = {"fid": fid(real_f, fake_f), "kid": kid_mean, "kid_std": kid_std}
        block.update(prdc(real_f, fake_f, k=max(1, min(k, n_min - 1))))
        block.update({"n_real": int(real_f.shape[0]), "n_fake": int(fake_f.shape[0])})
        if real_f.shape[0] >= 4:
            block["real_split"] = _real_split_baseline(real_f, k=k, seed=seed)
        report[name] = block
    report["diversity"] = {
        "real": ssim_diversity(real_images, real_labels, seed=seed),
        "synthetic": ssim_diversity(fake_images, fake_labels, seed=seed),
    }
    return report
