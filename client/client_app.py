"""Flower ClientApp: thin handlers that turn Messages into calls of client.tasks.

Nothing lives in module globals across messages (deployment starts a fresh process per message):
the frozen autoencoder a site receives once is kept in `context.state`, and the privacy ledger on
disk in the site's state directory.

What leaves a site is exactly what `common.protocol` declares: DP-trained weights, DP-released
scalars (loss, latent second moment, opt-in audit aggregates and evaluation counts), the epsilon
spent, and a fixed reason per error kind. Exception details can name files (and file names can
carry patient identifiers), so they go to the site's own log, not to the coordinator.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from client.ledger import BudgetExceededError
from client.replies import ReplyStore
from client.site_config import SiteConfig
from common.protocol import (
    ERR_BUDGET,
    ERR_REFUSED,
    ERR_SITE,
    ERR_VERSION,
    ERROR_REASONS,
    AuditReply,
    AuditRequest,
    EvaluateReply,
    EvaluateRequest,
    LatentStatsReply,
    LatentStatsRequest,
    ProtocolVersionError,
    RunRef,
    TrainReply,
    TrainRequest,
    encode_update,
    query_task,
)
from ldm_core.config import RunConfig
from ldm_core.data import simulation_source
from ldm_core.logs import file_logger
from ldm_core.phases import get_phase

SiteResolver = Callable[[Context], SiteConfig]
AE_STATE_KEY = "fedldm-autoencoder"


def _log(site: SiteConfig) -> logging.Logger:
    return file_logger(site.state_dir / "site.log")


def _error_reply(msg: Message, site: SiteConfig | None, exc: Exception) -> Message:
    """A fixed, data-independent reason per error kind; the details go to site.log only."""
    code = (ERR_BUDGET if isinstance(exc, BudgetExceededError)
            else ERR_REFUSED if isinstance(exc, PermissionError)
            else ERR_VERSION if isinstance(exc, ProtocolVersionError) else ERR_SITE)
    if site is not None:
        _log(site).error("message %s refused/failed: %s", msg.metadata.message_type, exc,
                         exc_info=code == ERR_SITE)
    name = site.site_id if site else "?"
    return Message(Error(code=code, reason=f"site {name}: {ERROR_REASONS[code]}"), reply_to=msg)


def _run_config(run: RunRef) -> RunConfig:
    return RunConfig.from_dict(json.loads(run.run_config))


def _guarded(msg: Message, context: Context, resolve_site: SiteResolver,
             handle: Callable[[Message, Context, SiteConfig], Message]) -> Message:
    """Resolve the site, run `handle`; every failure becomes an error reply."""
    site = None
    try:
        site = resolve_site(context)
        return handle(msg, context, site)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
        return _error_reply(msg, site, exc)


def _stored(msg: Message, site: SiteConfig, run: str, kind: str, rnd: int) -> Message | None:
    """A retried request gets the reply already sent: no new training, release or charge."""
    stored = ReplyStore(site.state_dir).load(run, kind, rnd)
    if stored is None:
        return None
    _log(site).info("%s %s round %s: answering a retry with the stored reply", run, kind, rnd)
    return Message(stored, reply_to=msg)


def _send(msg: Message, site: SiteConfig, run: str, kind: str, rnd: int,
          content: RecordDict) -> Message:
    """Persist the reply durably, then send it (a crash in between re-sends the same reply)."""
    ReplyStore(site.state_dir).save(run, kind, rnd, content)
    return Message(content, reply_to=msg)


def _train(msg: Message, context: Context, site: SiteConfig) -> Message:
    req = TrainRequest.from_record(msg.content)
    if req.autoencoder is not None:
        context.state[AE_STATE_KEY] = req.autoencoder
    again = _stored(msg, site, req.run.run_name, req.phase, req.server_round)
    if again is not None:
        return again
    cfg = _run_config(req.run)
    ae_weights = None
    if get_phase(req.phase).needs_autoencoder:
        if AE_STATE_KEY not in context.state:
            raise RuntimeError(f"no autoencoder received for the {req.phase} phase")
        ae_weights = context.state[AE_STATE_KEY].to_torch_state_dict()
    # The message seed drives only non-private randomness (timesteps, label dropout); the
    # privacy randomness is the site's own (client.tasks.site_privacy_rng).
    t0 = time.monotonic()
    sent = req.weights.to_torch_state_dict()
    result = tasks.train_round(
        site, cfg, phase=req.phase, server_round=req.server_round, run_id=req.run.run_name,
        weights=sent, ae_weights=ae_weights,
        scale_factor=1.0 if req.scale_factor is None else req.scale_factor,
        seed=req.run.seed * 1000 + req.server_round * 7 + site.site_index,
        site_slot=req.site_slot,
    )
    # The site's own compute time stays in its log (never in the reply: a timing side channel
    # the protocol does not declare); benchmarks/federation_overhead.py reads it.
    _log(site).info("%s round %s: loss %.4f, epsilon %.3f / %.3f, trained in %.2fs", req.phase,
                    req.server_round, result.loss, result.epsilon, result.budget_epsilon,
                    time.monotonic() - t0)
    arrays = encode_update(result.weights, sent, cfg.aggregation.transfer)
    reply = TrainReply(site_id=site.site_id, weights=ArrayRecord(arrays),
                       loss=result.loss, epsilon=result.epsilon,
                       budget_epsilon=result.budget_epsilon, delta=result.delta,
                       has_autoencoder=AE_STATE_KEY in context.state)
    return _send(msg, site, req.run.run_name, req.phase, req.server_round, reply.to_record())


def _query(msg: Message, context: Context, site: SiteConfig) -> Message:
    if query_task(msg.content) == "latent-stats":
        req = LatentStatsRequest.from_record(msg.content)
        context.state[AE_STATE_KEY] = req.autoencoder
        again = _stored(msg, site, req.run.run_name, "latent-scale", 0)
        if again is not None:
            return again
        stats = tasks.latent_stats(site, _run_config(req.run), run_id=req.run.run_name,
                                   ae_weights=req.autoencoder.to_torch_state_dict())
        reply = LatentStatsReply(site.site_id, stats.second_moment_sum, stats.count,
                                 stats.epsilon, stats.recon_psnr_sum, stats.recon_ssim_sum,
                                 stats.recon_count)
        return _send(msg, site, req.run.run_name, "latent-scale", 0, reply.to_record())
    if query_task(msg.content) == "evaluate":
        return _evaluate_reply(msg, site)
    return _audit_reply(msg, site)


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


def _audit_reply(msg: Message, site: SiteConfig) -> Message:
    """Privacy audit of the final model at the site: samples drawn by the site itself, attacks
    on its own records, a few aggregates released with DP and charged (client.audit)."""
    from client.audit import site_audit
    from ldm_core.models import make_autoencoder, make_denoiser

    req = AuditRequest.from_record(msg.content)
    if not site.allow_audit:
        raise PermissionError(f"site {site.site_id} does not allow audits (allow-audit=false)")
    again = _stored(msg, site, req.run.run_name, "audit", 0)
    if again is not None:
        return again
    cfg = _run_config(req.run)
    ae, dm = make_autoencoder(cfg.model), make_denoiser(cfg.model)
    ae.load_state_dict(req.autoencoder.to_torch_state_dict())
    dm.load_state_dict(req.denoiser.to_torch_state_dict())
    values = site_audit(site, cfg, ae, dm, req.scale_factor, run_id=req.run.run_name,
                        rng=tasks.site_privacy_rng(site, req.run.run_name, "audit", 0),
                        seed=req.run.seed)
    return _send(msg, site, req.run.run_name, "audit", 0,
                 AuditReply(site.site_id, values).to_record())


def _evaluate_reply(msg: Message, site: SiteConfig) -> Message:
    """Utility and recall at the site: the coordinator's classifier and one the site trains
    with DP-SGD, scored on its own test patients, one DP vector out (client.site_eval)."""
    from client.site_eval import site_evaluate

    req = EvaluateRequest.from_record(msg.content)
    if not site.allow_evaluate:
        raise PermissionError(f"site {site.site_id} does not allow evaluations "
                              "(allow-evaluate=false)")
    again = _stored(msg, site, req.run.run_name, "evaluate", 0)
    if again is not None:
        return again
    release = site_evaluate(
        site, _run_config(req.run), req.classifier.to_torch_state_dict(),
        req.synthetic_images(), run_id=req.run.run_name,
        rng=tasks.site_privacy_rng(site, req.run.run_name, "evaluate", 0), seed=req.run.seed)
    reply = EvaluateReply(site.site_id, release.values, release.noise_std, release.n_classes,
                          release.bins, release.epsilon)
    return _send(msg, site, req.run.run_name, "evaluate", 0, reply.to_record())


def _deployment_site(context: Context) -> SiteConfig:
    """A real site's settings come from its own node config (`fedldm site start` writes it).

    Only a node of Flower's simulation runtime (a `partition-id`, no `site-id`) is a simulated
    site whose settings come from the run config: that is `flwr run` of a simulation, where one
    operator runs every site on one machine.
    """
    nc = context.node_config
    if "site-id" not in nc and "partition-id" in nc and str(context.run_config.get("data", "")):
        return SimulationSites.from_run_config(context.run_config)(context)
    return SiteConfig.from_node_config(nc)


class SimulationSites:
    """Maps a simulated SuperNode's partition-id to a SiteConfig (picklable for Ray actors)."""

    def __init__(self, *, data: str, n_sites: int, partition: str, state_root: Path,
                 epsilon: float, delta: float, data_seed: int, device: str,
                 reproducible_seed: int | None = None, allow_audit: bool = True,
                 allow_evaluate: bool = False, allow_masks: bool = True) -> None:
        # allow_masks defaults on: in a simulation the user holds every site's data and chose
        # the paired run; deployed sites opt in with `fedldm site start --allow-masks`.
        self.data, self.n_sites, self.partition = data, n_sites, partition
        self.state_root, self.epsilon, self.delta = Path(state_root), epsilon, delta
        self.data_seed, self.device = data_seed, device
        self.reproducible_seed, self.allow_audit = reproducible_seed, allow_audit
        self.allow_evaluate, self.allow_masks = allow_evaluate, allow_masks

    def site(self, index: int) -> SiteConfig:
        return SiteConfig(site_id=f"site-{index}", data=self.data,
                          state_dir=self.state_root / f"site-{index}", epsilon=self.epsilon,
                          delta=self.delta, partition=self.partition, site_index=index,
                          n_sites=self.n_sites, data_seed=self.data_seed, device=self.device,
                          allow_audit=self.allow_audit, allow_evaluate=self.allow_evaluate,
                          allow_masks=self.allow_masks, reproducible_seed=self.reproducible_seed)

    def __call__(self, context: Context) -> SiteConfig:
        return self.site(int(context.node_config["partition-id"]))

    @staticmethod
    def from_run_config(rc: Mapping[str, Any]) -> SimulationSites:
        """The simulated sites of a `flwr run` simulation (same rules as `fedldm simulate`)."""
        out = Path(str(rc.get("out", "runs/flwr-run")))
        data, partition = simulation_source(str(rc["data"]), out, str(rc.get("partition", "auto")))
        eps = str(rc.get("epsilon", "8"))
        seed = int(rc.get("seed", 0))
        return SimulationSites(data=data, n_sites=int(rc.get("num-sites", 0) or 2),
                               partition=partition, state_root=out / "sites",
                               epsilon=math.inf if eps == "inf" else float(eps),
                               delta=float(rc.get("delta", 1e-5)), data_seed=seed,
                               device=str(rc.get("device", "auto")),
                               reproducible_seed=seed if bool(rc.get("reproducible", False))
                               else None)


app = make_client_app(_deployment_site)
