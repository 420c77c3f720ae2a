"""Utility measured at the sites (a deployment's way) against the coordinator's exact numbers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/site_eval_noise.py RUN [--out DIR] \
        [--per-class 300] [--epochs 12]

RUN is a finished, evaluated simulated run: its metrics.json holds the utility computed at the
coordinator with the sites' real images (TSTR seed ensemble, non-private TRTR, patient
bootstrap). The run folder is copied to OUT (the copy's simulated ledgers are the ones charged)
and evaluated again with `at_sites=True`: the coordinator trains one TSTR classifier on the
synthetic set, each site trains its TRTR classifier with DP-SGD and releases one noisy count
vector (client.site_eval), and the pooled metrics carry intervals of the DP noise only. The
table shows what a deployment would report next to what the simulation knows, so the price of
measuring at the sites (noise, a DP-trained TRTR, one TSTR seed) is visible. Prints JSON lines
and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from server.evaluate import EvalOptions
from server.offline import evaluate_existing_run


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)


def _ci(u: dict, key: str) -> str:
    ci = u.get(f"{key}_ci")
    return f"{_fmt(u.get(key))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(u.get(key))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="copy of RUN (default RUN-at-sites)")
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--epochs", type=int,
                    help="default: the utility judge's (12 for images, 90 for volumes)")
    args = ap.parse_args()
    exact = json.loads((args.run / "metrics.json").read_text())
    if "utility" not in exact or exact["utility"].get("measured_at") == "sites":
        raise SystemExit(f"{args.run}/metrics.json has no coordinator-side utility: evaluate "
                         "the run first (fedldm evaluate RUN)")
    out = args.out or args.run.with_name(args.run.name + "-at-sites")
    if out.exists():
        raise SystemExit(f"{out} exists: pass another --out")
    shutil.copytree(args.run, out, ignore=shutil.ignore_patterns("synthetic", "report.html"))
    t0 = time.monotonic()
    sites = evaluate_existing_run(out, audit=False, show_progress=True, options=EvalOptions(
        per_class=args.per_class, utility_seeds=(0,), utility_epochs=args.epochs,
        at_sites=True))
    wall = time.monotonic() - t0
    e, s = exact["utility"], sites.get("utility", {})
    rows = []
    for key, label in (("tstr_auc", "TSTR AUC"), ("trtr_auc", "TRTR AUC"), ("ratio", "ratio"),
                       ("tstr_acc", "TSTR accuracy"), ("trtr_acc", "TRTR accuracy")):
        row = {"metric": label, "coordinator": e.get(key), "coordinator_ci": e.get(f"{key}_ci"),
               "sites": s.get(key), "sites_noise_ci": s.get(f"{key}_ci")}
        print(json.dumps(row), flush=True)
        rows.append(f"| {label} | {_ci(e, key)} | {_ci(s, key)} |")
    rec_e = (exact.get("fidelity") or {}).get("random_cnn", {}).get("recall")
    rec_s = (sites.get("fidelity") or {}).get("sites", {})
    rows.append(f"| recall (random-CNN space) | {_fmt(rec_e)} | {_ci(rec_s, 'recall')} |")
    print(f"\nat-sites evaluation: {wall:.0f} s; pooled noise std per count "
          f"{_fmt(s.get('noise_std'))}; test patients (noisy) {s.get('n_test_patients')}; "
          f"sites {s.get('sites')} missing {s.get('sites_missing')}\n")
    print("| metric | coordinator (exact, 95% CI over patients) | at the sites (DP, 95% CI of "
          "the noise) |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
