"""Stress shifts do what they say (and only that), and the scores' golden values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_core.evaluation.stress import SHIFTS, Shift, apply_shift, score_predictions


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 16, 16, generator=g) * 1.6 - 0.8
    return x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_default_shift_changes_the_images_and_stays_in_range() -> None:
    x = _images()
    for shift in SHIFTS:
        y = apply_shift(x, shift, _gen())
        assert y.shape == x.shape and float(y.min()) >= -1 and float(y.max()) <= 1
        assert not torch.allclose(y, x), shift.name


def test_noise_is_reproducible_and_of_the_stated_size() -> None:
    x = torch.zeros(64, 1, 16, 16)
    a = apply_shift(x, Shift("noise", 0.1), _gen(3))
    torch.testing.assert_close(a, apply_shift(x, Shift("noise", 0.1), _gen(3)))
    assert abs(float(a.std()) - 0.1) < 0.01
    assert not torch.equal(a, apply_shift(x, Shift("noise", 0.1), _gen(4)))


def test_blur_keeps_a_flat_image_and_smooths_an_edge() -> None:
    flat = torch.full((1, 1, 16, 16), 0.3)
    torch.testing.assert_close(apply_shift(flat, Shift("blur", 1.0), _gen()), flat)
    edge = torch.full((1, 1, 16, 16), -1.0)
    edge[..., 8:] = 1.0
    out = apply_shift(edge, Shift("blur", 1.0), _gen())
    assert -1 < float(out[0, 0, 0, 7]) < 0 < float(out[0, 0, 0, 8]) < 1
    torch.testing.assert_close(out.mean(), edge.mean(), atol=1e-6, rtol=0)


def _reference_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Not separable: one convolution with the full outer-product Gaussian kernel."""
    import torch.nn.functional as F

    r = max(1, round(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    dims = x.ndim - 2
    k = k1
    for _ in range(dims - 1):
        k = k[..., None] * k1
    pad = F.pad(x.double(), (r, r) * dims, mode="replicate")
    return (F.conv2d if dims == 2 else F.conv3d)(pad, k[None, None]).float()


def test_blur_is_the_full_gaussian_for_images_and_isotropic_for_volumes() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 1, 12, 12, generator=g) * 2 - 1
    vol = torch.rand(2, 1, 10, 10, 10, generator=g) * 2 - 1
    for x in (img, vol):
        torch.testing.assert_close(apply_shift(x, Shift("blur", 1.0), _gen()),
                                   _reference_blur(x, 1.0).clamp(-1, 1), atol=1e-5, rtol=0)
    # A volume that does not vary along depth blurs like its slice...
    flat_depth = img[:1, :, None].expand(1, 1, 6, 12, 12).contiguous()
    out = apply_shift(flat_depth, Shift("blur", 1.0), _gen())
    for d in range(6):
        torch.testing.assert_close(out[:, :, d], apply_shift(img[:1], Shift("blur", 1.0), _gen()),
                                   atol=1e-5, rtol=0)
    # ...and an edge across depth is smoothed too: the blur is 3D, not slice by slice.
    edge = torch.full((1, 1, 16, 8, 8), -1.0)
    edge[:, :, 8:] = 1.0
    across = apply_shift(edge, Shift("blur", 1.0), _gen())
    assert -1 < float(across[0, 0, 7, 4, 4]) < 0 < float(across[0, 0, 8, 4, 4]) < 1
    with pytest.raises(ValueError, match=r"\[N, C, D, H, W\]"):
        apply_shift(torch.zeros(2, 8, 8), Shift("blur", 1.0), _gen())


def test_contrast_and_intensity_golden_values() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    # gamma 2 on [0, 1]: 0.5 -> 0.25, i.e. 0 -> -0.5 in [-1, 1]; the ends stay.
    torch.testing.assert_close(apply_shift(x, Shift("contrast", 2.0), _gen()).flatten(),
                               torch.tensor([-1.0, -0.5, 1.0]))
    # gain 0.5 about the background: 0 -> -0.5, 1 -> 0.
    torch.testing.assert_close(apply_shift(x, Shift("intensity", 0.5), _gen()).flatten(),
                               torch.tensor([-1.0, -0.5, 0.0]))
    # gamma 1 and gain 1 are the identity.
    for fam in ("contrast", "intensity"):
        torch.testing.assert_close(apply_shift(x, Shift(fam, 1.0), _gen()), x)


def test_bad_shifts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown shift family 'rotate'"):
        apply_shift(_images(), Shift("rotate", 1.0), _gen())
    with pytest.raises(ValueError, match="level must be > 0"):
        apply_shift(_images(), Shift("noise", 0.0), _gen())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        apply_shift(torch.zeros(16, 16), Shift("noise", 0.1), _gen())


def test_scores_golden_values_and_grouped_bootstrap() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y]
    s = score_predictions(y, perfect)
    assert s["auc"] == 1.0 and s["acc"] == 1.0 and s["n"] == 6
    # One image of class 2 called class 0 with the class-2 score tied at 0.
    p = perfect.copy()
    p[5] = [1.0, 0.0, 0.0]
    s = score_predictions(y, p)
    assert s["acc"] == pytest.approx(5 / 6)
    assert s["acc_ci"][0] < 5 / 6 < 1.0 or s["acc_ci"][1] == 1.0
    # Groups resample together: when every group holds one right and one wrong call, every
    # grouped resample has accuracy 1/2 exactly; resampling images instead does not.
    y2 = np.array([0, 1] * 10)
    p2 = np.eye(2)[np.array([0, 0] * 10)]
    groups = np.repeat(np.arange(10), 2)
    assert score_predictions(y2, p2, groups=groups, n_boot=300)["acc_ci"] == [0.5, 0.5]
    loose = score_predictions(y2, p2, n_boot=300)["acc_ci"]
    assert loose[0] < 0.5 < loose[1]
    with pytest.raises(ValueError, match="proba must be"):
        score_predictions(y, perfect[:3])
