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
import threading
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


def _run_once(cmd: Sequence[str], env: dict[str, str], marker: str | None
              ) -> tuple[int, bool, bool]:
    """One run of the child: (exit status, whether `marker` appeared in its output, whether we
    forwarded a stop signal). With a marker the child's output is copied line by line to ours
    (stdout), so the user sees the same log while we can read it."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True,
                            stdout=subprocess.PIPE if marker else None,
                            stderr=subprocess.STDOUT if marker else None,
                            text=True if marker else None, bufsize=1 if marker else -1)
    stop_deadline: list[float] = []
    seen: list[bool] = []

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if marker and marker in line:
                seen.append(True)

    reader = threading.Thread(target=copy, daemon=True) if marker else None
    if reader is not None:
        reader.start()

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
    if reader is not None:
        reader.join(timeout=5.0)
    return (128 - code if code < 0 else code), bool(seen), bool(stop_deadline)


def run_supervised(cmd: Sequence[str], env: dict[str, str], *, retry_marker: str | None = None,
                   retry_every_s: float = 15.0, retry_for_s: float = 75.0,
                   retry_hint: str = "") -> int:
    """Run a long-lived child, forwarding SIGINT/SIGTERM/SIGHUP; return its exit status
    (128 + N when a signal N ended it, as a shell reports it).

    `retry_marker`: when the child fails and its output contained this text, start it again
    every `retry_every_s` seconds for up to `retry_for_s` seconds from the first start. Why: a
    SuperNode restarted soon after a crash is refused ("Failed to activate SuperNode") while the
    SuperLink still counts its previous session as online (until two missed heartbeats, 60 s by
    default); waiting it out is the fix, and a site daemon should not need a person for that.
    The same refusal also means "this key is not registered", which no wait cures, hence the
    short default window (75 s covers the 60 s expiry) and `retry_hint` in the last message.
    """
    started = time.monotonic()
    while True:
        code, seen, stopped = _run_once(cmd, env, retry_marker)
        if code == 0 or not seen or stopped:
            return code
        if time.monotonic() - started + retry_every_s > retry_for_s:
            warn(f"{retry_marker!r} for {retry_for_s:g} s: giving up. {retry_hint}".strip())
            return code
        warn(f"{retry_marker!r}: the SuperLink may still hold this site's previous session (it "
             f"expires after two missed heartbeats); retrying in {retry_every_s:g} s (for up to "
             f"{retry_for_s:g} s)")
        time.sleep(retry_every_s)


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
