"""The durable per-site privacy ledger: what this site has spent, over every run and phase.

Why a file and not the Opacus accountant in memory: in deployment a fresh ClientApp process
handles each message, so an in-memory accountant restarts at zero every round (the bug in
Flower's Opacus example). The ledger is charged BEFORE a round trains and is persisted before
`charge` returns, so a crash between the charge and the training over-counts, never under-counts.

File format (JSON, ``"format": 1``)::

    {"format": 1, "site_id": "...", "delta": 1e-05, "budget_epsilon": 8.0,
     "budget_changes": [{"time": ..., "from": ..., "to": ..., "reason": ...}],
     "entries": [{"run_id", "phase", "round", "noise_multiplier", "sample_rate", "steps",
                  "epsilon_after", "time"}]}

Infinite values are stored as the string ``"inf"`` so the file stays strict JSON. The epsilon is
always recomputed from the entries (``epsilon_after`` is informational), so a hand-edited
``epsilon_after`` cannot lower what the site is charged.

Concurrency: every read-modify-write holds an exclusive ``fcntl.flock`` on the sidecar
``<ledger>.lock`` and re-reads the file inside the lock; reads hold a shared lock. flock is
advisory and per host: keep the ledger on a local disk (not NFS) and use it only via this class.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_core.privacy import History, epsilon_of, validate_entry, validate_history

FORMAT_VERSION = 1
# Relative slack on the budget check, only to absorb float rounding of the same computation.
_RELATIVE_TOLERANCE = 1e-9


class BudgetExceededError(RuntimeError):
    """A charge would take the site past its epsilon budget; nothing was recorded."""

    def __init__(self, *, site_id: str, spent: float, requested: float, budget: float) -> None:
        self.site_id = site_id
        self.spent = spent
        self.requested = requested
        self.budget = budget
        super().__init__(
            f"site {site_id!r}: privacy budget exceeded. Already spent epsilon {spent:.6g}; this "
            f"request would bring it to {requested:.6g}, above the site budget {budget:.6g}. "
            "Nothing was charged and no training ran. The site can refuse this round, ask the "
            "coordinator for fewer steps / a lower sample rate / more noise, or (only if its "
            "data governance allows) raise its budget with allow_budget_increase=True."
        )


class LedgerError(RuntimeError):
    """The ledger file is corrupt or belongs to another configuration; it was not modified."""


def _enc(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _dec_float(value: Any, *, path: Path, field: str) -> float:
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise LedgerError(
            f"{path}: field {field!r} = {value!r} is not a number. The ledger is corrupt: restore "
            "it from a backup; do not delete it (that would reset the site's spent epsilon)."
        )
    return float(value)


@dataclass(frozen=True)
class _State:
    site_id: str
    delta: float
    budget_epsilon: float
    budget_changes: list[dict[str, Any]]
    entries: list[dict[str, Any]]

    @property
    def history(self) -> History:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_VERSION,
            "site_id": self.site_id,
            "delta": self.delta,
            "budget_epsilon": _enc(self.budget_epsilon),
            "budget_changes": [
                {**c, "from": _enc(c["from"]), "to": _enc(c["to"])} for c in self.budget_changes
            ],
            "entries": [{**e, "epsilon_after": _enc(e["epsilon_after"])} for e in self.entries],
        }
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _corrupt(path: Path, what: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} is unreadable: {what}. It was left untouched. Restore it from a "
        "backup (or fix it by hand); never delete it to start over, since that would forget "
        "the epsilon this site has already spent."
    )


def _parse(path: Path, raw: bytes) -> _State:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise _corrupt(path, "top level is not a JSON object")
    if doc.get("format") != FORMAT_VERSION:
        raise _corrupt(
            path, f"format {doc.get('format')!r} is not {FORMAT_VERSION} (wrong fedldm version?)"
        )
    site_id = doc.get("site_id")
    if not isinstance(site_id, str):
        raise _corrupt(path, "missing site_id")
    delta = _dec_float(doc.get("delta"), path=path, field="delta")
    budget = _dec_float(doc.get("budget_epsilon"), path=path, field="budget_epsilon")
    changes_raw = doc.get("budget_changes", [])
    entries_raw = doc.get("entries")
    if not isinstance(changes_raw, list) or not isinstance(entries_raw, list):
        raise _corrupt(path, "budget_changes/entries must be lists")
    changes = []
    for c in changes_raw:
        if not isinstance(c, dict):
            raise _corrupt(path, f"budget change {c!r} is not an object")
        changes.append(
            {
                **c,
                "from": _dec_float(c.get("from"), path=path, field="budget_changes.from"),
                "to": _dec_float(c.get("to"), path=path, field="budget_changes.to"),
            }
        )
    entries = []
    for i, e in enumerate(entries_raw):
        if not isinstance(e, dict):
            raise _corrupt(path, f"entry #{i} is not an object")
        try:
            sigma, q, steps = validate_entry(
                (e.get("noise_multiplier"), e.get("sample_rate"), e.get("steps")),
                where=f"entry #{i}",
            )
        except ValueError as err:
            raise _corrupt(path, str(err)) from err
        if not isinstance(e.get("run_id"), str) or not isinstance(e.get("phase"), str):
            raise _corrupt(path, f"entry #{i} lacks a string run_id/phase")
        if not isinstance(e.get("round"), int) or isinstance(e.get("round"), bool):
            raise _corrupt(path, f"entry #{i} lacks an integer round")
        entries.append(
            {
                **e,
                "noise_multiplier": sigma,
                "sample_rate": q,
                "steps": steps,
                "epsilon_after": _dec_float(
                    e.get("epsilon_after"), path=path, field=f"entries[{i}].epsilon_after"
                ),
            }
        )
    return _State(site_id, delta, budget, changes, entries)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, flush, fsync, os.replace, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _check_budget(budget_epsilon: float) -> float:
    if isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, (int, float)):
        raise ValueError(
            f"budget_epsilon must be a number >= 0 or math.inf, got {budget_epsilon!r}"
        )
    if math.isnan(budget_epsilon) or budget_epsilon < 0:
        raise ValueError(f"budget_epsilon must be >= 0 or math.inf, got {budget_epsilon!r}")
    return float(budget_epsilon)


def _check_label(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


class PrivacyLedger:
    """Durable, lock-protected record of one site's DP spending. Build with `PrivacyLedger.open`.

    The file is the single source of truth: every method re-reads it, so several processes of
    the same site see each other's charges and the smallest budget any of them set.
    """

    def __init__(self, path: Path, *, site_id: str, delta: float) -> None:
        self._path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._site_id = site_id
        self._delta = delta

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path,
        *,
        budget_epsilon: float,
        delta: float,
        site_id: str,
        allow_budget_increase: bool = False,
    ) -> PrivacyLedger:
        """Open (creating if missing) the ledger at ``path`` for ``site_id``.

        A stored delta that differs raises `LedgerError` (epsilons at different deltas do not
        compare). A lower ``budget_epsilon`` than stored lowers it (recorded in the file). A
        higher one is refused with a warning, keeping the stored budget, unless
        ``allow_budget_increase=True`` (also recorded): a budget must never rise by accident,
        e.g. because a config file was reset to its default.
        """
        path = Path(path)
        budget = _check_budget(budget_epsilon)
        _check_label("site_id", site_id)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not path.parent.is_dir():
            raise ValueError(
                f"folder {path.parent} for the privacy ledger does not exist; create the site "
                "state directory first."
            )
        ledger = cls(path, site_id=site_id, delta=float(delta))
        with ledger._locked(exclusive=True):
            if not path.exists():
                state = _State(site_id, float(delta), budget, [], [])
                _write_atomic(path, state.to_json())
                return ledger
            state = ledger._read()
            new_budget = state.budget_epsilon
            if budget < state.budget_epsilon:
                new_budget, reason = budget, "lowered"
            elif budget > state.budget_epsilon:
                if allow_budget_increase:
                    new_budget, reason = budget, "raised (allow_budget_increase=True)"
                else:
                    warnings.warn(
                        f"privacy ledger {path}: requested budget {budget:g} is above the stored "
                        f"budget {state.budget_epsilon:g}; keeping {state.budget_epsilon:g}. "
                        "Pass allow_budget_increase=True to raise it deliberately.",
                        UserWarning,
                        stacklevel=2,
                    )
            if new_budget != state.budget_epsilon:
                change = {
                    "time": time.time(),
                    "from": state.budget_epsilon,
                    "to": new_budget,
                    "reason": reason,
                }
                state = _State(
                    state.site_id,
                    state.delta,
                    new_budget,
                    [*state.budget_changes, change],
                    state.entries,
                )
                _write_atomic(path, state.to_json())
        return ledger

    # -- file access ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> _State:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError as err:
            raise LedgerError(
                f"privacy ledger {self._path} has disappeared. Restore it from a backup; "
                "re-creating it would forget the epsilon this site has spent."
            ) from err
        except OSError as err:
            raise _corrupt(self._path, f"cannot be read ({err})") from err
        state = _parse(self._path, raw)
        if state.site_id != self._site_id:
            raise LedgerError(
                f"privacy ledger {self._path} belongs to site {state.site_id!r}, not "
                f"{self._site_id!r}: point this site at its own ledger file."
            )
        if state.delta != self._delta:
            raise LedgerError(
                f"privacy ledger {self._path} was kept at delta {state.delta:g}, but delta "
                f"{self._delta:g} was requested. Epsilons at different deltas cannot be "
                f"combined: use delta {state.delta:g} for this site."
            )
        return state

    def _snapshot(self) -> _State:
        with self._locked(exclusive=False):
            return self._read()

    # -- queries --------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def site_id(self) -> str:
        return self._site_id

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def budget_epsilon(self) -> float:
        """The budget in force (the file's, possibly lowered by another process)."""
        return self._snapshot().budget_epsilon

    @property
    def history(self) -> History:
        return self._snapshot().history

    def entries(self) -> list[dict[str, Any]]:
        """Copies of the recorded entries (run_id, phase, round, noise_multiplier, sample_rate,
        steps, epsilon_after, time), in charge order: e.g. to select what earlier runs spent."""
        return [dict(e) for e in self._snapshot().entries]

    def epsilon(self) -> float:
        """Epsilon spent so far, recomputed from every recorded entry."""
        return epsilon_of(self.history, self._delta)

    def remaining(self) -> float:
        """Budget minus spent, never below 0 (``math.inf`` for an infinite budget)."""
        state = self._snapshot()
        if math.isinf(state.budget_epsilon):
            return math.inf
        return max(0.0, state.budget_epsilon - epsilon_of(state.history, self._delta))

    def epsilon_if(self, entries: History) -> float:
        """Epsilon the site would have spent after also running ``entries`` (nothing written)."""
        return epsilon_of(self.history + validate_history(entries), self._delta)

    # -- the one write path ---------------------------------------------------------------------
    def charge(self, entries: History, *, run_id: str, phase: str, round: int) -> float:
        """Record ``entries`` before they run; return the epsilon after them.

        Raises `BudgetExceededError` (writing nothing) if that epsilon would exceed the budget.
        Otherwise the entries are appended and the file is durably replaced before returning.
        """
        new = validate_history(entries)
        _check_label("run_id", run_id)
        _check_label("phase", phase)
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        with self._locked(exclusive=True):
            state = self._read()
            history = state.history
            spent = epsilon_of(history, self._delta)
            after = epsilon_of(history + new, self._delta)
            budget = state.budget_epsilon
            if after > budget * (1.0 + _RELATIVE_TOLERANCE) and not (
                math.isinf(after) and math.isinf(budget)
            ):
                raise BudgetExceededError(
                    site_id=self._site_id, spent=spent, requested=after, budget=budget
                )
            now = time.time()
            records = []
            for k, (sigma, q, steps) in enumerate(new):
                last = k == len(new) - 1
                eps_k = after if last else epsilon_of(history + new[: k + 1], self._delta)
                records.append(
                    {
                        "run_id": run_id,
                        "phase": phase,
                        "round": round,
                        "noise_multiplier": sigma,
                        "sample_rate": q,
                        "steps": steps,
                        "epsilon_after": eps_k,
                        "time": now,
                    }
                )
            state = _State(
                state.site_id,
                state.delta,
                budget,
                state.budget_changes,
                [*state.entries, *records],
            )
            _write_atomic(self._path, state.to_json())
        return after

    # -- reporting ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Spending per (run, phase) in ledger order, for ``fedldm site budget``.

        RDP composition is not additive in epsilon, so a phase's ``epsilon_contribution`` is the
        sum, over its entries, of the rise in cumulative epsilon that entry caused; the
        contributions add up to the total. Everything is recomputed from the entries.
        """
        state = self._snapshot()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        prefix: History = []
        before = 0.0
        for e in state.entries:
            prefix.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
            after = epsilon_of(prefix, self._delta)
            # Once unbounded there is nothing more to lose (and inf - inf would be nan).
            rise = 0.0 if math.isinf(before) else after - before
            key = (e["run_id"], e["phase"])
            row = rows.setdefault(
                key,
                {
                    "run_id": e["run_id"],
                    "phase": e["phase"],
                    "rounds": [],
                    "steps": 0,
                    "epsilon_contribution": 0.0,
                    "epsilon_after": 0.0,
                },
            )
            if e["round"] not in row["rounds"]:
                row["rounds"].append(e["round"])
            row["steps"] += e["steps"]
            row["epsilon_contribution"] += rise
            row["epsilon_after"] = after
            before = after
        spent = before
        budget = state.budget_epsilon
        return {
            "site_id": state.site_id,
            "delta": state.delta,
            "budget_epsilon": budget,
            "epsilon": spent,
            "remaining": math.inf if math.isinf(budget) else max(0.0, budget - spent),
            "budget_changes": [dict(c) for c in state.budget_changes],
            "phases": list(rows.values()),
        }
