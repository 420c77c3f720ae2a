"""The run report: one self-contained ``report.html`` that says how faithful, useful and private
the synthetic data is, in numbers, plots and plain sentences.

Self-contained means: inline CSS, figures embedded as base64 PNGs, no script and no external URL,
so the file can be mailed to an ethics board or opened on an air-gapped machine. Figures are
drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot, no global backend state).

This module is the public entry point and assembles the page; the parts live by concept in
:mod:`server.report_figures` (figure builders, PNG embedding), :mod:`server.report_verdicts`
(thresholds and PASS/WEAK/FAIL verdicts) and :mod:`server.report_sections` (HTML per section).

``metrics`` layout read by the report (typed in :mod:`server.run_metrics`; every block optional;
a missing block reads "not measured" and its verdict is FAIL, because a run that cannot show all
three properties is not finished):

* ``run``: flat ``{name: value}`` shown as the run table (preset, sites, rounds, image size ...);
* ``fidelity``: ``ldm_core.evaluation.fidelity_report`` output;
* ``utility``: ``ldm_core.evaluation.evaluate_utility`` output;
* ``privacy``: ``{"sites": {site: {"epsilon", "delta", "budget_epsilon"}}, "rounds": [{site,
  phase, round, epsilon}]}``, plus ``"disclosures": [str]`` - every other value computed from
  private data and released (latent scale factor, class counts ...) and how it is accounted
  for (ledger or fixed by design), plus the DP audit summary of
  ``server.evaluate.summarise_audits``: ``mia_auc``, ``mia_tpr_at_1pct_fpr``,
  ``mia_fpr_at_threshold``, ``mia_noise_std``, ``memorized_fraction``,
  ``memorized_fraction_holdout`` and ``audit_sites`` (``{site: {attacks: {attack: {auc, tpr,
  fpr}}, best_attack, near_copy_fraction, near_copy_fraction_holdout, noise_std, records,
  epsilon}}``).

Known figure names are placed in their section: ``samples``, ``utility``, ``epsilon``, ``roc``,
``score_histograms``, ``closest_pairs``, ``training_curves``; any other name goes under "Other
figures".
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import files
from server.report_figures import (
    closest_pairs_figure,
    epsilon_figure,
    image_grid_figure,
    roc_figure,
    score_histogram_figure,
    training_curves_figure,
    utility_bars_figure,
)
from server.report_sections import (
    NOT_MEASURED,
    fidelity_html,
    img_tag,
    method_html,
    privacy_html,
    run_html,
    utility_html,
    verdict_html,
)
from server.report_verdicts import THRESHOLDS, verdicts

__all__ = [
    "THRESHOLDS",
    "closest_pairs_figure",
    "epsilon_figure",
    "image_grid_figure",
    "roc_figure",
    "score_histogram_figure",
    "training_curves_figure",
    "utility_bars_figure",
    "verdicts",
    "write_report",
]

_SECTIONS = [
    ("verdict", "Verdict"),
    ("run", "Run"),
    ("samples", "Synthetic samples"),
    ("fidelity", "Fidelity: does it look real?"),
    ("utility", "Utility: does it train a good model?"),
    ("privacy", "Privacy: does it leak its training patients?"),
    ("training", "Training"),
    ("other-figures", "Other figures"),
    ("method", "How to read this report"),
    ("raw-metrics", "Raw metrics"),
]
_FIGURE_SECTION = {
    "samples": "samples",
    "utility": "utility",
    "segmentation_pairs": "utility",
    "epsilon": "privacy",
    "roc": "privacy",
    "score_histograms": "privacy",
    "closest_pairs": "privacy",
    "training_curves": "training",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;
color:#1d232a;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{margin:0 0 4px;font-size:26px}h2{border-bottom:2px solid #e3e6ea;padding-bottom:4px;
margin-top:36px;font-size:20px}h3{font-size:16px;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #dde1e6;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;min-width:48px;text-align:center;padding:2px 8px;border-radius:4px;
font-weight:700;color:#fff}.PASS{background:#2e7d32}.WEAK{background:#ed8c00}
.FAIL{background:#c62828}.muted{color:#66707a}figure{margin:12px 0}
figure img{max-width:100%;border:1px solid #e3e6ea}figcaption{font-size:13px;color:#66707a}
pre{background:#f6f7f9;padding:10px;overflow-x:auto;font-size:12px}
"""


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_report(
    run_dir: Path | str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Any],
    *,
    title: str = "fedldm run report",
) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and return its path.

    ``figures`` maps names to matplotlib ``Figure`` objects or image arrays; see the module doc
    for the names placed in sections and for the ``metrics`` layout. The file is written to a
    temporary name and renamed, so a crash never leaves a half-written report.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    by_section: dict[str, list[str]] = {sid: [] for sid, _ in _SECTIONS}
    for name, fig in figures.items():
        by_section[_FIGURE_SECTION.get(name, "other-figures")].append(img_tag(name, fig))
    body = {
        "verdict": verdict_html(metrics),
        "run": run_html(metrics),
        "samples": "" if by_section["samples"] else NOT_MEASURED,
        "fidelity": fidelity_html(metrics),
        "utility": utility_html(metrics),
        "privacy": privacy_html(metrics),
        "training": "" if by_section["training"] else NOT_MEASURED,
        "other-figures": "" if by_section["other-figures"] else '<p class="muted">None.</p>',
        "method": method_html(),
        "raw-metrics": "<details><summary>metrics.json as used for this report</summary><pre>"
        + html.escape(json.dumps(metrics, indent=2, default=_json_default))
        + "</pre></details>",
    }
    sections = "".join(
        f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{body[sid]}'
        f"{''.join(by_section[sid])}</section>"
        for sid, heading in _SECTIONS
    )
    subtitle = str((metrics.get("run") or {}).get("name", run_dir.name))
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="muted">{html.escape(subtitle)}</p>'
        f"{sections}</main></body></html>"
    )
    path = run_dir / "report.html"
    files.write_text_atomic(path, doc)
    return path
