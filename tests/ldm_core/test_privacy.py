"""Tests for ldm_core.privacy: golden epsilons, calibration that never overshoots, DP release."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_core.privacy import (
    calibrate_noise,
    dp_sum_and_count,
    epsilon_of,
    gaussian_mechanism_entry,
    validate_history,
)

DELTA = 1e-5

# Computed once with Opacus 1.6's RDPAccountant (default orders) and hard-coded: a change here
# means the accountant (or our use of it) changed, which must be looked at, not re-baselined.
GOLDEN = [
    ([(1.0, 0.01, 1000)], 2.1013652716430564),
    ([(1.1, 0.01, 1000), (0.9, 0.02, 500)], 4.326632888416419),
]


@pytest.mark.parametrize(("history", "expected"), GOLDEN)
def test_golden_epsilon(history, expected):
    assert epsilon_of(history, DELTA) == pytest.approx(expected, rel=1e-6)


def test_empty_and_zero_step_history_cost_nothing():
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of([(1.0, 0.01, 0), (0.0, 0.5, 0)], DELTA) == 0.0


def test_zero_noise_is_infinite():
    assert epsilon_of([(1.0, 0.01, 10), (0.0, 0.01, 1)], DELTA) == math.inf


def test_merging_equal_entries_changes_nothing():
    split = [(1.0, 0.01, 400), (0.8, 0.02, 10), (1.0, 0.01, 600)]
    merged = [(1.0, 0.01, 1000), (0.8, 0.02, 10)]
    assert epsilon_of(split, DELTA) == pytest.approx(epsilon_of(merged, DELTA), rel=1e-12)


def test_monotone_in_steps_noise_rate_and_delta():
    steps = [epsilon_of([(1.0, 0.01, t)], DELTA) for t in (10, 100, 1000, 5000)]
    assert steps == sorted(steps) and len(set(steps)) == 4
    sigmas = [epsilon_of([(s, 0.01, 1000)], DELTA) for s in (0.6, 0.8, 1.0, 2.0)]
    assert sigmas == sorted(sigmas, reverse=True)
    rates = [epsilon_of([(1.0, q, 1000)], DELTA) for q in (0.001, 0.01, 0.1)]
    assert rates == sorted(rates)
    deltas = [epsilon_of([(1.0, 0.01, 1000)], d) for d in (1e-7, 1e-5, 1e-3)]
    assert deltas == sorted(deltas, reverse=True)
    # appending anything never lowers epsilon
    base = [(1.0, 0.01, 1000)]
    assert epsilon_of([*base, gaussian_mechanism_entry(50.0)], DELTA) > epsilon_of(base, DELTA)


@pytest.mark.parametrize(
    "entry",
    [
        (1.0, 0.0, 10),
        (1.0, 1.5, 10),
        (1.0, float("nan"), 10),
        (-0.1, 0.01, 10),
        (float("nan"), 0.01, 10),
        (float("inf"), 0.01, 10),
        (1.0, 0.01, -1),
        (1.0, 0.01, 2.5),
        (1.0, 0.01, True),
        (1.0, 0.01),
        "bad",
    ],
)
def test_bad_entries_raise_naming_the_entry(entry):
    with pytest.raises(ValueError, match="entry #1"):
        epsilon_of([(1.0, 0.01, 10), entry], DELTA)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan")])
def test_bad_delta_raises(delta):
    with pytest.raises(ValueError, match="delta"):
        epsilon_of([(1.0, 0.01, 10)], delta)


def test_validate_history_normalises():
    assert validate_history([(1, 1, 3)]) == [(1.0, 1.0, 3)]


# -- calibrate_noise -------------------------------------------------------------------------
PLAN = [(0.02, 1000), (0.02, 3000)]


@pytest.mark.parametrize(("target", "shares"), [(8.0, (0.3, 0.7)), (2.0, (0.5, 0.5))])
def test_calibration_hits_target_and_never_exceeds(target, shares):
    sigmas = calibrate_noise(PLAN, target_epsilon=target, delta=DELTA, shares=shares)
    spent = epsilon_of([(s, q, t) for s, (q, t) in zip(sigmas, PLAN, strict=True)], DELTA)
    assert spent <= target
    assert spent >= 0.99 * target


def test_shares_matter():
    a = calibrate_noise(PLAN, target_epsilon=8.0, delta=DELTA, shares=(0.8, 0.2))
    b = calibrate_noise(PLAN, target_epsilon=8.0, delta=DELTA, shares=(0.2, 0.8))
    # more budget for a phase means less noise for it
    assert a[0] < b[0]
    assert a[1] > b[1]


def test_reserved_reduces_what_is_left():
    free = calibrate_noise(PLAN, target_epsilon=4.0, delta=DELTA, shares=(0.5, 0.5))
    reserved = [(1.0, 0.02, 500)]
    used = calibrate_noise(
        PLAN, target_epsilon=4.0, delta=DELTA, shares=(0.5, 0.5), reserved=reserved
    )
    assert all(u > f for u, f in zip(used, free, strict=True))
    spent = epsilon_of(reserved + [(s, q, t) for s, (q, t) in zip(used, PLAN, strict=True)], DELTA)
    assert 0.99 * 4.0 <= spent <= 4.0


def test_reserved_over_target_raises():
    with pytest.raises(ValueError, match="reserved"):
        calibrate_noise(
            PLAN, target_epsilon=1.0, delta=DELTA, shares=(0.5, 0.5), reserved=[(0.5, 0.1, 1000)]
        )


def test_infinite_target_means_no_noise():
    assert calibrate_noise(PLAN, target_epsilon=math.inf, delta=DELTA, shares=(0.5, 0.5)) == [
        0.0,
        0.0,
    ]


def test_zero_step_phase_gets_zero_and_frees_its_share():
    sigmas = calibrate_noise(
        [(0.02, 0), (0.02, 3000)], target_epsilon=4.0, delta=DELTA, shares=(0.5, 0.5)
    )
    assert sigmas[0] == 0.0
    alone = calibrate_noise([(0.02, 3000)], target_epsilon=4.0, delta=DELTA, shares=(1.0,))
    assert sigmas[1] == pytest.approx(alone[0], rel=2e-3)
    assert epsilon_of([(sigmas[1], 0.02, 3000)], DELTA) <= 4.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shares": (0.5,)}, "one share per phase"),
        ({"shares": (0.5, 0.6)}, "sum to"),
        ({"shares": (1.0, 0.0)}, "share 0"),
        ({"shares": (-0.5, 1.5)}, "shares"),
        ({"shares": (0.5, 0.5), "target_epsilon": 0.0}, "target_epsilon"),
        ({"shares": (0.5, 0.5), "delta": 2.0}, "delta"),
    ],
)
def test_calibration_bad_input(kwargs, match):
    args = {"target_epsilon": 4.0, "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=match):
        calibrate_noise(PLAN, **args)


def test_calibration_bad_phase():
    with pytest.raises(ValueError, match="phase #0"):
        calibrate_noise([(0.0, 10)], target_epsilon=4.0, delta=DELTA, shares=(1.0,))


# -- Gaussian mechanism ----------------------------------------------------------------------
def test_gaussian_entry_is_the_gaussian_mechanism():
    sigma = 3.0
    assert gaussian_mechanism_entry(sigma) == (3.0, 1.0, 1)
    # Closed form: RDP alpha / (2 sigma^2) of the Gaussian mechanism, converted as Opacus does,
    # minimised over Opacus' default orders.
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    expected = min(
        a / (2 * sigma**2) - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in orders
    )
    assert epsilon_of([gaussian_mechanism_entry(sigma)], DELTA) == pytest.approx(expected)


def test_clipping_bounds_an_outlier():
    gen = torch.Generator().manual_seed(0)
    # float64 so that the check is about clipping, not about float32 rounding of the output
    rows = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    outlier = torch.full((1, 8), 1e6, dtype=torch.float64)
    clip = 1.5
    without, n0 = dp_sum_and_count(rows, clip=clip, noise_multiplier=0.0, generator=gen)
    with_, n1 = dp_sum_and_count(
        torch.cat([rows, outlier]), clip=clip, noise_multiplier=0.0, generator=gen
    )
    assert (n0, n1) == (50.0, 51.0)
    assert torch.linalg.vector_norm(with_ - without).item() <= clip * (1 + 1e-9)
    # small rows are not touched
    small = torch.full((3, 4), 0.1)
    s, _ = dp_sum_and_count(small, clip=10.0, noise_multiplier=0.0, generator=gen)
    assert torch.allclose(s, small.sum(0))


def test_noise_scale_matches_sigma_clip_sqrt2():
    sigma, clip = 2.0, 0.5
    std = sigma * clip * math.sqrt(2.0)
    gen = torch.Generator().manual_seed(1234)
    empty = torch.zeros(0, 20_000)
    noisy, _ = dp_sum_and_count(empty, clip=clip, noise_multiplier=sigma, generator=gen)
    assert noisy.mean().item() == pytest.approx(0.0, abs=4 * std / math.sqrt(20_000))
    assert noisy.std().item() == pytest.approx(std, rel=0.03)
    # the count's noise is the same draw scaled back by 1/clip: std sigma * sqrt(2)
    counts = torch.tensor(
        [
            dp_sum_and_count(torch.zeros(7, 1), clip=clip, noise_multiplier=sigma, generator=gen)[1]
            for _ in range(2000)
        ]
    )
    assert counts.mean().item() == pytest.approx(7.0, abs=4 * sigma * math.sqrt(2) / 45)
    assert counts.std().item() == pytest.approx(sigma * math.sqrt(2.0), rel=0.08)


def test_release_noise_comes_only_from_the_generator_passed_in():
    """The primitive takes its randomness as an argument (the site passes its secret source,
    ldm_core.dp_random); it must not fall back on torch's global RNG, which a seed could fix."""
    from ldm_core.dp_random import PrivacyRng

    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    kw = {"clip": 1.0, "noise_multiplier": 1.0}
    torch.manual_seed(0)
    a = dp_sum_and_count(x, generator=PrivacyRng.secure().generator(), **kw)
    torch.manual_seed(0)
    b = dp_sum_and_count(x, generator=PrivacyRng.secure().generator(), **kw)
    assert not torch.equal(a[0], b[0])  # global seed fixed, secret generators differ
    assert a[0].dtype == x.dtype and a[0].shape == (3,)


def test_release_noise_is_drawn_the_floating_point_safe_way():
    """The noise is secure_standard_normal's (four normals summed, halved), not one randn
    draw per coordinate: the latter's low-order bits are open to floating-point attacks."""
    from ldm_core.privacy import secure_standard_normal

    sigma, clip = 3.0, 2.0
    noisy, count = dp_sum_and_count(torch.zeros(0, 5, dtype=torch.float64), clip=clip,
                                    noise_multiplier=sigma,
                                    generator=torch.Generator().manual_seed(7))
    expected = sigma * clip * math.sqrt(2.0) * secure_standard_normal(
        6, torch.Generator().manual_seed(7))
    assert torch.allclose(noisy, torch.from_numpy(expected[:5]))
    assert count == pytest.approx(expected[5] / clip)


@pytest.mark.parametrize(
    ("per_sample", "kwargs", "match"),
    [
        (torch.zeros(3), {}, "2-D"),
        (torch.zeros(3, 2, dtype=torch.long), {}, "floating"),
        (torch.zeros(3, 2), {"clip": 0.0}, "clip"),
        (torch.zeros(3, 2), {"noise_multiplier": -1.0}, "noise_multiplier"),
        (torch.zeros(3, 2), {"generator": None}, "generator"),
    ],
)
def test_release_bad_input(per_sample, kwargs, match):
    args = {"clip": 1.0, "noise_multiplier": 1.0, "generator": torch.Generator(), **kwargs}
    with pytest.raises(ValueError, match=match):
        dp_sum_and_count(per_sample, **args)


def test_a_non_finite_record_counts_as_zeros_instead_of_failing_the_release():
    """One record's overflow must not turn the release into an error (an unnoised bit for
    whoever crafted the model): its row is zeros, it still counts."""
    x = torch.tensor([[1.0, 2.0], [float("nan"), 5.0], [float("inf"), 0.0], [3.0, 4.0]])
    total, count = dp_sum_and_count(x, clip=10.0, noise_multiplier=0.0,
                                    generator=torch.Generator())
    assert torch.equal(total, torch.tensor([4.0, 6.0])) and count == 4.0
