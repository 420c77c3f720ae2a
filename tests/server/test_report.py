"""Tests for server.report: a self-contained HTML report with plots and plain-language verdicts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from server.report import (
    closest_pairs_figure,
    epsilon_figure,
    image_grid_figure,
    roc_figure,
    score_histogram_figure,
    training_curves_figure,
    utility_bars_figure,
    verdicts,
    write_report,
)

CHROMIUM = Path("/usr/bin/chromium")


def _audit_site(auc: float, near_copy: float = 0.01) -> dict:
    """One site's entry of privacy.audit_sites (server.evaluate.summarise_audits layout)."""
    return {
        "attacks": {"denoiser": {"auc": auc, "tpr": 0.012, "fpr": 0.011},
                    "autoencoder": {"auc": 0.5, "tpr": 0.01, "fpr": 0.01}},
        "best_attack": "denoiser",
        "near_copy_fraction": near_copy,
        "near_copy_fraction_holdout": 0.01,
        "noise_std": 0.02,
        "records": 256,
        "epsilon": 0.3,
    }


def _site_diagnostics() -> dict:
    """What the report reads from a site-local diagnostics file (client.audit)."""
    fpr = np.r_[0.0, np.geomspace(1 / 300, 1, 60)]
    roc = {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist(), "auc": 0.55,
           "tpr_at_1pct_fpr": 0.1, "n_nonmembers": 300}
    hist = {"edges": np.linspace(0, 1, 11).tolist(), "members": [1] * 10,
            "nonmembers": [2] * 10, "samples": [3] * 10}
    return {a: {"roc": roc, "histogram": hist, "threshold": 0.1}
            for a in ("denoiser", "autoencoder")}


def _metrics(mia_auc: float = 0.52) -> dict:
    return {
        "run": {"name": "test-run", "preset": "quick", "sites": 2, "image_size": 32},
        "fidelity": {
            "random_cnn": {
                "fid": 12.3,
                "kid": 0.01,
                "kid_std": 0.002,
                "precision": 0.7,
                "recall": 0.6,
                "density": 0.9,
                "coverage": 0.8,
                "n_real": 200,
                "n_fake": 200,
                "real_split": {
                    "fid": 3.0,
                    "kid": 0.0,
                    "precision": 0.75,
                    "recall": 0.72,
                    "density": 1.0,
                    "coverage": 0.95,
                },
            },
            "diversity": {"real": {0: 0.21, 1: 0.25}, "synthetic": {0: 0.24, 1: 0.27}},
        },
        "utility": {
            "trtr_auc": 0.92,
            "trtr_auc_ci": [0.89, 0.95],
            "tstr_auc": 0.86,
            "tstr_auc_ci": [0.82, 0.9],
            "trs_auc": 0.93,
            "trs_auc_ci": [0.9, 0.96],
            "trtr_acc": 0.85,
            "trtr_acc_ci": [0.8, 0.9],
            "tstr_acc": 0.79,
            "tstr_acc_ci": [0.74, 0.84],
            "trs_acc": 0.86,
            "trs_acc_ci": [0.82, 0.9],
            "ratio": 0.86 / 0.92,
            "ratio_ci": [0.88, 0.98],
            "per_class": {"trtr": [0.92, 0.92], "tstr": [0.86, 0.86], "trs": [0.93, 0.93]},
            "per_seed": {},
            "n_train": 400,
            "n_synthetic": 400,
            "n_test": 100,
            "seeds": [0, 1, 2],
        },
        "privacy": {
            "sites": {
                "site-a": {"epsilon": 7.8, "delta": 1e-5, "budget_epsilon": 8.0},
                "site-b": {"epsilon": 7.9, "delta": 1e-5, "budget_epsilon": 8.0},
            },
            "disclosures": ["Latent scale factor: Gaussian mechanism, charged to the ledger."],
            "mia_auc": mia_auc,
            "mia_tpr_at_1pct_fpr": 0.012,
            "mia_fpr_at_threshold": 0.011,
            "mia_noise_std": 0.02,
            "memorized_fraction": 0.01,
            "memorized_fraction_holdout": 0.01,
            "audit_sites": {"site-a": _audit_site(mia_auc), "site-b": _audit_site(mia_auc)},
        },
    }


def _figures(metrics: dict) -> dict:
    rng = np.random.default_rng(0)
    imgs = {c: rng.uniform(-1, 1, (6, 1, 16, 16)) for c in ("healthy", "tumour")}
    training = [
        {"phase": ph, "round": r, "site": s, "loss": 1.0 / (r + 1) + i * 0.1}
        for ph in ("autoencoder", "diffusion")
        for r in range(4)
        for i, s in enumerate(("site-a", "site-b"))
    ]
    eps_rounds = [
        {"site": s, "phase": ph, "round": r, "epsilon": (k * 4 + r + 1) * 0.9 + i * 0.05}
        for k, ph in enumerate(("autoencoder", "diffusion"))
        for r in range(4)
        for i, s in enumerate(("site-a", "site-b"))
    ]
    pairs = [(rng.uniform(-1, 1, (16, 16)), rng.uniform(-1, 1, (1, 16, 16))) for _ in range(4)]
    return {
        "samples": image_grid_figure(imgs, "synthetic samples"),
        "training_curves": training_curves_figure(training),
        "epsilon": epsilon_figure(eps_rounds, budget=8.0),
        "utility": utility_bars_figure(metrics["utility"]),
        "roc": roc_figure({"site-a": _site_diagnostics()}, note="site-local"),
        "score_histograms": score_histogram_figure({"site-a": _site_diagnostics()}),
        "closest_pairs": closest_pairs_figure(pairs, distances=[0.1, 0.2, 0.3, 0.4]),
        "raw_array": rng.uniform(-1, 1, (32, 32)),
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    metrics = _metrics()
    return write_report(tmp_path_factory.mktemp("run"), metrics, _figures(metrics))


def test_figure_helpers_return_figures() -> None:
    metrics = _metrics()
    for fig in list(_figures(metrics).values())[:-1]:
        assert isinstance(fig, Figure)


def test_report_written_and_self_contained(report: Path) -> None:
    assert report.name == "report.html" and report.exists()
    text = report.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text):
        assert attr.startswith("data:image/png;base64,"), attr
    assert "<script" not in text.lower()
    assert text.count("data:image/png;base64,") == 8


def test_report_contains_every_section(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    for sid in (
        "verdict",
        "run",
        "samples",
        "fidelity",
        "utility",
        "privacy",
        "training",
        "other-figures",
        "method",
        "raw-metrics",
    ):
        assert f'<section id="{sid}">' in text, sid
    for phrase in (
        "TSTR",
        "Membership inference",
        "memorisation",
        "Where it falls short",
        "Latent scale factor",
    ):
        assert phrase.lower() in text.lower(), phrase


def test_verdicts_pass_on_good_run() -> None:
    rows = {aspect: status for aspect, status, _ in verdicts(_metrics())}
    assert rows["Membership inference"] == "PASS"
    assert rows["Formal privacy (DP)"] == "PASS"
    assert rows["Memorisation"] == "PASS"
    assert rows["Utility"] == "PASS"  # 0.935 >= 0.9
    assert rows["Fidelity"] == "PASS"
    assert all(len(r) == 3 and r[1] in {"PASS", "WEAK", "FAIL"} for r in verdicts(_metrics()))


def test_verdict_fail_on_strong_mia(tmp_path: Path) -> None:
    metrics = _metrics(mia_auc=0.9)
    rows = {aspect: (status, text) for aspect, status, text in verdicts(metrics)}
    assert rows["Membership inference"][0] == "FAIL"
    assert rows["Where it falls short"][0] == "FAIL"
    assert "attacker" in rows["Where it falls short"][1]  # says plainly what the FAIL means
    text = write_report(tmp_path, metrics, {}).read_text(encoding="utf-8")
    assert 'class="badge FAIL"' in text


def _recon(ssim: float | None) -> dict:
    return {"psnr_db": None if ssim is None else 24.0, "ssim": ssim, "patients": 900.0,
            "psnr_se_db": 0.2, "ssim_se": 0.004, "released": "DP Gaussian",
            "sites": {"site-0": {"psnr_db": 23.5, "ssim": ssim, "patients": 300.0}}}


def test_reconstruction_shown_before_the_synthetic_measures(tmp_path: Path) -> None:
    metrics = {**_metrics(), "reconstruction": _recon(0.2)}
    text = write_report(tmp_path, metrics, {}).read_text(encoding="utf-8")
    assert "Autoencoder reconstruction" in text and "site-0" in text
    assert text.index("Autoencoder reconstruction") < text.index("FID/KID")
    short = dict((a, t) for a, _, t in verdicts(metrics))["Where it falls short"]
    assert "autoencoder" in short and "0.20" in short


def _audit(**privacy: object) -> dict:
    """A metrics change that overrides DP audit values in the privacy block."""
    return {"privacy": {**_metrics()["privacy"], **privacy}}


@pytest.mark.parametrize(
    "change,aspect,status",
    [
        ({"utility": {"ratio": 0.6, "tstr_auc": 0.55, "trtr_auc": 0.92}}, "Utility", "FAIL"),
        ({"utility": {"ratio": 0.8, "tstr_auc": 0.74, "trtr_auc": 0.92}}, "Utility", "WEAK"),
        (_audit(memorized_fraction=0.4), "Memorisation", "FAIL"),
        (_audit(memorized_fraction=0.06), "Memorisation", "WEAK"),
        (_audit(memorized_fraction=0.0, memorized_fraction_holdout=0.03), "Memorisation",
         "PASS"),
        # a near-copy excess inside the DP noise is not a finding
        (_audit(memorized_fraction=0.2, mia_noise_std=0.5), "Memorisation", "PASS"),
        (
            {"privacy": {"sites": {"a": {"epsilon": 9.0, "budget_epsilon": 8.0}}}},
            "Formal privacy (DP)",
            "FAIL",
        ),
        (
            {
                "privacy": {
                    "sites": {"a": {"epsilon": float("inf"), "budget_epsilon": float("inf")}}
                }
            },
            "Formal privacy (DP)",
            "FAIL",
        ),
        # rounds without a sites table: no producer writes that, it is "not reported"
        (
            {
                "privacy": {
                    "rounds": [{"site": "a", "phase": "ae", "round": 0, "epsilon": 2.0}],
                    "budget_epsilon": 8.0,
                }
            },
            "Formal privacy (DP)",
            "FAIL",
        ),
        (
            {"privacy": {"sites": {"a": {"epsilon": 2.0, "delta": 1e-5, "budget_epsilon": 8.0}}}},
            "Formal privacy (DP)",
            "PASS",
        ),
        # a budget written as "inf" by the JSON writer still reads as a number
        (
            {"privacy": {"sites": {"a": {"epsilon": 2.0, "budget_epsilon": "inf"}}}},
            "Formal privacy (DP)",
            "PASS",
        ),
        (_audit(mia_auc=0.65), "Membership inference", "WEAK"),
        (_audit(mia_auc=0.75), "Membership inference", "FAIL"),
        # a low AUC under enormous DP noise cannot pass
        (_audit(mia_auc=0.5, mia_noise_std=0.5), "Membership inference", "WEAK"),
        (_audit(mia_auc=None), "Membership inference", "FAIL"),
        ({"reconstruction": _recon(0.82)}, "Autoencoder", "PASS"),
        ({"reconstruction": _recon(0.55)}, "Autoencoder", "WEAK"),
        ({"reconstruction": _recon(0.2)}, "Autoencoder", "FAIL"),
        ({"reconstruction": _recon(None)}, "Autoencoder", "WEAK"),  # swamped by noise
    ],
)
def test_verdict_thresholds(change: dict, aspect: str, status: str) -> None:
    metrics = {**_metrics(), **change}
    rows = {a: s for a, s, _ in verdicts(metrics)}
    assert rows[aspect] == status


def test_a_clamped_latent_scale_release_gets_a_verdict_row_and_a_good_one_none() -> None:
    from ldm_core.privacy import pooled_scale_factor

    good = {aspect for aspect, _, _ in verdicts(_metrics())}
    assert "Latent scale" not in good
    scale, note = pooled_scale_factor([(2000.0, 100.0), (-50.0, 110.0)], clip=2.0)
    rows = {a: (s, t) for a, s, t in verdicts(
        {**_metrics(), "latent_scale": {"scale_factor": scale, "note": note}})}
    status, text = rows["Latent scale"]
    assert status == "WEAK" and "clamp" in text and "privacy.scale_clip" in text
    assert "mis-scaled latents" in rows["Where it falls short"][1]


def test_missing_blocks_are_reported_not_crashing(tmp_path: Path) -> None:
    path = write_report(tmp_path / "empty-run", {}, {})
    text = path.read_text(encoding="utf-8")
    assert "Not measured" in text
    assert {s for _, s, _ in verdicts({})} == {"FAIL"}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={out}",
        "--window-size=1200,3000",
        report.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert out.exists(), "chromium wrote no screenshot"
    shot = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert shot.shape[0] >= 1000 and shot.std() > 5.0  # not blank
    if os.environ.get("FEDLDM_KEEP_SCREENSHOT"):  # for a human look at the rendering
        shutil.copy(out, os.environ["FEDLDM_KEEP_SCREENSHOT"])


def test_audit_wording_states_noise_and_lower_bounds(report: Path) -> None:
    text = report.read_text(encoding="utf-8").lower()
    assert "lower bound" in text
    assert "noise" in text and "0.02" in text  # the DP noise std of the released values
    assert "low fidelity" in text  # near copies at chance are explained, not celebrated
    assert "pooled" not in text and "0.1% fpr" not in text


def test_roc_figure_uses_log_fpr_reaching_below_one_percent() -> None:
    fig = roc_figure({"site-a": _site_diagnostics(), "site-b": _site_diagnostics()}, note="x")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] < 0.01


def test_summarise_audits_means_best_attack_and_renormalises() -> None:
    from ldm_core.evaluation import AUDIT_RELEASE_KEYS
    from server.evaluate import summarise_audits

    def release(site: str, den_auc: float, nc: float) -> dict:
        r = dict.fromkeys(AUDIT_RELEASE_KEYS, 0.0)
        r.update({"site": site, "denoiser.auc": den_auc, "denoiser.tpr": 0.3,
                  "denoiser.fpr": 0.01, "autoencoder.auc": 0.5, "near_copy_fraction": nc,
                  "near_copy_fraction_holdout": 0.02, "members_fraction": 1.0,
                  "nonmembers_fraction": 1.0, "records": 256.0, "noise_std": 0.05,
                  "epsilon": 0.4})
        return r

    out = summarise_audits([release("a", 0.9, 0.1), release("b", 0.7, 0.0)])
    assert out["mia_auc"] == pytest.approx(0.8)
    assert out["mia_tpr_at_1pct_fpr"] == pytest.approx(0.3)
    assert out["mia_fpr_at_threshold"] == pytest.approx(0.01)
    assert out["mia_noise_std"] == 0.05
    assert out["memorized_fraction"] == pytest.approx(0.05)
    assert set(out["audit_sites"]) == {"a", "b"}
    assert out["audit_sites"]["a"]["attacks"]["denoiser"]["auc"] == pytest.approx(0.9)
    for dropped in ("mia_tpr_at_0_1pct_fpr", "memorized_fraction_pixel"):
        assert dropped not in out
    bad = release("a", 0.5, 0.0)
    del bad["site"]
    with pytest.raises(ValueError, match="site"):
        summarise_audits([bad])


def test_datacard_states_audit_noise_and_limits(tmp_path: Path) -> None:
    from ldm_core.config import build_config
    from server.datacard import write_datacard

    cfg = build_config(preset="tiny", image_size=16, class_names=("a", "b"), epsilon=8.0)
    card = write_datacard(tmp_path / "DATACARD.md", _metrics(), cfg).read_text()
    assert "lower bounds on leakage" in card
    assert "std 0.020" in card
    assert "low fidelity" in card  # 0.01 near copies = the holdout's 0.01
    assert "Released" not in card
    empty = write_datacard(tmp_path / "EMPTY.md", {"privacy": {}}, cfg).read_text()
    assert "not measured" in empty
    averaged = write_datacard(tmp_path / "AVG.md", {
        **_metrics(), "meta": {"diffusion_released": "mean of rounds 2-5"}}, cfg).read_text()
    assert "Released diffusion model: mean of rounds 2-5 (the average" in averaged


def test_federation_metrics_round_trip_keeps_every_key() -> None:
    """The coordinator's typed metrics write exactly what they read, unknown blocks included
    (a resumed run must not drop the evaluation's blocks or a newer version's keys)."""
    from server.run_metrics import FederationMetrics

    doc = {
        "config": {"preset": "tiny"},
        "training": [{"phase": "autoencoder", "round": 1, "site": "site-0", "loss": 0.5,
                      "epsilon": 1.5}],
        "rounds": [{"phase": "autoencoder", "round": 1, "loss": 0.5, "sites_ok": 2,
                    "sites_failed": 1, "aggregation": "mean", "seconds": 1.25}],
        "privacy": {"sites": {"site-0": {"epsilon": 1.5, "delta": 1e-5, "budget_epsilon": 8.0,
                                         "flags": ["latent scale: over budget"]}},
                    "rounds": [{"site": "site-0", "phase": "autoencoder", "round": 1,
                                "epsilon": 1.5}],
                    "private": True, "summary": {"max_epsilon": 1.5,
                                                 "all_within_budget": True}},
        "meta": {"sites_connected": 3},
        "errors": [{"stage": "autoencoder round 1", "node": 103, "reason": "NaN weights"}],
        "latent_scale": {"scale_factor": 0.6, "released": "DP Gaussian", "note": None},
        "reconstruction": {"psnr_db": 24.0, "ssim": 0.8, "patients": 900.0,
                           "psnr_se_db": 0.2, "ssim_se": 0.004, "released": "DP Gaussian",
                           "sites": {"site-0": {"psnr_db": 23.5, "ssim": 0.79}}},
        "utility": {"ratio": 0.8}, "a-newer-key": [1, 2],
    }
    assert FederationMetrics.from_json(doc).to_json() == doc


def test_datacard_says_a_frozen_prior_was_not_trained_on_the_sites(tmp_path: Path) -> None:
    """A prior kept as it is (0 rounds) must not be described as fine-tuned on patient data."""
    from ldm_core.config import build_config
    from server.datacard import write_datacard

    for rounds, said, unsaid in ((0, "not trained on the sites' data", "fine-tuned"),
                                 (1, "then fine-tuned on the sites' data", "not trained")):
        cfg = build_config(preset="quick", class_names=("a", "b"),
                           overrides={"autoencoder.rounds": rounds})
        card = write_datacard(tmp_path / f"C{rounds}.md", _metrics(), cfg).read_text()
        line = next(x for x in card.splitlines() if x.startswith("- Starting weights"))
        auto, den = line.split("; denoiser ")
        assert said in auto and unsaid not in auto
        assert den.startswith("random initialisation")


def test_the_code_that_trained_a_run_is_named_in_order_or_said_missing() -> None:
    from server.datacard import code_note

    assert code_note({"code": ["fedldm 0.1.0, commit a", "fedldm 0.1.0, commit b"]}) == \
        "fedldm 0.1.0, commit a, then fedldm 0.1.0, commit b"
    for meta in (None, {}, {"code": []}):
        assert code_note(meta).startswith("not recorded")
