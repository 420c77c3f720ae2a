"""Cost of DP-SGD relative to plain SGD, per preset, on this machine, in one run (a ratio).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_step_cost.py --preset quick

Measures every phase's model (ldm_core.phases: the autoencoder, the denoiser) under the phase's
own training loss, through `dp_train` itself: with Opacus (per-sample gradients, clipping, the
preset's noise multiplicity K, secure noise) and without DP, on random tensors of the preset's
shapes, one logical batch per step.

Two DP arms, in the same run: fedldm's path (`ldm_core.dp_fast`: Opacus' hooks and DP
optimizer with fewer passes over the per-sample gradients, non-finite entries zeroed inside the
clip) and the path before it: Opacus' upstream `make_private` objects plus a separate pass that
zeroes non-finite per-sample entries before the clip (the same guard, computed the old way).

A step's cost is the slope of wall time over local steps (`dp_train` with 1 and with 1 + S
steps): the per-call set-up (Opacus' wrapping, the optimizer, the EMA copy) is reported
separately, because a round pays it once, not per step. Peak memory is the resident-set growth
of a fresh process per (phase, mode). Ratios are what to compare across machines; absolute
times only within one run. Target: DP / non-DP <= 1.5 per step for both models.

`--one PHASE 1 --interleave R` takes DP, DP with autograd's summed weight gradients kept (the
path before `dp_fast.no_summed_weight_grads`) and no DP in turn in one process, R times: this
machine's speed drifts by tens of percent over minutes, and taking turns keeps the drift out of
an A/B comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from collections.abc import Callable

import torch
from _subrun import run_child

from ldm_core.config import build_config
from ldm_core.dp_random import PrivacyRng
from ldm_core.phases import PHASES
from ldm_core.training import dp_train, sampling_plan

TARGET = 1.5


def _use_upstream_opacus() -> None:
    """This process trains the way fedldm did before ldm_core.dp_fast (the comparison arm):
    Opacus' own engine, optimizer and accumulation, and a separate non-finite pass."""
    import contextlib

    import opacus
    from opacus.optimizers.optimizer import DPOptimizer

    from ldm_core import training
    from ldm_core.dp_fast import zero_non_finite

    class Guarded(DPOptimizer):
        def clip_and_accumulate(self) -> None:
            zero_non_finite([g for p in self.params for g in (
                p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample])])
            super().clip_and_accumulate()

    class Engine(opacus.PrivacyEngine):
        def _prepare_optimizer(self, **kwargs):  # noqa: ANN003, ANN202
            opt = super()._prepare_optimizer(**kwargs)
            opt.__class__ = Guarded
            return opt

    training.LeanPrivacyEngine = Engine  # type: ignore[attr-defined,misc]
    training.lean_accumulation = contextlib.nullcontext  # type: ignore[attr-defined,assignment]
    _keep_summed_weight_grads()


def _force_conv_method(name: str) -> None:
    """Every convolution takes `name`'s per-sample weight gradients (where it applies; the
    grouped convolution elsewhere) instead of the fastest one timed on first use."""
    from ldm_core import dp_fast

    def forced(layer, x, backprops, key):  # noqa: ANN001, ANN202
        pick = name if name in dp_fast._methods_for(layer, x) else "grouped"
        dp_fast._CHOSEN[key] = pick
        return pick, dp_fast.WEIGHT_GRAD_METHODS[pick](layer, x, backprops)

    dp_fast._fastest = forced  # type: ignore[assignment]


def _keep_summed_weight_grads() -> None:
    """This process lets autograd compute the summed weight gradients under DP as well (the
    path before `dp_fast.no_summed_weight_grads`), for an A/B run of that change alone."""
    import contextlib

    from ldm_core import training

    training.no_summed_weight_grads = lambda module: contextlib.nullcontext()  # type: ignore


def _caller(preset: str, phase: str, batch: int, physical: int) -> Callable[[int, float], float]:
    """call(k, sigma): seconds for one `dp_train` of k local steps on a fresh model."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = build_config(preset=preset, class_names=("a", "b", "c", "d"))
    m = cfg.model
    x = torch.rand(batch, 1, m.image_size, m.image_size) * 2 - 1
    z = torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size)
    y = torch.randint(0, m.n_classes, (batch,))
    s = torch.full((batch,), -1)  # no site slot ("any site")
    # Random stand-ins of each phase's train_inputs (images; latents, labels, site slots).
    tensors = {"autoencoder": (x,), "diffusion": (z, y, s)}[phase]
    spec = PHASES[phase]
    loss = spec.train_loss(cfg)

    def call(k: int, sigma: float) -> float:
        ph = dataclasses.replace(spec.config(cfg), batch_size=batch, sample_rate=1.0,
                                 local_steps=k, physical_batch_size=physical or batch)
        model = spec.make_model(m)
        t = time.perf_counter()
        dp_train(model, tensors, loss, phase=ph, plan=sampling_plan(ph), noise_multiplier=sigma,
                 seed=0, privacy_rng=PrivacyRng.secure(), device=torch.device("cpu"),
                 show_progress=False)
        return time.perf_counter() - t

    return call


def measure(preset: str, phase: str, sigma: float, batch: int, steps: int,
            upstream: bool = False, physical: int = 0,
            conv_method: str = "", summed_grads: bool = False) -> dict[str, float]:
    if upstream:
        _use_upstream_opacus()
    if summed_grads:
        _keep_summed_weight_grads()
    if conv_method:
        _force_conv_method(conv_method)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call = _caller(preset, phase, batch, physical)
    call(1, sigma)  # warm-up
    one, many = call(1, sigma), call(1 + steps, sigma)
    per_step = (many - one) / steps
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"phase": phase, "dp": sigma > 0, "upstream": upstream,
            "conv_method": conv_method or "fastest", "summed_weight_grads": summed_grads,
            "physical": physical or batch, "s_per_step": per_step,
            "s_per_sample": per_step / batch, "setup_s": max(0.0, one - per_step),
            "peak_rss_mb": round(peak, 1)}


def interleaved(preset: str, phase: str, batch: int, steps: int, reps: int) -> dict:
    """Seconds a step of three arms taken in turn in ONE process, `reps` times: DP as fedldm
    trains, DP with autograd's summed weight gradients kept (the path before
    `dp_fast.no_summed_weight_grads`), and no DP. Taking turns in one process keeps the minutes
    in which this machine's speed drifts out of the comparison; the medians are what to read."""
    import contextlib
    import statistics

    from ldm_core import training

    lean = training.no_summed_weight_grads
    arms = {"dp": (1.0, lean), "dp_summed_weight_grads": (1.0, None), "plain": (0.0, lean)}
    call = _caller(preset, phase, batch, 0)
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(reps + 1):  # the first pass warms up (and picks the convolution methods)
        for arm, (sigma, ctx) in arms.items():
            training.no_summed_weight_grads = ctx or (lambda module: contextlib.nullcontext())
            per_step = (call(1 + steps, sigma) - call(1, sigma)) / steps
            if r:
                times[arm].append(round(per_step, 4))
    training.no_summed_weight_grads = lean
    med = {a: statistics.median(t) for a, t in times.items()}
    return {"phase": phase, "batch": batch, "runs": times, "median_s_per_step": med,
            "dp_over_plain": med["dp"] / med["plain"],
            "dp_summed_over_plain": med["dp_summed_weight_grads"] / med["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="extra steps timed for the slope")
    ap.add_argument("--physical", type=int, default=0,
                    help="physical batch under DP (default: the whole batch at once)")
    ap.add_argument("--one", nargs=2, metavar=("PHASE", "SIGMA"), help=argparse.SUPPRESS)
    ap.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--conv-method", default="", choices=("", "grouped", "bmm", "upstream"),
                    help="with --one: force one per-sample convolution method (default: the "
                         "fastest, timed on first use)")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="with --one PHASE: R rounds of DP, DP with the summed weight "
                         "gradients, and no DP in turn in one process (SIGMA is ignored)")
    ap.add_argument("--summed-weight-grads", action="store_true",
                    help="with --one: let autograd compute the summed weight gradients under DP "
                         "too (the path before dp_fast.no_summed_weight_grads)")
    args = ap.parse_args()
    if args.one and args.interleave:
        print(json.dumps(interleaved(args.preset, args.one[0], args.batch, args.steps,
                                     args.interleave)))
        return
    if args.one:
        print(json.dumps(measure(args.preset, args.one[0], float(args.one[1]), args.batch,
                                 args.steps, upstream=args.upstream,
                                 physical=args.physical, conv_method=args.conv_method,
                                 summed_grads=args.summed_weight_grads)))
        return
    res: dict[tuple[str, str], dict[str, float]] = {}
    for name in PHASES:
        for arm, sigma, extra in (("plain", "0", ()), ("dp", "1", ()),
                                  ("upstream", "1", ("--upstream",))):
            res[(name, arm)] = run_child(__file__, "--preset", args.preset, "--batch",
                                         str(args.batch), "--steps", str(args.steps),
                                         "--one", name, sigma, *extra)
    print(f"\npreset {args.preset}, batch {args.batch}, 1 thread, slope over {args.steps} steps")
    print("| model | non-DP s/step | DP s/step | DP / non-DP per step | before dp_fast: DP "
          "s/step (x non-DP) | set-up non-DP / DP s | peak MB non-DP / DP / before | target |"
          "\n|---|---|---|---|---|---|---|---|")
    for name in PHASES:
        a, b, u = res[(name, "plain")], res[(name, "dp")], res[(name, "upstream")]
        print(f"| {name} | {a['s_per_step']:.3f} | {b['s_per_step']:.3f} | "
              f"{b['s_per_step'] / a['s_per_step']:.2f}x | {u['s_per_step']:.3f} "
              f"({u['s_per_step'] / a['s_per_step']:.2f}x) | {a['setup_s']:.2f} / "
              f"{b['setup_s']:.2f} | {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} / "
              f"{u['peak_rss_mb']:.0f} | <= {TARGET}x |")


if __name__ == "__main__":
    main()
