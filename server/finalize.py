"""What the coordinator does once training is over: samples, then (optionally) evaluation.

The final model is loaded here once and handed to both, so the weights are read from disk once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.client_app import SimulationSites
from ldm_core.models import resolve_device
from server.real_data import SimulatedSites
from server.run_folder import FinalModel, Run
from server.samples import write_samples_png


def finalize_run(out: Path | Run, *, sites: SimulationSites | None = None, n_sites: int = 0,
                 evaluate: bool = False, audit: Any = None, options: Any = None,
                 show_progress: bool = True, site_eval: Any = None) -> None:
    """Write samples.png from the final checkpoint; run the evaluation when asked.

    `sites`/`n_sites`: a simulation's sites (their data is the evaluation's real source).
    """
    run = out if isinstance(out, Run) else Run(out)
    final = run.load_final()
    write_samples(run, final)
    if evaluate:
        from server.evaluate import evaluate_run

        evaluate_run(run, final=final,
                     sites=SimulatedSites(sites, n_sites) if sites is not None else None,
                     audit=audit, options=options, show_progress=show_progress,
                     site_eval=site_eval)


def write_samples(run: Run, final: FinalModel) -> None:
    """samples.png: a class-conditional grid, titled with the run's privacy level."""
    cfg = final.cfg
    device = resolve_device(cfg.device)
    title = "class-conditional samples, " + (
        f"DP epsilon<={cfg.privacy.epsilon:g}" if cfg.privacy.private else "NOT private (eps=inf)")
    write_samples_png(run.samples_png, cfg, final.ae, final.dm, final.scale_factor,
                      seed=cfg.seed, device=device, title=title)
    run.logger().info("wrote %s", run.samples_png)
