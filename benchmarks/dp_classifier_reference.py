"""What a classifier trained directly under DP at the same budget reaches: the yardstick for TSTR.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dp_classifier_reference.py RUN \\
        [--epsilon 8] [--rounds 5] [--steps 64] [--sample-rate 0.125] [--lr 2e-3]

A DP generator's synthetic set carries no more about the labels than its DP training let through,
so a classifier trained federatedly with DP-SGD on the same sites, at the same per-site budget,
is the natural reference for how far TSTR can go at that epsilon: if it cannot reach a target
AUC itself, a classifier trained on DP synthetic data is unlikely to (the generator must learn
the images too, with the same noise per step). Reads a simulated run's data and split
(run.json), then:

* trains the evaluation's judge (`make_classifier`) as a federation would: each round every site
  runs DP-SGD (fedldm's `dp_train`: Opacus, Poisson sampling, per-patient clipping, secure noise)
  from the global weights, and the coordinator takes the plain mean of the sites' weights; the
  noise is calibrated so that each site's whole plan spends `--epsilon` (RDP, delta 1e-5), the
  generator's run reserves part of its budget for fixed releases, this reference does not;
* scores macro AUC on the union of the sites' real test images, next to the non-private judge
  of the evaluation's recipe (TRTR) and, when RUN was evaluated, the run's own TSTR.

A benchmark on simulated sites, not a release: nothing is charged to any ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from client.site_config import SiteConfig
from client.tasks import load_data, patient_groups
from ldm_core.classifier import macro_auc, make_classifier, predict_proba, train_classifier
from ldm_core.config import PhaseConfig, RunConfig
from ldm_core.dp_random import PrivacyRng
from ldm_core.evaluation.utility import CLASSIFIER_RECIPE, judge_epochs
from ldm_core.privacy import calibrate_noise
from ldm_core.training import SamplingPlan, dp_train


def per_sample_ce(model: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                  gen: torch.Generator) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y.long(), reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64, help="DP steps a site runs per round")
    ap.add_argument("--sample-rate", type=float, default=1 / 8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, default=None,
                    help="write the final DP classifier's weights here (for sampling_sweep.py"
                         " --relabel-with)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.loads((args.run / "run.json").read_text())
    cfg = RunConfig.from_dict(meta["config"])
    n_sites = int(meta["sites"])
    sites = [SiteConfig(site_id=f"site-{k}", data=meta["data"], state_dir=Path("-"),
                        site_index=k, n_sites=n_sites, partition=meta["partition"],
                        data_seed=cfg.seed, show_progress=False, epsilon=args.epsilon,
                        delta=1e-5) for k in range(n_sites)]
    data = [load_data(s, cfg) for s in sites]
    x_te = torch.cat([d.test.images for d in data])
    y_te = torch.cat([d.test.labels for d in data])
    n_classes, dims = cfg.model.n_classes, cfg.model.spatial_dims

    steps = args.rounds * args.steps
    sigma = (0.0 if math.isinf(args.epsilon) else
             calibrate_noise([(args.sample_rate, steps)], target_epsilon=args.epsilon,
                             delta=1e-5, shares=[1.0])[0])
    phase = PhaseConfig(rounds=args.rounds, sample_rate=args.sample_rate,
                        local_steps=args.steps, lr=args.lr, max_grad_norm=args.clip,
                        batch_size=max(1, round(args.sample_rate * np.mean(
                            [len(d.train.labels) for d in data]))))
    torch.manual_seed(args.seed)
    glob = make_classifier(n_classes, dims)
    t0 = time.time()
    for r in range(args.rounds):
        states = []
        for k, (s, d) in enumerate(zip(sites, data, strict=True)):
            local = make_classifier(n_classes, dims)
            local.load_state_dict(glob.state_dict())
            dp_train(local, (d.train.images, d.train.labels), per_sample_ce, phase=phase,
                     plan=SamplingPlan(args.sample_rate, args.steps), noise_multiplier=sigma,
                     seed=args.seed * 1000 + r * 10 + k, device=torch.device("cpu"),
                     privacy_rng=PrivacyRng.secure(), groups=patient_groups(d, d.train),
                     desc=f"{s.site_id} round {r + 1}", show_progress=False)
            states.append(local.state_dict())
        glob.load_state_dict({n: torch.stack([st[n].float() for st in states]).mean(0)
                              .to(states[0][n].dtype) for n in states[0]})
        auc = macro_auc(y_te.numpy(), np.asarray(predict_proba(glob.eval(), x_te)))
        print(json.dumps({"round": r + 1, "dp_auc": round(auc, 3),
                          "s": round(time.time() - t0)}), flush=True)
    if args.save is not None:
        torch.save({"state": glob.state_dict(), "n_classes": n_classes, "spatial_dims": dims,
                    "epsilon": args.epsilon, "sigma": sigma}, args.save)
    x_tr = torch.cat([d.train.images for d in data])
    y_tr = torch.cat([d.train.labels for d in data])
    judge = train_classifier(x_tr, y_tr, n_classes, epochs=judge_epochs(dims), seed=args.seed,
                             **CLASSIFIER_RECIPE)
    trtr = macro_auc(y_te.numpy(), np.asarray(predict_proba(judge, x_te)))
    metrics = args.run / "metrics.json"
    util = json.loads(metrics.read_text()).get("utility", {}) if metrics.exists() else {}
    print(json.dumps({"run": str(args.run), "epsilon": args.epsilon, "sigma": round(sigma, 3),
                      "plan": f"{args.rounds} rounds x {args.steps} steps, q {args.sample_rate:g},"
                              f" lr {args.lr:g}, clip {args.clip:g}",
                      "dp_classifier_auc": round(auc, 3), "trtr_judge_auc": round(trtr, 3),
                      "dp_over_trtr": round(auc / trtr, 3),
                      "run_tstr_auc": util.get("tstr_auc"), "run_ratio": util.get("ratio")}))


if __name__ == "__main__":
    main()
