"""Evaluation of a synthetic dataset: fidelity, utility (TSTR vs TRTR) and empirical privacy.

One module per question: ``features`` (no-download feature spaces), ``fidelity`` (does it look
real?), ``utility`` (does it train a good classifier?), ``attacks`` (does it leak its training
patients?). The public functions are re-exported here.
"""

from __future__ import annotations

from ldm_core.evaluation.attacks import (
    ATTACKS,
    AUDIT_RELEASE_KEYS,
    audit_estimates,
    exact_roc,
    near_copy_test,
)
from ldm_core.evaluation.features import extract_features, feature_spaces, random_feature_extractor
from ldm_core.evaluation.fidelity import fid, fidelity_report, kid, prdc, ssim, ssim_diversity
from ldm_core.evaluation.utility import evaluate_utility, train_reference_classifier

__all__ = [
    "ATTACKS",
    "AUDIT_RELEASE_KEYS",
    "audit_estimates",
    "evaluate_utility",
    "exact_roc",
    "extract_features",
    "feature_spaces",
    "fid",
    "fidelity_report",
    "kid",
    "near_copy_test",
    "prdc",
    "random_feature_extractor",
    "ssim",
    "ssim_diversity",
    "train_reference_classifier",
]
