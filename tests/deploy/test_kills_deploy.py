"""A real deployment (SuperLink + SuperNodes as processes, TLS + node auth) survives SIGKILLs.

Set up like tests/deploy/test_e2e.py: certificates from deploy/certs/generate.sh, demo data,
`fedldm coordinator start`, two registered sites started with `fedldm site start`, and runs
through the `fedldm coordinator run` console script. Then two crashes, as a power cut or the
OOM killer would cause them (SIGKILL: no handler runs, nothing is flushed):

1. site-b's SuperNode (with the site worker that trains) is killed while it trains an autoencoder
   round, and started again with the identical command. The coordinator re-sends the round to
   the silent site after --round-timeout; the run must complete.
2. The coordinator's ServerApp (`flwr-serverapp`, below the SuperLink's `flower-superexec`) is
   killed after the first checkpoint: `fedldm coordinator run` must report the failure, and the
   same command with the same --out must resume the run and complete it.

Afterwards the privacy bookkeeping must still be right: each site's ledger verifies (hash chain)
and stays within its budget, every round is in metrics.json exactly once, every round of every
run was charged and its reply stored at the site (that is what answers a retried round).

The site is restarted the way its supervisor would do it (deploy/compose.yml: `restart:
unless-stopped`): whenever `fedldm site start` exits while the run goes on, it is started again
with the identical command after a short pause. Every such restart is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli import main as cli
from client.ledger import PrivacyLedger
from tests.deploy.procs import (
    REPO,
    Proc,
    cmdline,
    descendants,
    fedldm_cmd,
    fedldm_inprocess,
    find_below,
    free_port,
    kill_tree,
    wait_for_port,
    wait_gone,
)

pytestmark = [
    pytest.mark.slow,
    # About 9 minutes on 2 cores (Flower counts a killed node online for up to 60 s, twice):
    # too long for every CI run, so it runs on request.
    pytest.mark.skipif(not os.environ.get("FEDLDM_DEPLOY_KILLS"),
                       reason="set FEDLDM_DEPLOY_KILLS=1 to run the deployment SIGKILL test "
                       "(about 9 minutes on 2 cores)"),
    pytest.mark.skipif(shutil.which("openssl") is None,
                       reason="openssl is not installed: deploy/certs/generate.sh needs it to "
                       "make the CA and the SuperLink's TLS certificate"),
]

GENERATE = REPO / "deploy" / "certs" / "generate.sh"
SITES = ("site-a", "site-b")
BUDGET, DELTA = 8.0, 1e-5
AE_ROUNDS, DM_ROUNDS = 2, 1
ROUNDS = {("autoencoder", r) for r in range(1, AE_ROUNDS + 1)} | \
    {("diffusion", r) for r in range(1, DM_ROUNDS + 1)}
RUN_TIMEOUT_S = 420
# A ClientApp process needs 15-40 s to answer a message on a loaded 2-core machine (start-up,
# imports, then the round): with 20 s most rounds were re-sent to sites that were merely slow.
ROUND_TIMEOUT_S = 45
RESTART_PAUSE_S = 2.0  # "wait a moment" before the site is started again


@dataclass
class Deployment:
    root: Path
    port: int
    local_port: int
    certs: Path
    data: dict[str, Path] = field(default_factory=dict)
    site_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    kills: list[str] = field(default_factory=list)  # one line per process SIGKILLed
    crashes: int = 0
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def connection(self) -> list[str]:
        return ["--superlink", f"127.0.0.1:{self.local_port}", "--certs", str(self.certs)]

    def state(self, site: str) -> Path:
        return self.root / "state" / site

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def site_cmd(self, site: str) -> list[str]:
        """`fedldm site start` for `site`: the same command every time it is (re)started."""
        return [*fedldm_cmd(), "site", "start", "--superlink", f"127.0.0.1:{self.port}",
                "--data", str(self.data[site]), "--state-dir", str(self.state(site)),
                "--site-id", site, "--root-certificates", str(self.certs / "ca.crt"),
                "--auth-key", str(self.certs / "sites" / site / "auth.key"),
                "--epsilon", str(BUDGET), "--delta", str(DELTA),
                "--port", str(self.site_ports[site])]

    def run_cmd(self, name: str, *extra: str) -> list[str]:
        return [*fedldm_cmd(), "coordinator", "run", *self.connection(),
                "--out", str(self.run_dir(name)), "--preset", "tiny",
                "--set", f"autoencoder.rounds={AE_ROUNDS}",
                "--set", f"diffusion.rounds={DM_ROUNDS}", "--min-sites", "2",
                "--round-timeout", str(ROUND_TIMEOUT_S), "--round-retries", "3",
                "--wait-for-sites", "120", "--timeout", str(RUN_TIMEOUT_S), *extra]

    def start(self, name: str, cmd: list[str]) -> Proc:
        """Start `cmd`; its log is logs/NAME.log, or NAME-2.log... when NAME ran before."""
        n = sum(1 for k in self.procs if k == name or k.startswith(f"{name}#"))
        key = name if n == 0 else f"{name}#{n + 1}"
        proc = Proc(key.replace("#", "-"), cmd, self.root / "logs")
        self.procs[key] = proc
        return proc

    def logs(self, lines: int = 20) -> str:
        return "\n".join(f"--- {n}\n{p.tail(lines)}" for n, p in self.procs.items())


def _elapsed(dep: Deployment) -> str:
    return f"t+{time.monotonic() - dep.started:.0f}s"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("kills")
    (root / "logs").mkdir()
    certs = root / "certs"
    subprocess.run(["bash", str(GENERATE), "--out", str(certs), "--sites", ",".join(SITES)],
                   check=True, capture_output=True, timeout=60)
    dep = Deployment(root=root, port=free_port(), local_port=free_port(), certs=certs)
    for i, site in enumerate(SITES):
        dep.data[site] = root / "data" / site
        assert cli.main(["demo-data", "--out", str(dep.data[site]), "--patients", "24",
                         "--slices", "3", "--sites", "2", "--image-size", "16",
                         "--seed", str(i + 1)]) == 0
        dep.site_ports[site] = free_port()
    try:
        link = dep.start("superlink", [
            *fedldm_cmd(), "coordinator", "start", "--host", "127.0.0.1", "--port",
            str(dep.port), "--local-port", str(dep.local_port), "--state-dir",
            str(root / "link"), "--certs", str(certs)])
        wait_for_port(dep.port, link, timeout=90)
        for site in SITES:
            code, _, err = fedldm_inprocess("coordinator", "register-site",
                                            str(certs / "sites" / site / "auth.key.pub"),
                                            *dep.connection(), "--name", site)
            assert code == 0, err
            code, _, err = fedldm_inprocess("site", "init", "--state-dir", str(dep.state(site)),
                                            "--site-id", site, "--epsilon", str(BUDGET),
                                            "--delta", str(DELTA))
            assert code == 0, err
            dep.start(site, dep.site_cmd(site))
        yield dep
    finally:
        print(f"\nSIGKILLs sent: {len(dep.kills)} (to {dep.crashes} process trees)")
        for line in dep.kills:
            print(f"  {line}")
        for line in dep.notes:
            print(f"  note: {line}")
        for p in reversed(dep.procs.values()):
            p.stop()


# ---------------------------------------------------------------------------------------------
# helpers


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically by another process; None while absent or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _ledger_entries(dep: Deployment, site: str) -> list[dict[str, Any]]:
    doc = _json(dep.state(site) / "ledger.json")
    return list(doc.get("entries", [])) if doc else []


def _current(dep: Deployment, site: str) -> Proc:
    """The latest `fedldm site start` process of `site`."""
    return [p for k, p in dep.procs.items() if k == site or k.startswith(f"{site}#")][-1]


def _supervise(dep: Deployment, site: str) -> None:
    """What the site's supervisor does: start it again when it has exited."""
    proc = _current(dep, site)
    if proc.alive():
        return
    why = next((ln.strip() for ln in reversed(proc.log().splitlines())
                if "activate" in ln.lower() or "error" in ln.lower()), "no message")
    dep.notes.append(f"{_elapsed(dep)}: {proc.name} exited with {proc.proc.returncode} "
                     f"({why[-160:]}); starting it again")
    time.sleep(RESTART_PAUSE_S)
    dep.start(site, dep.site_cmd(site))


def _wait_run(dep: Deployment, run: Proc, timeout: float, *, supervise: tuple[str, ...] = ()
              ) -> int | None:
    """Until `run` exits (its code) or `timeout` (None), restarting the `supervise` sites."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = run.wait(timeout=1.0)
        if code is not None:
            return code
        for site in supervise:
            _supervise(dep, site)
    return None


def _online(dep: Deployment) -> int:
    code, out, err = fedldm_inprocess("coordinator", "sites", *dep.connection())
    assert code == 0, err
    return sum(" online " in ln for ln in out.splitlines())


def _ensure_online(dep: Deployment, timeout: float = 150.0) -> None:
    """Every site running and online (restarted as its supervisor would, if it is down)."""
    deadline = time.monotonic() + timeout
    while _online(dep) < len(SITES) or not all(_current(dep, s).alive() for s in SITES):
        assert time.monotonic() < deadline, f"the sites are not all online:\n{dep.logs()}"
        for site in SITES:
            _supervise(dep, site)
        time.sleep(1.0)


def _kill(dep: Deployment, what: str, pid: int) -> list[int]:
    """SIGKILL `pid` and everything below it; record and print each process killed."""
    names = {p: " ".join(Path(a).name for a in cmdline(p)[:2]) for p in [pid, *descendants(pid)]}
    killed = kill_tree(pid)
    assert killed, f"nothing to kill for {what} (pid {pid})"
    left = wait_gone(killed)
    assert not left, f"{what}: still alive after SIGKILL: {left}"
    dep.crashes += 1
    for p in killed:
        line = f"{_elapsed(dep)}: {what}: pid {p} ({names.get(p, 'started meanwhile')})"
        dep.kills.append(line)
        print(f"SIGKILL {line}")
    return killed


# ---------------------------------------------------------------------------------------------
# 1. a site's SuperNode is SIGKILLed mid-round and started again


def test_site_killed_mid_round_and_restarted(deployment: Deployment) -> None:
    dep = deployment
    # This run may reach epsilon 4 of the sites' 8: the next test's run must fit in the rest.
    run = dep.start("run-site-kill", dep.run_cmd("site-kill", "--epsilon", "4"))
    deadline = time.monotonic() + 240
    while not any(e.get("phase") == "autoencoder" for e in _ledger_entries(dep, "site-b")):
        assert run.alive(), f"run ended before site-b was charged:\n{run.tail(40)}"
        assert time.monotonic() < deadline, f"site-b was never charged:\n{dep.logs()}"
        time.sleep(0.05)
    # site-b has charged its ledger for its first round: it is training now. Kill the whole
    # tree of `fedldm site start`: the SuperNode and the site worker that trains.
    site = _current(dep, "site-b")
    entry = _ledger_entries(dep, "site-b")[0]
    pids = _kill(dep, "site-b's `fedldm site start` tree (SuperNode + ClientApp)",
                 site.proc.pid)
    site.wait(timeout=10)
    stored = dep.state("site-b") / "replies" / entry["run_id"] / f"autoencoder-{entry['round']}"
    dep.notes.append(f"site-b killed in autoencoder round {entry['round']} ({len(pids)} "
                     f"processes); its reply was {'already' if stored.exists() else 'not yet'} "
                     "stored")
    time.sleep(RESTART_PAUSE_S)
    dep.start("site-b", dep.site_cmd("site-b"))

    code = _wait_run(dep, run, RUN_TIMEOUT_S + 60, supervise=("site-b",))
    assert code == 0, (f"run after the site kill: exit {code}\n{run.tail(60)}\n--- run.log\n"
                       f"{_tail(dep.run_dir('site-kill') / 'run.log')}\n{dep.logs()}")
    out = dep.run_dir("site-kill")
    assert (out / "report.html").is_file()
    assert "completed" in run.log()
    # The killed round was re-sent to site-b (the retry), not dropped.
    assert "asking again" in (out / "run.log").read_text(), _tail(out / "run.log")
    print(f"site kill scenario done at {_elapsed(dep)}")


# ---------------------------------------------------------------------------------------------
# 2. the coordinator's ServerApp is SIGKILLed after the first checkpoint


def test_serverapp_killed_then_resumed(deployment: Deployment) -> None:
    dep = deployment
    _ensure_online(dep)  # after a failed first test, site-b may still be down
    out = dep.run_dir("serverapp-kill")
    cmd = dep.run_cmd("serverapp-kill")
    run = dep.start("run-serverapp-kill", cmd)
    link = dep.procs["superlink"]
    deadline = time.monotonic() + 240
    while True:
        state = _json(out / "checkpoints" / "state.json") or {}
        if state.get("checkpoint") and (state.get("stage") == "diffusion" or
                                        int(state.get("round", 0)) >= 1):
            break
        assert run.alive(), f"run ended before its first checkpoint:\n{run.tail(40)}"
        assert time.monotonic() < deadline, f"no checkpoint:\n{dep.logs()}"
        time.sleep(0.1)
    assert state.get("stage") != "done", f"the run finished before it could be killed: {state}"
    apps = find_below(link.proc.pid, "flwr-serverapp")
    assert len(apps) == 1, (f"expected one flwr-serverapp below the SuperLink, found {apps}: "
                            f"{[cmdline(p) for p in apps]}")
    _kill(dep, f"the ServerApp (flwr-serverapp) at stage {state['stage']} round "
          f"{state['round']}", apps[0])

    code = _wait_run(dep, run, 240)
    assert code is not None, f"`coordinator run` still waits after the kill:\n{run.tail(40)}"
    assert code != 0, f"`coordinator run` reported success for a killed run:\n{run.tail(40)}"
    dep.notes.append(f"{_elapsed(dep)}: `coordinator run` after the ServerApp kill: exit "
                     f"{code}: {run.tail(2)!r}")
    assert not (out / "report.html").exists()

    rerun = dep.start("run-serverapp-kill", cmd)  # the same command, the same --out
    code = _wait_run(dep, rerun, RUN_TIMEOUT_S + 60)
    assert code == 0, (f"resumed run: exit {code}\n{rerun.tail(60)}\n--- run.log\n"
                       f"{_tail(out / 'run.log')}\n{dep.logs()}")
    assert "resuming" in (out / "run.log").read_text(), _tail(out / "run.log")
    assert (out / "report.html").is_file()
    print(f"ServerApp kill scenario done at {_elapsed(dep)}")


# ---------------------------------------------------------------------------------------------
# 3. the privacy bookkeeping after both


def test_ledgers_and_replies_after_the_kills(deployment: Deployment) -> None:
    dep = deployment
    runs, unfinished = {}, []
    for name in ("site-kill", "serverapp-kill"):
        out = dep.run_dir(name)
        metrics = _json(out / "metrics.json")
        state = _json(out / "checkpoints" / "state.json")
        if metrics is None or state is None or state.get("stage") != "done":
            unfinished.append(f"{name} (stage {(state or {}).get('stage')})")
            continue  # its test failed already; still check the other run
        seen = Counter((r["phase"], r["round"]) for r in metrics["rounds"])
        assert set(seen) == ROUNDS and set(seen.values()) == {1}, f"{name}: {seen}"
        runs[name] = state["run_name"]
    assert len(set(runs.values())) == len(runs), runs
    for site in SITES:
        ledger = PrivacyLedger.open(dep.state(site) / "ledger.json", budget_epsilon=BUDGET,
                                    delta=DELTA, site_id=site)  # verifies the hash chain
        eps = ledger.epsilon()
        assert eps <= BUDGET + 1e-9, f"{site}: epsilon {eps} above its budget {BUDGET}"
        charges = Counter((e["run_id"], e["phase"], e["round"]) for e in ledger.entries()
                          if e["sample_rate"] < 1)
        for name, run_id in runs.items():
            for phase, rnd in sorted(ROUNDS):
                assert charges[(run_id, phase, rnd)] >= 1, \
                    f"{site}: {name} {phase} round {rnd} was never charged: {charges}"
                reply = dep.state(site) / "replies" / run_id / f"{phase}-{rnd}" / "records.json"
                assert reply.is_file(), f"{site}: no stored reply {reply}"
        twice = {k: n for k, n in charges.items() if n > 1}
        print(f"{site}: epsilon {eps:.3f} of {BUDGET}; DP-SGD rounds charged more than once "
              f"(retrained after a crash): {twice or 'none'}")
    assert not unfinished, f"run(s) that did not finish: {unfinished}"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"
