"""`fedldm export RUN --to DIR`: hand the synthetic dataset over with its evidence.

What leaves is the evaluated synthetic set (images and manifest.csv) and its DATACARD.md: per-
site epsilon and delta, the unit of privacy, what else the sites released, utility and privacy
results with their intervals, and the go/no-go against the acceptance criteria declared before
training. A run that did not meet them is refused unless `force`; then the data card's first
line says so, so the warning travels with the data. The copy is assembled in a temporary folder
beside DIR and renamed into place: a crash never leaves a half-exported dataset behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import files
from server.run_folder import Run

__all__ = ["ExportError", "export_run"]


class ExportError(ValueError):
    """The export was refused; the message names the file or decision and the fix."""


def export_run(run_dir: Path, to: Path, *, force: bool = False) -> dict[str, Any]:
    """Copy RUN/synthetic to `to` with its data card; returns the acceptance block used."""
    run = Run(run_dir)
    if not run.metrics_path.exists():
        raise ExportError(f"{run.metrics_path}: no such file; is {run_dir} a run folder?")
    metrics = run.load_metrics()
    acc = metrics.get("acceptance")
    manifest = run.synthetic / "manifest.csv"
    if not isinstance(acc, dict) or not manifest.exists() or not run.datacard.exists():
        raise ExportError(f"{run_dir}: the run has no evaluated synthetic set (needs "
                          f"{manifest}, {run.datacard} and an 'acceptance' block in "
                          f"{run.metrics_path}); run `fedldm evaluate {run_dir}` first")
    go = bool(acc.get("go"))
    failed = ", ".join(str(f) for f in acc.get("failed") or []) or "-"
    basis = ("its declared acceptance criteria" if acc.get("declared")
             else "the report's default thresholds (no criteria were declared)")
    if not go and not force:
        raise ExportError(f"{run_dir}: NO-GO against {basis} (not met: {failed}); see "
                          f"{run.root / 'report.html'}. Pass --force to export anyway: the data "
                          "card will say so on its first line")
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ExportError(f"--to {to}: exists and is not an empty folder; choose a new one "
                          "(nothing was written)")
    with files.staged_folder(to) as tmp:
        shutil.copytree(run.synthetic, tmp, dirs_exist_ok=True)
        card = run.datacard.read_text()
        first = (f"> **EXPORTED DESPITE NO-GO** (`fedldm export --force`): this dataset did not "
                 f"meet {basis}; not met: {failed}.\n\n") if not go else ""
        (tmp / "DATACARD.md").write_text(first + card)
    return acc
