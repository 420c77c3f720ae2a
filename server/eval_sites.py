"""The utility and recall step of a deployment's evaluation, measured at the sites.

Why: the coordinator of a hospital federation usually holds no labelled real images. It trains
the TSTR classifier on the synthetic set (post-processing of the DP generator), sends it with the
synthetic images to every site that allows evaluations, and pools the sites' DP count vectors
(client.site_eval; arithmetic and sensitivity in ldm_core.evaluation.site_eval). Everything here
is post-processing of DP releases, free in privacy.

What differs from the simulation's utility section, and the report says so: TRTR is each site's
own classifier trained with DP-SGD (a non-private one could not be scored without leaking its
training patients), so the ratio compares against a DP baseline; intervals are those of the DP
noise only; precision is not measured (its sensitivity to one patient is unbounded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from common.protocol import MAX_EVAL_SYNTHETIC
from ldm_core.evaluation.site_eval import ARMS, Layout, pool
from ldm_core.evaluation.utility import train_reference_classifier

SiteEvalFn = Callable[[dict[str, torch.Tensor], torch.Tensor], list[dict[str, Any]]]

TRTR_KIND = ("each site's own classifier, trained on its train split with DP-SGD "
             "(privacy.eval_trtr_*), scored on its test split")
NOT_RELEASED = ("precision is not measured at the sites: one real patient can decide whether "
                "many synthetic images lie inside the real manifold, so it has no bounded "
                "sensitivity to release with DP")


def accepted(results: Sequence[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """The releases whose layout matches this run's (a reply of another shape is dropped)."""
    return [r for r in results if "error" not in r and r.get("classes") == layout.n_classes
            and r.get("bins") == layout.bins and len(r.get("counts", ())) == layout.size]


def site_utility(results: Sequence[dict[str, Any]], layout: Layout, *, n_synthetic: int,
                 seed: int, epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json `utility` and `fidelity` blocks from the sites' releases; entries with an
    ``error`` (a site that refused or failed) are listed as missing."""
    good = accepted(results, layout)
    missing = [str(r.get("error")) for r in results if "error" in r] + [
        f"site {r.get('site')}: a release of another layout than this run's (dropped)"
        for r in results if "error" not in r and r not in good]
    if not good:
        raise ValueError("no site returned a usable evaluation release")
    p = pool([np.asarray(r["counts"], dtype=np.float64) for r in good],
             [float(r["noise_std"]) for r in good], layout, seed=seed)
    utility: dict[str, Any] = {}
    for arm in ARMS:
        for key in ("auc", "acc"):
            utility[f"{arm}_{key}"] = p[f"{arm}_{key}"]
            if f"{arm}_{key}_ci" in p:
                utility[f"{arm}_{key}_ci"] = p[f"{arm}_{key}_ci"]
    utility.update({
        "ratio": p["ratio"], "ratio_ci": p.get("ratio_ci"),
        "per_class": p["per_class_auc"], "n_synthetic": n_synthetic,
        "n_test_patients": int(round(max(0.0, float(p["patients"])))),
        "seeds": [seed], "epochs": epochs,
        "real_source": "the sites' own test patients (one DP release per site)",
        "measured_at": "sites", "sites": sorted(str(r["site"]) for r in good),
        "sites_missing": missing,
        "noise_std": p["noise_std"], "trtr_kind": TRTR_KIND,
    })
    fidelity = {"sites": {"recall": p["recall"], "recall_ci": p.get("recall_ci"),
                          "precision": math.nan, "note": NOT_RELEASED}}
    return utility, fidelity


def synthetic_for_sites(images: torch.Tensor, labels: torch.Tensor,
                        limit: int = MAX_EVAL_SYNTHETIC) -> torch.Tensor:
    """The synthetic images sent for recall: all of them, or an even share per class up to the
    protocol's limit."""
    if images.shape[0] <= limit:
        return images
    classes = labels.unique()
    per = limit // len(classes)
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in classes])
    return images[keep.sort().values]


def tstr_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, *, seed: int,
                    epochs: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The classifier the sites score: the utility judge's own recipe on the synthetic set."""
    model = train_reference_classifier((images, labels), n_classes=n_classes, seed=seed,
                                       epochs=epochs, device=device)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
