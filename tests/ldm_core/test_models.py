import dataclasses

import pytest
import torch
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator

from ldm_core.config import ModelConfig, build_config
from ldm_core.losses import autoencoder_loss, diffusion_loss, multiplicity_diffusion_loss
from ldm_core.models import (
    make_autoencoder,
    make_denoiser,
    make_train_scheduler,
    resolve_device,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises output convs; random weights make gradient checks meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


class Recon(torch.nn.Module):
    """Opacus' checker deep-copies the module by pickling: wrappers live at module level."""

    def __init__(self, ae: torch.nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_mu, z_sigma = self.ae.encode(x)
        return self.ae.decode(z_mu + 0.1 * z_sigma)  # touches every parameter


class Denoise(torch.nn.Module):
    def __init__(self, dm: torch.nn.Module) -> None:
        super().__init__()
        self.dm = dm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # timestep and label derived from each sample itself, so a micro-batch of one sees the
        # same conditioning as the full batch does
        t = (z[:, 0, 0, 0].abs() * 30).long().clamp(0, 99)
        y = (z[:, 0, 0, 1] > 0).long() + (z[:, 0, 1, 0] > 0).long()
        return self.dm(z, t, class_labels=y)


@pytest.mark.parametrize(
    "preset,size", [("tiny", 16), ("tiny", 32), ("quick", 64), ("standard", 64)]
)
def test_shapes_per_preset(preset: str, size: int) -> None:
    cfg = build_config(preset=preset, image_size=size, class_names=("a", "b", "c")).model
    ae, dm = make_autoencoder(cfg), make_denoiser(cfg)
    x = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(x)
        assert z_mu.shape == (2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        assert ae.decode(z_mu).shape == x.shape
        labels = torch.tensor([0, cfg.n_classes])  # a real class and the null class
        eps = dm(z_mu, torch.tensor([0, 5]), class_labels=labels)
    assert eps.shape == z_mu.shape
    assert ModuleValidator.validate(ae, strict=False) == []
    assert ModuleValidator.validate(dm, strict=False) == []


def test_losses_are_per_sample() -> None:
    cfg = build_config(preset="tiny", image_size=16).model
    ae, dm, sched = make_autoencoder(cfg), _randomise(make_denoiser(cfg)), make_train_scheduler(cfg)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = torch.randn(3, cfg.latent_channels, 8, 8)
    assert autoencoder_loss(ae, x, kl_weight=1e-3, noise=noise).shape == (3,)
    z = torch.randn(3, cfg.latent_channels, 8, 8)
    loss = diffusion_loss(
        dm,
        sched,
        z,
        torch.tensor([0, 1, 2]),
        timesteps=torch.tensor([1, 50, 99]),
        noise=torch.randn_like(z),
    )
    assert loss.shape == (3,)
    # per-sample: changing sample 0 must not change the loss of sample 1
    z2 = z.clone()
    z2[0] += 5
    loss2 = diffusion_loss(
        dm,
        sched,
        z2,
        torch.tensor([0, 1, 2]),
        timesteps=torch.tensor([1, 50, 99]),
        noise=torch.randn_like(z) * 0 + 1,
    )
    loss1 = diffusion_loss(
        dm,
        sched,
        z,
        torch.tensor([0, 1, 2]),
        timesteps=torch.tensor([1, 50, 99]),
        noise=torch.randn_like(z) * 0 + 1,
    )
    assert torch.allclose(loss1[1:], loss2[1:], atol=1e-6)
    assert not torch.isclose(loss1[0], loss2[0])


def test_opacus_per_sample_gradients_autoencoder() -> None:
    cfg = build_config(preset="tiny", image_size=16).model
    torch.manual_seed(0)
    ae = _randomise(make_autoencoder(cfg))
    x = torch.rand(4, 1, 16, 16) * 2 - 1

    assert check_per_sample_gradients_are_correct(
        x, Recon(ae), batch_first=True, atol=1e-5, rtol=1e-4
    )


def test_opacus_per_sample_gradients_denoiser() -> None:
    cfg = build_config(preset="tiny", image_size=16).model
    torch.manual_seed(0)
    dm = _randomise(make_denoiser(cfg))

    z = torch.randn(4, cfg.latent_channels, 8, 8)
    assert check_per_sample_gradients_are_correct(
        z, Denoise(dm), batch_first=True, atol=1e-5, rtol=1e-4
    )


def test_noise_multiplicity_gives_one_gradient_per_sample() -> None:
    """K forward calls + one backward: Opacus' per-sample gradient must equal the gradient of
    that sample's own K-averaged loss (so clipping bounds the sample, not each draw)."""
    from opacus import GradSampleModule

    cfg = build_config(preset="tiny", image_size=16).model
    torch.manual_seed(0)
    dm, sched = _randomise(make_denoiser(cfg)), make_train_scheduler(cfg)
    z = torch.randn(3, cfg.latent_channels, 8, 8)
    y = torch.tensor([0, 1, 2])
    k = 3
    gsm = GradSampleModule(dm, loss_reduction="mean")
    loss = multiplicity_diffusion_loss(
        dm, sched, z, y, k=k, generator=torch.Generator().manual_seed(1)
    )
    loss.mean().backward()
    name, p = next((n, p) for n, p in dm.named_parameters() if n.endswith("conv_in.conv.weight"))
    per_sample = p.grad_sample.clone()
    assert per_sample.shape[0] == 3, "one gradient per sample, not per draw"
    gsm._close()
    for i in range(3):
        dm.zero_grad()
        ref = make_denoiser(cfg)
        ref.load_state_dict(dm.state_dict())
        gen = torch.Generator().manual_seed(1)
        # recreate the same draws: same generator consumption order as the batched call
        ts, ns = [], []
        for _ in range(k):
            ts.append(torch.randint(0, sched.num_train_timesteps, (3,), generator=gen))
            ns.append(torch.randn(z.shape, generator=gen))
        li = (
            sum(
                diffusion_loss(
                    ref,
                    sched,
                    z[i : i + 1],
                    y[i : i + 1],
                    timesteps=ts[j][i : i + 1],
                    noise=ns[j][i : i + 1],
                )
                for j in range(k)
            )
            / k
        )
        li.sum().backward()
        ref_p = dict(ref.named_parameters())[name]
        assert torch.allclose(per_sample[i], ref_p.grad, atol=1e-5, rtol=1e-4), i


class Denoise3D(torch.nn.Module):
    """As Denoise, conditioning read from each volume's own first voxels."""

    def __init__(self, dm: torch.nn.Module) -> None:
        super().__init__()
        self.dm = dm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1)
        t = (flat[:, 0].abs() * 30).long().clamp(0, 99)
        y = (flat[:, 1] > 0).long() + (flat[:, 2] > 0).long()
        return self.dm(z, t, class_labels=y)


def _tiny3d() -> ModelConfig:
    return dataclasses.replace(build_config(preset="tiny", image_size=16).model, spatial_dims=3)


def test_3d_networks_shapes_and_opacus_compatibility() -> None:
    cfg = _tiny3d()
    ae, dm = make_autoencoder(cfg), make_denoiser(cfg)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        z_mu, _ = ae.encode(x)
        assert z_mu.shape == (2, *cfg.latent_shape) == (2, cfg.latent_channels, 8, 8, 8)
        assert ae.decode(z_mu).shape == x.shape
        assert dm(z_mu, torch.tensor([0, 5]), class_labels=torch.tensor([0, cfg.n_classes])
                  ).shape == z_mu.shape
    assert ModuleValidator.validate(ae, strict=False) == []
    assert ModuleValidator.validate(dm, strict=False) == []


def test_opacus_per_sample_gradients_3d() -> None:
    cfg = _tiny3d()
    torch.manual_seed(0)
    ae, dm = _randomise(make_autoencoder(cfg)), _randomise(make_denoiser(cfg))
    x = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    assert check_per_sample_gradients_are_correct(x, Recon(ae), batch_first=True, atol=1e-5,
                                                  rtol=1e-4)
    z = torch.randn(3, *cfg.latent_shape)
    assert check_per_sample_gradients_are_correct(z, Denoise3D(dm), batch_first=True,
                                                  atol=1e-5, rtol=1e-4)


def test_only_2d_and_3d_runs_are_accepted() -> None:
    from ldm_core.config import ConfigError

    assert build_config(preset="tiny", overrides={"model.spatial_dims": 3}).model.spatial_dims == 3
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        build_config(preset="tiny", overrides={"model.spatial_dims": 4})


def test_timesteps_are_uniform_or_logit_normal_and_follow_the_generator() -> None:
    from ldm_core.losses import sample_timesteps

    def draw(logit, seed=0):  # noqa: ANN001, ANN202
        return sample_timesteps(20000, 1000, torch.Generator().manual_seed(seed), logit=logit)

    uniform, shifted = draw(None), draw((-0.85, 1.0))
    assert uniform.dtype == shifted.dtype == torch.int64
    assert int(shifted.min()) >= 0 and int(shifted.max()) <= 999
    assert abs(float(uniform.float().mean()) - 499.5) < 10
    # median of sigmoid(N(-0.85, 1)) is sigmoid(-0.85) = 0.2994: t ~ 299
    assert abs(float(shifted.float().median()) - 299) < 8
    # fewer near-pure-noise draws than uniform (t >= 700: 30% of uniform draws)
    assert float((shifted >= 700).float().mean()) < 0.12
    assert torch.equal(draw((-0.85, 1.0)), shifted)
    assert not torch.equal(draw((-0.85, 1.0), seed=1), shifted)


def test_device_names_resolve_and_a_missing_gpu_is_a_clear_error(monkeypatch) -> None:  # noqa: ANN001
    """`auto` falls back to the CPU; asking for CUDA where torch sees none says what to do
    instead of failing deep inside training."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
