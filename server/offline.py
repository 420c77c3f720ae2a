"""`fedldm evaluate RUN`: evaluation of an existing run folder without a live federation.

For a simulated run the sites are rebuilt from run.json and audited by calling the very function
their ClientApp `query` handler calls (client.audit.site_audit): each audit is a DP release
charged to that site's ledger under run id "evaluate-<run folder name>", with secure privacy
randomness. For a deployed run only a `--reference` set at the coordinator can be used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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

    run_id = audit_run_id(run)

    def direct_audit() -> list[dict[str, Any]]:
        from client.audit import site_audit
        from ldm_core.dp_random import privacy_rng_for

        cfg, ae, dm, scale = load_final(run)
        out = []
        for k in range(n):
            site = sites.site(k)
            release = site_audit(site, cfg, ae, dm, scale, run_id=run_id,
                                 rng=privacy_rng_for(None), seed=cfg.seed)
            out.append({"site": site.site_id, **release})
        return out

    return evaluate_run(run, sites=sites, n_sites=n, audit=direct_audit if audit else None,
                        options=options, audit_run_id=run_id)


def audit_run_id(run: Path) -> str:
    """Ledger run id (and diagnostics file name) of `fedldm evaluate RUN`'s audit."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(run).resolve().name).strip("-.") or "run"
    return f"evaluate-{name}"[:200]
