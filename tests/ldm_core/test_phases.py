"""The phase registry: order, the names run folders and ledgers use, per-sample losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_core.config import RunConfig, build_config
from ldm_core.data import ImageSet
from ldm_core.models import encode
from ldm_core.phases import AUTOENCODER, DIFFUSION, PHASES, get_phase

CLASSES = ("healthy", "lesion", "cyst")
N = 6


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return build_config(preset="tiny", image_size=16, class_names=CLASSES)


@pytest.fixture(scope="module")
def split(cfg: RunConfig) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand((N, 1, 16, 16), generator=g) * 2 - 1
    labels = torch.randint(0, len(CLASSES), (N,), generator=g)
    return ImageSet(images, labels, tuple(f"p{i // 2}" for i in range(N)))


def _inputs(cfg: RunConfig, split: ImageSet, name: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    ae = AUTOENCODER.make_model(cfg.model)
    return get_phase(name).train_inputs(split, autoencoder=ae, scale_factor=0.5,
                                        device=torch.device("cpu"))


def test_registry_is_in_training_order_with_stable_names() -> None:
    # These names are in state.json, checkpoint folders, ledgers and messages: never rename.
    assert list(PHASES) == ["autoencoder", "diffusion"]
    assert [(p.name, p.prefix, p.checkpoint_key) for p in PHASES.values()] == [
        ("autoencoder", "ae", "autoencoder"), ("diffusion", "dm", "denoiser")]
    assert PHASES["autoencoder"] is AUTOENCODER and PHASES["diffusion"] is DIFFUSION
    assert not AUTOENCODER.needs_autoencoder and DIFFUSION.needs_autoencoder
    assert all(get_phase(name) is p for name, p in PHASES.items())


def test_unknown_phase_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown phase 'mask'.*autoencoder.*diffusion"):
        get_phase("mask")


def test_phase_config_and_budget_shares(cfg: RunConfig) -> None:
    assert AUTOENCODER.config(cfg) is cfg.autoencoder
    assert DIFFUSION.config(cfg) is cfg.diffusion
    assert sum(p.budget_share(cfg) for p in PHASES.values()) == pytest.approx(1.0)
    assert AUTOENCODER.budget_share(cfg) == cfg.privacy.ae_share


def test_protocol_takes_its_phase_names_from_the_registry() -> None:
    from common.protocol import PHASES as WIRE

    assert tuple(PHASES) == WIRE


def test_diffusion_needs_the_frozen_autoencoder(cfg: RunConfig, split: ImageSet) -> None:
    with pytest.raises(ValueError, match="autoencoder weights"):
        DIFFUSION.train_inputs(split, scale_factor=1.0)
    (images,) = AUTOENCODER.train_inputs(split)
    assert images is split.images


def test_diffusion_inputs_are_scaled_latents_and_labels(cfg: RunConfig, split: ImageSet) -> None:
    m = cfg.model
    z, y, s = _inputs(cfg, split, "diffusion")
    assert z.shape == (N, m.latent_channels, m.latent_size, m.latent_size)
    assert torch.equal(y, split.labels)
    assert (s == -1).all()  # no site slot given: "any site"
    torch.manual_seed(0)
    ae = AUTOENCODER.make_model(m)
    assert torch.allclose(z, encode(ae, split.images, 1.0, torch.device("cpu")) * 0.5)


@pytest.mark.parametrize("name", list(PHASES))
def test_models_and_losses_are_per_sample(cfg: RunConfig, split: ImageSet, name: str) -> None:
    phase = get_phase(name)
    tensors = _inputs(cfg, split, name)
    assert all(t.shape[0] == N for t in tensors)
    model = phase.make_model(cfg.model)
    loss = phase.train_loss(cfg)(model, tensors, torch.Generator().manual_seed(1))
    assert loss.shape == (N,) and loss.requires_grad and torch.isfinite(loss).all()
    loss.sum().backward()  # the loss trains the phase's own model
    assert any(p.grad is not None for p in model.parameters())
    device = torch.device("cpu")
    ev = phase.eval_losses(model, tensors, cfg, seed=4, device=device)
    assert ev.shape == (N,) and not ev.requires_grad and torch.isfinite(ev).all()
    # The evaluation noise follows the (non-private) message seed: same seed, same values.
    assert torch.equal(ev, phase.eval_losses(model, tensors, cfg, seed=4, device=device))


def test_phase_models_are_the_monai_factories(cfg: RunConfig) -> None:
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    assert isinstance(AUTOENCODER.make_model(cfg.model), AutoencoderKL)
    assert isinstance(DIFFUSION.make_model(cfg.model), DiffusionModelUNet)


def test_a_site_conditional_denoiser_learns_its_site_and_any_site(cfg: RunConfig,
                                                                  split: ImageSet) -> None:
    """The site's slot reaches the embedding index; site dropout sends some samples to "any
    site"; the class part is untouched by it."""
    sc = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, site_slots=3),
                             dm=dataclasses.replace(cfg.dm, label_dropout=0.0, site_dropout=0.5))
    torch.manual_seed(0)
    ae = AUTOENCODER.make_model(sc.model)
    tensors = DIFFUSION.train_inputs(split, autoencoder=ae, scale_factor=0.5, site=2)
    assert (tensors[2] == 2).all()
    seen: list[torch.Tensor] = []
    model = DIFFUSION.make_model(sc.model)
    assert model.class_embedding.num_embeddings == (len(CLASSES) + 1) * 4
    real_forward = model.forward

    def spy(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        seen.append(class_labels.clone())
        return real_forward(x, t, class_labels=class_labels)

    model.forward = spy  # type: ignore[method-assign]
    big = tuple(t.repeat(50, *([1] * (t.dim() - 1))) for t in tensors)
    DIFFUSION.train_loss(sc)(model, big, torch.Generator().manual_seed(1))
    idx = torch.cat(seen)
    n1 = len(CLASSES) + 1
    assert torch.equal(idx % n1, big[1].repeat(len(seen)))  # classes kept
    sites = idx // n1
    assert set(sites.tolist()) == {2, 3}  # its own slot, or any site (3)
    assert 0.35 < float((sites == 3).float().mean()) < 0.65


@pytest.mark.parametrize(("logit_mean", "band"), [(None, (0, 100)), (-2.0, (4, 30)),
                                                  (2.0, (70, 96))])
def test_the_denoiser_trains_on_the_configured_timesteps(monkeypatch, split: ImageSet,
                                                         logit_mean, band) -> None:
    """dm.timestep_logit_mean reaches the phase's training loss: with a narrow logit-normal
    every timestep lies in its band (tiny preset: T = 100); unset, they cover [0, T)."""
    import ldm_core.losses as losses

    seen: list[torch.Tensor] = []
    real = losses.diffusion_loss

    def spy(*args, timesteps, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(timesteps)
        return real(*args, timesteps=timesteps, **kwargs)

    monkeypatch.setattr(losses, "diffusion_loss", spy)
    cfg = build_config(preset="tiny", image_size=16, class_names=CLASSES, overrides={
        "dm.timestep_logit_mean": logit_mean, "dm.timestep_logit_std": 0.3})
    tensors = tuple(t.repeat(40, *([1] * (t.dim() - 1))) for t in _inputs(cfg, split, "diffusion"))
    DIFFUSION.train_loss(cfg)(DIFFUSION.make_model(cfg.model), tensors,
                              torch.Generator().manual_seed(1))
    t = torch.cat(seen)
    assert len(t) == len(tensors[0]) * cfg.diffusion.noise_multiplicity
    assert band[0] <= int(t.min()) and int(t.max()) < band[1]
    if logit_mean is None:  # uniform: both ends of [0, T) are drawn
        assert int(t.min()) < 10 and int(t.max()) >= 90
