"""Paired image/mask generation: segmentation Dice TSTR vs TRTR at several budgets, one table.

    .venv/bin/python benchmarks/segmentation.py --epsilons 8 inf --out runs/seg \\
        [--set autoencoder.rounds=3 ...]

Each budget runs `fedldm simulate --set model.mask_channels=1` (quick preset, demo phantoms with
their lesion masks unless --data) into its own folder; the table gathers, from metrics.json,
the segmentation block (Dice of a UNet trained on real vs synthetic pairs, tested on real
patients; the mask/image alignment Dice) next to the classification ratio. Finished folders are
reused (the simulation resumes). Prints JSON lines and writes OUT/segmentation.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from privacy_utility import _ci, _fmt  # the same table cells as the privacy-utility table

HEADER = ("| requested epsilon | TRTR Dice [95% CI] | TSTR Dice [95% CI] | Dice ratio | "
          "alignment Dice | TSTR/TRTR AUC ratio | wall s |\n|---|---|---|---|---|---|---|")


def row(eps: str, metrics: dict) -> str:
    u = metrics.get("utility") or {}
    s = u.get("segmentation") or {}
    wall = (metrics.get("meta") or {}).get("wall_seconds")
    if "not_measured" in s:
        return f"| {eps} | not measured: {s['not_measured']} | | | | {_fmt(u.get('ratio'))} | |"
    return (f"| {eps} | {_ci(s, 'trtr_dice')} | {_ci(s, 'tstr_dice')} | {_fmt(s.get('ratio'))} "
            f"| {_fmt(s.get('alignment_dice'))} | {_fmt(u.get('ratio'))} | {_fmt(wall, 0)} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", nargs="+", default=["8"])
    ap.add_argument("--out", type=Path, default=Path("runs/seg"))
    ap.add_argument("--data", default="demo")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every point")
    args = ap.parse_args(argv)
    fedldm = Path(sys.executable).with_name("fedldm")
    rows = []
    for eps in args.epsilons:
        out = args.out / f"eps-{eps}"
        cmd = [str(fedldm), "simulate", "--data", args.data, "--preset", args.preset,
               "--epsilon", eps, "--out", str(out), "--set", "model.mask_channels=1"]
        for kv in args.set:
            cmd += ["--set", kv]
        if not (out / "report.html").exists():
            print("running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        metrics = json.loads((out / "metrics.json").read_text())
        seg = (metrics.get("utility") or {}).get("segmentation") or {}
        print(json.dumps({"epsilon": eps, **{k: v for k, v in seg.items() if k != "per_seed"}}))
        rows.append(row(eps, metrics))
    table = "\n".join([HEADER, *rows])
    command = " ".join(["benchmarks/segmentation.py", *(argv if argv is not None
                                                         else sys.argv[1:])])
    (args.out / "segmentation.md").write_text(f"Command: `{command}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
