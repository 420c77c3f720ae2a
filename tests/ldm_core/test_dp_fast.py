"""The lean DP-SGD path computes what Opacus' own path computes, with fewer memory passes."""

import contextlib

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import grad_sample_module as gsm_mod
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers.optimizer import DPOptimizer
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from ldm_core import dp_fast
from ldm_core.config import build_config
from ldm_core.dp_fast import (
    FiniteClipDPOptimizer,
    LeanPrivacyEngine,
    conv_grad_sample,
    lean_accumulation,
)
from ldm_core.dp_random import PrivacyRng
from ldm_core.losses import multiplicity_diffusion_loss
from ldm_core.models import make_denoiser, make_train_scheduler
from tests.ldm_core.test_models import Denoise


def _denoiser() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    cfg = build_config(preset="tiny", image_size=16).model
    torch.manual_seed(0)
    dm = make_denoiser(cfg)
    with torch.no_grad():
        for p in dm.parameters():  # MONAI zero-initialises some output convs
            p.add_(0.05 * torch.randn_like(p))
    return dm, torch.randn(5, cfg.latent_channels, 8, 8), torch.tensor([0, 1, 2, 0, 1])


def _grad_samples(k: int, lean: bool) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the tiny denoiser's K-draw loss (K forwards, one backward)."""
    dm, z, y = _denoiser()
    sched = make_train_scheduler(build_config(preset="tiny", image_size=16).model)
    gsm = GradSampleModule(dm, loss_reduction="mean")
    with lean_accumulation() if lean else contextlib.nullcontext():
        loss = multiplicity_diffusion_loss(dm, sched, z, y, k=k,
                                           generator=torch.Generator().manual_seed(3))
        loss.mean().backward()
    out = {n: p.grad_sample.clone() for n, p in dm.named_parameters()}
    gsm._close()
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_lean_accumulation_gives_opacus_per_sample_gradients(k: int) -> None:
    """One draw (the buffer is the sampler's tensor) and K draws (summed out of place): the
    same per-sample gradients as Opacus' zero-fill-and-copy accumulation."""
    upstream, lean = _grad_samples(k, lean=False), _grad_samples(k, lean=True)
    assert upstream.keys() == lean.keys() and len(lean) > 10
    for name in upstream:
        assert torch.allclose(upstream[name], lean[name], rtol=1e-5, atol=1e-7), name


def test_lean_accumulation_matches_the_microbatch_reference() -> None:
    """Opacus' own checker (per-sample gradients vs one backward per sample) under the patch."""
    dm, z, _ = _denoiser()
    with lean_accumulation():
        assert check_per_sample_gradients_are_correct(z, Denoise(dm), batch_first=True,
                                                      atol=1e-5, rtol=1e-4)


def test_lean_accumulation_is_undone_on_exit_and_on_error() -> None:
    upstream = dp_fast._UPSTREAM_ACCUMULATE
    samplers = GradSampleModule.GRAD_SAMPLERS
    assert upstream is not dp_fast._accumulate
    assert gsm_mod.create_or_accumulate_grad_sample is upstream  # no earlier test left it
    assert samplers[torch.nn.Conv2d] is compute_conv_grad_sample
    with lean_accumulation():
        assert gsm_mod.create_or_accumulate_grad_sample is dp_fast._accumulate
        assert samplers[torch.nn.Conv2d] is samplers[torch.nn.Conv3d] is conv_grad_sample
    assert gsm_mod.create_or_accumulate_grad_sample is upstream
    assert samplers[torch.nn.Conv2d] is samplers[torch.nn.Conv3d] is compute_conv_grad_sample
    with pytest.raises(RuntimeError), lean_accumulation():
        raise RuntimeError("boom")
    assert gsm_mod.create_or_accumulate_grad_sample is upstream
    assert samplers[torch.nn.Conv2d] is compute_conv_grad_sample


CONVS = [
    torch.nn.Conv2d(4, 6, 3, padding=1),
    torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    torch.nn.Conv2d(4, 6, (3, 1), padding=(1, 0), dilation=2),
    torch.nn.Conv2d(4, 6, 3, groups=2),
    torch.nn.Conv2d(4, 4, 1),
    torch.nn.Conv2d(4, 4, 1, stride=2),
    torch.nn.Conv2d(4, 6, 3, padding="same"),  # string padding: upstream's sampler
    torch.nn.Conv3d(2, 4, 3, stride=2, padding=1),
    torch.nn.Conv3d(2, 4, 1),
]
CONV_IDS = ["plain", "stride-nobias", "dilation", "groups", "1x1", "1x1-stride", "same", "3d",
            "3d-1x1"]


def _conv_case(conv: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, conv.in_channels, *(9,) * (conv.weight.ndim - 2), generator=g)
    return x, torch.randn(conv(x).shape, generator=g)


@pytest.mark.parametrize("conv", CONVS, ids=CONV_IDS)
def test_conv_grad_sample_equals_opacus_unfold_sampler(conv: torch.nn.Module) -> None:
    """Whichever method the timing picks gives Opacus' per-sample gradients, for every
    stride, padding, dilation and group the models could use, on first use and after."""
    x, backprops = _conv_case(conv)
    want = compute_conv_grad_sample(conv, [x], backprops)
    for _ in range(2):  # first use times the methods; the second reuses the choice
        got = conv_grad_sample(conv, [x], backprops)
        assert want.keys() == got.keys()
        for p in want:
            assert got[p].shape == want[p].shape == (5, *p.shape)
            assert torch.allclose(got[p], want[p], rtol=1e-5, atol=1e-5)
    # ...and it is the sum of the batch's plain weight gradient, sample by sample.
    conv.zero_grad()
    conv(x).backward(backprops)
    assert torch.allclose(got[conv.weight].sum(0), conv.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [c for c in CONVS if not isinstance(c.padding, str)],
                         ids=[i for i, c in zip(CONV_IDS, CONVS, strict=True)
                              if not isinstance(c.padding, str)])
def test_every_weight_grad_method_equals_opacus(conv: torch.nn.Module) -> None:
    """Each method the timing may pick, on its own (the timing makes the pick machine-dependent,
    so each must be right, not only the one this machine prefers)."""
    x, backprops = _conv_case(conv)
    want = compute_conv_grad_sample(conv, [x], backprops)[conv.weight]
    methods = dp_fast._methods_for(conv, x)
    assert "grouped" in methods and "upstream" in methods
    assert ("bmm" in methods) == (conv.groups == 1 and (x.dim() == 4 or conv.kernel_size[0] == 1
                                                        and conv.stride[0] == 1))
    for name in methods:
        got = dp_fast.WEIGHT_GRAD_METHODS[name](conv, x, backprops)
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), name


def test_the_timed_choice_is_kept_per_layer_shape_whatever_the_batch_size() -> None:
    """Poisson sampling changes the batch size every step: the choice must not be re-timed
    for each, and a batch of another size must use it and still be right."""
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    dp_fast._CHOSEN.clear()
    x, backprops = _conv_case(conv)
    conv_grad_sample(conv, [x], backprops)
    assert len(dp_fast._CHOSEN) == 1
    (choice,) = dp_fast._CHOSEN.values()
    assert choice in dp_fast._methods_for(conv, x)
    x7, b7 = torch.randn(7, 3, 9, 9), torch.randn(7, 5, 9, 9)
    got = conv_grad_sample(conv, [x7], b7)[conv.weight]
    assert len(dp_fast._CHOSEN) == 1
    assert torch.allclose(got, compute_conv_grad_sample(conv, [x7], b7)[conv.weight],
                          rtol=1e-5, atol=1e-5)


def _optimizers(samples: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """summed_grad of upstream's DPOptimizer and of FiniteClipDPOptimizer for the same
    per-sample gradients (clip 1.0)."""
    results = []
    for cls in (DPOptimizer, FiniteClipDPOptimizer):
        params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in samples]
        for p, g in zip(params, samples, strict=True):
            p.grad_sample = g.clone()
        opt = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                  expected_batch_size=samples[0].shape[0])
        opt.clip_and_accumulate()
        results.append([p.summed_grad.clone() for p in params])
    return results[0], results[1]


def test_finite_clip_equals_opacus_clip() -> None:
    torch.manual_seed(0)
    samples = [torch.randn(6, 3, 4) * 3, torch.randn(6, 5) * 0.01, torch.randn(6, 2, 2, 2)]
    for g in samples:  # samples 0 and 1 inside the clip bound (unscaled), the rest above it
        g[:2] *= 1e-2
    upstream, lean = _optimizers(samples)
    for a, b in zip(upstream, lean, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_finite_clip_zeroes_non_finite_entries_before_clipping() -> None:
    """A sample with inf and NaN entries counts with its finite entries only: the summed
    gradient is what upstream gives after zeroing those entries, and it is finite."""
    torch.manual_seed(0)
    samples = [torch.randn(4, 3, 3), torch.randn(4, 2)]
    bad = [s.clone() for s in samples]
    bad[0][1, 0, 0] = float("inf")
    bad[1][2, 1] = float("nan")
    zeroed = [torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0) for s in bad]
    expected, _ = _optimizers(zeroed)
    _, lean = _optimizers(bad)
    for a, b in zip(expected, lean, strict=True):
        assert bool(torch.isfinite(b).all())
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_lean_engine_builds_the_finite_clip_optimizer() -> None:
    model = torch.nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 3)),
                                         batch_size=2)
    _, opt, _ = LeanPrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    assert type(opt) is FiniteClipDPOptimizer
    assert opt.noise_multiplier == 1.0 and opt.max_grad_norm == 1.0


def _patched(dm: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in dm.modules() if "forward" in vars(m)]


def test_no_summed_weight_grads_skips_autograd_but_not_the_per_sample_gradients() -> None:
    """Inside the block autograd leaves p.grad of the layers past the first unset (the work
    skipped) while every per-sample gradient is still there and equal to Opacus' own; the
    layers are restored after the block, also on error."""
    reference = _grad_samples(1, lean=True)
    dm, z, y = _denoiser()
    sched = make_train_scheduler(build_config(preset="tiny", image_size=16).model)
    gsm = GradSampleModule(dm, loss_reduction="mean")
    with lean_accumulation(), dp_fast.no_summed_weight_grads(dm):
        assert len(_patched(dm)) > 10
        loss = multiplicity_diffusion_loss(dm, sched, z, y, k=1,
                                           generator=torch.Generator().manual_seed(3))
        loss.mean().backward()
    assert _patched(dm) == []
    lean = {n: p.grad_sample for n, p in dm.named_parameters()}
    gsm._close()
    assert lean.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(reference[name], lean[name], rtol=1e-5, atol=1e-7), name
    convs = [m for m in dm.modules() if type(m) is torch.nn.Conv2d]
    skipped = [m for m in convs if m.weight.grad is None]
    assert len(skipped) >= len(convs) - 1  # only a layer fed by the data itself keeps it
    with pytest.raises(RuntimeError), dp_fast.no_summed_weight_grads(dm):
        raise RuntimeError("boom")
    assert _patched(dm) == []


def test_dp_train_updates_the_same_without_summed_weight_grads(monkeypatch) -> None:  # noqa: ANN001
    """The same DP-SGD update, bit for bit up to float rounding, with the summed weight
    gradients skipped and computed (reproducible privacy draws, so the noise is the same)."""
    from ldm_core import training
    from tests.ldm_core.test_training import _setup, _train

    cfg, z, y, phase, loss = _setup()

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        dm = make_denoiser(cfg.model)
        _train(dm, z, y, phase, loss, rng=PrivacyRng.reproducible(7, "dp_fast"), seed=3)
        return dm.state_dict()

    lean = run()
    monkeypatch.setattr(training, "no_summed_weight_grads",
                        lambda module: contextlib.nullcontext())
    full = run()
    assert all(torch.allclose(lean[k], full[k], rtol=1e-5, atol=1e-6) for k in lean)
