from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_core.config import build_config
from ldm_core.losses import multiplicity_diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.sampling import generate_images
from ldm_core.training import dp_train, sampling_plan


def _setup(n: int = 24, **phase_kw: object):  # noqa: ANN202
    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b", "c"))
    m = cfg.model
    sched = make_train_scheduler(m)
    z = torch.randn(n, m.latent_channels, m.latent_size, m.latent_size,
                    generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 3
    phase = dataclasses.replace(cfg.diffusion, batch_size=8, local_epochs=2, **phase_kw)

    def loss(model, b, g):  # noqa: ANN001, ANN202
        return multiplicity_diffusion_loss(model, sched, b[0], b[1], k=phase.noise_multiplicity,
                                           generator=g)

    return cfg, z, y, phase, loss


@pytest.mark.parametrize("n,batch,epochs", [(24, 8, 2), (10, 64, 1), (25, 8, 3)])
def test_sampling_plan_matches_opacus_loader(n: int, batch: int, epochs: int) -> None:
    cfg = build_config(preset="tiny", image_size=16)
    phase = dataclasses.replace(cfg.diffusion, batch_size=batch, local_epochs=epochs)
    plan = sampling_plan(n, phase)
    assert plan.sample_rate == pytest.approx(1 / plan.steps_per_epoch)
    assert plan.steps == epochs * -(-n // min(batch, n))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_runs_exactly_the_charged_steps_and_changes_weights(sigma: float) -> None:
    cfg, z, y, phase, loss = _setup()
    dm = make_denoiser(cfg.model)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    plan = sampling_plan(z.shape[0], phase)
    stats = dp_train(dm, (z, y), loss, phase=phase, plan=plan, noise_multiplier=sigma, seed=0,
                     device=torch.device("cpu"), show_progress=False)
    assert stats.steps == plan.steps
    assert any(not torch.equal(before[k], v) for k, v in dm.state_dict().items())
    assert not any(hasattr(p, "grad_sample") for p in dm.parameters())  # Opacus stripped


def test_dp_training_is_deterministic_given_the_seed() -> None:
    cfg, z, y, phase, loss = _setup()
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        dm = make_denoiser(cfg.model)
        dp_train(dm, (z, y), loss, phase=phase, plan=sampling_plan(z.shape[0], phase),
                 noise_multiplier=1.0, seed=3, device=torch.device("cpu"), show_progress=False)
        outs.append(dm.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_ema_weights_are_an_average_of_the_iterates() -> None:
    cfg, z, y, phase, loss = _setup(ema_decay=0.9)
    torch.manual_seed(0)
    start = make_denoiser(cfg.model)
    plain = make_denoiser(cfg.model)
    plain.load_state_dict(start.state_dict())
    ema = make_denoiser(cfg.model)
    ema.load_state_dict(start.state_dict())
    plan = sampling_plan(z.shape[0], phase)
    no_ema = dataclasses.replace(phase, ema_decay=0.0)
    dp_train(plain, (z, y), loss, phase=no_ema, plan=plan, noise_multiplier=1.0, seed=1,
             device=torch.device("cpu"), show_progress=False)
    dp_train(ema, (z, y), loss, phase=phase, plan=plan, noise_multiplier=1.0, seed=1,
             device=torch.device("cpu"), show_progress=False)
    k = "out.2.conv.weight" if "out.2.conv.weight" in start.state_dict() else next(
        n for n, v in start.state_dict().items() if v.is_floating_point() and v.numel() > 8)
    d_plain = (plain.state_dict()[k] - start.state_dict()[k]).norm()
    d_ema = (ema.state_dict()[k] - start.state_dict()[k]).norm()
    assert 0 < d_ema < d_plain  # EMA lags the noisy iterates


def test_sampling_is_deterministic_and_labelled() -> None:
    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b"))
    torch.manual_seed(0)
    ae, dm = make_autoencoder(cfg.model), make_denoiser(cfg.model)
    labels = torch.tensor([0, 1, 1])
    kw = dict(scale_factor=1.0, steps=4, guidance_scale=2.0, device=torch.device("cpu"))
    a = generate_images(ae, dm, cfg.model, labels, seed=5, **kw)
    b = generate_images(ae, dm, cfg.model, labels, seed=5, **kw)
    c = generate_images(ae, dm, cfg.model, labels, seed=6, **kw)
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
