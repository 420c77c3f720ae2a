"""What the coordinator does once training is over: samples, then (optionally) evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_core.models import resolve_device
from server.federation import load_final
from server.run_folder import RunFolder
from server.samples import write_samples_png


def finalize_run(out: Path, *, sites: Any = None, n_sites: int = 0, evaluate: bool = False,
                 audit: Any = None, options: Any = None, show_progress: bool = True) -> None:
    """Write samples.png from the final checkpoint; run the evaluation when asked."""
    write_samples(out)
    if evaluate:
        from server.evaluate import evaluate_run

        evaluate_run(out, sites=sites, n_sites=n_sites, audit=audit, options=options,
                     show_progress=show_progress)


def write_samples(out: Path) -> None:
    folder = RunFolder(out)
    log = folder.logger()
    cfg, ae, dm, scale = load_final(out)
    device = resolve_device(cfg.device)
    title = "class-conditional samples, " + (
        f"DP epsilon<={cfg.privacy.epsilon:g}" if cfg.privacy.private else "NOT private (eps=inf)")
    write_samples_png(out / "samples.png", cfg, ae, dm, scale, seed=cfg.seed, device=device,
                      title=title)
    log.info("wrote %s", out / "samples.png")
