"""Privacy accounting for a site: epsilon of a history, noise calibration, a Gaussian release.

Everything here goes through Opacus' RDP accountant (`opacus.accountants.RDPAccountant`): a
history is exactly what that accountant keeps, ``(noise_multiplier, sample_rate, steps)`` per
entry, so the numbers this module reports are the numbers Opacus would report for the same
steps. Nothing here hand-writes an accountant; it only validates input (a wrong history is a
privacy bug, not a crash to debug later) and composes Opacus' pieces.

Adjacency is add/remove-one-record, as in Opacus' Poisson-sampled DP-SGD. A "record" is one
training example; if a patient has several images, the guarantee is per image.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]
"""Entries ``(noise_multiplier, sample_rate, steps)``, exactly as ``RDPAccountant.history``."""

# Relative gap at which the common-factor bisection in `calibrate_noise` stops: the returned
# noise spends between (1 - _CALIBRATION_RTOL) * target and target.
_CALIBRATION_RTOL = 1e-3
_MAX_BISECTIONS = 200
_MAX_FACTOR = 1e6


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_delta(delta: float) -> float:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(
            f"delta must be a number in (0, 1), got {delta!r}; use e.g. 1e-5 or less than "
            "1/(number of training records at the site)."
        )
    return float(delta)


def validate_entry(entry: object, *, where: str = "history entry") -> tuple[float, float, int]:
    """Check one ``(noise_multiplier, sample_rate, steps)`` entry and return it normalised.

    Why strict: a NaN sigma or a sample rate above 1 would make Opacus return a meaningless (often
    too small) epsilon instead of failing, and an under-count is the one thing we cannot allow.
    """
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        raise ValueError(
            f"{where} {entry!r} is not a (noise_multiplier, sample_rate, steps) triple; build it "
            "as in Opacus' RDPAccountant.history."
        )
    sigma, q, steps = entry
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(
            f"{where} {entry!r}: noise_multiplier must be a finite number >= 0 "
            "(0 means no noise, i.e. epsilon = inf)."
        )
    if not _is_real(q) or not math.isfinite(q) or not 0.0 < q <= 1.0:
        raise ValueError(
            f"{where} {entry!r}: sample_rate must be in (0, 1] (Poisson rate = batch / records; "
            "1.0 for a mechanism that sees every record)."
        )
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{where} {entry!r}: steps must be an integer >= 0.")
    return float(sigma), float(q), int(steps)


def validate_history(history: Iterable[object]) -> History:
    """Validate every entry (see `validate_entry`) and return a fresh normalised list."""
    return [validate_entry(e, where=f"history entry #{i}") for i, e in enumerate(history)]


def _quiet_accountant_epsilon(history: History, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is the largest one it tries (tiny spends). The
        # bound is still a valid (slightly loose, i.e. over-counting) epsilon, so the warning is
        # noise for a ledger that re-evaluates it on every charge.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def epsilon_of(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta``, by Opacus' RDP accountant.

    - empty history (or only zero-step entries): 0.0 — nothing was released;
    - any entry with ``steps > 0`` and ``noise_multiplier == 0``: ``math.inf`` (the non-private
      baseline). A zero-step entry costs nothing whatever its sigma: zero runs of a mechanism
      release nothing (Opacus itself would return inf there, via ``inf * 0 = nan``, which
      would brick a ledger over a planned-but-skipped phase).

    Entries with the same ``(noise_multiplier, sample_rate)`` are merged by summing their steps
    before calling Opacus. RDP composes additively and Opacus computes ``rdp(q, sigma) * steps``,
    so this is the same number (up to float rounding), in time independent of the ledger length.
    """
    delta = _check_delta(delta)
    entries = validate_history(history)
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in entries:
        if steps == 0:
            continue
        if sigma == 0.0:
            return math.inf
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    if not merged:
        return 0.0
    eps = _quiet_accountant_epsilon([(s, q, t) for (s, q), t in merged.items()], delta)
    if math.isnan(eps):
        # Opacus returns nan only in degenerate numerics; treating it as inf over-counts, which
        # is the safe direction.
        return math.inf
    return max(0.0, eps)


def _check_phases(phases: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    for i, phase in enumerate(phases):
        if not isinstance(phase, (tuple, list)) or len(phase) != 2:
            raise ValueError(f"phase #{i} {phase!r} must be a (sample_rate, steps) pair.")
        _, q, steps = validate_entry((1.0, phase[0], phase[1]), where=f"phase #{i}")
        out.append((q, steps))
    return out


def _check_shares(shares: Sequence[float], n: int) -> list[float]:
    shares = list(shares)
    if len(shares) != n:
        raise ValueError(
            f"shares has {len(shares)} values but there are {n} phases; give one share per phase."
        )
    for i, s in enumerate(shares):
        if not _is_real(s) or not math.isfinite(s) or s < 0:
            raise ValueError(f"shares[{i}] = {s!r} must be a finite number >= 0.")
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares {shares} sum to {sum(shares)}, not 1; normalise them.")
    return [float(s) for s in shares]


def calibrate_noise(
    phases: Sequence[tuple[float, int]],
    *,
    target_epsilon: float,
    delta: float,
    shares: Sequence[float],
    reserved: Sequence[tuple[float, float, int]] = (),
) -> list[float]:
    """Noise multipliers, one per planned phase, so that the whole plan fits ``target_epsilon``.

    ``phases`` are planned ``(sample_rate, steps)`` (e.g. autoencoder, then diffusion);
    ``shares`` (summing to 1) split the budget left after ``reserved`` (what the ledger has
    already spent, plus any release made before training such as the latent scale factor).

    How: each phase first gets, from Opacus' ``get_noise_multiplier``, the sigma that alone would
    spend ``share_i * (target - epsilon(reserved))``. RDP composition is sub-additive in epsilon,
    so all those sigmas together spend less than the target; one common factor ``f`` (found by
    bisection; usually < 1, allowed above 1 if ever needed) then scales them so that
    ``epsilon(reserved + phases)`` lands within 0.1% below the target. The shares thus fix the
    ratio of the sigmas; the factor uses the budget fully. The result is re-checked and this
    raises rather than return noise that would exceed the target.

    A phase with 0 steps gets 0.0 and is left out: it releases nothing, so its sigma is
    irrelevant and its share goes to the other phases. (If a caller ever ran steps with that
    0.0, `epsilon_of` would charge inf and a finite-budget ledger would refuse: fail-safe.)

    ``target_epsilon = math.inf`` returns zeros (the non-private baseline).

    Raises:
        ValueError: bad input, a reserved history that already spends the whole target, a
            running phase with share 0, or a share too small to reach with any noise.
        RuntimeError: the final check failed (would exceed the target); never silently returned.
    """
    delta = _check_delta(delta)
    if not _is_real(target_epsilon) or math.isnan(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0 (or math.inf), got {target_epsilon!r}.")
    plan = _check_phases(phases)
    weights = _check_shares(shares, len(plan))
    reserved_h = validate_history(reserved)
    target = float(target_epsilon)
    if math.isinf(target):
        return [0.0] * len(plan)

    spent = epsilon_of(reserved_h, delta)
    if spent > target:
        raise ValueError(
            f"the reserved history already spends epsilon {spent:.4g} > target {target:.4g} "
            f"(delta {delta:g}): nothing is left to train with; raise the budget or plan no steps."
        )
    active = [i for i, (_, steps) in enumerate(plan) if steps > 0]
    if not active:
        return [0.0] * len(plan)
    if spent >= target:
        raise ValueError(
            f"the reserved history spends the whole target epsilon {target:.4g}; no budget left "
            "for the planned steps."
        )
    left = target - spent
    base: dict[int, float] = {}
    for i in active:
        if weights[i] == 0.0:
            raise ValueError(
                f"phase #{i} plans {plan[i][1]} steps but has share 0; give it a positive share "
                "or plan 0 steps for it."
            )
        q, steps = plan[i]
        phase_eps = weights[i] * left
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            try:
                base[i] = float(
                    get_noise_multiplier(
                        target_epsilon=phase_eps, target_delta=delta, sample_rate=q, steps=steps
                    )
                )
            except ValueError as err:
                raise ValueError(
                    f"phase #{i} (sample_rate {q:g}, {steps} steps) cannot be held to epsilon "
                    f"{phase_eps:.4g} (share {weights[i]:g} of {left:.4g}) at delta {delta:g}: "
                    f"{err} Raise its share, or for a tiny one-off release pick its sigma "
                    "directly and pass it in `reserved`."
                ) from err

    def eps_at(f: float) -> float:
        planned = [(f * base[i], plan[i][0], plan[i][1]) for i in active]
        return epsilon_of(reserved_h + planned, delta)

    hi = 1.0
    eps_hi = eps_at(hi)
    while eps_hi > target:
        hi *= 2.0
        if hi > _MAX_FACTOR:
            raise ValueError("no noise level fits the plan into the target epsilon.")
        eps_hi = eps_at(hi)
    lo = hi / 2.0
    eps_lo = eps_at(lo)
    while eps_lo <= target:  # terminates: f -> 0 means sigma -> 0, i.e. epsilon -> inf
        hi, eps_hi = lo, eps_lo
        lo = lo / 2.0
        eps_lo = eps_at(lo)
    # Invariant: eps_at(hi) <= target < eps_at(lo).
    for _ in range(_MAX_BISECTIONS):
        if eps_hi >= target * (1.0 - _CALIBRATION_RTOL) or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        eps_mid = eps_at(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    final = eps_at(hi)
    if not final <= target:
        raise RuntimeError(
            f"calibrated noise would spend epsilon {final!r} > target {target!r}; refusing. "
            "This is a bug in fedldm's calibration: please report it with the plan."
        )
    sigmas = [0.0] * len(plan)
    for i in active:
        sigmas[i] = hi * base[i]
    return sigmas


def secure_standard_normal(n: int, generator: torch.Generator) -> np.ndarray:
    """``n`` N(0, 1) draws (float64) as Opacus' secure mode makes them: the sum of four normals,
    halved, which defeats the floating-point attacks on naive Gaussian sampling (Holohan et al.
    2021). ``generator`` must come from the site's privacy source (ldm_core.dp_random)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator from the site's PrivacyRng")
    draws = torch.randn((4, n), generator=generator, dtype=torch.float64)
    return (draws.sum(dim=0) / 2.0).numpy()


def gaussian_mechanism_entry(noise_multiplier: float) -> tuple[float, float, int]:
    """Ledger entry for one release by `dp_sum_and_count`: ``(noise_multiplier, 1.0, 1)``.

    Why that RDP entry is exactly the Gaussian mechanism: with ``sample_rate == 1.0`` Opacus'
    ``_compute_rdp`` skips subsampling amplification and returns ``alpha / (2 * sigma**2)``,
    which is the exact Renyi-DP curve of the Gaussian mechanism that adds N(0, (sigma*S)^2) noise
    to a query of L2 sensitivity S (Mironov 2017, Prop. 7); ``steps == 1`` is one release.
    `dp_sum_and_count` adds std ``noise_multiplier * S`` with ``S = clip * sqrt(2)``, the
    add/remove sensitivity of its ``[clipped row, clip]`` vector, so the ratio is
    ``noise_multiplier`` and this entry is exact (not a bound we hope holds).
    """
    return validate_entry((noise_multiplier, 1.0, 1), where="gaussian mechanism")


def dp_sum_and_count(
    per_sample: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Release ``(sum of clipped rows, count)`` under the Gaussian mechanism.

    Used e.g. for the mean latent second moment (the latent scale factor): each row is clipped to
    L2 norm <= ``clip``; each sample contributes the vector ``[clipped_row, clip]`` whose norm is
    <= ``clip * sqrt(2)``, so adding or removing one record moves the summed vector by at most
    that much. The sum and the count are released jointly with one draw of N(0, (noise_multiplier
    * clip * sqrt(2))^2) noise per coordinate, which costs exactly one
    ``gaussian_mechanism_entry(noise_multiplier)`` in the ledger (charge it BEFORE calling this).

    Returns the noisy sum ``[D]`` (dtype of ``per_sample``) and the noisy count (a float, which
    can be non-integer or even <= 0 for tiny sites: the caller must guard its division).
    Computed in float64 so that clipping is not undone by rounding.
    """
    if not isinstance(per_sample, torch.Tensor) or per_sample.ndim != 2:
        raise ValueError(
            "per_sample must be a 2-D tensor [N, D] (one row per record); flatten each record's "
            f"statistic first. Got {getattr(per_sample, 'shape', type(per_sample))}."
        )
    if not torch.is_floating_point(per_sample):
        raise ValueError(f"per_sample must be floating point, got {per_sample.dtype}.")
    if not _is_real(clip) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}.")
    sigma = noise_multiplier
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}.")
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be a torch.Generator (randomness is passed in explicitly)."
        )
    x = per_sample.detach().to(torch.float64)
    # A record whose statistic is not finite contributes a zero row (and still counts): the
    # release must neither fail nor change shape because of one record, or an error reply
    # would tell a model-crafting coordinator, without noise, something about that record.
    x = torch.where(torch.isfinite(x).all(dim=1, keepdim=True), x, torch.zeros_like(x))
    n, d = x.shape
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    factors = (float(clip) / (norms + 1e-12)).clamp(max=1.0)
    clipped_sum = (x * factors).sum(dim=0)
    total = torch.cat([clipped_sum, clipped_sum.new_tensor([n * float(clip)])])
    std = float(noise_multiplier) * float(clip) * math.sqrt(2.0)
    # Drawn as every other Gaussian release is (the sum of four normals, halved): plain randn
    # output is open to the floating-point attacks on naive Gaussian sampling.
    noise = torch.from_numpy(secure_standard_normal(d + 1, generator))
    noisy = total + std * noise.to(total.device)
    return noisy[:d].to(per_sample.dtype), float(noisy[d].item() / float(clip))


def pooled_scale_factor(stats: Sequence[tuple[float, float]], *, clip: float
                        ) -> tuple[float, str | None]:
    """Pool the sites' noisy (sum, count) into the latent scale factor 1 / sqrt(E[z^2]).

    Post-processing of DP releases, so any rule is free in privacy. The noisy mean is clamped to
    [1e-2, clip] (per-patient values were clipped to `clip`); when noise swamps the sums (a
    non-positive pooled count or sum: tiny sites), the public default 1.0 is used and a note says
    so, instead of failing a run whose training is otherwise fine.
    """
    total = sum(s for s, _ in stats)
    count = sum(c for _, c in stats)
    if count <= 0 or total <= 0:
        return 1.0, ("the DP latent statistics were swamped by noise (pooled sum "
                     f"{total:.3g}, count {count:.3g}); used the default scale factor 1.0")
    mean = min(max(total / count, 1e-2), clip)
    return 1.0 / math.sqrt(mean), clamp_note(total / count, clip)


def clamp_note(raw_mean: float, clip: float) -> str | None:
    """Why a released mean E[z^2] that lands at its clamp deserves a warning: the scale factor
    is then set by the clamp, not measured (latents off scale by as much as the clamp allows,
    which the denoiser cannot undo).
    The usual cause is small sites with a generous clip: the noise grows with the clip, the sum
    only with the patients. The rarer one, at the top: latents whose per-patient E[z^2] really
    is at the clip, which the clip then caps."""
    if 1e-2 < raw_mean < clip:
        return None
    return (f"the DP latent second moment landed at its clamp (noisy mean {raw_mean:.3g}, "
            f"allowed [0.01, {clip:g}]), so the scale factor "
            f"{1.0 / math.sqrt(min(max(raw_mean, 1e-2), clip)):.3g} is set by the clamp, not "
            "measured, and the denoiser may train on mis-scaled latents; usually the release "
            "noise outweighed small sites' sums: lower privacy.scale_clip toward the latents' "
            "per-patient E[z^2] (~1-2 for the shipped priors) or pool more patients; if the "
            "autoencoder's latents really are that large, raise it")
