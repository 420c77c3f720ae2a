"""Tests for ldm_core.evaluation.attacks: exact ROC, the near-copy test, and the DP release.

The sensitivity test is the one the privacy claim rests on: it enumerates neighbouring datasets
(one member or non-member added, removed or, through subsampling, replaced) on random scores and
checks that the un-noised vector never moves by more than the documented Delta.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ldm_core.evaluation.attacks import (
    ATTACKS,
    AUDIT_NOISED_KEYS,
    AUDIT_RELEASE_KEYS,
    auc_count,
    audit_counts,
    audit_estimates,
    audit_sensitivity,
    dp_audit_release,
    exact_roc,
    near_copy_test,
    sample_threshold,
)


# ------------------------------------------------------------------------------- exact ROC
def test_exact_roc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    members = np.round(rng.normal(-0.3, 1, 300), 1)  # lower = member; rounding makes ties
    nonmembers = np.round(rng.normal(0, 1, 500), 1)
    roc = exact_roc(members, nonmembers)
    y = np.r_[np.ones(300), np.zeros(500)]
    assert roc["auc"] == pytest.approx(roc_auc_score(y, -np.r_[members, nonmembers]), abs=1e-12)
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0


def test_exact_roc_resolves_low_fpr_that_histograms_could_not() -> None:
    """The old pooled-histogram path reported 0.003 for a leak whose TPR@1%FPR is ~0.2."""
    rng = np.random.default_rng(1)
    n = 5000
    nonmembers = rng.normal(0, 1, n)
    members = np.where(rng.random(n) < 0.2, -5.0 + 0.1 * rng.normal(size=n),
                       rng.normal(0, 1, n))  # 20 % of members are far below every non-member
    roc = exact_roc(members, nonmembers)
    assert roc["tpr_at_1pct_fpr"] > 0.2
    assert roc["tpr_at_0_1pct_fpr"] > 0.19
    assert roc["auc"] > 0.55


def test_exact_roc_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="member_scores"):
        exact_roc([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        exact_roc([0.1], [np.nan])


def test_sample_threshold_is_the_quantile() -> None:
    scores = np.arange(1001, dtype=float)
    assert sample_threshold(scores) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="quantile"):
        sample_threshold(scores, 1.0)


# ------------------------------------------------------------------------------- near copies
def test_near_copy_flags_single_copies_only() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(200, 16))
    copied = samples[:10] + 1e-3 * rng.normal(size=(10, 16))  # one close sample each
    fresh = rng.normal(size=(50, 16))
    res = near_copy_test(np.r_[copied, fresh], samples)
    assert res["flags"][:10].all()
    assert res["flags"][10:].mean() < 0.1
    assert (res["nearest"][:10] == np.arange(10)).all()
    assert (res["d1"] <= res["d2"]).all()


def test_near_copy_is_per_record() -> None:
    """A record's flag must not depend on the other records (the sensitivity analysis needs it)."""
    rng = np.random.default_rng(2)
    samples, records = rng.normal(size=(64, 8)), rng.normal(size=(30, 8))
    records[:5] = samples[:5] + 1e-4
    full = near_copy_test(records, samples)["flags"]
    for i in range(30):
        alone = near_copy_test(records[i:i + 1], samples, chunk=1)["flags"][0]
        assert alone == full[i]


# ------------------------------------------------------------------------------- sensitivity
def _vector(mem: dict[str, np.ndarray], non: dict[str, np.ndarray], taus: dict[str, float],
            mem_nc: np.ndarray, non_nc: np.ndarray, m: int) -> np.ndarray:
    return audit_counts(records=m, member_scores=mem, nonmember_scores=non, thresholds=taus,
                        member_near_copy=mem_nc, nonmember_near_copy=non_nc)


def _random_side(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    # few distinct values: ties and threshold hits are common, the hard case for the bound
    return ({a: np.round(rng.normal(size=n), 1) for a in ATTACKS}, rng.random(n) < 0.3)


def _drop(side: tuple[dict, np.ndarray], i: int) -> tuple[dict, np.ndarray]:
    scores, nc = side
    return {a: np.delete(v, i) for a, v in scores.items()}, np.delete(nc, i)


def _put(side: tuple[dict, np.ndarray], new: tuple[dict, np.ndarray], i: int | None
         ) -> tuple[dict, np.ndarray]:
    """Append ``new`` (i None) or replace record i with it."""
    scores, nc = side
    if i is None:
        return ({a: np.r_[v, new[0][a]] for a, v in scores.items()}, np.r_[nc, new[1]])
    s2 = {a: v.copy() for a, v in scores.items()}
    nc2 = nc.copy()
    for a in ATTACKS:
        s2[a][i] = new[0][a][0]
    nc2[i] = new[1][0]
    return s2, nc2


@pytest.mark.parametrize("n_mem,n_non", [(16, 16), (5, 16), (16, 3), (15, 15), (1, 1)])
def test_one_record_moves_the_vector_by_at_most_delta(n_mem: int, n_non: int) -> None:
    m = 16
    delta = audit_sensitivity()
    assert delta == pytest.approx(math.sqrt(2 * len(ATTACKS) + 2))
    rng = np.random.default_rng(n_mem * 100 + n_non)
    worst = 0.0
    for _ in range(150):
        mem, non = _random_side(rng, n_mem), _random_side(rng, n_non)
        taus = {a: float(rng.normal()) for a in ATTACKS}
        base = _vector(mem[0], non[0], taus, mem[1], non[1], m)
        new = _random_side(rng, 1)
        neighbours = []
        for side in ("mem", "non"):
            cur = mem if side == "mem" else non
            i = int(rng.integers(cur[1].size))
            variants = [_drop(cur, i), _put(cur, new, i)]  # remove, replace (subsampling)
            if cur[1].size < m:
                variants.append(_put(cur, new, None))  # add
            for v in variants:
                neighbours.append((v, non) if side == "mem" else (mem, v))
        for (m2, n2) in neighbours:
            vec = _vector(m2[0], n2[0], taus, m2[1], n2[1], m)
            step = float(np.linalg.norm(vec - base))
            worst = max(worst, step)
            assert step <= delta + 1e-9, step
            assert np.abs(vec - base).max() <= 1.0 + 1e-9
    assert worst > 0.8 * delta  # the bound is nearly attained, i.e. not a loose guess


def test_audit_counts_refuses_more_than_m_records() -> None:
    rng = np.random.default_rng(0)
    mem, non = _random_side(rng, 17), _random_side(rng, 3)
    with pytest.raises(ValueError, match="subsample"):
        _vector(mem[0], non[0], dict.fromkeys(ATTACKS, 0.0), mem[1], non[1], 16)


def test_auc_count_is_the_mann_whitney_count() -> None:
    assert auc_count([0.0, 1.0], [1.0, 2.0]) == 2 + 1.5
    assert auc_count([], [1.0]) == 0.0


# ------------------------------------------------------------------------------- the release
def test_release_noise_has_the_documented_std_and_comes_from_the_generator() -> None:
    counts = np.zeros(len(AUDIT_NOISED_KEYS))
    draws = np.array([
        [dp_audit_release(counts, records=100, noise_multiplier=2.0,
                          generator=torch.Generator().manual_seed(s), epsilon=1.0)[k]
         for k in AUDIT_NOISED_KEYS] for s in range(400)])
    expected = 2.0 * audit_sensitivity() / 100
    assert draws.std() == pytest.approx(expected, rel=0.05)
    a = dp_audit_release(counts, records=100, noise_multiplier=2.0,
                         generator=torch.Generator().manual_seed(5), epsilon=1.0)
    b = dp_audit_release(counts, records=100, noise_multiplier=2.0,
                         generator=torch.Generator().manual_seed(5), epsilon=1.0)
    assert a == b and tuple(a) == AUDIT_RELEASE_KEYS
    assert a["noise_std"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="audit_noise_multiplier"):
        dp_audit_release(counts, records=100, noise_multiplier=0.0,
                         generator=torch.Generator(), epsilon=1.0)


def test_estimates_renormalise_small_splits() -> None:
    m = 100
    # 50 members, 25 non-members, every member below every non-member: AUC 1
    release = {k: 0.0 for k in AUDIT_RELEASE_KEYS}
    release.update({"denoiser.auc": 50 * 25 / m**2, "denoiser.tpr": 0.5, "denoiser.fpr": 0.0,
                    "autoencoder.auc": 0.5 * 50 * 25 / m**2, "near_copy_fraction": 0.05,
                    "members_fraction": 0.5, "nonmembers_fraction": 0.25,
                    "records": float(m), "noise_std": 0.01, "epsilon": 0.3})
    est = audit_estimates(release)
    assert est["attacks"]["denoiser"]["auc"] == pytest.approx(1.0)
    assert est["attacks"]["denoiser"]["tpr"] == pytest.approx(1.0)
    assert est["attacks"]["autoencoder"]["auc"] == pytest.approx(0.5)
    assert est["best_attack"] == "denoiser"
    assert est["near_copy_fraction"] == pytest.approx(0.1)
    noisy = {**release, "members_fraction": 1.3, "denoiser.auc": -0.2}
    est2 = audit_estimates(noisy)
    assert 0.0 <= est2["attacks"]["denoiser"]["auc"] <= 1.0
    with pytest.raises(ValueError, match="lacks"):
        audit_estimates({"denoiser.auc": 0.5})
