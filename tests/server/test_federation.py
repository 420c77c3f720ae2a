"""Coordinator pieces that need no runtime: update checks, run-config parsing, resume guard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm_core.config import build_config, to_dict
from ldm_core.pretrain import load_pretrained, load_pretrained_denoiser
from server.federation import (
    Coordinator,
    FederationError,
    ServerSettings,
    _initial_models,
    check_update,
)
from server.server_app import config_from_run_config


def test_check_update_rejects_bad_updates() -> None:
    ref = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert check_update(ref, {"w": torch.ones(2, 3), "b": torch.ones(3)}) is None
    assert "names" in check_update(ref, {"w": torch.ones(2, 3)})
    assert "shape" in check_update(ref, {"w": torch.ones(3, 2), "b": torch.ones(3)})
    bad = {"w": torch.ones(2, 3), "b": torch.tensor([1.0, float("nan"), 0.0])}
    assert "non-finite" in check_update(ref, bad)


def test_run_config_parsing() -> None:
    cfg, settings = config_from_run_config({
        "preset": "tiny", "class-names": "a,b,c", "epsilon": "inf", "overrides":
        '{"diffusion.rounds": 3}', "out": "x", "min-sites": 2})
    assert cfg.model.n_classes == 3 and not cfg.privacy.private
    assert cfg.diffusion.rounds == 3 and settings.min_sites == 2
    with pytest.raises(ValueError, match="class-names"):
        config_from_run_config({"class-names": "only"})
    # a deployment (no data in the run config: `flwr run` with data simulates through
    # server.simulate.simulation_config) starts from the modality-agnostic prior
    real, _ = config_from_run_config({"class-names": "a,b"})
    assert real.ae_init == "public-generic"


class _NoGrid:
    def get_node_ids(self) -> list[int]:
        return []


def test_resume_refuses_a_folder_of_another_configuration(tmp_path: Path) -> None:
    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    coord._checkpoint("ae-final", "latent-scale", 0)
    other = build_config(preset="tiny", image_size=16, seed=1)
    with pytest.raises(FederationError, match="another configuration"):
        Coordinator(_NoGrid(), other, ServerSettings(out=tmp_path))
    same = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert same.state["stage"] == "latent-scale" and same.state["config"] == to_dict(cfg)
    for k, v in coord.ae.state_dict().items():
        assert torch.equal(v, same.ae.state_dict()[k])


def test_the_code_that_trains_a_run_is_recorded_and_a_resume_by_other_code_is_added(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.federation as fed

    cfg = build_config(preset="tiny", image_size=16)
    monkeypatch.setattr(fed, "code_version", lambda: "fedldm 0.1.0, commit aaaaaaa")
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert coord.state["code"] == coord.metrics.meta["code"] == ["fedldm 0.1.0, commit aaaaaaa"]
    coord._checkpoint("ae-final", "latent-scale", 0)
    same = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert same.state["code"] == ["fedldm 0.1.0, commit aaaaaaa"]
    monkeypatch.setattr(fed, "code_version", lambda: "fedldm 0.1.0, commit bbbbbbb")
    other = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert other.state["code"] == other.metrics.meta["code"] == [
        "fedldm 0.1.0, commit aaaaaaa", "fedldm 0.1.0, commit bbbbbbb"]
    other._checkpoint("ae-final", "latent-scale", 0)
    assert fed.RunFolder(tmp_path).load_state()["code"][-1].endswith("bbbbbbb")
    # a run folder written before the field existed starts its list at the resume
    state = fed.RunFolder(tmp_path).load_state()
    del state["code"]
    fed.RunFolder(tmp_path).save_state(state)
    old = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert old.state["code"] == old.metrics.meta["code"] == ["fedldm 0.1.0, commit bbbbbbb"]


def test_resume_refuses_a_folder_of_another_protocol_version(tmp_path: Path) -> None:
    """Checkpoints and the sites' stored replies of a run belong to the version that began it."""
    import json

    from common.protocol import PROTOCOL_VERSION

    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    coord._checkpoint("ae-final", "latent-scale", 0)
    state = json.loads(coord.folder.state_path.read_text())
    assert state["protocol"] == PROTOCOL_VERSION
    assert Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path)).state["stage"] == \
        "latent-scale"
    for other in (PROTOCOL_VERSION + 1, None):
        if other is None:
            del state["protocol"]
        else:
            state["protocol"] = other
        coord.folder.state_path.write_text(json.dumps(state))
        with pytest.raises(FederationError, match=f"this one speaks {PROTOCOL_VERSION}"):
            Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))


def test_waiting_for_sites_times_out_with_advice(tmp_path: Path) -> None:
    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path, min_sites=2,
                                                       wait_for_sites_s=0.0))
    with pytest.raises(FederationError, match="site daemons"):
        coord.run()


def test_coordinator_starts_from_the_shipped_priors() -> None:
    cfg = build_config(preset="quick", class_names=("a", "b", "c", "d"),
                       overrides={"dm_init": "public-healthy-phantoms"})
    models = _initial_models(cfg)
    assert list(models) == ["autoencoder", "diffusion"]
    ae, dm = models["autoencoder"], models["diffusion"]
    for k, v in load_pretrained(cfg.model).items():
        assert torch.equal(ae.state_dict()[k], v), k
    for k, v in load_pretrained_denoiser(cfg.model).items():
        assert torch.equal(dm.state_dict()[k], v), k
    random_cfg = build_config(preset="quick", class_names=("a", "b", "c", "d"))
    assert random_cfg.dm_init == "random"
    fresh = _initial_models(random_cfg)["diffusion"]
    assert not torch.equal(fresh.state_dict()["out.2.conv.weight"],
                           dm.state_dict()["out.2.conv.weight"])


def test_spend_registry_remembers_the_highest_epsilon(tmp_path: Path) -> None:
    from server.spend import SpendRegistry

    reg = SpendRegistry(tmp_path / "spend.json")
    reg.record("site-a", 2.0)
    reg.record("site-a", 1.0)  # never lowered
    assert SpendRegistry(tmp_path / "spend.json").get("site-a") == 2.0


def test_coordinator_refuses_a_site_whose_spend_went_down_or_that_changes_node(
        tmp_path: Path) -> None:
    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert coord._check_site(1, "site-a", 3.0) is None
    assert coord._check_site(1, "site-a", 3.5) is None
    assert "ledger was reset" in coord._check_site(1, "site-a", 0.5)
    assert "claims to be" in coord._check_site(2, "site-a", 4.0)
    # A new coordinator (restart, or the next run) still remembers the spend.
    again = Coordinator(_NoGrid(), build_config(preset="tiny", image_size=16, seed=5),
                        ServerSettings(out=tmp_path / "next",
                                       spend_registry=tmp_path / "site-spend.json"))
    assert "ledger was reset" in again._check_site(7, "site-a", 0.0)


def test_check_update_rejects_integer_weights_for_a_floating_model() -> None:
    ref = {"w": torch.zeros(2, 3)}
    assert "dtype" in check_update(ref, {"w": torch.ones(2, 3, dtype=torch.int64)})
    assert check_update(ref, {"w": torch.ones(2, 3, dtype=torch.float64)}) is None


def test_server_step_is_fedavgm_with_golden_values() -> None:
    from server.aggregate import server_step

    ref0 = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(1)}
    agg1 = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(2)}
    # Plain averaging: momentum 0, lr 1 is the aggregate itself.
    out, _ = server_step(ref0, agg1, None, momentum=0.0, lr=1.0)
    assert torch.equal(out["w"], agg1["w"]) and int(out["n"]) == 2
    # Round 1 has no buffer: the step is the pull; lr scales it.
    out1, buf1 = server_step(ref0, agg1, None, momentum=0.5, lr=0.5)
    assert torch.equal(out1["w"], torch.tensor([0.5, -1.0])) and "n" not in buf1
    # Round 2: buffer = 0.5 x [1, -2] + (agg2 - ref) = [0.5, -1] + [2, 2] = [2.5, 1].
    agg2 = {"w": torch.tensor([2.5, 1.0]), "n": torch.tensor(3)}
    out2, buf2 = server_step(out1, agg2, buf1, momentum=0.5, lr=0.5)
    assert torch.equal(buf2["w"], torch.tensor([2.5, 1.0]))
    assert torch.equal(out2["w"], torch.tensor([1.75, -0.5]))
    assert out2["w"].dtype == torch.float32


def test_mean_state_averages_floats_keeps_the_last_counters_and_refuses_mismatches() -> None:
    from server.aggregate import mean_state

    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = mean_state(iter([a, b]))
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["w"].dtype == torch.float32
    assert int(out["n"]) == 5
    with pytest.raises(ValueError, match="different parameters"):
        mean_state([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="no state dicts"):
        mean_state([])


def test_robust_aggregation_bounds_one_site() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from ldm_core.config import AggregationConfig
    from server.aggregate import aggregate, norm_outliers, trim_count

    # Flower Messages need the task identity its runtime sets in a ServerApp.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    ref = {"w": torch.zeros(4)}
    ups = {1: {"w": torch.full((4,), 1.0)}, 2: {"w": torch.full((4,), 2.0)},
           3: {"w": torch.full((4,), 1000.0)}}
    assert trim_count(3, 0.2) == 1 and trim_count(2, 0.2) == 0 and trim_count(10, 0.2) == 2
    assert trim_count(49, 1 / 49) == 1
    for method, want in (("auto", 2.0), ("trimmed-mean", 2.0), ("median", 2.0),
                         ("mean", 1003 / 3)):
        out, how = aggregate(ref, ups, AggregationConfig(method=method))
        assert torch.allclose(out["w"], torch.full((4,), want)), (method, how)
    two = {k: ups[k] for k in (1, 2)}
    assert aggregate(ref, two, AggregationConfig())[1].startswith("mean")
    assert set(norm_outliers(ref, ups, 5.0)) == {3}
    assert norm_outliers(ref, ups, float("inf")) == {}


def test_robust_scale_factor_and_latent_checks() -> None:
    from server.aggregate import latent_stats_problem, robust_scale_factor

    honest = [(40.0, 100.0), (45.0, 110.0), (1e12, 100.0)]
    scale, _ = robust_scale_factor(honest, clip=10.0, method="auto")
    assert 1.4 < scale < 1.7  # the median site's mean ~0.4, not the liar's
    assert _ is None  # an honest release lands inside [0.01, clip]: no note
    assert latent_stats_problem(1e12, 100.0, clip=10.0, noise_multiplier=20.0)
    assert latent_stats_problem(40.0, -1e6, clip=10.0, noise_multiplier=20.0)
    assert latent_stats_problem(40.0, 100.0, clip=10.0, noise_multiplier=20.0) is None
    assert latent_stats_problem(-300.0, -200.0, clip=10.0, noise_multiplier=20.0) is None


def test_a_latent_scale_release_at_its_clamp_is_named_not_silent() -> None:
    """The paired 3D run that generated blank masks had released E[z^2] at the clip: the scale
    factor was a guess and nothing said so. Both pooling rules now name it, either clamp."""
    import math

    from ldm_core.privacy import pooled_scale_factor
    from server.aggregate import robust_scale_factor

    honest = [(130.0, 100.0), (120.0, 110.0), (125.0, 90.0)]
    assert pooled_scale_factor(honest, clip=2.0)[1] is None
    assert robust_scale_factor(honest, clip=2.0, method="median")[1] is None
    # noise made the pooled mean 1950 / 210 = 9.3 against a clip of 2
    scale, note = pooled_scale_factor([(2000.0, 100.0), (-50.0, 110.0)], clip=2.0)
    assert scale == pytest.approx(1 / math.sqrt(2.0))
    assert note and "clamp" in note and "9.29" in note and "privacy.scale_clip" in note
    _, low = pooled_scale_factor([(0.5, 100.0), (0.3, 110.0)], clip=2.0)  # 0.0038 < 0.01
    assert low and "clamp" in low
    scale, note = robust_scale_factor([(900.0, 100.0), (800.0, 90.0), (10.0, 100.0)],
                                      clip=2.0, method="median")
    assert scale == pytest.approx(1 / math.sqrt(2.0)) and note and "noisy mean 8.89" in note


def test_privacy_figures_are_checked_and_only_believed_when_accepted(tmp_path: Path) -> None:
    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    assert coord._privacy_problem("s", 9.0, 8.0, 1e-5)  # above the budget
    assert coord._privacy_problem("s", -1.0, 8.0, 1e-5)
    assert coord._privacy_problem("s", 2.0, 8.0, 1e-5) is None
    assert coord.spend.get("s") is None  # nothing believed before acceptance
    coord._believe("s", 2.0, 8.0, 1e-5)
    assert "delta" in coord._privacy_problem("s", 3.0, 8.0, 1e-3)
    assert "budget" in coord._privacy_problem("s", 3.0, 9.0, 1e-5)
    assert "ledger was reset" in coord._privacy_problem("s", 1.0, 8.0, 1e-5)
    assert "above its budget" in coord._privacy_problem("s", 8.5)  # latent: known budget


def test_aggregation_config_round_trips_and_old_configs_load() -> None:
    import json

    from ldm_core.config import ConfigError, RunConfig

    cfg = build_config(preset="tiny", image_size=16, overrides={"aggregation.method": "median",
                                                                "aggregation.norm_bound": 1e9})
    assert cfg.aggregation.method == "median"
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = json.loads(build_config(preset="tiny", image_size=16).to_json())
    del old["aggregation"]
    assert RunConfig.from_dict(old).aggregation.method == "auto"
    for bad in ({"aggregation.method": "krum"}, {"aggregation.trim_fraction": 0.5},
                {"aggregation.norm_bound": 1.0}):
        with pytest.raises(ConfigError):
            build_config(preset="tiny", image_size=16, overrides=bad)


def test_resume_accepts_a_folder_saved_before_the_aggregation_section(tmp_path: Path) -> None:
    import json

    cfg = build_config(preset="tiny", image_size=16)
    coord = Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path))
    coord._checkpoint("ae-final", "latent-scale", 0)
    state = json.loads(coord.folder.state_path.read_text())
    del state["config"]["aggregation"]
    coord.folder.state_path.write_text(json.dumps(state))
    assert Coordinator(_NoGrid(), cfg, ServerSettings(out=tmp_path)).state["stage"] == \
        "latent-scale"


def test_reconstruction_releases_are_vetted_and_pooled() -> None:
    """A site's [PSNR/50, SSIM] sums must lie in [0, count] up to the DP noise; pooling is
    post-processing, with None (not a made-up figure) when the noise swamps the counts."""
    from server.aggregate import pooled_recon_quality, recon_quality_problem

    assert recon_quality_problem(300.0, 400.0, 500.0, noise_multiplier=20.0) is None
    assert recon_quality_problem(-100.0, -50.0, 30.0, noise_multiplier=20.0) is None  # noise
    assert recon_quality_problem(1e12, 400.0, 500.0, noise_multiplier=20.0)
    assert recon_quality_problem(300.0, 1e5, 500.0, noise_multiplier=20.0)
    assert recon_quality_problem(300.0, 400.0, -1e6, noise_multiplier=20.0)
    assert recon_quality_problem(math.nan, 400.0, 500.0, noise_multiplier=20.0)
    pooled = pooled_recon_quality([(300.0, 400.0, 500.0), (100.0, 100.0, 500.0)],
                                  method="mean", noise_multiplier=20.0)
    assert pooled["psnr_db"] == pytest.approx(50.0 * 400.0 / 1000.0)
    assert pooled["ssim"] == pytest.approx(0.5)
    assert pooled["ssim_se"] == pytest.approx(2 * 20.0 * math.sqrt(2) / 1000.0)
    median = pooled_recon_quality([(300.0, 400.0, 500.0), (100.0, 100.0, 500.0),
                                   (500.0, 500.0, 500.0)], method="median",
                                  noise_multiplier=20.0)
    assert median["ssim"] == pytest.approx(0.8)
    swamped = pooled_recon_quality([(3.0, 2.0, -40.0)], method="mean", noise_multiplier=20.0)
    assert swamped["psnr_db"] is None and swamped["ssim"] is None
    # A site claiming a huge count buys no weight and cannot shrink the interval.
    honest = pooled_recon_quality([(100.0, 100.0, 500.0)], method="mean", noise_multiplier=20.0)
    liar = pooled_recon_quality([(100.0, 100.0, 500.0), (1e12, 1e12, 1e12)], method="mean",
                                noise_multiplier=20.0)
    assert liar["ssim"] == pytest.approx((0.2 + 1.0) / 2)
    assert liar["ssim_se"] >= honest["ssim_se"] / 2
