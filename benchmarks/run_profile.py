"""Where a run's time went, from its run folder (no re-run needed).

    .venv/bin/python benchmarks/run_profile.py runs/demo

Reads RUN/metrics.json: each training round's wall time (`rounds[].seconds`, summed per phase:
the slowest site's local DP training plus the federation's messaging and aggregation), the
evaluation's named steps (`evaluation_steps_seconds`: loading the real data, generating the
synthetic set, the utility arms, fidelity, the privacy audit) and, for `fedldm simulate`, the
command's whole wall time (`meta.wall_seconds`); what is left is start-up (Ray, data), the latent
scale release, checkpoints and the report. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def profile(run: Path) -> list[tuple[str, float]]:
    path = run / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a run folder (e.g. runs/demo)")
    m = json.loads(path.read_text())
    rows: list[tuple[str, float]] = []
    for phase in dict.fromkeys(r["phase"] for r in m.get("rounds", [])):
        secs = [float(r.get("seconds", 0.0)) for r in m["rounds"] if r["phase"] == phase]
        rows.append((f"training: {phase} ({len(secs)} rounds)", sum(secs)))
    for step, secs in (m.get("evaluation_steps_seconds") or {}).items():
        rows.append((f"evaluation: {step}", float(secs)))
    wall = (m.get("meta") or {}).get("wall_seconds")
    if wall is not None:
        rows.append(("everything else (start-up, latent scale, checkpoints, report)",
                     max(0.0, float(wall) - sum(s for _, s in rows))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    rows = profile(args.run)
    total = sum(s for _, s in rows) or 1.0
    print(f"| part of {args.run} | seconds | share |\n|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.0f} | {secs / total:.0%} |")
    print(f"| total | {total:.0f} | |")
    json.dump({name: round(secs, 1) for name, secs in rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
