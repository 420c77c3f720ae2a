"""The run folder: where a coordinator's run leaves everything, crash-safe.

metrics.json is rewritten atomically after every round, so a crash loses at most the round in
flight; checkpoints are atomic folders (ldm_core.checkpoint) and `state.json` says which one to
resume from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ldm_core.logs import file_logger


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    """JSON has no inf/nan: write them as strings so every reader can parse the file."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise  # a missing file is the caller's case to handle, not a corrupt one
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}); restore it from a backup or start a "
                           "new run folder") from e


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state_path(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def ledgers(self) -> Path:
        return self.root / "ledgers"

    def create(self) -> None:
        for p in (self.root, self.checkpoints, self.ledgers):
            p.mkdir(parents=True, exist_ok=True)

    def load_state(self) -> dict[str, Any] | None:
        return read_json(self.state_path) if self.state_path.exists() else None

    def save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, state)

    def load_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_path) if self.metrics_path.exists() else {}

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.metrics_path, metrics)

    def logger(self) -> logging.Logger:
        """`run.log`: the readable log of the coordinator side."""
        return file_logger(self.root / "run.log")
