"""One tiny simulated federation end to end, through Flower's simulation runtime (Ray)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ldm_core.checkpoint import load_checkpoint
from server.acceptance import AcceptanceError
from server.evaluate import EvalOptions
from server.export import ExportError, export_run
from server.simulate import SimulationOptions, concurrent_sites, run_simulation


class _Kept(logging.Handler):
    """Keeps what Flower logs (its logger does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_tiny_federation_end_to_end_and_resume(tmp_path: Path, demo_manifest: Path) -> None:
    out = tmp_path / "run"
    opts = SimulationOptions(
        data=str(demo_manifest), sites=2, partition="site", epsilon=8.0, preset="tiny",
        image_size=16, out=out, device="cpu", show_progress=False,
        eval_options=EvalOptions(per_class=12, utility_seeds=(0,), utility_epochs=1),
        accept="tstr_auc>=0.995,epsilon<=8",  # a tiny model cannot meet the first
    )
    flower_log = _Kept()
    logging.getLogger("flwr").addHandler(flower_log)
    try:
        metrics = run_simulation(opts)
    finally:
        logging.getLogger("flwr").removeHandler(flower_log)
    # Flower's supported engine: no deprecation banner on every `fedldm simulate`.
    assert not [m for m in flower_log.messages if "deprecated" in m.lower()]

    tensors, meta = load_checkpoint(out / "checkpoints" / "final")
    assert set(tensors) == {"autoencoder", "denoiser"} and meta["stage"] == "done"
    assert meta["scale_factor"] > 0
    for k in (0, 1):
        ledger = json.loads((out / "ledgers" / f"site-{k}.json").read_text())
        phases = {e["phase"] for e in ledger["entries"]}
        assert phases == {"autoencoder", "latent-scale", "diffusion", "audit"}
    sites = metrics["privacy"]["sites"]
    assert set(sites) == {"site-0", "site-1"}
    for s in sites.values():
        assert 0 < s["epsilon"] <= s["budget_epsilon"] == 8.0 and s["delta"] == 1e-5
    assert [r["phase"] for r in metrics["rounds"]] == ["autoencoder", "diffusion"]
    for key in ("tstr_auc", "tstr_auc_ci", "trtr_auc", "trtr_auc_ci", "trs_auc", "ratio"):
        assert key in metrics["utility"], key
    for key in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert key in metrics["fidelity"], key
    for key in ("mia_auc", "mia_tpr_at_1pct_fpr", "memorized_fraction"):
        assert key in metrics["privacy"], key
    assert (out / "samples.png").stat().st_size > 0
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 4
    manifest = (out / "synthetic" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label" and len(manifest) == 1 + 12 * len(
        json.loads((out / "run.json").read_text())["config"]["class_names"])
    assert "Privacy" in (out / "synthetic" / "DATACARD.md").read_text()

    # Declared before training, judged after: NO-GO on the ratio, and export refuses it.
    assert json.loads((out / "run.json").read_text())["accept"] == opts.accept
    acc = metrics["acceptance"]
    assert acc["declared"] and not acc["go"] and acc["failed"] == ["tstr_auc>=0.995"]
    assert "NO-GO" in (out / "report.html").read_text()
    assert "**NO-GO**" in (out / "synthetic" / "DATACARD.md").read_text()
    with pytest.raises(ExportError, match="NO-GO"):
        export_run(out, tmp_path / "shared")
    # ... and the goalposts cannot move on resume.
    with pytest.raises(AcceptanceError, match="fixed before training"):
        run_simulation(SimulationOptions(**{**opts.__dict__, "accept": "ratio>=0.1"}))

    # Rerunning the same command resumes: training is done, nothing is charged again.
    ledger_before = (out / "sites" / "site-0" / "ledger.json").read_bytes()
    again = run_simulation(SimulationOptions(**{**opts.__dict__, "evaluate": False}))
    assert (out / "sites" / "site-0" / "ledger.json").read_bytes() == ledger_before
    assert len(again["rounds"]) == 2


def _manifest(root: Path, counts: dict[str, int]) -> Path:
    import numpy as np
    from PIL import Image

    rows = ["path,label,patient"]
    rng = np.random.default_rng(0)
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(
                root / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label},{label}-{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_a_test_split_without_a_class_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    from ldm_core.data import DataError

    manifest = _manifest(tmp_path / "data", {"common": 30, "rare": 1})
    out = tmp_path / "run"
    opts = SimulationOptions(data=str(manifest), sites=2, preset="tiny", image_size=16, out=out,
                             device="cpu", show_progress=False)
    with pytest.raises(DataError, match="rare"):
        run_simulation(opts)
    assert not out.exists()


def test_a_class_missing_from_every_test_split_is_refused_only_when_evaluating(
        tmp_path: Path, demo_manifest: Path) -> None:
    """Refused before anything is written (the evaluation would fail after all training); a
    training-only run (--no-evaluate) tests nothing, so it may go ahead."""
    from ldm_core.data import DataError, scan
    from server.simulate import plan_simulation

    lines = demo_manifest.read_text().splitlines()
    cyst = sorted({ln.split(",")[2] for ln in lines[1:] if ln.split(",")[1] == "cyst"})
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split(",")[1] != "cyst"
                         or ln.split(",")[2] == cyst[0]]  # one cyst patient: train only
    manifest = demo_manifest.parent / "one-cyst.csv"
    manifest.write_text("\n".join(kept) + "\n")
    assert "cyst" in scan(manifest).class_names

    def opts(out: Path, evaluate: bool) -> SimulationOptions:
        return SimulationOptions(data=str(manifest), sites=2, partition="iid", epsilon=8.0,
                                 preset="tiny", image_size=16, out=out, device="cpu",
                                 show_progress=False, evaluate=evaluate)

    with pytest.raises(DataError, match="class cyst"):
        plan_simulation(opts(tmp_path / "refused", True))
    assert not (tmp_path / "refused").exists()
    plan_simulation(opts(tmp_path / "training-only", False))
    assert (tmp_path / "training-only" / "run.json").exists()


@pytest.mark.slow
def test_a_tiny_3d_federation_on_demo3d_writes_nifti_volumes_and_slices(tmp_path: Path) -> None:
    """`--data demo3d`: phantom head volumes, a 3D run through the same federation, sampling,
    evaluation and report; the synthetic set is NIfTI on the grid's affine."""
    import nibabel as nib
    import numpy as np

    from ldm_core.phantoms3d import HEAD_EXTENT_MM
    from ldm_core.volumes import grid_affine

    out = tmp_path / "run3d"
    # twice the demo heads' own voxel size: every site trains on heads filling the centre
    # half of the grid (what the sites load is checked in tests/client); here the run's files
    voxel = 2 * HEAD_EXTENT_MM / 16
    metrics = run_simulation(SimulationOptions(
        data="demo3d", sites=2, epsilon=8.0, preset="tiny", image_size=16, out=out,
        device="cpu", show_progress=False, demo_patients=80,
        overrides={"model.voxel_mm": voxel},
        eval_options=EvalOptions(per_class=4, utility_seeds=(0,), utility_epochs=1)))
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["model"]["spatial_dims"] == 3 and cfg["ae_init"] == "random"
    assert (out / "demo3d-data" / "manifest.csv").exists()
    tensors, _ = load_checkpoint(out / "checkpoints" / "final")
    assert any(v.ndim == 5 for v in tensors["autoencoder"].values())  # Conv3d weights
    rows = (out / "synthetic" / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,label" and len(rows) == 1 + 4 * len(cfg["class_names"])
    first = nib.load(str(out / "synthetic" / rows[1].split(",")[0]))
    assert first.shape == (16, 16, 16)
    assert np.allclose(first.affine, grid_affine(16, voxel))
    assert np.allclose(np.diag(first.affine)[:3], voxel)
    for key in ("tstr_auc", "trtr_auc", "ratio"):
        assert key in metrics["utility"], key
    for key in ("fid", "precision", "recall"):
        assert key in metrics["fidelity"], key
    assert "mia_auc" in metrics["privacy"]
    assert (out / "samples.png").stat().st_size > 0
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 4
    card = (out / "synthetic" / "DATACARD.md").read_text()
    assert "nii.gz" in card and f"{voxel:g} mm isotropic voxels" in card
    # A deployment's evaluation (no real volume at the coordinator, utility measured at the
    # sites): the sample figure shows volumes as slices there too.
    from server.offline import evaluate_existing_run

    at_sites = evaluate_existing_run(out, audit=False, show_progress=False, options=EvalOptions(
        per_class=4, utility_seeds=(0,), utility_epochs=1, at_sites=True))
    assert at_sites["utility"]["measured_at"] == "sites"
    assert at_sites["utility"]["sites"] == ["site-0", "site-1"]
    assert "Measured at the sites" in (out / "report.html").read_text()
    # `fedldm augment` on volumes: NIfTI extras on the run's voxel grid, a 3D judge per arm.
    from server.augment import AugmentOptions, augment_run
    from server.offline import simulated_sites
    from server.run_folder import Run

    final_cfg = Run(out).load_final().cfg
    in_test = simulated_sites(Run(out)).load(final_cfg).test[1]  # type: ignore[union-attr]
    target = final_cfg.class_names[int(in_test[0])]
    aug = augment_run(out, AugmentOptions(class_name=target, count=4, out=tmp_path / "aug",
                                          seeds=(0,), epochs=1, show_progress=False))
    assert aug["target"] == target and aug["n_extra"] == 4
    extra = (tmp_path / "aug" / "synthetic" / "manifest.csv").read_text().splitlines()
    assert len(extra) == 5 and extra[1].split(",")[0].endswith(".nii.gz")
    assert np.allclose(nib.load(str(tmp_path / "aug" / "synthetic" / extra[1].split(",")[0])
                               ).affine, grid_affine(16, voxel))
    # `fedldm stress` on volumes: a 3D state dict built in the run's dimensionality, every
    # shift (the blur isotropic in 3D) scored; a 2D model is refused naming the volume batch.
    import torch

    from ldm_core.classifier import SmallCNN
    from ldm_core.evaluation.stress import Shift
    from server.stress import StressError, StressOptions, stress_run

    n_classes = len(cfg["class_names"])
    state = tmp_path / "judge3d.pt"
    torch.save(SmallCNN(n_classes, spatial_dims=3).state_dict(), state)
    stressed = stress_run(out, StressOptions(
        model=state, arch="smallcnn", per_class=2, guidance=(1.0,),
        shifts=(Shift("blur", 1.0), Shift("noise", 0.1)), out=tmp_path / "stress",
        show_progress=False))
    assert [r["name"] for r in stressed["rows"]][-2:] == ["blur 1", "noise 0.1"]
    assert all(r["n"] == 2 * n_classes for r in stressed["rows"])
    flat = tmp_path / "judge2d.pt"
    torch.save(SmallCNN(n_classes).state_dict(), flat)
    with pytest.raises(StressError, match=r"does not fit --arch smallcnn"):
        stress_run(out, StressOptions(model=flat, arch="smallcnn", out=tmp_path / "s2"))


def test_volume_data_make_a_3d_run_unless_the_user_says_otherwise(tmp_path: Path) -> None:
    from ldm_core.phantoms3d import generate_demo3d
    from server.simulate import with_volume_overrides

    assert with_volume_overrides("demo3d", None) == {"model.spatial_dims": 3}
    assert with_volume_overrides("demo", {"a.b": 1}) == {"a.b": 1}
    manifest = generate_demo3d(tmp_path, n_patients=6, size=16, seed=0)
    assert with_volume_overrides(str(manifest), {})["model.spatial_dims"] == 3
    assert with_volume_overrides(str(manifest), {"model.spatial_dims": 2}) == {
        "model.spatial_dims": 2}


def test_the_demo_starts_from_the_phantom_autoencoder_and_real_data_from_the_generic_one(
        ) -> None:
    from server.simulate import SimulationOptions, simulation_config

    assert simulation_config(SimulationOptions(data="demo")).ae_init == "public-phantoms"
    assert simulation_config(SimulationOptions(data="/data/mri")).ae_init == "public-generic"
    assert simulation_config(SimulationOptions(
        data="demo", overrides={"ae_init": "public-generic"})).ae_init == "public-generic"


@pytest.mark.parametrize(("sites", "cores", "expected"), [
    (3, 2, 3),    # one wave, each core shared 1.5x: a round takes 1.5x a site's time, not 2x
    (2, 2, 2), (1, 2, 1), (4, 2, 2), (5, 2, 2),
    (9, 2, 3),    # 3 waves x 1.5 < 5 waves x 1
    (20, 2, 2),   # more actors would shorten nothing and cost a worker's memory each
    (3, 16, 3), (3, 1, 1), (2, 1, 1),
])
def test_simulated_sites_train_at_once_when_that_shortens_a_round(sites: int, cores: int,
                                                                    expected: int) -> None:
    assert concurrent_sites(sites, cores) == expected


def test_the_simulation_gives_ray_that_many_actors(tmp_path: Path, demo_manifest: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """3 sites on 2 cores: Flower's Ray backend makes one actor per CPU it is told of."""
    import importlib

    # The module: `flwr.simulation.run_simulation` as an attribute is the function of that name.
    flwr_sim = importlib.import_module("flwr.simulation.run_simulation")
    seen: dict = {}

    class _Stop(Exception):
        pass

    def fake_engine(**kwargs: object) -> None:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(flwr_sim, "_run_simulation", fake_engine)
    monkeypatch.setattr("server.simulate.os.cpu_count", lambda: 2)
    opts = SimulationOptions(data=str(demo_manifest), sites=3, preset="tiny", image_size=16,
                             out=tmp_path / "run", device="cpu", show_progress=False,
                             evaluate=False)
    with pytest.raises(_Stop):
        run_simulation(opts)
    backend = seen["backend_config"]
    assert backend["init_args"]["num_cpus"] == 3
    assert backend["client_resources"]["num_cpus"] == 1
