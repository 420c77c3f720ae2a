"""Packed records: exact round trips, few objects on the wire, strict refusal of anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.packed import DATA_PREFIX, LAYOUT_KEY, PackError, pack, unpack
from common.protocol import ProtocolError, RunRef, TrainReply, TrainRequest
from ldm_core.config import build_config
from ldm_core.models import make_denoiser


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 2, 3, 3, generator=g),
            "conv.bias": torch.randn(4, generator=g),
            "half": torch.randn(5, generator=g).half(),
            "scalar": torch.tensor(1.5),
            "empty": torch.zeros(0, 3),
            "steps": torch.tensor([7, -2], dtype=torch.int64),
            "mask": torch.tensor([True, False, True])}


def test_unpack_gives_back_every_tensor_exactly_in_order() -> None:
    sd = _state()
    back = unpack(pack(ArrayRecord(sd))).to_torch_state_dict()
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    assert unpack(pack(ArrayRecord())).to_torch_state_dict() == {}


def test_a_denoiser_travels_as_a_handful_of_objects() -> None:
    """The point of packing: Flower sends one HTTP request per object."""
    cfg = build_config(preset="quick", class_names=("a", "b"))
    record = ArrayRecord(make_denoiser(cfg.model).state_dict())
    plain = len(get_all_nested_objects(RecordDict({"arrays": record})))
    packed = len(get_all_nested_objects(RecordDict({"arrays": pack(record)})))
    assert plain > 100
    assert packed <= 6, packed  # record dict, record, layout + float32, each with a chunk


def test_protocol_messages_carry_packed_arrays_and_decode_them() -> None:
    sd = _state()
    req = TrainRequest(RunRef("{}", "r", 0), "diffusion", 1, ArrayRecord(sd),
                       autoencoder=ArrayRecord(sd)).to_record()
    assert set(req["arrays"].keys()) == {LAYOUT_KEY} | {DATA_PREFIX + d for d in
                                                       ("float32", "float16", "int64", "bool")}
    got = TrainRequest.from_record(req).weights.to_torch_state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    reply = TrainReply("site-a", ArrayRecord(sd), 0.5, 1.0, 8.0, 1e-5, False).to_record()
    assert LAYOUT_KEY in reply["arrays"]
    with pytest.raises(ProtocolError, match="record 'arrays'.*packed-layout"):
        TrainReply.from_record(RecordDict({**dict(reply.items()), "arrays": ArrayRecord(sd)}))


def _wire(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return pack(ArrayRecord(sd)).to_torch_state_dict()


def _with_layout(wire: dict[str, torch.Tensor], raw: bytes) -> ArrayRecord:
    return ArrayRecord({**wire, LAYOUT_KEY: torch.tensor(list(raw), dtype=torch.uint8)})


def _entries(wire: dict[str, torch.Tensor]) -> list:
    return json.loads(bytes(wire[LAYOUT_KEY].tolist()))


@pytest.mark.parametrize("bad, why", [
    (lambda e: e[:-1], "not in the layout|needs"),
    (lambda e: [*e, ["extra", "float32", [1]]], "needs"),
    (lambda e: [[e[0][0], e[0][1], [2, *e[0][2]]], *e[1:]], "needs"),
    (lambda e: [[e[0][0], "complex64", e[0][2]], *e[1:]], "dtype"),
    (lambda e: [[e[1][0], *e[0][1:]], *e[1:]], "repeated"),
    (lambda e: [["", *e[0][1:]], *e[1:]], "empty"),
    (lambda e: [[e[0][0], e[0][1], [-1, 4]], *e[1:]], "integers >= 0"),
    (lambda e: [[e[0][0], e[0][1], [1.5]], *e[1:]], "integers >= 0"),
    (lambda e: [[e[0][0], e[0][1]], *e[1:]], "not \\[name, dtype, shape\\]"),
    (lambda e: {"w": e}, "must be a list"),
])
def test_a_layout_that_does_not_match_its_data_is_refused(bad, why) -> None:
    wire = _wire({"w": torch.ones(2, 3), "b": torch.ones(3)})
    with pytest.raises(PackError, match=why):
        unpack(_with_layout(wire, json.dumps(bad(_entries(wire))).encode()))


def test_broken_wire_records_are_refused() -> None:
    wire = _wire({"w": torch.ones(2, 3), "n": torch.tensor([1, 2])})
    with pytest.raises(PackError, match="not a layout"):
        unpack(_with_layout(wire, b"\xff\x00["))
    with pytest.raises(PackError, match="not a layout"):  # RecursionError inside json
        unpack(_with_layout(wire, b"[" * 200_000 + b"]" * 200_000))
    with pytest.raises(PackError, match="no 'packed-layout'"):
        unpack(ArrayRecord({"w": torch.ones(2)}))
    with pytest.raises(PackError, match="uint8"):
        unpack(ArrayRecord({**wire, LAYOUT_KEY: wire[LAYOUT_KEY].to(torch.int16)}))
    with pytest.raises(PackError, match="needs 6 values"):
        unpack(ArrayRecord({**wire, "packed-float32": torch.ones(7)}))
    with pytest.raises(PackError, match="flat float32"):
        unpack(ArrayRecord({**wire, "packed-float32": torch.ones(6, dtype=torch.float64)}))
    with pytest.raises(PackError, match="not in the layout"):
        unpack(ArrayRecord({**wire, "packed-float16": torch.ones(1).half()}))
    with pytest.raises(PackError, match="missing"):
        unpack(ArrayRecord({k: v for k, v in wire.items() if k != "packed-int64"}))
    with pytest.raises(PackError, match="cannot travel"):
        pack(ArrayRecord({"c": Array(np.ones(2, dtype=np.uint16))}))


def test_a_crafted_array_whose_bytes_disagree_with_its_metadata_is_refused() -> None:
    wire = pack(ArrayRecord({"w": torch.ones(4)}))
    lying = Array(np.ones(4, dtype=np.float64))
    lying.dtype = "float32"  # the metadata says float32, the bytes are float64
    wire["packed-float32"] = lying
    with pytest.raises(PackError, match="flat float32"):
        unpack(wire)
