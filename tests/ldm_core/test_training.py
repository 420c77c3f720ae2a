from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_core.config import PhaseConfig, build_config
from ldm_core.dp_random import PrivacyRng
from ldm_core.losses import multiplicity_diffusion_loss
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.sampling import generate_images
from ldm_core.training import dp_train, group_by_patient, sampling_plan


def _setup(n: int = 24, **phase_kw: object):  # noqa: ANN202
    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b", "c"))
    m = cfg.model
    sched = make_train_scheduler(m)
    z = torch.randn(n, m.latent_channels, m.latent_size, m.latent_size,
                    generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 3
    phase = dataclasses.replace(cfg.diffusion, batch_size=8, sample_rate=1 / 3, local_steps=6,
                                **phase_kw)

    def loss(model, b, g):  # noqa: ANN001, ANN202
        return multiplicity_diffusion_loss(model, sched, b[0], b[1], k=phase.noise_multiplicity,
                                           generator=g)

    return cfg, z, y, phase, loss


CPU = torch.device("cpu")


def _train(dm, z, y, phase, loss, sigma=1.0, rng=None, seed=3, **kw):  # noqa: ANN001, ANN202
    return dp_train(dm, (z, y), loss, phase=phase, plan=sampling_plan(phase),
                    noise_multiplier=sigma, seed=seed, device=CPU, show_progress=False,
                    privacy_rng=PrivacyRng.secure() if rng is None else rng, **kw)


def test_sampling_plan_comes_from_the_config_alone() -> None:
    cfg = build_config(preset="tiny", image_size=16)
    phase = dataclasses.replace(cfg.diffusion, sample_rate=0.2, local_steps=7)
    plan = sampling_plan(phase)
    assert (plan.sample_rate, plan.steps) == (0.2, 7)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_runs_exactly_the_charged_steps_and_changes_weights(sigma: float) -> None:
    cfg, z, y, phase, loss = _setup()
    dm = make_denoiser(cfg.model)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    stats = _train(dm, z, y, phase, loss, sigma=sigma)
    assert stats.steps == phase.local_steps
    assert any(not torch.equal(before[k], v) for k, v in dm.state_dict().items())
    assert not any(hasattr(p, "grad_sample") for p in dm.parameters())  # Opacus stripped


def test_dp_training_needs_a_privacy_source() -> None:
    cfg, z, y, phase, loss = _setup()
    with pytest.raises(ValueError, match="privacy_rng"):
        dp_train(make_denoiser(cfg.model), (z, y), loss, phase=phase, plan=sampling_plan(phase),
                 noise_multiplier=1.0, seed=0, device=CPU, show_progress=False)


def test_same_seed_gives_different_dp_weights_but_reproducible_mode_repeats() -> None:
    """The seed (from the coordinator's message) must not determine the DP output."""
    cfg, z, y, phase, loss = _setup()

    def run(rng: PrivacyRng) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        dm = make_denoiser(cfg.model)
        _train(dm, z, y, phase, loss, rng=rng, seed=3)
        return dm.state_dict()

    a, b = run(PrivacyRng.secure()), run(PrivacyRng.secure())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    c, d = run(PrivacyRng.reproducible(7, "x")), run(PrivacyRng.reproducible(7, "x"))
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_secure_rng_draws_os_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    import ldm_core.dp_random as dr

    calls = []
    real = dr.secrets.randbits
    monkeypatch.setattr(dr.secrets, "randbits", lambda k: calls.append(k) or real(k))
    cfg, z, y, phase, loss = _setup()
    _train(make_denoiser(cfg.model), z, y, phase, loss)
    # one reseed of the sampler per batch and of the noise per step, at least
    assert len(calls) >= 2 * phase.local_steps


def test_poisson_sampling_of_patients() -> None:
    """Batch sizes vary around q * n (Poisson), not a fixed shuffled batch size."""
    cfg, z, y, phase, loss = _setup(n=60)
    phase = dataclasses.replace(phase, sample_rate=0.25, local_steps=40, lr=1e-6)
    stats = _train(make_denoiser(cfg.model), z, y, phase, loss)
    sizes = torch.tensor(stats.batch_sizes, dtype=torch.float64)
    assert len(sizes) == 40
    assert len(set(stats.batch_sizes)) > 3
    assert sizes.mean().item() == pytest.approx(15.0, abs=3.0)


def _sgd_probe(sigma: float, clip: float, *, scale: float, n: int = 1, rate: float = 1.0):  # noqa: ANN202
    """One SGD step (lr 1) on a linear model; the update is what Opacus added to the weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 1, bias=False)
    before = model.weight.detach().clone()
    x = torch.ones(n, 256)
    phase = PhaseConfig(rounds=1, sample_rate=rate, local_steps=1, batch_size=4, lr=1.0,
                        max_grad_norm=clip, optimizer="sgd", physical_batch_size=64)

    def loss(m, b, g):  # noqa: ANN001, ANN202
        return scale * m(b[0])[:, 0]

    stats = dp_train(model, (x,), loss, phase=phase, plan=sampling_plan(phase),
                     noise_multiplier=sigma, seed=0, device=CPU, show_progress=False,
                     privacy_rng=PrivacyRng.secure())
    return (model.weight.detach() - before)[0], stats


def test_noise_is_present_with_the_charged_scale() -> None:
    """Zero gradients: the update is pure noise of std sigma * C / B."""
    delta, stats = _sgd_probe(sigma=2.0, clip=0.5, scale=0.0)
    assert stats.noise_multiplier == 2.0 and stats.max_grad_norm == 0.5
    assert delta.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.15)


def test_per_sample_gradients_are_clipped() -> None:
    """A huge gradient moves the weights by at most C / B (plus negligible noise)."""
    delta, _ = _sgd_probe(sigma=1e-6, clip=0.5, scale=1e6)
    assert delta.norm().item() == pytest.approx(0.5 / 4, rel=0.01)


def test_patient_gradients_are_summed_then_clipped() -> None:
    """Patient-level DP: two patients of 3 images each, all sampled; each patient's summed
    gradient is clipped once, so the update norm is 2 * C / B, not 6 * C / B."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1, bias=False)
    before = model.weight.detach().clone()
    x = torch.ones(6, 16)
    groups = ("p1", "p1", "p1", "p2", "p2", "p2")
    phase = PhaseConfig(rounds=1, sample_rate=1.0, local_steps=1, batch_size=4, lr=1.0,
                        max_grad_norm=0.5, optimizer="sgd")
    dp_train(model, (x,), lambda m, b, g: 1e6 * m(b[0])[:, 0], phase=phase,
             plan=sampling_plan(phase), noise_multiplier=1e-6, seed=0, device=CPU,
             show_progress=False, privacy_rng=PrivacyRng.secure(), groups=groups,
             images_per_step=3)
    assert (model.weight.detach() - before).norm().item() == pytest.approx(2 * 0.5 / 4, rel=0.01)


def test_group_by_patient_stacks_and_masks() -> None:
    x = torch.arange(5.0)
    units = group_by_patient((x,), ("a", "b", "a", "c", "a"), max_images=2,
                             generator=torch.Generator().manual_seed(0))
    assert units.count == 3 and units.tensors[0].shape == (3, 2)
    assert units.mask.tolist() == [[True, True], [True, False], [True, False]]
    assert set(units.tensors[0][0].tolist()) <= {0.0, 2.0, 4.0}


def test_ema_weights_are_an_average_of_the_iterates() -> None:
    cfg, z, y, phase, loss = _setup(ema_decay=0.9)
    torch.manual_seed(0)
    start = make_denoiser(cfg.model)
    plain = make_denoiser(cfg.model)
    plain.load_state_dict(start.state_dict())
    ema = make_denoiser(cfg.model)
    ema.load_state_dict(start.state_dict())
    no_ema = dataclasses.replace(phase, ema_decay=0.0)
    _train(plain, z, y, no_ema, loss, rng=PrivacyRng.reproducible(1), seed=1)
    _train(ema, z, y, phase, loss, rng=PrivacyRng.reproducible(1), seed=1)
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


def test_empty_poisson_batches_still_take_a_noisy_step() -> None:
    """With a tiny rate most batches are empty; each still adds noise (no visible 'skip')."""
    delta, stats = _sgd_probe(sigma=1.0, clip=1.0, scale=0.0, n=2, rate=0.01)
    assert stats.steps == 1 and stats.batch_sizes in ((0,), (1,), (2,))
    assert delta.std().item() == pytest.approx(1.0 / 4, rel=0.15)


def test_an_overflowing_record_cannot_turn_the_update_non_finite() -> None:
    """Weights chosen so that one record's loss overflows: without care Opacus' clip factor
    C / inf = 0 times inf is NaN and the whole noisy update turns NaN, telling the model's
    author, without noise, that the record was sampled. Its gradient must count as zero."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    x = torch.ones(8, 4)
    x[3] = 1e30  # one record makes the loss overflow to inf
    phase = PhaseConfig(rounds=1, sample_rate=1.0, local_steps=2, batch_size=8, lr=0.1,
                        max_grad_norm=1.0, optimizer="sgd")

    def loss(m, b, g):  # noqa: ANN001, ANN202
        return m(b[0])[:, 0].pow(2)

    dp_train(model, (x,), loss, phase=phase, plan=sampling_plan(phase), noise_multiplier=1.0,
             seed=0, device=CPU, show_progress=False, privacy_rng=PrivacyRng.secure())
    assert bool(torch.isfinite(model.weight).all())


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_train_only_moves_the_named_parameters_and_nothing_else(sigma: float) -> None:
    """Frozen parameters come back bit for bit (also through the weight EMA); the trained ones
    move, under DP with noise (two runs on the same data differ)."""
    cfg, z, y, phase, loss = _setup(train_only=("class_embedding", "time_emb"), ema_decay=0.9)
    torch.manual_seed(0)
    start = make_denoiser(cfg.model).state_dict()
    runs = []
    for _ in range(2):
        dm = make_denoiser(cfg.model)
        dm.load_state_dict(start)
        _train(dm, z, y, phase, loss, sigma=sigma)
        runs.append(dm.state_dict())
        assert all(p.requires_grad for p in dm.parameters())  # handed back trainable
    trained = {n for n in start if "class_embedding" in n or "time_emb" in n}
    assert trained and len(trained) < len(start)
    for name, value in runs[0].items():
        if name not in trained:
            assert torch.equal(value, start[name]), name
        elif sigma > 0:  # every trained coordinate carries fresh noise
            assert not torch.equal(value, runs[1][name]), name
    assert any(not torch.equal(runs[0][n], start[n]) for n in trained)


def test_train_only_that_matches_nothing_is_an_error() -> None:
    cfg, z, y, phase, loss = _setup(train_only=("no_such_layer",))
    with pytest.raises(ValueError, match="no_such_layer"):
        _train(make_denoiser(cfg.model), z, y, phase, loss)
