"""Empirical privacy audits: membership inference and nearest-neighbour memorisation.

Both run at the site, on the site's own train (members) and holdout (non-members) splits, and
return only aggregates: curves, histograms and a few indices into the *synthetic* set (which is
released anyway). No image or per-patient value of the private data leaves the site, except
``closest_pairs`` train indices, which the site may choose to resolve to images or not.

Membership inference (loss attack, Yeom et al. 2018; low-FPR reporting after Carlini et al. 2022):
the score is each sample's denoising loss; members tend to have lower loss. We report AUC (0.5 =
chance) and, more tellingly, the TPR at 1 % and 0.1 % FPR (chance = the FPR itself).

Pooling across sites. AUC is not additive, so averaging site AUCs does not give the AUC of the
pooled attack. What is additive: histogram counts of member and non-member scores on bin edges that
all sites share. Summing them gives the pooled score distributions, from which the pooled ROC and
AUC follow exactly up to the bin resolution (scores sharing a bin count as ties, i.e. one half):
``AUC = sum_b m_b (n_beyond(b) + n_b / 2) / (M N)``. With the 512 log-spaced bins of
:func:`loss_bin_edges` (3 % relative width) the error is far below the sampling noise. Sites
therefore run :func:`membership_inference` with the coordinator's ``bin_edges``, and the
coordinator calls :func:`merge_mia`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "loss_bin_edges",
    "membership_inference",
    "merge_mia",
    "merge_nn_audits",
    "mia_from_histograms",
    "nearest_neighbour_audit",
]

MAX_ROC_POINTS = 200


def loss_bin_edges(low: float = 1e-5, high: float = 1e2, n_bins: int = 512) -> np.ndarray:
    """Log-spaced shared bin edges for per-sample losses; scores outside go to the end bins."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    return np.geomspace(low, high, n_bins + 1)


def _as_scores(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the per-sample loss computation")
    return arr


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Best TPR among operating points with FPR <= target (no interpolation: conservative)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray) -> tuple[list[float], list[float]]:
    """At most ``MAX_ROC_POINTS`` points, dense at low FPR (log grid) and across [0,1] (linear)."""
    if fpr.size <= MAX_ROC_POINTS:
        return fpr.tolist(), tpr.tolist()
    half = (MAX_ROC_POINTS - 2) // 2
    grid = np.r_[np.geomspace(1e-4, 1.0, half), np.linspace(0.0, 1.0, half)]
    idx = np.searchsorted(fpr, grid, side="right") - 1  # last point with fpr <= grid value
    idx = np.unique(np.r_[0, np.clip(idx, 0, fpr.size - 1), fpr.size - 1])
    return fpr[idx].tolist(), tpr[idx].tolist()


def _summary(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> dict:
    fpr_ds, tpr_ds = _downsample_roc(fpr, tpr)
    return {
        "auc": float(auc),
        "tpr_at_1pct_fpr": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_0_1pct_fpr": _tpr_at(fpr, tpr, 0.001),
        "advantage": float(np.max(tpr - fpr)),
        "fpr": fpr_ds,
        "tpr": tpr_ds,
    }


def _check_edges(bin_edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
    if edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError("bin_edges must be a strictly increasing array of at least 2 values")
    return edges


def _histogram(scores: np.ndarray, edges: np.ndarray) -> list[int]:
    clipped = np.clip(scores, edges[0], edges[-1])  # out-of-range scores land in the end bins
    return np.histogram(clipped, bins=edges)[0].astype(int).tolist()


def membership_inference(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    *,
    higher_is_member: bool = False,
    bin_edges: np.ndarray | None = None,
) -> dict:
    """Threshold attack on per-sample scores (default: denoising loss, lower = member).

    Returns ``auc``, ``tpr_at_1pct_fpr``, ``tpr_at_0_1pct_fpr``, ``advantage`` (max TPR - FPR),
    ``fpr``/``tpr`` (ROC, <= 200 points, for plotting), ``n_members``, ``n_nonmembers``,
    ``higher_is_member`` and, when ``bin_edges`` is given, ``bin_edges``, ``member_hist`` and
    ``nonmember_hist`` (counts on those edges) so that :func:`merge_mia` can pool sites.
    """
    members = _as_scores(member_scores, "member_scores")
    nonmembers = _as_scores(nonmember_scores, "nonmember_scores")
    y = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    s = np.r_[members, nonmembers]
    s = s if higher_is_member else -s
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out = _summary(fpr, tpr, roc_auc_score(y, s))
    out.update(
        {
            "n_members": int(members.size),
            "n_nonmembers": int(nonmembers.size),
            "higher_is_member": bool(higher_is_member),
        }
    )
    if bin_edges is not None:
        edges = _check_edges(bin_edges)
        out["bin_edges"] = edges.tolist()
        out["member_hist"] = _histogram(members, edges)
        out["nonmember_hist"] = _histogram(nonmembers, edges)
    return out


def mia_from_histograms(
    member_hist: Sequence[int] | np.ndarray,
    nonmember_hist: Sequence[int] | np.ndarray,
    *,
    higher_is_member: bool = False,
) -> dict:
    """Attack metrics from score histograms on shared bins (ties within a bin count one half).

    Thresholds sit on bin edges, so the ROC is exact at those points and AUC is exact up to
    within-bin ties. Returns the same metric keys as :func:`membership_inference`.
    """
    m = np.asarray(member_hist, dtype=np.float64)
    n = np.asarray(nonmember_hist, dtype=np.float64)
    if m.shape != n.shape or m.ndim != 1:
        raise ValueError(f"histograms must be 1-D and equal length, got {m.shape} and {n.shape}")
    if m.sum() <= 0 or n.sum() <= 0:
        raise ValueError("need at least one member and one non-member count to pool")
    if higher_is_member:  # order bins most member-like first (low loss by default)
        m, n = m[::-1], n[::-1]
    total_m, total_n = m.sum(), n.sum()
    n_after = total_n - np.cumsum(n)  # non-members in strictly less member-like bins
    auc = float((m * (n_after + 0.5 * n)).sum() / (total_m * total_n))
    tpr = np.r_[0.0, np.cumsum(m) / total_m]
    fpr = np.r_[0.0, np.cumsum(n) / total_n]
    out = _summary(fpr, tpr, auc)
    out.update({"n_members": int(total_m), "n_nonmembers": int(total_n)})
    return out


def merge_mia(site_results: Sequence[dict]) -> dict:
    """Pool per-site :func:`membership_inference` results into one attack summary.

    If every site returned histograms on identical ``bin_edges``, the pooled metrics come from the
    summed histograms (``method: "pooled_histograms"``; an attacker using one global threshold).
    Otherwise ``auc`` and the TPRs are count-weighted means of the site values and the ROC is the
    count-weighted mean TPR on a common FPR grid (``method: "weighted_mean"``, an approximation).
    Always adds ``site_auc_weighted_mean``, ``sites`` ([{auc, tpr_at_1pct_fpr, n_members,
    n_nonmembers}]), ``n_members``, ``n_nonmembers``, ``n_sites``.
    """
    if not site_results:
        raise ValueError("site_results is empty: need at least one site's MIA result")
    directions = {bool(r.get("higher_is_member", False)) for r in site_results}
    if len(directions) != 1:
        raise ValueError("sites disagree on higher_is_member; use the same score everywhere")
    higher = directions.pop()
    counts = np.array([r["n_members"] + r["n_nonmembers"] for r in site_results], np.float64)
    w = counts / counts.sum()
    site_auc_mean = float(np.dot(w, [r["auc"] for r in site_results]))
    have_hist = all("member_hist" in r and "bin_edges" in r for r in site_results)
    if have_hist:
        edges0 = np.asarray(site_results[0]["bin_edges"])
        if any(
            len(r["bin_edges"]) != edges0.size or not np.allclose(r["bin_edges"], edges0)
            for r in site_results
        ):
            raise ValueError("sites used different bin_edges; send every site the same edges")
        member = np.sum([r["member_hist"] for r in site_results], axis=0)
        nonmember = np.sum([r["nonmember_hist"] for r in site_results], axis=0)
        out = mia_from_histograms(member, nonmember, higher_is_member=higher)
        out["method"] = "pooled_histograms"
    else:
        grid = np.linspace(0.0, 1.0, MAX_ROC_POINTS)
        tpr_grid = sum(
            wi * np.interp(grid, r["fpr"], r["tpr"]) for wi, r in zip(w, site_results, strict=True)
        )
        out = {
            "auc": site_auc_mean,
            "tpr_at_1pct_fpr": float(np.dot(w, [r["tpr_at_1pct_fpr"] for r in site_results])),
            "tpr_at_0_1pct_fpr": float(np.dot(w, [r["tpr_at_0_1pct_fpr"] for r in site_results])),
            "advantage": float(np.dot(w, [r.get("advantage", 0.0) for r in site_results])),
            "fpr": grid.tolist(),
            "tpr": np.asarray(tpr_grid).tolist(),
            "n_members": int(sum(r["n_members"] for r in site_results)),
            "n_nonmembers": int(sum(r["n_nonmembers"] for r in site_results)),
            "method": "weighted_mean",
        }
    out.update(
        {
            "higher_is_member": higher,
            "site_auc_weighted_mean": site_auc_mean,
            "n_sites": len(site_results),
            "sites": [
                {
                    "auc": float(r["auc"]),
                    "tpr_at_1pct_fpr": float(r["tpr_at_1pct_fpr"]),
                    "n_members": int(r["n_members"]),
                    "n_nonmembers": int(r["n_nonmembers"]),
                }
                for r in site_results
            ],
        }
    )
    return out


def _check_feats(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] feature array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _nearest(
    query: np.ndarray, ref: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance to, and index of, each query row's nearest ``ref`` row (chunked)."""
    dist = np.empty(query.shape[0])
    idx = np.empty(query.shape[0], dtype=np.int64)
    for start in range(0, query.shape[0], chunk):
        d = cdist(query[start : start + chunk], ref)
        idx[start : start + chunk] = d.argmin(axis=1)
        dist[start : start + chunk] = d.min(axis=1)
    return dist, idx


def nearest_neighbour_audit(
    synth_feats: np.ndarray,
    train_feats: np.ndarray,
    holdout_feats: np.ndarray,
    *,
    quantile: float = 0.05,
    bins: int = 30,
    n_pairs: int = 8,
) -> dict:
    """Are synthetic samples closer to the training images than fresh real images are?

    ``threshold`` is the ``quantile`` of holdout->nearest-train distances: a real image the model
    never saw is that close to some train image only ``quantile`` of the time. A synthetic sample
    closer than that counts as memorised, so a generator that samples the distribution without
    copying yields ``memorized_fraction`` ~ ``quantile`` (returned as ``expected_fraction``) and
    one that copies yields ~1. With few holdout images the threshold is noisy (use >= 100).

    Returns ``memorized_fraction``, ``expected_fraction``, ``threshold``, ``memorized_indices``
    (synthetic indices), ``closer_to_train_fraction`` (synthetic nearer to train than to holdout;
    its chance level depends on the two split sizes), median distances, histogram counts on shared
    ``bin_edges`` (``hist_synth_train``, ``hist_synth_holdout``, ``hist_holdout_train``),
    ``closest_pairs`` ([{synthetic, train, distance}], closest first) and the three set sizes.
    """
    synth = _check_feats(synth_feats, "synth_feats")
    train = _check_feats(train_feats, "train_feats")
    holdout = _check_feats(holdout_feats, "holdout_feats")
    if not synth.shape[1] == train.shape[1] == holdout.shape[1]:
        raise ValueError(
            "feature widths differ (synthetic, train, holdout = "
            f"{synth.shape[1]}, {train.shape[1]}, {holdout.shape[1]}): use one extractor"
        )
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if bins < 1 or n_pairs < 0:
        raise ValueError(f"bins must be >= 1 and n_pairs >= 0, got {bins}, {n_pairs}")
    d_st, i_st = _nearest(synth, train)
    d_sh, _ = _nearest(synth, holdout)
    d_ht, _ = _nearest(holdout, train)
    threshold = float(np.quantile(d_ht, quantile))
    memorized = d_st < threshold
    edges = np.histogram_bin_edges(np.r_[d_st, d_sh, d_ht], bins=bins)
    order = np.argsort(d_st, kind="stable")[:n_pairs]
    return {
        "memorized_fraction": float(memorized.mean()),
        "expected_fraction": float(quantile),
        "threshold": threshold,
        "memorized_indices": np.flatnonzero(memorized).tolist(),
        "closer_to_train_fraction": float((d_st < d_sh).mean()),
        "median_synth_train": float(np.median(d_st)),
        "median_synth_holdout": float(np.median(d_sh)),
        "median_holdout_train": float(np.median(d_ht)),
        "bin_edges": edges.tolist(),
        "hist_synth_train": np.histogram(d_st, bins=edges)[0].astype(int).tolist(),
        "hist_synth_holdout": np.histogram(d_sh, bins=edges)[0].astype(int).tolist(),
        "hist_holdout_train": np.histogram(d_ht, bins=edges)[0].astype(int).tolist(),
        "closest_pairs": [
            {"synthetic": int(i), "train": int(i_st[i]), "distance": float(d_st[i])} for i in order
        ],
        "n_synthetic": int(synth.shape[0]),
        "n_train": int(train.shape[0]),
        "n_holdout": int(holdout.shape[0]),
    }


def merge_nn_audits(site_audits: Sequence[dict]) -> dict:
    """Combine per-site audits of the same synthetic set.

    A synthetic sample is memorised overall if it is memorised at any site, so the overall
    fraction is the size of the union of ``memorized_indices``; its chance level is at most
    ``1 - prod(1 - expected_fraction)`` over sites. Returns ``memorized_fraction``,
    ``expected_fraction``, ``max_site_fraction``, ``sites`` ([{memorized_fraction, threshold,
    n_train, n_holdout}]) and ``n_synthetic``.
    """
    if not site_audits:
        raise ValueError("site_audits is empty: need at least one site's audit")
    n_synth = {int(a["n_synthetic"]) for a in site_audits}
    if len(n_synth) != 1:
        raise ValueError(f"sites audited synthetic sets of different sizes {sorted(n_synth)}")
    n = n_synth.pop()
    union: set[int] = set()
    for audit in site_audits:
        union.update(int(i) for i in audit["memorized_indices"])
    expected = 1.0 - float(np.prod([1.0 - a["expected_fraction"] for a in site_audits]))
    return {
        "memorized_fraction": len(union) / n,
        "expected_fraction": expected,
        "max_site_fraction": float(max(a["memorized_fraction"] for a in site_audits)),
        "n_synthetic": n,
        "sites": [
            {
                "memorized_fraction": float(a["memorized_fraction"]),
                "threshold": float(a["threshold"]),
                "n_train": int(a["n_train"]),
                "n_holdout": int(a["n_holdout"]),
            }
            for a in site_audits
        ],
    }
