"""Flower ServerApp: a thin main that builds the config and hands the Grid to the Coordinator.

Deployment (`flwr run`) reads the run config from pyproject's [tool.flwr.app.config] plus
`--run-config` overrides; the simulation builds the same app with its config in hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ldm_core.config import ConfigError, RunConfig, build_config
from server.acceptance import check_feasible, parse_acceptance
from server.federation import Coordinator, ServerSettings

AfterTraining = Callable[[Coordinator], None]


def config_from_run_config(rc: Mapping[str, Any]) -> tuple[RunConfig, ServerSettings]:
    """Flower run config (kebab-case keys) -> RunConfig + ServerSettings."""
    names = tuple(s.strip() for s in str(rc.get("class-names", "")).split(",") if s.strip())
    if len(names) < 2:
        raise ValueError("run config 'class-names' must list the consortium's classes, "
                         "comma-separated (e.g. --run-config \"class-names='normal,tumor'\")")
    overrides = json.loads(str(rc.get("overrides", "{}")) or "{}")
    eps = str(rc.get("epsilon", "8"))
    cfg = build_config(preset=str(rc.get("preset", "quick")),
                       image_size=int(rc.get("image-size", 0)) or None, class_names=names,
                       epsilon=math.inf if eps == "inf" else float(eps),
                       delta=float(rc.get("delta", 1e-5)), seed=int(rc.get("seed", 0)),
                       device=str(rc.get("device", "auto")), overrides=overrides)
    out = Path(str(rc.get("out", "runs/flwr-run")))
    # One registry beside the runs: a site's spend must never go down from one run to the next.
    registry = Path(str(rc.get("spend-registry", out.parent / "site-spend.json")))
    timeout, retries = float(rc.get("round-timeout", 3600)), int(rc.get("round-retries", 2))
    if not (timeout > 0 and math.isfinite(timeout)) or retries < 0:
        raise ConfigError(f"round-timeout must be a positive number of seconds (got {timeout}) "
                          f"and round-retries >= 0 (got {retries})")
    accept = str(rc.get("accept", "")).strip()
    if accept:  # declared before training: a criterion that cannot be met stops the run here
        check_feasible(parse_acceptance(accept), epsilon=cfg.privacy.epsilon, evaluate=True)
    settings = ServerSettings(out=out, spend_registry=registry,
                              min_sites=int(rc.get("min-sites", 1)),
                              expected_sites=int(rc.get("num-sites", 0)) or None,
                              round_timeout_s=timeout, round_retries=retries,
                              extra_meta={"accept": accept} if accept else {})
    return cfg, settings


def make_server_app(
    cfg: RunConfig | None = None,
    settings: ServerSettings | None = None,
    after: AfterTraining | None = None,
) -> ServerApp:
    """A ServerApp; with cfg/settings given (simulation) the run config is not consulted."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None and str(context.run_config.get("data", "")):
            _simulated_main(grid, context.run_config)
            return
        run_cfg, run_settings = (cfg, settings) if cfg is not None and settings is not None \
            else config_from_run_config(context.run_config)
        coordinator = Coordinator(grid, run_cfg, run_settings)
        coordinator.run()
        if after is not None:
            after(coordinator)

    return app


def _rare(text: str) -> tuple[str, float] | None:
    """The run config's `demo-rare` ("CLASS:FRACTION", empty for none)."""
    if not text.strip():
        return None
    name, _, frac = text.partition(":")
    try:
        return name.strip(), float(frac)
    except ValueError as e:
        raise ConfigError(f"run config demo-rare={text!r}: expected CLASS:FRACTION, e.g. "
                          "tumor:0.03") from e


def _simulated_main(grid: Grid, rc: Mapping[str, Any]) -> None:
    """`flwr run` of a simulation (run config `data` set): the same plan as `fedldm simulate`
    (demo data, run.json, enrolled sites, evaluation with the simulated sites' data), driven by
    Flower's own runtime instead of the in-process one."""
    from common.app_imports import APP_IMPORT_LOCK

    with APP_IMPORT_LOCK:  # Flower may be importing the ClientApp in another thread right now
        from server.simulate import SimulationOptions, plan_simulation

    eps = str(rc.get("epsilon", "8"))
    opts = SimulationOptions(
        data=str(rc["data"]), sites=int(rc.get("num-sites", 0) or 2),
        partition=str(rc.get("partition", "auto")),
        epsilon=math.inf if eps == "inf" else float(eps), delta=float(rc.get("delta", 1e-5)),
        preset=str(rc.get("preset", "quick")), image_size=int(rc.get("image-size", 0)) or None,
        seed=int(rc.get("seed", 0)), out=Path(str(rc.get("out", "runs/flwr-run"))),
        device=str(rc.get("device", "auto")),
        overrides=json.loads(str(rc.get("overrides", "{}")) or "{}"),
        demo_patients=int(rc.get("demo-patients", 0)) or None,
        demo_slices=int(rc.get("demo-slices", 1)),
        demo_rare=_rare(str(rc.get("demo-rare", ""))),
        reproducible=bool(rc.get("reproducible", False)), show_progress=False,
        accept=str(rc.get("accept", "")).strip() or None)
    plan = plan_simulation(opts)
    coordinator = Coordinator(grid, plan.cfg, plan.settings)
    coordinator.run()
    plan.after(coordinator)


def _deployment_after(coord: Coordinator) -> None:
    """After a deployed run: samples, synthetic set, utility and recall measured at the sites
    that allow evaluations, site audits over the grid, report.

    The coordinator holds no real images: each site scores the synthetic-trained classifier on
    its own test patients and releases one DP vector (server.eval_sites). With a reference set
    of its own, `fedldm evaluate RUN --reference PATH` measures everything at the coordinator.
    """
    from server.finalize import finalize_run

    finalize_run(coord.settings.out, evaluate=True, audit=coord.audit,
                 site_eval=coord.site_evaluate, show_progress=coord.settings.show_progress)


app = make_server_app(after=_deployment_after)
