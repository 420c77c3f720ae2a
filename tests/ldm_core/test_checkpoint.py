"""Tests for ldm_core.checkpoint: exact round trip, atomic replace, clear errors, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

import ldm_core.checkpoint as ckpt
from ldm_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _modules(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(4, 6, generator=g)
    return {
        "autoencoder": {
            "enc.weight": shared,
            "dec.weight": shared,  # tied: same storage
            "enc.view": shared[1:3],  # view into the same storage
            "transposed": torch.randn(3, 5, generator=g).t(),  # non-contiguous
            "half": torch.randn(7, generator=g).half(),
            "bf16": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        },
        "unet": {"step": torch.tensor(seed, dtype=torch.int64), "w": torch.randn(2, generator=g)},
    }


META = {"round": 3, "phase": "diffusion", "config": {"image_size": 64, "channels": [8, 16]}}


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_is_exact(tmp_path):
    target = tmp_path / "round-3"
    mods = _modules()
    assert save_checkpoint(target, mods, META) == target
    loaded, meta = load_checkpoint(target)
    assert meta == META
    assert set(loaded) == set(mods)
    for name, state in mods.items():
        assert set(loaded[name]) == set(state)
        for key, value in state.items():
            got = loaded[name][key]
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got, value)
    text = (target / "meta.json").read_text()
    assert text == json.dumps({**META, **json.loads(text)}, indent=2, sort_keys=True) + "\n"
    assert _hidden(tmp_path) == []


def test_files_are_safetensors_not_pickle(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save_checkpoint(target, _modules(), META)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["autoencoder.safetensors", "meta.json", "unet.safetensors"]
    for file in target.glob("*.safetensors"):
        raw = file.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        json.loads(raw[8 : 8 + header_len])  # a safetensors JSON header, not a pickle stream
        assert not raw.startswith(b"\x80")

    def no_unpickling(*a, **k):
        raise AssertionError("load_checkpoint must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    loaded, _ = load_checkpoint(target)
    assert "autoencoder" in loaded


def test_replace_existing_checkpoint(tmp_path):
    target = tmp_path / "latest"
    save_checkpoint(target, _modules(0), {"round": 1})
    save_checkpoint(target, _modules(1), {"round": 2})
    loaded, meta = load_checkpoint(target)
    assert meta == {"round": 2}
    assert torch.equal(loaded["unet"]["w"], _modules(1)["unet"]["w"])
    assert _hidden(tmp_path) == []


def test_failure_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    save_checkpoint(target, _modules(0), {"round": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_save = ckpt.save_file
    calls = []

    def crash_on_second(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(target, _modules(1), {"round": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert load_checkpoint(target)[1] == {"round": 1}
    assert _hidden(tmp_path) == []


def test_failure_during_swap_restores_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    save_checkpoint(target, _modules(0), {"round": 1})
    real_rename = os.rename
    calls = []

    def fail_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, new not yet moved in
            raise OSError("power cut (injected)")
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", fail_second_rename)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(target, _modules(1), {"round": 2})
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert load_checkpoint(target)[1] == {"round": 1}
    assert _hidden(tmp_path) == []


def test_interrupted_swap_is_explained(tmp_path):
    target = tmp_path / "latest"
    save_checkpoint(target, _modules(0), {"round": 1})
    os.rename(target, tmp_path / ".latest.old-abc")  # what a crash between renames leaves
    with pytest.raises(CheckpointError, match=r"\.latest\.old-abc"):
        load_checkpoint(target)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")


def _saved(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _modules(), META)
    return target


def test_missing_meta(tmp_path):
    target = _saved(tmp_path)
    (target / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(target)


def test_corrupt_meta(tmp_path):
    target = _saved(tmp_path)
    (target / "meta.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(target)


def test_meta_without_manifest(tmp_path):
    target = _saved(tmp_path)
    (target / "meta.json").write_text(json.dumps(META))
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(target)


def test_missing_module_file(tmp_path):
    target = _saved(tmp_path)
    (target / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing unet.safetensors"):
        load_checkpoint(target)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_module_file(tmp_path, damage):
    target = _saved(tmp_path)
    file = target / "autoencoder.safetensors"
    raw = bytearray(file.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a safetensors file")
    file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(target)):
        load_checkpoint(target)


def test_extra_file_is_refused(tmp_path):
    target = _saved(tmp_path)
    (target / "intruder.safetensors").write_bytes((target / "unet.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="intruder"):
        load_checkpoint(target)


def test_refuses_to_replace_a_non_checkpoint_folder(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "patients.csv").write_text("id\n1\n")
    with pytest.raises(ValueError, match="not a fedldm checkpoint"):
        save_checkpoint(target, _modules(), META)
    assert (target / "patients.csv").read_text() == "id\n1\n"


def test_empty_existing_folder_is_fine(tmp_path):
    target = tmp_path / "ck"
    target.mkdir()
    save_checkpoint(target, _modules(), META)
    assert load_checkpoint(target)[1] == META


@pytest.mark.parametrize(
    ("modules", "meta", "match"),
    [
        ({}, META, "non-empty"),
        ({"../evil": {"w": torch.zeros(1)}}, META, "file stem"),
        ({"meta.safetensors": {"w": torch.zeros(1)}}, META, "file stem"),
        ({"m": {"w": [1.0]}}, META, "not a Tensor"),
        ({"m": {"w": torch.zeros(1)}}, {"eps": float("inf")}, "strict JSON"),
        ({"m": {"w": torch.zeros(1)}}, {"x": object()}, "strict JSON"),
        ({"m": {"w": torch.zeros(1)}}, {"__checkpoint__": 1}, "reserved"),
    ],
)
def test_bad_input_raises_before_writing(tmp_path, modules, meta, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "ck", modules, meta)
    assert list(tmp_path.iterdir()) == []
