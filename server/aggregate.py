"""Robust aggregation of the sites' weight updates, and the checks that bound one site's pull.

Threat model: any one site may be buggy or hostile. Each update is first checked on its own
(names, shapes, dtypes, finiteness: `check_update`), then against the others (`norm_outliers`:
an update far further from the global model than its peers' is refused), and what is left is
combined by Flower's own strategies (`flwr.serverapp.strategy`): FedAvg ("mean", every site
weighted 1), FedTrimmedAvg ("trimmed-mean", coordinate-wise) or FedMedian ("median",
coordinate-wise). With 3 sites a trimmed mean drops the largest and the smallest value of every
coordinate, so one site alone cannot move any weight outside the other two sites' values.

The latent statistics (the scale factor) get the same treatment in `robust_scale_factor`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from ldm_core.config import AggregationConfig
from ldm_core.evaluation.fidelity import PSNR_CAP_DB
from ldm_core.privacy import clamp_note, pooled_scale_factor

StateDict = dict[str, torch.Tensor]


def mean_state(states: Iterable[Mapping[str, torch.Tensor]]) -> StateDict:
    """The element-wise mean of state dicts with the same keys (a running sum in float64, so
    only two are in memory); non-float entries (counters) are taken from the last one."""
    total: dict[str, torch.Tensor] = {}
    last: Mapping[str, torch.Tensor] = {}
    n = 0
    for state in states:
        if n and set(state) != set(last):
            raise ValueError("mean_state: the state dicts hold different parameters")
        for k, v in state.items():
            if v.is_floating_point():
                total[k] = total[k] + v.double() if k in total else v.double().clone()
        last, n = state, n + 1
    if not n:
        raise ValueError("mean_state: no state dicts to average")
    return {k: (total[k] / n).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in last.items()}


def server_step(reference: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor],
                buffer: Mapping[str, torch.Tensor] | None, *, momentum: float, lr: float
                ) -> tuple[StateDict, StateDict]:
    """FedAvgM: the next global model and momentum buffer from this round's aggregate.

    The round's pseudo-gradient is ``aggregated - reference``; the buffer is
    ``momentum * buffer + pseudo-gradient`` and the model moves ``lr * buffer`` from the
    reference. Under DP every update is already noised at its site, so the buffer, a running
    sum of released aggregates, is post-processing and free in privacy; what it buys is that the
    directions the rounds agree on add up while their independent DP noise partly cancels.
    With momentum 0 and lr 1 this is the aggregate itself. Non-floating entries (counters) are
    taken from the aggregate and have no buffer.
    """
    new_buffer: StateDict = {}
    out: StateDict = {}
    for k, agg in aggregated.items():
        ref = reference[k]
        if not agg.is_floating_point():
            out[k] = agg.clone()
            continue
        step = agg.double() - ref.double()
        if buffer is not None and k in buffer:
            step = step + momentum * buffer[k].double()
        new_buffer[k] = step.to(ref.dtype)
        out[k] = (ref.double() + lr * step).to(ref.dtype)
    return out, new_buffer


def resolve_method(method: str, n_updates: int) -> str:
    """The method actually used for `n_updates` usable updates ("auto": trimmed-mean from 3)."""
    if method == "auto":
        return "trimmed-mean" if n_updates >= 3 else "mean"
    return method


def trim_count(n_updates: int, trim_fraction: float) -> int:
    """Values dropped at each end of every coordinate: floor(fraction * n), at least 1 from 3
    updates (fraction > 0), and always leaving at least one value."""
    if n_updates < 3 or trim_fraction <= 0:
        return 0
    return min(max(1, math.floor(trim_fraction * n_updates)), (n_updates - 1) // 2)


def check_update(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
                 ) -> str | None:
    """Why an update is unusable (None if fine): wrong names, shapes or dtypes, or non-finite
    values. A floating parameter must come back floating (int64 weights would be truncated and
    then averaged); a non-floating one (a counter buffer) in exactly its own dtype."""
    if set(reference) != set(update):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return (f"parameter names differ from the global model (missing {missing[:3]}, "
                f"unexpected {extra[:3]})")
    for k, ref in reference.items():
        u = update[k]
        if tuple(u.shape) != tuple(ref.shape):
            return f"{k} has shape {tuple(u.shape)}, expected {tuple(ref.shape)}"
        if ref.is_floating_point() != u.is_floating_point() or (
                not ref.is_floating_point() and u.dtype != ref.dtype):
            return f"{k} has dtype {u.dtype}, expected {ref.dtype}"
        if u.is_floating_point() and not torch.isfinite(u).all():
            return f"{k} has non-finite values"
    return None


def distance(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between an update and the global model over the floating parameters."""
    total = 0.0
    for k, ref in reference.items():
        if ref.is_floating_point():
            total += float((update[k].double() - ref.double()).pow(2).sum())
    return math.sqrt(total)


def norm_outliers(reference: Mapping[str, torch.Tensor],
                  updates: Mapping[Hashable, Mapping[str, torch.Tensor]],
                  bound: float) -> dict[Hashable, str]:
    """Updates further from the global model than `bound` x the median distance of the OTHER
    updates, with the reason. A lone update, or one whose peers did not move, is not judged."""
    if not math.isfinite(bound) or len(updates) < 2:
        return {}
    dist = {key: distance(reference, u) for key, u in updates.items()}
    out: dict[Hashable, str] = {}
    for key, d in dist.items():
        med = statistics.median(v for k, v in dist.items() if k != key)
        if med > 0 and d > bound * med:
            out[key] = (f"update is {d:.4g} from the global model (L2), more than {bound:g} x "
                        f"the median {med:.4g} of the other sites' updates")
    return out


def _as_reply(node: int, update: Mapping[str, torch.Tensor]) -> Message:
    """An update as a Flower strategy sees it: the weights only, every site weighted 1 (a
    site's self-reported size would let it take over the average, and would reveal its size)."""
    return Message(RecordDict({"arrays": ArrayRecord(dict(update)),
                               "metrics": MetricRecord({"num-examples": 1})}),
                   dst_node_id=node, message_type=MessageType.TRAIN)


def aggregate(reference: Mapping[str, torch.Tensor], updates: Mapping[int, StateDict],
              cfg: AggregationConfig, server_round: int = 1) -> tuple[StateDict, str]:
    """Combine the checked updates (node -> weights) with Flower's strategy for the configured
    method; returns the new weights (in the reference's dtypes) and a short description."""
    if not updates:
        raise ValueError("no updates to aggregate")
    n = len(updates)
    method = resolve_method(cfg.method, n)
    if method == "trimmed-mean":
        k = trim_count(n, cfg.trim_fraction)
        # Flower trims int(beta * n) from each end and needs beta < 0.5; (k + 0.5) / n lands
        # safely inside [k, k + 1) without float round-off (k / n * n can be k - 1e-16).
        strategy = FedTrimmedAvg(beta=min((k + 0.5) / n, math.nextafter(0.5, 0.0)),
                                 min_train_nodes=1, min_available_nodes=1)
        how = f"trimmed-mean (dropping {k} of {n} per end)"
    elif method == "median":
        strategy, how = FedMedian(min_train_nodes=1, min_available_nodes=1), f"median of {n}"
    else:
        strategy, how = FedAvg(min_train_nodes=1, min_available_nodes=1), f"mean of {n}"
    replies = [_as_reply(node, {k: v.to(reference[k].dtype) for k, v in u.items()})
               for node, u in sorted(updates.items())]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise ValueError(f"{how}: the aggregation produced nothing")
    out = arrays.to_torch_state_dict()
    return {k: out[k].to(ref.dtype) for k, ref in reference.items()}, how


# ------------------------------------------------------------------------------ latent scale


def latent_stats_problem(second_moment_sum: float, count: float, *, clip: float,
                         noise_multiplier: float, tolerance_sigmas: float = 10.0) -> str | None:
    """Why a site's DP (sum, count) release cannot come from the mechanism (None if it can).

    Each patient adds a value in [0, clip] to the sum and 1 to the count, then the pair gets
    N(0, (noise_multiplier * clip * sqrt 2)^2) noise per coordinate (ldm_core.privacy.
    dp_sum_and_count; the site's noise multiplier is the run's public `scale_noise_multiplier`).
    So sum >= 0, count >= 0 and sum <= clip * count hold up to a few noise standard deviations;
    anything beyond `tolerance_sigmas` of them is a bug or a lie, not noise.
    """
    if not (math.isfinite(second_moment_sum) and math.isfinite(count)):
        return f"latent statistics are not finite (sum {second_moment_sum!r}, count {count!r})"
    sigma = noise_multiplier * clip * math.sqrt(2.0)
    slack = tolerance_sigmas * sigma + 1e-6 * (1.0 + abs(count) * clip)
    if count < -slack:
        return f"latent count {count:.6g} is negative beyond the DP noise"
    if second_moment_sum < -slack:
        return f"latent second-moment sum {second_moment_sum:.6g} is negative beyond the DP noise"
    if second_moment_sum > clip * max(count, 0.0) + slack * math.sqrt(1.0 + clip * clip):
        return (f"latent second-moment sum {second_moment_sum:.6g} exceeds {clip:g} (the clip) x "
                f"the count {count:.6g} beyond the DP noise")
    return None


def recon_quality_problem(psnr_sum: float, ssim_sum: float, count: float, *,
                          noise_multiplier: float, tolerance_sigmas: float = 10.0) -> str | None:
    """Why a site's DP reconstruction-quality release cannot come from the mechanism.

    Each holdout patient adds [PSNR / cap, SSIM] in [0, 1]^2 (row clip sqrt 2) and 1 to the
    count, then every coordinate gets N(0, (noise_multiplier * 2)^2) noise (the count, divided
    by the clip, noise_multiplier * sqrt 2). Sums outside [0, count] by more than
    `tolerance_sigmas` standard deviations are a bug or a lie, not noise.
    """
    if not all(math.isfinite(v) for v in (psnr_sum, ssim_sum, count)):
        return "reconstruction statistics are not finite"
    sum_sd, count_sd = 2.0 * noise_multiplier, math.sqrt(2.0) * noise_multiplier
    slack = tolerance_sigmas * (sum_sd + count_sd) + 1e-6 * (1.0 + abs(count))
    if count < -tolerance_sigmas * count_sd - 1e-6:
        return f"reconstruction count {count:.6g} is negative beyond the DP noise"
    for name, v in (("PSNR", psnr_sum), ("SSIM", ssim_sum)):
        if not -slack <= v <= max(count, 0.0) + slack:
            return (f"reconstruction {name} sum {v:.6g} lies outside [0, count {count:.6g}] "
                    "beyond the DP noise")
    return None


def pooled_recon_quality(stats: Sequence[tuple[float, float, float]], *, method: str,
                         noise_multiplier: float) -> dict[str, float | None]:
    """Holdout reconstruction PSNR (dB) and SSIM from the sites' checked releases, with a
    standard error from the DP noise (post-processing: free in privacy).

    Each site's noisy mean counts once, clamped to the possible [0, 1], so a site cannot buy
    weight by claiming a huge count; a site whose noisy count is within 3 noise standard
    deviations of zero is left out (its mean would be noise). The sites' means are averaged
    ("mean", and "auto" under 3 sites) or their median taken; the standard error is that of
    the average, or the largest site's for the median. None when no site is usable.
    """
    sum_sd, count_sd = 2.0 * noise_multiplier, math.sqrt(2.0) * noise_multiplier
    total = sum(c for _, _, c in stats)
    usable = [(min(max(ps / c, 0.0), 1.0), min(max(ss / c, 0.0), 1.0), sum_sd / c)
              for ps, ss, c in stats if c > 3.0 * count_sd]
    if not usable:
        return {"psnr_db": None, "ssim": None, "patients": total}
    if resolve_method(method, len(usable)) == "mean":
        p = statistics.fmean(u[0] for u in usable)
        q = statistics.fmean(u[1] for u in usable)
        se = math.sqrt(sum(u[2] ** 2 for u in usable)) / len(usable)
    else:
        p = statistics.median(u[0] for u in usable)
        q = statistics.median(u[1] for u in usable)
        se = max(u[2] for u in usable)
    return {"psnr_db": PSNR_CAP_DB * p, "ssim": q, "patients": total,
            "psnr_se_db": PSNR_CAP_DB * se, "ssim_se": se}


def robust_scale_factor(stats: Sequence[tuple[float, float]], *, clip: float, method: str
                        ) -> tuple[float, str | None]:
    """The latent scale factor 1 / sqrt(E[z^2]) from the sites' checked (sum, count) releases.

    "mean" (and "auto" under 3 sites) pools the sums and counts (ldm_core.privacy.
    pooled_scale_factor); otherwise it is the median of the per-site means (each clamped to
    [1e-2, clip] like the pooled one), so one site cannot move it outside the others' range.
    A site whose noisy count is <= 0 has no usable mean and is left out of the median.
    Post-processing of DP releases: free in privacy.
    """
    if resolve_method(method, len(stats)) == "mean":
        return pooled_scale_factor(stats, clip=clip)
    means = [min(max(s / c, 1e-2), clip) for s, c in stats if c > 0]
    if not means:
        return 1.0, ("the DP latent statistics were swamped by noise (no site has a positive "
                     "count); used the default scale factor 1.0")
    raw = statistics.median(s / c for s, c in stats if c > 0)  # the note shows it unclamped
    return 1.0 / math.sqrt(statistics.median(means)), clamp_note(raw, clip)
