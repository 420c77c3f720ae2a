"""Weights on the wire as one flat array per dtype, not one Flower Array per tensor.

Why: Flower 1.42 moves every Array of a message (and every 5 MB chunk of it) as an object of its
own, one HTTP request each from SuperNode to SuperLink, signed by the node's key and passed
through the coordinator's TLS proxy. A quick-preset denoiser of ~120 tensors made ~270 requests
per message; on loopback a site took 8 s to receive its weights and 8 s to send them back
(`benchmarks/deployment_overhead.py`), most of a round's overhead. Packed, a message of weights
is two or three objects (plus 5 MB chunks), whatever the network's depth.

The layout (name, dtype, shape per tensor, in order) travels next to the data as JSON bytes.
`unpack` is strict, because the other side may be buggy or hostile: only the declared dtypes,
each flat array exactly as long as its tensors need, no unused or missing array, bounded layout.
Every check a record got before (names, shapes, finiteness) still runs on the unpacked tensors.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

LAYOUT_KEY = "packed-layout"
DATA_PREFIX = "packed-"
MAX_LAYOUT_BYTES = 4 << 20  # a few thousand tensors' names and shapes; a classifier has ~20
MAX_NAME_CHARS = 512
MAX_DIMS = 8

# The dtypes a fedldm record carries (weights, buffers, images), by their numpy name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class PackError(ValueError):
    """A packed record does not match its own layout; the text says what."""


def pack(record: ArrayRecord) -> ArrayRecord:
    """`record`'s tensors as one flat array per dtype plus their layout."""
    tensors = record.to_torch_state_dict(keep_input=True)
    layout: list[list[Any]] = []
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise PackError(f"{name}: dtype {t.dtype} cannot travel (known: {sorted(DTYPES)})")
        dtype = _NAMES[t.dtype]
        layout.append([name, dtype, list(t.shape)])
        groups.setdefault(dtype, []).append(t.reshape(-1))
    head = json.dumps(layout, separators=(",", ":")).encode()
    if len(head) > MAX_LAYOUT_BYTES:
        raise PackError(f"layout of {len(layout)} tensors is {len(head)} bytes, more than "
                        f"{MAX_LAYOUT_BYTES}")
    out: dict[str, torch.Tensor] = {LAYOUT_KEY: torch.frombuffer(bytearray(head),
                                                                 dtype=torch.uint8)}
    for dtype, parts in groups.items():
        out[DATA_PREFIX + dtype] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    return ArrayRecord(out)


def _layout(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...]]]:
    if LAYOUT_KEY not in record:
        raise PackError(f"no {LAYOUT_KEY!r} array (a record from a fedldm release that sends "
                        "one array per tensor?)")
    arr = record[LAYOUT_KEY]
    if arr.dtype != "uint8" or len(arr.shape) != 1 or arr.shape[0] > MAX_LAYOUT_BYTES:
        raise PackError(f"{LAYOUT_KEY} must be at most {MAX_LAYOUT_BYTES} uint8 bytes, got "
                        f"{arr.dtype} {tuple(arr.shape)}"[:200])
    raw = _numpy(arr, "uint8", LAYOUT_KEY)
    if raw.shape[0] > MAX_LAYOUT_BYTES:  # the bytes, not only Flower's metadata
        raise PackError(f"{LAYOUT_KEY} holds {raw.shape[0]} bytes, more than {MAX_LAYOUT_BYTES}")
    try:
        entries = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # "[[[[..." nests deep
        raise PackError(f"{LAYOUT_KEY} is not a layout ({type(err).__name__})") from err
    if not isinstance(entries, list):
        raise PackError(f"{LAYOUT_KEY} must be a list of [name, dtype, shape]")
    out: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                and isinstance(e[1], str) and isinstance(e[2], list)):
            raise PackError(f"{LAYOUT_KEY} entry {i} is not [name, dtype, shape]")
        name, dtype, shape = e
        if not 0 < len(name) <= MAX_NAME_CHARS or name in seen:
            raise PackError(f"{LAYOUT_KEY} entry {i}: empty, over-long or repeated name")
        if dtype not in DTYPES:
            raise PackError(f"{name[:80]}: dtype {dtype[:20]!r} (known: {sorted(DTYPES)})")
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise PackError(f"{name[:80]}: shape must be at most {MAX_DIMS} integers >= 0")
        seen.add(name)
        out.append((name, dtype, tuple(shape)))
    return out


def _numpy(arr: Any, dtype: str, key: str) -> np.ndarray:
    """The array's data, checked against its own dtype and a flat shape (Flower's metadata and
    the bytes it deserialises could disagree in a crafted message)."""
    try:
        data = arr.numpy()
    except Exception as err:  # noqa: BLE001 - numpy raises several types on crafted bytes
        raise PackError(f"{key}: unreadable array ({type(err).__name__})") from err
    if str(data.dtype) != dtype or data.ndim != 1:
        raise PackError(f"{key}: expected a flat {dtype} array, got {data.dtype} "
                        f"{tuple(data.shape)}"[:200])
    return data


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The tensors `pack` put into `record`, by name; `PackError` on anything else."""
    layout = _layout(record)
    need: dict[str, int] = {}
    for _, dtype, shape in layout:
        need[dtype] = need.get(dtype, 0) + math.prod(shape)
    expected = {LAYOUT_KEY} | {DATA_PREFIX + d for d in need}
    if set(record.keys()) != expected:
        extra = sorted(set(record.keys()) - expected)[:5]
        missing = sorted(expected - set(record.keys()))[:5]
        raise PackError(f"arrays {extra} not in the layout, {missing} missing")
    flat: dict[str, torch.Tensor] = {}
    for dtype, count in need.items():
        key = DATA_PREFIX + dtype
        declared = record[key].shape
        if len(declared) != 1 or declared[0] != count:
            raise PackError(f"{key}: the layout needs {count} values, the array declares "
                            f"{tuple(declared)}"[:200])
        data = _numpy(record[key], dtype, key)
        if data.shape[0] != count:
            raise PackError(f"{key}: the layout needs {count} values, got {data.shape[0]}")
        flat[dtype] = torch.from_numpy(data)
    offsets = dict.fromkeys(need, 0)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape in layout:
        n = math.prod(shape)
        start = offsets[dtype]
        tensors[name] = flat[dtype][start:start + n].reshape(shape)
        offsets[dtype] = start + n
    return ArrayRecord(tensors)
