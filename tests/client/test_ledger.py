"""Tests for client.ledger: durable, never under-counting, refusing, concurrent-safe."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client.ledger import BudgetExceededError, LedgerError, PrivacyLedger
from ldm_core.privacy import epsilon_of

DELTA = 1e-5
REPO = Path(__file__).resolve().parents[2]
STEP = (1.0, 0.01, 500)  # epsilon ~1.29 alone at DELTA


def _open(path: Path, budget: float = 8.0, **kw) -> PrivacyLedger:
    return PrivacyLedger.open(path, budget_epsilon=budget, delta=DELTA, site_id="site-a", **kw)


def _run_py(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_new_ledger_is_empty_strict_json(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    assert path.exists()
    assert ledger.epsilon() == 0.0
    assert ledger.remaining() == 8.0
    assert ledger.history == []
    doc = json.loads(path.read_text())
    assert doc["format"] == 1 and doc["site_id"] == "site-a" and doc["delta"] == DELTA


def test_charge_persists_and_reloads(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    after = ledger.charge([STEP], run_id="r1", phase="autoencoder", round=1)
    assert after == pytest.approx(epsilon_of([STEP], DELTA))
    after2 = ledger.charge([(1.2, 0.02, 100)], run_id="r1", phase="diffusion", round=2)
    reopened = _open(path)
    assert reopened.history == [STEP, (1.2, 0.02, 100)]
    assert reopened.epsilon() == pytest.approx(after2)
    assert reopened.remaining() == pytest.approx(8.0 - after2)
    assert [e["phase"] for e in reopened.entries()] == ["autoencoder", "diffusion"]
    entry = json.loads(path.read_text())["entries"][1]
    assert {k: entry[k] for k in ("run_id", "phase", "round", "steps")} == {
        "run_id": "r1",
        "phase": "diffusion",
        "round": 2,
        "steps": 100,
    }
    assert set(entry) == {
        "run_id",
        "phase",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "epsilon_after",
        "time",
    }


def test_epsilon_if_writes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    before = path.read_bytes()
    assert ledger.epsilon_if([STEP]) == pytest.approx(epsilon_of([STEP], DELTA))
    assert path.read_bytes() == before


def test_over_budget_raises_and_leaves_file_identical(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _open(path, budget=2.0)
    ledger.charge([STEP], run_id="r1", phase="autoencoder", round=1)
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError) as info:
        ledger.charge([STEP, STEP], run_id="r1", phase="autoencoder", round=2)
    message = str(info.value)
    assert "spent" in message and "budget 2" in message and "allow_budget_increase" in message
    assert info.value.requested > 2.0 and info.value.spent < 2.0
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kill_between_charge_and_training_never_under_counts(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path)
    proc = _run_py(
        """
        import os, sys
        from pathlib import Path
        from client.ledger import PrivacyLedger
        ledger = PrivacyLedger.open(Path(sys.argv[1]), budget_epsilon=8.0, delta=1e-5,
                                    site_id="site-a")
        ledger.charge([(1.0, 0.01, 500)], run_id="r1", phase="autoencoder", round=1)
        os._exit(1)  # killed before training ran: the charge must still be there
        """,
        str(path),
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    reopened = _open(path)
    assert reopened.history == [STEP]
    assert reopened.epsilon() == pytest.approx(epsilon_of([STEP], DELTA))


def test_charge_waits_for_the_lock_and_rereads_inside_it(tmp_path):
    """Another process's charge, made while it held the lock, must be seen by the next one.

    Deterministic stand-in for two racing processes: this test holds the sidecar lock, a child
    process blocks in ``charge``, and meanwhile the file gains a charge (as if written by the lock
    holder). The budget has room for one charge only, so the child must refuse: had it read the
    file before taking the lock, it would have lost that update and overspent.
    """
    path = tmp_path / "ledger.json"
    budget = (epsilon_of([STEP], DELTA) + epsilon_of([STEP, STEP], DELTA)) / 2
    ledger = _open(path, budget=budget)
    empty = path.read_bytes()
    ledger.charge([STEP], run_id="other", phase="p", round=0)
    one_charge = path.read_bytes()
    path.write_bytes(empty)

    fd = os.open(tmp_path / "ledger.json.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = _run_py(
            """
            import sys
            from pathlib import Path
            from client.ledger import BudgetExceededError, PrivacyLedger
            # the constructor does not lock (open() would block before printing "ready")
            ledger = PrivacyLedger(Path(sys.argv[1]), site_id="site-a", delta=1e-5)
            print("ready", flush=True)
            try:
                ledger.charge([(1.0, 0.01, 500)], run_id="child", phase="p", round=0)
            except BudgetExceededError:
                sys.exit(3)
            """,
            str(path),
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert proc.poll() is None  # blocked on the lock
        assert path.read_bytes() == empty
        path.write_bytes(one_charge)  # the lock holder's charge
    finally:
        os.close(fd)  # releases the lock
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert path.read_bytes() == one_charge
    assert _open(path, budget=budget).history == [STEP]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"format": 1, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, "entries": [',
        b"[]",
        b'{"format": 2, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, "entries": []}',
        b'{"format": 1, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, '
        b'"entries": [{"run_id": "r", "phase": "p", "round": 0, "noise_multiplier": NaN, '
        b'"sample_rate": 0.01, "steps": 5, "epsilon_after": 0.1, "time": 0}]}',
        b'{"format": 1, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, '
        b'"entries": [{"run_id": "r", "phase": "p", "round": 0, "noise_multiplier": 1.0, '
        b'"sample_rate": 2.0, "steps": 5, "epsilon_after": 0.1, "time": 0}]}',
    ],
)
def test_corrupt_file_raises_and_is_untouched(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=str(path)):
        _open(path)
    assert path.read_bytes() == content


def test_delta_mismatch_raises(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(path, budget_epsilon=8.0, delta=1e-6, site_id="site-a")
    assert path.read_bytes() == before


def test_site_mismatch_raises(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path)
    with pytest.raises(LedgerError, match="site-a"):
        PrivacyLedger.open(path, budget_epsilon=8.0, delta=DELTA, site_id="site-b")


def test_budget_lowering_kept_and_recorded(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path, budget=8.0)
    lowered = _open(path, budget=4.0)
    assert lowered.budget_epsilon == 4.0
    changes = json.loads(path.read_text())["budget_changes"]
    assert [(c["from"], c["to"]) for c in changes] == [(8.0, 4.0)]
    # a process still holding the old object sees the lower budget too (the file rules)
    assert _open(path, budget=3.0).budget_epsilon == 3.0
    assert lowered.budget_epsilon == 3.0


def test_budget_raise_refused_unless_explicit(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path, budget=4.0)
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="allow_budget_increase"):
        ledger = _open(path, budget=8.0)
    assert ledger.budget_epsilon == 4.0
    assert path.read_bytes() == before
    raised = _open(path, budget=8.0, allow_budget_increase=True)
    assert raised.budget_epsilon == 8.0
    changes = json.loads(path.read_text())["budget_changes"]
    assert [(c["from"], c["to"]) for c in changes] == [(4.0, 8.0)]


def test_lowering_below_spent_blocks_further_charges(tmp_path):
    path = tmp_path / "ledger.json"
    _open(path).charge([STEP], run_id="r", phase="p", round=0)
    ledger = _open(path, budget=0.5)
    assert ledger.remaining() == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.charge([(5.0, 0.001, 1)], run_id="r", phase="p", round=1)


def test_infinite_budget_non_dp_baseline(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _open(path, budget=math.inf)
    assert ledger.remaining() == math.inf
    after = ledger.charge([(0.0, 0.05, 200)], run_id="base", phase="autoencoder", round=0)
    assert after == math.inf
    reopened = _open(path, budget=math.inf)
    assert reopened.history == [(0.0, 0.05, 200)]
    assert reopened.epsilon() == math.inf
    assert reopened.remaining() == math.inf
    # strict JSON: no Infinity/NaN literals
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    summary = reopened.summary()
    assert summary["phases"][0]["steps"] == 200 and summary["epsilon"] == math.inf
    # a finite budget refuses the non-private baseline
    finite = tmp_path / "finite.json"
    with pytest.raises(BudgetExceededError):
        _open(finite).charge([(0.0, 0.05, 1)], run_id="base", phase="autoencoder", round=0)


def test_summary_per_run_and_phase(tmp_path):
    ledger = _open(tmp_path / "ledger.json", budget=20.0)
    ledger.charge([(1.0, 0.01, 100)], run_id="r1", phase="autoencoder", round=1)
    ledger.charge([(1.0, 0.01, 100)], run_id="r1", phase="autoencoder", round=2)
    ledger.charge([(1.3, 0.02, 50), (1.0, 1.0, 1)], run_id="r1", phase="diffusion", round=3)
    ledger.charge([(2.0, 0.01, 300)], run_id="r2", phase="autoencoder", round=1)
    summary = ledger.summary()
    rows = summary["phases"]
    assert [(r["run_id"], r["phase"]) for r in rows] == [
        ("r1", "autoencoder"),
        ("r1", "diffusion"),
        ("r2", "autoencoder"),
    ]
    assert [r["steps"] for r in rows] == [200, 51, 300]
    assert rows[0]["rounds"] == [1, 2]
    total = sum(r["epsilon_contribution"] for r in rows)
    assert total == pytest.approx(summary["epsilon"], rel=1e-9)
    assert summary["epsilon"] == pytest.approx(ledger.epsilon())
    assert all(r["epsilon_contribution"] > 0 for r in rows)
    assert summary["remaining"] == pytest.approx(20.0 - summary["epsilon"])


@pytest.mark.parametrize(
    ("entries", "kw", "match"),
    [
        ([(1.0, 0.0, 5)], {}, "sample_rate"),
        ([STEP], {"run_id": ""}, "run_id"),
        ([STEP], {"phase": 3}, "phase"),
        ([STEP], {"round": -1}, "round"),
    ],
)
def test_charge_bad_input_writes_nothing(tmp_path, entries, kw, match):
    path = tmp_path / "ledger.json"
    ledger = _open(path)
    before = path.read_bytes()
    args = {"run_id": "r", "phase": "p", "round": 0, **kw}
    with pytest.raises(ValueError, match=match):
        ledger.charge(entries, **args)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "kw",
    [{"budget_epsilon": -1.0}, {"budget_epsilon": float("nan")}, {"delta": 0.0}, {"site_id": ""}],
)
def test_open_bad_input(tmp_path, kw):
    args = {"budget_epsilon": 8.0, "delta": DELTA, "site_id": "s", **kw}
    with pytest.raises(ValueError):
        PrivacyLedger.open(tmp_path / "ledger.json", **args)
    assert not (tmp_path / "ledger.json").exists()
