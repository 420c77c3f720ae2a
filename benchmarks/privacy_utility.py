"""Privacy-utility benchmark: the same simulated federation at several budgets, one table.

    .venv/bin/python benchmarks/privacy_utility.py --epsilons inf 8 --out runs/bench

Each budget runs `fedldm simulate` (quick preset, demo data unless --data) into its own folder,
then the table gathers TSTR/TRTR (with CIs), fidelity and the privacy audits from metrics.json.
Existing finished run folders are reused (the simulation resumes), so the table can be rebuilt
cheaply. A budget too small for the preset's fixed releases (the latent scale, one training-curve
value a round, the audit: epsilon 1.2 of the quick preset) gets the cheaper releases that
`fedldm simulate` itself names as the fix (server.plan_check.CHEAPER_RELEASES), and the table says
so in its "fixed releases" column. Writes OUT/privacy_utility.md (printed, with the commit and
date each point was trained on) and OUT/privacy_utility.png (ratio, precision, recall and MIA
AUC against epsilon).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

from matplotlib.figure import Figure

from common.provenance import code_commit
from server.report_figures import new_figure, png_bytes


def _fmt(x: object, nd: int = 3) -> str:
    if isinstance(x, (int, float)):
        return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{nd}f}"
    return "-" if x is None else str(x)


def _ci(u: dict, key: str) -> str:
    ci = u.get(f"{key}_ci")
    return f"{_fmt(u.get(key))} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(u.get(key))


def row(eps: str, metrics: dict, releases: str = "default", trained: str = "unknown") -> str:
    u, f, p = metrics.get("utility", {}), metrics.get("fidelity", {}), metrics.get("privacy", {})
    spent = max((s.get("epsilon", 0) for s in p.get("sites", {}).values()), default=None)
    spent = float(spent) if spent not in (None, "inf") else math.inf
    wall = metrics.get("meta", {}).get("wall_seconds")
    return (f"| {eps} | {_fmt(spent, 2)} | {_ci(u, 'trtr_auc')} | {_ci(u, 'tstr_auc')} | "
            f"{_fmt(u.get('ratio'))} | {_ci(u, 'trs_auc')} | {_fmt(f.get('precision'))} | "
            f"{_fmt(f.get('recall'))} | {_mia(p)} | "
            f"{_fmt(p.get('mia_tpr_at_1pct_fpr'))} | {_fmt(p.get('memorized_fraction'))} | "
            f"{_fmt(wall, 0)} | {releases} | {trained} |")


HEADER = ("| requested epsilon | max site epsilon | TRTR AUC [95% CI] | TSTR AUC [95% CI] | "
          "TSTR/TRTR | TRS AUC | precision (random CNN) | recall (random CNN) | "
          "MIA AUC (+- noise std) | MIA TPR@1%FPR | memorised | wall s | fixed releases | "
          "trained on (commit, date) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _mia(p: dict) -> str:
    """The best attack's released AUC with the release's noise std: at small budgets the audit
    release is noisy enough (std 0.38 at epsilon 1) that 1.0 is noise, not leakage."""
    std = p.get("mia_noise_std")
    return _fmt(p.get("mia_auc")) + (f" (+-{std:.2f})" if isinstance(std, (int, float)) else "")


def _num(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def frontier_figure(points: list[tuple[str, dict]]) -> Figure:
    """TSTR/TRTR ratio, precision, recall (the verdict's feature space) and MIA AUC (with its
    release's noise std) against the requested epsilon; epsilon = inf sits at the right end."""
    from server.report_verdicts import fidelity_space

    finite = sorted(float(e) for e, _ in points if e != "inf")
    inf_x = (finite[-1] * 2) if finite else 1.0
    xs, series = [], {"TSTR/TRTR": [], "precision": [], "recall": [], "MIA AUC": []}
    mia_std: list[float] = []
    for eps, m in sorted(points, key=lambda p: inf_x if p[0] == "inf" else float(p[0])):
        xs.append(inf_x if eps == "inf" else float(eps))
        f = m.get("fidelity") or {}
        space = f.get(fidelity_space(f) or "", {}) if f else {}
        series["TSTR/TRTR"].append(_num((m.get("utility") or {}).get("ratio")))
        series["precision"].append(_num(space.get("precision")))
        series["recall"].append(_num(space.get("recall")))
        series["MIA AUC"].append(_num((m.get("privacy") or {}).get("mia_auc")))
        mia_std.append(_num((m.get("privacy") or {}).get("mia_noise_std")))
    fig = new_figure(6.0, 3.6)
    ax = fig.subplots()
    for name, ys in series.items():
        if name == "MIA AUC":  # a noisy DP release: its noise std as the error bar
            ax.errorbar(xs, ys, yerr=[0.0 if math.isnan(e) else e for e in mia_std], fmt="o-",
                        capsize=3, label="MIA AUC (+- release noise std)")
        else:
            ax.plot(xs, ys, "o-", label=name)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(["inf" if x == inf_x and "inf" in [e for e, _ in points] else f"{x:g}"
                        for x in xs])
    ax.set_xlabel("requested epsilon per site")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("privacy-utility frontier", fontsize=9)
    return fig


def release_overrides(simulate_args: list[str]) -> list[str]:
    """`--set` flags for the fixed releases: none when a fresh site's budget holds the plan as
    configured, else plan_check's cheaper releases (checked again: still too small is an error,
    the same one `fedldm simulate` gives)."""
    from cli.local import simulation_options
    from cli.main import build_parser
    from server.federation import FederationError
    from server.plan_check import CHEAPER_RELEASES
    from server.simulate import check_simulation_plan

    parser = build_parser()
    try:
        check_simulation_plan(simulation_options(parser.parse_args(["simulate", *simulate_args])))
        return []
    except FederationError:
        flags = [x for k, v in CHEAPER_RELEASES.items() for x in ("--set", f"{k}={v}")]
        check_simulation_plan(simulation_options(parser.parse_args(
            ["simulate", *simulate_args, *flags])))
        return flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epsilons", nargs="+", default=["inf", "8"])
    ap.add_argument("--data", default="demo")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--partition", default="auto")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="passed to fedldm simulate")
    args = ap.parse_args(argv)
    fedldm = Path(sys.executable).with_name("fedldm")
    # of the code that trains, not of a later edit
    commit, day = code_commit() or "unknown", date.today()
    rows, points = [], []
    for eps in args.epsilons:
        out = args.out / f"eps-{eps}"
        sim = ["--data", args.data, "--preset", args.preset, "--sites", str(args.sites),
               "--partition", args.partition, "--epsilon", eps, "--out", str(out), *args.extra]
        flags = release_overrides(sim)
        stamp = out / "benchmark-commit.txt"  # which code trained this point
        if not (out / "report.html").exists():
            cmd = [str(fedldm), "simulate", *sim, *flags]
            print("+", " ".join(cmd), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            stamp.write_text(f"{commit} {day}\n")
            subprocess.run(cmd, check=True)
        metrics = json.loads((out / "metrics.json").read_text())
        trained = stamp.read_text().strip() if stamp.exists() else "unknown"
        rows.append(row(eps, metrics, " ".join(flags[1::2]) or "default", trained))
        points.append((eps, metrics))
    table = "\n".join([HEADER, *rows])
    (args.out / "privacy_utility.png").write_bytes(png_bytes(frontier_figure(points)))
    cmd = "python benchmarks/privacy_utility.py " + " ".join(
        ["--epsilons", *args.epsilons, "--data", args.data, "--preset", args.preset,
         "--sites", str(args.sites), "--partition", args.partition, "--out", str(args.out),
         *args.extra])
    text = f"{table}\n\nProduced by `{cmd}` (table written on commit {commit}, {day}).\n"
    (args.out / "privacy_utility.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
