"""SIGKILL a whole federation (coordinator and sites) at random points, restart, repeat: 50 times.

A simulated federation's coordinator and sites share a process, so one SIGKILL there hits
whatever was running: a site charging its ledger, training, storing its reply, or the
coordinator aggregating and writing its checkpoint. Each run is forked (the imports are paid
once), killed at a uniformly random time, restarted from its run folder and state directories,
and killed again, until it finishes. Afterwards:

- the run finished: stage "done", every (phase, round) recorded exactly once;
- every ledger still verifies (hash chain, head) and no site spent more than its budget;
- every training attempt was charged first: for each (site, phase, round), trainings started
  <= DP-SGD charges in the ledger; and each site released exactly one reply per round.

A kill between a charge and the stored reply costs the site one more charge of that round (the
crashed attempt's noise was drawn; nothing was released, but we do not argue it away). Sites
plan `retry_reserve_rounds` extra rounds per phase for this (default 1); here the reserve is the
most kills a run gets, so every run can finish. Crashes beyond the reserve eat into the
budget of later rounds until the ledger refuses a charge: never an overspend
(tests/client/test_ledger.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from client.ledger import PrivacyLedger
from ldm_core.config import RunConfig, build_config
from tests.common.federation import fast_accounting, make_federation

KILLS, MAX_KILLS_PER_RUN = 50, 10
N_SITES = 2
ROUNDS = {"autoencoder": 2, "diffusion": 1}


def _config(class_names: tuple[str, ...], reserve: int) -> RunConfig:
    return build_config(preset="tiny", image_size=16, class_names=class_names, epsilon=8.0,
                        overrides={"autoencoder.rounds": ROUNDS["autoencoder"],
                                   "diffusion.rounds": ROUNDS["diffusion"],
                                   "privacy.retry_reserve_rounds": reserve})


def _federate(root: Path, manifest: Path, cfg: RunConfig, trainings: Path) -> None:
    """The child: count each training start (after its charge), then run or resume the run."""
    import client.tasks as tasks

    torch.set_num_threads(1)
    train, round_ = tasks.dp_train, tasks.train_round
    current = {"run": ""}

    def in_run(*args: object, **kwargs: object) -> object:
        current["run"] = str(kwargs["run_id"])
        return round_(*args, **kwargs)

    def counted(*args: object, **kwargs: object) -> object:
        with open(trainings, "a", encoding="utf-8") as f:
            f.write(f"{current['run']} {kwargs['desc']}\n")  # "RUN site-K phase rR"
            f.flush()
            os.fsync(f.fileno())
        return train(*args, **kwargs)

    tasks.dp_train, tasks.train_round = counted, in_run  # type: ignore[assignment]
    with fast_accounting():
        make_federation(root, manifest, cfg, n_sites=N_SITES).run()


def _own_tqdm_lock() -> None:
    """Give this forked child a progress-bar lock of its own.

    tqdm's default write lock holds a multiprocessing RLock: a semaphore that every process
    forked from the test process shares. A child SIGKILLed while it holds it (creating or
    refreshing a bar) leaves it held for good, and from then on every bar in the test process
    (its tqdm monitor thread) and in every later child blocks on it: each later run hangs until
    the join timeout. The federation's own processes never share it (sites and workers are
    started with exec, not fork), so this is the test's fork, not a fix for the product."""
    import threading

    import tqdm.auto
    import tqdm.std

    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        cls.set_lock(threading.RLock())


def _child(root: Path, manifest: Path, cfg: RunConfig, trainings: Path) -> None:
    _own_tqdm_lock()
    try:
        _federate(root, manifest, cfg, trainings)
    except BaseException as exc:  # noqa: BLE001 - report to the parent, then die
        (root / "child-error.txt").write_text(f"{type(exc).__name__}: {exc}")
        os._exit(3)
    os._exit(0)


def _start(root: Path, manifest: Path, cfg: RunConfig, trainings: Path
           ) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("fork").Process(
        target=_child, args=(root, manifest, cfg, trainings))
    proc.start()
    return proc


def _finish(root: Path, manifest: Path, cfg: RunConfig, trainings: Path, *, kills: int,
            rng: random.Random, clean_s: float) -> Counter[str]:
    """SIGKILL the federation at uniformly random times (up to `kills` times) until it
    finishes on its own; where each kill landed."""
    where: Counter[str] = Counter()
    while True:
        before = _charges(root)
        proc = _start(root, manifest, cfg, trainings)
        if sum(where.values()) < kills:
            time.sleep(rng.uniform(0.0, clean_s))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=600 if clean_s == 0 else max(120.0, 10 * clean_s))
        if proc.is_alive():
            # A forked child that never finishes (a lock some other thread of the test process
            # held at fork time) is ended like any other crash. tqdm's shared lock did this
            # until each child took its own (_own_tqdm_lock).
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        if proc.exitcode == 0:
            return where
        where[_kill_point(root, proc.exitcode, before)] += 1


def _charges(root: Path) -> Counter[tuple[str, str, str, str]]:
    """DP-SGD charges per (site, run, phase, round) so far."""
    out: Counter[tuple[str, str, str, str]] = Counter()
    for ledger in (root / "sites").glob("site-*/ledger.json"):
        for e in json.loads(ledger.read_text())["entries"]:
            if e["sample_rate"] < 1.0:
                out[(ledger.parent.name, e["run_id"], e["phase"], str(e["round"]))] += 1
    return out


def _kill_point(root: Path, exitcode: int | None, before: Counter[tuple[str, ...]]) -> str:
    """Where the kill landed: inside a site round (this attempt charged a round whose reply is
    not stored), elsewhere, or after the run had already finished."""
    assert exitcode == -signal.SIGKILL, (exitcode, _child_error(root))
    for (site, run, phase, rnd), n in _charges(root).items():
        stored = root / "sites" / site / "replies" / run / f"{phase}-{rnd}" / "records.json"
        if n > before[(site, run, phase, rnd)] and not stored.exists():
            return "inside a site round"
    return "coordinator or between rounds"


def _child_error(root: Path) -> str:
    error = root / "child-error.txt"
    return error.read_text() if error.exists() else ""


def _entries(site_dir: Path) -> list[dict[str, object]]:
    return json.loads((site_dir / "ledger.json").read_text())["entries"]


def _check_run(root: Path, cfg: RunConfig, trainings: Path) -> None:
    state = json.loads((root / "run" / "checkpoints" / "state.json").read_text())
    assert state["stage"] == "done"
    run = state["run_name"]
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert Counter((r["phase"], r["round"]) for r in metrics["rounds"]) == Counter(
        (p, k) for p, n in ROUNDS.items() for k in range(1, n + 1)), metrics["rounds"]

    # A coordinator killed before its first state.json starts over under a new run name: the
    # sites' charges under the old name stay in their ledgers (and shrink the new run's budget).
    started = Counter(trainings.read_text().split("\n")[:-1]) if trainings.exists() else {}
    for k in range(N_SITES):
        site_dir = root / "sites" / f"site-{k}"
        ledger = PrivacyLedger.open(site_dir / "ledger.json", budget_epsilon=8.0, delta=1e-5,
                                    site_id=f"site-{k}")  # verifies chain and head
        assert ledger.epsilon() <= 8.0 + 1e-9
        charges = Counter(f"{e['run_id']} site-{k} {e['phase']} r{e['round']}"
                          for e in ledger.entries() if e["sample_rate"] < 1.0)
        for key, trained in started.items():
            if f" site-{k} " in key:
                assert trained <= charges[key], (key, trained, charges)
        for phase, n in ROUNDS.items():
            for rnd in range(1, n + 1):
                assert started[f"{run} site-{k} {phase} r{rnd}"] >= 1
                assert (site_dir / "replies" / run / f"{phase}-{rnd}" / "records.json").exists()


def _warm_accounting(root: Path, manifest: Path, cfg: RunConfig) -> None:
    """Plan one site's noise here, so the forked runs inherit the memoised RDP terms (every
    run and site plans the same noise: same config, same budget, fresh ledger)."""
    from client.client_app import SimulationSites
    from client.tasks import plan_noise

    site = SimulationSites(data=str(manifest), n_sites=N_SITES, partition="site",
                           state_root=root, epsilon=8.0, delta=1e-5, data_seed=0, device="cpu",
                           allow_audit=False).site(0)
    site.state_dir.mkdir(parents=True)
    ledger = PrivacyLedger.create(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                  site_id=site.site_id)
    plan_noise(site, cfg, ledger, "warm-up")


@pytest.mark.slow
def test_fifty_sigkills_every_run_finishes_within_budget(tmp_path: Path, demo_manifest: Path,
                                                         class_names: tuple[str, ...]) -> None:
    cfg = _config(class_names, reserve=MAX_KILLS_PER_RUN)
    with fast_accounting():
        _warm_accounting(tmp_path / "warm", demo_manifest, cfg)
        # How long one undisturbed run takes here: kills land uniformly inside that time.
        t0 = time.monotonic()
        clean = tmp_path / "clean"
        _finish(clean, demo_manifest, cfg, clean / "trainings.txt", kills=0,
                rng=random.Random(0), clean_s=0)
        clean_s = time.monotonic() - t0
        _check_run(clean, cfg, clean / "trainings.txt")

        rng = random.Random(os.environ.get("FEDLDM_KILL_SEED", "kills"))
        landed: Counter[str] = Counter()
        runs = 0
        while sum(landed.values()) < KILLS:
            root = tmp_path / f"run-{runs}"
            root.mkdir()
            landed += _finish(root, demo_manifest, cfg, root / "trainings.txt",
                              kills=MAX_KILLS_PER_RUN, rng=rng, clean_s=clean_s)
            _check_run(root, cfg, root / "trainings.txt")
            runs += 1
    print(f"\n{sum(landed.values())} SIGKILLs over {runs} runs (a clean run takes "
          f"{clean_s:.1f}s): {dict(landed)}")
    # The kills must have hit what they are meant to test: sites mid-round, and elsewhere.
    assert landed["inside a site round"] >= 10, landed
    assert landed["coordinator or between rounds"] >= 2, landed
