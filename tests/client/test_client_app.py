"""The ClientApp handlers called directly with Flower Messages (no runtime in between)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import tasks
from client.client_app import make_client_app
from client.ledger import PrivacyLedger
from client.site_config import SiteConfig, SiteConfigError
from common.packed import pack, unpack
from common.protocol import (
    ERR_BUDGET,
    ERR_REFUSED,
    ERR_SITE,
    ERR_VERSION,
    ERROR_REASONS,
    PROTOCOL_VERSION,
    TRAIN_REPLY_FIELDS,
)
from ldm_core.config import RunConfig
from ldm_core.models import make_autoencoder, make_denoiser


@pytest.fixture(autouse=True)
def _flower_identity() -> None:
    """Messages need a task identity, which Flower's runtimes set before calling an app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def enroll(site: SiteConfig) -> SiteConfig:
    """What `fedldm site init` does: create the site's ledger once."""
    site.state_dir.mkdir(parents=True, exist_ok=True)
    PrivacyLedger.create(site.ledger_path, budget_epsilon=site.epsilon, delta=site.delta,
                         site_id=site.site_id)
    return site


def _site(tmp_path: Path, manifest: Path, epsilon: float = 8.0, index: int = 0,
          name: str = "state", allow_masks: bool = False) -> SiteConfig:
    return enroll(SiteConfig(site_id="site-0", data=str(manifest), state_dir=tmp_path / name,
                             epsilon=epsilon, delta=1e-5, partition="site", site_index=index,
                             n_sites=2, allow_masks=allow_masks))


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _msg(cfg: RunConfig, kind: str, records: dict, **conf: object) -> Message:
    """A request as a coordinator sends it: its arrays packed (common.packed)."""
    config = {"run-config": cfg.to_json(), "run-name": "run-test", "seed": 0,
              "protocol": PROTOCOL_VERSION, **conf}
    records = {k: pack(v) if isinstance(v, ArrayRecord) else v for k, v in records.items()}
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
    weights = unpack(reply.content["arrays"]).to_torch_state_dict()
    assert set(weights) == set(ae.state_dict())
    assert any(not torch.equal(weights[k], v) for k, v in ae.state_dict().items())
    m = reply.content["metrics"]
    assert 0 < m["epsilon"] <= 8.0 and m["budget-epsilon"] == 8.0
    declared = {f.name for f in TRAIN_REPLY_FIELDS if f.record == "metrics"}
    assert set(m.keys()) == declared  # nothing undeclared (no sizes, no num-examples)
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                site_id="site-0")
    entries = ledger.entries()
    assert [e["phase"] for e in entries] == ["autoencoder", "autoencoder"]  # train + loss release
    assert entries[0]["steps"] > 0
    for leaky in ("steps", "sample-rate", "noise-multiplier"):  # each reveals the dataset size
        assert leaky not in m
    assert ledger.epsilon() == pytest.approx(m["epsilon"])
    # The compute time stays in the site's own log, where the overhead benchmark reads it.
    # (by path: an installed dependency ships a top-level package named `benchmarks`)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "federation_overhead", Path(__file__).parents[2] / "benchmarks" / "federation_overhead.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    [(start, end)] = bench.site_intervals(tmp_path)[("autoencoder", 1)]
    assert 0 < end - start < 600


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
    assert ERROR_REASONS[ERR_BUDGET] in refused[0].error.reason
    assert not any(ch.isdigit() for ch in refused[0].error.reason.split(":", 1)[1])
    before = site.ledger_path.read_bytes()
    again = app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(dm.state_dict())},
                     phase="diffusion", **{"server-round": 9, "scale-factor": 1.0}), ctx)
    assert again.has_error() and site.ledger_path.read_bytes() == before
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                site_id="site-0")
    assert ledger.epsilon() <= 8.0


@pytest.mark.parametrize("version", [None, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION), True])
def test_a_request_of_another_protocol_version_is_refused_before_anything_runs(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig, version: object) -> None:
    """A coordinator on another fedldm release gets the version reason, and the site neither
    trains nor charges: its weights would load into a model that means something else."""
    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    ae = make_autoencoder(tiny_cfg.model)
    msg = _msg(tiny_cfg, "train", {"arrays": ArrayRecord(ae.state_dict())},
               phase="autoencoder", **{"server-round": 1})
    conf = msg.content["config"]
    if version is None:
        del conf["protocol"]
    else:
        conf["protocol"] = version
    reply = app(msg, _context())
    assert reply.has_error() and reply.error.code == ERR_VERSION
    assert ERROR_REASONS[ERR_VERSION] in reply.error.reason
    assert f"protocol {PROTOCOL_VERSION}" in reply.error.reason
    assert not site.ledger_path.exists() or PrivacyLedger.open(
        site.ledger_path, budget_epsilon=8.0, delta=1e-5, site_id="site-0").entries() == []
    # A query of another version (here a task this release does not know) gets the same reason.
    q = _msg(tiny_cfg, "query", {}, task="a-task-of-a-newer-release",
             protocol=PROTOCOL_VERSION + 1)
    reply = app(q, _context())
    assert reply.has_error() and reply.error.code == ERR_VERSION
    # The same request of this version is answered.
    conf["protocol"] = PROTOCOL_VERSION
    assert not app(msg, _context()).has_error()


def test_site_errors_do_not_leak_details(tmp_path: Path, demo_manifest: Path,
                                         tiny_cfg: RunConfig) -> None:
    site = enroll(SiteConfig(site_id="site-0", data=str(tmp_path / "no-such-data"),
                             state_dir=tmp_path / "state", epsilon=8.0, delta=1e-5))
    app = make_client_app(lambda ctx: site)
    reply = app(_msg(tiny_cfg, "train", {"arrays": ArrayRecord(
        make_autoencoder(tiny_cfg.model).state_dict())}, phase="autoencoder",
        **{"server-round": 1}), _context())
    assert reply.has_error() and reply.error.code == ERR_SITE
    assert "no-such-data" not in reply.error.reason  # paths stay at the site
    assert "no-such-data" in (tmp_path / "state" / "site.log").read_text()


@pytest.mark.parametrize("mask_channels", [0, 1])
def test_latent_stats_query_releases_a_noisy_moment_and_charges_it(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig, mask_channels: int) -> None:
    import dataclasses

    tiny_cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(
        tiny_cfg.model, mask_channels=mask_channels))
    site = _site(tmp_path, demo_manifest, allow_masks=mask_channels > 0)
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
    # Two Gaussian releases (latent moment, reconstruction quality), each charged as its own.
    assert [e["phase"] for e in entries] == ["latent-scale", "latent-scale"]
    assert all(e["noise_multiplier"] == tiny_cfg.privacy.scale_noise_multiplier
               and e["sample_rate"] == 1.0 for e in entries)
    assert {"recon-psnr-sum", "recon-ssim-sum", "recon-count"} <= set(m.keys())


def test_reconstruction_release_is_exact_without_dp_and_clipped(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without DP the release is the holdout patients' mean PSNR/SSIM exactly; one patient adds
    at most [1, 1] whatever the autoencoder does (the sensitivity the noise is sized for)."""
    from ldm_core.evaluation.fidelity import PSNR_CAP_DB, reconstruction_quality
    from ldm_core.models import resolve_device

    site = _site(tmp_path, demo_manifest, epsilon=math.inf)
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(tiny_cfg.privacy,
                                                                    epsilon=math.inf))
    torch.manual_seed(0)
    weights = make_autoencoder(cfg.model).state_dict()
    stats = tasks.latent_stats(site, cfg, run_id="r", ae_weights=weights)
    data = tasks.load_data(site, cfg)
    ae = make_autoencoder(tiny_cfg.model)
    ae.load_state_dict(weights)
    psnr, ssim = reconstruction_quality(ae, data.holdout.images, resolve_device("cpu"))
    groups = tasks.patient_groups(data, data.holdout)
    per_patient = tasks.per_patient_mean(psnr / PSNR_CAP_DB, groups)
    assert stats.recon_count == len(per_patient) > 0
    assert stats.recon_psnr_sum == pytest.approx(float(per_patient.sum()), rel=1e-5)
    assert stats.recon_ssim_sum == pytest.approx(
        float(tasks.per_patient_mean(ssim, groups).clamp(0, 1).sum()), rel=1e-5)

    def absurd(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(data.holdout.images)
        return torch.full((n,), 1e4), torch.full((n,), 7.0)

    monkeypatch.setattr(tasks, "reconstruction_quality", absurd)
    clipped = tasks.latent_stats(site, cfg, run_id="r2", ae_weights=weights)
    assert clipped.recon_psnr_sum == clipped.recon_ssim_sum == clipped.recon_count


def test_a_model_that_overflows_gets_a_noisy_reply_not_an_error(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """A coordinator's autoencoder that turns (some) records into NaN must not make the site
    answer with an error: that would be a bit about the records without any noise."""
    site = _site(tmp_path, demo_manifest)
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in make_autoencoder(tiny_cfg.model).state_dict().items()}
    stats = tasks.latent_stats(site, tiny_cfg, run_id="r", ae_weights=weights)
    assert all(math.isfinite(v) for v in (stats.second_moment_sum, stats.count,
                                          stats.recon_psnr_sum, stats.recon_ssim_sum,
                                          stats.recon_count))


@pytest.mark.parametrize("mask_channels", [0, 1])
def test_reconstruction_release_is_charged_first_and_noisy(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch, mask_channels: int) -> None:
    """Also for a paired model (its autoencoder reads image and mask)."""
    import dataclasses

    tiny_cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(
        tiny_cfg.model, mask_channels=mask_channels))
    site = _site(tmp_path, demo_manifest, allow_masks=mask_channels > 0)
    weights = make_autoencoder(tiny_cfg.model).state_dict()
    a = tasks.latent_stats(site, tiny_cfg, run_id="r1", ae_weights=weights)
    b = tasks.latent_stats(site, tiny_cfg, run_id="r2", ae_weights=weights)
    assert a.recon_psnr_sum != b.recon_psnr_sum and a.recon_count != b.recon_count
    assert a.second_moment_sum != b.second_moment_sum and a.count != b.count  # the scale too

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("crashed while measuring")

    monkeypatch.setattr(tasks, "reconstruction_quality", crash)
    with pytest.raises(RuntimeError):
        tasks.latent_stats(site, tiny_cfg, run_id="r3", ae_weights=weights)
    entries = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                 site_id="site-0").entries()
    assert [e["run_id"] for e in entries].count("r3") == 2  # both charged before any data


def test_every_release_is_charged_before_the_site_reads_its_data(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The latent-scale release, the audit and the evaluation read the data only after their
    ledger entry is written (as a training round does, tested above): a crash or a refusal
    after the read must over-count, never under-count."""
    from client.audit import site_audit
    from client.site_eval import site_evaluate
    from ldm_core.classifier import make_classifier
    from ldm_core.dp_random import PrivacyRng

    site = dataclasses.replace(_site(tmp_path, demo_manifest), allow_audit=True,
                               allow_evaluate=True)
    real_load = tasks.load_data
    loads: list[str] = []
    expect: list[str] = []

    def load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        phases = [e["phase"] for e in PrivacyLedger.open(
            site.ledger_path, budget_epsilon=8.0, delta=1e-5, site_id="site-0").entries()]
        assert expect[-1] in phases, f"data read before the {expect[-1]} release was charged"
        loads.append(expect[-1])
        return real_load(*a, **k)

    monkeypatch.setattr(tasks, "load_data", load)
    ae, dm = make_autoencoder(tiny_cfg.model), make_denoiser(tiny_cfg.model)
    expect.append("latent-scale")
    tasks.latent_stats(site, tiny_cfg, run_id="r", ae_weights=ae.state_dict())
    expect.append("audit")
    site_audit(site, tiny_cfg, ae, dm, 1.0, run_id="r", rng=PrivacyRng.secure(), seed=0)
    expect.append("evaluate")
    site_evaluate(site, tiny_cfg, make_classifier(tiny_cfg.model.n_classes).state_dict(),
                  torch.rand(12, 1, 16, 16), run_id="r", rng=PrivacyRng.secure(), seed=0)
    assert loads == ["latent-scale", "audit", "evaluate"]


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


def _ae_round(site: SiteConfig, cfg: RunConfig, seed: int = 0) -> tasks.RoundResult:
    torch.manual_seed(0)
    ae = make_autoencoder(cfg.model)
    return tasks.train_round(site, cfg, phase="autoencoder", server_round=1, run_id="r",
                             weights=ae.state_dict(), seed=seed)


def test_the_training_curve_loss_is_a_noisy_release_from_the_site_source(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-round loss leaves the site through one Gaussian release at the planned noise,
    drawn from the site's own generator, over per-patient losses clipped to LOSS_CLIP."""
    site = _site(tmp_path, demo_manifest)
    real = tasks.dp_sum_and_count
    calls: list[dict] = []

    def spy(rows: torch.Tensor, **kw: object) -> tuple[torch.Tensor, float]:
        calls.append({"max": float(rows.max()), **kw})
        return real(rows, **kw)

    monkeypatch.setattr(tasks, "dp_sum_and_count", spy)
    _ae_round(site, tiny_cfg)
    [call] = calls
    assert call["noise_multiplier"] == tiny_cfg.privacy.scale_noise_multiplier / 2 > 0
    assert call["clip"] == tasks.LOSS_CLIP and call["max"] <= tasks.LOSS_CLIP
    assert isinstance(call["generator"], torch.Generator)


@pytest.mark.parametrize("mask_channels", [0, 1])
def test_ledger_is_charged_before_any_data_is_read(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch, mask_channels: int) -> None:
    """Also for paired runs, whose masks are read with the images."""
    import dataclasses

    tiny_cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(
        tiny_cfg.model, mask_channels=mask_channels))
    site = _site(tmp_path, demo_manifest, allow_masks=mask_channels > 0)
    real_load, real_train = tasks.load_data, tasks.dp_train
    checked: list[str] = []

    def charged() -> list[str]:
        return [e["phase"] for e in PrivacyLedger.open(
            site.ledger_path, budget_epsilon=8.0, delta=1e-5, site_id="site-0").entries()]

    def load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        assert "autoencoder" in charged(), "data read before the ledger was charged"
        checked.append("load")
        return real_load(*a, **k)

    def train(*a, **k):  # noqa: ANN002, ANN003, ANN202
        assert "autoencoder" in charged(), "training started before the ledger was charged"
        checked.append("train")
        return real_train(*a, **k)

    monkeypatch.setattr(tasks, "load_data", load)
    monkeypatch.setattr(tasks, "dp_train", train)
    _ae_round(site, tiny_cfg)
    assert checked == ["load", "train"]


def test_a_refused_charge_reads_no_data(tmp_path: Path, demo_manifest: Path,
                                        tiny_cfg: RunConfig,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from client.ledger import BudgetExceededError

    site = _site(tmp_path, demo_manifest, epsilon=8.0)
    real_plan = tasks.plan_noise
    # A round that cannot fit: far too little noise for the budget.
    def too_little_noise(*a, **k):  # noqa: ANN002, ANN003, ANN202
        plan = real_plan(*a, **k)
        return dataclasses.replace(plan, sigmas={**plan.sigmas, "autoencoder": 0.05})

    monkeypatch.setattr(tasks, "plan_noise", too_little_noise)
    monkeypatch.setattr(tasks, "load_data", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(BudgetExceededError):
        _ae_round(site, tiny_cfg)


def test_the_message_seed_does_not_determine_the_dp_weights(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """Same site data, same message (seed included), fresh ledgers: the weights must differ,
    or whoever chose the seed could subtract the noise."""
    a = _ae_round(_site(tmp_path, demo_manifest, name="a"), tiny_cfg, seed=5)
    b = _ae_round(_site(tmp_path, demo_manifest, name="b"), tiny_cfg, seed=5)
    assert any(not torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.loss != b.loss  # the loss release is noised from the site's source too


def test_reproducible_mode_is_a_site_setting(tmp_path: Path, demo_manifest: Path,
                                             tiny_cfg: RunConfig) -> None:
    import dataclasses

    sites = [dataclasses.replace(_site(tmp_path, demo_manifest, name=n), reproducible_seed=1)
             for n in ("a", "b")]
    a, b = (_ae_round(s, tiny_cfg, seed=5) for s in sites)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    with pytest.raises(SiteConfigError, match="privacy-seed"):
        SiteConfig.from_node_config({"site-id": "a", "data-path": "/d", "state-dir": "/s",
                                     "epsilon": "8", "delta": "1e-5", "privacy-seed": "1"})


def test_plan_and_epsilon_do_not_depend_on_the_dataset_size(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    import dataclasses

    small = _site(tmp_path, demo_manifest, index=0, name="s0")
    large = dataclasses.replace(_site(tmp_path, demo_manifest, name="s1"), partition="all",
                                n_sites=1)
    n = [tasks.load_data(s, tiny_cfg).train.images.shape[0] for s in (small, large)]
    assert n[0] != n[1]
    ra, rb = _ae_round(small, tiny_cfg), _ae_round(large, tiny_cfg)
    assert ra.epsilon == rb.epsilon
    ea, eb = (PrivacyLedger.open(s.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                 site_id="site-0").history for s in (small, large))
    assert ea == eb


def test_a_retried_round_gets_the_stored_reply_without_a_new_charge(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    ae = make_autoencoder(tiny_cfg.model)
    msg = _msg(tiny_cfg, "train", {"arrays": ArrayRecord(ae.state_dict())},
               phase="autoencoder", **{"server-round": 1})
    first = app(msg, _context())
    ledger_after_first = site.ledger_path.read_bytes()
    again = app(msg, _context())
    assert not again.has_error()
    assert site.ledger_path.read_bytes() == ledger_after_first  # no new charge
    a, b = (unpack(r.content["arrays"]).to_torch_state_dict() for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same release, not a new one
    assert first.content["metrics"]["loss"] == again.content["metrics"]["loss"]


def test_a_run_killed_between_charge_and_reply_still_finishes_within_budget(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round crashes once after its charge: the retry reserve absorbs one retry per phase
    and the run still ends within the target."""
    from client.replies import ReplyStore

    site = _site(tmp_path, demo_manifest)
    app = make_client_app(lambda ctx: site)
    real_save = ReplyStore.save
    crashed: set[tuple[str, int]] = set()

    def crash_once(self, run, kind, rnd, reply):  # noqa: ANN001, ANN202
        if (kind, rnd) not in crashed:
            crashed.add((kind, rnd))
            raise OSError("killed before the reply was stored")
        return real_save(self, run, kind, rnd, reply)

    monkeypatch.setattr(ReplyStore, "save", crash_once)
    ctx = _context()
    ae = make_autoencoder(tiny_cfg.model)
    dm = make_denoiser(tiny_cfg.model)
    messages = [
        _msg(tiny_cfg, "train", {"arrays": ArrayRecord(ae.state_dict())}, phase="autoencoder",
             **{"server-round": 1}),
        _msg(tiny_cfg, "query", {"autoencoder": ArrayRecord(ae.state_dict())},
             task="latent-stats"),
        _msg(tiny_cfg, "train", {"arrays": ArrayRecord(dm.state_dict())}, phase="diffusion",
             **{"server-round": 1, "scale-factor": 1.0}),
    ]
    for msg in messages:
        assert app(msg, ctx).has_error()  # the crash
        retry = app(msg, ctx)
        assert not retry.has_error(), retry.error
    ledger = PrivacyLedger.open(site.ledger_path, budget_epsilon=8.0, delta=1e-5,
                                site_id="site-0")
    phases = [e["phase"] for e in ledger.entries()]
    assert phases.count("diffusion") == 4  # two charged attempts (training + loss each)
    assert ledger.epsilon() <= 8.0


@pytest.mark.parametrize("kind", ["train", "latent-stats"])
def test_a_paired_run_is_refused_without_the_sites_allow_masks(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig,
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A coordinator cannot make a site read (or probe for) masks it has not offered: the request
    is refused before the ledger is charged or any file is read."""
    paired = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model,
                                                                     mask_channels=1))
    site = _site(tmp_path, demo_manifest)  # allow_masks defaults off, as in `site start`
    before = site.ledger_path.read_bytes()

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("site data read for a run the site did not allow")

    monkeypatch.setattr(tasks, "load_site", no_read)
    ae = make_autoencoder(paired.model)
    if kind == "train":
        msg = _msg(paired, "train", {"arrays": ArrayRecord(ae.state_dict())},
                   phase="autoencoder", **{"server-round": 1})
    else:
        msg = _msg(paired, "query", {"autoencoder": ArrayRecord(ae.state_dict())},
                   task="latent-stats")
    reply = make_client_app(lambda ctx: site)(msg, _context())
    assert reply.has_error() and reply.error.code == ERR_REFUSED
    assert site.ledger_path.read_bytes() == before  # nothing charged
    assert "allow-masks" in (site.state_dir / "site.log").read_text()
    # The same site takes the run once it opts in.
    allowed = dataclasses.replace(site, allow_masks=True)
    monkeypatch.undo()
    result = tasks.train_round(allowed, paired, phase="autoencoder", server_round=1, run_id="r",
                               weights=ae.state_dict())
    assert result.epsilon > 0


def test_a_train_only_piece_naming_nothing_is_refused_before_the_charge(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    bad = dataclasses.replace(tiny_cfg, autoencoder=dataclasses.replace(
        tiny_cfg.autoencoder, train_only=("no_such_layer",)))
    site = _site(tmp_path, demo_manifest)
    before = site.ledger_path.read_bytes()
    with pytest.raises(ValueError, match="no_such_layer"):
        _ae_round(site, bad)
    assert site.ledger_path.read_bytes() == before


def test_a_site_refuses_a_run_of_the_other_dimensionality_naming_both(
        tmp_path: Path, demo_manifest: Path, tiny_cfg: RunConfig) -> None:
    """Volumes at a site and a 2D run (or images and a 3D run) fail with what to fix, not with
    a shape error deep inside a network."""
    from ldm_core.phantoms3d import generate_demo3d

    volumes = generate_demo3d(tmp_path / "d3", n_patients=24, n_sites=2, size=16, seed=0)
    site = _site(tmp_path, volumes)
    cfg3d = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model,
                                                                    spatial_dims=3))
    with pytest.raises(ValueError, match="holds volumes but the run .*spatial_dims=2"):
        tasks.load_data(site, tiny_cfg)
    # ...and before any charge: a misconfigured run costs the site no budget, whichever
    # release it asks for (a round, the latent statistics, an audit, an evaluation).
    from client.audit import site_audit
    from client.site_eval import site_evaluate
    from ldm_core.classifier import make_classifier
    from ldm_core.dp_random import PrivacyRng

    site = dataclasses.replace(site, allow_audit=True, allow_evaluate=True)
    before = site.ledger_path.read_bytes()
    ae, dm = make_autoencoder(tiny_cfg.model), make_denoiser(tiny_cfg.model)
    attempts = [
        lambda: _ae_round(site, tiny_cfg),
        lambda: tasks.latent_stats(site, tiny_cfg, run_id="r", ae_weights=ae.state_dict()),
        lambda: site_audit(site, tiny_cfg, ae, dm, 1.0, run_id="r",
                           rng=PrivacyRng.secure(), seed=0),
        lambda: site_evaluate(site, tiny_cfg,
                              make_classifier(tiny_cfg.model.n_classes).state_dict(),
                              torch.rand(12, 1, 16, 16), run_id="r", rng=PrivacyRng.secure(),
                              seed=0),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError, match="holds volumes but the run .*spatial_dims=2"):
            attempt()
        assert site.ledger_path.read_bytes() == before
    # The reverse: a 3D run at a site of 2D images.
    images = _site(tmp_path, demo_manifest, name="images")
    with pytest.raises(ValueError, match="holds 2D images but the run .*spatial_dims=3"):
        tasks.train_round(images, cfg3d, phase="autoencoder", server_round=1, run_id="r",
                          weights=make_autoencoder(cfg3d.model).state_dict())
    assert tasks.load_data(site, cfg3d).train.images.ndim == 5


def test_a_site_resamples_its_volumes_to_the_runs_voxel_size(tmp_path: Path,
                                                              tiny_cfg: RunConfig) -> None:
    """`model.voxel_mm` reaches the site's loader: at twice the demo's voxel size the heads
    fill the grid's centre half and the rest is padding; without it they fill the grid."""
    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d

    volumes = generate_demo3d(tmp_path / "d3", n_patients=24, n_sites=2, size=16, seed=0)
    site = _site(tmp_path, volumes)
    model = dataclasses.replace(tiny_cfg.model, spatial_dims=3)
    fitted = tasks.load_data(site, dataclasses.replace(tiny_cfg, model=model)).train.images
    coarse = dataclasses.replace(model, voxel_mm=2 * HEAD_EXTENT_MM / 16)
    x = tasks.load_data(site, dataclasses.replace(tiny_cfg, model=coarse)).train.images
    assert x.shape == fitted.shape and x.shape[2:] == (16, 16, 16)
    border = torch.ones(16, 16, 16, dtype=torch.bool)
    border[4:12, 4:12, 4:12] = False
    assert (x[:, 0][:, border] == -1.0).all()  # padding outside the 8-voxel centre
    assert (fitted[:, 0][:, border] > -1.0).any()  # the fitted heads reach it


def test_a_site_is_told_in_its_own_log_when_the_voxel_size_crops_its_scans(
        tmp_path: Path, tiny_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """At half the demo's voxel size the 16-voxel grid covers half of each head: the loader's
    DataWarning reaches the site's console and its site.log (once a split, not once a load); a
    voxel size at which the heads fit writes nothing."""
    import warnings

    from ldm_core.data import DataWarning
    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d

    volumes = generate_demo3d(tmp_path / "d3", n_patients=24, n_sites=2, size=16, seed=0)
    site = _site(tmp_path, volumes)
    log = site.state_dir / "site.log"
    model = dataclasses.replace(tiny_cfg.model, spatial_dims=3)
    fits = dataclasses.replace(tiny_cfg, model=dataclasses.replace(
        model, voxel_mm=2 * HEAD_EXTENT_MM / 16))
    tasks.load_data(site, fits)
    assert not log.exists() or "field of view" not in log.read_text()
    fine = dataclasses.replace(tiny_cfg, model=dataclasses.replace(
        model, voxel_mm=HEAD_EXTENT_MM / 32))
    with pytest.warns(DataWarning, match="field of view"):
        tasks.load_data(site, fine)
    # A deployment answers each message in a fresh process: what was logged is remembered in
    # the state dir, not in memory, and a warning is never raised, even under -W error.
    monkeypatch.setattr(tasks, "_REGISTRY", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.load_data(site, fine)
    lines = [ln for ln in log.read_text().splitlines() if "field of view" in ln]
    # one line per split, each written once although the data was loaded twice
    assert len(lines) == 3
    for split, line in zip(("train", "holdout", "test"), lines, strict=True):
        assert "WARNING data:" in line and f"{split} volume(s) lose more than 1% of their " \
            "tissue" in line
    # A first sighting under -W error (another state dir): shown and logged, not raised.
    other = dataclasses.replace(site, state_dir=tmp_path / "other-state")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.load_data(other, fine)
    logged = (other.state_dir / "site.log").read_text().splitlines()
    assert len([ln for ln in logged if "field of view" in ln]) == 3
