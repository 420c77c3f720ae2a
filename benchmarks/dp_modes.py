"""Opacus' per-sample-gradient modes, channels-last and torch.compile against fedldm's DP step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_modes.py --phase diffusion --batch 384
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_modes.py --phase autoencoder --batch 64

Why this exists: the DP step's cost is set by how the per-sample gradients are computed, and
Opacus offers several ways (`grad_sample_mode`: hooks, functorch, ew = torch's expanded
weights), while memory layout (channels-last) and compilation (torch.compile) are the usual
levers for a plain step. `ldm_core.training.dp_train` uses hooks through `ldm_core.dp_fast`;
this measures every alternative on the same model, loss and batch, so the choice rests on a
number. Each arm builds its own model and Opacus engine (Poisson sampling off: the same full
batch every step, so only the step's arithmetic differs) and times optimizer steps; the arms
take turns in one process, `--reps` times, because this machine's speed drifts by tens of
percent over minutes. An arm that fails (a mode that does not support a layer) is reported
with its error instead of a time. Noise and clipping are on in every DP arm (sigma 1, clip 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Callable

import opacus
import torch

from ldm_core import dp_fast
from ldm_core.config import build_config
from ldm_core.phases import PHASES

ARMS = ("plain", "plain_channels_last", "plain_compile", "opacus_hooks", "opacus_functorch",
        "opacus_ew", "fedldm", "fedldm_channels_last", "fedldm_compile")


def _inputs(phase: str, batch: int) -> tuple:
    torch.manual_seed(0)
    cfg = build_config(preset="quick", class_names=("a", "b", "c", "d"))
    m = cfg.model
    if phase == "autoencoder":
        tensors = (torch.rand(batch, 1, m.image_size, m.image_size) * 2 - 1,)
    else:
        tensors = (torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size),
                   torch.randint(0, m.n_classes, (batch,)), torch.full((batch,), -1))
    return cfg, tensors


def _stepper(arm: str, phase: str, tensors: tuple, cfg) -> Callable[[], None]:  # noqa: ANN001
    """One optimizer step of `arm` (set-up done here, outside the timing)."""
    spec = PHASES[phase]
    loss_fn = spec.train_loss(cfg)
    model = spec.make_model(cfg.model).train()
    if arm.endswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        tensors = (tensors[0].contiguous(memory_format=torch.channels_last), *tensors[1:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if arm.startswith(("opacus", "fedldm")):
        mode = arm.split("_")[1] if arm.startswith("opacus") else "hooks"
        engine = (dp_fast.LeanPrivacyEngine if arm.startswith("fedldm")
                  else opacus.PrivacyEngine)(accountant="rdp")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors),
                                             batch_size=len(tensors[0]))
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=1.0, max_grad_norm=1.0,
                                            poisson_sampling=False, grad_sample_mode=mode)
        if arm.startswith("fedldm"):
            inner = model._module

            def ctx() -> contextlib.AbstractContextManager:
                stack = contextlib.ExitStack()
                stack.enter_context(dp_fast.lean_accumulation())
                stack.enter_context(dp_fast.no_summed_weight_grads(inner))
                return stack
    if arm.startswith("fedldm") or arm in ("opacus_hooks", "opacus_functorch"):
        # Hooks on the layers do the work: the loss may call the inner model's own methods
        # (the autoencoder's `encode`), as dp_train does. Expanded weights live in the
        # wrapper's forward, so that arm calls the wrapper.
        model = model._module
    forward = torch.compile(model) if arm.endswith("compile") else model

    def step() -> None:
        with ctx():
            opt.zero_grad(set_to_none=True)
            loss_fn(forward, tensors, gen).mean().backward()
            opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=tuple(PHASES), default="diffusion")
    ap.add_argument("--batch", type=int, default=384)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm and turn")
    ap.add_argument("--reps", type=int, default=3, help="turns of every arm")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    cfg, tensors = _inputs(args.phase, args.batch)
    steppers: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for arm in args.arms:
        try:
            steppers[arm] = _stepper(arm, args.phase, tensors, cfg)
            for _ in range(2):  # warm-up: compilation, the per-layer method picks
                steppers[arm]()
        except Exception as e:  # noqa: BLE001 - a mode that cannot run this model is a result
            steppers.pop(arm, None)
            errors[arm] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    times: dict[str, list[float]] = {a: [] for a in steppers}
    for _ in range(args.reps):
        for arm, step in steppers.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[arm].append(round((time.perf_counter() - t) / args.steps, 4))
    med = {a: statistics.median(t) for a, t in times.items()}
    plain = med.get("plain")
    print(f"\n{args.phase}, quick preset, batch {args.batch}, 1 thread, "
          f"{args.reps} turns of {args.steps} steps")
    print("| arm | seconds a step (each turn) | median | x plain |\n|---|---|---|---|")
    for arm in args.arms:
        if arm in errors:
            print(f"| {arm} | failed: {errors[arm]} | - | - |")
        else:
            ratio = f"{med[arm] / plain:.2f}x" if plain else "-"
            print(f"| {arm} | {', '.join(f'{t:.3f}' for t in times[arm])} | "
                  f"{med[arm]:.3f} | {ratio} |")
    print(json.dumps({"phase": args.phase, "batch": args.batch, "runs": times,
                      "median": med, "errors": errors}))


if __name__ == "__main__":
    main()
