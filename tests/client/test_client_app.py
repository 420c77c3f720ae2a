"""The ClientApp handlers called directly with Flower Messages (no runtime in between)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import tasks
from client.client_app import ERR_BUDGET, ERR_SITE, make_client_app
from client.ledger import PrivacyLedger
from client.site_config import SiteConfig, SiteConfigError
from ldm_core.config import RunConfig
from ldm_core.models import make_autoencoder, make_denoiser


@pytest.fixture(autouse=True)
def _flower_identity() -> None:
    """Messages need a task identity, which Flower's runtimes set before calling an app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _site(tmp_path: Path, manifest: Path, epsilon: float = 8.0) -> SiteConfig:
    return SiteConfig(site_id="site-0", data=str(manifest), state_dir=tmp_path / "state",
                      epsilon=epsilon, delta=1e-5, partition="site", site_index=0, n_sites=2)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _msg(cfg: RunConfig, kind: str, records: dict, **conf: object) -> Message:
    config = {"run-config": cfg.to_json(), "run-name": "run-test", "seed": 0, **conf}
    return Message(RecordDict({**records, "config": ConfigRecord(config)}), dst_node_id=1,
                   message_type=kind)


def test_train_autoencoder_round_replies_weights_epsilon_and_charges_ledger(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    ae = make_autoencoder(tiny_cfg.model)
    msg = _msg(tiny_cfg, "train", {"arrays": ArrayRecord(ae.state_dict())},
               phase="autoencoder", **{"server-round": 1})
    reply = app(msg, _context())
    assert not reply.has_error(), reply.error
    weights = reply.content["arrays"].to_torch_state_dict()
    assert set(weights) == set(ae.state_dict())
    assert any(not torch.equal(weights[k], v) for k, v in ae.state_dict().items())
    m = reply.content["metrics"]
    assert 0 < m["epsilon"] <= 8.0 and m["budget-epsilon"] == 8.0
    assert m["num-examples"] == 1  # sizes are not released
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                site_id="site-0")
    entries = ledger.entries()
    assert [e["phase"] for e in entries] == ["autoencoder", "autoencoder"]  # train + loss release
    assert entries[0]["steps"] > 0
    for leaky in ("steps", "sample-rate", "noise-multiplier"):  # each reveals the dataset size
        assert leaky not in m
    assert ledger.epsilon() == pytest.approx(m["epsilon"])


def test_round_beyond_the_plan_is_refused_with_a_budget_error(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """Noise is calibrated for the planned rounds; an extra round must not fit the budget."""
    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    ae = make_autoencoder(tiny_cfg.model)
    ok = app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(ae.state_dict())},
                  phase="autoencoder", **{"server-round": 1}), _context())
    assert not ok.has_error()
    dm = make_denoiser(tiny_cfg.model)
    ctx = _context()
    ctx.state["fedldm-autoencoder"] = ArrayRecord(ae.state_dict())
    replies = [app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(dm.state_dict())},
                        phase="diffusion", **{"server-round": r, "scale-factor": 1.0}), ctx)
               for r in (1, 2, 3)]
    assert not replies[0].has_error()  # the plan's one diffusion round fits
    refused = [r for r in replies[1:] if r.has_error()]
    assert refused, "rounds beyond the plan must be refused"
    assert refused[0].error.code == ERR_BUDGET
    assert "refused" in refused[0].error.reason
    before = site.ledger_path.read_bytes()
    again = app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(dm.state_dict())},
                     phase="diffusion", **{"server-round": 9, "scale-factor": 1.0}), ctx)
    assert again.has_error() and site.ledger_path.read_bytes() == before
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                site_id="site-0")
    assert ledger.epsilon() <= 8.0


def test_site_errors_do_not_leak_details(tmp_path: Path, demo_manifest: Path,
                                         tiny_cfg: RunConfig) -> None:
    site = SiteConfig(site_id="site-0", data=str(tmp_path / "no-such-data"),
                      state_dir=tmp_path / "state", epsilon=8.0, delta=1e-5)
    app = make_client_app(lambda ctx: site)
    reply = app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(
        make_autoencoder(tiny_cfg.model).state_dict())}, phase="autoencoder",
        **{"server-round": 1}), _context())
    assert reply.has_error() and reply.error.code == ERR_SITE
    assert "no-such-data" not in reply.error.reason  # paths stay at the site
    assert "no-such-data" in (tmp_path / "state" / "site.log").read_text()


def test_latent_stats_query_releases_a_noisy_moment_and_charges_it(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    ae = make_autoencoder(tiny_cfg.model)
    ctx = _context()
    reply = app(_msg(tiny_cfg, "query", {"autoencoder": ArrayRecord(ae.state_dict())},
                     task="latent-stats"), ctx)
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    assert m["count"] != 0 and m["epsilon"] > 0
    assert "fedldm-autoencoder" in ctx.state  # kept for the diffusion rounds
    entries = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                 site_id="site-0").entries()
    assert [e["phase"] for e in entries] == ["latent-scale"]


def test_training_never_sees_test_or_holdout_images(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path, demo_manifest)
    seen: list[torch.Tensor] = []
    real_train = tasks.dp_train

    def spy(module, tensors, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(tensors[0].clone())
        return real_train(module, tensors, *a, **k)

    monkeypatch.setattr(tasks, "dp_train", spy)
    ae = make_autoencoder(tiny_cfg.model)
    tasks.train_round(site, tiny_cfg, phase="autoencoder", server_round=1, run_id="r",
                      weights=ae.state_dict())
    data = tasks.load_data(site, tiny_cfg)
    used = seen[0].flatten(1)
    for split in (data.test, data.holdout):
        for img in split.images.flatten(1):
            assert not (used == img).all(dim=1).any(), "a test/holdout image reached training"
    assert used.shape[0] == data.train.images.shape[0]


def test_node_config_parsing_names_the_missing_key() -> None:
    with pytest.raises(SiteConfigError, match="data-path"):
        SiteConfig.from_node_config({"site-id": "a", "state-dir": "/tmp/x", "epsilon": "8",
                                     "delta": "1e-5"})
    cfg = SiteConfig.from_node_config({"site-id": "a", "data-path": "/d", "state-dir": "/s",
                                       "epsilon": "inf", "delta": "1e-5"})
    assert cfg.epsilon == float("inf") and cfg.effective_target(8.0) == 8.0
    assert json.dumps({"ok": True})
