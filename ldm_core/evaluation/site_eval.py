"""Utility and recall measured at the sites, released as one DP vector per site, pooled after.

Why: in a deployment the coordinator holds no real images, so TSTR/TRTR and fidelity cannot be
computed where the simulation computes them. Each site scores classifiers on its own test
patients instead and releases only a fixed-layout vector of counts with Gaussian noise. This
module is the arithmetic of that vector (no Flower, no ledger): its layout, one patient's
contribution, the noisy sum, and the coordinator's pooled metrics with intervals from the noise.

The vector (``Layout``), for each arm in ``ARMS`` (the coordinator's synthetic-trained
classifier, ``tstr``; the site's own DP-trained one, ``trtr``):

- ``hist[y, c, b]``: test patients of true class ``y`` whose mean probability of class ``c``
  falls into bin ``b`` of ``[0, 1]`` (``bins`` equal bins): enough for every one-vs-rest AUC;
- ``conf[y, k]``: test patients of class ``y`` whose mean probability vector's argmax is ``k``;

then ``recall[y]``: for each test patient of class ``y``, the fraction of its images inside the
synthetic manifold (k-NN balls around the synthetic images, radii from the synthetic images
alone, Kynkaanniemi et al. 2019).

Sensitivity (add/remove one patient): a patient adds, per arm, one 1 to ``hist`` for each of the
``C`` score classes (norm ``sqrt(C)``) and one 1 to ``conf`` (norm 1), plus one value in
``[0, 1]`` to ``recall``: ``Delta = sqrt(len(ARMS) * (C + 1) + 1)``. The contribution is built
from the patient's label, a bin index and a clipped fraction, so the bound holds whatever the
classifiers compute (a hostile coordinator's classifier included; a non-finite probability is
scored as 0). Noise ``N(0, (sigma * Delta)^2)`` per coordinate is one Gaussian mechanism of
multiplier ``sigma`` (``ldm_core.privacy.gaussian_mechanism_entry``).

Why histograms and not AUCs: an AUC's sensitivity is about ``1 / (patients of the smaller
class)``, which would reveal the site's size or need it; counts have sensitivity 1 and pool
across sites by addition. Precision (synthetic images inside the real manifold) is not released:
one real patient's k-NN ball can decide many synthetic images, so its sensitivity is unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import cdist

from ldm_core.data import rows_by_patient
from ldm_core.privacy import secure_standard_normal

ARMS: tuple[str, ...] = ("tstr", "trtr")
RECALL_K = 5
NOISE_DRAWS = 400


@dataclass(frozen=True)
class Layout:
    """Where each count sits in the released vector; the same at every site (public)."""

    n_classes: int
    bins: int

    def __post_init__(self) -> None:
        if self.n_classes < 2 or self.bins < 2:
            raise ValueError(f"need >= 2 classes and >= 2 bins, got {self.n_classes} and "
                             f"{self.bins}")

    @property
    def arm_size(self) -> int:
        c = self.n_classes
        return c * c * self.bins + c * c

    @property
    def size(self) -> int:
        return len(ARMS) * self.arm_size + self.n_classes

    @property
    def sensitivity(self) -> float:
        """L2 norm bound of one patient's contribution (see the module doc)."""
        return math.sqrt(len(ARMS) * (self.n_classes + 1) + 1)

    def unpack(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """``{"<arm>.hist": [C, C, B], "<arm>.conf": [C, C], "recall": [C]}`` from the vector."""
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (self.size,):
            raise ValueError(f"a site evaluation vector has {self.size} values for "
                             f"{self.n_classes} classes and {self.bins} bins, got {v.shape}")
        c, b, out, at = self.n_classes, self.bins, {}, 0
        for arm in ARMS:
            out[f"{arm}.hist"] = v[at:at + c * c * b].reshape(c, c, b)
            at += c * c * b
            out[f"{arm}.conf"] = v[at:at + c * c].reshape(c, c)
            at += c * c
        out["recall"] = v[at:at + c]
        return out


def _bin(p: np.ndarray, bins: int) -> np.ndarray:
    p = np.clip(np.nan_to_num(p, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.minimum((p * bins).astype(np.int64), bins - 1)


def patient_rows(probas: Mapping[str, np.ndarray], labels: np.ndarray, inside: np.ndarray,
                 groups: Sequence[str] | None, layout: Layout) -> np.ndarray:
    """One row per test patient ``[P, layout.size]``, each of L2 norm <= ``layout.sensitivity``.

    ``probas[arm]`` is ``[N, C]`` per image, ``labels`` ``[N]``, ``inside`` ``[N]`` (bool or
    fraction: the image lies in the synthetic manifold). A patient's label is its first image's
    (the loaders give every image of a patient one label).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, c = labels.shape[0], layout.n_classes
    if set(probas) != set(ARMS):
        raise ValueError(f"need probabilities for the arms {ARMS}, got {sorted(probas)}")
    for arm, p in probas.items():
        if p.shape != (n, c):
            raise ValueError(f"{arm}: probabilities {p.shape} for {n} images of {c} classes")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels outside [0, {c - 1}]")
    units = rows_by_patient(groups, n)
    rows = np.zeros((len(units), layout.size))
    span = np.arange(c)
    for r, idx in enumerate(units):
        y = int(labels[idx[0]])
        at = 0
        for arm in ARMS:
            mean = np.nan_to_num(np.asarray(probas[arm][idx], dtype=np.float64), nan=0.0,
                                 posinf=1.0, neginf=0.0).mean(axis=0)
            hist = np.zeros((c, c, layout.bins))
            hist[y, span, _bin(mean, layout.bins)] = 1.0
            conf = np.zeros((c, c))
            conf[y, int(np.argmax(mean))] = 1.0
            rows[r, at:at + hist.size] = hist.ravel()
            at += hist.size
            rows[r, at:at + conf.size] = conf.ravel()
            at += conf.size
        frac = float(np.clip(np.nan_to_num(np.asarray(inside[idx], dtype=np.float64)), 0, 1)
                     .mean())
        rows[r, at + y] = frac
    return rows


def noisy_sum(rows: np.ndarray, layout: Layout, *, noise_multiplier: float,
              generator: torch.Generator | None) -> np.ndarray:
    """Sum of the patients' rows plus ``N(0, (noise_multiplier * Delta)^2)`` per coordinate.

    Rows are clipped to ``Delta`` (a no-op for rows from `patient_rows`; a guard for any other
    caller) and non-finite rows are zeroed, so the sensitivity holds whatever the input. The
    noise is drawn from ``generator`` (the site's privacy source) the way Opacus' secure mode
    draws it. With ``noise_multiplier == 0`` (epsilon = inf) the exact sum is returned.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, layout.size)
    rows = np.where(np.isfinite(rows).all(axis=1, keepdims=True), rows, 0.0)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows * np.minimum(1.0, layout.sensitivity / np.maximum(norms, 1e-12))
    total = rows.sum(axis=0)
    if noise_multiplier == 0:
        return total
    if generator is None:
        raise ValueError("a noisy release needs the site's privacy generator")
    return total + noise_multiplier * layout.sensitivity * secure_standard_normal(layout.size,
                                                                                  generator)


@dataclass(frozen=True)
class SyntheticManifold:
    """The union of k-NN balls around the synthetic images' features (radii from the synthetic
    images alone, so no real image moves another's answer). Built before a site reads its data:
    everything about it depends on the coordinator's input only."""

    features: np.ndarray
    radius: np.ndarray

    @staticmethod
    def build(synthetic_features: np.ndarray, k: int = RECALL_K) -> SyntheticManifold:
        syn = np.asarray(synthetic_features, dtype=np.float64)
        if syn.ndim != 2 or syn.shape[0] <= k or not np.isfinite(syn).all():
            raise ValueError(f"need more than k={k} finite synthetic feature rows for recall, "
                             f"got {syn.shape}")
        radius = np.sort(cdist(syn, syn), axis=1)[:, k]  # column 0 is the image itself
        return SyntheticManifold(syn, radius)

    def contains(self, real_features: np.ndarray) -> np.ndarray:
        """Per real image: inside some synthetic ball (non-finite features: outside)."""
        real = np.asarray(real_features, dtype=np.float64)
        if real.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        real = np.where(np.isfinite(real), real, np.inf)
        with np.errstate(invalid="ignore"):
            d = cdist(real, self.features)
        return (np.nan_to_num(d, nan=np.inf) <= self.radius[None, :]).any(axis=1)


def recall_inside(real_features: np.ndarray, synthetic_features: np.ndarray, *,
                  k: int = RECALL_K) -> np.ndarray:
    """Per real image: inside the union of the synthetic k-NN balls (`SyntheticManifold`)."""
    return SyntheticManifold.build(synthetic_features, k).contains(real_features)


# ------------------------------------------------------------------- the coordinator's side
def hist_auc(hist: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per class ``[C]`` from ``hist[y, c, b]`` (NaN where a class has no
    positives or no negatives). Negative noisy counts count as zero; ties (same bin) count one
    half, as ``roc_auc_score`` counts tied scores."""
    h = np.clip(hist, 0.0, None)
    c = h.shape[0]
    out = np.full(c, np.nan)
    for k in range(c):
        pos = h[k, k]
        neg = h[:, k].sum(axis=0) - pos
        p, n = pos.sum(), neg.sum()
        if p <= 0 or n <= 0:
            continue
        below = np.cumsum(neg) - neg
        out[k] = float((pos * (below + 0.5 * neg)).sum() / (p * n))
    return out


def arm_metrics(hist: np.ndarray, conf: np.ndarray) -> tuple[float, float]:
    """(macro AUC, accuracy) of one arm from its pooled counts; NaN when undefined."""
    aucs = hist_auc(hist)
    auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan
    cf = np.clip(conf, 0.0, None)
    total = cf.sum()
    return auc, (float(np.trace(cf) / total) if total > 0 else math.nan)


def _metrics(parts: Mapping[str, np.ndarray], n_classes: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for arm in ARMS:
        out[f"{arm}_auc"], out[f"{arm}_acc"] = arm_metrics(parts[f"{arm}.hist"],
                                                           parts[f"{arm}.conf"])
    t, r = out["tstr_auc"], out["trtr_auc"]
    out["ratio"] = t / r if math.isfinite(t) and math.isfinite(r) and r > 0 else math.nan
    # Patients per class: each patient puts exactly 1 into its class's confusion row of each
    # arm; the arms' mean halves the noise variance of the count.
    n = np.clip(np.mean([parts[f"{a}.conf"].sum(axis=1) for a in ARMS], axis=0), 0.0, None)
    rec = np.clip(parts["recall"], 0.0, None)
    out["recall"] = float(min(1.0, rec.sum() / n.sum())) if n.sum() > 0 else math.nan
    out["patients"] = float(n.sum())
    return out


def pool(vectors: Sequence[np.ndarray], noise_stds: Sequence[float], layout: Layout, *,
         seed: int = 0, draws: int = NOISE_DRAWS) -> dict[str, object]:
    """Pool the sites' releases and score them: AUC and accuracy per arm, their ratio, recall.

    Each interval is the 2.5-97.5 percentile over ``draws`` re-noisings of the pooled vector
    with the sites' own (public) noise: an approximation of the spread the DP noise adds (it
    shows the spread, not the bias that clipping negative noisy counts to zero puts on a point
    estimate). The sampling spread of a finite test set is NOT in it. Post-processing only
    (free in privacy); ``seed`` is not privacy-relevant.
    """
    if not vectors:
        raise ValueError("no site released an evaluation")
    total = np.sum([np.asarray(v, dtype=np.float64) for v in vectors], axis=0)
    std = math.sqrt(sum(float(s) ** 2 for s in noise_stds))
    point = _metrics(layout.unpack(total), layout.n_classes)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(draws if std > 0 else 0):
        again = _metrics(layout.unpack(total + rng.normal(0.0, std, layout.size)),
                         layout.n_classes)
        for k, v in again.items():
            samples[k].append(v)
    out: dict[str, object] = {"noise_std": std}
    for k, v in point.items():
        out[k] = v
        vals = np.asarray(samples[k])
        vals = vals[np.isfinite(vals)]
        if vals.size:
            lo, hi = np.percentile(vals, [2.5, 97.5])
            out[f"{k}_ci"] = [float(lo), float(hi)]
    per_class = {arm: hist_auc(layout.unpack(total)[f"{arm}.hist"]).tolist() for arm in ARMS}
    out["per_class_auc"] = per_class
    return out
