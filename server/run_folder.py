"""The run folder: where a coordinator's run leaves everything, crash-safe.

:class:`Run` owns the folder: every path in it is a property here and nowhere else, run.json is
read and written through one typed :class:`RunInfo`, and the final generator is loaded once
(:meth:`Run.load_final`) and handed on to samples, synthetic export, evaluation and audits, so
a `fedldm evaluate` does not read the final checkpoint three times.

metrics.json is rewritten atomically after every round, so a crash loses at most the round in
flight; checkpoints are atomic folders (ldm_core.checkpoint) and `state.json` says which one to
resume from.

Layout::

    run.json              RunInfo (simulation only: how to rebuild the sites)
    run.log               readable coordinator log
    checkpoints/          atomic checkpoint folders; state.json = which one to resume from
    checkpoints/final     the final generator
    samples.png           class-conditional sample grid
    synthetic/            exported synthetic set (+ manifest.csv, DATACARD.md)
    ledgers/              copies of the simulated sites' ledgers
    sites/                the simulated sites' state folders
    report.html           the run report
    metrics.json          everything measured (server.run_metrics)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import files
from ldm_core.checkpoint import load_checkpoint
from ldm_core.config import RunConfig
from ldm_core.logs import file_logger
from ldm_core.models import make_autoencoder, make_denoiser

__all__ = ["FinalModel", "Run", "RunFolder", "RunInfo", "read_json", "write_json_atomic"]


def write_json_atomic(path: Path, data: Any) -> None:
    """metrics.json, state.json, run.json: strict JSON ("inf" strings), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(path, data)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise  # a missing file is the caller's case to handle, not a corrupt one
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}); restore it from a backup or start a "
                           "new run folder") from e


def json_float(x: Any) -> float:
    """A float written by :func:`write_json_atomic` ("inf" / "-inf" / "nan" strings included)."""
    return float(x)


@dataclass(frozen=True)
class RunInfo:
    """run.json: what `fedldm evaluate RUN` needs to rebuild a simulated run's sites.

    `config` stays the plain ``to_dict(cfg)`` mapping (as the checkpoints store it), so the
    file is byte-for-byte what earlier versions wrote.
    """

    config: dict[str, Any]
    data: str
    partition: str
    sites: int
    mode: str
    has_patient_ids: bool = True
    patient_note: str | None = None
    privacy_randomness: str | None = None
    command: str = "fedldm simulate"
    accept: str | None = None  # acceptance criteria declared before training (--accept)
    # The sites' split rule (ldm_core.data.SPLIT_SCHEME); None in runs made before it was kept.
    split: str | None = None

    @property
    def is_simulation(self) -> bool:
        return self.mode == "simulation"

    @property
    def epsilon(self) -> float:
        return json_float(self.config["privacy"]["epsilon"])

    @property
    def delta(self) -> float:
        return float(self.config["privacy"]["delta"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def device(self) -> str:
        return str(self.config["device"])

    def meta(self) -> dict[str, Any]:
        """The run-describing values the coordinator copies into metrics.json's `meta`."""
        out = {"data": self.data, "partition": self.partition, "sites": self.sites,
               "has_patient_ids": self.has_patient_ids, "mode": self.mode,
               "patient_note": self.patient_note,
               "privacy_randomness": self.privacy_randomness}
        if self.accept:
            out["accept"] = self.accept
        if self.split:
            out["split"] = self.split
        return out

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, **self.meta(), "command": self.command}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunInfo:
        return cls(config=dict(d["config"]), data=str(d["data"]), partition=str(d["partition"]),
                   sites=int(d["sites"]), mode=str(d.get("mode", "")),
                   has_patient_ids=bool(d.get("has_patient_ids", True)),
                   patient_note=d.get("patient_note"),
                   privacy_randomness=d.get("privacy_randomness"),
                   command=str(d.get("command", "fedldm simulate")),
                   accept=d.get("accept") or None, split=d.get("split") or None)


@dataclass(frozen=True)
class FinalModel:
    """The final global generator of a finished run, loaded once and passed to every consumer."""

    cfg: RunConfig
    ae: torch.nn.Module
    dm: torch.nn.Module
    scale_factor: float


def load_final_model(path: Path) -> FinalModel:
    """Read a final checkpoint folder into eval-mode models."""
    tensors, meta = load_checkpoint(path)
    cfg = RunConfig.from_dict(meta["config"])
    ae, dm = make_autoencoder(cfg.model), make_denoiser(cfg.model)
    ae.load_state_dict(tensors["autoencoder"])
    dm.load_state_dict(tensors["denoiser"])
    return FinalModel(cfg, ae.eval(), dm.eval(), float(meta["scale_factor"]))


class Run:
    """One run folder: its paths, its typed files and its final model (loaded at most once)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._final: FinalModel | None = None

    # ------------------------------------------------------------------ paths
    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state_path(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / "final"

    @property
    def samples_png(self) -> Path:
        return self.root / "samples.png"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def datacard(self) -> Path:
        return self.synthetic / "DATACARD.md"

    @property
    def ledgers(self) -> Path:
        return self.root / "ledgers"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    def ledger_copy(self, index: int) -> Path:
        """RUN/ledgers/site-K.json: the copy of simulated site K's ledger."""
        return self.ledgers / f"site-{index}.json"

    # ------------------------------------------------------------------ files
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

    def load_info(self) -> RunInfo | None:
        """run.json, or None when there is none (deployed runs write no run.json)."""
        return RunInfo.from_json(read_json(self.info_path)) if self.info_path.exists() else None

    def save_info(self, info: RunInfo) -> None:
        write_json_atomic(self.info_path, info.to_json())

    def logger(self) -> logging.Logger:
        """`run.log`: the readable log of the coordinator side."""
        return file_logger(self.log_path)

    # ------------------------------------------------------------------ final model
    def has_final(self) -> bool:
        return self.final_checkpoint.exists()

    def load_final(self) -> FinalModel:
        """The final generator; read from disk on the first call only (it is the slow part of
        starting an evaluation and every later step needs the same weights)."""
        if self._final is None:
            self._final = load_final_model(self.final_checkpoint)
        return self._final


# The name server.federation (and older callers) use: same class.
RunFolder = Run
