"""The coordinator's phased federation over a Flower Grid, with checkpoint/resume.

The phases come from the registry (ldm_core.phases.PHASES, in training order): phase 1 averages
the autoencoder, then the sites release a DP latent second moment (the scale factor), then
phase 2 averages the denoiser with the autoencoder frozen. After every round the global weights
go to an atomic checkpoint and `state.json` records where to resume; a run folder that already
holds a finished stage is resumed from there (Flower itself has no resume). Stage names are the
phase names plus "latent-scale" and "done"; checkpoints are named by `Phase.prefix`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from tqdm.auto import tqdm

from common.protocol import (
    AuditReply,
    AuditRequest,
    LatentStatsReply,
    LatentStatsRequest,
    ProtocolError,
    RunRef,
    TrainReply,
    TrainRequest,
)
from ldm_core.checkpoint import load_checkpoint, save_checkpoint
from ldm_core.config import RunConfig, to_dict
from ldm_core.phases import AUTOENCODER, DIFFUSION, PHASES, Phase
from ldm_core.privacy import pooled_scale_factor
from server.run_folder import RunFolder
from server.spend import SpendRegistry

LATENT_SCALE = "latent-scale"  # the stage between the autoencoder and the phases that need it
DONE = "done"


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites answered, bad updates...)."""


@dataclass(frozen=True)
class ServerSettings:
    out: Path
    min_sites: int = 1
    expected_sites: int | None = None
    wait_for_sites_s: float = 300.0
    round_timeout_s: float = 3600.0
    show_progress: bool = True
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # Where the coordinator remembers each site's highest reported epsilon (server.spend);
    # default: the run folder. Deployments share one file across runs.
    spend_registry: Path | None = None


def _initial_models(cfg: RunConfig) -> dict[str, torch.nn.Module]:
    """The global model of every phase by phase name: seeded init, or the phase's public prior.

    All models are built (in phase order) before any prior is loaded, so the seeded random
    initialisation of a phase does not depend on which priors are configured.
    """
    torch.manual_seed(cfg.seed)
    models = {p.name: p.make_model(cfg.model) for p in PHASES.values()}
    for p in PHASES.values():
        prior = p.initial_weights(cfg)
        if prior is not None:
            models[p.name].load_state_dict(prior)
    return models


def _wait_for_nodes(grid: Grid, settings: ServerSettings) -> list[int]:
    want = settings.expected_sites or settings.min_sites
    deadline = time.monotonic() + settings.wait_for_sites_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= want:
            return sorted(nodes)
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} site(s) connected after "
                                  f"{settings.wait_for_sites_s:.0f}s, {want} needed; check that "
                                  "the site daemons run and can reach the SuperLink")
        time.sleep(1.0)


def check_update(reference: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> str | None:
    """Why an update is unusable (None if fine): wrong keys, shapes or non-finite values."""
    if set(reference) != set(update):
        return "parameter names differ from the global model"
    for k, ref in reference.items():
        u = update[k]
        if tuple(u.shape) != tuple(ref.shape):
            return f"{k} has shape {tuple(u.shape)}, expected {tuple(ref.shape)}"
        if u.is_floating_point() and not torch.isfinite(u).all():
            return f"{k} has non-finite values"
    return None


class Coordinator:
    """Runs (or resumes) one federated run into a run folder."""

    def __init__(self, grid: Grid, cfg: RunConfig, settings: ServerSettings) -> None:
        self.grid, self.cfg, self.settings = grid, cfg, settings
        self.folder = RunFolder(settings.out)
        # Build the models before touching the disk: a bad config leaves no empty run folder.
        self.models = _initial_models(cfg)
        self.folder.create()
        self.log = self.folder.logger()
        self.spend = SpendRegistry(settings.spend_registry or self.folder.root / "site-spend.json")
        self.strategy = FedAvg(fraction_train=1.0, min_train_nodes=settings.min_sites,
                               min_available_nodes=settings.min_sites)
        self.state: dict[str, Any] = {"stage": next(iter(PHASES)), "round": 0,
                                      "scale_factor": None,
                                      "run_name": f"run-{uuid.uuid4().hex[:12]}"}
        self.metrics: dict[str, Any] = {
            "config": to_dict(cfg), "training": [], "rounds": [],
            "privacy": {"sites": {}, "rounds": [], "private": cfg.privacy.private},
            "meta": dict(settings.extra_meta),
        }
        self._resume()

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        saved = self.folder.load_state()
        if saved is None:
            return
        if saved.get("config") != to_dict(self.cfg):
            raise FederationError(
                f"{self.folder.state_path} belongs to a run with another configuration; use a "
                "new --out folder, or the same settings to resume this one")
        self.state = saved
        if saved.get("checkpoint"):
            tensors, _ = load_checkpoint(self.folder.checkpoints / saved["checkpoint"])
            for p in PHASES.values():
                self.models[p.name].load_state_dict(tensors[p.checkpoint_key])
        self.metrics = self.folder.load_metrics() or self.metrics
        self.log.info("resuming %s at stage %s after round %s", saved["run_name"],
                      saved["stage"], saved["round"])

    @property
    def ae(self) -> torch.nn.Module:
        """The global autoencoder (frozen for, and sent to, the phases that need it)."""
        return self.models[AUTOENCODER.name]

    @property
    def dm(self) -> torch.nn.Module:
        """The global denoiser: what the generator samples with, audits and samples use it."""
        return self.models[DIFFUSION.name]

    def _checkpoint(self, name: str, stage: str, rnd: int) -> None:
        meta = {"config": to_dict(self.cfg), "stage": stage, "round": rnd,
                "scale_factor": self.state.get("scale_factor"), "run_name": self.state["run_name"]}
        save_checkpoint(self.folder.checkpoints / name,
                        {p.checkpoint_key: self.models[p.name].state_dict()
                         for p in PHASES.values()}, meta)
        self.state.update({"stage": stage, "round": rnd, "checkpoint": name,
                           "config": to_dict(self.cfg)})
        self.folder.save_state(self.state)
        self.folder.save_metrics(self.metrics)

    # ------------------------------------------------------------------ messaging
    def _run_ref(self) -> RunRef:
        return RunRef(self.cfg.to_json(), self.state["run_name"], self.cfg.seed)

    def _send(self, nodes: Iterable[int], content_for: Any, message_type: str,
              group: str) -> list[Message]:
        msgs = [Message(content_for(n), dst_node_id=n, message_type=message_type,
                        group_id=group) for n in nodes]
        return list(self.grid.send_and_receive(msgs, timeout=self.settings.round_timeout_s))

    def _split_replies(self, replies: list[Message], what: str) -> list[Message]:
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                self.log.warning("%s: node %s replied with an error: %s", what,
                                 r.metadata.src_node_id, r.error.reason)
                tqdm.write(f"  ! {what}: {r.error.reason}")
                self.metrics.setdefault("errors", []).append(
                    {"stage": what, "node": r.metadata.src_node_id, "reason": r.error.reason})
        if len(ok) < self.settings.min_sites:
            self.folder.save_metrics(self.metrics)
            raise FederationError(f"{what}: only {len(ok)} site(s) replied successfully, "
                                  f"{self.settings.min_sites} needed; see {self.folder.root}/"
                                  "run.log (the last good checkpoint is kept: rerun the same "
                                  "command to resume)")
        return ok

    # ------------------------------------------------------------------ phases
    def _train_round(self, spec: Phase, rnd: int, nodes: list[int], send_ae: set[int]) -> None:
        phase = spec.name
        model = self.models[phase]
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        arrays = ArrayRecord(model.state_dict())
        ae_arrays = ArrayRecord(self.ae.state_dict()) if spec.needs_autoencoder else None
        scale = float(self.state["scale_factor"]) if spec.needs_autoencoder else None
        run = self._run_ref()

        def content(node: int) -> RecordDict:
            return TrainRequest(run, phase, rnd, arrays,
                                ae_arrays if node in send_ae else None, scale).to_record()

        t0 = time.monotonic()
        replies = self._split_replies(self._send(nodes, content, MessageType.TRAIN,
                                                 f"{phase}-{rnd}"), f"{phase} round {rnd}")
        good: list[Message] = []
        losses: list[float] = []
        for r in replies:
            node = r.metadata.src_node_id
            try:
                reply = TrainReply.from_record(r.content)
                why = check_update(reference, reply.weights.to_torch_state_dict())
                if why is None:
                    why = self._check_site(node, reply.site_id, reply.epsilon)
            except ProtocolError as err:
                why = str(err)
            if why:
                self.log.warning("rejecting update from node %s: %s", node, _bounded(why))
                self.metrics.setdefault("errors", []).append(
                    {"stage": f"{phase} round {rnd}", "node": node, "reason": _bounded(why)})
                continue
            # Sites are weighted equally: the aggregation sees only the declared weights.
            good.append(_equal_weight(r, reply.weights))
            losses.append(reply.loss)
            if spec.needs_autoencoder and reply.has_autoencoder:
                send_ae.discard(node)
            self._record_site(reply.site_id, phase, rnd, reply)
        if len(good) < self.settings.min_sites:
            raise FederationError(f"{phase} round {rnd}: only {len(good)} usable update(s)")
        agg, _ = self.strategy.aggregate_train(rnd, good)
        if agg is None:
            raise FederationError(f"{phase} round {rnd}: aggregation produced nothing")
        model.load_state_dict(agg.to_torch_state_dict())
        self.metrics["rounds"].append({
            "phase": phase, "round": rnd, "loss": sum(losses) / len(losses),
            "sites_ok": len(good), "sites_failed": len(nodes) - len(good),
            "seconds": round(time.monotonic() - t0, 2)})
        self.log.info("%s round %d: mean DP loss %.4f from %d site(s) in %.1fs", phase, rnd,
                      sum(losses) / len(losses), len(good), time.monotonic() - t0)

    def _check_site(self, node: int, site: str, epsilon: float) -> str | None:
        """Bind a site name to the node that first used it, and refuse spend that went down.

        A site's cumulative epsilon can only grow; a lower figure means its ledger was reset or
        it lies, and either way its privacy accounting can no longer be trusted.
        """
        owners = self.state.setdefault("site_nodes", {})
        owner = owners.setdefault(site, node)
        if owner != node:
            return f"claims to be {site!r}, which is node {owner}"
        last = self.spend.get(site)
        if last is not None and epsilon < last - 1e-9:
            return (f"site {site!r} reports cumulative epsilon {epsilon:.6g}, below the "
                    f"{last:.6g} it reported before: its ledger was reset or it is lying; "
                    "refused (the site must restore its ledger from backup)")
        self.spend.record(site, epsilon)
        return None

    def _record_site(self, site: str, phase: str, rnd: int, reply: TrainReply) -> None:
        entry = {"phase": phase, "round": rnd, "site": site, "loss": reply.loss,
                 "epsilon": reply.epsilon}
        self.metrics["training"].append(entry)
        self.metrics["privacy"]["rounds"].append(
            {"site": site, "phase": phase, "round": rnd, "epsilon": reply.epsilon})
        s = self.metrics["privacy"]["sites"].setdefault(site, {})
        s.update({"epsilon": reply.epsilon, "delta": reply.delta,
                  "budget_epsilon": reply.budget_epsilon})

    def _latent_scale(self, nodes: list[int]) -> float:
        request = LatentStatsRequest(self._run_ref(), ArrayRecord(self.ae.state_dict()))
        replies = self._split_replies(
            self._send(nodes, lambda n: request.to_record(), MessageType.QUERY, "latent-stats"),
            "latent scale")
        stats = []
        for r in replies:
            node = r.metadata.src_node_id
            try:
                reply = LatentStatsReply.from_record(r.content)
                why = self._check_site(node, reply.site_id, reply.epsilon)
            except ProtocolError as err:
                why = str(err)
            if why:
                self.log.warning("latent scale: rejecting node %s: %s", node, _bounded(why))
                continue
            stats.append((reply.second_moment_sum, reply.count))
            s = self.metrics["privacy"]["sites"].setdefault(reply.site_id, {})
            s["epsilon"] = reply.epsilon
        if len(stats) < self.settings.min_sites:
            raise FederationError(f"latent scale: only {len(stats)} usable replies")
        scale, note = pooled_scale_factor(stats, clip=self.cfg.privacy.scale_clip)
        self.metrics["latent_scale"] = {"scale_factor": scale, "released": "DP Gaussian "
                                        "mechanism on clipped per-patient latent second moments, "
                                        "charged to each site's ledger", "note": note}
        if note:
            self.log.warning("latent scale: %s", note)
        self.log.info("latent scale factor %.4f from %d site(s)", scale, len(stats))
        return scale

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        nodes = _wait_for_nodes(self.grid, self.settings)
        self.metrics["meta"]["sites_connected"] = len(nodes)
        self.log.info("run %s with %d site(s)", self.state["run_name"], len(nodes))
        # Stages in order: each phase, with the latent-scale release right after the autoencoder
        # (a new autoencoder invalidates the scale factor), then "done".
        phases = list(PHASES.values())
        for i, spec in enumerate(phases):
            after = phases[i + 1].name if i + 1 < len(phases) else DONE
            if self.state["stage"] == spec.name:
                rounds = spec.config(self.cfg).rounds
                self._phase(spec, rounds, nodes, set(nodes) if spec.needs_autoencoder else set())
                if spec is AUTOENCODER:
                    self.state["scale_factor"] = None
                    self._checkpoint(f"{spec.prefix}-final", LATENT_SCALE, 0)
                elif after == DONE:
                    self._checkpoint("final", DONE, rounds)
                else:
                    self._checkpoint(f"{spec.prefix}-final", after, 0)
            if spec is AUTOENCODER and self.state["stage"] == LATENT_SCALE:
                self.state["scale_factor"] = self._latent_scale(nodes)
                self._checkpoint(f"{spec.prefix}-final", after, 0)
        self.metrics["privacy"]["summary"] = _privacy_summary(self.metrics["privacy"])
        self.folder.save_metrics(self.metrics)
        return self.metrics

    def audit(self) -> list[dict[str, Any]]:
        """Ask every site for its privacy audit of the final model.

        Only the model goes out: each site draws its own samples, attacks its own records and
        returns a few aggregates, released with DP and charged to its ledger (common.protocol).
        """
        nodes = sorted(self.grid.get_node_ids())
        request = AuditRequest(self._run_ref(), ArrayRecord(self.dm.state_dict()),
                               ArrayRecord(self.ae.state_dict()),
                               float(self.state["scale_factor"]))
        replies = self._send(nodes, lambda n: request.to_record(), MessageType.QUERY, "audit")
        out = []
        for r in replies:
            if r.has_error():
                self.log.warning("audit: node %s: %s", r.metadata.src_node_id,
                                 _bounded(r.error.reason))
                tqdm.write(f"  ! audit: {_bounded(r.error.reason)}")
                continue
            try:
                reply = AuditReply.from_record(r.content)
            except ProtocolError as err:
                self.log.warning("audit: rejecting node %s: %s", r.metadata.src_node_id,
                                 _bounded(str(err)))
                continue
            out.append({"site": reply.site_id, **reply.values})
        return out

    def _phase(self, spec: Phase, rounds: int, nodes: list[int], send_ae: set[int]) -> None:
        start = int(self.state["round"]) + 1 if self.state["stage"] == spec.name else 1
        bar = tqdm(range(start, rounds + 1), desc=f"{spec.name} rounds", initial=start - 1,
                   total=rounds, disable=not self.settings.show_progress)
        for rnd in bar:
            self._train_round(spec, rnd, nodes, send_ae)
            last = self.metrics["rounds"][-1]
            bar.set_postfix(loss=f"{last['loss']:.4f}", eps=_max_eps(self.metrics))
            self._checkpoint(f"{spec.prefix}-round-{rnd:03d}", spec.name, rnd)
        bar.close()


def _equal_weight(reply: Message, weights: ArrayRecord) -> Message:
    """The reply as FedAvg sees it: the declared weights only, every site weighted 1 (a site's
    self-reported size would let it take over the average, and would reveal its size)."""
    return Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 1})}),
                   dst_node_id=reply.metadata.src_node_id, message_type=MessageType.TRAIN)


def _bounded(text: str, limit: int = 300) -> str:
    """One log line, bounded and escaped: a site must not be able to forge log lines."""
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def _max_eps(metrics: dict[str, Any]) -> str:
    eps = [s.get("epsilon", 0.0) for s in metrics["privacy"]["sites"].values()]
    return f"{max(eps):.2f}" if eps else "-"


def _privacy_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    sites = privacy["sites"]
    eps = [s.get("epsilon", 0.0) for s in sites.values()]
    return {"max_epsilon": max(eps) if eps else 0.0,
            "all_within_budget": all(s.get("epsilon", 0) <= s.get("budget_epsilon", math.inf)
                                     + 1e-9 for s in sites.values())}

