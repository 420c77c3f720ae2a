"""Acceptance criteria declared before a run, and the go/no-go verdict against them.

Whether a synthetic set is good enough is a decision for its users, made up front rather than
after looking at the numbers: `--accept "ratio>=0.9,mia_auc<=0.55,epsilon<=8"` is parsed and
checked against the run's configuration before any training, stored with the run, and the report
opens with a verdict criterion by criterion. The rule is conservative: a criterion with a
confidence interval is met only when the whole interval is on the right side of the threshold
(for `>=` its lower end, for `<=` its upper end); one without an interval (epsilon, the largest
the sites reported; not measured when a site's figures were flagged) is met by its
value. A criterion that was not measured is not met.

Without declared criteria the report's default verdict thresholds decide (no FAIL row = GO),
and the report says that these are defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.report_verdicts import fidelity_space, verdicts
from server.run_metrics import num

__all__ = ["METRICS", "AcceptanceError", "Criterion", "acceptance_block", "parse_acceptance",
           "check_feasible"]

Z95 = 1.959964


class AcceptanceError(ValueError):
    """A criterion that cannot be parsed or can never be met; the message says which."""


# (value, CI low, CI high) of one measurement, or None when it was not measured.
Measured = tuple[float, float | None, float | None] | None


def _ci(value: Any, ci: Any) -> Measured:
    """A value with its interval; a broken interval counts as not measured."""
    v = num(value, None)
    if v is None or math.isnan(v):
        return None
    if ci is None:
        return v, None, None
    lo, hi = (num(ci[0], None), num(ci[1], None)) if isinstance(ci, (list, tuple)) and \
        len(ci) == 2 else (None, None)
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return None
    return v, lo, hi


def _noisy(value: Any, std: Any) -> Measured:
    """A DP release with its noise std: a normal 95% interval; without the std, not
    measured (a noisy value must not be judged as if it were exact)."""
    v, s = num(value, None), num(std, None)
    if v is None or math.isnan(v) or s is None or math.isnan(s) or s < 0:
        return None
    return v, v - Z95 * s, v + Z95 * s


def _utility(key: str) -> Callable[[Mapping[str, Any]], Measured]:
    return lambda m: _ci((m.get("utility") or {}).get(key),
                         (m.get("utility") or {}).get(f"{key}_ci"))


def _fidelity(key: str) -> Callable[[Mapping[str, Any]], Measured]:
    def get(m: Mapping[str, Any]) -> Measured:
        block = m.get("fidelity") or {}
        space = fidelity_space(block) if block else None
        return _ci((block.get(space) or {}).get(key), None) if space else None
    return get


def _privacy(key: str) -> Callable[[Mapping[str, Any]], Measured]:
    return lambda m: _noisy((m.get("privacy") or {}).get(key),
                            (m.get("privacy") or {}).get("mia_noise_std"))


def _epsilon(m: Mapping[str, Any]) -> Measured:
    """The largest epsilon the sites reported and the coordinator accepted; not measured when
    any site's figures were flagged as unbelievable or a site reported none."""
    sites = (m.get("privacy") or {}).get("sites") or {}
    rows = [s for s in sites.values() if isinstance(s, Mapping)]
    eps = [num(s.get("epsilon"), None) for s in rows]
    if not rows or any(e is None or math.isnan(e) for e in eps) or any(
            s.get("flags") for s in rows):
        return None
    return max(e for e in eps if e is not None), None, None


def _recon(key: str, se: str) -> Callable[[Mapping[str, Any]], Measured]:
    return lambda m: _noisy((m.get("reconstruction") or {}).get(key),
                            (m.get("reconstruction") or {}).get(se))


#: What a criterion can name: description and how to read it (with its interval) from
#: metrics.json.
METRICS: dict[str, tuple[str, Callable[[Mapping[str, Any]], Measured]]] = {
    "ratio": ("TSTR AUC / TRTR AUC (bootstrap CI over test patients)", _utility("ratio")),
    "tstr_auc": ("AUC of the synthetic-trained classifier on real test patients",
                 _utility("tstr_auc")),
    "trtr_auc": ("AUC of the real-trained classifier (the reference)", _utility("trtr_auc")),
    "tstr_acc": ("accuracy of the synthetic-trained classifier", _utility("tstr_acc")),
    "precision": ("fidelity precision in the report's feature space (no CI)",
                  _fidelity("precision")),
    "recall": ("fidelity recall in the report's feature space (no CI)", _fidelity("recall")),
    "mia_auc": ("membership-inference AUC, mean of the sites' DP audit releases",
                _privacy("mia_auc")),
    "memorized_fraction": ("share of audited training images with a generated near-copy",
                           _privacy("memorized_fraction")),
    "epsilon": ("largest cumulative epsilon any site reported (exact; not measured when a "
                "site's figures were flagged)", _epsilon),
    "recon_ssim": ("autoencoder SSIM on the sites' holdout patients (DP release)",
                   _recon("ssim", "ssim_se")),
    "recon_psnr": ("autoencoder PSNR (dB) on the sites' holdout patients (DP release)",
                   _recon("psnr_db", "psnr_se_db")),
}

_CRITERION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+|inf)\s*$")


@dataclass(frozen=True)
class Criterion:
    metric: str
    op: str  # ">=" or "<="
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def judge(self, measured: Measured) -> tuple[bool, str]:
        """(met, the rule that decided it)."""
        if measured is None:
            return False, "not measured"
        value, lo, hi = measured
        if self.op == ">=":
            if lo is not None:
                return lo >= self.threshold, "lower end of the 95% CI"
            return value >= self.threshold, "value (no CI)"
        if hi is not None:
            return hi <= self.threshold, "upper end of the 95% CI"
        return value <= self.threshold, "value (no CI)"


def parse_acceptance(spec: str) -> tuple[Criterion, ...]:
    """`"ratio>=0.9, mia_auc<=0.55"` -> criteria; an error names the bad part and the fix."""
    if not isinstance(spec, str) or not spec.strip():
        raise AcceptanceError("--accept: empty; give criteria like "
                              "'ratio>=0.9,mia_auc<=0.55,epsilon<=8'")
    out: list[Criterion] = []
    for part in spec.split(","):
        m = _CRITERION.match(part)
        if not m:
            raise AcceptanceError(f"--accept: cannot read {part.strip()!r}; write METRIC>=VALUE "
                                  f"or METRIC<=VALUE, METRIC one of {', '.join(METRICS)}")
        name, op, raw = m.groups()
        if name not in METRICS:
            raise AcceptanceError(f"--accept: unknown metric {name!r} in {part.strip()!r}; "
                                  f"known: {', '.join(METRICS)}")
        try:
            value = float(raw)
        except ValueError:
            raise AcceptanceError(f"--accept: {raw!r} in {part.strip()!r} is not a number"
                                  ) from None
        if math.isnan(value):
            raise AcceptanceError(f"--accept: {part.strip()!r} compares with NaN")
        if any(c.metric == name and c.op == op for c in out):
            raise AcceptanceError(f"--accept: {name}{op} is given twice")
        out.append(Criterion(name, op, value))
    return tuple(out)


def check_feasible(criteria: tuple[Criterion, ...], *, epsilon: float, evaluate: bool) -> None:
    """Refuse, before training, criteria this run can never meet."""
    for c in criteria:
        if c.metric == "epsilon" and c.op == "<=" and epsilon > c.threshold:
            raise AcceptanceError(
                f"--accept {c}: the run asks each site for epsilon {epsilon:g}, so it can end "
                f"above {c.threshold:g}; lower --epsilon to {c.threshold:g} or relax the "
                "criterion")
        if c.metric != "epsilon" and not evaluate:
            raise AcceptanceError(f"--accept {c}: needs the evaluation, which --no-evaluate "
                                  "skips")


def acceptance_block(metrics: Mapping[str, Any],
                     criteria: tuple[Criterion, ...] | None) -> dict[str, Any]:
    """metrics.json `acceptance`: each criterion with its measurement, rule and outcome, and
    the overall GO / NO-GO. Without criteria: the default verdicts decide (no FAIL = GO)."""
    if not criteria:
        rows = [r for r in verdicts(metrics) if r[0] != "Where it falls short"]
        failed = [a for a, status, _ in rows if status == "FAIL"]
        return {"declared": False, "go": not failed, "criteria": [],
                "rule": "no acceptance criteria were declared (--accept); the report's default "
                        "thresholds decide: GO when no aspect FAILs",
                "failed": failed}
    rows_out = []
    for c in criteria:
        measured = METRICS[c.metric][1](metrics)
        met, rule = c.judge(measured)
        value, lo, hi = measured if measured is not None else (None, None, None)
        rows_out.append({"criterion": str(c), "metric": c.metric, "op": c.op,
                         "threshold": c.threshold, "value": value, "ci": [lo, hi]
                         if lo is not None else None, "rule": rule, "met": met})
    return {"declared": True, "go": all(r["met"] for r in rows_out), "criteria": rows_out,
            "spec": ",".join(str(c) for c in criteria),
            "rule": "a criterion with a 95% CI is met only when the whole interval meets it",
            "failed": [r["criterion"] for r in rows_out if not r["met"]]}
