"""Tests for client.ledger: durable, never under-counting, refusing, concurrent-safe."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.ledger import (
    BudgetExceededError,
    LedgerError,
    LedgerMissingError,
    PrivacyLedger,
    genesis_hash,
)
from ldm_core.privacy import epsilon_of

DELTA = 1e-5
REPO = Path(__file__).resolve().parents[2]
STEP = (1.0, 0.01, 500)  # epsilon ~1.29 alone at DELTA


def _open(path: Path, budget: float = 8.0, **kw) -> PrivacyLedger:
    return PrivacyLedger.open(path, budget_epsilon=budget, delta=DELTA, site_id="site-a", **kw)


def _create(path: Path, budget: float = 8.0) -> PrivacyLedger:
    return PrivacyLedger.create(path, budget_epsilon=budget, delta=DELTA, site_id="site-a")


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
    ledger = _create(path)
    assert path.exists()
    assert ledger.epsilon() == 0.0
    assert ledger.remaining() == 8.0
    assert ledger.history == []
    doc = json.loads(path.read_text())
    assert doc["format"] == 2 and doc["site_id"] == "site-a" and doc["delta"] == DELTA
    head = json.loads((tmp_path / "ledger.json.head").read_text())
    assert head == {"format": 2, "entries": 0, "last_hash": genesis_hash("site-a", DELTA)}
    for name in ("ledger.json", "ledger.json.head", "ledger.json.lock"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    assert _open(path).epsilon() == 0.0


def test_charge_persists_and_reloads(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _create(path)
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
        "prev_hash",
        "hash",
    }


def test_epsilon_if_writes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _create(path)
    before = path.read_bytes()
    assert ledger.epsilon_if([STEP]) == pytest.approx(epsilon_of([STEP], DELTA))
    assert path.read_bytes() == before


def test_over_budget_raises_and_leaves_file_identical(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _create(path, budget=2.0)
    ledger.charge([STEP], run_id="r1", phase="autoencoder", round=1)
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError) as info:
        ledger.charge([STEP, STEP], run_id="r1", phase="autoencoder", round=2)
    message = str(info.value)
    assert "spent" in message and "budget 2" in message and "allow_budget_increase" in message
    assert info.value.requested > 2.0 and info.value.spent < 2.0
    public = info.value.public_reason()
    assert "budget" in public and not re.search(r"\d", public)  # nothing data-dependent
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kill_between_charge_and_training_never_under_counts(tmp_path):
    path = tmp_path / "ledger.json"
    _create(path)
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
    head = tmp_path / "ledger.json.head"
    ledger = _create(path, budget=budget)
    empty, empty_head = path.read_bytes(), head.read_bytes()
    ledger.charge([STEP], run_id="other", phase="p", round=0)
    one_charge, one_charge_head = path.read_bytes(), head.read_bytes()
    path.write_bytes(empty)
    head.write_bytes(empty_head)

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
        head.write_bytes(one_charge_head)
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
        b'{"format": 3, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, "entries": []}',
        # (a format-2 ledger with entries but no head: test_missing_head_is_refused; an empty
        # one without a head is an interrupted enrolment and opens: see the crash test)
        b'{"format": 1, "site_id": "site-a", "delta": 1e-05, "budget_epsilon": 8.0, '
        b'"entries": [{"run_id": "r", "phase": "p", "round": 0, "noise_multiplier": 1.0, '
        b'"sample_rate": 0.01, "steps": NaN, "epsilon_after": 0.1, "time": 0}]}',
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
    _create(path)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(path, budget_epsilon=8.0, delta=1e-6, site_id="site-a")
    assert path.read_bytes() == before


def test_site_mismatch_raises(tmp_path):
    path = tmp_path / "ledger.json"
    _create(path)
    with pytest.raises(LedgerError, match="site-a"):
        PrivacyLedger.open(path, budget_epsilon=8.0, delta=DELTA, site_id="site-b")


def test_budget_lowering_kept_and_recorded(tmp_path):
    path = tmp_path / "ledger.json"
    _create(path, budget=8.0)
    lowered = _open(path, budget=4.0)
    assert lowered.budget_epsilon == 4.0
    changes = json.loads(path.read_text())["budget_changes"]
    assert [(c["from"], c["to"]) for c in changes] == [(8.0, 4.0)]
    # a process still holding the old object sees the lower budget too (the file rules)
    assert _open(path, budget=3.0).budget_epsilon == 3.0
    assert lowered.budget_epsilon == 3.0


def test_budget_raise_refused_unless_explicit(tmp_path):
    path = tmp_path / "ledger.json"
    _create(path, budget=4.0)
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
    _create(path).charge([STEP], run_id="r", phase="p", round=0)
    ledger = _open(path, budget=0.5)
    assert ledger.remaining() == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.charge([(5.0, 0.001, 1)], run_id="r", phase="p", round=1)


def test_infinite_budget_non_dp_baseline(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _create(path, budget=math.inf)
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
        _create(finite).charge([(0.0, 0.05, 1)], run_id="base", phase="autoencoder", round=0)


def test_summary_per_run_and_phase(tmp_path):
    ledger = _create(tmp_path / "ledger.json", budget=20.0)
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
    ledger = _create(path)
    before = path.read_bytes()
    args = {"run_id": "r", "phase": "p", "round": 0, **kw}
    with pytest.raises(ValueError, match=match):
        ledger.charge(entries, **args)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "kw",
    [{"budget_epsilon": -1.0}, {"budget_epsilon": float("nan")}, {"delta": 0.0}, {"site_id": ""}],
)
@pytest.mark.parametrize("method", [PrivacyLedger.open, PrivacyLedger.create])
def test_open_bad_input(tmp_path, kw, method):
    args = {"budget_epsilon": 8.0, "delta": DELTA, "site_id": "s", **kw}
    with pytest.raises(ValueError):
        method(tmp_path / "ledger.json", **args)
    assert list(tmp_path.iterdir()) == []


# -- durability: fsync order, atomic replace, persisted before return ---------------------------


def test_every_write_fsyncs_the_temp_file_before_replace_and_the_folder_after(
    tmp_path, monkeypatch
):
    path = tmp_path / "ledger.json"
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _create(path).charge([STEP], run_id="r", phase="p", round=0)
    monkeypatch.undo()

    at = [i for i, e in enumerate(events) if e[0] == "replace"]
    ledger, head = os.path.realpath(path), os.path.realpath(tmp_path / "ledger.json.head")
    assert [events[i][2] for i in at] == [ledger, head, ledger, head]  # create, then charge
    folder = ("fsync", os.path.realpath(tmp_path))
    for k, i in enumerate(at):
        src = events[i][1]
        assert ("fsync", src) in events[:i], f"temp file {src} not fsynced before os.replace"
        until = at[k + 1] if k + 1 < len(at) else len(events)
        assert folder in events[i + 1 : until], "folder not fsynced after os.replace"


def test_failed_replace_mid_charge_leaves_the_old_ledger_intact(tmp_path, monkeypatch):
    path, head = tmp_path / "ledger.json", tmp_path / "ledger.json.head"
    ledger = _create(path)
    ledger.charge([STEP], run_id="r", phase="p", round=0)
    before, head_before = path.read_bytes(), head.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.charge([(1.1, 0.01, 10)], run_id="r", phase="p", round=1)
    monkeypatch.undo()
    assert path.read_bytes() == before and head.read_bytes() == head_before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _open(path).history == [STEP]


def test_charge_is_persisted_before_it_returns(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = _create(path)
    ledger.charge([STEP], run_id="r", phase="p", round=0)
    # immediately, through another object and through the raw file
    assert _open(path).history == [STEP]
    assert [e["steps"] for e in json.loads(path.read_text())["entries"]] == [STEP[2]]
    assert json.loads((tmp_path / "ledger.json.head").read_text())["entries"] == 1


# -- reads take the (shared) lock ---------------------------------------------------------------

READS: dict[str, Callable[[PrivacyLedger], Any]] = {
    "epsilon": lambda ledger: ledger.epsilon(),
    "history": lambda ledger: ledger.history,
    "entries": lambda ledger: ledger.entries(),
    "budget_epsilon": lambda ledger: ledger.budget_epsilon,
    "remaining": lambda ledger: ledger.remaining(),
    "epsilon_if": lambda ledger: ledger.epsilon_if([STEP]),
    "summary": lambda ledger: ledger.summary(),
}


def _read_in_thread(ledger: PrivacyLedger, read: str) -> tuple[threading.Thread, dict]:
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("value", READS[read](ledger)), daemon=True
    )
    thread.start()
    return thread, result


@pytest.mark.parametrize("read", list(READS))
def test_reads_wait_while_a_writer_holds_the_lock(tmp_path, read):
    path = tmp_path / "ledger.json"
    ledger = _create(path)
    ledger.charge([STEP], run_id="r", phase="p", round=0)
    fd = os.open(tmp_path / "ledger.json.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in the middle of replacing the ledger
        thread, result = _read_in_thread(ledger, read)
        thread.join(0.3)
        assert thread.is_alive(), f"{read} read the ledger without taking the lock"
    finally:
        os.close(fd)
    thread.join(30)
    assert not thread.is_alive() and "value" in result


@pytest.mark.parametrize("read", list(READS))
def test_reads_share_the_lock_with_other_readers(tmp_path, read):
    path = tmp_path / "ledger.json"
    ledger = _create(path)
    fd = os.open(tmp_path / "ledger.json.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        thread, result = _read_in_thread(ledger, read)
        thread.join(30)
        assert not thread.is_alive() and "value" in result
    finally:
        os.close(fd)


# -- enrolment: open() never creates --------------------------------------------------------------


def test_open_refuses_a_missing_ledger_and_creates_nothing(tmp_path):
    assert issubclass(LedgerMissingError, LedgerError)
    for path in (tmp_path / "ledger.json", tmp_path / "deleted state dir" / "ledger.json"):
        with pytest.raises(LedgerMissingError) as info:
            _open(path)
        message = str(info.value)
        assert str(path) in message and "backup" in message
        assert f"fedldm site init --state-dir {shlex.quote(str(path.parent))} --site-id site-a" in (
            message
        )
    assert list(tmp_path.iterdir()) == []


def test_deleted_ledger_is_not_recreated(tmp_path):
    path = tmp_path / "ledger.json"
    _create(path).charge([STEP], run_id="r", phase="p", round=0)
    path.unlink()
    with pytest.raises(LedgerMissingError):
        _open(path)
    assert not path.exists()


def test_create_refuses_an_existing_ledger_or_head(tmp_path):
    path, head = tmp_path / "ledger.json", tmp_path / "ledger.json.head"
    _create(path).charge([STEP], run_id="r", phase="p", round=0)
    before, head_before = path.read_bytes(), head.read_bytes()
    with pytest.raises(LedgerError, match="already enrolled"):
        _create(path)
    assert path.read_bytes() == before and head.read_bytes() == head_before
    path.unlink()  # the head alone still proves an enrolment
    with pytest.raises(LedgerError, match="already enrolled"):
        _create(path)
    assert not path.exists()


# -- tamper evidence: hash chain and head ---------------------------------------------------------


def _three_charges(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.json"
    ledger = _create(path, budget=50.0)
    for k, steps in enumerate((100, 200, 300)):
        ledger.charge([(1.0, 0.01, steps)], run_id="r", phase="p", round=k)
    return path


def _rehash_from(doc: dict, start: int) -> None:
    """What a careful forger would do: recompute the chain after an edit (head left alone)."""
    prev = doc["entries"][start - 1]["hash"] if start else genesis_hash("site-a", DELTA)
    for e in doc["entries"][start:]:
        e["prev_hash"] = prev
        body = {k: v for k, v in e.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        prev = e["hash"] = hashlib.sha256(canonical.encode()).hexdigest()


def _edit_steps(doc: dict) -> None:
    doc["entries"][1]["steps"] = 1


def _edit_noise(doc: dict) -> None:
    doc["entries"][1]["noise_multiplier"] = 50.0


def _drop_first(doc: dict) -> None:
    del doc["entries"][0]


def _drop_last(doc: dict) -> None:
    del doc["entries"][-1]


def _drop_all(doc: dict) -> None:
    doc["entries"] = []


def _edit_and_rehash(doc: dict) -> None:
    doc["entries"][2]["steps"] = 1
    _rehash_from(doc, 2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_edit_steps, r"entry #1 .*edited or corrupted"),
        (_edit_noise, r"entry #1 .*edited or corrupted"),
        (_drop_first, r"entry #0 .*edited or corrupted"),
        (_drop_last, "truncated"),
        (_drop_all, "truncated"),
        (_edit_and_rehash, "truncated or replaced"),
    ],
)
def test_edited_or_truncated_ledger_is_refused(tmp_path, edit, match):
    path = _three_charges(tmp_path)
    ledger = _open(path, budget=50.0)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))
    tampered = path.read_bytes()
    with pytest.raises(LedgerError, match=match) as info:
        _open(path, budget=50.0)
    assert str(path) in str(info.value) and "backup" in str(info.value)
    with pytest.raises(LedgerError, match=match):
        ledger.epsilon()
    with pytest.raises(LedgerError, match=match):
        ledger.charge([STEP], run_id="r", phase="p", round=9)
    assert path.read_bytes() == tampered


def test_nan_steps_are_refused(tmp_path):
    path = _three_charges(tmp_path)
    text = path.read_text()
    assert '"steps": 200' in text
    path.write_text(text.replace('"steps": 200', '"steps": NaN'))
    with pytest.raises(LedgerError, match=str(path)):
        _open(path, budget=50.0)


def test_missing_head_is_refused(tmp_path):
    path = _three_charges(tmp_path)
    (tmp_path / "ledger.json.head").unlink()
    with pytest.raises(LedgerError, match="head file .* is missing"):
        _open(path, budget=50.0)
    assert not (tmp_path / "ledger.json.head").exists()


def test_a_crash_between_the_two_writes_of_enrolment_does_not_brick_the_site(tmp_path):
    """`create` writes the ledger, then its head; a kill between them (seen in the 50-SIGKILL
    test) leaves an empty ledger without a head. Nothing was charged, so it opens, charges,
    and from then on has a head again; a ledger with entries and no head is still refused."""
    path = tmp_path / "ledger.json"
    PrivacyLedger.create(path, budget_epsilon=50.0, delta=1e-5, site_id="site-a")
    (tmp_path / "ledger.json.head").unlink()
    ledger = _open(path, budget=50.0)
    ledger.charge([STEP], run_id="r", phase="p", round=1)
    assert (tmp_path / "ledger.json.head").exists()
    (tmp_path / "ledger.json.head").unlink()
    with pytest.raises(LedgerError, match="head file .* is missing"):
        _open(path, budget=50.0)


def test_head_may_lag_by_the_charge_a_crash_interrupted(tmp_path):
    """A crash after the ledger was replaced but before the head was: still a valid ledger."""
    path, head = tmp_path / "ledger.json", tmp_path / "ledger.json.head"
    ledger = _create(path)
    ledger.charge([STEP], run_id="r", phase="p", round=0)
    old_head = head.read_bytes()
    ledger.charge([STEP], run_id="r", phase="p", round=1)
    head.write_bytes(old_head)
    assert _open(path).history == [STEP, STEP]


FORMAT_1 = {
    "format": 1,
    "site_id": "site-a",
    "delta": DELTA,
    "budget_epsilon": 8.0,
    "budget_changes": [{"time": 1.0, "from": 9.0, "to": 8.0, "reason": "lowered"}],
    "entries": [
        {"run_id": "old", "phase": "autoencoder", "round": 1, "noise_multiplier": 1,
         "sample_rate": 0.01, "steps": 500, "epsilon_after": 1.3, "time": 1.0},
        {"run_id": "old", "phase": "diffusion", "round": 2, "noise_multiplier": 1.2,
         "sample_rate": 0.02, "steps": 100, "epsilon_after": 2.0, "time": 2.0},
    ],
}


def test_format_1_ledger_is_upgraded_in_place(tmp_path):
    path, head = tmp_path / "ledger.json", tmp_path / "ledger.json.head"
    path.write_text(json.dumps(FORMAT_1))
    # a read-only reader (like `fedldm site budget`) reads it without rewriting it
    before = path.read_bytes()
    reader = PrivacyLedger(path, site_id="site-a", delta=DELTA)
    assert reader.history == [STEP, (1.2, 0.02, 100)]
    assert path.read_bytes() == before and not head.exists()

    ledger = _open(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == 2 and doc["budget_changes"] == FORMAT_1["budget_changes"]
    assert doc["entries"][0]["prev_hash"] == genesis_hash("site-a", DELTA)
    assert json.loads(head.read_text())["entries"] == 2
    assert ledger.history == [STEP, (1.2, 0.02, 100)]
    ledger.charge([STEP], run_id="new", phase="p", round=0)
    assert _open(path).history == [STEP, (1.2, 0.02, 100), STEP]
    _drop_first(doc)  # the upgraded ledger is protected like any other
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="entry #0"):
        _open(path)


def test_format_1_ledger_next_to_a_head_is_refused(tmp_path):
    """An old copy put back over an upgraded ledger (e.g. to undo spending) is not accepted."""
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(FORMAT_1))
    _open(path)
    path.write_text(json.dumps(FORMAT_1))
    with pytest.raises(LedgerError, match="format 1"):
        _open(path)
