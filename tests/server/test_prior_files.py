"""Priors from a user's public set: `pretrain-ae/-dm --data PUBLIC`, then a run that starts from
them (`--set ae_init=FILE --set dm_init=FILE`), with the source in the data card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.args import override
from cli.main import main
from ldm_core.config import ConfigError, build_config
from ldm_core.phases import PHASES, check_models
from ldm_core.pretrain import PriorError, file_sha256
from server.datacard import init_note

COMMON = ["--preset", "tiny", "--image-size", "16", "--steps", "2"]


@pytest.fixture(scope="module")
def priors(tmp_path_factory: pytest.TempPathFactory, demo_manifest: Path) -> dict[str, Path]:
    """Both priors made from the demo images standing in for a public set."""
    root = tmp_path_factory.mktemp("priors")
    ae, dm = root / "ae.safetensors", root / "dm.safetensors"
    assert main(["pretrain-ae", *COMMON, "--data", str(demo_manifest), "--out", str(ae)]) == 0
    assert main(["pretrain-dm", *COMMON, "--data", str(demo_manifest), "--autoencoder",
                 str(ae), "--out", str(dm)]) == 0
    return {"ae": ae, "dm": dm, "data": demo_manifest}


def _cfg(priors: dict[str, Path], **extra: str):  # noqa: ANN202
    return build_config(preset="tiny", image_size=16, class_names=("a", "b", "c", "d"),
                        overrides={"ae_init": str(priors["ae"]), "dm_init": str(priors["dm"]),
                                   **extra})


def test_sidecars_record_the_public_source_and_the_autoencoder(priors: dict[str, Path]) -> None:
    ae_meta = json.loads(priors["ae"].with_suffix(".json").read_text())
    n_images = sum(1 for _ in priors["data"].open()) - 1
    assert ae_meta["kind"] == "autoencoder" and ae_meta["images"] == n_images
    assert ae_meta["data"] == str(priors["data"].resolve())
    assert len(ae_meta["listing_sha256"]) == 64 and ae_meta["arch"]["image_size"] == 16
    dm_meta = json.loads(priors["dm"].with_suffix(".json").read_text())
    assert dm_meta["kind"] == "denoiser" and dm_meta["public_scale_factor"] > 0
    assert dm_meta["autoencoder_sha256"] == file_sha256(priors["ae"])


def test_a_run_starts_from_the_prior_files(priors: dict[str, Path]) -> None:
    cfg = _cfg(priors)
    ae = PHASES["autoencoder"].initial_weights(cfg)
    saved = load_file(str(priors["ae"]))
    assert ae is not None and all(torch.equal(ae[k], saved[k]) for k in saved)
    dm = PHASES["diffusion"].initial_weights(cfg)
    assert dm is not None
    rows = dm["class_embedding.weight"]
    assert rows.shape[0] == 5 and all(torch.equal(rows[i], rows[4]) for i in range(4))
    # A paired run widens the file's autoencoder the same way as the shipped prior.
    paired = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mask_channels=1))
    wide = PHASES["autoencoder"].initial_weights(paired)
    assert wide is not None and set(wide) == set(saved)
    assert any(wide[k].shape != saved[k].shape for k in saved)
    # Its mask channel is blank until autoencoder rounds train it: none is refused by name.
    frozen = dataclasses.replace(paired, autoencoder=dataclasses.replace(paired.autoencoder,
                                                                         rounds=0))
    with pytest.raises(ValueError, match=f"image-only prior file {priors['ae'].name}.*empty"):
        PHASES["autoencoder"].initial_weights(frozen)


def test_a_denoiser_prior_refuses_another_autoencoder(priors: dict[str, Path],
                                                      tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    assert main(["pretrain-ae", *COMMON, "--seed", "1", "--data", str(priors["data"]),
                 "--out", str(other)]) == 0
    with pytest.raises(PriorError, match="another autoencoder"):
        check_models(_cfg(priors, ae_init=str(other)))


def test_a_prior_of_another_architecture_is_refused_naming_the_file(
        priors: dict[str, Path]) -> None:
    cfg = build_config(preset="tiny", image_size=32, class_names=("a", "b"),
                       overrides={"ae_init": str(priors["ae"])})
    with pytest.raises(PriorError, match=str(priors["ae"].name)):
        check_models(cfg)


def test_init_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="safetensors"):
        build_config(preset="tiny", overrides={"ae_init": "imagenet"})
    with pytest.raises(ConfigError, match="dm_init"):
        build_config(preset="tiny", overrides={"ae_init": "random",
                                               "dm_init": "/x/dm.safetensors"})
    with pytest.raises(ConfigError, match="dm_init"):  # a file denoiser needs a file autoencoder
        build_config(preset="tiny", overrides={"ae_init": "public-phantoms",
                                               "dm_init": "/x/dm.safetensors"})


def test_prior_paths_become_absolute_and_the_data_card_names_the_source(
        priors: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(priors["ae"].parent)
    assert override("ae_init=ae.safetensors") == ("ae_init", str(priors["ae"]))
    note = init_note(str(priors["ae"]))
    assert f"'{priors['data'].name}'" in note and "ae.safetensors" in note
    assert str(priors["data"].parent) not in note  # no coordinator paths in published files
    assert "not readable" in init_note("/nowhere/x.safetensors")
    assert "generic procedural images" in init_note("public-generic", trained=False)


def test_a_corrupt_prior_file_is_refused_naming_it(priors: dict[str, Path],
                                                   tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file")
    bad.with_suffix(".json").write_text(priors["ae"].with_suffix(".json").read_text())
    with pytest.raises(PriorError, match="bad.safetensors"):
        check_models(build_config(preset="tiny", image_size=16, class_names=("a", "b"),
                                  overrides={"ae_init": str(bad)}))


def test_train_only_pieces_are_checked_with_the_models() -> None:
    one = build_config(preset="tiny", overrides={"diffusion.train_only": "class_embedding"})
    assert one.diffusion.train_only == ("class_embedding",)  # a bare --set value is one piece
    check_models(one)
    with pytest.raises(ValueError, match="clas_embedding"):
        check_models(build_config(preset="tiny",
                                  overrides={"diffusion.train_only": ["clas_embedding"]}))
