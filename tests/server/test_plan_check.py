"""The coordinator's early check that a fresh site's budget can hold the run's plan."""

from __future__ import annotations

import pytest

from ldm_core.config import build_config
from server.federation import FederationError
from server.plan_check import check_plan_fits


def _fits(eps: float, *, audit: bool = False, evaluate: bool = False) -> bool:
    cfg = build_config(preset="quick", class_names=("a", "b"), epsilon=eps)
    try:
        check_plan_fits(cfg, eps, 1e-5, audit=audit, evaluate=evaluate)
    except FederationError:
        return False
    return True


def test_a_budget_too_small_is_refused_naming_the_fix() -> None:
    cfg = build_config(preset="quick", class_names=("a", "b"), epsilon=0.2,
                       overrides={"autoencoder.rounds": 1})
    with pytest.raises(FederationError, match=r"--epsilon 0.2 cannot hold.*ae_share"):
        check_plan_fits(cfg, 0.2, 1e-5, audit=False, evaluate=False)
    assert _fits(8.0, audit=True, evaluate=True)


def test_the_fix_names_no_autoencoder_share_when_no_autoencoder_trains() -> None:
    """The quick presets run 0 autoencoder rounds: its share is the denoiser's already."""
    cfg = build_config(preset="quick", class_names=("a", "b"), epsilon=0.2)
    assert cfg.autoencoder.rounds == 0
    with pytest.raises(FederationError, match="cannot hold") as err:
        check_plan_fits(cfg, 0.2, 1e-5, audit=False, evaluate=False)
    assert "ae_share" not in str(err.value)
    assert "scale_noise_multiplier" in str(err.value)


@pytest.mark.parametrize("reserve", ["audit", "evaluate"])
def test_audits_and_evaluations_are_each_reserved_in_the_check(reserve: str) -> None:
    """Just above the smallest budget a plain site can hold, a site that also allows audits
    (or evaluations) cannot: each reserve is counted."""
    lo, hi = 0.2, 8.0
    for _ in range(20):  # bisect the smallest budget a plain site can hold
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _fits(mid) else (mid, hi)
    assert _fits(hi) and not _fits(hi, **{reserve: True})


def test_the_named_cheaper_releases_fit_an_epsilon_1_budget() -> None:
    """The fix the error names (and benchmarks/privacy_utility.py applies) must work: the quick
    preset's default releases spend more than epsilon 1 with audits, the cheaper ones do not."""
    from server.plan_check import CHEAPER, CHEAPER_RELEASES

    def fits(overrides: dict[str, float | int]) -> bool:
        cfg = build_config(preset="quick", class_names=("a", "b"), epsilon=1.0,
                           overrides=dict(overrides))
        try:
            check_plan_fits(cfg, 1.0, 1e-5, audit=True, evaluate=False)
        except FederationError:
            return False
        return True

    assert not fits({})
    assert fits(CHEAPER_RELEASES)
    for key, value in CHEAPER_RELEASES.items():
        assert f"--set {key}={value}" in CHEAPER
