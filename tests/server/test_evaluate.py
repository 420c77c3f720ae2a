"""`fedldm evaluate RUN` end to end on a tiny simulated run: what it writes, and that it reads
the final checkpoint once and each site's data once at the coordinator."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import client.tasks
import server.real_data
import server.run_folder
from server.evaluate import EvalOptions
from server.offline import evaluate_existing_run
from server.run_folder import Run, RunInfo
from server.simulate import SimulationOptions, run_simulation


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> Path:
    """A finished tiny simulation, not evaluated (the evaluation is what these tests run)."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    run_simulation(SimulationOptions(
        data=str(demo_manifest), sites=2, partition="site", epsilon=8.0, preset="tiny",
        image_size=16, out=out, device="cpu", show_progress=False, evaluate=False))
    return out


@pytest.mark.slow
def test_evaluate_existing_run_loads_once_and_writes_everything(
        trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint_loads: list[Path] = []
    real_load_checkpoint = server.run_folder.load_checkpoint

    def counting_load_checkpoint(path: Path, *args: Any, **kwargs: Any) -> Any:
        checkpoint_loads.append(Path(path))
        return real_load_checkpoint(path, *args, **kwargs)

    data_loads: Counter[str] = Counter()
    real_load_data = client.tasks.load_data

    def counting_load_data(site: Any, cfg: Any) -> Any:
        data_loads[site.site_id] += 1
        return real_load_data(site, cfg)

    monkeypatch.setattr(server.run_folder, "load_checkpoint", counting_load_checkpoint)
    monkeypatch.setattr(client.tasks, "load_data", counting_load_data)

    metrics = evaluate_existing_run(
        trained_run, audit=False, show_progress=False,
        options=EvalOptions(per_class=12, utility_seeds=(0,), utility_epochs=1))

    assert checkpoint_loads == [trained_run / "checkpoints" / "final"]
    assert data_loads == {"site-0": 1, "site-1": 1}
    run = Run(trained_run)
    assert json.loads(run.metrics_path.read_text()) == json.loads(json.dumps(metrics))
    for key in ("tstr_auc", "trtr_auc", "trs_auc", "ratio", "real_source"):
        assert key in metrics["utility"], key
    for key in ("fid", "precision", "recall", "primary_space", "random_cnn"):
        assert key in metrics["fidelity"], key
    assert metrics["synthetic"]["n"] == 12 * len(metrics["run"]["classes"].split(", "))
    assert run.samples_png.stat().st_size > 0
    assert "Unit of privacy" in run.report_html.read_text()
    assert "Empirical privacy audit: not measured" in run.datacard.read_text()
    assert (run.synthetic / "manifest.csv").exists()


@pytest.mark.slow
def test_evaluate_with_audit_reads_checkpoint_once(trained_run: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The sites' DP audits get the already loaded model and, in a simulation, the already
    loaded site data (touched only after the audit's charge): one read of each, in all."""
    checkpoint_loads: list[Path] = []
    real_load_checkpoint = server.run_folder.load_checkpoint
    monkeypatch.setattr(server.run_folder, "load_checkpoint",
                        lambda p, *a, **k: checkpoint_loads.append(Path(p))
                        or real_load_checkpoint(p, *a, **k))
    coordinator_loads: Counter[str] = Counter()
    real_site_data = server.real_data.SimulatedSites.site_data

    def counting_site_data(self: Any, index: int, cfg: Any) -> Any:
        if index not in self._data:
            coordinator_loads[f"site-{index}"] += 1
        return real_site_data(self, index, cfg)

    monkeypatch.setattr(server.real_data.SimulatedSites, "site_data", counting_site_data)
    all_loads: Counter[str] = Counter()
    real_load_data = client.tasks.load_data

    def counting_load_data(site: Any, cfg: Any) -> Any:
        all_loads[site.site_id] += 1
        return real_load_data(site, cfg)

    monkeypatch.setattr(client.tasks, "load_data", counting_load_data)

    metrics = evaluate_existing_run(
        trained_run, audit=True, show_progress=False,
        options=EvalOptions(per_class=12, utility_seeds=(0,), utility_epochs=1))

    assert len(checkpoint_loads) == 1
    assert coordinator_loads == {"site-0": 1, "site-1": 1}
    assert all_loads == {"site-0": 1, "site-1": 1}
    priv = metrics["privacy"]
    for key in ("mia_auc", "mia_noise_std", "memorized_fraction", "audit_sites", "unit",
                "randomness", "disclosures"):
        assert key in priv, key
    assert all(s.get("epsilon_includes_audit") for s in priv["sites"].values())
    assert "lower bounds on leakage" in Run(trained_run).datacard.read_text()


def test_run_info_round_trips_run_json(tmp_path: Path) -> None:
    info = RunInfo(config={"privacy": {"epsilon": float("inf"), "delta": 1e-5}, "seed": 3,
                           "device": "cpu"},
                   data="d.csv", partition="site", sites=2, mode="simulation",
                   privacy_randomness="secure")
    run = Run(tmp_path)
    run.save_info(info)
    assert json.loads(run.info_path.read_text())["config"]["privacy"]["epsilon"] == "inf"
    back = run.load_info()
    assert back is not None and back.epsilon == float("inf") and back.sites == 2
    assert back.to_json().keys() == info.to_json().keys()
    assert Run(tmp_path / "none").load_info() is None


@pytest.mark.slow
def test_augment_writes_its_result_and_never_overwrites_it(trained_run: Path,
                                                           tmp_path: Path) -> None:
    """`fedldm augment` on a simulated run: the extra images are all of the asked class, both
    arms are measured on the sites' real test patients, and a second call is refused."""
    from server.augment import AugmentError, AugmentOptions, augment_run, summary_table
    from server.offline import simulated_sites

    run = Run(trained_run)
    cfg = run.load_final().cfg
    real = simulated_sites(run).load(cfg)  # type: ignore[union-attr]
    in_test = sorted(set(real.test[1].tolist()))
    target = cfg.class_names[in_test[0]]
    opts = AugmentOptions(class_name=target, count=6, out=tmp_path / "aug", seeds=(0,),
                          epochs=1, show_progress=False)
    result = augment_run(trained_run, opts)

    rows = (tmp_path / "aug" / "synthetic" / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,label" and len(rows) == 7
    assert {r.split(",")[1] for r in rows[1:]} == {target}
    saved = json.loads((tmp_path / "aug" / "augment.json").read_text())
    assert saved["target"] == target and saved["n_extra"] == 6
    assert saved["n_test_per_class"] == np.bincount(
        real.test[1].numpy(), minlength=len(cfg.class_names)).tolist()
    assert "simulated sites" in saved["real_source"]
    assert (tmp_path / "aug" / "augment.png").read_bytes()[:4] == b"\x89PNG"
    table = summary_table(result)
    assert f"*{target}" in table and "paired for the deltas" in table
    with pytest.raises(AugmentError, match="already holds a result"):
        augment_run(trained_run, opts)
    with pytest.raises(AugmentError, match=r"the run's classes are \["):
        augment_run(trained_run, AugmentOptions(class_name="nope", count=1))
    deployed = tmp_path / "deployed"
    (deployed / "checkpoints").mkdir(parents=True)
    (deployed / "checkpoints" / "final").symlink_to(trained_run / "checkpoints" / "final")
    with pytest.raises(AugmentError, match="deployed run.*--reference"):
        augment_run(deployed, AugmentOptions(class_name=target, count=1))


@pytest.mark.slow
def test_stress_scores_a_users_model_per_variation(trained_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedldm stress` with a TorchScript model and with a state dict + --arch: one row per
    guidance scale and per shift, the real test score as reference, and bad models refused."""
    import torch

    from ldm_core.classifier import SmallCNN
    from ldm_core.evaluation.stress import Shift
    from server.stress import StressError, StressOptions, stress_run, summary_table

    n_classes = len(Run(trained_run).load_final().cfg.class_names)
    model = SmallCNN(n_classes).eval()
    scripted = tmp_path / "model.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 16, 16)).save(str(scripted))
    shifts = (Shift("noise", 0.1), Shift("blur", 1.0))
    import server.stress

    seeds: list[int] = []
    real_generate = server.stress.generate_images
    monkeypatch.setattr(server.stress, "generate_images", lambda *a, **k: seeds.append(
        k["seed"]) or real_generate(*a, **k))
    result = stress_run(trained_run, StressOptions(
        model=scripted, per_class=3, guidance=(1.0, 3.0), shifts=shifts, out=tmp_path / "s1",
        show_progress=False))
    names = [r["name"] for r in result["rows"]]
    base_g = result["base_guidance"]
    assert names == [f"guidance {g:g}" for g in sorted({1.0, 3.0, base_g})] + [
        "noise 0.1", "blur 1"]
    assert all(r["n"] == 3 * n_classes for r in result["rows"])
    assert len(seeds) == len({1.0, 3.0, base_g}) and len(set(seeds)) == 1  # only guidance varies
    assert result["reference"] is not None and "simulated sites" in result["reference"]["source"]
    saved = json.loads((tmp_path / "s1" / "stress.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "s1" / "stress.png").read_bytes()[:4] == b"\x89PNG"
    assert "real test" in summary_table(result)
    with pytest.raises(StressError, match="already holds a result"):
        stress_run(trained_run, StressOptions(model=scripted, out=tmp_path / "s1"))

    # The same weights as a state dict with --arch give the same scores.
    state = tmp_path / "model.pt"
    torch.save(model.state_dict(), state)
    again = stress_run(trained_run, StressOptions(
        model=state, arch="smallcnn", per_class=3, guidance=(1.0, 3.0), shifts=shifts,
        out=tmp_path / "s2", show_progress=False))
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in result["rows"]]
    exported = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 16, 16),), dynamic_shapes=(
        {0: torch.export.Dim("n")},)), str(exported))
    third = stress_run(trained_run, StressOptions(
        model=exported, per_class=3, guidance=(1.0, 3.0), shifts=shifts, out=tmp_path / "s6",
        show_progress=False))
    assert [r["auc"] for r in third["rows"]] == pytest.approx([r["auc"] for r in result["rows"]])

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(StressError, match="not a TorchScript file.*--arch"):
        stress_run(trained_run, StressOptions(model=bad, out=tmp_path / "s3"))
    with pytest.raises(StressError, match="does not fit --arch densenet121"):
        stress_run(trained_run, StressOptions(model=state, arch="densenet121",
                                              out=tmp_path / "s4"))
    wrong = tmp_path / "wrong.ts"
    torch.jit.trace(SmallCNN(n_classes + 1).eval(), torch.zeros(1, 1, 16, 16)).save(str(wrong))
    with pytest.raises(StressError, match=f"logits \\[N, {n_classes}\\]"):
        stress_run(trained_run, StressOptions(model=wrong, out=tmp_path / "s5"))


def test_a_run_started_under_another_split_is_not_resumed(tmp_path: Path, tiny_cfg: Any) -> None:
    """Resuming would train and evaluate its sites on other patients than it started with."""
    from common import files
    from common.protocol import PROTOCOL_VERSION
    from ldm_core.config import to_dict
    from ldm_core.data import SPLIT_SCHEME
    from server.federation import FederationError
    from server.simulate import _check_before_writing

    run = Run(tmp_path / "old")
    run.state_path.parent.mkdir(parents=True)
    files.write_json_atomic(run.state_path, {"config": to_dict(tiny_cfg),
                                             "protocol": PROTOCOL_VERSION})
    info = RunInfo(config=to_dict(tiny_cfg), data="d.csv", partition="site", sites=2,
                   mode="simulation")
    run.save_info(info)  # as earlier versions wrote it: no split
    opts = SimulationOptions(evaluate=False)
    with pytest.raises(FederationError, match="another patient split.*new --out"):
        _check_before_writing(run, tiny_cfg, "d.csv", "site", opts)
    run.save_info(dataclasses.replace(info, split=SPLIT_SCHEME))
    _check_before_writing(run, tiny_cfg, "d.csv", "site", opts)  # same rule: resumes
    assert Run(run.root).load_info().split == SPLIT_SCHEME  # type: ignore[union-attr]
    # a run of another protocol version is refused as such (not as another configuration)
    files.write_json_atomic(run.state_path, {"config": to_dict(tiny_cfg), "protocol": 1})
    with pytest.raises(FederationError, match="protocol 1; this one speaks"):
        _check_before_writing(run, tiny_cfg, "d.csv", "site", opts)


@pytest.mark.slow
def test_evaluate_at_sites_measures_utility_as_a_deployment_does(trained_run: Path) -> None:
    """`--at-sites`: no real image reaches the coordinator's evaluation; each site releases one
    DP vector charged to its ledger, and the report says where utility was measured."""
    metrics = evaluate_existing_run(
        trained_run, audit=False, show_progress=False,
        options=EvalOptions(per_class=12, utility_seeds=(0,), utility_epochs=1, at_sites=True))
    u = metrics["utility"]
    assert u["measured_at"] == "sites" and u["sites"] == ["site-0", "site-1"]
    assert u["sites_missing"] == [] and u["noise_std"] > 0
    assert "trs_auc" not in u  # TRS needs real images at the coordinator
    assert set(metrics["fidelity"]) == {"sites"}
    run = Run(trained_run)
    for k in range(2):
        ledger = json.loads((run.sites / f"site-{k}" / "ledger.json").read_text())
        charged = [e for e in ledger["entries"] if e["phase"] == "evaluate"]
        assert len(charged) == 2 and {e["run_id"] for e in charged} == {"evaluate-run"}
    assert any("Evaluation at the sites" in d for d in metrics["privacy"]["disclosures"])
    assert "Measured at the sites" in run.report_html.read_text()


@pytest.mark.slow
def test_a_site_conditional_run_gives_each_site_a_slot_and_stress_probes_each_site(
        tmp_path: Path, demo_manifest: Path) -> None:
    """`--set model.site_slots=2`: the coordinator hands the two sites slots 0 and 1 by name
    (kept in state.json for resume) and `fedldm stress` adds one row per site's style."""
    import torch

    import server.stress
    from ldm_core.classifier import SmallCNN
    from server.stress import StressOptions, stress_run

    out = tmp_path / "run"
    run_simulation(SimulationOptions(
        data=str(demo_manifest), sites=2, partition="site", epsilon=8.0, preset="tiny",
        image_size=16, out=out, device="cpu", show_progress=False, evaluate=False,
        overrides={"model.site_slots": 2}))
    state = Run(out).load_state()
    assert state is not None and state["site_slots"] == {"site-0": 0, "site-1": 1}
    final = Run(out).load_final()
    assert final.dm.class_embedding.num_embeddings == (final.cfg.model.n_classes + 1) * 3
    model = SmallCNN(final.cfg.model.n_classes).eval()
    scripted = tmp_path / "model.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 16, 16)).save(str(scripted))
    sites_asked: list[int | None] = []
    real_generate = server.stress.generate_images

    def spy(*a: Any, **k: Any) -> Any:
        sites_asked.append(k.get("site"))
        return real_generate(*a, **k)

    result = stress_run(out, StressOptions(model=scripted, per_class=2, guidance=(1.0,),
                                           shifts=(), out=tmp_path / "s", show_progress=False))
    assert [r["name"] for r in result["rows"] if r["family"] == "site"] == [
        "site site-0", "site site-1"]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(server.stress, "generate_images", spy)
    try:
        stress_run(out, StressOptions(model=scripted, per_class=2, guidance=(1.0,), shifts=(),
                                      out=tmp_path / "s2", show_progress=False))
    finally:
        monkey.undo()
    assert sites_asked[-2:] == [0, 1] and all(s is None for s in sites_asked[:-2])


def test_a_reference_set_of_volumes_is_read_on_the_runs_voxel_grid(tmp_path: Path,
                                                                   tiny_cfg: Any) -> None:
    """`fedldm evaluate --reference` reads volumes as the sites do: at twice the demo's voxel
    size the heads fill the grid's centre half, so real and synthetic volumes compare."""
    import torch

    from ldm_core.phantoms3d import HEAD_EXTENT_MM, generate_demo3d
    from server.real_data import ReferenceSet

    manifest = generate_demo3d(tmp_path / "ref", n_patients=16, n_sites=2, size=16, seed=3)
    model = dataclasses.replace(tiny_cfg.model, spatial_dims=3,
                                voxel_mm=2 * HEAD_EXTENT_MM / 16)
    real = ReferenceSet(manifest).load(dataclasses.replace(tiny_cfg, model=model))
    x = torch.cat([real.train[0], real.test[0]])
    assert x.shape[1:] == (1, 16, 16, 16)
    border = torch.ones(16, 16, 16, dtype=torch.bool)
    border[4:12, 4:12, 4:12] = False
    assert (x[:, 0][:, border] == -1.0).all() and (x[:, 0][:, ~border] > -1.0).any()


def test_the_judge_defaults_follow_the_runs_dimensionality() -> None:
    """Images: 3 seeds of 12 epochs; volumes: 1 seed of 90 (a 3D judge costs ~10x per image);
    what the caller names is kept."""
    from server.evaluate import EvalOptions, _with_defaults

    images, volumes = _with_defaults(EvalOptions(), 2), _with_defaults(EvalOptions(), 3)
    assert (images.utility_seeds, images.utility_epochs) == ((0, 1, 2), 12)
    assert (volumes.utility_seeds, volumes.utility_epochs) == ((0,), 90)
    named = _with_defaults(EvalOptions(utility_seeds=(4, 5), utility_epochs=2), 3)
    assert (named.utility_seeds, named.utility_epochs) == ((4, 5), 2)
