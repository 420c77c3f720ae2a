"""How well each shipped 2D autoencoder prior holds images it never saw, phantoms or not.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prior_transfer.py \\
        [--data ../shared/data/brain-tumor-mri] [--n 800] [--image-size 64]

A prior the quick preset keeps frozen caps every later number: generated images cannot be
sharper than its reconstructions. This compares the phantom-only prior (`public-phantoms`,
the demo's) with the modality-agnostic one (`public-generic`, the default for other data) on
unseen public phantoms (another seed), unseen generic procedural images (another seed) and,
with --data, N images drawn at random from a real folder or manifest (every split: nothing here
trains). --image-size 64 measures the shipped 32 px priors on 64 px images, as a 64 px 2D run
uses them (`ldm_core.pretrain.shipped_arch`). Reconstruction is the posterior mean decoded, as
the sites' holdout release measures it. Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ldm_core.config import build_config
from ldm_core.data import load_images, scan
from ldm_core.evaluation.fidelity import reconstruction_quality
from ldm_core.models import make_autoencoder
from ldm_core.pretrain import load_pretrained, public_images
from ldm_core.procedural import generic_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a real image folder or manifest (optional)")
    ap.add_argument("--n", type=int, default=800, help="images per set")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--image-size", type=int, help="default: the preset's")
    args = ap.parse_args()
    m = build_config(preset=args.preset, image_size=args.image_size).model
    sets = {"unseen phantoms": public_images(args.n, m.image_size, seed=99),
            "unseen generic images": generic_images(args.n, m.image_size, seed=1234)}
    if args.data is not None:
        records = scan(args.data).records
        pick = np.random.default_rng(0).choice(len(records), min(args.n, len(records)),
                                               replace=False)
        sets[args.data.name] = load_images([records[i] for i in pick], m.image_size,
                                           progress=False)[0]
    rows = []
    for init, generic in (("public-phantoms", False), ("public-generic", True)):
        ae = make_autoencoder(m)
        ae.load_state_dict(load_pretrained(m, generic=generic))
        for name, x in sets.items():
            p, s = reconstruction_quality(ae, x, torch.device("cpu"))
            row = {"prior": init, "images": name, "n": len(x),
                   "psnr_db": round(float(p.mean()), 2), "ssim": round(float(s.mean()), 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| images | " + " | ".join(f"{i}: PSNR dB / SSIM" for i in
                                        ("public-phantoms", "public-generic")) + " |")
    print("|---|---|---|")
    for name in sets:
        cells = [next(r for r in rows if r["prior"] == i and r["images"] == name)
                 for i in ("public-phantoms", "public-generic")]
        print(f"| {name} (n={cells[0]['n']}) | "
              + " | ".join(f"{c['psnr_db']:.2f} / {c['ssim']:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
