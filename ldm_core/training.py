"""Local training epochs with DP-SGD (Opacus, Poisson sampling) or, for epsilon=inf, plain SGD.

The sampling plan is computed by `sampling_plan` *before* training so that the ledger can be
charged for exactly the steps that will run. `dp_train` then checks that it ran exactly that many
optimizer steps: a mismatch would mean the ledger under-counted, so it raises instead.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ldm_core.config import PhaseConfig

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling rate and step count of one round at one site.

    Opacus' DPDataLoader uses sample_rate = 1 / len(loader) = 1 / ceil(n / B) and draws exactly
    ceil(n / B) batches per epoch; the plan mirrors that so the ledger charges the true numbers.
    """

    n: int
    sample_rate: float
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def sampling_plan(n: int, phase: PhaseConfig, *, epochs: int | None = None) -> SamplingPlan:
    if n < 1:
        raise ValueError("a site needs at least one training image to train")
    steps_per_epoch = math.ceil(n / min(phase.batch_size, n))
    return SamplingPlan(n=n, sample_rate=1.0 / steps_per_epoch, steps_per_epoch=steps_per_epoch,
                        epochs=phase.local_epochs if epochs is None else epochs)


@dataclass(frozen=True)
class TrainStats:
    steps: int
    mean_loss: float
    losses: tuple[float, ...]


def _quiet_opacus(fn: Callable[..., TrainStats]) -> Callable[..., TrainStats]:
    """Silence the warnings Opacus repeats on every step.

    Its hooks warn on each backward when inputs need no grad (expected here), and about secure
    RNG (the ledger, not the RNG, is what bounds epsilon in this setting).
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> TrainStats:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            return fn(*args, **kwargs)

    return wrapper


@_quiet_opacus
def dp_train(
    module: nn.Module,
    tensors: tuple[torch.Tensor, ...],
    loss_fn: LossFn,
    *,
    phase: PhaseConfig,
    plan: SamplingPlan,
    noise_multiplier: float,
    seed: int,
    device: torch.device,
    desc: str = "train",
    show_progress: bool = True,
) -> TrainStats:
    """Train `module` in place for `plan.steps` optimizer steps.

    noise_multiplier == 0 means the non-private baseline: plain Adam on shuffled batches of the
    same expected size. Otherwise Opacus wraps model, optimizer and loader (Poisson sampling,
    flat clipping at phase.max_grad_norm). Loss functions always get the bare module (Opacus
    hooks sit on its layers, so calls like `ae.encode` are still captured). The module's weights
    are updated in place; the Opacus wrapper is removed so the caller gets the bare module back.
    """
    n = tensors[0].shape[0]
    if n != plan.n:
        raise ValueError(f"plan made for {plan.n} samples, got {n}")
    gen = torch.Generator().manual_seed(seed)
    module.to(device).train()
    dataset = TensorDataset(*tensors)
    batch = min(phase.batch_size, n)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen)
    optimizer = torch.optim.Adam(module.parameters(), lr=phase.lr)
    losses: list[float] = []
    steps = 0
    bar = tqdm(total=plan.steps, desc=desc, leave=False, disable=not show_progress)
    ema = _Ema(module, phase.ema_decay)

    def run_batch(model: nn.Module, batch_tensors: list[torch.Tensor]) -> None:
        nonlocal steps
        batch_tensors = [t.to(device) for t in batch_tensors]
        if batch_tensors[0].shape[0] == 0:
            return
        loss = loss_fn(model, tuple(batch_tensors), gen)
        if loss.dim() != 1:
            raise ValueError(f"loss_fn must return per-sample losses [B], got {tuple(loss.shape)}")
        loss.mean().backward()
        losses.append(float(loss.detach().mean()))

    if noise_multiplier == 0.0:
        for _ in range(plan.epochs):
            for batch_tensors in loader:
                optimizer.zero_grad(set_to_none=True)
                run_batch(module, batch_tensors)
                optimizer.step()
                ema.update(module)
                steps += 1
                bar.update(1)
    else:
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=phase.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
        if not math.isclose(1 / len(dp_loader), plan.sample_rate, rel_tol=1e-9):
            raise RuntimeError(f"Opacus sample rate {1 / len(dp_loader)} differs from the "
                               f"charged plan {plan.sample_rate}: refusing to train")
        try:
            for _ in range(plan.epochs):
                with BatchMemoryManager(data_loader=dp_loader,
                                        max_physical_batch_size=phase.physical_batch_size,
                                        optimizer=dp_opt) as mem_loader:
                    for batch_tensors in mem_loader:
                        dp_opt.zero_grad(set_to_none=True)
                        if batch_tensors[0].shape[0] == 0:
                            _noise_only_step(dp_opt)
                        else:
                            run_batch(module, batch_tensors)
                            dp_opt.step()
                            if dp_opt._is_last_step_skipped:
                                continue
                        ema.update(module)
                        steps += 1
                        bar.update(1)
        finally:
            dp_model._close()  # removes Opacus' hooks from the module's layers
            _strip_opacus(module)
    bar.close()
    ema.copy_to(module)
    module.eval()
    if steps != plan.steps:
        raise RuntimeError(f"ran {steps} optimizer steps but the ledger was charged for "
                           f"{plan.steps}; this is a bug, please report it")
    mean = float(sum(losses) / len(losses)) if losses else float("nan")
    return TrainStats(steps=steps, mean_loss=mean, losses=tuple(losses))


class _Ema:
    """Exponential moving average of the parameters over optimizer steps (decay 0 = off)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = ({k: v.detach().clone() for k, v in module.state_dict().items()}
                       if decay > 0 else {})

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        if not self.shadow:
            return
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        if self.shadow:
            module.load_state_dict(self.shadow)


def _noise_only_step(dp_opt: torch.optim.Optimizer) -> None:
    """An empty Poisson batch still gets a noisy (zero-gradient) step.

    Skipping it would make "no update" observable, which depends on the data; the accountant
    already counts the step, so the released weights must carry its noise.
    """
    for p in dp_opt.params:
        p.summed_grad = torch.zeros_like(p)
    dp_opt.add_noise()
    dp_opt.scale_grad()
    dp_opt.original_optimizer.step()


def _strip_opacus(module: nn.Module) -> None:
    """Remove per-sample gradient buffers Opacus leaves on parameters."""
    for p in module.parameters():
        for attr in ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for m in module.modules():
        if hasattr(m, "activations"):
            del m.activations
