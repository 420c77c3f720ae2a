"""Child processes for the deployment tests: started with logs, always stopped with their tree.

Why a process tree and not a process group: Flower starts `flower-superexec` in a new session
(so killing our child's group would miss it), and its ServerApp/ClientApp processes below it.
We collect every descendant by parent pid just before stopping, then SIGTERM the root (the
fedldm wrappers forward it) and SIGKILL whatever of that tree is still alive afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fedldm_cmd() -> list[str]:
    """The installed console script when present (what users run), else the module."""
    script = Path(sys.executable).parent / "fedldm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FLWR_HOME", None)  # each role keeps Flower's files in its own state dir
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, to recognise it again; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def fedldm_inprocess(*argv: str) -> tuple[int, str, str]:
    """`fedldm ARGV` in this process (short commands: no interpreter start-up to pay)."""
    from cli import main as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def descendants(root: int) -> list[int]:
    """Pids of every live process below `root`."""
    return list(_descendants(root))


def _descendants(root: int) -> dict[int, str | None]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str | None] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            if c not in out:
                out[c] = _start_time(c)
                todo.append(c)
    return out


class Proc:
    """One started command, its log file, and a stop() that leaves nothing behind."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(list(cmd), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env(), cwd=REPO, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 15.0) -> None:
        tree = _descendants(self.proc.pid)
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        for pid, started in tree.items():
            while started is not None and _start_time(pid) == started:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)
        self._log.close()


def wait_for_port(port: int, proc: Proc, timeout: float) -> None:
    """Until something accepts TCP on 127.0.0.1:port; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} did not listen on 127.0.0.1:{port} in {timeout}s:\n"
                       f"{proc.tail()}")


# ---------------------------------------------------------------------------------------------
# crash injection (tests/deploy/test_kills_deploy.py)


def cmdline(pid: int) -> list[str]:
    """The argv of a live process ([] if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_below(root: int, needle: str) -> list[int]:
    """Pids below `root` whose command line has an argument ending with `needle` (a console
    script such as `flwr-serverapp`, whatever interpreter runs it, or a module run with
    `python -m`)."""
    return [pid for pid in descendants(root)
            if any(Path(a).name == needle for a in cmdline(pid)[:3])]


def kill_tree(root: int) -> list[int]:
    """SIGKILL `root` and every process below it, as a crash would: no signal handler runs,
    nothing is flushed. The tree is frozen first (SIGSTOP, repeated until no new child shows
    up) so that no process can start another between the scan and the kill. Returns the pids
    killed."""
    frozen: dict[int, str | None] = {}
    todo: dict[int, str | None] = {root: _start_time(root)}
    while todo:
        for pid, started in todo.items():
            if started is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        frozen.update(todo)
        todo = {}
        for pid in list(frozen):
            for child, started in _descendants(pid).items():
                if child not in frozen:
                    todo[child] = started
    killed = []
    for pid, started in frozen.items():
        if started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """Pids of `pids` still alive (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _start_time(p) is not None]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _start_time(p) is not None]
    return alive
