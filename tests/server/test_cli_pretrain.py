"""`fedldm pretrain-ae` then `fedldm pretrain-dm`: the commands that remake the shipped priors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from ldm_core.config import build_config
from ldm_core.pretrain import denoiser_pretrained_path, pretrained_path


def test_pretrain_commands_write_priors_the_loaders_accept(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    monkeypatch.setenv("FEDLDM_PRETRAINED_DIR", str(tmp_path))
    m = build_config(preset="tiny", image_size=16).model
    ae_path = tmp_path / pretrained_path(m).name
    dm_path = tmp_path / denoiser_pretrained_path(m).name
    common = ["--preset", "tiny", "--image-size", "16", "--steps", "2"]
    # needs its autoencoder first: a missing file is bad input, one line, exit 2
    assert main(["pretrain-dm", *common, "--out", str(dm_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedldm pretrain-dm:") and "pretrain-ae" in err
    assert "Traceback" not in err and not dm_path.exists()
    assert main(["pretrain-ae", *common, "--out", str(ae_path)]) == 0
    assert main(["pretrain-dm", *common, "--out", str(dm_path)]) == 0
    meta = json.loads(dm_path.with_suffix(".json").read_text())
    assert meta["labels"].startswith("none") and meta["public_scale_factor"] > 0
    assert meta["arch"]["prediction_type"] == m.prediction_type

    from ldm_core.pretrain import load_pretrained, load_pretrained_denoiser

    assert load_pretrained(m) and load_pretrained_denoiser(m)
