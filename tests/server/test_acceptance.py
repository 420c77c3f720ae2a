"""Acceptance criteria: parsing, the conservative CI rule, the go/no-go block and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.acceptance import (
    AcceptanceError,
    Criterion,
    acceptance_block,
    check_feasible,
    parse_acceptance,
)
from server.export import ExportError, export_run
from server.report import write_report


def _metrics(ratio_ci: tuple[float, float] = (0.91, 0.95), mia_std: float = 0.01) -> dict:
    return {
        "utility": {"ratio": 0.93, "ratio_ci": list(ratio_ci), "tstr_auc": 0.85,
                    "tstr_auc_ci": [0.8, 0.9], "trtr_auc": 0.91, "trtr_auc_ci": [0.88, 0.94]},
        "privacy": {"mia_auc": 0.52, "mia_noise_std": mia_std, "memorized_fraction": 0.0,
                    "sites": {"a": {"epsilon": 7.9, "budget_epsilon": 8.0, "delta": 1e-5},
                              "b": {"epsilon": 6.0, "budget_epsilon": 8.0, "delta": 1e-5}}},
    }


def test_parse_reads_criteria_and_names_what_is_wrong() -> None:
    assert parse_acceptance(" ratio>=0.9, mia_auc <= 0.55,epsilon<=8") == (
        Criterion("ratio", ">=", 0.9), Criterion("mia_auc", "<=", 0.55),
        Criterion("epsilon", "<=", 8.0))
    with pytest.raises(AcceptanceError, match="unknown metric 'fid'.*known: ratio"):
        parse_acceptance("fid<=10")
    with pytest.raises(AcceptanceError, match="cannot read 'ratio=0.9'"):
        parse_acceptance("ratio=0.9")
    with pytest.raises(AcceptanceError, match="twice"):
        parse_acceptance("ratio>=0.9,ratio>=0.8")
    with pytest.raises(AcceptanceError, match="empty"):
        parse_acceptance(" ")


def test_a_criterion_with_an_interval_is_met_only_by_the_whole_interval() -> None:
    go = acceptance_block(_metrics(), parse_acceptance("ratio>=0.9,mia_auc<=0.55,epsilon<=8"))
    assert go["go"] and go["declared"] and go["failed"] == []
    # Same point value 0.93, but the interval reaches below 0.9: not met.
    wide = acceptance_block(_metrics(ratio_ci=(0.88, 0.96)), parse_acceptance("ratio>=0.9"))
    assert not wide["go"] and wide["failed"] == ["ratio>=0.9"]
    assert wide["criteria"][0]["rule"] == "lower end of the 95% CI"
    # A DP audit release: value +- 1.96 noise std must stay under the threshold.
    noisy = acceptance_block(_metrics(mia_std=0.05), parse_acceptance("mia_auc<=0.55"))
    assert not noisy["go"] and noisy["criteria"][0]["ci"][1] > 0.55
    # Epsilon is exact (the largest site), decided by its value.
    eps = acceptance_block(_metrics(), parse_acceptance("epsilon<=7.5"))
    assert not eps["go"] and eps["criteria"][0]["value"] == 7.9
    # Not measured is not met.
    missing = acceptance_block({}, parse_acceptance("ratio>=0.5"))
    assert not missing["go"] and missing["criteria"][0]["rule"] == "not measured"
    # A site whose figures were flagged, or a DP figure without its noise, is not measured.
    flagged = _metrics()
    flagged["privacy"]["sites"]["b"]["flags"] = ["autoencoder round 1: epsilon went down"]
    assert not acceptance_block(flagged, parse_acceptance("epsilon<=8"))["go"]
    no_std = _metrics()
    del no_std["privacy"]["mia_noise_std"]
    assert not acceptance_block(no_std, parse_acceptance("mia_auc<=0.9"))["go"]


def test_without_criteria_the_default_thresholds_decide() -> None:
    block = acceptance_block(_metrics(), None)
    assert not block["declared"] and "default" in block["rule"]
    assert block["go"] is False and "Fidelity" in block["failed"]  # not measured = FAIL


def test_criteria_that_can_never_be_met_are_refused_before_training() -> None:
    with pytest.raises(AcceptanceError, match="lower --epsilon"):
        check_feasible(parse_acceptance("epsilon<=8"), epsilon=10.0, evaluate=True)
    with pytest.raises(AcceptanceError, match="--no-evaluate"):
        check_feasible(parse_acceptance("ratio>=0.9"), epsilon=8.0, evaluate=False)
    check_feasible(parse_acceptance("epsilon<=8"), epsilon=8.0, evaluate=False)


def _run(tmp: Path, metrics: dict) -> Path:
    run = tmp / "run"
    (run / "synthetic" / "tumor").mkdir(parents=True)
    (run / "synthetic" / "tumor" / "syn_000000.png").write_bytes(b"png")
    (run / "synthetic" / "manifest.csv").write_text("path,label\ntumor/syn_000000.png,tumor\n")
    (run / "synthetic" / "DATACARD.md").write_text("# Synthetic dataset data card\n")
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_export_refuses_a_no_go_run_unless_forced(tmp_path: Path) -> None:
    metrics = _metrics(ratio_ci=(0.8, 0.95))
    metrics["acceptance"] = acceptance_block(metrics, parse_acceptance("ratio>=0.9"))
    run = _run(tmp_path, metrics)
    text = write_report(run, metrics, {}).read_text(encoding="utf-8")
    assert "NO-GO" in text and "ratio&gt;=0.9" in text and "NOT met" in text
    with pytest.raises(ExportError, match="NO-GO.*ratio>=0.9.*--force"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    export_run(run, tmp_path / "out", force=True)
    card = (tmp_path / "out" / "DATACARD.md").read_text().splitlines()
    assert card[0].startswith("> **EXPORTED DESPITE NO-GO**") and "ratio>=0.9" in card[0]
    assert (tmp_path / "out" / "tumor" / "syn_000000.png").read_bytes() == b"png"
    assert not list(tmp_path.glob(".out.partial-*"))
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(run, tmp_path / "out", force=True)


def test_export_of_a_go_run_keeps_the_card_as_written(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["acceptance"] = acceptance_block(metrics, parse_acceptance("ratio>=0.9"))
    run = _run(tmp_path, metrics)
    export_run(run, tmp_path / "out")
    assert (tmp_path / "out" / "DATACARD.md").read_text() == "# Synthetic dataset data card\n"
    unevaluated = _run(tmp_path / "b", {"utility": {}})  # no acceptance block
    with pytest.raises(ExportError, match="fedldm evaluate"):
        export_run(unevaluated, tmp_path / "out2")
