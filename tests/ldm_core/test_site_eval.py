"""The site evaluation's count vector: layout, per-patient sensitivity, noise, pooled metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ldm_core.evaluation.site_eval import (
    ARMS,
    Layout,
    hist_auc,
    noisy_sum,
    patient_rows,
    pool,
    recall_inside,
)


def _probas(rng: np.random.Generator, labels: np.ndarray, c: int, sharp: float
            ) -> np.ndarray:
    logits = rng.normal(size=(labels.size, c)) + sharp * np.eye(c)[labels]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_layout_unpacks_what_it_sizes_and_refuses_another_shape() -> None:
    lay = Layout(3, 4)
    assert lay.arm_size == 3 * 3 * 4 + 9 and lay.size == 2 * lay.arm_size + 3
    assert lay.sensitivity == pytest.approx(math.sqrt(len(ARMS) * 4 + 1))
    parts = lay.unpack(np.arange(lay.size, dtype=float))
    assert parts["tstr.hist"].shape == (3, 3, 4) and parts["trtr.conf"].shape == (3, 3)
    assert parts["recall"].tolist() == [lay.size - 3, lay.size - 2, lay.size - 1]
    with pytest.raises(ValueError, match="3 classes and 4 bins"):
        lay.unpack(np.zeros(lay.size + 1))


def test_histogram_auc_equals_sklearn_on_binned_scores() -> None:
    rng = np.random.default_rng(0)
    c, bins = 3, 8
    y = rng.integers(0, c, 300)
    p = _probas(rng, y, c, 1.5)
    lay = Layout(c, bins)
    rows = patient_rows({"tstr": p, "trtr": p}, y, np.ones(y.size), None, lay)
    parts = lay.unpack(rows.sum(axis=0))
    binned = np.minimum((p * bins).astype(int), bins - 1)
    expected = [roc_auc_score(y == k, binned[:, k]) for k in range(c)]
    np.testing.assert_allclose(hist_auc(parts["tstr.hist"]), expected, atol=1e-12)
    # Confusion rows count patients by their argmax.
    conf = parts["trtr.conf"]
    assert conf.sum() == 300 and np.trace(conf) == (p.argmax(axis=1) == y).sum()


def test_one_patient_moves_the_vector_by_at_most_the_sensitivity_whatever_the_classifier(
        ) -> None:
    lay = Layout(4, 8)
    hostile = np.array([[np.nan, np.inf, -5.0, 7.0], [1e9, -np.inf, 0.5, np.nan],
                        [0.25, 0.25, 0.25, 0.25]])
    labels = np.array([2, 2, 2])
    for probas in ({"tstr": hostile, "trtr": hostile[::-1].copy()},
                   {"tstr": np.eye(4)[[2, 2, 2]], "trtr": np.eye(4)[[2, 2, 2]]}):
        rows = patient_rows(probas, labels, np.array([1.0, 7.0, np.nan]), ["p", "p", "p"], lay)
        assert rows.shape == (1, lay.size) and np.isfinite(rows).all()
        assert np.linalg.norm(rows[0]) <= lay.sensitivity + 1e-12
    # The bound is tight: a patient whose images are all inside the manifold reaches it, so a
    # smaller "sensitivity" would under-noise.
    rows = patient_rows({"tstr": np.eye(4)[[1]], "trtr": np.eye(4)[[1]]}, np.array([1]),
                        np.array([True]), None, lay)
    assert np.linalg.norm(rows[0]) == pytest.approx(lay.sensitivity)


def test_one_row_per_patient_not_per_image() -> None:
    lay = Layout(2, 4)
    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    rows = patient_rows({"tstr": p, "trtr": p}, np.array([0, 0, 1]),
                        np.array([1.0, 0.0, 1.0]), ["a", "a", "b"], lay)
    assert rows.shape == (2, lay.size)
    parts = lay.unpack(rows[0])
    assert parts["recall"].tolist() == [0.5, 0.0]  # half of patient a's images inside
    assert parts["tstr.hist"][0, 0].argmax() == 3  # mean prob 0.8 -> bin 3 of 4


def test_noise_is_present_with_the_declared_std_and_absent_only_without_dp() -> None:
    lay = Layout(4, 8)
    rows = np.zeros((5, lay.size))
    rows[:, 0] = 1.0
    exact = noisy_sum(rows, lay, noise_multiplier=0.0, generator=None)
    assert exact[0] == 5.0 and exact[1:].sum() == 0.0
    a = noisy_sum(rows, lay, noise_multiplier=2.0,
                  generator=torch.Generator().manual_seed(1))
    b = noisy_sum(rows, lay, noise_multiplier=2.0,
                  generator=torch.Generator().manual_seed(2))
    assert not np.allclose(a, b)
    assert np.std(a - exact) == pytest.approx(2.0 * lay.sensitivity, rel=0.1)
    with pytest.raises(ValueError, match="privacy generator"):
        noisy_sum(rows, lay, noise_multiplier=1.0, generator=None)


def test_an_oversized_or_non_finite_row_is_clipped_before_the_sum() -> None:
    lay = Layout(2, 2)
    rows = np.zeros((2, lay.size))
    rows[0, 0] = 100.0
    rows[1, 1] = np.nan
    total = noisy_sum(rows, lay, noise_multiplier=0.0, generator=None)
    assert total[0] == pytest.approx(lay.sensitivity) and total[1] == 0.0


def test_pooled_metrics_without_noise_are_the_exact_ones() -> None:
    rng = np.random.default_rng(3)
    c, bins = 4, 8
    lay = Layout(c, bins)
    vectors = []
    ys, pts, prs = [], [], []
    for _ in range(3):
        y = rng.integers(0, c, 200)
        pt, pr = _probas(rng, y, c, 1.0), _probas(rng, y, c, 3.0)
        vectors.append(noisy_sum(patient_rows({"tstr": pt, "trtr": pr}, y,
                                              rng.random(200) < 0.4, None, lay),
                                 lay, noise_multiplier=0.0, generator=None))
        ys.append(y), pts.append(pt), prs.append(pr)
    out = pool(vectors, [0.0] * 3, lay)
    y, pr = np.concatenate(ys), np.concatenate(prs)
    assert out["trtr_acc"] == pytest.approx((pr.argmax(axis=1) == y).mean())
    assert out["patients"] == 600
    assert 0.3 < out["recall"] < 0.5
    assert out["trtr_auc"] > out["tstr_auc"] > 0.5
    assert out["ratio"] == pytest.approx(out["tstr_auc"] / out["trtr_auc"])
    assert "ratio_ci" not in out  # no noise, no noise interval


def test_pooled_intervals_widen_with_the_noise_and_cover_the_truth() -> None:
    rng = np.random.default_rng(4)
    lay = Layout(2, 8)
    y = rng.integers(0, 2, 2000)
    p = _probas(rng, y, 2, 2.0)
    exact = noisy_sum(patient_rows({"tstr": p, "trtr": p}, y, np.ones(y.size), None, lay),
                      lay, noise_multiplier=0.0, generator=None)
    truth = pool([exact], [0.0], lay)["tstr_auc"]
    widths = []
    for sigma in (1.0, 8.0):
        std = sigma * lay.sensitivity
        noisy = exact + rng.normal(0, std, lay.size)
        out = pool([noisy], [std], lay, seed=1)
        lo, hi = out["tstr_auc_ci"]
        assert lo - 0.02 <= truth <= hi + 0.02
        widths.append(hi - lo)
    assert widths[1] > 2 * widths[0]


def test_recall_balls_come_from_the_synthetic_images_only() -> None:
    syn = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    inside = recall_inside(np.array([[3.2], [50.0]]), syn, k=2)
    assert inside.tolist() == [True, False]
    with pytest.raises(ValueError, match="more than k"):
        recall_inside(np.zeros((1, 1)), syn[:2], k=2)
