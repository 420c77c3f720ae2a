"""Feature spaces for fidelity metrics that need no download.

FID/KID/PRDC are usually computed on Inception-v3 features, but Inception weights would have to
be downloaded (impossible at a hospital node and forbidden here) and were trained on natural
images anyway. We use two stand-ins instead:

* a fixed, seeded, randomly initialised CNN (``random_feature_extractor``). Random conv features
  are known to give usable distances between image distributions, but the numbers are only
  comparable between runs that use the *same* extractor architecture *and* seed: an FID of 12 here
  is not an Inception FID of 12 and not comparable with another seed's FID;
* the penultimate layer of a classifier we train ourselves on the real training split (see
  ``ldm_core.evaluation.utility.train_reference_classifier``), which emphasises class-relevant
  structure.

``feature_spaces`` bundles both into the mapping that ``fidelity_report`` expects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RandomConvFeatures", "extract_features", "feature_spaces", "random_feature_extractor"]


def _check_images(images: Tensor, in_channels: int | None = None) -> None:
    """Raise a ValueError saying what to fix when ``images`` is not a [N,C,H,W] float batch."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [N,C,H,W], got {type(images).__name__}")
    if images.ndim not in (4, 5):
        raise ValueError(f"images must have shape [N,C,H,W] (volumes: [N,C,D,H,W]), got shape "
                         f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1,1], got dtype {images.dtype}")
    if in_channels is not None and images.shape[1] != in_channels:
        raise ValueError(
            f"images have {images.shape[1]} channels but the extractor expects {in_channels}"
        )


def _block(c_in: int, c_out: int, stride: int, groups: int, dims: int) -> nn.Sequential:
    return nn.Sequential(
        (nn.Conv2d if dims == 2 else nn.Conv3d)(c_in, c_out, kernel_size=3, stride=stride,
                                                padding=1),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.SiLU(),
    )


class RandomConvFeatures(nn.Module):
    """Four conv blocks (GroupNorm, no BatchNorm) followed by global average pooling.

    GroupNorm rather than BatchNorm so that a sample's features never depend on the other samples
    in its batch (features must not change with ``batch_size``). Output dim is ``8 * width``.
    ``spatial_dims=3``: 3D convolutions, for volumes (a feature space of its own: 2D and 3D
    figures are not comparable).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.in_channels = in_channels
        self.out_dim = 8 * width
        d = spatial_dims
        self.body = nn.Sequential(
            _block(in_channels, width, 1, 8, d),
            _block(width, 2 * width, 2, 8, d),
            _block(2 * width, 4 * width, 2, 8, d),
            _block(4 * width, 8 * width, 2, 8, d),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(2).mean(dim=2)


def random_feature_extractor(seed: int = 0, in_channels: int = 1, width: int = 32,
                             spatial_dims: int = 2) -> nn.Module:
    """Build the fixed random-init feature network for ``seed`` (eval mode, no gradients).

    The weights are drawn from an explicit ``torch.Generator`` so the extractor is identical on
    every machine and call for the same ``(seed, in_channels, width)``, without touching the
    global RNG. Only metrics computed with the same triple are comparable.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    model = RandomConvFeatures(in_channels=in_channels, width=width, spatial_dims=spatial_dims)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
                nn.init.zeros_(module.bias)
    model.requires_grad_(False)
    return model.eval()


def extract_features(model: nn.Module, images: Tensor, batch_size: int = 256) -> np.ndarray:
    """Run ``model`` over ``images`` in batches and return float64 features ``[N, D]``.

    The model is put in eval mode and run without gradients; images are moved to the model's device.
    """
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: need at least one image to extract features")
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            feats = model(batch)
            out.append(feats.reshape(feats.shape[0], -1).detach().cpu().to(torch.float64))
    return torch.cat(out).numpy()


def feature_spaces(
    seed: int = 0, in_channels: int = 1, classifier: nn.Module | None = None,
    spatial_dims: int = 2,
) -> dict[str, Callable[[Tensor], np.ndarray]]:
    """Standard feature spaces for ``fidelity_report``: ``random_cnn`` (+ ``classifier`` if given).

    ``classifier`` is a trained ``ldm_core.classifier.SmallCNN`` (e.g. the TRTR reference model);
    its penultimate-layer embedding is used via ``ldm_core.classifier.embed``.
    """
    extractor = random_feature_extractor(seed=seed, in_channels=in_channels,
                                         spatial_dims=spatial_dims)
    spaces: dict[str, Callable[[Tensor], np.ndarray]] = {
        "random_cnn": lambda images: extract_features(extractor, images)
    }
    if classifier is not None:
        from ldm_core.classifier import embed  # local import: optional dependency on the classifier

        spaces["classifier"] = lambda images: np.asarray(embed(classifier, images), np.float64)
    return spaces
