"""Evaluation of a synthetic dataset: fidelity, utility (TSTR vs TRTR) and empirical privacy.

One module per question: ``features`` (no-download feature spaces), ``fidelity`` (does it look
real?), ``utility`` (does it train a good classifier?), ``attacks`` (does it leak its training
patients?). The public functions are re-exported here.
"""

from __future__ import annotations

from ldm_core.evaluation.attacks import (
    loss_bin_edges,
    membership_inference,
    merge_mia,
    merge_nn_audits,
    mia_from_histograms,
    nearest_neighbour_audit,
)
from ldm_core.evaluation.features import extract_features, feature_spaces, random_feature_extractor
from ldm_core.evaluation.fidelity import fid, fidelity_report, kid, prdc, ssim, ssim_diversity
from ldm_core.evaluation.utility import evaluate_utility, train_reference_classifier

__all__ = [
    "evaluate_utility",
    "extract_features",
    "feature_spaces",
    "fid",
    "fidelity_report",
    "kid",
    "loss_bin_edges",
    "membership_inference",
    "merge_mia",
    "merge_nn_audits",
    "mia_from_histograms",
    "nearest_neighbour_audit",
    "prdc",
    "random_feature_extractor",
    "ssim",
    "ssim_diversity",
    "train_reference_classifier",
]
