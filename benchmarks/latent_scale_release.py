"""How far the DP latent-scale release lands from the exact scale factor, per clip.

The scale factor 1 / sqrt(E[z^2]) is released by each site with one Gaussian mechanism on the
clipped per-patient second moments (client.tasks.latent_stats) and pooled by
server.aggregate.robust_scale_factor. Small cohorts (3D: ~140 patients a site) make that
release noisy; this replays the mechanism many times on a finished run's sites (the exact
per-patient values from the run's autoencoder, the run's noise multiplier) for several clips,
and prints the 5/50/95% quantiles of the released scale factor and how often it hits a clamp.
Post-processing of nothing: it reads the run's simulated site data on this machine.

    .venv/bin/python benchmarks/latent_scale_release.py RUN [--clips 10,4,2] [--draws 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from client.tasks import per_patient_mean
from ldm_core.checkpoint import load_checkpoint
from ldm_core.config import RunConfig
from ldm_core.data import load_site
from ldm_core.models import make_autoencoder
from ldm_core.privacy import dp_sum_and_count
from server.aggregate import robust_scale_factor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished simulation's run folder")
    p.add_argument("--clips", default="10,4,2")
    p.add_argument("--draws", type=int, default=2000)
    args = p.parse_args()
    tensors, meta = load_checkpoint(args.run / "checkpoints" / "ae-final")
    cfg = RunConfig.from_dict(meta["config"])
    info = json.loads((args.run / "run.json").read_text())
    ae = make_autoencoder(cfg.model)
    ae.load_state_dict(tensors["autoencoder"])
    ae.eval()
    n_sites = int(info.get("sites") or 3)
    per_site = []
    for k in range(n_sites):
        d = load_site(info["data"], site_index=k, n_sites=n_sites, scheme=info["partition"],
                      image_size=cfg.model.image_size, seed=int(info.get("data_seed", 0)),
                      masks=cfg.model.mask_channels > 0, progress=False,
                      voxel_mm=cfg.model.voxel_mm)
        with torch.no_grad():
            z = ae.encode(d.train.model_input())[0]
        per_site.append(per_patient_mean(z.pow(2).flatten(1).mean(1), d.train.patients))
    every = torch.cat(per_site)
    # Without noise, through the run's own aggregation (with 3+ sites "auto" is the median of
    # the sites' means, not the pooled mean): what a release at epsilon inf gives.
    exact, _ = robust_scale_factor([(float(v.sum()), float(len(v))) for v in per_site],
                                   clip=float(every.max()) + 1.0, method=cfg.aggregation.method)
    print(f"patients per site {[len(v) for v in per_site]}, exact scale factor {exact:.3f} "
          f"({cfg.aggregation.method} aggregation; pooled "
          f"{float(1 / every.mean().sqrt()):.3f}), largest per-patient E[z^2] "
          f"{float(every.max()):.2f}")
    gen = torch.Generator().manual_seed(0)
    for clip in (float(c) for c in args.clips.split(",")):
        out, flagged = [], 0
        for _ in range(args.draws):
            stats = []
            for v in per_site:
                s, c = dp_sum_and_count(v.clamp(0, clip).double().unsqueeze(1), clip=clip,
                                        noise_multiplier=cfg.privacy.scale_noise_multiplier,
                                        generator=gen)
                stats.append((float(s[0]), c))
            scale, note = robust_scale_factor(stats, clip=clip, method=cfg.aggregation.method)
            out.append(scale)
            flagged += note is not None  # the coordinator's own check: clamped or swamped
        q = torch.quantile(torch.tensor(out), torch.tensor([0.05, 0.5, 0.95])).tolist()
        row = {"clip": clip, "q05": round(q[0], 3), "median": round(q[1], 3),
               "q95": round(q[2], 3), "at_clamp": round(flagged / args.draws, 3)}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
