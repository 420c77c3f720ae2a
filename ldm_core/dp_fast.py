"""Fewer passes over the per-sample gradients in Opacus' DP-SGD step (same arithmetic).

On a CPU the cost of a DP step beyond the plain one is mostly memory traffic: the per-sample
gradients of a batch (batch x parameters floats; 128 MB for the quick denoiser at batch 128)
are far larger than the caches, and every pass over them costs as much as a layer's compute.
Opacus' hooks path makes several: it zero-fills a buffer per parameter and copies each
layer's per-sample gradients into it, then the clip reads them twice (norms, weighted sum);
fedldm added one more (zeroing non-finite entries, a privacy guard). This module removes
three of those passes without changing what is computed:

* :func:`lean_accumulation` - while active, a layer's first per-sample gradient of a batch
  becomes the parameter's buffer as it is (no zero-fill, no copy); a second one (noise
  multiplicity: K forward calls, one backward) is added out of place, so a tensor a grad
  sampler returned is never written to.
* :class:`FiniteClipDPOptimizer` - Opacus' flat-clipping optimizer whose clip computes the
  per-sample norms once and zeroes non-finite entries only when some norm is non-finite
  (a non-finite entry always makes its sample's norm non-finite). The guard's why:
  ``ldm_core.training`` (a crafted model must not turn one patient's overflow into a NaN
  update that reveals whether the patient was sampled).

* :func:`no_summed_weight_grads` - autograd skips the summed weight gradients that Opacus'
  optimizer would overwrite anyway (about a third of a plain backward pass), by running the
  layers with detached parameters wherever their input carries a gradient; Opacus' hooks
  still see the same output gradients.
* :func:`conv_grad_sample` - a convolution's per-sample weight gradients by whichever of
  three equal computations is fastest for the layer's shape (timed on first use): ONE grouped
  weight-gradient convolution (groups = batch x the layer's groups) through torch's native
  convolution backward, a batched matrix product of the unfolded inputs, or Opacus' own
  unfold-and-einsum. On a CPU the grouped kernel is 3-7x faster at the autoencoder's 16x16
  and 32x32 layers and 8-10x over the 3D models, but up to 2x slower than the matrix product
  at the quick denoiser's 4x4 layers and up to 7x at 1x1 kernels (docs/benchmarks.md
  section 1). Opacus ships a similar "backward as a convolution" sampler that it leaves unused
  ("slower in many contexts"); nothing here measured it on a GPU, so this one is active on
  the CPU only.

All are checked against Opacus' own path by the tests (per-sample gradients equal to the
reference, updates equal to upstream's clip, non-finite entries zeroed before clipping).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import opacus
import torch
from opacus.grad_sample import grad_sample_module as _gsm
from opacus.grad_sample.conv import compute_conv_grad_sample as _UPSTREAM_CONV
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _mark_as_processed,
)

# The internals patched here are those of this Opacus line; another version gets the
# upstream path (slower, same result) rather than a patch written for code it does not have.
SUPPORTED_OPACUS = ("1.6",)


def supported() -> bool:
    return opacus.__version__.startswith(SUPPORTED_OPACUS)


def _accumulate(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    if not param.requires_grad:
        return
    current = getattr(param, "_current_grad_sample", None)
    if current is None and grad_sample.shape[0] == max_batch_len:
        param._current_grad_sample = grad_sample  # type: ignore[attr-defined]
    elif current is not None and current.shape == grad_sample.shape:
        param._current_grad_sample = current + grad_sample  # type: ignore[attr-defined]
    else:  # a short batch, or shapes this shortcut does not cover: upstream's way
        _UPSTREAM_ACCUMULATE(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


_UPSTREAM_ACCUMULATE = _gsm.create_or_accumulate_grad_sample
_CONVS = (torch.nn.Conv2d, torch.nn.Conv3d)
_WEIGHT_GRAD = {torch.nn.Conv2d: torch.nn.grad.conv2d_weight,
                torch.nn.Conv3d: torch.nn.grad.conv3d_weight}


def _grouped_weight_grads(layer: torch.nn.Module, x: torch.Tensor,
                          backprops: torch.Tensor) -> torch.Tensor:
    """[B, *weight] by ONE grouped weight-gradient convolution.

    The batch goes into the channel axis, so that sample i's input channels meet only sample
    i's output gradients: conv_weight(x [1, B*Cin, ...], g [1, B*Cout, ...], groups=B*G) is
    the stack of the B per-sample weight gradients."""
    n, w = x.shape[0], layer.weight
    grouped = _WEIGHT_GRAD[type(layer)](
        x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * w.shape[0], *w.shape[1:]),
        backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:]),
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
        groups=n * layer.groups)
    return grouped.view(n, *w.shape)


def _bmm_weight_grads(layer: torch.nn.Module, x: torch.Tensor,
                      backprops: torch.Tensor) -> torch.Tensor:
    """[B, *weight] as one batched matrix product of the output gradients [B, Cout, L] and the
    unfolded inputs [B, L, Cin*k^2] (a 1x1 kernel needs no unfolding). Ungrouped layers only."""
    n, w = x.shape[0], layer.weight
    g = backprops.reshape(n, backprops.shape[1], -1)
    if _is_pointwise(layer):
        cols = x.reshape(n, x.shape[1], -1)
    else:
        cols = torch.nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation,
                                          padding=layer.padding, stride=layer.stride)
    return torch.bmm(g, cols.transpose(1, 2)).view(n, *w.shape)


def _upstream_weight_grads(layer: torch.nn.Module, x: torch.Tensor,
                           backprops: torch.Tensor) -> torch.Tensor:
    """[B, *weight] from Opacus' own sampler (unfold and einsum)."""
    return _UPSTREAM_CONV(layer, [x], backprops)[layer.weight]


def _is_pointwise(layer: torch.nn.Module) -> bool:
    return (all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
            and all(p == 0 for p in layer.padding))


WEIGHT_GRAD_METHODS = {"grouped": _grouped_weight_grads, "bmm": _bmm_weight_grads,
                       "upstream": _upstream_weight_grads}
# The fastest method per layer shape, measured on first use in this process (every method
# gives the same per-sample gradients; only the time differs, by up to 7x either way across
# the quick models' layers: docs/benchmarks.md section 1). Keyed without the batch size, which
# Poisson sampling changes every step.
_CHOSEN: dict[tuple, str] = {}


def _methods_for(layer: torch.nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    bmm_fits = layer.groups == 1 and (x.dim() == 4 or _is_pointwise(layer))
    return ("grouped", "bmm", "upstream") if bmm_fits else ("grouped", "upstream")


def _fastest(layer: torch.nn.Module, x: torch.Tensor, backprops: torch.Tensor,
             key: tuple) -> tuple[str, torch.Tensor]:
    """Time every method up to three times, interleaved, and keep the one with the shortest time
    for `key` (the minimum and the interleaving keep a busy neighbour from deciding the pick).
    A method more than twice as slow as the best after a pass is not timed again: Opacus'
    sampler costs seconds a call at the 3D autoencoder's layers."""
    names = _methods_for(layer, x)
    best: dict[str, float] = dict.fromkeys(names, math.inf)
    out: torch.Tensor | None = None
    for _ in range(3):
        fastest = min(best.values())
        for name in (n for n in names if best[n] <= 2 * fastest):
            t = time.perf_counter()
            out = WEIGHT_GRAD_METHODS[name](layer, x, backprops)
            best[name] = min(best[name], time.perf_counter() - t)
    pick = min(names, key=best.__getitem__)
    _CHOSEN[key] = pick
    assert out is not None  # `names` is never empty
    return pick, out  # every method computes the same gradients: the last one is as good


def conv_grad_sample(layer: torch.nn.Module, activations: list[torch.Tensor],
                     backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d/Conv3d: Opacus' grad-sampler contract, same values.

    The weight's gradients come from whichever of three equal computations is fastest for
    the layer's shape on this machine (`WEIGHT_GRAD_METHODS`, timed on first use): one grouped
    weight-gradient convolution (fast where positions are many), a batched matrix product of
    the unfolded inputs (small latents, 1x1 kernels) or Opacus' own sampler. Layers this does
    not cover (string or non-zero padding modes, empty batches, non-CPU tensors) go to Opacus'
    sampler."""
    x = activations[0]
    n = x.shape[0]
    if (type(layer) not in _WEIGHT_GRAD or n == 0 or isinstance(layer.padding, str)
            or layer.padding_mode != "zeros" or x.device.type != "cpu"):
        return _UPSTREAM_CONV(layer, activations, backprops)
    x = x.to(backprops.dtype)
    ret: dict[torch.nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        key = (type(layer), tuple(layer.weight.shape), layer.stride, layer.padding,
               layer.dilation, layer.groups, tuple(x.shape[1:]), x.dtype)
        method = _CHOSEN.get(key)
        if method is None:
            _, ret[layer.weight] = _fastest(layer, x, backprops, key)
        else:
            ret[layer.weight] = WEIGHT_GRAD_METHODS[method](layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return ret


@contextlib.contextmanager
def lean_accumulation() -> Iterator[None]:
    """Use :func:`_accumulate` and, on the CPU path, :func:`conv_grad_sample` for Opacus' hooks
    while the block runs (restored after, also on error).

    The patches are process-wide (a site's worker may train two runs' rounds in threads at
    once); each computes exactly what upstream computes, so a thread that leaves the block
    while another is inside only returns the other to upstream's slower path."""
    if not supported():
        yield
        return
    samplers = _gsm.GradSampleModule.GRAD_SAMPLERS
    _gsm.create_or_accumulate_grad_sample = _accumulate
    for conv in _CONVS:
        samplers[conv] = conv_grad_sample
    try:
        yield
    finally:
        _gsm.create_or_accumulate_grad_sample = _UPSTREAM_ACCUMULATE
        for conv in _CONVS:
            samplers[conv] = _UPSTREAM_CONV


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _conv_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer._conv_forward(x, _detached(layer.weight), _detached(layer.bias))


def _linear_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, _detached(layer.weight), _detached(layer.bias))


def _group_norm_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, layer.num_groups, _detached(layer.weight),
                                          _detached(layer.bias), layer.eps)


# Exact types only: a subclass may have its own forward, which this must not replace.
_DETACHABLE = {torch.nn.Conv1d: _conv_forward, torch.nn.Conv2d: _conv_forward,
               torch.nn.Conv3d: _conv_forward, torch.nn.Linear: _linear_forward,
               torch.nn.GroupNorm: _group_norm_forward}


@contextlib.contextmanager
def no_summed_weight_grads(module: torch.nn.Module) -> Iterator[None]:
    """While the block runs, autograd does not compute the summed weight gradients of the
    module's convolution, linear and GroupNorm layers (restored after, also on error).

    Under DP-SGD those gradients are thrown away: the update is built from the per-sample
    gradients Opacus' hooks compute from each layer's inputs and output gradients, and the
    optimizer overwrites ``p.grad`` with their clipped, noised sum. Autograd still computes
    them, about a third of a plain backward pass for the quick denoiser. A layer here runs
    with its parameters detached whenever its input carries a gradient, so its output still
    carries one (its backward hook fires with the same output gradients) but autograd has no
    weight gradient to compute; a layer whose input carries none (the first layer, the
    embedding branch) keeps its parameters attached, or its output would need no gradient
    and its hook would never fire. Nothing Opacus computes changes."""
    patched: list[torch.nn.Module] = []

    def wrap(layer: torch.nn.Module, forward: Any, default: Any) -> Any:
        def lean(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or not (torch.is_grad_enabled() and x.requires_grad):
                return default(x, *args, **kwargs)
            return forward(layer, x)
        return lean

    try:
        for layer in module.modules():
            forward = _DETACHABLE.get(type(layer))
            if forward is None or "forward" in vars(layer):
                continue
            if not any(p.requires_grad for p in layer.parameters(recurse=False)):
                continue
            layer.forward = wrap(layer, forward, layer.forward)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def zero_non_finite(grad_samples: list[torch.Tensor]) -> None:
    """Zero every non-finite entry of the per-sample gradients, in place."""
    for g in grad_samples:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    n = len(grad_samples[0])
    per_param = [g.reshape(n, -1).norm(2, dim=-1) for g in grad_samples]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


class FiniteClipDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer (flat clipping) with non-finite per-sample entries zeroed before
    the clip, in one pass over the gradients instead of two."""

    def clip_and_accumulate(self) -> None:
        if len(self.grad_samples[0]) == 0:
            super().clip_and_accumulate()  # an empty physical batch: upstream's handling
            return
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        norms = per_sample_norms(samples)
        if not bool(torch.isfinite(norms).all()):
            zero_non_finite(samples)
            norms = per_sample_norms(samples)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            # One matrix-vector product: a single pass over the sample's gradients (the
            # einsum it replaces multiplied into a temporary, then summed it).
            grad = (factor.to(g.device, p.dtype) @ g.to(p.dtype).reshape(len(g), -1)).view(
                g.shape[1:])
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


class LeanPrivacyEngine(opacus.PrivacyEngine):
    """PrivacyEngine whose flat-clipping optimizer is :class:`FiniteClipDPOptimizer`."""

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        opt = super()._prepare_optimizer(**kwargs)
        if type(opt) is not DPOptimizer:
            raise RuntimeError(f"expected Opacus' flat-clipping DPOptimizer, got "
                               f"{type(opt).__name__}: fedldm only trains with flat clipping")
        opt.__class__ = FiniteClipDPOptimizer  # same state; only clip_and_accumulate differs
        return opt
