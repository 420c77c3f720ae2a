"""Coordinator pieces that need no runtime: update checks, run-config parsing, resume guard."""

from __future__ import annotations

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
