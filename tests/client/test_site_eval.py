"""client.site_eval: refuse / charge / read order, the TRTR classifier trained under DP with the
charged plan, the release's shape and noise, and the budget it is reserved from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client import site_eval, tasks
from client.ledger import BudgetExceededError, PrivacyLedger
from client.site_config import SiteConfig
from ldm_core.classifier import SmallCNN
from ldm_core.config import RunConfig, build_config
from ldm_core.data import ImageSet, SiteData
from ldm_core.dp_random import PrivacyRng
from ldm_core.evaluation.site_eval import Layout
from ldm_core.phantoms import render_demo

EVAL = {"privacy.eval_trtr_steps": 4, "privacy.eval_trtr_sample_rate": 0.25}


def _cfg(names: tuple[str, ...], epsilon: float = 8.0, **extra: Any) -> RunConfig:
    return build_config(preset="tiny", image_size=16, class_names=names, epsilon=epsilon,
                        device="cpu", overrides={**EVAL, **extra})


def _site(tmp_path: Path, *, allow: bool = True, epsilon: float = 8.0) -> SiteConfig:
    site = SiteConfig(site_id="site-0", data="in-memory", state_dir=tmp_path / "s",
                      epsilon=epsilon, delta=1e-5, partition="all", n_sites=1, device="cpu",
                      allow_evaluate=allow)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    PrivacyLedger.create(site.ledger_path, budget_epsilon=epsilon, delta=1e-5,
                         site_id="site-0")
    return site


@pytest.fixture(scope="module")
def data() -> SiteData:
    imgs, labels, _, _, names = render_demo(n_patients=60, slices_per_patient=1, n_sites=1,
                                            image_size=16, seed=5)
    x = torch.from_numpy(imgs).float().div(127.5).sub(1.0).unsqueeze(1)
    y = torch.from_numpy(labels).long()

    def part(s: slice) -> ImageSet:
        return ImageSet(x[s].contiguous(), y[s].contiguous(),
                        tuple(f"p{i}" for i in range(s.start, s.stop)))

    return SiteData("site-0", tuple(names), part(slice(0, 30)), part(slice(30, 40)),
                    part(slice(40, 60)), has_patient_ids=True)


def _call(site: SiteConfig, cfg: RunConfig, data: SiteData | None,
          synthetic: torch.Tensor | None = None, salt: str = "t") -> site_eval.EvalRelease:
    clf = SmallCNN(cfg.model.n_classes).state_dict()
    syn = synthetic if synthetic is not None else torch.rand(24, 1, 16, 16) * 2 - 1
    return site_eval.site_evaluate(site, cfg, clf, syn, run_id="run-1",
                                   rng=PrivacyRng.reproducible(1, salt), seed=0, data=data)


def _ledger(site: SiteConfig) -> PrivacyLedger:
    return tasks.open_ledger(site)


def _phases(site: SiteConfig) -> list[str]:
    return [e["phase"] for e in _ledger(site).entries()]


def test_a_site_that_does_not_allow_it_refuses_before_charging(tmp_path: Path,
                                                                data: SiteData) -> None:
    site = _site(tmp_path, allow=False)
    with pytest.raises(PermissionError, match="allow-evaluate"):
        _call(site, _cfg(data.class_names), data)
    assert _phases(site) == []


def test_a_paired_run_is_refused_before_charging_without_allow_masks(
        tmp_path: Path, data: SiteData) -> None:
    site = _site(tmp_path)  # evaluations allowed, masks not
    with pytest.raises(PermissionError, match="allow-masks"):
        _call(site, _cfg(data.class_names, **{"model.mask_channels": 1}), data)
    assert _phases(site) == []


def test_a_request_it_cannot_answer_is_refused_before_charging(tmp_path: Path,
                                                               data: SiteData) -> None:
    site = _site(tmp_path)
    with pytest.raises(ValueError, match="more than k"):
        _call(site, _cfg(data.class_names), data, synthetic=torch.zeros(5, 1, 16, 16))
    # An image shape the site's feature network would only choke on when it has test patients
    # must fail before the charge, whatever the data.
    for bad in (torch.zeros(24, 1, 0, 0), torch.zeros(24, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
            _call(site, _cfg(data.class_names), data, synthetic=bad)
    with pytest.raises(RuntimeError, match="state_dict"):
        site_eval.site_evaluate(site, _cfg(data.class_names), {"w": torch.zeros(1)},
                                torch.zeros(24, 1, 16, 16), run_id="r",
                                rng=PrivacyRng.reproducible(1), seed=0, data=data)
    assert _phases(site) == []


def test_the_charge_is_durable_before_the_data_is_read(tmp_path: Path, data: SiteData,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path)

    def boom(*a: object) -> SiteData:
        assert set(_phases(site)) == {"evaluate"}, "data read before the charge"
        raise OSError("disk gone")

    monkeypatch.setattr(tasks, "load_data", boom)
    monkeypatch.setattr(tasks, "check_data_kind", lambda *a: None)  # no files
    with pytest.raises(OSError, match="disk gone"):
        _call(site, _cfg(data.class_names), None)
    cfg = _cfg(data.class_names)
    entries = _ledger(site).entries()
    assert [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries] == \
        [tuple(x) for x in tasks.evaluation_entries(cfg)]


def test_a_budget_that_cannot_afford_it_stops_before_the_data(tmp_path: Path, data: SiteData,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    site = _site(tmp_path, epsilon=0.05)
    monkeypatch.setattr(tasks, "load_data", lambda *a: pytest.fail("data read"))
    monkeypatch.setattr(tasks, "check_data_kind", lambda *a: None)  # no files
    with pytest.raises(BudgetExceededError):
        _call(site, _cfg(data.class_names, epsilon=0.05), None)


def test_release_shape_noise_and_the_dp_trained_reference(tmp_path: Path, data: SiteData,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    cfg = _cfg(data.class_names)
    seen: dict[str, Any] = {}
    real_dp_train = site_eval.dp_train

    def spy(*args: Any, **kw: Any) -> Any:
        seen.update(kw)
        return real_dp_train(*args, **kw)

    monkeypatch.setattr(site_eval, "dp_train", spy)
    site = _site(tmp_path)
    out = _call(site, cfg, data)
    lay = Layout(cfg.model.n_classes, cfg.privacy.eval_bins)
    assert len(out.values) == lay.size and (out.n_classes, out.bins) == (lay.n_classes, lay.bins)
    assert out.noise_std == pytest.approx(cfg.privacy.eval_noise_multiplier * lay.sensitivity)
    assert out.epsilon == pytest.approx(_ledger(site).epsilon())
    # The TRTR classifier trained with DP-SGD at exactly the charged plan.
    assert seen["noise_multiplier"] == cfg.privacy.eval_trtr_noise_multiplier > 0
    assert seen["plan"].steps == cfg.privacy.eval_trtr_steps
    assert seen["plan"].sample_rate == cfg.privacy.eval_trtr_sample_rate
    assert seen["privacy_rng"] is not None and seen["groups"] is not None
    # Noise: 20 test patients put 20 into each arm's confusion matrix; the noisy sum is not
    # that, and two releases differ.
    parts = lay.unpack(np.asarray(out.values))
    assert abs(parts["tstr.conf"].sum() - 20) > 1e-6
    again = _call(_site(tmp_path / "b"), cfg, data, salt="other")
    assert not np.allclose(out.values, again.values)


def test_without_dp_the_counts_are_exact(tmp_path: Path, data: SiteData) -> None:
    cfg = _cfg(data.class_names, epsilon=float("inf"))
    out = _call(_site(tmp_path, epsilon=float("inf")), cfg, data)
    parts = Layout(cfg.model.n_classes, cfg.privacy.eval_bins).unpack(np.asarray(out.values))
    assert parts["tstr.conf"].sum() == 20 == parts["trtr.conf"].sum()
    assert out.noise_std == 0.0


def test_the_run_plan_reserves_the_evaluation(tmp_path: Path, data: SiteData) -> None:
    cfg = _cfg(data.class_names)
    plain = _site(tmp_path / "a", allow=False)
    allowing = dataclasses.replace(_site(tmp_path / "b"))
    a = tasks.plan_noise(plain, cfg, tasks.open_ledger(plain), "r")
    b = tasks.plan_noise(allowing, cfg, tasks.open_ledger(allowing), "r")
    assert a.evaluate == 0.0 and b.evaluate == cfg.privacy.eval_noise_multiplier
    # Less budget left for training: more noise on every phase.
    assert all(b.sigmas[p] > a.sigmas[p] for p in a.sigmas)


def test_the_release_noise_comes_from_the_sites_privacy_source_not_the_message_seed(
        tmp_path: Path, data: SiteData, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same message seed, two privacy streams: the noise the release adds differs. (Noise
    derived from the coordinator's seed could be subtracted by the coordinator.)"""
    cfg = _cfg(data.class_names)
    lay = Layout(cfg.model.n_classes, cfg.privacy.eval_bins)
    noises: list[np.ndarray] = []
    real_noisy_sum = site_eval.noisy_sum

    def spy(rows: np.ndarray, layout: Layout, *, noise_multiplier: float,
            generator: torch.Generator | None) -> np.ndarray:
        if generator is not None:  # the same draws, on a copy of the generator's state
            g = torch.Generator().set_state(generator.get_state())
            noises.append(real_noisy_sum(np.zeros((0, lay.size)), lay,
                                         noise_multiplier=noise_multiplier, generator=g))
        return real_noisy_sum(rows, layout, noise_multiplier=noise_multiplier,
                              generator=generator)

    monkeypatch.setattr(site_eval, "noisy_sum", spy)
    _call(_site(tmp_path / "a"), cfg, data, salt="one")
    _call(_site(tmp_path / "b"), cfg, data, salt="two")
    assert len(noises) == 2 and not np.allclose(noises[0], noises[1])
    assert np.std(noises[0]) == pytest.approx(cfg.privacy.eval_noise_multiplier
                                              * lay.sensitivity, rel=0.2)
