"""Is a volume's SSIM on the same scale as a slice's? The report's autoencoder verdict (PASS at
SSIM >= 0.70, FAIL below 0.40, server.report_verdicts) was set on 2D images; a 3D run scores
volumes with a cubic Gaussian window (ldm_core.evaluation.fidelity.ssim). This scores the same
pairs both ways, the 3D SSIM of each volume against the mean 2D SSIM of its axial slices, for
the shipped quick 3D autoencoder prior's reconstructions of unseen public phantom volumes and
for fixed degradations (Gaussian noise, a 3-voxel box blur). No patient data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssim_3d_scale.py [--volumes 24]
"""

from __future__ import annotations

import argparse
import json

import torch

from ldm_core.config import build_config
from ldm_core.evaluation.fidelity import ssim
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import PUBLIC_SEED, load_pretrained, public_volumes


def axial_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per volume, the mean 2D SSIM over its axial slices (the last RAS axis)."""
    n, c, sx, sy, sz = a.shape

    def flat(v: torch.Tensor) -> torch.Tensor:
        return v.permute(0, 4, 1, 2, 3).reshape(n * sz, c, sx, sy)

    return ssim(flat(a), flat(b)).reshape(n, sz).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=24)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = build_config(preset="quick", overrides={"model.spatial_dims": 3})
    ae = make_autoencoder(cfg.model)
    ae.load_state_dict(load_pretrained(cfg.model))
    ae.eval()
    # another seed than the prior's training volumes: unseen anatomy
    x = public_volumes(args.volumes, cfg.model.image_size, seed=PUBLIC_SEED + 7)
    with torch.no_grad():
        rec = ae.reconstruct(x).clamp(-1, 1)
    rows: list[tuple[str, torch.Tensor]] = [("quick 3D prior, reconstruction", rec)]
    rows += [(f"Gaussian noise sd {sd}", (x + sd * torch.randn_like(x)).clamp(-1, 1))
             for sd in (0.1, 0.2, 0.4, 0.8)]
    rows.append(("box blur, 3 voxels", torch.nn.functional.avg_pool3d(x, 3, 1, 1)))
    print("| pairs | 3D SSIM | mean axial 2D SSIM | 3D - 2D |\n|---|---|---|---|")
    for name, y in rows:
        s3, s2 = ssim(x, y).mean().item(), axial_ssim(x, y).mean().item()
        print(json.dumps({"pairs": name, "ssim_3d": s3, "ssim_2d_axial": s2}))
        print(f"| {name} | {s3:.3f} | {s2:.3f} | {s3 - s2:+.3f} |")


if __name__ == "__main__":
    main()
