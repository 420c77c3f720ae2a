"""`fedldm simulate`: the whole federation on one machine, through Flower's simulation runtime.

The same ClientApp handlers and Coordinator as deployment run here; only the site resolution
differs (a simulated SuperNode's partition-id picks its share of the data). Each virtual site
keeps a real state directory with a real ledger under RUN/sites/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from client.client_app import SimulationSites, make_client_app
from client.ledger import PrivacyLedger
from common.protocol import other_version_run
from ldm_core.config import PRESET_IMAGE_SIZE, RunConfig, build_config, to_dict
from ldm_core.data import (
    DEMO3D_DATA,
    DEMO_DATA,
    SPLIT_SCHEME,
    DataError,
    holds_volumes,
    missing_test_classes,
    scan,
    simulation_source,
)
from ldm_core.dp_random import NOT_PRIVATE_NOTE
from ldm_core.phantoms import generate_demo
from ldm_core.phantoms3d import generate_demo3d
from ldm_core.phases import check_models
from server.acceptance import AcceptanceError, check_feasible, parse_acceptance
from server.evaluate import EvalOptions
from server.federation import Coordinator, FederationError, ServerSettings
from server.finalize import finalize_run
from server.plan_check import check_plan_fits
from server.run_folder import Run, RunInfo
from server.run_metrics import PrivacyBlock, RoundRecord, SitePrivacy
from server.server_app import make_server_app

# Demo sizes: 2D, one slice per patient; 3D, one head volume per patient (a 32^3 volume costs
# about as much to train on as 32 slices).
DEMO_PATIENTS = 12800
DEMO3D_PATIENTS = 600


@dataclass(frozen=True)
class SimulationOptions:
    data: str = "demo"
    sites: int = 3
    partition: str = "auto"
    epsilon: float = 8.0
    delta: float = 1e-5
    preset: str = "quick"
    image_size: int | None = None
    seed: int = 0
    out: Path = Path("runs/demo")
    device: str = "auto"
    overrides: Mapping[str, Any] | None = None
    # One slice per demo patient: the DP unit is the patient, and the demo should show what
    # 12,800 privacy units buy (multi-slice patients are exercised by the tests). None: that,
    # or DEMO3D_PATIENTS head volumes for --data demo3d.
    demo_patients: int | None = None
    demo_slices: int = 1
    # (class, fraction): make one demo class rare at the sites (to show `fedldm augment`).
    demo_rare: tuple[str, float] | None = None
    # Simulation only: seed the sites' privacy randomness (NOT private against the seed holder).
    reproducible: bool = False
    evaluate: bool = True
    # Acceptance criteria (server.acceptance), declared before training and kept in run.json.
    accept: str | None = None
    eval_options: EvalOptions | None = None
    show_progress: bool = True


def demo_patients(opts: SimulationOptions) -> int:
    """Patients in the demo set `opts.data` names (its default when not given)."""
    if opts.demo_patients is not None:
        return opts.demo_patients
    return DEMO3D_PATIENTS if opts.data == DEMO3D_DATA else DEMO_PATIENTS


def with_volume_overrides(data: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run on volumes is a 3D run: `--data demo3d`, or a dataset of NIfTI files / DICOM
    series, sets ``model.spatial_dims=3`` (which also selects the preset's 3D plan) unless the
    user set it; 2D data keeps the overrides as given."""
    out = dict(overrides or {})
    path = Path(data).expanduser()
    if "model.spatial_dims" not in out and (
            data == DEMO3D_DATA or (data != DEMO_DATA and path.exists() and holds_volumes(path))):
        out["model.spatial_dims"] = 3
    return out


def prepare_data(opts: SimulationOptions, out: Path) -> tuple[str, str]:
    """Resolve --data (generating the demo set if asked) and the partition scheme."""
    data, partition = simulation_source(opts.data, out, opts.partition)
    size = opts.image_size or PRESET_IMAGE_SIZE[opts.preset]
    if opts.data == DEMO_DATA and not Path(data).exists():
        generate_demo(Path(data).parent, n_patients=demo_patients(opts),
                      slices_per_patient=opts.demo_slices, n_sites=opts.sites,
                      image_size=max(32, size), seed=opts.seed, rare=opts.demo_rare)
    elif opts.data == DEMO3D_DATA and not Path(data).exists():
        generate_demo3d(Path(data).parent, n_patients=demo_patients(opts), n_sites=opts.sites,
                        size=size, seed=opts.seed)
    return data, partition


def _gpu_fraction(sites: int, device: str) -> float:
    """Each virtual site gets an equal share of the GPUs, when there are any."""
    if device == "cpu" or not torch.cuda.is_available():
        return 0.0
    return min(1.0, torch.cuda.device_count() / sites)


def concurrent_sites(sites: int, cores: int) -> int:
    """How many simulated sites train at once (one Ray actor, one thread each).

    One actor per core makes 3 sites on 2 cores train in two waves, and the second wave (one
    site) leaves a core idle: a round took twice a site's time. The count that minimises a
    round's length (waves x how many actors share each core) is used instead, up to twice the
    cores: 3 sites on 2 cores all train at once, time-sliced, and a round takes 1.5x a site's
    time. Beyond twice the cores more actors shorten nothing and cost a worker's memory each.
    """
    cores = max(1, cores)

    def round_length(k: int) -> float:
        return math.ceil(sites / k) * max(k, cores) / cores

    best = max(1, min(sites, cores))
    for k in range(best + 1, min(sites, 2 * cores) + 1):
        if round_length(k) < round_length(best):
            best = k
    return best


@dataclass
class SimulationPlan:
    """Everything a simulated run needs before a Flower runtime drives it: the validated config,
    the run folder (run.json written), the enrolled sites, and what to do after training."""

    run: Run
    cfg: RunConfig
    sites: SimulationSites
    settings: ServerSettings
    after: Callable[[Coordinator], None]


def simulation_config(opts: SimulationOptions,
                      class_names: tuple[str, ...] | None = None) -> RunConfig:
    """The run's config: the preset, the flags and the overrides; the built-in phantoms start
    from the phantom autoencoder prior (`build_config`'s phantom_data)."""
    return build_config(preset=opts.preset, image_size=opts.image_size,
                        **({"class_names": class_names} if class_names else {}),
                        epsilon=opts.epsilon, delta=opts.delta, seed=opts.seed,
                        device=opts.device, overrides=opts.overrides,
                        phantom_data=opts.data == DEMO_DATA)


def plan_simulation(opts: SimulationOptions) -> SimulationPlan:
    """Data, config, run.json and enrolled sites; shared by `fedldm simulate` and `flwr run`."""
    out = Path(opts.out)
    run = Run(out)
    # The noise plan needs only the configuration (not the classes): checked before the demo
    # data is written.
    opts = replace(opts, overrides=with_volume_overrides(opts.data, opts.overrides))
    early = check_simulation_plan(opts)
    try:
        check_models(early)  # priors and train_only, before anything is written
    except (OSError, ValueError, RuntimeError) as e:
        raise FederationError(f"cannot build the run's models: {e}") from e
    data, partition = prepare_data(opts, out)  # creates OUT only for the demo data
    # Absolute in run.json: `fedldm evaluate RUN` and the benchmarks rebuild the sites from it,
    # from whatever directory they are started in.
    data = str(Path(data).resolve())
    index = scan(data)
    eps = opts.epsilon
    cfg = simulation_config(opts, tuple(index.class_names))
    _check_before_writing(run, cfg, data, partition, opts)
    accept = _declared_acceptance(run, opts)
    info = RunInfo(
        config=to_dict(cfg), data=data, partition=partition, sites=opts.sites,
        mode="simulation", has_patient_ids=index.has_patient_ids,
        patient_note=None if index.has_patient_ids else
        "the dataset has no patient ids: each image was treated as its own patient, so "
        "splits may leak a patient across train/holdout/test (results are optimistic)",
        privacy_randomness=NOT_PRIVATE_NOTE if opts.reproducible else (
            "secure: each site draws Poisson sampling and DP noise from OS entropy (reseeded "
            "every step); the run's seed drives only initialisation, timesteps and evaluation"),
        accept=accept, split=SPLIT_SCHEME)
    run.save_info(info)
    meta = info.meta()
    sites = SimulationSites(data=data, n_sites=opts.sites, partition=partition,
                            state_root=run.sites, epsilon=eps, delta=opts.delta,
                            data_seed=opts.seed, device=opts.device,
                            reproducible_seed=opts.seed if opts.reproducible else None)
    enroll_sites(sites, opts.sites, resuming=run.state_path.exists())
    settings = ServerSettings(out=out, min_sites=opts.sites, expected_sites=opts.sites,
                              show_progress=opts.show_progress, extra_meta=meta)

    def after(coord: Coordinator) -> None:
        copy_ledgers(sites, opts.sites, run)
        add_ledger_details(run)
        finalize_run(run, sites=sites, n_sites=opts.sites, evaluate=opts.evaluate,
                     audit=coord.audit if sites.allow_audit else None,
                     options=opts.eval_options,
                     show_progress=opts.show_progress)
        copy_ledgers(sites, opts.sites, run)  # again: the audit charged the ledgers

    return SimulationPlan(run, cfg, sites, settings, after)


def _declared_acceptance(run: Run, opts: SimulationOptions) -> str | None:
    """The run's acceptance criteria: checked before training, and fixed once declared (a
    resumed run cannot move its goalposts)."""
    spec = opts.accept.strip() if opts.accept else None
    info = run.load_info() if run.state_path.exists() else None
    if info is not None:  # resuming: what was declared stands
        if spec is None or spec == info.accept:
            return info.accept
        raise AcceptanceError(
            f"{run.root / 'run.json'} declares {info.accept or 'no'} acceptance criteria; they "
            f"were fixed before training and cannot become {spec!r} on resume (use a new --out)")
    if spec:
        check_feasible(parse_acceptance(spec), epsilon=opts.epsilon, evaluate=opts.evaluate)
    return spec


def _check_before_writing(run: Run, cfg: RunConfig, data: str, partition: str,
                          opts: SimulationOptions) -> None:
    """Refuse, before run.json is touched, a run folder of another configuration and a
    federation whose test splits would miss a class (found only after training otherwise)."""
    saved = run.load_state() if run.state_path.exists() else None
    reason = other_version_run(str(run.root), saved.get("protocol")) if saved else None
    if reason:
        raise FederationError(reason)
    if saved is not None and saved.get("config") != to_dict(cfg):
        raise FederationError(
            f"{run.state_path} belongs to a run with another configuration; use a new --out "
            "folder, or the same settings to resume this one")
    old = run.load_info() if run.info_path.exists() else None
    if saved is not None and old is not None and old.split != SPLIT_SCHEME:
        raise FederationError(
            f"{run.info_path}: the run was started with another patient split "
            f"({old.split or 'the stratified split of earlier versions'}, now {SPLIT_SCHEME}); "
            "resuming would train and evaluate on other patients. Use a new --out folder")
    if not opts.evaluate:  # nothing will be tested: a test split without a class is fine
        return
    missing = missing_test_classes(data, n_sites=opts.sites, scheme=partition, seed=opts.seed)
    if missing:
        raise DataError(
            f"{data}: no site's test split holds an image of class {', '.join(missing)}, so "
            "the evaluation could not test it; use more data, fewer sites (--sites) or "
            "another partition (--partition)")


def check_simulation_plan(opts: SimulationOptions) -> RunConfig:
    """The run's config, after refusing (FederationError naming the fix) a budget its plan
    cannot fit; nothing is written. Simulated sites allow audits, as SimulationSites does."""
    cfg = simulation_config(opts)
    check_plan_fits(cfg, opts.epsilon, opts.delta, audit=True, evaluate=False)
    return cfg


def run_simulation(opts: SimulationOptions) -> dict[str, Any]:
    """`fedldm simulate`: plan the run, then drive it with Flower's in-process simulation.

    Flower 1.42 deprecates the public `run_simulation` wrapper in favour of `flwr run`, whose
    `flwr-simulation` process calls the simulation engine `_run_simulation` itself. We call that
    same engine in-process (flwr is pinned to 1.42.x; `tests/server/test_simulation.py` fails if
    it moves) so a run needs no SuperLink process and no app folder; `flwr run .` drives the same
    apps through Flower's runtime (`tests/server/test_flwr_run.py`).
    """
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    t0 = time.monotonic()
    plan = plan_simulation(opts)
    run, cfg, sites, settings, after = plan.run, plan.cfg, plan.sites, plan.settings, plan.after
    _quiet_flower()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": _gpu_fraction(opts.sites,
                                                                            opts.device)},
               "init_args": {"num_cpus": concurrent_sites(opts.sites, os.cpu_count() or 1),
                             "include_dashboard": False}}
    _run_simulation(num_supernodes=opts.sites, server_app=make_server_app(cfg, settings, after),
                    client_app=make_client_app(sites), backend_name="ray",
                    backend_config=backend,  # type: ignore[arg-type]
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE)
    metrics = run.load_metrics()
    if metrics.get("config") is None or "privacy" not in metrics:
        raise RuntimeError(f"the simulation ended without a complete {run.metrics_path}; "
                           f"see {run.log_path}")
    metrics.setdefault("meta", {})["wall_seconds"] = round(time.monotonic() - t0, 1)
    run.save_metrics(metrics)
    return metrics


def enroll_sites(sites: SimulationSites, n: int, *, resuming: bool) -> None:
    """`fedldm site init` for each simulated site of a new run; a resumed run keeps its ledgers
    (a missing one then stops the run: the site cannot train without its history)."""
    for k in range(n):
        site = sites.site(k)
        if site.ledger_path.exists() or resuming:
            continue
        site.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        PrivacyLedger.create(site.ledger_path, budget_epsilon=site.epsilon, delta=site.delta,
                             site_id=site.site_id)


def copy_ledgers(sites: SimulationSites, n: int, run: Run) -> None:
    """RUN/ledgers/site-K.json: the simulated sites' ledgers, for the report and audits."""
    run.ledgers.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        src = sites.site(k).ledger_path
        if src.exists():
            shutil.copyfile(src, run.ledger_copy(k))


def add_ledger_details(run: Run) -> None:
    """Noise multipliers and steps per phase, read from the simulated sites' ledgers.

    In a real federation these stay at the sites (they reveal dataset sizes); in a simulation
    the ledgers are on this machine anyway, and the report should show them.
    """
    metrics = run.load_metrics()
    privacy = PrivacyBlock.from_json(metrics.get("privacy"))
    sites = privacy.sites if privacy.sites is not None else {}
    for path in sorted(run.ledgers.glob("site-*.json")):
        doc = json.loads(path.read_text())
        phases: dict[str, dict[str, Any]] = {}
        for e in doc.get("entries", []):
            if e["sample_rate"] >= 1.0 and e["steps"] == 1:
                key = f"{e['phase']} (released statistics)"
            else:
                key = e["phase"]
            p = phases.setdefault(key, {"noise_multiplier": e["noise_multiplier"],
                                        "sample_rate": e["sample_rate"], "steps": 0})
            p["steps"] += int(e["steps"])
        name = str(doc.get("site_id", path.stem))
        sites[name] = replace(sites.get(name, SitePrivacy()), ledger=phases)
    privacy.sites = sites
    metrics["privacy"] = privacy.to_json()
    run.save_metrics(metrics)


def _quiet_flower() -> None:
    """Keep the console to the coordinator's progress bars and summary (sites log to site.log;
    simulated sites have show_progress off, so they draw no bars of their own)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def summary_lines(metrics: Mapping[str, Any], out: Path) -> list[str]:
    cfg = RunConfig.from_dict(metrics["config"])
    lines = [f"run folder      {out}",
             f"preset          {cfg.preset}, {cfg.model.image_size}px, classes "
             f"{', '.join(cfg.class_names)}"]
    rounds = [RoundRecord.from_json(r) for r in metrics.get("rounds", [])]
    for phase in ("autoencoder", "diffusion"):
        rs = [r for r in rounds if r.phase == phase]
        if rs:
            lines.append(f"{phase:<15} {len(rs)} rounds, DP loss {rs[0].loss:.4f} -> "
                         f"{rs[-1].loss:.4f}")
    priv = PrivacyBlock.from_json(metrics["privacy"])
    if priv.private is False:
        lines.append("privacy         NOT PRIVATE: epsilon=inf (non-DP baseline)")
    for site, s in sorted((priv.sites or {}).items()):
        eps = s.epsilon if s.epsilon is not None else 0.0
        lines.append(f"{site:<15} epsilon {_fmt(eps)} of {_fmt(s.budget_epsilon)} "
                     f"(delta {s.delta})")
    u = metrics.get("utility") or {}
    if "ratio" in u:
        lines.append(f"utility         TSTR AUC {_fmt(u.get('tstr_auc'))} vs TRTR "
                     f"{_fmt(u.get('trtr_auc'))} (ratio {_fmt(u['ratio'])})")
    seg = u.get("segmentation") or {}
    if "tstr_dice" in seg:
        lines.append(f"segmentation    Dice TSTR {_fmt(seg['tstr_dice'])} vs TRTR "
                     f"{_fmt(seg.get('trtr_dice'))} (ratio {_fmt(seg.get('ratio'))}, "
                     f"mask/image alignment {_fmt(seg.get('alignment_dice'))})")
    elif "not_measured" in seg:
        lines.append(f"segmentation    not measured: {seg['not_measured']}")
    if "wall_seconds" in metrics.get("meta", {}):
        lines.append(f"wall time       {metrics['meta']['wall_seconds']:.0f}s")
    for name in ("samples.png", "report.html", "metrics.json", "run.log"):
        if (out / name).exists():
            lines.append(f"wrote           {out / name}")
    return lines


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "inf" if math.isinf(x) else f"{x:.3f}"
