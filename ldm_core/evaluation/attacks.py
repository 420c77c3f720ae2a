"""Empirical privacy audits at a site: exact attack statistics and their one DP release.

What runs where. Each site scores its own records with the shipped attacks
(:mod:`ldm_core.evaluation.scores`; lower score = more member-like) and a near-copy test against
samples the site generated itself from the final model. The site keeps the exact results (ROC
curves, closest pairs) in a local diagnostics file; the coordinator receives only the fixed
vector :data:`AUDIT_RELEASE_KEYS`, released once through the Gaussian mechanism and charged to
the site's ledger (``client.audit.site_audit``).

Why no histograms, pooled curves or distances leave the site any more: they are functions of
private records with no bounded sensitivity, so no noise could make them DP; and quantised
histograms pooled across sites put every threshold on a bin edge, which made TPR at 1 % FPR zero
by construction. The low-FPR statistic is instead a count at a threshold ``tau_a`` that does not
depend on private data at all: the 1 % quantile of attack ``a``'s scores on the site's own
generated samples (a function of the public model and fresh randomness only).

Attack results are lower bounds on leakage: a weak result says these attacks failed, not that no
attack can succeed. The DP epsilon is the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_curve

from ldm_core.privacy import secure_standard_normal

__all__ = [
    "ATTACKS",
    "AUDIT_NOISED_KEYS",
    "AUDIT_PUBLIC_KEYS",
    "AUDIT_RELEASE_KEYS",
    "NEAR_COPY_RATIO",
    "THRESHOLD_QUANTILE",
    "audit_counts",
    "audit_estimates",
    "audit_sensitivity",
    "auc_count",
    "dp_audit_release",
    "exact_roc",
    "near_copy_test",
    "sample_threshold",
]

# The shipped attacks, in release order (scores: ldm_core.evaluation.scores).
ATTACKS: tuple[str, ...] = ("denoiser", "autoencoder")
# Quantile of an attack's scores on the site's generated samples used as its threshold: a
# non-member-like population of the model's own making, so the FPR on real non-members is near 1%
# when the model generalises (the released FPR says how near).
THRESHOLD_QUANTILE = 0.01
# A record is a near-copy when its nearest generated sample is 3x closer than the second nearest
# (the "ratio test" of memorisation studies, applied per record so its sensitivity is bounded).
NEAR_COPY_RATIO = 1.0 / 3.0

# The noised coordinates, in order. Each is a count divided by the public m = audit_records.
AUDIT_NOISED_KEYS: tuple[str, ...] = (
    *(f"{a}.{stat}" for a in ATTACKS for stat in ("auc", "tpr", "fpr")),
    "near_copy_fraction",
    "near_copy_fraction_holdout",
    "members_fraction",
    "nonmembers_fraction",
)
# Public values added to the release (no private input): m, the noise std, the ledger epsilon.
AUDIT_PUBLIC_KEYS: tuple[str, ...] = ("records", "noise_std", "epsilon")
AUDIT_RELEASE_KEYS: tuple[str, ...] = AUDIT_NOISED_KEYS + AUDIT_PUBLIC_KEYS


def _as_scores(x: Sequence[float] | np.ndarray | torch.Tensor, name: str,
               *, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the per-record score computation")
    return arr


# -------------------------------------------------------------------------- exact, site-local
def exact_roc(member_scores: Sequence[float] | np.ndarray,
              nonmember_scores: Sequence[float] | np.ndarray) -> dict[str, object]:
    """Exact threshold-attack ROC (lower score = member): every distinct score is a threshold.

    For the site's own diagnostics only (it is a function of every private score). Returns
    ``auc`` (ties count one half), ``tpr_at_1pct_fpr`` and ``tpr_at_0_1pct_fpr`` (best TPR among
    operating points with FPR <= the target; no interpolation, so never optimistic),
    ``advantage`` (max TPR - FPR), the full ``fpr``/``tpr`` curve and the two set sizes. With
    ``n`` non-members the smallest non-zero FPR is ``1/n``; at a target below that the value is
    the TPR at FPR = 0.
    """
    members = _as_scores(member_scores, "member_scores")
    nonmembers = _as_scores(nonmember_scores, "nonmember_scores")
    y = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    fpr, tpr, _ = roc_curve(y, -np.r_[members, nonmembers], drop_intermediate=False)

    def tpr_at(target: float) -> float:
        ok = fpr <= target + 1e-12
        return float(tpr[ok].max()) if ok.any() else 0.0

    return {
        "auc": auc_count(members, nonmembers) / (members.size * nonmembers.size),
        "tpr_at_1pct_fpr": tpr_at(0.01),
        "tpr_at_0_1pct_fpr": tpr_at(0.001),
        "advantage": float(np.max(tpr - fpr)),
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "n_members": int(members.size),
        "n_nonmembers": int(nonmembers.size),
    }


def auc_count(member_scores: Sequence[float] | np.ndarray,
              nonmember_scores: Sequence[float] | np.ndarray) -> float:
    """Mann-Whitney count: pairs (member, non-member) with the member scoring lower, ties 1/2.

    Each member contributes at most ``len(nonmember_scores)`` and each non-member at most
    ``len(member_scores)``: the basis of the release's sensitivity bound.
    """
    members = _as_scores(member_scores, "member_scores", allow_empty=True)
    nonmembers = np.sort(_as_scores(nonmember_scores, "nonmember_scores", allow_empty=True))
    above = nonmembers.size - np.searchsorted(nonmembers, members, side="right")
    ties = np.searchsorted(nonmembers, members, side="right") - np.searchsorted(
        nonmembers, members, side="left")
    return float(above.sum() + 0.5 * ties.sum())


def sample_threshold(sample_scores: Sequence[float] | np.ndarray,
                     quantile: float = THRESHOLD_QUANTILE) -> float:
    """``tau``: the ``quantile`` of an attack's scores on the site's generated samples.

    Data-independent by construction (the samples come from the public model and fresh
    randomness), so using it costs no privacy and cannot be tuned on the private records.
    """
    scores = _as_scores(sample_scores, "sample_scores")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(scores, quantile))


def near_copy_test(record_feats: np.ndarray, sample_feats: np.ndarray, *,
                   ratio: float = NEAR_COPY_RATIO, chunk: int = 1024
                   ) -> dict[str, np.ndarray]:
    """Per record: is its nearest generated sample ``ratio`` times closer than the second?

    A per-record 0/1 value that depends only on that record and the generated samples, so adding
    or removing a record changes only its own flag. Returns ``flags`` (bool [N]), ``nearest``
    (index of the nearest sample), ``d1`` and ``d2`` (nearest and second-nearest distances).
    Known blind spot: a record the model reproduces *several* times has two near-identical
    neighbours (d1/d2 ~ 1) and is not flagged; the loss attacks cover that case.
    """
    rec = np.asarray(record_feats, dtype=np.float64)
    smp = np.asarray(sample_feats, dtype=np.float64)
    if smp.ndim != 2 or smp.shape[0] < 2:
        raise ValueError(f"need >= 2 generated samples as an [N, D] array, got {smp.shape}")
    if rec.ndim != 2 or rec.shape[1] != smp.shape[1]:
        raise ValueError(f"record features {rec.shape} and sample features {smp.shape} must be "
                         "[N, D] arrays from the same extractor")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    n = rec.shape[0]
    d1, d2, idx = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        d = cdist(rec[start:start + chunk], smp)
        two = np.argpartition(d, 1, axis=1)[:, :2]
        pair = np.take_along_axis(d, two, axis=1)
        order = np.argsort(pair, axis=1)
        sl = slice(start, start + chunk)
        idx[sl] = np.take_along_axis(two, order, axis=1)[:, 0]
        pair = np.take_along_axis(pair, order, axis=1)
        d1[sl], d2[sl] = pair[:, 0], pair[:, 1]
    flags = d1 < ratio * d2  # d2 == 0 (duplicate samples) never flags
    return {"flags": flags, "nearest": idx, "d1": d1, "d2": d2}


# ------------------------------------------------------------------------------ the DP release
def audit_sensitivity(n_attacks: int = len(ATTACKS)) -> float:
    """L2 sensitivity ``Delta`` of the count vector of :func:`audit_counts` (count units).

    Derivation (``A = n_attacks``; ``M``/``H`` the member/non-member records scored, each at most
    the public ``m``; every coordinate is a count, the AUC one is ``U_a / m`` with ``U_a`` the
    Mann-Whitney count of attack ``a``). Neighbouring datasets differ by one record, which is
    either a member or a non-member:

    * one member added or removed: ``U_a`` changes by at most ``|H| <= m`` per attack, so
      ``U_a / m`` by at most 1 (A coordinates); its own ``score <= tau_a`` flag changes the TPR
      count by at most 1 (A coordinates; ``tau_a`` does not depend on the data); its own
      near-copy flag by at most 1; ``|M|`` by 1. That is ``2A + 2`` coordinates moving by <= 1.
      The FPR counts, the holdout near-copy count and ``|H|`` do not move;
    * one non-member added or removed: symmetric, ``U_a / m`` (A), the FPR counts (A), its
      holdout near-copy flag and ``|H|``: again ``2A + 2`` coordinates;
    * subsampling (a split with more than ``m`` records is subsampled to ``m`` with fresh secret
      randomness): couple the draw on the larger dataset with the draw on the smaller one so the
      two subsets are equal or differ by replacing one record with another of the same split.
      A replacement moves ``U_a / m`` by at most ``|H| / m <= 1`` (both records' contributions lie
      in ``[0, |H|]``), each flag count by at most 1, and the set size not at all: ``2A + 1``
      coordinates. The output distribution is a mixture over such coupled pairs, and Renyi
      divergence is jointly quasi-convex, so the mixture is no worse than its worst pair.

    Hence ``Delta = sqrt(2A + 2)`` (``sqrt(6)`` for the two shipped attacks). Adding
    ``N(0, (sigma * Delta)^2)`` per coordinate is then exactly the Gaussian mechanism with noise
    multiplier ``sigma``, i.e. one ``gaussian_mechanism_entry(sigma)`` in the ledger. Assumed, as
    for DP-SGD on the train split: adding a record does not move other records between splits.
    """
    if n_attacks < 1:
        raise ValueError(f"n_attacks must be >= 1, got {n_attacks}")
    return math.sqrt(2 * n_attacks + 2)


def audit_counts(
    *,
    records: int,
    member_scores: Mapping[str, np.ndarray],
    nonmember_scores: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float],
    member_near_copy: np.ndarray,
    nonmember_near_copy: np.ndarray,
) -> np.ndarray:
    """The un-noised vector (count units, order of :data:`AUDIT_NOISED_KEYS`) before noise.

    ``records`` is the public ``m``; at most ``m`` members and ``m`` non-members may be passed
    (the caller subsamples), otherwise the sensitivity bound of :func:`audit_sensitivity` fails.
    """
    if records < 1:
        raise ValueError(f"records (the public m) must be >= 1, got {records}")
    if set(member_scores) != set(ATTACKS) or set(nonmember_scores) != set(ATTACKS) \
            or set(thresholds) != set(ATTACKS):
        raise ValueError(f"need scores and thresholds for exactly the attacks {ATTACKS}")
    mem_nc = np.asarray(member_near_copy, dtype=bool).reshape(-1)
    non_nc = np.asarray(nonmember_near_copy, dtype=bool).reshape(-1)
    n_mem, n_non = mem_nc.size, non_nc.size
    if n_mem > records or n_non > records:
        raise ValueError(f"{n_mem} members / {n_non} non-members exceed m={records}: subsample "
                         "each split to at most m records before counting")
    out: list[float] = []
    for a in ATTACKS:
        mem = _as_scores(member_scores[a], f"member_scores[{a}]", allow_empty=True)
        non = _as_scores(nonmember_scores[a], f"nonmember_scores[{a}]", allow_empty=True)
        if mem.size != n_mem or non.size != n_non:
            raise ValueError(f"attack {a}: {mem.size}/{non.size} scores for {n_mem} members and "
                             f"{n_non} non-members")
        tau = float(thresholds[a])
        out += [auc_count(mem, non) / records, float((mem <= tau).sum()),
                float((non <= tau).sum())]
    out += [float(mem_nc.sum()), float(non_nc.sum()), float(n_mem), float(n_non)]
    return np.asarray(out, dtype=np.float64)


def dp_audit_release(counts: np.ndarray, *, records: int, noise_multiplier: float,
                     generator: torch.Generator, epsilon: float) -> dict[str, float]:
    """Gaussian mechanism on the count vector; returns the flat release (fractions of ``m``).

    Adds ``N(0, (noise_multiplier * Delta)^2)`` to every count (``Delta`` from
    :func:`audit_sensitivity`), then divides by ``m``; charge
    ``gaussian_mechanism_entry(noise_multiplier)`` BEFORE calling. ``epsilon`` is the ledger's
    value after that charge, passed through as a public value. Noisy values are not clipped
    (clipping is post-processing the reader may do; unclipped values stay unbiased).
    """
    vec = np.asarray(counts, dtype=np.float64).reshape(-1)
    if vec.size != len(AUDIT_NOISED_KEYS):
        raise ValueError(f"counts has {vec.size} values, expected {len(AUDIT_NOISED_KEYS)}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
            and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}"
                         " (privacy.audit_noise_multiplier)")
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator from the site's PrivacyRng")
    std = float(noise_multiplier) * audit_sensitivity()
    noisy = (vec + std * secure_standard_normal(vec.size, generator)) / records
    out = {k: float(v) for k, v in zip(AUDIT_NOISED_KEYS, noisy, strict=True)}
    out.update({"records": float(records), "noise_std": std / records, "epsilon": float(epsilon)})
    return out


# ------------------------------------------------------------------------ coordinator's reading
def audit_estimates(release: Mapping[str, float]) -> dict[str, object]:
    """Turn one site's release into rates (post-processing: free in privacy).

    The AUC statistic is ``U / m^2`` and the TPR/FPR/near-copy values are counts over ``m``; if a
    split had fewer than ``m`` records they are renormalised by the noisy ``|M|/m`` and ``|H|/m``
    (clipped to ``[1/m, 1]``, since the true values lie there). Rates are clipped to ``[0, 1]``.
    Returns ``{attack: {auc, tpr, fpr}}`` under ``attacks``, ``best_attack`` (highest AUC: taking
    the max of noisy values errs towards reporting more leakage), ``near_copy_fraction``,
    ``near_copy_fraction_holdout``, ``noise_std``, ``records`` and ``epsilon``.
    """
    missing = [k for k in AUDIT_RELEASE_KEYS if k not in release]
    if missing:
        raise ValueError(f"audit release lacks {missing}; the site runs an older fedldm")
    m = float(release["records"])
    floor = 1.0 / m if m > 0 else 1.0
    mf = min(1.0, max(floor, float(release["members_fraction"])))
    nf = min(1.0, max(floor, float(release["nonmembers_fraction"])))

    def rate(x: float, denom: float) -> float:
        return float(min(1.0, max(0.0, x / denom)))

    attacks = {a: {"auc": rate(float(release[f"{a}.auc"]), mf * nf),
                   "tpr": rate(float(release[f"{a}.tpr"]), mf),
                   "fpr": rate(float(release[f"{a}.fpr"]), nf)} for a in ATTACKS}
    best = max(ATTACKS, key=lambda a: attacks[a]["auc"])
    return {
        "attacks": attacks,
        "best_attack": best,
        "near_copy_fraction": rate(float(release["near_copy_fraction"]), mf),
        "near_copy_fraction_holdout": rate(float(release["near_copy_fraction_holdout"]), nf),
        "noise_std": float(release["noise_std"]),
        "records": int(round(m)),
        "epsilon": float(release["epsilon"]),
    }
