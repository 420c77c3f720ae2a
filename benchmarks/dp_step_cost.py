"""Cost of DP-SGD relative to plain SGD, per preset, on this machine, in one run (a ratio).

    .venv/bin/python benchmarks/dp_step_cost.py --preset quick

Measures seconds per optimizer step of every phase's model (ldm_core.phases: the autoencoder,
the denoiser) under the phase's own training loss, with Opacus (per-sample gradients + clipping +
noise, noise multiplicity K from the preset) and without DP, on random tensors of the preset's
shapes, after one warm-up step. Ratios are what to compare across
machines; absolute times only within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ldm_core.config import build_config
from ldm_core.dp_random import PrivacyRng
from ldm_core.phases import PHASES
from ldm_core.training import dp_train, sampling_plan


def _time(fn, reps: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = build_config(preset=args.preset, class_names=("a", "b", "c", "d"))
    m = cfg.model
    n = args.batch
    x = torch.rand(n, 1, m.image_size, m.image_size) * 2 - 1
    z = torch.randn(n, m.latent_channels, m.latent_size, m.latent_size)
    y = torch.randint(0, m.n_classes, (n,))
    # Random stand-ins of each phase's train_inputs (images; latents + labels).
    inputs = {"autoencoder": (x,), "diffusion": (z, y)}

    rows = []
    for name, spec in PHASES.items():
        tensors, loss = inputs[name], spec.train_loss(cfg)
        ph = dataclasses.replace(spec.config(cfg), batch_size=n, sample_rate=1.0, local_steps=1,
                                 physical_batch_size=n)
        plan = sampling_plan(ph)
        res = {}
        for sigma in (0.0, 1.0):
            model = spec.make_model(m)
            res[sigma] = _time(lambda model=model, sigma=sigma, ph=ph, plan=plan, tensors=tensors,
                               loss=loss: dp_train(model, tensors, loss, phase=ph, plan=plan,
                                                   noise_multiplier=sigma, seed=0,
                                                   privacy_rng=PrivacyRng.secure(),
                                                   device=torch.device("cpu"),
                                                   show_progress=False), args.reps)
        rows.append((name, res[0.0], res[1.0], res[1.0] / res[0.0]))
    print(f"preset {args.preset}, batch {n}, 1 thread")
    print("| model | non-DP s/step | DP s/step | DP / non-DP |\n|---|---|---|---|")
    for name, a, b, r in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
