"""Long-lived Flower child processes (flower-supernode, flower-superlink) and their environment.

Both roles run the same way: `fedldm site start` supervises a SuperNode, `fedldm coordinator
start` a SuperLink. Signals are forwarded to the child, which runs in its own session so that a
Ctrl-C reaches it once (forwarded by us) rather than twice; a child that ignores a forwarded stop
for STOP_GRACE_S seconds is killed. Standard library only; imports neither client nor server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["STOP_GRACE_S", "warn", "venv_bin", "flower_tool", "flower_env", "run_supervised"]

# After forwarding SIGINT/SIGTERM, how long the child may take before it is killed.
STOP_GRACE_S = 30.0


def warn(msg: str) -> None:
    """One warning line on stderr (`fedldm: warning: ...`)."""
    print(f"fedldm: warning: {msg}", file=sys.stderr, flush=True)


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (flower-supernode, flwr, ...)."""
    return Path(sys.executable).parent


def flower_tool(name: str) -> str:
    """Path of a Flower console script next to this Python, else the name (found on PATH)."""
    candidate = venv_bin() / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path | None) -> dict[str, str]:
    """Environment for Flower child processes.

    Flower starts `flower-superexec`, `flwr-clientapp` and `flwr-serverapp` by name, so this
    interpreter's bin folder goes first on PATH (otherwise another installation could answer).
    FLWR_HOME keeps Flower's installed apps and config under the role's state directory.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    if flwr_home is not None and "FLWR_HOME" not in os.environ:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_supervised(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run a long-lived child, forwarding SIGINT/SIGTERM/SIGHUP; return its exit status
    (128 + N when a signal N ended it, as a shell reports it)."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    stop_deadline: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)
            if signum != signal.SIGHUP and not stop_deadline:
                stop_deadline.append(time.monotonic() + STOP_GRACE_S)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_deadline and time.monotonic() > stop_deadline[0]:
                    proc.kill()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code
