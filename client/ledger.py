"""The durable per-site privacy ledger: what this site has spent, over every run and phase.

Why a file and not the Opacus accountant in memory: the process that handles a message may
be a fresh one (a restarted site, Flower's process-per-message runtime), so an in-memory
accountant would restart at zero (the bug in Flower's Opacus example). The ledger is charged
BEFORE a round trains and is persisted before `charge` returns, so a crash between the charge
and the training over-counts, never under-counts.

A site enrols ONCE, on purpose, with `PrivacyLedger.create` (``fedldm site init``);
`PrivacyLedger.open` never creates a ledger. Why: a deleted state folder used to come back as a
fresh, empty ledger, i.e. a full budget again. A missing ledger now stops the site with
`LedgerMissingError`, which says how to restore it from backup (or enrol a new site).

File format (JSON, ``"format": 2``)::

    {"format": 2, "site_id": "...", "delta": 1e-05, "budget_epsilon": 8.0,
     "budget_changes": [{"time": ..., "from": ..., "to": ..., "reason": ...}],
     "entries": [{"run_id", "phase", "round", "noise_multiplier", "sample_rate", "steps",
                  "epsilon_after", "time", "prev_hash", "hash"}]}

plus the head file ``<ledger>.head``: ``{"format": 2, "entries": N, "last_hash": "..."}``.

Entries are append-only and hash-chained: ``hash`` is the sha256 (hex) of the canonical JSON
(sorted keys, no whitespace) of the entry without ``hash``; ``prev_hash`` is the previous entry's
``hash``, or for the first entry the sha256 of a genesis document naming the site and delta. An
edited, inserted or removed entry breaks the chain. Removing the LAST entries keeps a valid chain,
so the head file (rewritten after the ledger on every charge) records how many entries there are
and the last hash: a ledger shorter than its head, or whose hash at that index differs, was
truncated. The head may lag the ledger by the charge being written when a crash hit; it is never
ahead. This detects accidents and casual edits on the site; it cannot stop someone who rewrites
both files consistently, which is why the coordinator also refuses a site whose spend went down.
Format-1 files (no hashes, no head) are upgraded in place by `PrivacyLedger.open`.

Infinite values are stored as the string ``"inf"`` so the file stays strict JSON (``NaN`` and
``Infinity`` literals are refused). The epsilon is always recomputed from the entries
(``epsilon_after`` is informational), so a hand-edited ``epsilon_after`` cannot lower what the
site is charged.

Concurrency: every read-modify-write holds an exclusive ``fcntl.flock`` on the sidecar
``<ledger>.lock`` and re-reads the file inside the lock; reads hold a shared lock. flock is
advisory and per host: keep the ledger on a local disk (not NFS) and use it only via this class.
Writes go to a temp file that is fsynced, renamed over the ledger, and the folder fsynced, so a
crash leaves either the old or the new ledger, never a torn one. Ledger, head and lock files are
created with mode 0o600.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shlex
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import files, jsonio
from ldm_core.privacy import History, epsilon_of, validate_entry, validate_history

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)
FILE_MODE = 0o600
HEAD_SUFFIX = ".head"
LOCK_SUFFIX = ".lock"
# Relative slack on the budget check, only to absorb float rounding of the same computation.
_RELATIVE_TOLERANCE = 1e-9


class BudgetExceededError(RuntimeError):
    """A charge would take the site past its epsilon budget; nothing was recorded.

    ``str(err)`` is for the site's own log: it holds the spent and requested epsilons, which
    depend on the site's dataset size. Send only `public_reason` to the coordinator.
    """

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

    def public_reason(self) -> str:
        """The refusal without any number: spent/requested epsilon leak the dataset size."""
        return "privacy budget exhausted: the next round would exceed this site's budget"


class LedgerError(RuntimeError):
    """The ledger file is corrupt or belongs to another configuration; it was not modified."""


class LedgerMissingError(LedgerError):
    """No ledger at the path: never silently recreated, since that would reset the spend."""


def _enc(x: float) -> float | str:
    return jsonio.encode_float(x)


def _dec_float(value: Any, *, path: Path, field: str) -> float:
    number = jsonio.decode_float(value)
    if (isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number)
            or number == -math.inf):
        raise LedgerError(
            f"{path}: field {field!r} = {value!r} is not a number. The ledger is corrupt: restore "
            "it from a backup; do not delete it (that would reset the site's spent epsilon)."
        )
    return float(number)


# -- hash chain ---------------------------------------------------------------------------------
def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def genesis_hash(site_id: str, delta: float) -> str:
    """``prev_hash`` of the first entry: ties the chain to this site and delta."""
    return _sha256({"genesis": "fedldm privacy ledger", "site_id": site_id, "delta": delta})


def _stored(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as written to the file (infinite epsilon as "inf")."""
    return {**entry, "epsilon_after": _enc(entry["epsilon_after"])}


def _entry_hash(stored: dict[str, Any]) -> str:
    return _sha256({k: v for k, v in stored.items() if k != "hash"})


def _chain(entries: list[dict[str, Any]], prev: str) -> list[dict[str, Any]]:
    """``entries`` linked after the hash ``prev`` (for new entries and format-1 upgrades)."""
    chained = []
    for e in entries:
        linked = {k: v for k, v in e.items() if k != "hash"}
        linked["prev_hash"] = prev
        prev = _entry_hash(_stored(linked))
        chained.append({**linked, "hash": prev})
    return chained


def _verify_chain(path: Path, raw_entries: list[Any], genesis: str) -> None:
    """Check the chain on the entries exactly as stored (before any normalisation)."""
    prev = genesis
    for i, e in enumerate(raw_entries):
        if not isinstance(e, dict):
            raise _corrupt(path, f"entry #{i} is not an object")
        try:
            ok = e.get("prev_hash") == prev and e.get("hash") == _entry_hash(e)
        except (TypeError, ValueError):  # unhashable content, e.g. a NaN that slipped in
            ok = False
        if not ok:
            raise LedgerError(
                f"privacy ledger {path}: entry #{i} does not match the hash chain: the ledger "
                "was edited or corrupted (or an entry was removed or inserted); restore it and "
                f"its {HEAD_SUFFIX} file from backup. Never delete it to start over: that would "
                "forget the epsilon this site has already spent."
            )
        prev = e["hash"]


@dataclass(frozen=True)
class _State:
    format: int
    site_id: str
    delta: float
    budget_epsilon: float
    budget_changes: list[dict[str, Any]]
    entries: list[dict[str, Any]]  # normalised, each with prev_hash and hash

    @property
    def history(self) -> History:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    @property
    def last_hash(self) -> str:
        return self.entries[-1]["hash"] if self.entries else genesis_hash(self.site_id, self.delta)

    def with_changes(
        self,
        *,
        budget_epsilon: float | None = None,
        budget_changes: list[dict[str, Any]] | None = None,
        entries: list[dict[str, Any]] | None = None,
    ) -> _State:
        return _State(
            FORMAT_VERSION,
            self.site_id,
            self.delta,
            self.budget_epsilon if budget_epsilon is None else budget_epsilon,
            self.budget_changes if budget_changes is None else budget_changes,
            self.entries if entries is None else entries,
        )

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_VERSION,
            "site_id": self.site_id,
            "delta": self.delta,
            "budget_epsilon": _enc(self.budget_epsilon),
            "budget_changes": [
                {**c, "from": _enc(c["from"]), "to": _enc(c["to"])} for c in self.budget_changes
            ],
            "entries": [_stored(e) for e in self.entries],
        }
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def head_json(self) -> str:
        doc = {"format": FORMAT_VERSION, "entries": len(self.entries), "last_hash": self.last_hash}
        return json.dumps(doc, sort_keys=True) + "\n"


def _corrupt(path: Path, what: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} is unreadable: {what}. It was left untouched. Restore it from a "
        "backup (or fix it by hand); never delete it to start over, since that would forget "
        "the epsilon this site has already spent."
    )


def _strict_json(path: Path, raw: bytes) -> Any:
    """Parse strict JSON: NaN/Infinity literals are corruption (e.g. ``"steps": NaN``)."""

    def refuse(constant: str) -> Any:
        raise _corrupt(path, f"non-standard JSON constant {constant} (not a number)")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"not valid JSON ({err})") from err


def _parse_entry(path: Path, i: int, e: Any) -> dict[str, Any]:
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
    return {
        **e,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": steps,
        "epsilon_after": _dec_float(
            e.get("epsilon_after"), path=path, field=f"entries[{i}].epsilon_after"
        ),
    }


def _parse_change(path: Path, c: Any) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise _corrupt(path, f"budget change {c!r} is not an object")
    return {
        **c,
        "from": _dec_float(c.get("from"), path=path, field="budget_changes.from"),
        "to": _dec_float(c.get("to"), path=path, field="budget_changes.to"),
    }


def _parse(path: Path, raw: bytes) -> _State:
    doc = _strict_json(path, raw)
    if not isinstance(doc, dict):
        raise _corrupt(path, "top level is not a JSON object")
    fmt = doc.get("format")
    if fmt not in _READABLE_FORMATS or isinstance(fmt, bool):
        raise _corrupt(
            path, f"format {fmt!r} is not one of {_READABLE_FORMATS} (wrong fedldm version?)"
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
    genesis = genesis_hash(site_id, delta)
    if fmt == 2:
        _verify_chain(path, entries_raw, genesis)
    entries = [_parse_entry(path, i, e) for i, e in enumerate(entries_raw)]
    if fmt == 1:
        entries = _chain(entries, genesis)
    changes = [_parse_change(path, c) for c in changes_raw]
    return _State(fmt, site_id, delta, budget, changes, entries)


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _check_head(path: Path, state: _State) -> None:
    """The head says how many entries the ledger had; fewer now means truncation."""
    head = _head_path(path)
    if state.format == 1:
        if head.exists():
            raise LedgerError(
                f"privacy ledger {path} is in the old format 1 but {head} exists, so it was "
                "written by a newer fedldm: the ledger was replaced by an old copy. Restore "
                "both files from the same backup."
            )
        return
    try:
        doc = _strict_json(head, head.read_bytes())
    except FileNotFoundError as err:
        if not state.entries:
            # A crash between `create`'s two writes (the ledger, then its head): nothing was
            # ever charged, so there is nothing a truncation could have removed, and accepting
            # it is no weaker than deleting both files and enrolling again. The next charge
            # writes the head.
            return
        raise LedgerError(
            f"privacy ledger {path} exists but its head file {head} is missing, so truncation "
            "cannot be ruled out. Restore both files from the same backup (they are written "
            "together and must be restored together)."
        ) from err
    count = doc.get("entries") if isinstance(doc, dict) else None
    last = doc.get("last_hash") if isinstance(doc, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(
        last, str
    ):
        raise _corrupt(head, "not a ledger head (needs an integer 'entries' and 'last_hash')")
    if count > len(state.entries):
        raise LedgerError(
            f"privacy ledger {path} holds {len(state.entries)} entries but {head} records "
            f"{count}: the ledger was truncated (spent epsilon removed). Restore both files "
            "from backup."
        )
    expected = state.entries[count - 1]["hash"] if count else genesis_hash(
        state.site_id, state.delta
    )
    if last != expected:
        raise LedgerError(
            f"privacy ledger {path}: {head} records a last hash for entry #{count - 1} that is "
            "not in the ledger's chain: the ledger was truncated or replaced. Restore both "
            "files from the same backup."
        )


# -- durable writes -----------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    """common.files.write_text_atomic at 0o600: a crash leaves the old or the new ledger."""
    files.write_text_atomic(path, text, mode=FILE_MODE)


def _write_state(path: Path, state: _State, *, head: bool) -> None:
    """Ledger first, then (if entries changed) the head: a crash between leaves a head that
    lags by one charge, which reads accept; a head ahead of the ledger would mean truncation."""
    _write_atomic(path, state.to_json())
    if head:
        _write_atomic(_head_path(path), state.head_json())


# -- argument checks ----------------------------------------------------------------------------
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


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _missing_message(path: Path, *, site_id: str, budget: float | None, delta: float) -> str:
    epsilon = "E" if budget is None else f"{budget:g}"
    init = (
        f"fedldm site init --state-dir {shlex.quote(str(path.parent))} --site-id "
        f"{shlex.quote(site_id)} --epsilon {epsilon} --delta {delta:g}"
    )
    return (
        f"privacy ledger {path} does not exist, and it is never created implicitly. If this "
        f"site has never trained, enrol it once, on purpose: `{init}`. If the file or its "
        f"folder was deleted or lost, restore {path} and {_head_path(path).name} from backup "
        "instead: re-initialising would forget the epsilon this site has already spent, and "
        "the coordinator will refuse a site whose recorded spend went down."
    )


class PrivacyLedger:
    """Durable, lock-protected record of one site's DP spending.

    Enrol a site once with `PrivacyLedger.create`; afterwards use `PrivacyLedger.open`. The
    file is the single source of truth: every method re-reads it (under the lock), so several
    processes of the same site see each other's charges and the smallest budget any of them set.
    """

    def __init__(self, path: Path, *, site_id: str, delta: float) -> None:
        self._path = path
        self._lock_path = path.with_name(path.name + LOCK_SUFFIX)
        self._head_path = _head_path(path)
        self._site_id = site_id
        self._delta = delta

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: Path, *, budget_epsilon: float, delta: float, site_id: str
    ) -> PrivacyLedger:
        """Enrol a site: write an empty ledger (and its head) at ``path``, mode 0o600.

        Raises `LedgerError` if the ledger or its head already exists: a second enrolment
        must never replace a ledger that may hold spent epsilon.
        """
        path = Path(path)
        budget = _check_budget(budget_epsilon)
        _check_label("site_id", site_id)
        delta_f = _check_delta(delta)
        if not path.parent.is_dir():
            raise ValueError(
                f"folder {path.parent} for the privacy ledger does not exist; create the site "
                "state directory first (`fedldm site init` does)."
            )
        ledger = cls(path, site_id=site_id, delta=delta_f)
        with ledger._locked(exclusive=True):
            existing = [p for p in (path, ledger._head_path) if p.exists()]
            if existing:
                raise LedgerError(
                    f"{existing[0]} already exists: this site is already enrolled, and "
                    "re-creating its ledger would forget the epsilon it has spent. Use the "
                    "existing ledger (`fedldm site budget` shows it)."
                )
            state = _State(FORMAT_VERSION, site_id, delta_f, budget, [], [])
            _write_state(path, state, head=True)
        return ledger

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
        """Open the existing ledger at ``path`` for ``site_id``; never creates one.

        A missing ledger raises `LedgerMissingError`. A format-1 ledger is upgraded in place to
        format 2. A stored delta that differs raises `LedgerError` (epsilons at different deltas
        do not compare). A lower ``budget_epsilon`` than stored lowers it (recorded in the
        file). A higher one is refused with a warning, keeping the stored budget, unless
        ``allow_budget_increase=True`` (also recorded): a budget must never rise by accident,
        e.g. because a config file was reset to its default.
        """
        path = Path(path)
        budget = _check_budget(budget_epsilon)
        _check_label("site_id", site_id)
        delta_f = _check_delta(delta)
        if not path.is_file():  # checked before locking, so that nothing at all is created
            raise LedgerMissingError(
                _missing_message(path, site_id=site_id, budget=budget, delta=delta_f)
            )
        ledger = cls(path, site_id=site_id, delta=delta_f)
        with ledger._locked(exclusive=True):
            state = ledger._read()
            if state.format != FORMAT_VERSION:
                state = state.with_changes()
                _write_state(path, state, head=True)
            new_budget, reason = ledger._negotiate_budget(state.budget_epsilon, budget,
                                                          allow_budget_increase)
            if new_budget != state.budget_epsilon:
                change = {
                    "time": time.time(),
                    "from": state.budget_epsilon,
                    "to": new_budget,
                    "reason": reason,
                }
                state = state.with_changes(
                    budget_epsilon=new_budget, budget_changes=[*state.budget_changes, change]
                )
                _write_state(path, state, head=False)
        return ledger

    def _negotiate_budget(
        self, stored: float, requested: float, allow_increase: bool
    ) -> tuple[float, str]:
        if requested < stored:
            return requested, "lowered"
        if requested > stored:
            if allow_increase:
                return requested, "raised (allow_budget_increase=True)"
            warnings.warn(
                f"privacy ledger {self._path}: requested budget {requested:g} is above the "
                f"stored budget {stored:g}; keeping {stored:g}. Pass allow_budget_increase=True "
                "to raise it deliberately.",
                UserWarning,
                stacklevel=3,
            )
        return stored, ""

    # -- file access ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read(self) -> _State:
        """Parse and verify (chain, head, site, delta); call only while holding the lock."""
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError as err:
            raise LedgerMissingError(
                _missing_message(self._path, site_id=self._site_id, budget=None,
                                 delta=self._delta)
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
        _check_head(self._path, state)
        return state

    def _snapshot(self) -> _State:
        """A consistent read: the shared lock keeps a writer from replacing the ledger and its
        head between our two reads."""
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
        steps, epsilon_after, time, prev_hash, hash), in charge order: e.g. to select what
        earlier runs spent."""
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
            chained = _chain(records, state.last_hash)
            _write_state(self._path, state.with_changes(entries=[*state.entries, *chained]),
                         head=True)
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
            "entries": len(state.entries),
            "budget_changes": [dict(c) for c in state.budget_changes],
            "phases": list(rows.values()),
        }
