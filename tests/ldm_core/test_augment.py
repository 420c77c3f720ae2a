"""Augmentation evaluation: sensitivity at a fixed specificity (golden values), both arms trained
on what they claim, and a rare class that gains from more (oracle) examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

import ldm_core.evaluation.augment as aug
from ldm_core.evaluation.augment import evaluate_augmentation, sensitivity_at_specificity


def test_sensitivity_at_specificity_golden_values() -> None:
    y = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5])
    ones = np.ones((1, 6))
    # 3 of 4 negatives at or below 0.3: both positives are above it.
    assert sensitivity_at_specificity(y, s, ones, 0.75)[0] == 1.0
    # All 4 negatives must be covered: threshold 0.4, one positive above.
    assert sensitivity_at_specificity(y, s, ones, 0.99)[0] == 0.5
    # Weights: the negative at 0.4 counted 5 times needs 0.4 covered even at specificity 0.5.
    w = np.array([[1, 1, 1, 5, 1, 1]], dtype=float)
    assert sensitivity_at_specificity(y, s, w, 0.5)[0] == 0.5
    # No positives in a resample: undefined, not zero.
    w0 = np.array([[1, 1, 1, 1, 0, 0]], dtype=float)
    assert np.isnan(sensitivity_at_specificity(y, s, w0, 0.9)[0])
    with pytest.raises(ValueError, match="specificity"):
        sensitivity_at_specificity(y, s, ones, 1.0)


def test_sensitivity_matches_sklearn_roc_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.2
    s = rng.normal(size=500) + 1.0 * y
    fpr, tpr, thr = roc_curve(y, s)
    for spec in (0.8, 0.9, 0.95):
        # sklearn: tpr at the largest fpr <= 1 - spec counts scores >= thr; ours counts > thr at
        # the smallest threshold meeting the specificity. Without ties both are the same point.
        ok = fpr <= 1 - spec + 1e-12
        expected = tpr[ok].max()
        got = sensitivity_at_specificity(y, s, np.ones((1, 500)), spec)[0]
        assert abs(got - expected) <= 1.0 / y.sum() + 1e-12


def _toy(n_per_class: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 has a bright square at a random place, class 0 has none (16 px)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.zeros(n_per_class[0]), torch.ones(n_per_class[1])]).long()
    x = 0.15 * torch.randn(y.numel(), 1, 16, 16, generator=g) - 0.5
    pos = torch.randint(0, 12, (y.numel(), 2), generator=g)
    for i in torch.nonzero(y)[:, 0].tolist():
        r, c = pos[i].tolist()
        x[i, 0, r:r + 4, c:c + 4] += 0.6
    return x.clamp(-1, 1), y


def test_the_augmented_arm_trains_on_real_plus_extra_and_the_real_arm_on_real_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[np.ndarray] = []
    real_train = aug.train_classifier

    def spy(images: torch.Tensor, labels: torch.Tensor, *a: object, **k: object) -> object:
        calls.append(np.bincount(labels.numpy(), minlength=2))
        return real_train(images, labels, *a, **k)

    monkeypatch.setattr(aug, "train_classifier", spy)
    train = _toy((30, 3), 0)
    extra = _toy((0, 7), 1)
    x, y = _toy((20, 20), 2)
    out = evaluate_augmentation(train, extra, (x, y, [f"p{i // 2}" for i in range(40)]),
                                n_classes=2, target=1, seeds=(0, 1), epochs=1)
    assert [c.tolist() for c in calls] == [[30, 3], [30, 10]] * 2
    assert out["n_extra"] == 7 and out["n_train_per_class"] == [30, 3]
    assert out["n_test_patients"] == 20 and len(out["per_class"]) == 2
    for entry in out["per_class"]:
        for arm in ("real", "augmented"):
            lo, hi = entry[arm]["auc_ci"]
            assert lo <= entry[arm]["auc"] <= hi


@pytest.mark.slow
def test_a_rare_class_gains_from_more_examples_of_it() -> None:
    """Oracle 'synthetic' images (fresh real ones) for a class with 2 training examples: the
    paired delta of sensitivity is positive and its interval excludes zero."""
    train = _toy((120, 2), 0)
    extra = _toy((0, 120), 1)
    test = _toy((150, 150), 2)
    out = evaluate_augmentation(train, extra, (*test, [f"p{i}" for i in range(300)]),
                                n_classes=2, target=1, seeds=(0, 1), epochs=6)
    d = out["per_class"][1]
    assert d["delta_sensitivity"] > 0.2 and d["delta_sensitivity_ci"][0] > 0
    assert d["augmented"]["auc"] > d["real"]["auc"]


def test_bad_inputs_are_refused() -> None:
    train, extra = _toy((10, 2), 0), _toy((0, 3), 1)
    test = (*_toy((5, 5), 2), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="target class only"):
        evaluate_augmentation(train, (extra[0], torch.zeros(3).long()), test, n_classes=2,
                              target=1)
    only_neg = (test[0][:5], test[1][:5], test[2][:5])
    with pytest.raises(ValueError, match="no image of the target class"):
        evaluate_augmentation(train, extra, only_neg, n_classes=2, target=1)
    with pytest.raises(ValueError, match="not in"):
        evaluate_augmentation(train, extra, test, n_classes=2, target=2)
    with pytest.raises(ValueError, match="specificity"):
        evaluate_augmentation(train, extra, test, n_classes=2, target=1, specificity=0.0)
