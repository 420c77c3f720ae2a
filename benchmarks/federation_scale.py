"""How a simulated federation scales with the number of sites: wall time and peak memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/federation_scale.py [--sites 3 10 20]

Runs `fedldm simulate --preset tiny --no-evaluate` (training only: both phases, the latent
scale release, Flower's Ray simulation) for each site count on demo data sized so every site
holds the same number of patients, and samples the summed resident memory of the whole process
tree (the CLI, Ray and its workers) every 0.5 s. Target: 20 sites complete on 2 cores, and time
and memory grow no faster than linearly in the number of sites (per-site columns flat or
falling). Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FEDLDM = Path(sys.executable).with_name("fedldm")


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and all its descendants, read from /proc (Linux)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run(sites: int, patients_per_site: int, out: Path) -> dict[str, float]:
    cmd = [str(FEDLDM), "simulate", "--preset", "tiny", "--sites", str(sites), "--image-size",
           "16", "--demo-patients", str(sites * patients_per_site), "--demo-slices", "2",
           "--no-evaluate", "--out", str(out)]
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(child.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    done.set()
    sampler.join()
    wall = time.monotonic() - t0
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{err[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"sites": sites, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
            "rounds": len(metrics["rounds"]),
            "sites_ok": min(r["sites_ok"] for r in metrics["rounds"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    ap.add_argument("--patients-per-site", type=int, default=16)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            row = run(n, args.patients_per_site, Path(tmp) / f"sites-{n}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\ntiny preset, 16 px, {args.patients_per_site} demo patients x 2 slices per site, "
          "training only")
    print("| sites | wall s | s per site | peak RSS MB (tree) | MB per site | rounds, each with "
          "all sites |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sites']} | {r['wall_s']:.0f} | {r['wall_s'] / r['sites']:.1f} | "
              f"{r['peak_rss_mb']} | {r['peak_rss_mb'] / r['sites']:.0f} | "
              f"{r['rounds']}, {'yes' if r['sites_ok'] == r['sites'] else 'no'} |")


if __name__ == "__main__":
    main()
