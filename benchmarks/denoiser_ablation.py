"""Denoiser ablation at ONE demo site: what start, learning rate and budget teach the classes?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/denoiser_ablation.py --name prior \\
        --set dm_init=public-healthy-phantoms
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/denoiser_ablation.py --name random-nodp \\
        --set dm_init=random --epsilon inf

A full simulated federation takes ~10 minutes on 2 cores; this trains only the denoiser of site 0
(the quick preset's plan: same batch, steps and noise calibration for the phase's share of the
budget) on the shipped public-phantom autoencoder's latents, in ~4 minutes on one core, so two
variants run side by side. Two judges of class information in the samples:

* class accuracy: a SmallCNN trained on the autoencoder's RECONSTRUCTIONS of the site's real
  train images (so the decoder's blur is not held against the samples) labels 150 samples per
  class; chance is 1/classes;
* TSTR-lite: a SmallCNN trained on those samples, scored (macro AUC) on the site's real test
  images.

One JSON line per run is appended to OUT (default runs/denoiser_ablation.jsonl), with the grid
of samples next to it; "shape_spread" (synthetic / real within-class spread of head size) says
whether the samples keep the data's variety. Sampling uses the preset's DDIM steps at guidance 2
and 4. The latent scale is computed without noise here (a benchmark on demo data, not a release).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from prior_ceiling import shape_spread

from cli.args import override
from client.site_config import SiteConfig
from client.tasks import plan_for
from ldm_core.classifier import macro_auc, predict_proba, train_classifier
from ldm_core.config import build_config
from ldm_core.data import load_site
from ldm_core.dp_random import PrivacyRng
from ldm_core.models import encode, make_autoencoder, make_denoiser
from ldm_core.phantoms import CLASS_NAMES, generate_demo
from ldm_core.phases import DIFFUSION
from ldm_core.pretrain import load_pretrained, load_pretrained_denoiser
from ldm_core.sampling import generate_images
from ldm_core.training import dp_train, sampling_plan
from server.samples import class_grid, save_grid_png

RECIPE = {"epochs": 12, "batch_size": 32, "lr": 2e-3}  # the utility evaluation's recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--patients", type=int, default=3200, help="demo patients (all sites)")
    ap.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("runs/denoiser_ablation.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = build_config(preset="quick", class_names=CLASS_NAMES, epsilon=args.epsilon,
                       overrides=dict(args.set))
    m, ph = cfg.model, cfg.diffusion
    data_dir = args.out.parent / f"demo-{args.patients}-{m.image_size}px"
    if not (data_dir / "manifest.csv").exists():
        generate_demo(data_dir, n_patients=args.patients, image_size=m.image_size, seed=0)
    site = load_site(data_dir, site_index=0, n_sites=3, scheme="site", image_size=m.image_size,
                     progress=False)
    ae = make_autoencoder(m)
    ae.load_state_dict(load_pretrained(m))
    z = encode(ae, site.train.images, 1.0, torch.device("cpu"))
    scale = float(1.0 / z.pow(2).mean().sqrt())
    z, y = z * scale, site.train.labels
    slots = torch.full_like(y, -1)  # no site conditioning: "any site"
    plan = sampling_plan(ph)
    steps = plan.steps * ph.rounds
    # The sigma a real site of this plan uses (every phase, fixed release and retry reserve
    # planned; a fresh site that allows audits, as in `make demo`).
    site_cfg = SiteConfig(site_id="ablation", data="-", state_dir=Path("-"),
                          epsilon=args.epsilon, delta=cfg.privacy.delta, allow_audit=True)
    sigma = 0.0 if math.isinf(args.epsilon) else plan_for(site_cfg, cfg, []).phase_sigma(
        DIFFUSION.name)
    dm = make_denoiser(m)
    if cfg.dm_init != "random":
        dm.load_state_dict(load_pretrained_denoiser(m))
    t0 = time.time()
    losses = []
    loss_fn = DIFFUSION.train_loss(cfg)
    for r in range(ph.rounds):
        st = dp_train(dm, (z, y, slots), loss_fn, phase=ph, plan=plan,
                      noise_multiplier=sigma, seed=r, device=torch.device("cpu"),
                      privacy_rng=PrivacyRng.secure(),
                      desc=f"{args.name} round {r + 1}/{ph.rounds}")
        losses.append(round(st.mean_loss, 4))
    train_s = time.time() - t0
    with torch.no_grad():
        rec = torch.cat([ae.decode(ae.encode(site.train.images[i:i + 256])[0])
                         for i in range(0, len(y), 256)]).clamp(-1, 1)
    judge = train_classifier(rec, y, m.n_classes, seed=0, device="cpu", **RECIPE)
    labels = torch.arange(m.n_classes).repeat_interleave(150)
    rec_spread = shape_spread(rec, y)
    result: dict = {"name": args.name, "overrides": dict(args.set), "epsilon": args.epsilon,
                    "n_train": len(z), "sample_rate": plan.sample_rate, "steps": steps,
                    "sigma": round(sigma, 3), "dp_losses": losses, "train_s": round(train_s)}
    for gs in (2.0, 4.0):
        imgs = generate_images(ae, dm, m, labels, scale_factor=scale, steps=cfg.dm.ddim_steps,
                               guidance_scale=gs, seed=0, device=torch.device("cpu"),
                               clip=cfg.dm.clip_latent)
        acc = float((np.asarray(predict_proba(judge, imgs)).argmax(1) == labels.numpy()).mean())
        syn = train_classifier(imgs, labels, m.n_classes, seed=0, device="cpu", **RECIPE)
        auc = macro_auc(site.test.labels.numpy(), np.asarray(predict_proba(syn, site.test.images)))
        result[f"gs{gs:g}"] = {"class_accuracy": round(acc, 3), "tstr_lite_auc": round(auc, 3),
                               "shape_spread": round(shape_spread(imgs, labels) / rec_spread, 3)}
        if gs == 2.0:
            save_grid_png(args.out.parent / f"denoiser_ablation-{args.name}.png",
                          class_grid(imgs, labels, cfg.class_names, 8), cfg.class_names,
                          args.name, m.image_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
