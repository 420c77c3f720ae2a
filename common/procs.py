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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["STOP_GRACE_S", "warn", "venv_bin", "flower_tool", "flower_env", "run_supervised",
           "Child", "run_supervised_group"]

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


@dataclass(frozen=True)
class Child:
    """One process of a `run_supervised_group`: `ready` (optional) is polled after starting it,
    and the next child starts only once it returns True; `umask` applies to the child only."""

    name: str
    cmd: Sequence[str]
    env: dict[str, str]
    ready: Callable[[], bool] | None = None
    umask: int = -1


def run_supervised_group(children: Sequence[Child], *, ready_timeout_s: float = 120.0) -> int:
    """Run several long-lived children that only make sense together (the SuperLink and its
    public proxy): start them in order, forward SIGINT/SIGTERM/SIGHUP to all, and when any of
    them exits, stop the others (SIGTERM, SIGKILL after STOP_GRACE_S).

    Returns, after a forwarded stop signal, the first child's exit status; otherwise that of the
    child that ended first (128 + N for a signal N), and 1 if it ended with 0, or if a child did
    not become ready within ready_timeout_s (the daemons are not meant to end on their own)."""
    procs: list[tuple[Child, subprocess.Popen[bytes]]] = []
    deadline: list[float] = []  # set once stopping: survivors are killed after it
    signalled: list[int] = []

    def stop_all(signum: int = signal.SIGTERM) -> None:
        for _, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signum)
        if signum != signal.SIGHUP and not deadline:
            deadline.append(time.monotonic() + STOP_GRACE_S)

    def forward(signum: int, _frame: Any) -> None:
        if signum != signal.SIGHUP:
            signalled.append(signum)
        stop_all(signum)

    def status(code: int) -> int:
        return 128 - code if code < 0 else code

    def ended() -> tuple[Child, int] | None:
        return next(((c, p.returncode) for c, p in procs if p.poll() is not None), None)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    first: tuple[Child, int] | None = None
    try:
        for child in children:
            if deadline:
                break
            procs.append((child, subprocess.Popen(list(child.cmd), env=child.env,
                                                  start_new_session=True, umask=child.umask)))
            give_up = time.monotonic() + ready_timeout_s
            while child.ready is not None and not deadline and not child.ready():
                first = ended()
                if first is None and time.monotonic() > give_up:
                    warn(f"{child.name} was not ready after {ready_timeout_s:.0f}s; stopping")
                    first = (child, 1)
                if first is not None:
                    break
                time.sleep(0.3)
            if first is not None:
                break
        while True:
            if first is None:
                first = ended()
                if first is not None and not signalled:
                    warn(f"{first[0].name} exited (status {status(first[1])}); stopping the "
                         "others")
            if first is not None and not deadline:
                stop_all()
            alive = [p for _, p in procs if p.poll() is None]
            if not alive:
                break
            if deadline and time.monotonic() > deadline[0]:
                for p in alive:
                    p.kill()
            time.sleep(0.3)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for _, p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if signalled and procs:
        return status(procs[0][1].returncode)
    if first is None:
        return 1
    return status(first[1]) or 1
