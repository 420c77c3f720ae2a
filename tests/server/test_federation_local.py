"""Whole tiny federations through the real Coordinator and ClientApp on an in-process grid."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ldm_core.config import RunConfig
from server.federation import Coordinator, FederationError
from tests.common.federation import make_federation


def _federation(tmp: Path, manifest: Path, cfg: RunConfig, *, reproducible: bool = False,
                registry: Path | None = None, enroll: bool = True,
                site_budget: float | None = None) -> Coordinator:
    return make_federation(tmp, manifest, cfg, reproducible=reproducible, registry=registry,
                           enroll=enroll, site_budget=site_budget)


def _stored(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a reply record a site stored (as sent: packed, common.packed)."""
    from flwr.app import ArrayRecord
    from safetensors.torch import load_file

    from common.packed import unpack

    return unpack(ArrayRecord(load_file(str(path)))).to_torch_state_dict()


def _final(coord: Coordinator) -> dict[str, torch.Tensor]:
    coord.run()
    return {k: v.clone() for k, v in coord.dm.state_dict().items()}


@pytest.mark.slow
def test_same_flags_and_seed_give_different_dp_weights(tmp_path: Path, demo_manifest: Path,
                                                       tiny_cfg: RunConfig) -> None:
    a = _final(_federation(tmp_path / "a", demo_manifest, tiny_cfg))
    b = _final(_federation(tmp_path / "b", demo_manifest, tiny_cfg))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_non_private_reproducible_runs_repeat_exactly(tmp_path: Path, demo_manifest: Path,
                                                      tiny_cfg: RunConfig) -> None:
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy,
                                                                    epsilon=math.inf))
    a = _final(_federation(tmp_path / "a", demo_manifest, cfg, reproducible=True))
    b = _final(_federation(tmp_path / "b", demo_manifest, cfg, reproducible=True))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_site_with_a_deleted_ledger_cannot_train_and_is_refused_after_reinit(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    registry = tmp_path / "site-spend.json"

    def run_cfg(eps: float) -> RunConfig:  # a cumulative cap the coordinator requests
        return dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy,
                                                                        epsilon=eps))

    _federation(tmp_path / "r1", demo_manifest, run_cfg(2.0), registry=registry,
                site_budget=8.0).run()
    # The operator wipes site-0's state folder; a second run with the same sites:
    shutil.rmtree(tmp_path / "r1" / "sites" / "site-0")
    run2 = tmp_path / "r2"
    shutil.copytree(tmp_path / "r1" / "sites", run2 / "sites")
    with pytest.raises(FederationError):
        _federation(run2, demo_manifest, run_cfg(4.0), registry=registry, enroll=False,
                    site_budget=8.0).run()
    assert not (run2 / "sites" / "site-0" / "ledger.json").exists()  # nothing recreated
    log = (run2 / "sites" / "site-0" / "site.log").read_text()
    assert "site init" in log
    # Someone runs `site init` on purpose: the site can charge again, but the coordinator
    # remembers its earlier spend and refuses it loudly.
    with pytest.raises(FederationError, match="usable"):
        _federation(run2, demo_manifest, run_cfg(4.0), registry=registry,
                    site_budget=8.0).run()
    run_log = (run2 / "run" / "run.log").read_text()
    assert "ledger was reset" in run_log


def test_the_run_name_is_durable_before_any_site_hears_of_it(tmp_path: Path,
                                                              demo_manifest: Path,
                                                              tiny_cfg: RunConfig) -> None:
    """A coordinator killed before its first checkpoint resumes the same run: otherwise the
    sites would see a new run and pay for the interrupted round again instead of answering it
    from their stored replies."""
    first = _federation(tmp_path, demo_manifest, tiny_cfg)
    assert first.grid.exchanges == []  # type: ignore[attr-defined]  # nothing sent yet
    again = _federation(tmp_path, demo_manifest, tiny_cfg)
    assert again.state["run_name"] == first.state["run_name"]


class _Killed(BaseException):
    """A SIGKILL stand-in that no `except Exception` in the coordinator can swallow."""


def _kill_at_checkpoint_then_resume(tmp: Path, manifest: Path, cfg: RunConfig, name: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Run until the coordinator starts writing checkpoint `name`, die there, then resume the
    same run folder to the end."""
    import server.federation as federation

    original = federation.save_checkpoint

    def save(directory: Path, modules: dict, meta: dict) -> Path:
        if Path(directory).name == name:
            raise _Killed
        return original(directory, modules, meta)

    monkeypatch.setattr(federation, "save_checkpoint", save)
    with pytest.raises(_Killed):
        _federation(tmp, manifest, cfg).run()
    monkeypatch.undo()
    _federation(tmp, manifest, cfg).run()


def test_a_kill_between_the_checkpoint_writes_loses_and_doubles_no_round(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round's checkpoint writes metrics.json and state.json; killed between the two (the
    first round's), the resumed run must record every round exactly once: neither lost (state
    written first) nor doubled (metrics written first and not trimmed on resume)."""
    from server.run_folder import RunFolder

    first = _federation(tmp_path, demo_manifest, tiny_cfg)
    writes: list[str] = []
    for name in ("save_state", "save_metrics"):
        original = getattr(RunFolder, name)

        def write(self: RunFolder, data: dict, _orig=original, _name=name) -> None:
            writes.append(_name)
            if len(writes) == 2:
                raise _Killed
            _orig(self, data)

        monkeypatch.setattr(RunFolder, name, write)
    with pytest.raises(_Killed):
        first.run()
    monkeypatch.undo()
    _federation(tmp_path, demo_manifest, tiny_cfg).run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = sorted((p, k) for p, n in (("autoencoder", tiny_cfg.autoencoder.rounds),
                                          ("diffusion", tiny_cfg.diffusion.rounds))
                      for k in range(1, n + 1))
    assert sorted((r["phase"], r["round"]) for r in metrics["rounds"]) == expected
    per_site = sorted((t["phase"], t["round"]) for t in metrics["training"]
                      if t["site"] == "site-0")
    assert per_site == expected


def test_a_lost_reply_is_asked_again_and_answered_from_the_site_store(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """A SuperNode that died after storing its reply never answers the lost message: after the
    round timeout the coordinator asks again, and the site answers from its store (no second
    training, no second charge)."""
    from flwr.app import Message

    lost: list[int] = []

    def lose_first(node: int, reply: Message) -> Message | None:
        if node == 102 and not lost:
            lost.append(node)
            return None
        return reply

    coord = make_federation(tmp_path, demo_manifest, tiny_cfg, tamper=lose_first)
    coord.run()
    assert lost == [102] and coord.state["stage"] == "done"
    assert all(r.sites_ok == 2 for r in coord.metrics.rounds)
    assert "asking again" in (tmp_path / "run" / "run.log").read_text()
    entries = json.loads((tmp_path / "sites" / "site-1" / "ledger.json").read_text())["entries"]
    first = [e for e in entries if e["phase"] == "autoencoder" and e["round"] == 1]
    assert len([e for e in first if e["sample_rate"] < 1.0]) == 1  # charged once


def test_a_crashed_site_reported_unavailable_is_asked_again_once_back(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """Flower answers a message to a node that went offline with an error from the SuperLink's
    own id: it counts against the node the message was for, and that node is asked again."""
    from flwr.app import Message

    down: list[str] = []

    def crashed_once(node: int, msg: Message) -> bool:
        if node == 102 and not down:
            down.append(msg.metadata.message_id)
            return True
        return False

    coord = make_federation(tmp_path, demo_manifest, tiny_cfg, unavailable=crashed_once)
    coord.run()
    assert len(down) == 1 and coord.state["stage"] == "done"
    assert all(r.sites_ok == 2 for r in coord.metrics.rounds)
    assert coord.metrics.errors == []
    log = (tmp_path / "run" / "run.log").read_text()
    assert "no reply from node(s) 102 (unavailable): asking again" in log
    assert "node 1:" not in log and "from node 1\n" not in log


def test_only_the_superlink_can_report_another_node_unavailable() -> None:
    """A site's own error never counts against another site (it could knock it out)."""
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from server.federation import _origin

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    to_102 = Message(RecordDict(), dst_node_id=102, message_type="train")
    to_102.metadata.__dict__["_message_id"] = "m-102"
    addressed = {"m-101": 101, "m-102": 102}
    from_link = create_message_error_unavailable_res_message(to_102.metadata, "node_unavail")
    assert _origin(from_link, addressed) == 102
    forged = create_message_error_unavailable_res_message(to_102.metadata, "node_unavail")
    forged.metadata.__dict__["_src_node_id"] = 101
    assert _origin(forged, addressed) == 101


@pytest.mark.slow
def test_float16_delta_transfer_sends_half_precision_and_trains_the_same_model(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """Non-private and seeded, so both runs would match exactly in float32: with float16
    differences on the wire the final model differs only by rounding, and what the sites stored
    (and sent) is float16."""
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy,
                                                                    epsilon=math.inf))
    half = dataclasses.replace(cfg, aggregation=dataclasses.replace(
        cfg.aggregation, transfer="float16-delta"))
    a = _final(_federation(tmp_path / "a", demo_manifest, cfg, reproducible=True))
    b = _final(_federation(tmp_path / "b", demo_manifest, half, reproducible=True))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    scale = max(float(a[k].abs().max()) for k in a if a[k].is_floating_point())
    assert 0 < diff < 1e-3 * scale
    stored = sorted((tmp_path / "b" / "sites").glob("site-0/replies/*/diffusion-1/arrays*"))
    assert stored, list((tmp_path / "b" / "sites").rglob("*"))[:20]
    arrays = _stored(stored[0])
    floats = [v for v in arrays.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    plain = sorted((tmp_path / "a" / "sites").glob("site-0/replies/*/diffusion-1/arrays*"))
    assert all(v.dtype == torch.float32 for v in _stored(plain[0]).values()
               if v.is_floating_point())


@pytest.mark.slow
def test_with_train_only_only_the_trained_part_travels_and_the_rest_stays_as_sent(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """A site's reply holds the trained parameters and nothing else (fewer bytes, and nothing
    about the frozen ones to vet); the global model's frozen parameters stay bit for bit."""
    cfg = dataclasses.replace(tiny_cfg, diffusion=dataclasses.replace(
        tiny_cfg.diffusion, train_only=("class_embedding",)))
    coord = _federation(tmp_path, demo_manifest, cfg)
    start = {k: v.clone() for k, v in coord.dm.state_dict().items()}
    final = _final(coord)
    trained = {k for k in start if "class_embedding" in k}
    assert trained and len(trained) < len(start)
    for k, v in final.items():
        assert torch.equal(v, start[k]) == (k not in trained), k
    stored = sorted((tmp_path / "sites").glob("site-0/replies/*/diffusion-1/arrays*"))
    assert stored and set(_stored(stored[0])) == trained


@pytest.mark.slow
def test_the_released_denoiser_is_the_mean_of_the_last_rounds_also_after_a_resume(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`average_last=2` of 3 rounds releases the mean of rounds 2 and 3; killed just before
    the final checkpoint, the resumed run releases the same mean (read from the round
    checkpoints, not from a model in memory)."""
    from ldm_core.checkpoint import load_checkpoint

    cfg = dataclasses.replace(tiny_cfg, diffusion=dataclasses.replace(
        tiny_cfg.diffusion, rounds=3, average_last=2))
    _kill_at_checkpoint_then_resume(tmp_path, demo_manifest, cfg, "final", monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    r2, r3, final = (load_checkpoint(ck / name)[0]["denoiser"]
                     for name in ("dm-round-002", "dm-round-003", "final"))
    assert set(final) == set(r3)
    for k, v in final.items():
        assert torch.allclose(v, ((r2[k].double() + r3[k].double()) / 2).to(v.dtype),
                              atol=1e-7), k
    assert any(not torch.equal(final[k], r3[k]) for k in final if final[k].is_floating_point())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["diffusion_released"] == "mean of rounds 2-3"


@pytest.mark.slow
def test_server_momentum_adds_the_previous_step_also_after_a_resume(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvgM with momentum 0.5, lr 1: round 3's global model is round 2's plus the mean of
    the sites' round-3 updates' pull plus half of round 2's step. Killed while saving round 3,
    the resumed run (the sites answer from their stored replies) must take the buffer from the
    round-2 checkpoint: a buffer lost on resume gives plain averaging and fails here."""
    from ldm_core.checkpoint import load_checkpoint

    cfg = dataclasses.replace(tiny_cfg, diffusion=dataclasses.replace(
        tiny_cfg.diffusion, rounds=3, server_momentum=0.5))
    _kill_at_checkpoint_then_resume(tmp_path, demo_manifest, cfg, "dm-round-003", monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    r1, r2, r3 = (load_checkpoint(ck / f"dm-round-00{r}")[0]["denoiser"] for r in (1, 2, 3))
    sites = [_stored(p) for p in
             sorted((tmp_path / "sites").glob("site-*/replies/*/diffusion-3/arrays*"))]
    assert len(sites) == 2
    moved = 0.0
    for k, v in r3.items():
        if not v.is_floating_point():
            continue
        mean3 = (sites[0][k].double() + sites[1][k].double()) / 2
        want = mean3 + 0.5 * (r2[k].double() - r1[k].double())
        assert torch.allclose(v.double(), want, atol=1e-6), k
        moved += float((r2[k].double() - r1[k].double()).abs().sum())
    assert moved > 0  # the momentum term was not trivially zero
    assert "momentum-denoiser" in load_checkpoint(ck / "dm-round-002")[0]
    assert "momentum-denoiser" not in load_checkpoint(ck / "final")[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "server momentum 0.5" in [r for r in metrics["rounds"]
                                     if r["phase"] == "diffusion"][-1]["aggregation"]
