"""Tests for ldm_core.evaluation: fidelity metrics, utility arms and privacy audits.

Golden behaviours: identical sets score perfectly, disjoint sets score badly, and a synthetic
set of copies gives a TSTR/TRTR ratio of one; the attacks have their own test file. Images are
16 px so the file runs in seconds on one core.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ldm_core.evaluation import (
    AUDIT_RELEASE_KEYS,
    evaluate_utility,
    exact_roc,
    extract_features,
    feature_spaces,
    fid,
    fidelity_report,
    kid,
    prdc,
    random_feature_extractor,
    ssim,
    ssim_diversity,
    train_reference_classifier,
)
from ldm_core.evaluation.utility import weighted_ovr_auc


def _stripes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable classes: horizontal (0) vs vertical (1) stripes with random phase + noise.

    Orientation survives the classifier's flip/shift augmentation, unlike left/right blobs.
    """
    y = torch.arange(n) % 2
    phase = torch.rand(n, generator=gen) * 6.283
    coord = torch.arange(16).float() * 1.2
    h = torch.sin(coord[None, :, None] + phase[:, None, None]).expand(n, 16, 16)
    v = torch.sin(coord[None, None, :] + phase[:, None, None]).expand(n, 16, 16)
    x = torch.where(y[:, None, None] == 0, h, v) * 0.6
    x = x + 0.3 * torch.randn(n, 16, 16, generator=gen)
    return x.clamp(-1, 1)[:, None].float(), y.long()


@pytest.fixture(scope="module")
def toy() -> dict:
    gen = torch.Generator().manual_seed(0)
    train = _stripes(64, gen)
    test_x, test_y = _stripes(96, gen)
    pids = [f"p{i // 2}" for i in range(96)]  # two slices per patient
    return {"train": train, "test": (test_x, test_y, pids)}


# ----------------------------------------------------------------------------- features
def test_random_extractor_is_seeded_and_batch_invariant() -> None:
    x = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = extract_features(random_feature_extractor(seed=3), x)
    b = extract_features(random_feature_extractor(seed=3), x, batch_size=3)
    c = extract_features(random_feature_extractor(seed=4), x)
    assert a.shape == (10, 256) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c)
    model = random_feature_extractor()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "bad", [torch.zeros(4, 16, 16), torch.zeros(4, 1, 16, 16, dtype=torch.int64)]
)
def test_extract_features_rejects_bad_images(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images"):
        extract_features(random_feature_extractor(), bad)


def test_random_extractor_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="width"):
        random_feature_extractor(width=0)


# ------------------------------------------------------------------------------ fidelity
def test_identical_sets_score_perfectly() -> None:
    a = np.random.default_rng(0).normal(size=(200, 16))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    scores = prdc(a, a, k=5)
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(6 / 5)  # each ball holds itself + k neighbours


def test_disjoint_sets_score_badly() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 20.0
    assert fid(a, b) > 1000
    scores = prdc(a, b, k=5)
    assert scores["precision"] == 0.0 and scores["recall"] == 0.0
    assert scores["density"] == 0.0 and scores["coverage"] == 0.0
    assert kid(a, b)[0] > 1.0


def test_fid_singular_covariance_and_small_n() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))  # N < D: singular covariances
    value = fid(a, b)
    assert np.isfinite(value) and value > 0


def test_kid_near_zero_for_same_distribution() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    mean, std = kid(a, b, subsets=10, subset_size=100, seed=0)
    assert abs(mean) < 0.02 and std >= 0
    assert kid(a, b, seed=5) == kid(a, b, seed=5)  # seeded


@pytest.mark.parametrize(
    "a,b,msg",
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "widths"),
        (np.zeros(5), np.zeros((5, 4)), "2-D"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "at least"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
    ],
)
def test_fidelity_metrics_reject_bad_input(a: np.ndarray, b: np.ndarray, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        fid(a, b)


def test_ssim_identical_is_one_and_noise_is_low() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=gen) * 2 - 1
    y = torch.rand(6, 1, 16, 16, generator=gen) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(6))
    assert float(ssim(x, y).mean()) < 0.2
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(x, y[:3])


def test_ssim_of_volumes_constant_in_depth_equals_ssim_of_their_slice() -> None:
    """The 3D SSIM (cubic window) reduces to the 2D one when nothing changes along depth."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 1, 16, 16, generator=gen)).clamp(-1, 1)
    depth = (3, 1, 16, 16, 16)
    three = ssim(x[:, :, None].expand(depth), y[:, :, None].expand(depth))
    torch.testing.assert_close(three, ssim(x, y))
    assert float(three.max()) < 0.95
    with pytest.raises(ValueError, match="volumes"):
        ssim(x[0], y[0])


def test_ssim_diversity_per_class() -> None:
    gen = torch.Generator().manual_seed(0)
    copies = (torch.rand(1, 1, 16, 16, generator=gen) * 2 - 1).repeat(8, 1, 1, 1)
    noise = torch.rand(8, 1, 16, 16, generator=gen) * 2 - 1
    images = torch.cat([copies, noise, noise[:1]])
    labels = torch.tensor([0] * 8 + [1] * 8 + [2])
    div = ssim_diversity(images, labels, pairs=10, seed=0)
    assert set(div) == {0, 1}  # class 2 has one image: no pair, left out
    assert div[0] == pytest.approx(1.0, abs=1e-5)
    assert div[1] < 0.2


def test_fidelity_report_structure(toy: dict) -> None:
    real_x, real_y = toy["train"]
    fake_x, fake_y = _stripes(40, torch.Generator().manual_seed(9))
    report = fidelity_report(
        real_x, real_y, fake_x, fake_y, extractors=feature_spaces(seed=0), seed=0
    )
    assert set(report) == {"random_cnn", "diversity"}
    block = report["random_cnn"]
    for key in ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert np.isfinite(block[key]), key
    assert set(block["real_split"]) >= {"fid", "precision", "recall"}
    assert set(report["diversity"]) == {"real", "synthetic"}
    assert set(report["diversity"]["synthetic"]) == {0, 1}
    with pytest.raises(ValueError, match="extractors"):
        fidelity_report(real_x, real_y, fake_x, fake_y, extractors={})


# ------------------------------------------------------------------------------- attacks
# The privacy audits are tested in tests/ldm_core/test_attacks.py (exact ROC, near copies, the DP
# release and its sensitivity) and tests/client/test_audit.py (the site-side audit end to end).
def test_attack_api_is_reexported() -> None:
    assert "denoiser.auc" in AUDIT_RELEASE_KEYS and "near_copy_fraction" in AUDIT_RELEASE_KEYS
    assert exact_roc([0.0], [1.0])["auc"] == 1.0


# ------------------------------------------------------------------------------- utility
def test_weighted_ovr_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.normal(size=200) + y, 1)  # with ties
    w = rng.integers(0, 3, size=(3, 200)).astype(float)
    expected = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(weighted_ovr_auc(y, s, w), expected, atol=1e-12)


def test_utility_copies_give_ratio_one(toy: dict) -> None:
    ref = train_reference_classifier(toy["train"], n_classes=2, seed=0, epochs=3)
    lines: list[str] = []
    res = evaluate_utility(
        toy["train"],
        toy["train"],
        toy["test"],
        n_classes=2,
        seeds=(0, 1),
        epochs=3,
        reference_model=ref,
        progress=lines.append,
        n_boot=200,
    )
    assert res["trtr_auc"] > 0.95
    assert res["ratio"] == pytest.approx(1.0, abs=0.05)
    for arm in ("trtr", "tstr", "trs"):
        lo, hi = res[f"{arm}_auc_ci"]
        assert 0.0 <= lo <= hi <= 1.0
        assert len(res["per_class"][arm]) == 2 and len(res["per_seed"][arm]) == 2
        assert f"{arm}_acc" in res and f"{arm}_acc_ci" in res
    assert res["n_train"] == 64 and res["n_test"] == 96 and res["n_test_patients"] == 48
    assert res["seeds"] == [0, 1] and len(lines) == 6
    # the reference model is the seed-0 TRTR model, so its own AUC is the seed-0 TRTR AUC
    from ldm_core.classifier import macro_auc, predict_proba

    own = macro_auc(toy["test"][1].numpy(), predict_proba(ref, toy["test"][0]))
    assert res["per_seed"]["trtr"][0]["auc"] == pytest.approx(own)
    assert "classifier" in feature_spaces(classifier=ref)


def test_utility_noise_synthetic_is_chance(toy: dict) -> None:
    gen = torch.Generator().manual_seed(3)
    noise = (
        torch.rand(64, 1, 16, 16, generator=gen) * 2 - 1,
        torch.randint(0, 2, (64,), generator=gen),
    )
    res = evaluate_utility(
        toy["train"], noise, toy["test"], n_classes=2, seeds=(0, 1), epochs=3, n_boot=200
    )
    assert res["trtr_auc"] > 0.95
    # a classifier fit to noise labels guesses: accuracy at chance; its ranking of the
    # structured test images is arbitrary (AUC seen anywhere in 0.44-0.73 over noise seeds), but
    # always far from what real training data gives
    assert res["tstr_acc"] == pytest.approx(0.5, abs=0.1)
    assert res["ratio"] < 0.8


def test_utility_rejects_missing_classes(toy: dict) -> None:
    x, y, pids = toy["test"]
    only_zero = (x[y == 0], y[y == 0], [p for p, c in zip(pids, y.tolist(), strict=True) if c == 0])
    with pytest.raises(ValueError, match="lacks classes"):
        evaluate_utility(toy["train"], toy["train"], only_zero, n_classes=2, seeds=(0,))
    train_x, train_y = toy["train"]
    syn = (train_x[train_y == 0], train_y[train_y == 0])
    with pytest.raises(ValueError, match="no images of class 1"):
        evaluate_utility(toy["train"], syn, toy["test"], n_classes=2, seeds=(0,), epochs=1)
    with pytest.raises(ValueError, match="patient_ids"):
        evaluate_utility(toy["train"], toy["train"], (x, y, pids[:3]), n_classes=2)
