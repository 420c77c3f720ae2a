"""`fedldm evaluate RUN`: evaluation of an existing run folder without a live federation.

For a simulated run the sites are rebuilt from run.json and audited by calling the very function
their ClientApp `query` handler calls (client.audit.site_audit); for a deployed run only a
`--reference` set at the coordinator can be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from client.client_app import SimulationSites
from server.evaluate import EvalOptions, evaluate_run
from server.federation import load_final
from server.finalize import write_samples


def simulated_sites(run: Path) -> tuple[SimulationSites, int] | None:
    info_path = run / "run.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("mode") != "simulation":
        return None
    priv = info["config"]["privacy"]
    eps = float("inf") if priv["epsilon"] == "inf" else float(priv["epsilon"])
    sites = SimulationSites(data=info["data"], n_sites=int(info["sites"]),
                            partition=info["partition"], state_root=run / "sites", epsilon=eps,
                            delta=float(priv["delta"]), data_seed=int(info["config"]["seed"]),
                            device=info["config"]["device"])
    return sites, int(info["sites"])


def evaluate_existing_run(run: Path, *, options: EvalOptions, audit: bool = True
                          ) -> dict[str, Any]:
    if not (run / "checkpoints" / "final").exists():
        raise FileNotFoundError(f"{run} has no checkpoints/final: the run did not finish "
                                "training (rerun `fedldm simulate` with the same --out to resume)")
    found = simulated_sites(run)
    write_samples(run)
    if found is None:
        return evaluate_run(run, options=options)
    sites, n = found

    def direct_audit(synthetic: torch.Tensor) -> list[dict[str, Any]]:
        from client.audit import site_audit

        cfg, ae, dm, scale = load_final(run)
        return [site_audit(sites.site(k), cfg, ae, dm, scale, synthetic, seed=cfg.seed)
                for k in range(n)]

    return evaluate_run(run, sites=sites, n_sites=n, audit=direct_audit if audit else None,
                        options=options)
