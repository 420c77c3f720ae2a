"""Sampling knobs against utility and diversity, on a finished simulated run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_sweep.py RUN \
        [--guidance 1,2,3,4,6,1+4] [--eta 0] [--steps 40] [--multiplier 1] [--epochs 12] \
        [--average-last 1,3,5]

Everything here is sampling, post-processing of the released model, so free in privacy; the
real images are the simulated sites' own splits. Per (guidance scale, DDIM eta, DDIM steps):
a class-balanced synthetic set from the same seed, TSTR AUC (one seed, the TRTR classifier
shared by every row), within-class SSIM of the synthetic set against the real one (lower = more
diverse) and precision/recall in the TRTR classifier's feature space. Classifier-free guidance
trades diversity for typicality; eta > 0 adds fresh noise at every DDIM step (1 = ancestral,
DDPM-like sampling), which often gives sharper, more varied samples than the deterministic
sampler. ``--multiplier 1,5`` also trains the TSTR classifier on 5x as many synthetic images as
the real training set holds (per class, same epochs, so 5x the steps): the report's TSTR is the
matched-size one (1x); the larger set says how much a user gains by drawing more.
``--average-last 1,3,5`` samples from the mean of the last k rounds' global denoisers (read from
the run's round checkpoints; 1 = the last round's model), what `diffusion.average_last` makes
the coordinator release: post-processing of models the sites already received, so also free.
``--relabel-with clf.pt --relabel-mode none,relabel,filter`` labels (relabel) or filters
(filter: ``--oversample`` times the images, the most typical per class kept) the synthetic set
with a DP classifier saved by ``dp_classifier_reference.py --save``: what a DP labeller would
buy (docs/benchmarks.md section 13). Relabelled sets need not be class-balanced, so use them
with ``--multiplier 1``.
Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from ldm_core.checkpoint import load_checkpoint
from ldm_core.classifier import macro_auc, make_classifier, predict_proba, train_classifier
from ldm_core.evaluation import (
    evaluate_utility,
    feature_spaces,
    fidelity_report,
    train_reference_classifier,
)
from ldm_core.evaluation.utility import CLASSIFIER_RECIPE, judge_epochs
from ldm_core.models import resolve_device
from server.aggregate import mean_state
from server.evaluate import generate_synthetic
from server.offline import simulated_sites
from server.real_data import subsample
from server.run_folder import Run


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _guidances(text: str) -> list[tuple[float, ...]]:
    """"1,4,1+4": one scale per row, or a mixture ("1+4": equal parts drawn at each scale)."""
    return [tuple(float(v) for v in item.split("+")) for item in text.split(",")]


def _draw(cfg, ae, dm, scale, per_class: int, *, guidance: tuple[float, ...],  # noqa: ANN001
          **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced set; a mixture of scales draws its parts from different seeds (the
    same seed would repeat each layout once per scale) and keeps the labels aligned."""
    xs, ys = [], []
    for i, g in enumerate(guidance):
        n = per_class // len(guidance) + (i < per_class % len(guidance))
        x, y, _ = generate_synthetic(cfg, ae, dm, scale, n, seed=cfg.seed + 7919 * i,
                                     guidance=g, **kw)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _pick(syn_y: torch.Tensor, real_y: torch.Tensor, n_classes: int, mult: int,
          rng: np.random.Generator) -> torch.Tensor:
    """`mult` times the real training split's per-class counts, without replacement."""
    idx = []
    for c in range(n_classes):
        need = mult * int((real_y == c).sum())
        pool = np.flatnonzero(syn_y.numpy() == c)
        if pool.size < need:
            raise SystemExit(f"class {c}: {pool.size} synthetic images, {need} needed")
        idx.append(rng.choice(pool, size=need, replace=False))
    return torch.as_tensor(rng.permutation(np.concatenate(idx)))


def _tail_mean(checkpoints: Path, rounds: int, k: int) -> dict[str, torch.Tensor]:
    """The mean of the last `k` diffusion rounds' global denoisers."""
    if not 1 <= k <= rounds:
        raise SystemExit(f"--average-last {k}: the run has {rounds} diffusion rounds")
    return mean_state(load_checkpoint(checkpoints / f"dm-round-{r:03d}")[0]["denoiser"]
                      for r in range(rounds - k + 1, rounds + 1))


def _relabel(labeller: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
             per_class: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-process a synthetic set with a DP classifier (itself a DP release)."""
    proba = torch.as_tensor(np.asarray(predict_proba(labeller, x)))
    if mode == "relabel":
        return x, proba.argmax(1)
    if mode != "filter":
        raise SystemExit(f"--relabel-mode {mode}: expected relabel or filter")
    keep = []
    for c in range(n_classes):
        pool = torch.nonzero(y == c).flatten()
        order = torch.argsort(proba[pool, c], descending=True)
        keep.append(pool[order[:per_class]])
    idx = torch.cat(keep)
    return x[idx], y[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--guidance", default="1,2,3,4,6",
                    help="scales, one per row; 1+4 draws equal parts at each (a mixture)")
    ap.add_argument("--eta", default="0", help="DDIM eta values, e.g. 0,0.5,1")
    ap.add_argument("--steps", default="", help="DDIM step counts (default: the run's)")
    ap.add_argument("--multiplier", default="1",
                    help="synthetic training-set sizes for TSTR, in multiples of the real one")
    ap.add_argument("--epochs", type=int,
                    help="default: the utility judge's (12 for images, 90 for volumes)")
    ap.add_argument("--average-last", default="",
                    help="release the mean of the last k rounds' denoisers, e.g. 1,3,5 "
                         "(default: the run's final model as released)")
    ap.add_argument("--relabel-with", type=Path, default=None,
                    help="a DP classifier saved by dp_classifier_reference.py --save: label or"
                         " filter the synthetic images with it (see --relabel-mode)")
    ap.add_argument("--relabel-mode", default=None,
                    help="comma list of: none (the labels as drawn), relabel (its argmax becomes"
                         " the label), filter (draw --oversample x the images and keep, per"
                         " class, those it finds most typical of the class they were drawn for);"
                         " default with --relabel-with: relabel")
    ap.add_argument("--oversample", type=int, default=3)
    args = ap.parse_args()
    labeller = None
    modes = ["none"]
    if args.relabel_with is None and args.relabel_mode is not None:
        raise SystemExit("--relabel-mode needs --relabel-with (a saved DP classifier)")
    if args.relabel_with is not None:
        modes = (args.relabel_mode or "relabel").split(",")
        if bad := set(modes) - {"none", "relabel", "filter"}:
            raise SystemExit(f"--relabel-mode {','.join(sorted(bad))}: expected none, relabel"
                             " or filter")
        saved = torch.load(args.relabel_with, weights_only=True)
        labeller = make_classifier(saved["n_classes"], saved["spatial_dims"])
        labeller.load_state_dict(saved["state"])
        labeller.eval()
    run = Run(args.run)
    final = run.load_final()
    cfg = final.cfg
    args.epochs = judge_epochs(cfg.model.spatial_dims, args.epochs)
    averages = [int(v) for v in args.average_last.split(",")] if args.average_last else [0]
    sites = simulated_sites(run)
    if sites is None:
        raise SystemExit(f"{args.run}: not a simulated run (its real data is not on this machine)")
    real = subsample(sites.load(cfg), 1000, seed=cfg.seed)
    n_classes = cfg.model.n_classes
    mults = [int(v) for v in args.multiplier.split(",")]
    per_class = max(mults) * int(torch.bincount(real.train[1], minlength=n_classes).max())
    device = resolve_device(cfg.device)
    ref = train_reference_classifier(real.train, n_classes=n_classes, seed=0,
                                     epochs=args.epochs, device=device)
    test_y = real.test[1].numpy().astype(np.int64)
    rows = []
    steps_list = [int(v) for v in args.steps.split(",")] if args.steps else [cfg.dm.ddim_steps]
    for k, steps, eta, g, mode in itertools.product(averages, steps_list, _floats(args.eta),
                                                    _guidances(args.guidance), modes):
        if k:
            final.dm.load_state_dict(_tail_mean(run.root / "checkpoints",
                                                cfg.diffusion.rounds, k))
        t0 = time.monotonic()
        draw = per_class * (args.oversample if mode == "filter" else 1)
        x, y = _draw(cfg, final.ae, final.dm, final.scale_factor, draw, guidance=g,
                     device=device, steps=steps, eta=eta)
        sample_s = time.monotonic() - t0
        if labeller is not None and mode != "none":
            x, y = _relabel(labeller, x, y, mode, per_class, n_classes)
        u = evaluate_utility(real.train, (x, y), real.test, n_classes=n_classes,
                             seeds=(0,), epochs=args.epochs, device=device,
                             reference_model=ref)
        f = fidelity_report(real.train[0], real.train[1], x, y,
                            extractors=feature_spaces(seed=0, classifier=ref,
                                                  spatial_dims=cfg.model.spatial_dims),
                            seed=cfg.seed)
        div = f["diversity"]
        row = {"average_last": k or "final", "guidance": "+".join(f"{v:g}" for v in g),
               "eta": eta, "labels": mode,
               "steps": steps, "tstr_auc": u["tstr_auc"],
               "tstr_auc_ci": u["tstr_auc_ci"], "trtr_auc": u["trtr_auc"],
               "ratio": u["ratio"], "tstr_acc": u["tstr_acc"],
               "ssim_synthetic": float(np.mean(list(div["synthetic"].values()))),
               "ssim_real": float(np.mean(list(div["real"].values()))),
               "precision": f["classifier"]["precision"],
               "recall": f["classifier"]["recall"], "sample_s": round(sample_s, 1),
               "n_generated": int(x.shape[0]), "run": str(args.run), "larger": {}}
        for m in (m for m in mults if m != 1):
            pick = _pick(y, real.train[1], n_classes, m, np.random.default_rng(0))
            model = train_classifier(x[pick], y[pick], n_classes, epochs=args.epochs,
                                     seed=0, device=device, **CLASSIFIER_RECIPE)
            proba = np.asarray(predict_proba(model, real.test[0]), dtype=np.float64)
            auc = macro_auc(test_y, proba)
            row["larger"][str(m)] = {
                "tstr_auc": auc, "ratio": auc / u["trtr_auc"],
                "tstr_acc": float((proba.argmax(1) == test_y).mean())}
        row["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{args.run}: TSTR one seed, {args.epochs} epochs, matched size unless noted")
    extra = [m for m in mults if m != 1]
    head = "".join(f" TSTR/TRTR with {m}x synthetic |" for m in extra)
    print("| released | labels | guidance | eta | steps | TSTR AUC [95% CI] |"
          " TSTR/TRTR | TSTR acc |" +
          head + " within-class SSIM syn (real) | precision / recall (classifier space) |")
    print("|---" * (10 + len(extra)) + "|")
    for r in rows:
        more = "".join(f" {r['larger'][str(m)]['ratio']:.3f} |" for m in extra)
        k = r["average_last"]
        released = "final" if k == "final" else f"mean of last {k}"
        print(f"| {released} | {r['labels']} | {r['guidance']} | "
              f"{r['eta']:g} | {r['steps']} | "
              f"{r['tstr_auc']:.3f} "
              f"[{r['tstr_auc_ci'][0]:.3f}, {r['tstr_auc_ci'][1]:.3f}] | {r['ratio']:.3f} | "
              f"{r['tstr_acc']:.3f} |{more} {r['ssim_synthetic']:.2f} ({r['ssim_real']:.2f}) | "
              f"{r['precision']:.2f} / {r['recall']:.2f} |")


if __name__ == "__main__":
    main()
