"""A paired (image + mask) simulated federation end to end: the masks train with the images
under the same DP-SGD, the synthetic set is exported as aligned pairs, and the evaluation
reports segmentation Dice TSTR/TRTR next to the classification utility."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_core.checkpoint import load_checkpoint
from server.evaluate import EvalOptions
from server.simulate import SimulationOptions, run_simulation, summary_lines


@pytest.mark.slow
def test_paired_simulation_exports_aligned_pairs_and_reports_dice(
        tmp_path: Path, demo_manifest: Path) -> None:
    out = tmp_path / "run"
    metrics = run_simulation(SimulationOptions(
        data=str(demo_manifest), sites=2, partition="site", epsilon=8.0, preset="tiny",
        image_size=16, out=out, device="cpu", show_progress=False,
        overrides={"model.mask_channels": 1},
        eval_options=EvalOptions(per_class=12, utility_seeds=(0,), utility_epochs=1)))

    tensors, _ = load_checkpoint(out / "checkpoints" / "final")
    assert tensors["autoencoder"]["encoder.blocks.0.conv.weight"].shape[1] == 2
    for k in (0, 1):  # the masks trained under the same accounting, audits included
        ledger = json.loads((out / "ledgers" / f"site-{k}.json").read_text())
        assert {e["phase"] for e in ledger["entries"]} == {
            "autoencoder", "latent-scale", "diffusion", "audit"}

    with open(out / "synthetic" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 * 4 and set(rows[0]) == {"path", "label", "mask"}
    for row in rows[:10]:
        image = np.asarray(Image.open(out / "synthetic" / row["path"]))
        mask = np.asarray(Image.open(out / "synthetic" / row["mask"]))
        assert mask.shape == image.shape == (16, 16)
        assert set(np.unique(mask)) <= {0, 255}

    seg = metrics["utility"]["segmentation"]
    for key in ("tstr_dice", "tstr_dice_ci", "trtr_dice", "trtr_dice_ci", "ratio", "ratio_ci",
                "alignment_dice", "n_test_patients", "n_lesion_patients"):
        assert key in seg, key
    assert 0.0 <= seg["tstr_dice"] <= 1.0 and 0.0 <= seg["trtr_dice"] <= 1.0
    assert seg["n_lesion_patients"] > 0
    assert "tstr_auc" in metrics["utility"] and "fid" in metrics["fidelity"]
    report = (out / "report.html").read_text()
    assert "Segmentation (paired image/mask generation)" in report
    utility = report[report.index('<section id="utility">'):report.index('<section id="privacy">')]
    assert 'alt="segmentation pairs"' in utility  # real vs synthetic pairs, mask outlines
    card = (out / "synthetic" / "DATACARD.md").read_text()
    assert "Segmentation utility" in card and "masks/<class>/" in card
    assert any(line.startswith("segmentation    Dice TSTR")
               for line in summary_lines(metrics, out))


@pytest.mark.slow
def test_a_paired_3d_run_exports_aligned_nifti_pairs_and_reports_dice(tmp_path: Path) -> None:
    """`--data demo3d --set model.mask_channels=1`: the phantoms' lesion masks train with the
    volumes, and every synthetic volume leaves with its mask on the same NIfTI grid."""
    import nibabel as nib

    out = tmp_path / "run3d"
    metrics = run_simulation(SimulationOptions(
        data="demo3d", sites=2, epsilon=8.0, preset="tiny", image_size=16, out=out,
        device="cpu", show_progress=False, demo_patients=80,
        overrides={"model.mask_channels": 1},
        eval_options=EvalOptions(per_class=4, utility_seeds=(0,), utility_epochs=1)))
    tensors, _ = load_checkpoint(out / "checkpoints" / "final")
    assert tensors["autoencoder"]["encoder.blocks.0.conv.weight"].shape[1] == 2
    assert tensors["autoencoder"]["encoder.blocks.0.conv.weight"].ndim == 5
    with open(out / "synthetic" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"path", "label", "mask"}
    for row in rows[:4]:
        image = nib.load(str(out / "synthetic" / row["path"]))
        mask = nib.load(str(out / "synthetic" / row["mask"]))
        assert image.shape == mask.shape == (16, 16, 16)
        assert np.allclose(image.affine, mask.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0.0, 255.0}
    seg = metrics["utility"]["segmentation"]
    assert "not_measured" not in seg, seg
    assert 0.0 <= seg["tstr_dice"] <= 1.0 and 0.0 <= seg["trtr_dice"] <= 1.0
    assert "masks/<class>/syn_NNNNNN.nii.gz" in (out / "synthetic" / "DATACARD.md").read_text()
    report = (out / "report.html").read_text()
    assert 'alt="segmentation pairs"' in report
