from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_core.config import build_config
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import load_pretrained, pretrained_path


def test_shipped_quick_autoencoder_loads_and_reconstructs_phantoms() -> None:
    """The quick preset starts from the shipped public-phantom autoencoder; it must fit."""
    from ldm_core.pretrain import public_images

    m = build_config(preset="quick").model
    assert pretrained_path(m).exists(), "the quick preset's pretrained autoencoder is missing"
    ae = make_autoencoder(m)
    ae.load_state_dict(load_pretrained(m))
    x = public_images(32, m.image_size, seed=99)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)[0])
    assert float((recon - x).abs().mean()) < 0.1


def test_missing_or_mismatched_pretrained_weights_explain_the_fix() -> None:
    m = build_config(preset="tiny", image_size=16).model
    with pytest.raises(FileNotFoundError, match="pretrain-ae"):
        load_pretrained(m)
    quick = build_config(preset="quick").model
    other = dataclasses.replace(quick, ae_res_blocks=2)
    with pytest.raises(FileNotFoundError):
        load_pretrained(other)
