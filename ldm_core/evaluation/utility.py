"""Utility of a synthetic dataset: does a classifier trained on it work on real patients?

Three arms share one judge (``ldm_core.classifier.SmallCNN``) and one training recipe (same
epochs, batch size, learning rate, augmentation):

* TRTR - train on real train, test on real test: the yardstick;
* TSTR - train on synthetic only, resampled to the real train's size and per-class counts, so
  the only difference from TRTR is where the images came from;
* TRS  - train on real train + that same synthetic draw (twice the images; same epochs, so it
  also gets twice the optimiser steps - it answers "does adding synthetic data help?").

Every arm is trained once per seed. The point estimate and its confidence interval describe the
same thing, the seed ensemble (the seed-averaged probabilities): the point is its AUC on the test
set, the CI a bootstrap over TEST PATIENTS (all slices of a patient move together, because slices
of one patient are not independent). The mean of the per-seed AUCs is kept as
``a_auc_seed_mean``; it is usually lower than the ensemble's and can sit outside the ensemble's
CI. ``ratio`` is TSTR AUC / TRTR AUC, with a paired bootstrap CI (same patient resamples for both
arms).

The TRTR model of the first seed doubles as a feature space for fidelity metrics: train it with
:func:`train_reference_classifier` and pass it in as ``reference_model`` so it is not trained
twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm_core.classifier import SmallCNN, macro_auc, predict_proba, train_classifier

__all__ = [
    "ARMS",
    "ArmPredictions",
    "evaluate_utility",
    "judge_epochs",
    "summarise_arms",
    "train_arms",
    "train_reference_classifier",
    "validate_utility_inputs",
    "weighted_ovr_auc",
]

ARMS = ("trtr", "tstr", "trs")

# The same recipe for every arm. Batch 32 / lr 2e-3: with the classifier's defaults (64 / 1e-3)
# a ~1000-image training set underfits (measured AUC 0.64-0.70 vs 0.93-0.95 on the demo data,
# benchmarks/demo_difficulty.py), which would make TSTR/TRTR ratios meaningless.
CLASSIFIER_RECIPE: dict[str, float | int] = {"batch_size": 32, "lr": 2e-3}

# Epochs of the judge when the caller names none. Images: a run's ~1000 real training images
# make ~375 steps in 12 epochs (TRTR AUC ~0.91 on the demo). Volumes come a few hundred a run
# (~15 steps an epoch): after 12 epochs the 3D judge was at AUC ~0.6 on the 3D demo's test
# patients, a yardstick too weak for any ratio to mean something; after 60 it reached 0.72-0.92
# depending on the seed, after 90 the worst of those seeds 0.94
# (`benchmarks/demo_difficulty.py --volumes`, docs/benchmarks.md section 12).
JUDGE_EPOCHS = {2: 12, 3: 90}


def judge_epochs(spatial_dims: int, epochs: int | None = None) -> int:
    """`epochs` when given, else the judge's default for images (2) or volumes (3)."""
    if epochs is not None:
        return int(epochs)
    if spatial_dims not in JUDGE_EPOCHS:
        raise ValueError(f"judge_epochs: spatial_dims must be 2 or 3, got {spatial_dims}")
    return JUDGE_EPOCHS[spatial_dims]


def _check_split(images: Tensor, labels: Tensor, n_classes: int, name: str) -> None:
    if not isinstance(images, Tensor) or images.ndim not in (4, 5):
        raise ValueError(f"{name} images must be a tensor [N,1,H,W] (volumes: [N,1,D,H,W])")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{name} labels must be a tensor [N] matching {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError(f"{name} split is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(
            f"{name} labels must lie in [0, {n_classes - 1}], got "
            f"[{int(labels.min())}, {int(labels.max())}]; check n_classes"
        )


def train_reference_classifier(
    real_train: tuple[Tensor, Tensor],
    *,
    n_classes: int,
    seed: int = 0,
    epochs: int = 10,
    device: str | torch.device = "cpu",
) -> SmallCNN:
    """Train the TRTR classifier for ``seed`` exactly as :func:`evaluate_utility` would.

    Use its penultimate layer as a fidelity feature space, then pass it to ``evaluate_utility``
    as ``reference_model`` (with ``seeds[0] == seed`` and the same ``epochs``).
    """
    images, labels = real_train
    _check_split(images, labels, n_classes, "real_train")
    return train_classifier(images, labels, n_classes, epochs=epochs, seed=seed, device=device,
                            **CLASSIFIER_RECIPE)


def _match_real_counts(
    syn_labels: np.ndarray, real_labels: np.ndarray, n_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices into the synthetic set with the same per-class counts as the real train split.

    Draws without replacement where the synthetic class is large enough, else with replacement.
    """
    picks = []
    for cls in range(n_classes):
        need = int((real_labels == cls).sum())
        if need == 0:
            continue
        pool = np.flatnonzero(syn_labels == cls)
        if pool.size == 0:
            raise ValueError(
                f"synthetic set has no images of class {cls}, which real train has {need} of: "
                "generate a class-balanced synthetic set covering every class"
            )
        picks.append(rng.choice(pool, size=need, replace=pool.size < need))
    return rng.permutation(np.concatenate(picks))


def weighted_ovr_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of ``scores`` [N] for positives ``y`` [N] (bool) under sample weights.

    ``weights`` is ``[B, N]`` (e.g. bootstrap multiplicities); returns ``[B]`` AUCs, NaN where a
    resample has no positives or no negatives. Ties count one half, as in ``roc_auc_score``.
    Vectorised over B: one sort, then cumulative sums, so 1000 resamples cost milliseconds.
    """
    order = np.argsort(scores, kind="stable")
    s_sorted = scores[order]
    pos_sorted = y[order].astype(bool)
    w = weights[:, order]
    w_pos = np.where(pos_sorted[None, :], w, 0.0)
    w_neg = w - w_pos
    # group ends of tied score values
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    cum_pos = np.cumsum(w_pos, axis=1)[:, ends]
    cum_neg = np.cumsum(w_neg, axis=1)[:, ends]
    grp_pos = np.diff(cum_pos, axis=1, prepend=0.0)
    grp_neg = np.diff(cum_neg, axis=1, prepend=0.0)
    below_neg = cum_neg - grp_neg  # negatives strictly below each group
    total_pos, total_neg = cum_pos[:, -1], cum_neg[:, -1]
    wins = (grp_pos * (below_neg + 0.5 * grp_neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = wins / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def _macro_auc_weighted(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC ``[B]`` (equals the class-1 AUC when there are two classes)."""
    n_classes = proba.shape[1]
    if n_classes == 2:
        return weighted_ovr_auc(y == 1, proba[:, 1], weights)
    per_class = [weighted_ovr_auc(y == c, proba[:, c], weights) for c in range(n_classes)]
    return np.mean(per_class, axis=0)


def patient_codes(pids: Sequence[object]) -> np.ndarray:
    """An integer code per row for its patient: the unit every bootstrap here resamples."""
    return np.unique(np.asarray([str(p) for p in pids]), return_inverse=True)[1]


def bootstrap_counts(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_units] multiplicities of a bootstrap over units (patients), seeded: index
    them by `patient_codes` for per-row weights, so a patient's slices move together."""
    return np.random.default_rng(seed).multinomial(n_units, np.full(n_units, 1.0 / n_units),
                                                   size=n_boot)


def _ci(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def evaluate_utility(
    real_train: tuple[Tensor, Tensor],
    synthetic: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor, Sequence[str]],
    *,
    n_classes: int,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    reference_model: SmallCNN | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    show_progress: bool = False,
) -> dict:
    """Train TRTR / TSTR / TRS classifiers per seed and score them on the real test patients.

    ``test`` is ``(images, labels, patient_ids)``; the test set must contain every class.
    ``reference_model``, if given, is used as the TRTR model of ``seeds[0]`` instead of training
    it again (it must come from :func:`train_reference_classifier` with the same seed and epochs).
    ``progress`` receives one human-readable line per trained model; ``show_progress`` draws a
    bar over seeds x arms (training them is minutes on a CPU, and silent otherwise).

    Three steps: :func:`validate_utility_inputs`, :func:`train_arms` (the slow one),
    :func:`summarise_arms` (ensemble values and the patient-level bootstrap).

    Returns a JSON-ready dict: for each arm ``a`` in ``trtr, tstr, trs``: ``a_auc`` (AUC of the
    seed ensemble), ``a_auc_seed_mean`` and ``a_auc_std`` (over the per-seed models),
    ``a_auc_ci`` ([lo, hi], 95 %), ``a_acc`` (ensemble), ``a_acc_std``, ``a_acc_ci``;
    ``ratio`` (tstr_auc / trtr_auc) and ``ratio_ci``; ``per_class`` {arm: [one-vs-rest AUC per
    class, seed-averaged probabilities]}; ``per_seed`` {arm: [{seed, auc, acc}]}; ``n_train``,
    ``n_synthetic``, ``n_test``, ``n_test_patients``, ``n_boot_valid``, ``seeds``, ``epochs``.
    """
    validate_utility_inputs(real_train, synthetic, test, n_classes=n_classes, seeds=seeds,
                            n_boot=n_boot)
    arms = train_arms(real_train, synthetic, test[0], test[1], n_classes=n_classes, seeds=seeds,
                      epochs=epochs, device=device, progress=progress,
                      reference_model=reference_model, show_progress=show_progress)
    result = summarise_arms(arms, test[1], test[2], n_classes=n_classes, n_boot=n_boot,
                            boot_seed=boot_seed)
    result.update(
        {
            "n_train": int(real_train[0].shape[0]),
            "n_synthetic": int(synthetic[0].shape[0]),
            "n_test": int(test[0].shape[0]),
            "seeds": [int(s) for s in seeds],
            "epochs": int(epochs),
        }
    )
    return result


def validate_utility_inputs(
    real_train: tuple[Tensor, Tensor],
    synthetic: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor, Sequence[str]],
    *,
    n_classes: int,
    seeds: Sequence[int],
    n_boot: int,
) -> None:
    """Refuse inputs that would make a utility number meaningless, before minutes of training."""
    if len(test) != 3:
        raise ValueError("test must be (images, labels, patient_ids)")
    test_x, test_y, test_pid = test
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    _check_split(*real_train, n_classes, "real_train")
    _check_split(*synthetic, n_classes, "synthetic")
    _check_split(test_x, test_y, n_classes, "test")
    if len(test_pid) != test_x.shape[0]:
        raise ValueError(
            f"test patient_ids has {len(test_pid)} entries for {test_x.shape[0]} test images"
        )
    if not seeds:
        raise ValueError("seeds is empty: pass at least one seed, e.g. (0, 1, 2)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    missing = sorted(set(range(n_classes)) - set(test_y.cpu().numpy().astype(np.int64).tolist()))
    if missing:
        raise ValueError(
            f"test set lacks classes {missing}: their AUC is undefined; use a test split that "
            "contains every class"
        )


@dataclass(frozen=True)
class ArmPredictions:
    """Per arm: each seed's test-set probabilities and its {seed, auc, acc} record."""

    probas: dict[str, list[np.ndarray]]
    per_seed: dict[str, list[dict]]


def train_arms(
    real_train: tuple[Tensor, Tensor],
    synthetic: tuple[Tensor, Tensor],
    test_x: Tensor,
    test_y: Tensor,
    *,
    n_classes: int,
    seeds: Sequence[int],
    epochs: int,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    reference_model: SmallCNN | None = None,
    show_progress: bool = False,
) -> ArmPredictions:
    """Train every arm once per seed (the slow step) and predict the test set."""
    train_x, train_y = real_train
    syn_x, syn_y = synthetic
    y_test = test_y.cpu().numpy().astype(np.int64)
    real_y_np = train_y.cpu().numpy()
    syn_y_np = syn_y.cpu().numpy()
    probas: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    per_seed: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    total = len(seeds) * len(ARMS)
    done = 0
    bar = tqdm(total=total, desc="utility classifiers", disable=not show_progress)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pick = torch.as_tensor(_match_real_counts(syn_y_np, real_y_np, n_classes, rng))
        arm_data = {
            "trtr": (train_x, train_y),
            "tstr": (syn_x[pick], syn_y[pick]),
            "trs": (torch.cat([train_x, syn_x[pick]]), torch.cat([train_y, syn_y[pick]])),
        }
        for arm in ARMS:
            bar.set_postfix_str(f"{arm.upper()} seed {seed}")
            if arm == "trtr" and seed == seeds[0] and reference_model is not None:
                model = reference_model
            else:
                x, y = arm_data[arm]
                model = train_classifier(x, y, n_classes, epochs=epochs, seed=seed, device=device,
                                         **CLASSIFIER_RECIPE)
            proba = np.asarray(predict_proba(model, test_x), dtype=np.float64)
            auc = macro_auc(y_test, proba)
            acc = float((proba.argmax(1) == y_test).mean())
            probas[arm].append(proba)
            per_seed[arm].append({"seed": int(seed), "auc": float(auc), "acc": acc})
            done += 1
            bar.update(1)
            if progress is not None:
                progress(f"utility {arm.upper()} seed {seed}: AUC {auc:.3f} ({done}/{total})")
    bar.close()
    return ArmPredictions(probas, per_seed)


def summarise_arms(
    arms: ArmPredictions,
    test_y: Tensor,
    test_pid: Sequence[str],
    *,
    n_classes: int,
    n_boot: int = 1000,
    boot_seed: int = 0,
) -> dict:
    """Seed-ensemble values per arm with a bootstrap over TEST PATIENTS (slices of a patient
    move together), and the TSTR/TRTR ratio with a paired bootstrap CI."""
    y_test = test_y.cpu().numpy().astype(np.int64)
    # patient-level bootstrap weights: multiplicity of each test image in each resample
    pid_codes = patient_codes(test_pid)
    n_pat = int(pid_codes.max()) + 1
    weights = bootstrap_counts(n_pat, n_boot, boot_seed)[:, pid_codes].astype(np.float64)

    result: dict = {}
    boot_auc: dict[str, np.ndarray] = {}
    per_class: dict[str, list[float]] = {}
    ones = np.ones((1, y_test.size))
    for arm in ARMS:
        aucs = np.array([r["auc"] for r in arms.per_seed[arm]])
        accs = np.array([r["acc"] for r in arms.per_seed[arm]])
        mean_p = np.mean(arms.probas[arm], axis=0)
        boot_auc[arm] = _macro_auc_weighted(y_test, mean_p, weights)
        correct = (mean_p.argmax(1) == y_test).astype(np.float64)
        boot_acc = (weights @ correct) / weights.sum(axis=1)
        per_class[arm] = [
            float(weighted_ovr_auc(y_test == c, mean_p[:, c], ones)[0]) for c in range(n_classes)
        ]
        result.update(
            {
                f"{arm}_auc": float(_macro_auc_weighted(y_test, mean_p, ones)[0]),
                f"{arm}_auc_seed_mean": float(aucs.mean()),
                f"{arm}_auc_std": float(aucs.std()),
                f"{arm}_auc_ci": _ci(boot_auc[arm]),
                f"{arm}_acc": float(correct.mean()),
                f"{arm}_acc_std": float(accs.std()),
                f"{arm}_acc_ci": _ci(boot_acc),
            }
        )
    result["ratio"] = result["tstr_auc"] / result["trtr_auc"]
    with np.errstate(invalid="ignore", divide="ignore"):
        result["ratio_ci"] = _ci(boot_auc["tstr"] / boot_auc["trtr"])
    result.update(
        {
            "per_class": per_class,
            "per_seed": arms.per_seed,
            "n_test_patients": n_pat,
            "n_boot_valid": int(np.isfinite(boot_auc["trtr"]).sum()),
        }
    )
    return result
