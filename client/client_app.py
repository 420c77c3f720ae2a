"""Flower ClientApp: thin handlers that turn Messages into calls of client.tasks.

Nothing lives in module globals across messages (deployment starts a fresh process per message):
the frozen autoencoder a site receives once is kept in `context.state`, and the privacy ledger on
disk in the site's state directory.

What leaves a site: DP-trained weights, DP-released scalars (loss, latent second moment), the
epsilon spent, and error *kinds*. Exception details can name files (and file names can carry
patient identifiers), so they go to the site's own log, not to the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from client.ledger import BudgetExceededError
from client.site_config import SiteConfig
from ldm_core.config import RunConfig
from ldm_core.logs import file_logger

SiteResolver = Callable[[Context], SiteConfig]
ERR_BUDGET = 4001
ERR_SITE = 4002
AE_STATE_KEY = "fedldm-autoencoder"


def _log(site: SiteConfig) -> logging.Logger:
    return file_logger(site.state_dir / "site.log")


def _error_reply(msg: Message, site: SiteConfig | None, exc: Exception) -> Message:
    if isinstance(exc, BudgetExceededError):
        return Message(Error(code=ERR_BUDGET, reason=f"site {site.site_id if site else '?'} "
                             f"refused: {exc}"), reply_to=msg)
    where = "site.log in the site's state directory"
    if site is not None:
        _log(site).exception("message %s failed", msg.metadata.message_type)
    return Message(Error(code=ERR_SITE, reason=f"site {site.site_id if site else '?'} failed "
                         f"with {type(exc).__name__}; details are in {where} at the site"),
                   reply_to=msg)


def _run_config(msg: Message) -> RunConfig:
    import json

    return RunConfig.from_dict(json.loads(str(msg.content["config"]["run-config"])))


def _guarded(msg: Message, context: Context, resolve_site: SiteResolver,
             handle: Callable[[Message, Context, SiteConfig, RunConfig], Message]) -> Message:
    """Resolve the site and the run config, run `handle`; every failure becomes an error reply."""
    site = None
    try:
        site = resolve_site(context)
        return handle(msg, context, site, _run_config(msg))
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
        return _error_reply(msg, site, exc)


def _train(msg: Message, context: Context, site: SiteConfig, cfg: RunConfig) -> Message:
    conf = msg.content["config"]
    phase = str(conf["phase"])
    if "autoencoder" in msg.content:
        context.state[AE_STATE_KEY] = msg.content["autoencoder"]
    ae_weights = None
    if phase == "diffusion":
        if AE_STATE_KEY not in context.state:
            raise RuntimeError("no autoencoder received for the diffusion phase")
        ae_weights = context.state[AE_STATE_KEY].to_torch_state_dict()
    result = tasks.train_round(
        site, cfg, phase=phase, server_round=int(conf["server-round"]),
        run_id=str(conf["run-name"]),
        weights=msg.content["arrays"].to_torch_state_dict(),
        ae_weights=ae_weights, scale_factor=float(conf.get("scale-factor", 1.0)),
        seed=int(conf.get("seed", 0)) * 1000 + int(conf["server-round"]) * 7
        + site.site_index,
    )
    # Sites are weighted equally and the sampling rate, step count and noise multiplier
    # stay in the site's ledger: each of them would reveal the dataset size.
    metrics = MetricRecord({
        "num-examples": 1,
        "loss": result.loss,
        "epsilon": result.epsilon,
        "budget-epsilon": result.budget_epsilon,
        "delta": result.delta,
        "has-autoencoder": int(AE_STATE_KEY in context.state),
    })
    _log(site).info("%s round %s: loss %.4f, epsilon %.3f / %.3f", phase,
                    conf["server-round"], result.loss, result.epsilon,
                    result.budget_epsilon)
    return Message(RecordDict({
        "arrays": ArrayRecord(result.weights),
        "metrics": metrics,
        "site": ConfigRecord({"site-id": site.site_id}),
    }), reply_to=msg)


def _query(msg: Message, context: Context, site: SiteConfig, cfg: RunConfig) -> Message:
    conf = msg.content["config"]
    task = str(conf["task"])
    if task == "latent-stats":
        context.state[AE_STATE_KEY] = msg.content["autoencoder"]
        stats = tasks.latent_stats(
            site, cfg, run_id=str(conf["run-name"]),
            ae_weights=msg.content["autoencoder"].to_torch_state_dict(),
            seed=int(conf.get("seed", 0)) + site.site_index)
        return Message(RecordDict({
            "metrics": MetricRecord({"second-moment-sum": stats.second_moment_sum,
                                     "count": stats.count, "epsilon": stats.epsilon,
                                     "num-examples": 1}),
            "site": ConfigRecord({"site-id": site.site_id}),
        }), reply_to=msg)
    if task == "audit":
        return _audit_reply(msg, site, cfg)
    raise ValueError(f"unknown query task {task!r}")


def make_client_app(resolve_site: SiteResolver) -> ClientApp:
    """Build the ClientApp; deployment and simulation differ only in how a site is resolved."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, resolve_site, _train)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, resolve_site, _query)

    return app


def _audit_reply(msg: Message, site: SiteConfig, cfg: RunConfig) -> Message:
    """Privacy audit of the final model at the site; only aggregates go back (client.audit)."""
    import json

    import torch

    from client.audit import site_audit
    from ldm_core.models import make_autoencoder, make_denoiser

    conf = msg.content["config"]
    ae, dm = make_autoencoder(cfg.model), make_denoiser(cfg.model)
    ae.load_state_dict(msg.content["autoencoder"].to_torch_state_dict())
    dm.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pixels = msg.content["synthetic"]["images"].numpy()
    synthetic = torch.from_numpy(pixels.astype("float32") / 127.5 - 1.0).unsqueeze(1)
    result = site_audit(site, cfg, ae, dm, float(conf["scale-factor"]), synthetic,
                        seed=int(conf.get("seed", 0)))
    return Message(RecordDict({
        "audit": ConfigRecord({"json": json.dumps(result)}),
        "site": ConfigRecord({"site-id": site.site_id}),
    }), reply_to=msg)


def _deployment_site(context: Context) -> SiteConfig:
    return SiteConfig.from_node_config(context.node_config)


class SimulationSites:
    """Maps a simulated SuperNode's partition-id to a SiteConfig (picklable for Ray actors)."""

    def __init__(self, *, data: str, n_sites: int, partition: str, state_root: Path,
                 epsilon: float, delta: float, data_seed: int, device: str) -> None:
        self.data, self.n_sites, self.partition = data, n_sites, partition
        self.state_root, self.epsilon, self.delta = Path(state_root), epsilon, delta
        self.data_seed, self.device = data_seed, device

    def site(self, index: int) -> SiteConfig:
        return SiteConfig(site_id=f"site-{index}", data=self.data,
                          state_dir=self.state_root / f"site-{index}", epsilon=self.epsilon,
                          delta=self.delta, partition=self.partition, site_index=index,
                          n_sites=self.n_sites, data_seed=self.data_seed, device=self.device)

    def __call__(self, context: Context) -> SiteConfig:
        return self.site(int(context.node_config["partition-id"]))


app = make_client_app(_deployment_site)
