"""What a run's autoencoder rounds changed: the shipped prior against the run's trained one.

    .venv/bin/python benchmarks/autoencoder_round.py runs/demo [--images 400]

Reads the run's config and data (run.json, a simulation) and its `ae-final` checkpoint, and
prints per site the reconstruction PSNR of the site's holdout images (volumes: its test volumes
when the holdout is small) with the prior and with the run's autoencoder, plus the largest
weight change. Only meaningful for a run that started from a prior and trained it
(`--ae-rounds N` with `ae_init` a prior); docs/benchmarks.md section 7 used it to decide that
the quick presets keep the prior frozen. A benchmark on simulated data, not a DP release.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldm_core.checkpoint import load_checkpoint
from ldm_core.config import RunConfig
from ldm_core.data import load_site
from ldm_core.evaluation.fidelity import psnr
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import autoencoder_prior


@torch.no_grad()
def _psnr(ae: torch.nn.Module, x: torch.Tensor, chunk: int = 16) -> float:
    rec = torch.cat([ae.decode(ae.encode(x[i:i + chunk])[0]) for i in range(0, len(x), chunk)])
    return float(psnr(rec.clamp(-1, 1), x).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=400, help="holdout images per site (at most)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = json.loads((args.run / "run.json").read_text())
    cfg = RunConfig.from_dict(meta["config"])
    if cfg.ae_init == "random" or cfg.autoencoder.rounds == 0:
        raise SystemExit(f"{args.run}: the autoencoder {'started random' if cfg.ae_init == 'random' else 'ran no round'}; nothing to compare")  # noqa: E501
    prior, trained = make_autoencoder(cfg.model), make_autoencoder(cfg.model)
    prior.load_state_dict(autoencoder_prior(cfg))  # type: ignore[arg-type]
    trained.load_state_dict(load_checkpoint(args.run / "checkpoints" / "ae-final")[0]
                            ["autoencoder"])
    prior.eval(), trained.eval()
    change = max(float((trained.state_dict()[k] - v).abs().max())
                 for k, v in prior.state_dict().items())
    out = {"run": str(args.run), "ae_rounds": cfg.autoencoder.rounds,
           "largest_weight_change": round(change, 4), "sites": {}}
    for s in range(int(meta["sites"])):
        site = load_site(meta["data"], site_index=s, n_sites=int(meta["sites"]),
                         scheme=meta["partition"], image_size=cfg.model.image_size,
                         seed=cfg.seed, progress=False, voxel_mm=cfg.model.voxel_mm)
        split = site.holdout if len(site.holdout.images) >= 20 else site.test
        x = split.images[:args.images]
        out["sites"][f"site-{s}"] = {"images": len(x), "psnr_prior_db": round(_psnr(prior, x), 2),
                                     "psnr_trained_db": round(_psnr(trained, x), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
