"""Guidance scale against utility and diversity, on a finished simulated run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_sweep.py RUN \
        [--guidance 1,2,3,4,6] [--per-class 300] [--epochs 12]

Classifier-free guidance trades diversity for class fidelity: a higher scale makes each class's
samples more typical and more alike. The run's default scale decides both the utility verdict and
the diversity verdict of the report, so this measures the trade-off on the run's own final model:
per scale, the same noise seeds, a class-balanced synthetic set, TSTR AUC (one seed, the TRTR
classifier shared by all scales), within-class SSIM of the synthetic set against the real one
(lower = more diverse) and precision/recall in the TRTR classifier's feature space. No privacy
cost: sampling is post-processing, and the real images are the simulated sites' own splits.
Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ldm_core.evaluation import (
    evaluate_utility,
    feature_spaces,
    fidelity_report,
    train_reference_classifier,
)
from ldm_core.models import resolve_device
from server.evaluate import generate_synthetic
from server.offline import simulated_sites
from server.real_data import subsample
from server.run_folder import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--guidance", default="1,2,3,4,6")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    run = Run(args.run)
    final = run.load_final()
    cfg = final.cfg
    sites = simulated_sites(run)
    if sites is None:
        raise SystemExit(f"{args.run}: not a simulated run (its real data is not on this machine)")
    real = subsample(sites.load(cfg), 1000, seed=cfg.seed)
    device = resolve_device(cfg.device)
    ref = train_reference_classifier(real.train, n_classes=cfg.model.n_classes, seed=0,
                                     epochs=args.epochs, device=device)
    rows = []
    for g in (float(v) for v in args.guidance.split(",")):
        t0 = time.monotonic()
        x, y, _ = generate_synthetic(cfg, final.ae, final.dm, final.scale_factor, args.per_class,
                                  seed=cfg.seed, device=device, steps=cfg.dm.ddim_steps,
                                  guidance=g)
        u = evaluate_utility(real.train, (x, y), real.test, n_classes=cfg.model.n_classes,
                             seeds=(0,), epochs=args.epochs, device=device, reference_model=ref)
        f = fidelity_report(real.train[0], real.train[1], x, y,
                            extractors=feature_spaces(seed=0, classifier=ref), seed=cfg.seed)
        div = f["diversity"]
        row = {"guidance": g, "tstr_auc": u["tstr_auc"], "tstr_auc_ci": u["tstr_auc_ci"],
               "trtr_auc": u["trtr_auc"], "ratio": u["ratio"], "tstr_acc": u["tstr_acc"],
               "ssim_synthetic": float(np.mean(list(div["synthetic"].values()))),
               "ssim_real": float(np.mean(list(div["real"].values()))),
               "precision": f["classifier"]["precision"], "recall": f["classifier"]["recall"],
               "seconds": round(time.monotonic() - t0, 1), "run": str(args.run),
               "per_class": args.per_class}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.run}: {args.per_class} images per class, TSTR one seed, {args.epochs} epochs")
    print("| guidance | TSTR AUC [95% CI] | TSTR/TRTR | TSTR acc | within-class SSIM syn "
          "(real) | precision / recall (classifier space) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['tstr_auc']:.3f} [{r['tstr_auc_ci'][0]:.3f}, "
              f"{r['tstr_auc_ci'][1]:.3f}] | {r['ratio']:.3f} | {r['tstr_acc']:.3f} | "
              f"{r['ssim_synthetic']:.2f} ({r['ssim_real']:.2f}) | "
              f"{r['precision']:.2f} / {r['recall']:.2f} |")


if __name__ == "__main__":
    main()
