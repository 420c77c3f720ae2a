"""The sampler must read the denoiser's output the way training defined it.

An oracle denoiser for a one-point data distribution (every latent equals x0) knows the exact
target at every noise level; DDIM with that oracle must land on x0. A sampler that treats a
velocity as noise (or the reverse) lands far away: this caught exactly that bug once.
"""

import dataclasses

import pytest
import torch

from ldm_core.config import build_config
from ldm_core.models import make_sample_scheduler, make_train_scheduler
from ldm_core.sampling import sample_latents


class Oracle(torch.nn.Module):
    """Exact epsilon or velocity for data concentrated at x0 (labels are ignored)."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.x0, self.ab, self.prediction = x0, alphas_cumprod, prediction

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor
                ) -> torch.Tensor:
        ab = self.ab[t].view(-1, 1, 1, 1)
        eps = (z - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        if self.prediction == "epsilon":
            return eps
        return ab.sqrt() * eps - (1 - ab).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_ddim_with_an_oracle_recovers_the_data_point(prediction: str, guidance: float) -> None:
    cfg = build_config(preset="tiny", overrides={"model.prediction_type": prediction}).model
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size), generator=gen)
    ab = make_train_scheduler(cfg).alphas_cumprod
    oracle = Oracle(x0, ab, prediction)
    z = sample_latents(oracle, cfg, torch.zeros(3, dtype=torch.long), steps=20,
                       guidance_scale=guidance, generator=gen, device=torch.device("cpu"),
                       clip=0.0)
    assert torch.allclose(z, x0.expand_as(z), atol=1e-3), (z - x0).abs().max()


def test_sample_scheduler_matches_training_prediction_type() -> None:
    for prediction in ("epsilon", "v_prediction"):
        cfg = dataclasses.replace(build_config(preset="tiny").model, prediction_type=prediction)
        assert make_sample_scheduler(cfg, 10).prediction_type == prediction
        assert make_train_scheduler(cfg).prediction_type == prediction


def test_site_conditioning_indexes_class_and_site_and_sampling_follows_it() -> None:
    from ldm_core.models import embed_index, make_denoiser, null_label

    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b", "c")).model
    labels = torch.tensor([0, 2, 3])
    assert torch.equal(embed_index(cfg, labels), labels)  # no site conditioning
    with pytest.raises(ValueError, match="without site conditioning"):
        embed_index(cfg, labels, 1)
    sc = dataclasses.replace(cfg, site_slots=2)
    assert embed_index(sc, labels, 1).tolist() == [4, 6, 7]
    assert embed_index(sc, labels).tolist() == [8, 10, 11]  # any site = slot 2
    assert null_label(sc) == 11 == (3 + 1) * (2 + 1) - 1  # the last embedding
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        embed_index(sc, labels, 3)
    torch.manual_seed(0)
    unet = make_denoiser(sc)
    with torch.no_grad():  # MONAI zero-initialises the output layer: make the labels matter
        for w in unet.parameters():
            w.add_(torch.randn_like(w) * 0.05)
    kw = {"steps": 3, "guidance_scale": 2.0, "device": torch.device("cpu")}
    draws = {site: sample_latents(unet, sc, labels, generator=torch.Generator().manual_seed(1),
                                  site=site, **kw) for site in (0, 1, None)}
    assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(draws[0], draws[None])
    again = sample_latents(unet, sc, labels, generator=torch.Generator().manual_seed(1), site=0,
                           **kw)
    assert torch.equal(draws[0], again)


def test_stochastic_ddim_is_seeded_and_still_finds_the_data_point() -> None:
    """eta > 0: fresh noise every step, from the caller's generator (a seed fixes the draw),
    and with an oracle it still lands on the data point (the noise is DDIM's, correctly
    scaled, not extra)."""
    cfg = build_config(preset="tiny").model
    x0 = torch.randn((1, cfg.latent_channels, cfg.latent_size, cfg.latent_size),
                     generator=torch.Generator().manual_seed(0))
    oracle = Oracle(x0, make_train_scheduler(cfg).alphas_cumprod, cfg.prediction_type)

    def draw(seed: int, eta: float) -> torch.Tensor:
        return sample_latents(oracle, cfg, torch.zeros(2, dtype=torch.long), steps=20,
                              guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
                              device=torch.device("cpu"), clip=0.0, eta=eta)

    a, b = draw(1, 1.0), draw(1, 1.0)
    assert torch.equal(a, b) and not torch.equal(a, draw(2, 1.0))
    assert torch.allclose(a, x0.expand_as(a), atol=1e-2), (a - x0).abs().max()
