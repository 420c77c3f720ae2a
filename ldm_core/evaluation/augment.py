"""Does adding synthetic images of one class help a classifier on real patients?

The augmentation use: a site (or a coordinator with a labelled reference set) has few real images
of a rare class and asks whether N synthetic images of that class, added to its real training
data, make a classifier better on real test patients. Two arms share one judge
(``ldm_core.classifier.SmallCNN``) and the utility recipe (same epochs, batch, learning rate):

* ``real``      - real train only;
* ``augmented`` - real train plus the N synthetic images of the target class.

Each arm is trained once per seed; values are those of the seed ensemble (averaged probabilities),
with 95 % intervals from a bootstrap over TEST PATIENTS (slices of one patient move together), and
the augmented-minus-real differences from a PAIRED bootstrap (the same patient resamples for both
arms), so a difference whose interval excludes 0 is a measured gain or loss, not seed noise.

Per class it reports the one-vs-rest AUC and the sensitivity at a fixed specificity (default 0.90:
the operating point a screening model is usually held to, where a rare class's gain shows first).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm_core.classifier import predict_proba, train_classifier
from ldm_core.evaluation.utility import (
    CLASSIFIER_RECIPE,
    _check_split,
    _ci,
    bootstrap_counts,
    patient_codes,
    weighted_ovr_auc,
)

__all__ = ["AUGMENT_ARMS", "evaluate_augmentation", "sensitivity_at_specificity"]

AUGMENT_ARMS = ("real", "augmented")


def sensitivity_at_specificity(y: np.ndarray, scores: np.ndarray, weights: np.ndarray,
                               specificity: float) -> np.ndarray:
    """Sensitivity ``[B]`` at the lowest threshold whose weighted specificity is >= the target.

    ``y`` [N] bool (positives), ``scores`` [N], ``weights`` [B, N] (bootstrap multiplicities).
    A sample is called positive when its score is strictly above the threshold, so ties at the
    threshold count as negatives (the conservative side for sensitivity). NaN where a resample has
    no positives or no negatives.
    """
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must lie in (0, 1), got {specificity}")
    y = np.asarray(y, dtype=bool)
    neg_order = np.argsort(scores[~y], kind="stable")
    neg_s = scores[~y][neg_order]
    w_neg = weights[:, ~y][:, neg_order]
    w_pos = weights[:, y]
    total_neg = w_neg.sum(axis=1)
    total_pos = w_pos.sum(axis=1)
    out = np.full(weights.shape[0], np.nan)
    if neg_s.size == 0 or int(y.sum()) == 0:
        return out
    cum = np.cumsum(w_neg, axis=1)
    # first negative (in score order) at which the covered negative weight reaches the target
    idx = np.argmax(cum >= specificity * total_neg[:, None] - 1e-9, axis=1)
    thresholds = neg_s[idx]
    above = scores[y][None, :] > thresholds[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w_pos * above).sum(axis=1) / total_pos
    return np.where((total_pos > 0) & (total_neg > 0), sens, out)


def _validate(real_train: tuple[Tensor, Tensor], extra: tuple[Tensor, Tensor],
              test: tuple[Tensor, Tensor, Sequence[str]], *, n_classes: int, target: int,
              seeds: Sequence[int]) -> None:
    if not 0 <= target < n_classes:
        raise ValueError(f"target class {target} is not in [0, {n_classes - 1}]")
    _check_split(*real_train, n_classes, "real_train")
    _check_split(*extra, n_classes, "synthetic extra")
    if bool((extra[1] != target).any()):
        raise ValueError("the synthetic extra must hold the target class only")
    _check_split(test[0], test[1], n_classes, "test")
    if len(test[2]) != test[0].shape[0]:
        raise ValueError(f"test patient ids: {len(test[2])} for {test[0].shape[0]} images")
    if not bool((test[1] == target).any()):
        raise ValueError(f"the real test set has no image of the target class {target}: its "
                         "AUC and sensitivity are undefined; use a test set that has some")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")


def evaluate_augmentation(
    real_train: tuple[Tensor, Tensor],
    extra: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor, Sequence[str]],
    *,
    n_classes: int,
    target: int,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 12,
    specificity: float = 0.90,
    device: str | torch.device = "cpu",
    n_boot: int = 1000,
    boot_seed: int = 0,
    show_progress: bool = False,
) -> dict:
    """Train both arms per seed, score them on the real test patients, compare per class.

    Returns a JSON-ready dict: ``per_class`` (one entry per class with, per arm, ``auc``,
    ``auc_ci``, ``sensitivity``, ``sensitivity_ci``, and ``delta_auc``/``delta_auc_ci``,
    ``delta_sensitivity``/``delta_sensitivity_ci``), ``macro_auc`` per arm with CIs and the
    paired delta, the sizes (``n_train_per_class``, ``n_extra``, ``n_test_per_class``,
    ``n_test_patients``), ``seeds``, ``epochs``, ``specificity``, ``n_boot_valid``.
    """
    _validate(real_train, extra, test, n_classes=n_classes, target=target, seeds=seeds)
    if not 0.0 < specificity < 1.0:
        raise ValueError(f"specificity must lie in (0, 1), got {specificity}")
    test_x, test_y, test_pid = test
    y = test_y.cpu().numpy().astype(np.int64)
    data = {"real": real_train,
            "augmented": (torch.cat([real_train[0], extra[0]]),
                          torch.cat([real_train[1], extra[1]]))}
    probas: dict[str, list[np.ndarray]] = {a: [] for a in AUGMENT_ARMS}
    bar = tqdm(total=len(seeds) * len(AUGMENT_ARMS), desc="augmentation classifiers",
               disable=not show_progress)
    for seed in seeds:
        for arm in AUGMENT_ARMS:
            bar.set_postfix_str(f"{arm} seed {seed}")
            model = train_classifier(*data[arm], n_classes, epochs=epochs, seed=seed,
                                     device=device, **CLASSIFIER_RECIPE)
            probas[arm].append(np.asarray(predict_proba(model, test_x), dtype=np.float64))
            bar.update(1)
    bar.close()

    codes = patient_codes(test_pid)
    n_pat = int(codes.max()) + 1
    counts = bootstrap_counts(n_pat, n_boot, boot_seed)
    weights = np.vstack([np.ones((1, y.size)), counts[:, codes].astype(np.float64)])
    mean_p = {a: np.mean(probas[a], axis=0) for a in AUGMENT_ARMS}

    per_class = []
    macro = {a: np.zeros(weights.shape[0]) for a in AUGMENT_ARMS}
    present = [c for c in range(n_classes) if bool((y == c).any()) and bool((y != c).any())]
    for c in range(n_classes):
        entry: dict = {"class": c}
        curves: dict[str, dict[str, np.ndarray]] = {}
        for a in AUGMENT_ARMS:
            auc = weighted_ovr_auc(y == c, mean_p[a][:, c], weights)
            sens = sensitivity_at_specificity(y == c, mean_p[a][:, c], weights, specificity)
            curves[a] = {"auc": auc, "sens": sens}
            if c in present:
                macro[a] += auc / len(present)
            entry[a] = {"auc": float(auc[0]), "auc_ci": _ci(auc[1:]),
                        "sensitivity": float(sens[0]), "sensitivity_ci": _ci(sens[1:])}
        # Resamples without a positive of this class are undefined and left out of its CI: for
        # a rare class that can be many, so say how many were usable.
        entry["n_boot_valid"] = int(np.isfinite(curves["real"]["auc"][1:]).sum())
        for key, name in (("auc", "delta_auc"), ("sens", "delta_sensitivity")):
            d = curves["augmented"][key] - curves["real"][key]
            entry[name] = float(d[0])
            entry[f"{name}_ci"] = _ci(d[1:])
        per_class.append(entry)
    d_macro = macro["augmented"] - macro["real"]
    return {
        "target_class": int(target),
        "per_class": per_class,
        "macro_auc": {**{a: {"auc": float(macro[a][0]), "auc_ci": _ci(macro[a][1:])}
                         for a in AUGMENT_ARMS},
                      "delta": float(d_macro[0]), "delta_ci": _ci(d_macro[1:])},
        "n_train_per_class": np.bincount(real_train[1].cpu().numpy(),
                                         minlength=n_classes).tolist(),
        "n_extra": int(extra[0].shape[0]),
        "n_test_per_class": np.bincount(y, minlength=n_classes).tolist(),
        "n_test_patients": n_pat,
        "n_boot_valid": int(np.isfinite(macro["real"][1:]).sum()),
        "seeds": [int(s) for s in seeds],
        "epochs": int(epochs),
        "specificity": float(specificity),
    }
