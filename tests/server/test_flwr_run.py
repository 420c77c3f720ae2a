"""`flwr run .` (the way Flower users start an app) simulates a federation into a run folder.

Flower's own runtime drives the same ServerApp and ClientApp as `fedldm simulate`: a managed local
SuperLink in simulation mode, with runtime dependency installation off (this venv already holds
everything; Flower would otherwise build a second environment with its own torch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_local_superlink(flwr_home: Path) -> None:
    """The managed SuperLink outlives `flwr run` (detached): stop ours by its FLWR_HOME path."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            os.kill(int(proc.name), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_simulates_into_the_same_run_folder(tmp_path: Path) -> None:
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists() or shutil.which("flower-superlink", path=str(flwr.parent)) is None:
        pytest.skip("flwr / flower-superlink are not installed next to this interpreter")
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_config = (f"data='demo' preset='tiny' image-size=16 num-sites=2 demo-patients=60 "
                  f"demo-slices=2 out='{out}'")
    try:
        proc = subprocess.run([str(flwr), "run", ".", "--federation-config",
                               "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2",
                               "--run-config", run_config, "--stream"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        _stop_local_superlink(home)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (out / "report.html").is_file(), log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["phase"] for r in metrics["rounds"]] == ["autoencoder", "diffusion"]
    assert set(metrics["privacy"]["sites"]) == {"site-0", "site-1"}
    info = json.loads((out / "run.json").read_text())
    assert info["mode"] == "simulation" and info["sites"] == 2
    for k in (0, 1):
        phases = {e["phase"] for e in json.loads(
            (out / "sites" / f"site-{k}" / "ledger.json").read_text())["entries"]}
        assert {"autoencoder", "latent-scale", "diffusion", "audit"} <= phases
