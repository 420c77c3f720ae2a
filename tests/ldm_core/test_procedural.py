"""The generic procedural images of the modality-agnostic autoencoder prior."""

from __future__ import annotations

import pytest
import torch

from ldm_core.procedural import generic_images


def test_generic_images_fill_the_range_and_are_a_function_of_the_seed() -> None:
    x = generic_images(64, 32, seed=3)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # each image is scaled to the full range (1st-99.5th percentile -> [-1, 1])
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    assert bool((span > 1.5).all())
    assert torch.equal(x, generic_images(64, 32, seed=3))
    assert not torch.equal(x, generic_images(64, 32, seed=4))
    # varied, not one picture: images differ from each other far more than a pixel's noise
    assert float(x.flatten(1).std(0).mean()) > 0.3


def test_generic_images_refuse_sizes_they_cannot_draw() -> None:
    for n, size in ((0, 32), (4, 4)):
        with pytest.raises(ValueError, match="generic_images needs"):
            generic_images(n, size, seed=0)
