"""Checkpoints as folders of safetensors files plus a JSON meta file: tensors only, never pickle.

Layout of a checkpoint folder::

    <directory>/<name>.safetensors   one per state dict (e.g. autoencoder, unet, ema)
    <directory>/meta.json            the caller's meta (indent 2, sorted keys) plus a reserved
                                     "__checkpoint__" key: format, module names, sha256 per file

Why a manifest with hashes: safetensors catches a broken header but not flipped or truncated
tensor bytes; a checkpoint that silently loads wrong weights is worse than one that fails.

Why the folder dance: the new checkpoint is fully written and fsynced in a hidden sibling
folder, then swapped in with renames, so a crash never leaves a half-written checkpoint where a
good one was. The only window is between the two renames (old moved aside, new not yet in):
then ``directory`` is missing and `load_checkpoint` says where the previous one was left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import files

META_FILE = "meta.json"
SUFFIX = ".safetensors"
MANIFEST_KEY = "__checkpoint__"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt (the message names the folder)."""


def _fsync_path(path: Path) -> None:
    files.fsync_path(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(SUFFIX):
        raise ValueError(
            f"module name {name!r} must be a plain file stem (letters, digits, _ . -, not starting "
            f"with a dot or ending in {SUFFIX}), e.g. 'autoencoder'."
        )
    if not isinstance(state, Mapping):
        raise ValueError(
            f"module {name!r}: expected a state dict (str -> Tensor), got {type(state).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"module {name!r}: state dict key {key!r} is not a string.")
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"module {name!r}: {key!r} is a {type(value).__name__}, not a Tensor; put "
                "non-tensor values into meta instead."
            )
        # safetensors rejects tensors sharing storage (tied weights, views): give each its own.
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def _meta_text(meta: Mapping[str, Any], manifest: dict[str, Any]) -> str:
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a mapping (a JSON object), got {type(meta).__name__}")
    if MANIFEST_KEY in meta:
        raise ValueError(f"meta key {MANIFEST_KEY!r} is reserved by the checkpoint format.")
    doc = {**meta, MANIFEST_KEY: manifest}
    try:
        return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"meta is not strict JSON ({err}); use plain str/int/float/bool/list/dict values and "
            "write non-finite floats (e.g. epsilon inf) as strings or null."
        ) from err


def _is_checkpoint_folder(directory: Path) -> bool:
    """True when replacing ``directory`` only discards a checkpoint (or an empty folder)."""
    entries = list(directory.iterdir())
    if not entries:
        return True
    names = {p.name for p in entries}
    return META_FILE in names and all(
        p.is_file() and (p.name == META_FILE or p.name.endswith(SUFFIX)) for p in entries
    )


def save_checkpoint(
    directory: Path,
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``modules`` and ``meta`` as a checkpoint folder at ``directory``, atomically.

    If ``directory`` already holds a checkpoint it is replaced only once the new one is complete
    and on disk. A folder holding anything else is refused rather than deleted.
    Returns ``directory``.
    """
    directory = Path(directory)
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError("modules must be a non-empty mapping name -> state dict.")
    prepared = {name: _prepare(name, state) for name, state in modules.items()}
    _meta_text(meta, {})  # validate meta before touching the disk
    parent = directory.parent
    if not parent.is_dir():
        raise ValueError(f"parent folder {parent} of checkpoint {directory} does not exist.")
    if directory.exists() and (not directory.is_dir() or not _is_checkpoint_folder(directory)):
        raise ValueError(
            f"{directory} exists and is not a fedldm checkpoint folder (only meta.json and "
            "*.safetensors); refusing to replace it. Choose another path or move it away."
        )

    tag = uuid.uuid4().hex[:12]
    tmp = parent / f".{directory.name}.tmp-{tag}"
    old = parent / f".{directory.name}.old-{tag}"
    tmp.mkdir()
    try:
        hashes: dict[str, str] = {}
        for name, tensors in prepared.items():
            file = tmp / f"{name}{SUFFIX}"
            save_file(tensors, str(file))
            _fsync_path(file)
            hashes[name] = _sha256(file)
        manifest = {"format": FORMAT_VERSION, "modules": sorted(hashes), "sha256": hashes}
        files.write_text_atomic(tmp / META_FILE, _meta_text(meta, manifest))
        _fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    moved_aside = False
    try:
        if directory.exists():
            os.rename(directory, old)
            moved_aside = True
        os.rename(tmp, directory)
    except BaseException:
        if moved_aside and not directory.exists():
            with contextlib.suppress(OSError):
                os.rename(old, directory)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent)
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _missing_hint(directory: Path) -> str:
    leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    if leftovers:
        return (
            f" A save was interrupted while swapping folders; the previous checkpoint is at "
            f"{leftovers[-1]}: rename it to {directory} to use it."
        )
    return ""


def load_checkpoint(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a folder written by `save_checkpoint`: ``(modules, meta)``, tensors on CPU.

    Only safetensors and JSON are parsed (no pickle). Every file is checked against the sha256
    recorded at save time. Raises `CheckpointError` naming the folder and what is wrong.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint folder {directory} does not exist or is not a folder."
            + _missing_hint(directory)
        )
    meta_path = directory / META_FILE
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(
            f"checkpoint folder {directory} has no {META_FILE}: it is not a complete fedldm "
            "checkpoint; use another checkpoint (e.g. the previous round's)."
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{meta_path} in checkpoint folder {directory} is corrupt ({err}); use another "
            "checkpoint (e.g. the previous round's)."
        ) from err
    manifest = doc.pop(MANIFEST_KEY, None) if isinstance(doc, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT_VERSION
        or not isinstance(manifest.get("modules"), list)
        or not isinstance(manifest.get("sha256"), dict)
    ):
        raise CheckpointError(
            f"{meta_path} in checkpoint folder {directory} lacks a valid {MANIFEST_KEY!r} "
            f"manifest (format {FORMAT_VERSION}); it was not written by this fedldm version."
        )
    names = manifest["modules"]
    present = {p.name[: -len(SUFFIX)] for p in directory.glob(f"*{SUFFIX}")}
    extra = sorted(present - set(names))
    if extra:
        raise CheckpointError(
            f"checkpoint folder {directory} has files not in its manifest: {extra}; it was "
            "modified after saving. Remove them or use another checkpoint."
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        file = directory / f"{name}{SUFFIX}"
        if not isinstance(name, str) or not _NAME.match(name) or not file.is_file():
            raise CheckpointError(
                f"checkpoint folder {directory} is missing {name}{SUFFIX} listed in {META_FILE}; "
                "use another checkpoint (e.g. the previous round's)."
            )
        if _sha256(file) != manifest["sha256"].get(name):
            raise CheckpointError(
                f"{file} in checkpoint folder {directory} does not match the sha256 recorded at "
                "save time (corrupt or truncated); use another checkpoint."
            )
        try:
            modules[name] = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{file} in checkpoint folder {directory} is not a readable safetensors file "
                f"({err}); use another checkpoint."
            ) from err
    return modules, doc
