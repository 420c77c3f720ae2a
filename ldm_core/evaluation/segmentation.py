"""Segmentation utility of paired synthetic data: does a segmenter trained on synthetic image/mask
pairs outline lesions on real patients?

Two arms share one judge (a small MONAI ``UNet``) and one recipe (steps, batch, learning rate,
flips), as the classification utility does:

* TRTR - trained on real train pairs, tested on real test pairs: the yardstick;
* TSTR - trained on synthetic pairs only, tested on the same real test pairs.

Dice is pooled per TEST PATIENT (intersection and sizes summed over the patient's slices, so a
patient with many slices is not counted many times) and averaged over the patients that have a
lesion: a patient without one has no Dice. ``dice_all`` also scores lesion-free patients (1 when
nothing is predicted on any of their slices, else 0), so a segmenter that paints lesions
everywhere is not rewarded. Point values are the seed ensemble (the seed-averaged
probabilities, thresholded at 0.5); CIs are a bootstrap over test patients, and the TSTR/TRTR
ratio has a paired bootstrap CI, as in ``ldm_core.evaluation.utility``.

``alignment_dice`` asks whether a generated mask outlines the lesion in its own generated
image: the TRTR segmenter (a judge trained on real pairs only) segments the synthetic images
and its output is compared with the synthetic masks. A generator whose masks float free of its
images scores near 0 here even when both look plausible on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm_core.classifier import left_right_axis
from ldm_core.evaluation.utility import _ci, bootstrap_counts, patient_codes

__all__ = ["SEGMENTER_RECIPE", "SEGMENTER_RECIPE_3D", "dice_counts", "patient_dice",
           "segmentation_utility", "segment", "train_segmenter"]

# About 11 s per arm on 2 CPU cores at 32 px. On 1200 real demo pairs (32 px) this reached
# test Dice 0.78; batch 16 / lr 3e-3 / 400 steps stopped at 0 (it still predicted background
# everywhere), lr 1e-2 at 400 steps 0.68.
SEGMENTER_RECIPE: dict[str, float | int] = {"steps": 600, "batch_size": 32, "lr": 1e-2}
# Volumes: a 32^3 batch of 32 costs ~0.3 s a step on 2 cores (600 steps would be 3 minutes an
# arm); batch 8 for 400 steps keeps an arm near half a minute.
SEGMENTER_RECIPE_3D: dict[str, float | int] = {"steps": 400, "batch_size": 8, "lr": 1e-2}


def _recipe(spatial_dims: int) -> dict[str, float | int]:
    return SEGMENTER_RECIPE if spatial_dims == 2 else SEGMENTER_RECIPE_3D


def _check_pairs(images: Tensor, masks: Tensor, where: str) -> None:
    if images.ndim not in (4, 5) or images.shape[1] != 1 or masks.shape != images.shape:
        raise ValueError(f"{where}: expected images and masks as [N, 1, H, W] (or volumes "
                         f"[N, 1, D, H, W]) tensors of one shape, got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{where}: no image/mask pairs")
    if not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError(f"{where}: masks must be binary (0/1)")


def _random_flip(x: Tensor, m: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mirror each pair left-right with probability 1/2 (anatomy allows it; the axis is
    `ldm_core.classifier.left_right_axis`), image and mask together."""
    axis = left_right_axis(x.ndim)
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).view(-1, *[1] * (x.ndim - 1))
    return torch.where(flip, x.flip(axis), x), torch.where(flip, m.flip(axis), m)


def make_segmenter(spatial_dims: int = 2) -> UNet:
    """The judge: a 2-level MONAI UNet, instance norm, one logit per pixel (voxel). In 3D the
    channels are halved: a volume has D times the voxels of a slice, and the judge must train
    in seconds on 2 cores like the 2D one."""
    channels = (16, 32, 64) if spatial_dims == 2 else (8, 16, 32)
    return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=channels,
                strides=(2, 2), num_res_units=1)


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE + soft Dice over the batch (lesions are a few percent of the pixels: BCE alone
    learns to predict background)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def train_segmenter(images: Tensor, masks: Tensor, *, seed: int, device: torch.device,
                    steps: int | None = None, batch_size: int | None = None,
                    lr: float | None = None) -> nn.Module:
    """A fresh segmenter trained on the pairs; deterministic for a seed (initialisation,
    batches and flips come from it; the caller's global RNG state is left untouched). Unset
    steps, batch size and learning rate come from the recipe of the pairs' dimensionality."""
    _check_pairs(images, masks, "train_segmenter")
    recipe = _recipe(images.ndim - 2)
    steps = int(recipe["steps"]) if steps is None else steps
    batch_size = int(recipe["batch_size"]) if batch_size is None else batch_size
    lr = float(recipe["lr"]) if lr is None else lr
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("train_segmenter: steps, batch_size and lr must be positive")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_segmenter(images.ndim - 2)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    n = images.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x, m = images[idx], masks[idx]
        x, m = _random_flip(x, m, gen)
        loss = _loss(model(x.to(device)), m.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def segment(model: nn.Module, images: Tensor, *, batch_size: int = 128) -> Tensor:
    """Foreground probabilities [N, 1, H, W] (or [N, 1, D, H, W]) on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    out = [torch.sigmoid(model(images[i:i + batch_size].to(device))).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros_like(images)


def dice_counts(pred: Tensor, truth: Tensor) -> np.ndarray:
    """Per image [N, 3]: |pred & truth|, |pred|, |truth| (binary masks [N, 1, ...])."""
    p, t = pred.flatten(1).bool(), truth.flatten(1).bool()
    return torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)], dim=1).double().numpy()


def _patient_counts(counts: np.ndarray, patients: Sequence[str]) -> np.ndarray:
    codes = patient_codes(patients)
    pooled = np.zeros((int(codes.max()) + 1, 3))
    np.add.at(pooled, codes, counts)
    return pooled


def patient_dice(counts: np.ndarray, weights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean Dice over lesion patients and ``dice_all`` over every patient, per row of
    ``weights`` ([B, P] patient multiplicities; None: each patient once) -> two [B] arrays.

    ``counts`` is per patient [P, 3] (`dice_counts` pooled by patient)."""
    inter, psum, tsum = counts[:, 0], counts[:, 1], counts[:, 2]
    w = np.ones((1, counts.shape[0])) if weights is None else weights
    lesion = tsum > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(lesion, 2.0 * inter / np.maximum(psum + tsum, 1.0), 0.0)
        d_all = np.where(lesion, d, (psum == 0).astype(np.float64))
        mean_lesion = (w @ (d * lesion)) / (w @ lesion.astype(np.float64))
        mean_all = (w @ d_all) / w.sum(axis=1)
    return mean_lesion, mean_all


def segmentation_utility(
    real_train: tuple[Tensor, Tensor],
    synthetic: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor, Sequence[str]],
    *,
    seeds: Sequence[int],
    device: torch.device,
    steps: int | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    show_progress: bool = False,
) -> dict[str, object]:
    """TSTR vs TRTR Dice on the real test pairs (module doc); a plain JSON-able dict."""
    _check_pairs(*real_train, "segmentation utility (real train)")
    _check_pairs(*synthetic, "segmentation utility (synthetic)")
    _check_pairs(test[0], test[1], "segmentation utility (real test)")
    if len(test[2]) != test[0].shape[0]:
        raise ValueError(f"segmentation utility: {len(test[2])} patient ids for "
                         f"{test[0].shape[0]} test images")
    if not seeds:
        raise ValueError("segmentation utility: pass at least one seed")
    dims = test[0].ndim - 2
    recipe = _recipe(dims)
    steps = int(recipe["steps"]) if steps is None else steps
    truth = test[1]
    if not bool(truth.any()):
        raise ValueError("segmentation utility: no lesion in any real test mask; Dice is "
                         "undefined (the test patients must include lesions)")
    probs: dict[str, list[Tensor]] = {"trtr": [], "tstr": []}
    per_seed: dict[str, list[dict[str, float]]] = {"trtr": [], "tstr": []}
    align = []
    bar = tqdm(total=2 * len(seeds), desc="segmentation utility", disable=not show_progress,
               leave=False)
    for seed in seeds:
        for arm, (x, m) in (("trtr", real_train), ("tstr", synthetic)):
            bar.update()
            model = train_segmenter(x, m, seed=int(seed), device=device, steps=steps)
            p = segment(model, test[0])
            probs[arm].append(p)
            dice, dice_all = patient_dice(_patient_counts(dice_counts(p > 0.5, truth), test[2]))
            per_seed[arm].append({"seed": int(seed), "dice": float(dice[0]),
                                  "dice_all": float(dice_all[0])})
            if arm == "trtr":
                # Pooled over every synthetic pair: a lesion the judge sees in an image whose
                # generated mask is empty counts against the alignment too.
                c = dice_counts(segment(model, synthetic[0]) > 0.5, synthetic[1]).sum(axis=0)
                align.append(float(2 * c[0] / (c[1] + c[2])) if c[1] + c[2] > 0
                             else float("nan"))
    bar.close()
    pooled = {arm: _patient_counts(dice_counts(torch.stack(ps).mean(0) > 0.5, truth), test[2])
              for arm, ps in probs.items()}
    n_pat = pooled["trtr"].shape[0]
    weights = bootstrap_counts(n_pat, n_boot, boot_seed).astype(np.float64)
    result: dict[str, object] = {}
    boot: dict[str, np.ndarray] = {}
    for arm, counts in pooled.items():
        dice, dice_all = patient_dice(counts)
        boot[arm], boot_all = patient_dice(counts, weights)
        result.update({f"{arm}_dice": float(dice[0]), f"{arm}_dice_ci": _ci(boot[arm]),
                       f"{arm}_dice_all": float(dice_all[0]), f"{arm}_dice_all_ci": _ci(boot_all)})
    trtr = float(result["trtr_dice"])  # type: ignore[arg-type]
    result["ratio"] = float(result["tstr_dice"]) / trtr if trtr > 0 else float("nan")  # type: ignore[arg-type]
    with np.errstate(invalid="ignore", divide="ignore"):
        result["ratio_ci"] = _ci(boot["tstr"] / boot["trtr"])
    result.update({
        "alignment_dice": float(np.nanmean(align)) if np.isfinite(align).any() else None,
        "per_seed": per_seed,
        "seeds": [int(s) for s in seeds],
        "steps": int(steps),
        "n_train": int(real_train[0].shape[0]),
        "n_synthetic": int(synthetic[0].shape[0]),
        "n_test": int(test[0].shape[0]),
        "n_test_patients": int(n_pat),
        "n_lesion_patients": int((pooled["trtr"][:, 2] > 0).sum()),
        "judge": f"MONAI UNet {'(16, 32, 64)' if dims == 2 else '3D (8, 16, 32)'}, BCE + soft "
                 f"Dice, {steps} steps of batch {recipe['batch_size']}",
    })
    return result
