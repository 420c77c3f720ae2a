"""What the latent space saves: the latent denoiser against a pixel-space one, same UNet family.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_vs_pixel.py [--sizes 64 128]

For each image size, the preset's class-conditional `DiffusionModelUNet` (same channels, blocks
and attention) runs once on the autoencoder's latents (preset shape, image_size / 4 per side)
and once on the pixels (1 channel, full size). Measured in one run on this machine, each in its
own subprocess (so peak memory is that configuration's alone):

- training: seconds per sample of a step of the phase's own loss through `dp_train` (slope over
  local steps, so the per-round set-up is left out), without DP and with Opacus per-sample
  gradients + clipping + noise;
- peak resident memory of the process above its state after the imports;
- sampling: seconds per image of the preset's DDIM steps with classifier-free guidance (the
  generator's defaults), plus the autoencoder's decode for the latent model.

Prints one JSON line per measurement and a markdown table with latent/pixel ratios (target:
the latent model >= 4x cheaper at 64 px and >= 8x at 128 px).

`--spatial-dims 3` measures volumes (SIZE^3 voxels, e.g. `--sizes 32 64 --batch 4`): the
preset's 3D plan (`model.spatial_dims=3`, as `fedldm simulate --data demo3d` builds it: for
`quick` the narrower (8, 16, 32) autoencoder, so the latent is SIZE/4 a side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from types import SimpleNamespace

import torch
from _subrun import run_child

from ldm_core.config import build_config
from ldm_core.dp_random import PrivacyRng
from ldm_core.models import make_autoencoder, make_denoiser
from ldm_core.phases import DIFFUSION
from ldm_core.sampling import sample_latents
from ldm_core.training import dp_train, sampling_plan

TARGET = {64: 4.0, 128: 8.0}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_cfg(preset: str, size: int, space: str, dims: int = 2):  # noqa: ANN202
    cfg = build_config(preset=preset, image_size=size, class_names=("a", "b", "c", "d"),
                       overrides={"model.spatial_dims": dims} if dims == 3 else None)
    model = cfg.model
    if space == "pixel":  # no autoencoder: the "latent" is the 1-channel image itself
        model = dataclasses.replace(model, latent_channels=1,
                                    ae_channels=(cfg.model.ae_channels[0],))
    # A namespace, not a RunConfig: the pixel model's 1-channel "autoencoder" is no valid
    # RunConfig, and the diffusion loss reads only `model` and `dm`.
    return SimpleNamespace(model=model, dm=cfg.dm, diffusion=cfg.diffusion)


def measure(preset: str, size: int, space: str, batch: int, reps: int, dims: int = 2
            ) -> dict[str, object]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _model_cfg(preset, size, space, dims)
    m = cfg.model
    base = _rss_mb()
    # the phase's own loss: v-prediction, noise multiplicity K
    loss = DIFFUSION.loss(cfg, cfg.diffusion)  # type: ignore[arg-type]

    def call(k: int, sigma: float) -> float:
        phase = dataclasses.replace(cfg.diffusion, batch_size=batch, sample_rate=1.0,
                                    local_steps=k, physical_batch_size=batch)
        model = make_denoiser(m)
        t = time.perf_counter()
        dp_train(model, (x, y, s), loss, phase=phase, plan=sampling_plan(phase),
                 noise_multiplier=sigma, seed=0, privacy_rng=PrivacyRng.secure(),
                 device=torch.device("cpu"), show_progress=False)
        return time.perf_counter() - t

    def per_sample(sigma: float) -> float:
        """Slope over `reps` extra local steps: a round pays dp_train's set-up once."""
        call(1, sigma)  # warm-up
        return (call(1 + reps, sigma) - call(1, sigma)) / reps / batch

    x = torch.randn(batch, *m.latent_shape)
    y = torch.randint(0, m.n_classes, (batch,))
    s = torch.full((batch,), -1)  # no site slot

    plain, dp = per_sample(0.0), per_sample(1.0)
    train_peak = _rss_mb() - base
    unet = make_denoiser(m)

    n_img = 8
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n_img) % m.n_classes
    ae = make_autoencoder(m).eval() if space == "latent" else None
    t0 = time.perf_counter()
    with torch.no_grad():
        z = sample_latents(unet, m, labels, steps=cfg.dm.ddim_steps,
                           guidance_scale=cfg.dm.guidance_scale, generator=gen,
                           device=torch.device("cpu"))
        if ae is not None:
            ae.decode(z)
    sample = (time.perf_counter() - t0) / n_img
    return {"space": space, "image_size": size, "spatial_dims": dims,
            "tensor": list(x.shape[1:]),
            "train_s_per_sample": plain, "dp_train_s_per_sample": dp,
            "peak_rss_mb": round(_rss_mb() - base, 1), "train_peak_rss_mb": round(train_peak, 1),
            "sample_s_per_image": sample}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--one", nargs=2, metavar=("SPACE", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.preset, int(args.one[1]), args.one[0], args.batch,
                                 args.reps, args.spatial_dims)))
        return
    rows: dict[tuple[int, str], dict[str, float]] = {}
    for size in args.sizes:
        for space in ("latent", "pixel"):
            rows[(size, space)] = run_child(__file__, "--preset", args.preset, "--batch",
                                          str(args.batch), "--reps", str(args.reps),
                                          "--spatial-dims", str(args.spatial_dims), "--one",
                                          space, str(size))
    print(f"\npreset {args.preset}, {args.spatial_dims}D, batch {args.batch}, 1 thread; "
          "pixel/latent = how many times cheaper the latent model is")
    print("| size | tensor latent / pixel | train s/sample latent / pixel (x) | "
          "DP train (x) | peak MB (x) | sample s/img incl. decode (x) | target |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        lat, pix = rows[(size, "latent")], rows[(size, "pixel")]

        def cell(key: str, fmt: str = ".4f", lat: dict = lat, pix: dict = pix) -> str:
            a, b = float(lat[key]), float(pix[key])
            return f"{a:{fmt}} / {b:{fmt}} ({b / a:.1f}x)"

        # the targets are for 2D images; volumes have none of their own
        target = f">= {TARGET[size]:g}x" if args.spatial_dims == 2 and size in TARGET else "-"
        print(f"| {size} | {lat['tensor']} / {pix['tensor']} | {cell('train_s_per_sample')} | "
              f"{cell('dp_train_s_per_sample')} | {cell('train_peak_rss_mb', '.0f')} | "
              f"{cell('sample_s_per_image', '.3f')} | {target} |")


if __name__ == "__main__":
    main()
