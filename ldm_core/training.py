"""Local training rounds with DP-SGD (Opacus, Poisson sampling) or, for epsilon=inf, plain SGD.

The sampling plan comes from the configuration (`sampling_plan`), never from the site's data, so
the ledger can be charged for exactly the steps that will run before any data is touched, and the
epsilon a site reports says nothing about its size. `dp_train` checks that it ran exactly that
many optimizer steps: a mismatch would mean the ledger under-counted, so it raises instead.

The unit of privacy is the patient. Records are grouped by patient (`groups`); Poisson sampling
draws patients, and a patient's contribution to one step is the sum of the gradients of at most
`images_per_step` of its images, clipped as one per-sample gradient. Opacus' hooks accumulate
per-sample gradients over repeated forward calls on the same batch rows, so calling the loss once
per image slot and summing is exactly "sum the patient's gradients, then clip". Without patient
ids every image is its own patient and this reduces to ordinary per-image DP-SGD.

Randomness: `seed` drives what is not privacy-relevant (shuffling of the non-private baseline,
the loss function's timesteps and noise, which image of a patient is used). Poisson membership and
the DP noise come from `privacy_rng` (ldm_core.dp_random), never from `seed`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers.optimizer import DPOptimizer, _generate_noise
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from ldm_core.config import PhaseConfig
from ldm_core.data import rows_by_patient
from ldm_core.dp_fast import LeanPrivacyEngine, lean_accumulation, no_summed_weight_grads
from ldm_core.dp_random import PrivacyRng

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling rate (per patient) and logical step count of one round at one site."""

    sample_rate: float
    steps: int


def sampling_plan(phase: PhaseConfig) -> SamplingPlan:
    """The round's plan, from the configuration alone (the same at every site)."""
    return SamplingPlan(sample_rate=phase.sample_rate, steps=phase.local_steps)


@dataclass(frozen=True)
class TrainStats:
    steps: int
    mean_loss: float
    losses: tuple[float, ...]
    # What the DP optimizer actually used, read back from it (0.0 / inf without DP): the
    # caller compares them with what the ledger was charged for.
    noise_multiplier: float = 0.0
    max_grad_norm: float = math.inf
    batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class PatientUnits:
    """Records grouped by privacy unit: tensors ``[P, c, ...]`` plus a validity mask ``[P, c]``."""

    tensors: tuple[torch.Tensor, ...]
    mask: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.mask.shape[0])


def group_by_patient(tensors: Sequence[torch.Tensor], groups: Sequence[str] | None, *,
                     max_images: int, generator: torch.Generator) -> PatientUnits:
    """Stack each patient's records into slots; without ids every record is its own patient.

    A patient with more than `max_images` records keeps a random subset this round (any subset
    is fine for privacy: the patient's whole contribution is clipped together).
    """
    n = tensors[0].shape[0]
    if groups is None:
        return PatientUnits(tuple(t.unsqueeze(1) for t in tensors),
                            torch.ones(n, 1, dtype=torch.bool))
    members = []
    for rows in rows_by_patient(groups, n):
        if len(rows) > max_images:
            keep = torch.randperm(len(rows), generator=generator)[:max_images].tolist()
            rows = [rows[k] for k in sorted(keep)]
        members.append(rows)
    slots = max(len(r) for r in members)
    idx = torch.zeros(len(members), slots, dtype=torch.long)
    mask = torch.zeros(len(members), slots, dtype=torch.bool)
    for p, rows in enumerate(members):
        idx[p, :len(rows)] = torch.tensor(rows)
        mask[p, :len(rows)] = True
    return PatientUnits(tuple(t[idx] for t in tensors), mask)


def patient_loss(loss_fn: LossFn, images_per_step: int) -> LossFn:
    """Per-patient loss: the sum of `loss_fn` over up to `images_per_step` of its valid slots.

    The batch is ``(*tensors [B, c, ...], mask [B, c])``. Each call of `loss_fn` sees one image
    per patient (batch rows stay patients), so Opacus sums the calls' per-sample gradients per
    patient before clipping.
    """

    def fn(model: nn.Module, batch: tuple[torch.Tensor, ...], gen: torch.Generator
           ) -> torch.Tensor:
        *tensors, mask = batch
        mask = mask.bool()
        c = mask.shape[1]
        if c == 1:
            return loss_fn(model, tuple(t[:, 0] for t in tensors), gen) * mask[:, 0]
        # Random valid slots per patient: random keys, invalid slots pushed to the end.
        keys = torch.rand(mask.shape, generator=gen).to(mask.device) + (~mask) * 2.0
        order = keys.argsort(dim=1)[:, :images_per_step]
        rows = torch.arange(mask.shape[0], device=mask.device)
        total = None
        for j in range(order.shape[1]):
            slot = order[:, j]
            part = loss_fn(model, tuple(t[rows, slot] for t in tensors), gen) * mask[rows, slot]
            total = part if total is None else total + part
        assert total is not None  # images_per_step >= 1
        return total

    return fn


class SecretPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson sampler with a generator reseeded from the privacy source every batch."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int,
                 privacy_rng: PrivacyRng) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate,
                         generator=torch.Generator(), steps=steps)
        self._privacy_rng = privacy_rng

    def __iter__(self):  # noqa: ANN204 - same signature as Opacus' sampler
        for _ in range(self.steps):
            self._privacy_rng.reseed(self.generator)
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def poisson_loader(dataset: TensorDataset, plan: SamplingPlan, privacy_rng: PrivacyRng
                   ) -> DataLoader:
    """What Opacus' DPDataLoader builds, with the plan's rate and step count and secret bits."""
    sampler = SecretPoissonSampler(num_samples=len(dataset), sample_rate=plan.sample_rate,
                                   steps=plan.steps, privacy_rng=privacy_rng)
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate, batch_first=True, rand_on_empty=False,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def _quiet_opacus(fn: Callable[..., TrainStats]) -> Callable[..., TrainStats]:
    """Silence the warnings Opacus repeats on every step.

    Its hooks warn on each backward when inputs need no grad (expected here), and about secure
    RNG: Opacus' secure mode needs torchcsprng, which does not build for this torch; the
    privacy randomness comes from ldm_core.dp_random instead (OS entropy, reseeded every step).
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> TrainStats:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            return fn(*args, **kwargs)

    return wrapper


def _optimizer(module: nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr)
    return torch.optim.Adam(params, lr=phase.lr)


def trainable_names(module: nn.Module, train_only: Sequence[str]) -> list[str]:
    """The parameters a phase trains: all, or those whose names contain a `train_only` piece.

    Why a subset: on top of a public prior, DP fine-tuning only the conditioning path spends the
    clip norm (hence the signal each noisy step carries) on fewer coordinates and adds noise to
    fewer of them. A piece that matches nothing is an error, not a silent full freeze.
    """
    names = [n for n, _ in module.named_parameters()]
    if not train_only:
        return names
    unmatched = [piece for piece in train_only if not any(piece in n for n in names)]
    if unmatched:
        raise ValueError(f"train_only {list(unmatched)} match no parameter of "
                         f"{type(module).__name__} (e.g. {names[:3]})")
    return [n for n in names if any(piece in n for piece in train_only)]


def frozen_names(module: nn.Module, train_only: Sequence[str]) -> set[str]:
    """Parameters a phase leaves exactly as the coordinator sent them (none without
    `train_only`). They stay out of a site's reply: the coordinator has them already, and only
    the trained part of the model needs to travel."""
    trained = set(trainable_names(module, train_only))
    return {n for n, _ in module.named_parameters() if n not in trained}


def _freeze_outside(module: nn.Module, train_only: Sequence[str]) -> dict[str, bool]:
    """Freeze what `train_only` leaves out; returns every parameter's previous flag."""
    keep = set(trainable_names(module, train_only))
    before = {name: p.requires_grad for name, p in module.named_parameters()}
    for name, p in module.named_parameters():
        p.requires_grad_(name in keep)
    return before


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
    privacy_rng: PrivacyRng | None = None,
    groups: Sequence[str] | None = None,
    images_per_step: int = 1,
    max_patient_images: int = 16,
    desc: str = "train",
    show_progress: bool = True,
) -> TrainStats:
    """Train `module` in place for `plan.steps` optimizer steps.

    noise_multiplier == 0 means the non-private baseline: the optimizer on shuffled batches of
    `phase.batch_size` patients. Otherwise Opacus wraps model and optimizer (flat clipping at
    phase.max_grad_norm per patient) and the batches come from a Poisson sampler over patients
    at `plan.sample_rate`. `privacy_rng` is required then: the caller decides where privacy
    randomness comes from (a site: its own entropy). Loss functions always get the bare module
    (Opacus hooks sit on its layers, so calls like `ae.encode` are still captured). The weights
    are updated in place and Opacus' wrapper is removed again.
    """
    if noise_multiplier > 0 and privacy_rng is None:
        raise ValueError("DP training needs a privacy_rng (ldm_core.dp_random): privacy "
                         "randomness must never come from the run's seed")
    gen = torch.Generator().manual_seed(seed)
    units = group_by_patient(tensors, groups, max_images=max_patient_images, generator=gen)
    per_patient = patient_loss(loss_fn, images_per_step)
    module.to(device).train()
    flags = _freeze_outside(module, phase.train_only)
    # What is frozen goes back bit for bit (the EMA's float arithmetic would move it by a
    # rounding error): it must leave the site exactly as the coordinator sent it.
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    dataset = TensorDataset(*units.tensors, units.mask)
    optimizer = _optimizer(module, phase)
    losses: list[float] = []
    sizes: list[int] = []
    steps = 0
    bar = tqdm(total=plan.steps, desc=desc, leave=False, disable=not show_progress)
    ema = _Ema(module, phase.ema_decay)

    def run_batch(batch_tensors: list[torch.Tensor]) -> None:
        batch_tensors = [t.to(device) for t in batch_tensors]
        loss = per_patient(module, tuple(batch_tensors), gen)
        if loss.dim() != 1:
            raise ValueError(f"loss_fn must return per-sample losses [B], got {tuple(loss.shape)}")
        loss.mean().backward()
        losses.append(float(loss.detach().mean()))

    used_sigma, used_clip = 0.0, math.inf
    if noise_multiplier == 0.0:
        loader = DataLoader(dataset, batch_size=min(phase.batch_size, len(dataset)),
                            shuffle=True, generator=gen)
        while steps < plan.steps:
            for batch_tensors in loader:
                optimizer.zero_grad(set_to_none=True)
                run_batch(batch_tensors)
                optimizer.step()
                ema.update(module)
                sizes.append(int(batch_tensors[0].shape[0]))
                steps += 1
                bar.update(1)
                if steps == plan.steps:
                    break
    else:
        assert privacy_rng is not None
        # Opacus' DP-SGD with fewer passes over the per-sample gradients (ldm_core.dp_fast);
        # its clip also zeroes non-finite per-sample entries first: the coordinator chooses
        # the weights, and weights crafted to overflow on one patient's images would give that
        # patient an inf/NaN gradient; C / inf = 0 times inf is NaN, and a NaN update would
        # tell, without noise, whether that patient was sampled. Zeroing is a per-record
        # transformation before clipping, so the DP analysis is unchanged.
        engine = LeanPrivacyEngine(accountant="rdp")
        noise_gen = privacy_rng.generator(device)
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=module, optimizer=optimizer,
            data_loader=poisson_loader(dataset, plan, privacy_rng),
            noise_multiplier=noise_multiplier, max_grad_norm=phase.max_grad_norm,
            poisson_sampling=False, noise_generator=noise_gen,
        )
        # Normalise the noisy sum by the public expected batch, not by anything the site's
        # size determines; draw noise the floating-point-safe way of Opacus' secure mode.
        dp_opt.expected_batch_size = phase.batch_size
        dp_opt.secure_mode = True
        used_sigma, used_clip = float(dp_opt.noise_multiplier), float(dp_opt.max_grad_norm)
        logical = 0
        try:
            with lean_accumulation(), no_summed_weight_grads(module), BatchMemoryManager(
                    data_loader=dp_loader, max_physical_batch_size=phase.physical_batch_size,
                    optimizer=dp_opt) as mem_loader:
                for batch_tensors in mem_loader:
                    dp_opt.zero_grad(set_to_none=True)
                    privacy_rng.reseed(noise_gen)
                    if batch_tensors[0].shape[0] == 0:
                        _noise_only_step(dp_opt)
                        sizes.append(0)
                    else:
                        logical += int(batch_tensors[0].shape[0])
                        run_batch(batch_tensors)
                        dp_opt.step()
                        if dp_opt._is_last_step_skipped:
                            continue
                        sizes.append(logical)
                    logical = 0
                    ema.update(module)
                    steps += 1
                    bar.update(1)
        finally:
            dp_model._close()  # removes Opacus' hooks from the module's layers
            _strip_opacus(module)
    bar.close()
    ema.copy_to(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in frozen:
                p.copy_(frozen[name])
    for name, p in module.named_parameters():
        p.requires_grad_(flags[name])
    module.eval()
    if steps != plan.steps:
        raise RuntimeError(f"ran {steps} optimizer steps but the ledger was charged for "
                           f"{plan.steps}; this is a bug, please report it")
    mean = float(sum(losses) / len(losses)) if losses else float("nan")
    return TrainStats(steps=steps, mean_loss=mean, losses=tuple(losses),
                      noise_multiplier=used_sigma, max_grad_norm=used_clip,
                      batch_sizes=tuple(sizes))


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


def _noise_only_step(dp_opt: DPOptimizer) -> None:
    """An empty Poisson batch still gets a noisy (zero-gradient) step.

    Skipping it would make "no update" observable, which depends on the data; the accountant
    already counts the step, so the released weights must carry its noise. Built from Opacus'
    own noise function, since its optimizer cannot step without per-sample gradients.
    """
    std = dp_opt.noise_multiplier * dp_opt.max_grad_norm
    for p in dp_opt.params:
        noise = _generate_noise(std=std, reference=p, generator=dp_opt.generator,
                                secure_mode=dp_opt.secure_mode)
        p.grad = (noise / dp_opt.expected_batch_size).view_as(p)
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
