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
import statistics
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from common.protocol import (
    PROTOCOL_VERSION,
    AuditReply,
    AuditRequest,
    EvaluateReply,
    EvaluateRequest,
    LatentStatsReply,
    LatentStatsRequest,
    ProtocolError,
    RunRef,
    TrainReply,
    TrainRequest,
    decode_update,
    other_version_run,
)
from common.provenance import code_version
from ldm_core.checkpoint import load_checkpoint, save_checkpoint
from ldm_core.config import ConfigError, RunConfig, to_dict
from ldm_core.phases import AUTOENCODER, DIFFUSION, PHASES, Phase
from ldm_core.training import frozen_names
from server.aggregate import (
    aggregate,
    check_update,
    latent_stats_problem,
    mean_state,
    norm_outliers,
    pooled_recon_quality,
    recon_quality_problem,
    robust_scale_factor,
    server_step,
)
from server.exchange import send_and_receive
from server.run_folder import RunFolder
from server.run_metrics import (
    FederationMetrics,
    LatentScale,
    PrivacyBlock,
    PrivacyRound,
    Reconstruction,
    Rejection,
    RoundRecord,
    SiteRound,
)
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
    # A site whose SuperNode died mid-round and came back never answers the lost message (and
    # Flower reports a node as unavailable only while it stays offline). After the timeout the
    # round is sent again to the silent sites: a site that stored its reply answers from the
    # store, one that crashed before storing it trains again under a new charge (the retry
    # reserve pays for it).
    round_retries: int = 2
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


__all__ = ["Coordinator", "FederationError", "ServerSettings", "check_update"]

# Slack on "epsilon <= budget": ledgers refuse any charge beyond the budget, so only float
# round-off may show.
_EPS_TOLERANCE = 1e-9


class Coordinator:
    """Runs (or resumes) one federated run into a run folder."""

    def __init__(self, grid: Grid, cfg: RunConfig, settings: ServerSettings) -> None:
        self.grid, self.cfg, self.settings = grid, cfg, settings
        self.folder = RunFolder(settings.out)
        # Build the models before touching the disk: a bad config leaves no empty run folder.
        self.models = _initial_models(cfg)
        # The running phase's FedAvgM buffer (server_momentum > 0), saved with every round
        # checkpoint so a resumed run continues the same trajectory.
        self.momentum: dict[str, dict[str, torch.Tensor]] = {}
        self.folder.create()
        self.log = self.folder.logger()
        self.code = code_version()  # which code trains: state.json and metrics.json keep it
        self.spend = SpendRegistry(settings.spend_registry or self.folder.root / "site-spend.json")
        self.state: dict[str, Any] = {"stage": next(iter(PHASES)), "round": 0,
                                      "scale_factor": None,
                                      "run_name": f"run-{uuid.uuid4().hex[:12]}",
                                      "protocol": PROTOCOL_VERSION,
                                      "code": [self.code]}
        self.metrics = FederationMetrics(
            config=to_dict(cfg), privacy=PrivacyBlock(sites={}, rounds=[],
                                                      private=cfg.privacy.private),
            meta=dict(settings.extra_meta))
        resumed = self._resume()
        self.metrics.meta["code"] = list(self.state["code"])
        if not resumed:
            # The run's name is durable before any site hears of it: a coordinator killed
            # before its first checkpoint resumes the same run, so the sites' stored replies
            # answer the retried round instead of a new run charging them all over again.
            self.state["config"] = to_dict(cfg)
            self.folder.save_state(self.state)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> bool:
        saved = self.folder.load_state()
        if saved is None:
            return False
        reason = other_version_run(str(self.folder.root), saved.get("protocol"))
        if reason:
            raise FederationError(reason)
        if _normalised(saved.get("config")) != to_dict(self.cfg):
            raise FederationError(
                f"{self.folder.state_path} belongs to a run with another configuration; use a "
                "new --out folder, or the same settings to resume this one")
        self.state = saved
        # Every code version that trained this run, in order (runs made before the field
        # existed start their list at this resume).
        code = list(saved.get("code") or [])
        if not code or code[-1] != self.code:
            code.append(self.code)
        self.state["code"] = code
        if saved.get("checkpoint"):
            tensors, _ = load_checkpoint(self.folder.checkpoints / saved["checkpoint"])
            for p in PHASES.values():
                self.models[p.name].load_state_dict(tensors[p.checkpoint_key])
                if _momentum_key(p) in tensors:
                    self.momentum[p.name] = tensors[_momentum_key(p)]
        saved_metrics = self.folder.load_metrics()
        if saved_metrics:
            self.metrics = _committed(FederationMetrics.from_json(saved_metrics),
                                      str(saved["stage"]), int(saved["round"]))
        self.log.info("resuming %s at stage %s after round %s with %s", saved["run_name"],
                      saved["stage"], saved["round"], code[-1])
        return True

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
        modules = {p.checkpoint_key: self.models[p.name].state_dict() for p in PHASES.values()}
        modules.update({_momentum_key(PHASES[phase]): buf for phase, buf in self.momentum.items()
                        if buf})
        save_checkpoint(self.folder.checkpoints / name, modules, meta)
        # metrics.json first, state.json last: the state is the commit point. A kill between
        # the two leaves metrics one round ahead, which the resume trims (`_committed`); the
        # other order lost a finished round's record for good.
        self.folder.save_metrics(self.metrics.to_json())
        self.state.update({"stage": stage, "round": rnd, "checkpoint": name,
                           "config": to_dict(self.cfg)})
        self.folder.save_state(self.state)

    # ------------------------------------------------------------------ messaging
    def _run_ref(self) -> RunRef:
        return RunRef(self.cfg.to_json(), self.state["run_name"], self.cfg.seed)

    def _send(self, nodes: Iterable[int], content_for: Any, message_type: str,
              group: str) -> list[tuple[int, Message]]:
        """Send one message per node and collect (node, reply) pairs, asking silent or
        unavailable nodes again (`round_retries`). A site's own reply is attributed to its
        authenticated node; an error the SuperLink generated for a node (unavailable: Flower
        sends it from the SuperLink's id) to the node the message was addressed to."""
        nodes = list(nodes)
        replies: list[tuple[int, Message]] = []
        for attempt in range(1 + self.settings.round_retries):
            msgs = [Message(content_for(n), dst_node_id=n, message_type=message_type,
                            group_id=group) for n in nodes]
            started = time.monotonic()
            got = send_and_receive(self.grid, msgs, timeout=self.settings.round_timeout_s)
            addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs
                         if m.metadata.message_id}
            pairs = [(_origin(r, addressed), r) for r in got]
            last = attempt == self.settings.round_retries
            lost = set() if last else {n for n, r in pairs if r.has_error()
                                       and r.error.code == ErrorCode.NODE_UNAVAILABLE}
            replies += [(n, r) for n, r in pairs if n not in lost]
            answered = {n for n, _ in replies}
            nodes = [n for n in nodes if n not in answered]
            if not nodes:
                break
            if last:
                for n in nodes:
                    why = (f"no reply within {self.settings.round_timeout_s:.0f}s, "
                           f"{self.settings.round_retries + 1} times")
                    self.log.warning("%s: node %s: %s", group, n, why)
                    self.metrics.errors.append(Rejection(group, n, why))
                break
            self.log.warning("%s: no reply from node(s) %s (%s): asking again (%d of %d)",
                             group, ", ".join(map(str, nodes)),
                             "unavailable" if lost else
                             f"nothing within {self.settings.round_timeout_s:.0f}s",
                             attempt + 1, self.settings.round_retries)
            if lost:
                self._wait_for_return(lost, until=started + self.settings.round_timeout_s)
        return replies

    def _wait_for_return(self, nodes: set[int], *, until: float) -> None:
        """A crashed site's SuperNode is let back in only once the SuperLink has marked it
        offline; re-sending before it is online again only earns another 'unavailable'."""
        while time.monotonic() < until:
            if nodes <= set(self.grid.get_node_ids()):
                return
            time.sleep(min(2.0, max(0.0, until - time.monotonic())))

    def _split_replies(self, replies: list[tuple[int, Message]], what: str,
                       nodes: Iterable[int] | None = None) -> list[Message]:
        """The replies without an error, at most one per node asked (sites are untrusted: an
        error reason is bounded and escaped before it reaches run.log or metrics.json)."""
        asked = None if nodes is None else set(nodes)
        ok, seen = [], set()
        for node, r in replies:
            if node in seen or (asked is not None and node not in asked):
                self.log.warning("%s: ignoring an unexpected extra reply from node %s", what,
                                 node)
                continue
            seen.add(node)
            if r.has_error():
                reason = _bounded(r.error.reason)
                self.log.warning("%s: node %s replied with an error: %s", what, node, reason)
                tqdm.write(f"  ! {what}: node {node}: {reason}")
                self.metrics.errors.append(Rejection(what, node, reason))
            else:
                ok.append(r)
        self._require_quorum(len(ok), what, "site(s) replied successfully")
        return ok

    def _require_quorum(self, count: int, what: str, noun: str) -> None:
        """Stop the run (metrics saved, last checkpoint kept) when fewer than min_sites remain."""
        if count >= self.settings.min_sites:
            return
        self.folder.save_metrics(self.metrics.to_json())
        raise FederationError(f"{what}: only {count} {noun}, {self.settings.min_sites} needed; "
                              f"see {self.folder.root}/run.log (the last good checkpoint is kept: "
                              "rerun the same command to resume)")

    # ------------------------------------------------------------------ vetting
    def _reject(self, stage: str, node: int, why: str, flag_site: str | None = None) -> None:
        """One bounded, escaped log line and one metrics entry per rejected reply; a privacy
        violation is also listed under the site's privacy entry (the report shows it)."""
        reason = _bounded(why)
        self.log.warning("%s: rejecting node %s: %s", stage, node, reason)
        self.metrics.errors.append(Rejection(stage, node, reason))
        if flag_site is not None:
            entry = self.metrics.site(flag_site)
            self.metrics.set_site(flag_site, replace(entry,
                                                     flags=(*entry.flags, f"{stage}: {reason}")))

    def _claim(self, node: int, site: str) -> str | None:
        """Bind a site name to the first node that uses it, and each node to one name."""
        owners = self.state.setdefault("site_nodes", {})
        owner = owners.get(site, node)
        if owner != node:
            return f"claims to be {site!r}, which is node {owner}"
        names = [s for s, n in owners.items() if n == node and s != site]
        if names:
            return f"claims to be {site!r}, but it is {names[0]!r}"
        owners[site] = node
        return None

    def _privacy_problem(self, site: str, epsilon: float, budget: float | None = None,
                         delta: float | None = None) -> str | None:
        """Why a site's privacy figures cannot be believed (None if they can): spend negative,
        above the site's budget, or below what it reported before; budget or delta other than
        in its earlier replies of this run. Nothing is recorded here."""
        if math.isnan(epsilon) or epsilon < 0:
            return f"site {site!r} reports epsilon {epsilon!r}: not a cumulative spend"
        known = self.state.get("site_privacy", {}).get(site)
        if budget is not None:
            if math.isnan(budget) or budget <= 0:
                return f"site {site!r} reports budget epsilon {budget!r}"
            if known is not None and _decode(known["budget_epsilon"]) != budget:
                return (f"site {site!r} reports budget epsilon {budget:.6g}, but "
                        f"{_decode(known['budget_epsilon']):.6g} earlier in this run")
        if delta is not None:
            if not 0 < delta < 1:
                return f"site {site!r} reports delta {delta!r}"
            if known is not None and known["delta"] != delta:
                return (f"site {site!r} reports delta {delta:.6g}, but {known['delta']:.6g} "
                        "earlier in this run")
        limit = budget if budget is not None else (
            _decode(known["budget_epsilon"]) if known is not None else None)
        if limit is not None and epsilon > limit * (1 + _EPS_TOLERANCE) + _EPS_TOLERANCE:
            return (f"site {site!r} reports cumulative epsilon {epsilon:.6g}, above its budget "
                    f"{limit:.6g}")
        last = self.spend.get(site)
        if last is not None and epsilon < last - 1e-9:
            return (f"site {site!r} reports cumulative epsilon {epsilon:.6g}, below the "
                    f"{last:.6g} it reported before: its ledger was reset or it is lying; "
                    "refused (the site must restore its ledger from backup)")
        return None

    def _believe(self, site: str, epsilon: float, budget: float | None = None,
                 delta: float | None = None) -> None:
        """Record the privacy figures of an accepted reply (the only ones ever believed)."""
        self.spend.record(site, epsilon)
        if budget is not None and delta is not None:
            self.state.setdefault("site_privacy", {}).setdefault(
                site, {"budget_epsilon": _encode(budget), "delta": delta})

    def _check_site(self, node: int, site: str, epsilon: float) -> str | None:
        """Bind a site name to the node that first used it, and refuse spend that went down.

        A site's cumulative epsilon can only grow; a lower figure means its ledger was reset or
        it lies, and either way its privacy accounting can no longer be trusted. Records the
        figure when it is believed.
        """
        why = self._claim(node, site) or self._privacy_problem(site, epsilon)
        if why is None:
            self._believe(site, epsilon)
        return why

    def _site_slots(self, nodes: list[int]) -> dict[int, int]:
        """Site-conditional model: each node's slot, by the site name it answered with so far.

        Slots go to site names in sorted order the first time they are needed and are kept in
        state.json, so a resumed run gives every site the slot it trained with. A node whose
        name is not known yet, or beyond the model's slots, gets none (it trains "any site")."""
        n = self.cfg.model.site_slots
        if n == 0:
            return {}
        slots: dict[str, int] = self.state.setdefault("site_slots", {})
        names = {node: site for site, node in self.state.get("site_nodes", {}).items()}
        for site in sorted(names[node] for node in nodes if node in names):
            if site not in slots and len(slots) < n:
                slots[site] = len(slots)
        out = {node: slots[names[node]] for node in nodes if names.get(node) in slots}
        missing = [node for node in nodes if node not in out]
        if missing:
            self.log.warning("site-conditional model: nodes %s have no site slot (unknown "
                             "name or more sites than model.site_slots=%d); they train 'any "
                             "site' only", missing, n)
        return out

    def _vet_identity(self, node: int, content: RecordDict) -> tuple[str | None, str | None]:
        """(the site name the node may speak for, or None; why the reply is refused, or None)."""
        site = _claimed_site(content)
        if site is None:
            return None, None  # the strict decoding says what is wrong
        return site, self._claim(node, site)

    def _vet_train(self, node: int, content: RecordDict, reference: dict[str, torch.Tensor]
                   ) -> tuple[TrainReply | None, dict[str, torch.Tensor] | None, str | None,
                              str | None]:
        """(reply, update, why refused, site to flag) for one train reply, checked alone."""
        site, why = self._vet_identity(node, content)
        if why:
            return None, None, why, None
        figures = _claimed_figures(content, ("epsilon", "budget-epsilon", "delta"))
        if site is not None and figures is not None:
            why = self._privacy_problem(site, *figures)
            if why:
                return None, None, why, site
        try:
            reply = TrainReply.from_record(content)
        except ProtocolError as err:
            return None, None, str(err), None
        if not math.isfinite(reply.loss):
            return None, None, f"loss {reply.loss!r} is not finite", None
        try:
            update = decode_update(reply.weights.to_torch_state_dict(), reference,
                                   self.cfg.aggregation.transfer)
        except ProtocolError as err:
            return None, None, str(err), None
        except Exception as err:  # noqa: BLE001 - whatever a hostile array does, refuse it
            return None, None, f"weights cannot be read ({type(err).__name__}: {err})", None
        why = check_update(reference, update)
        return (None, None, why, None) if why else (reply, update, None, None)

    # ------------------------------------------------------------------ phases
    def _train_round(self, spec: Phase, rnd: int, nodes: list[int], send_ae: set[int]) -> None:
        phase = spec.name
        model = self.models[phase]
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # With train_only, only the trained part comes back (frozen parameters stay the
        # coordinator's); a reply must hold exactly that part.
        frozen = frozen_names(model, spec.config(self.cfg).train_only)
        travels = {k: v for k, v in reference.items() if k not in frozen}
        arrays = ArrayRecord(model.state_dict())
        ae_arrays = ArrayRecord(self.ae.state_dict()) if spec.needs_autoencoder else None
        scale = float(self.state["scale_factor"]) if spec.needs_autoencoder else None
        run = self._run_ref()
        stage = f"{phase} round {rnd}"

        slots = self._site_slots(nodes) if spec.needs_autoencoder else {}

        def content(node: int) -> RecordDict:
            return TrainRequest(run, phase, rnd, arrays,
                                ae_arrays if node in send_ae else None, scale,
                                slots.get(node)).to_record()

        t0 = time.monotonic()
        replies = self._split_replies(self._send(nodes, content, MessageType.TRAIN,
                                                 f"{phase}-{rnd}"), stage, nodes)
        # Each reply alone: identity, privacy figures, protocol, loss, weights.
        vetted: dict[int, tuple[TrainReply, dict[str, torch.Tensor]]] = {}
        for r in replies:
            node = r.metadata.src_node_id
            reply, update, why, flag = self._vet_train(node, r.content, travels)
            if why or reply is None or update is None:
                self._reject(stage, node, why or "unusable reply", flag)
                continue
            vetted[node] = (reply, update)
        # Then against each other: an update far from its peers' is refused.
        far = norm_outliers(travels, {n: u for n, (_, u) in vetted.items()},
                            self.cfg.aggregation.norm_bound)
        for node, why in far.items():
            self._reject(stage, node, why)
            del vetted[node]
        self._require_quorum(len(vetted), stage, "usable update(s)")
        losses = []
        for node, (reply, _) in vetted.items():
            self._believe(reply.site_id, reply.epsilon, reply.budget_epsilon, reply.delta)
            losses.append(reply.loss)
            if spec.needs_autoencoder and reply.has_autoencoder:
                send_ae.discard(node)
            self._record_site(reply.site_id, phase, rnd, reply)
        try:
            agg, how = aggregate(travels, {n: u for n, (_, u) in vetted.items()},
                                 self.cfg.aggregation, rnd)
        except Exception as err:  # noqa: BLE001 - Flower's AggregationError, ValueError...
            raise FederationError(f"{stage}: aggregation failed: {err}") from err
        pc = spec.config(self.cfg)
        if pc.server_momentum > 0 or pc.server_lr != 1:
            agg, buffer = server_step(travels, agg, self.momentum.get(phase),
                                      momentum=pc.server_momentum, lr=pc.server_lr)
            if pc.server_momentum > 0:  # without momentum there is nothing to carry over
                self.momentum[phase] = buffer
            if not all(torch.isfinite(v).all() for v in agg.values() if v.is_floating_point()):
                raise FederationError(f"{stage}: the server step (momentum "
                                      f"{pc.server_momentum:g}, lr {pc.server_lr:g}, an "
                                      f"effective step of up to lr / (1 - momentum)) diverged "
                                      "to non-finite weights; lower diffusion.server_lr")
            how += f", server momentum {pc.server_momentum:g} lr {pc.server_lr:g}"
        model.load_state_dict({**reference, **agg})
        loss = statistics.median(losses) if len(losses) >= 3 else sum(losses) / len(losses)
        self.metrics.rounds.append(RoundRecord(
            phase=phase, round=rnd, loss=loss, sites_ok=len(vetted),
            sites_failed=len(nodes) - len(vetted), aggregation=how,
            seconds=round(time.monotonic() - t0, 2)))
        self.log.info("%s: DP loss %.4f (%s) from %d site(s) in %.1fs", stage, loss, how,
                      len(vetted), time.monotonic() - t0)

    def _record_site(self, site: str, phase: str, rnd: int, reply: TrainReply) -> None:
        self.metrics.training.append(SiteRound(phase, rnd, site, reply.loss, reply.epsilon))
        assert self.metrics.privacy.rounds is not None
        self.metrics.privacy.rounds.append(
            PrivacyRound(site, phase, rnd, reply.epsilon).to_json())
        self.metrics.set_site(site, replace(self.metrics.site(site), epsilon=reply.epsilon,
                                            delta=reply.delta,
                                            budget_epsilon=reply.budget_epsilon))

    def _latent_scale(self, nodes: list[int]) -> float:
        request = LatentStatsRequest(self._run_ref(), ArrayRecord(self.ae.state_dict()))
        stage = "latent scale"
        replies = self._split_replies(
            self._send(nodes, lambda n: request.to_record(), MessageType.QUERY, "latent-stats"),
            stage, nodes)
        priv = self.cfg.privacy
        accepted: list[LatentStatsReply] = []
        for r in replies:
            node = r.metadata.src_node_id
            site, why = self._vet_identity(node, r.content)
            flag = None
            if not why:
                figures = _claimed_figures(r.content, ("epsilon",))
                if site is not None and figures is not None:
                    why = self._privacy_problem(site, *figures)
                    flag = site if why else None
            if not why:
                try:
                    reply = LatentStatsReply.from_record(r.content)
                    why = latent_stats_problem(reply.second_moment_sum, reply.count,
                                               clip=priv.scale_clip,
                                               noise_multiplier=priv.scale_noise_multiplier) \
                        or recon_quality_problem(reply.recon_psnr_sum, reply.recon_ssim_sum,
                                                 reply.recon_count,
                                                 noise_multiplier=priv.scale_noise_multiplier)
                except ProtocolError as err:
                    why = str(err)
            if why:
                self._reject(stage, node, why, flag)
                continue
            accepted.append(reply)
        self._require_quorum(len(accepted), "latent scale", "usable replies")
        for reply in accepted:
            self._believe(reply.site_id, reply.epsilon)
            self.metrics.set_site(reply.site_id, replace(self.metrics.site(reply.site_id),
                                                         epsilon=reply.epsilon))
        scale, note = robust_scale_factor([(a.second_moment_sum, a.count) for a in accepted],
                                          clip=priv.scale_clip,
                                          method=self.cfg.aggregation.method)
        self.metrics.latent_scale = LatentScale(
            scale, "DP Gaussian mechanism on clipped per-patient latent second moments, charged "
            "to each site's ledger", note)
        if note:
            self.log.warning("latent scale: %s", note)
        self.log.info("latent scale factor %.4f from %d site(s)", scale, len(accepted))
        self.metrics.reconstruction = self._reconstruction(accepted)
        return scale

    def _reconstruction(self, accepted: list[LatentStatsReply]) -> Reconstruction:
        """The autoencoder's holdout reconstruction quality, pooled and per site."""
        sigma = self.cfg.privacy.scale_noise_multiplier
        method = self.cfg.aggregation.method

        def pooled(replies: list[LatentStatsReply]) -> dict[str, float | None]:
            return pooled_recon_quality(
                [(a.recon_psnr_sum, a.recon_ssim_sum, a.recon_count) for a in replies],
                method=method, noise_multiplier=sigma)

        out = pooled(accepted)
        rec = Reconstruction(
            out["psnr_db"], out["ssim"], float(out["patients"] or 0.0), out.get("psnr_se_db"),
            out.get("ssim_se"), "DP Gaussian mechanism on clipped per-patient PSNR / 50 dB and "
            "SSIM of the holdout patients, charged to each site's ledger",
            {a.site_id: pooled([a]) for a in accepted})
        if rec.psnr_db is None:
            self.log.warning("autoencoder reconstruction: the DP noise swamps the holdout counts")
        else:
            self.log.info("autoencoder reconstruction on the holdout: PSNR %.1f dB, SSIM %.3f",
                          rec.psnr_db, rec.ssim)
        return rec

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        nodes = _wait_for_nodes(self.grid, self.settings)
        self.metrics.meta["sites_connected"] = len(nodes)
        self.log.info("run %s with %d site(s)", self.state["run_name"], len(nodes))
        # Stages in order: each phase, with the latent-scale release right after the autoencoder
        # (a new autoencoder invalidates the scale factor), then "done".
        phases = list(PHASES.values())
        for i, spec in enumerate(phases):
            after = phases[i + 1].name if i + 1 < len(phases) else DONE
            if self.state["stage"] == spec.name:
                rounds = spec.config(self.cfg).rounds
                self._phase(spec, rounds, nodes, set(nodes) if spec.needs_autoencoder else set())
                self._release_average(spec, rounds)
                self.momentum.pop(spec.name, None)  # the phase is over: its buffer is spent
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
        self.metrics.summarise_privacy()
        metrics = self.metrics.to_json()
        self.folder.save_metrics(metrics)
        return metrics

    def _release_average(self, spec: Phase, rounds: int) -> None:
        """Make the phase's model the mean of its last `average_last` global models.

        Every model averaged was already sent to the sites, so the mean is post-processing and
        costs no privacy. The models are read from the round checkpoints, so a run resumed
        after its last round releases the same mean."""
        k = min(spec.config(self.cfg).average_last, rounds)
        if k <= 1:
            return
        chosen = range(rounds - k + 1, rounds + 1)
        states = (load_checkpoint(self.folder.checkpoints / f"{spec.prefix}-round-{r:03d}")[0]
                  [spec.checkpoint_key] for r in chosen)
        self.models[spec.name].load_state_dict(mean_state(states))
        self.metrics.meta[f"{spec.name}_released"] = f"mean of rounds {chosen[0]}-{chosen[-1]}"
        self.log.info("%s: releasing the mean of rounds %d-%d", spec.name, chosen[0], chosen[-1])

    def audit(self) -> list[dict[str, Any]]:
        """Ask every site for its privacy audit of the final model.

        Only the model goes out: each site draws its own samples, attacks its own records and
        returns a few aggregates, released with DP and charged to its ledger (common.protocol).
        """
        request = AuditRequest(self._run_ref(), ArrayRecord(self.dm.state_dict()),
                               ArrayRecord(self.ae.state_dict()),
                               float(self.state["scale_factor"]))
        return [{"site": r.site_id, **r.values}
                for r in self._ask_all(request, "audit", AuditReply.from_record)[0]]

    def site_evaluate(self, classifier: dict[str, torch.Tensor], synthetic: torch.Tensor
                      ) -> list[dict[str, Any]]:
        """Ask every site to score the synthetic-trained `classifier` (and one it trains itself
        with DP-SGD) on its own test patients; each returns one DP vector (client.site_eval).
        A site that refused or failed appears as ``{"node": id, "error": reason}``."""
        request = EvaluateRequest(self._run_ref(), ArrayRecord(classifier),
                                  ArrayRecord({"images": synthetic.float().contiguous()}))
        replies, failed = self._ask_all(request, "evaluate", EvaluateReply.from_record)
        return [{"site": r.site_id, "counts": list(r.counts), "noise_std": r.noise_std,
                 "classes": r.classes, "bins": r.bins, "epsilon": r.epsilon}
                for r in replies] + failed

    def _ask_all(self, request: Any, name: str, parse: Any
                 ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Send one query to every connected site: the replies that parse, and for the others
        ``{"node", "error"}`` (logged)."""
        nodes = sorted(self.grid.get_node_ids())
        replies = self._send(nodes, lambda n: request.to_record(), MessageType.QUERY, name)
        out, failed = [], []
        for node, r in replies:
            if r.has_error():
                self.log.warning("%s: node %s: %s", name, node, _bounded(r.error.reason))
                tqdm.write(f"  ! {name}: {_bounded(r.error.reason)}")
                failed.append({"node": node, "error": _bounded(r.error.reason)})
                continue
            try:
                out.append(parse(r.content))
            except ProtocolError as err:
                self.log.warning("%s: rejecting node %s: %s", name, node, _bounded(str(err)))
                failed.append({"node": node, "error": f"rejected: {_bounded(str(err))}"})
        return out, failed

    def _phase(self, spec: Phase, rounds: int, nodes: list[int], send_ae: set[int]) -> None:
        start = int(self.state["round"]) + 1 if self.state["stage"] == spec.name else 1
        bar = tqdm(range(start, rounds + 1), desc=f"{spec.name} rounds", initial=start - 1,
                   total=rounds, disable=not self.settings.show_progress)
        for rnd in bar:
            self._train_round(spec, rnd, nodes, send_ae)
            eps = self.metrics.max_epsilon()
            bar.set_postfix(loss=f"{self.metrics.rounds[-1].loss:.4f}",
                            eps="-" if eps is None else f"{eps:.2f}")
            self._checkpoint(f"{spec.prefix}-round-{rnd:03d}", spec.name, rnd)
        bar.close()


def _momentum_key(spec: Phase) -> str:
    """The checkpoint entry holding a phase's FedAvgM buffer."""
    return f"momentum-{spec.checkpoint_key}"


def _committed(metrics: FederationMetrics, stage: str, rnd: int) -> FederationMetrics:
    """The metrics of the rounds a checkpoint holds: records of a round aggregated after the
    last state.json (it will be trained again) are dropped, so no round is counted twice."""
    order = list(PHASES)

    def done(phase: str, r: int) -> bool:
        if stage == DONE or phase not in order:
            return True
        if stage == LATENT_SCALE:
            return order.index(phase) <= order.index(AUTOENCODER.name)
        if stage not in order:
            return True
        here = order.index(stage)
        return order.index(phase) < here or (order.index(phase) == here and r <= rnd)

    metrics.rounds = [r for r in metrics.rounds if done(r.phase, r.round)]
    metrics.training = [t for t in metrics.training if done(t.phase, t.round)]
    metrics.privacy.rounds = [p for p in metrics.privacy.rounds or []
                              if done(str(p.get("phase")), int(p.get("round", 0)))]
    return metrics


def _origin(reply: Message, addressed: dict[str, int]) -> int:
    """The node a reply speaks for: its authenticated source, except for an error reply the
    SuperLink made up for a message it could not deliver (then: where that message went)."""
    src = reply.metadata.src_node_id
    if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE and \
            reply.metadata.reply_to_message_id in addressed and src not in addressed.values():
        # Only a sender that is none of the sites asked (the SuperLink) speaks for another
        # node: a site cannot make its own error count against someone else.
        return addressed[reply.metadata.reply_to_message_id]
    return src


def _claimed_site(content: RecordDict) -> str | None:
    """The site name a reply claims, if its site record is well formed (else None)."""
    try:
        rec = content.get("site")
        if not isinstance(rec, ConfigRecord) or set(rec.keys()) != {"site-id"}:
            return None
        site = rec["site-id"]
    except Exception:  # noqa: BLE001 - a hostile record: the strict decoding reports it
        return None
    if not isinstance(site, str) or not site or len(site) > 64 or \
            not site.replace("-", "").replace("_", "").isalnum():
        return None
    return site


def _claimed_figures(content: RecordDict, keys: tuple[str, ...]) -> tuple[float, ...] | None:
    """The privacy figures a reply claims, read leniently so that a lie is flagged on the site
    even when the reply is malformed otherwise; None if any is missing or not a number."""
    try:
        rec = content.get("metrics")
        if not isinstance(rec, MetricRecord):
            return None
        values = [rec.get(k) for k in keys]
    except Exception:  # noqa: BLE001
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    return tuple(float(v) for v in values)


def _normalised(config: Any) -> Any:
    """A saved config as this version writes it (keys added since then get their defaults)."""
    try:
        return to_dict(RunConfig.from_dict(config))
    except (ConfigError, TypeError, AttributeError, ValueError):
        return config


def _encode(x: float) -> Any:
    return "inf" if math.isinf(x) and x > 0 else x


def _decode(x: Any) -> float:
    return math.inf if x == "inf" else float(x)


def _bounded(text: str, limit: int = 300) -> str:
    """One log line, bounded and escaped: a site must not be able to forge log lines."""
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "...[truncated]"
