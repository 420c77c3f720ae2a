"""Replies a site has sent, kept so that a retried request is answered without a new release.

Why: a coordinator that crashed, or a network that dropped a reply, re-sends the same round. If
the site trained again it would release a second DP output of the same round (and charge it
again), so a crash could burn the budget and leave the run unfinishable. Instead the site stores
each reply durably *before* sending it, keyed by (run, request kind, round), and a retry gets the
stored reply back: no new training, no new release, no new charge.

Storage: `STATE/replies/<run>/<kind>-<round>/` holds one `<record>.safetensors` per ArrayRecord
and `records.json` for the metric and config records (tensors and JSON only: nothing is ever
unpickled). The folder is written under a temporary name, fsynced and renamed, so a crash leaves
either the whole reply or none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check(name: str, what: str) -> str:
    if not _SAFE.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a safe folder name (letters, digits, . _ -)")
    return name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReplyStore:
    """Durable replies of one site, under its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "replies"

    def folder(self, run: str, kind: str, rnd: int) -> Path:
        return self.root / _check(run, "run name") / f"{_check(kind, 'request kind')}-{int(rnd)}"

    def load(self, run: str, kind: str, rnd: int) -> RecordDict | None:
        """The stored reply, or None if this request was never answered."""
        folder = self.folder(run, kind, rnd)
        if not (folder / "records.json").exists():
            return None
        doc = json.loads((folder / "records.json").read_text())
        records: dict[str, object] = {}
        for name, spec in doc.items():
            if spec["type"] == "arrays":
                tensors = load_file(str(folder / f"{_check(name, 'record')}.safetensors"))
                records[name] = ArrayRecord({k: tensors[k] for k in spec["keys"]})
            elif spec["type"] == "metrics":
                records[name] = MetricRecord(spec["values"])
            else:
                records[name] = ConfigRecord(spec["values"])
        return RecordDict(records)

    def save(self, run: str, kind: str, rnd: int, reply: RecordDict) -> None:
        """Store `reply` atomically (temp folder, fsync, rename) before it is sent."""
        final = self.folder(run, kind, rnd)
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        doc: dict[str, dict[str, object]] = {}
        for name, rec in reply.items():
            _check(name, "record")
            if isinstance(rec, ArrayRecord):
                state = rec.to_torch_state_dict()
                path = tmp / f"{name}.safetensors"
                save_file({k: v.contiguous() for k, v in state.items()}, str(path))
                _fsync(path)
                doc[name] = {"type": "arrays", "keys": list(state)}
            elif isinstance(rec, MetricRecord):
                doc[name] = {"type": "metrics", "values": dict(rec.items())}
            elif isinstance(rec, ConfigRecord):
                doc[name] = {"type": "config", "values": dict(rec.items())}
            else:
                raise TypeError(f"cannot store a {type(rec).__name__} record")
        with open(tmp / "records.json", "w", encoding="utf-8") as f:
            json.dump(doc, f)  # inf budgets of non-private runs stay readable
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
