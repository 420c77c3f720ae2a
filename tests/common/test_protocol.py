"""Nothing undeclared leaves a site: a whole tiny federation's replies, checked field by field.

Two sites that differ only in how many images they hold (and their names) train both phases,
release the latent statistics, answer an audit and an evaluation through the real Coordinator and
ClientApp.
Every reply must decode strictly (no undeclared record or field), carry no image-shaped array,
and agree on every PUBLIC field: a PUBLIC value that depended on the site's size would leak it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message

from client.client_app import make_client_app
from client.ledger import PrivacyLedger
from client.site_config import SiteConfig
from common.packed import pack, unpack
from common.protocol import (
    AuditReply,
    EvaluateReply,
    EvaluateRequest,
    Kind,
    LatentStatsReply,
    ProtocolError,
    TrainReply,
    reply_fields,
)
from ldm_core.classifier import SmallCNN
from ldm_core.config import RunConfig
from server.federation import Coordinator, ServerSettings
from tests.common.local_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]


def _sites(tmp_path: Path, manifest: Path) -> list[SiteConfig]:
    base = SiteConfig(site_id="site-a", data=str(manifest), state_dir=tmp_path / "a",
                      epsilon=8.0, delta=1e-5, partition="site", site_index=0, n_sites=2,
                      allow_audit=True, allow_evaluate=True)
    big = dataclasses.replace(base, site_id="site-b", state_dir=tmp_path / "b",
                              partition="all", n_sites=1)
    for s in (base, big):
        s.state_dir.mkdir(parents=True)
        PrivacyLedger.create(s.ledger_path, budget_epsilon=8.0, delta=1e-5, site_id=s.site_id)
    return [base, big]


def _kind(request: Message) -> str:
    if request.metadata.message_type == "train":
        return "train"
    return str(request.content["config"]["task"])


DECODERS = {"train": TrainReply, "latent-stats": LatentStatsReply, "audit": AuditReply,
            "evaluate": EvaluateReply}


def _public_values(kind: str, reply: Message) -> dict[str, object]:
    out = {}
    for f in reply_fields()[kind]:
        if f.kind is Kind.PUBLIC and f.name != "site-id":
            out[f"{f.record}.{f.name}"] = reply.content[f.record][f.name]
    return out


def _image_shaped(arrays: ArrayRecord, sizes: set[int]) -> list[str]:
    bad = []
    for name, arr in arrays.items():
        shape = tuple(arr.shape)
        # Spatial maps ([..., C, H, W]) at image or latent resolution; 2-D weight matrices
        # (attention projections) are not pictures of anything.
        if len(shape) >= 3 and shape[-1] == shape[-2] and shape[-1] in sizes:
            bad.append(f"{name}{shape}")
    return bad


@pytest.mark.slow
def test_a_whole_federation_sends_only_declared_fields(tmp_path: Path, demo_manifest: Path,
                                                       tiny_cfg: RunConfig) -> None:
    cfg = dataclasses.replace(tiny_cfg, privacy=dataclasses.replace(
        tiny_cfg.privacy, audit_records=16, audit_samples=16, eval_trtr_steps=3))
    sites = _sites(tmp_path, demo_manifest)
    grid = LocalGrid(make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])]),
                     n_sites=2)
    coord = Coordinator(grid, cfg, ServerSettings(out=tmp_path / "run", min_sites=2,
                                                  expected_sites=2, show_progress=False))
    coord.run()
    coord.audit()
    evaluated = coord.site_evaluate(SmallCNN(cfg.model.n_classes).state_dict(),
                                    torch.rand(16, 1, 16, 16) * 2 - 1)
    assert sorted(r["site"] for r in evaluated) == ["site-a", "site-b"]

    sizes = {cfg.model.image_size, cfg.model.latent_size}
    public: dict[tuple[str, str], dict[int, dict[str, object]]] = {}
    kinds = set()
    for node, request, reply in grid.exchanges:
        assert not reply.has_error(), reply.error
        kind = _kind(request)
        kinds.add(kind)
        DECODERS[kind].from_record(reply.content)  # strict: raises on anything undeclared
        for name in reply.content.array_records:
            bad = _image_shaped(unpack(reply.content[name]), sizes)  # the tensors sent
            assert not bad, f"{kind} reply carries image-shaped arrays {bad}"
        key = (kind, str(request.metadata.group_id))
        public.setdefault(key, {})[node] = _public_values(kind, reply)
    assert kinds == {"train", "latent-stats", "audit", "evaluate"}
    for key, by_node in public.items():
        values = list(by_node.values())
        assert len(values) == 2 and values[0] == values[1], (
            f"{key}: public fields differ between sites of different sizes: {by_node}")


def test_undeclared_or_missing_fields_are_refused() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    good = TrainReply("site-a", ArrayRecord(), 0.5, 1.0, 8.0, 1e-5, False).to_record()
    TrainReply.from_record(good)
    extra = RecordDict({**dict(good.items()), "leak": ConfigRecord({"n": 3000})})
    with pytest.raises(ProtocolError, match="undeclared"):
        TrainReply.from_record(extra)
    m = dict(good["metrics"].items())
    with pytest.raises(ProtocolError, match="undeclared"):
        TrainReply.from_record(RecordDict({**dict(good.items()), "metrics": MetricRecord(
            {**m, "num-examples": 3000})}))
    del m["loss"]
    with pytest.raises(ProtocolError, match="missing"):
        TrainReply.from_record(RecordDict({**dict(good.items()), "metrics": MetricRecord(m)}))
    with pytest.raises(ProtocolError, match="NaN"):
        TrainReply.from_record(TrainReply("site-a", ArrayRecord(), float("nan"), 1.0, 8.0,
                                          1e-5, False).to_record())


def test_an_evaluation_reply_or_request_out_of_shape_is_refused() -> None:
    from flwr.app import MetricRecord, RecordDict

    from common.protocol import RunRef

    good = EvaluateReply("site-a", (1.0, -2.0, 3.5), 4.0, 2, 8, 1.5).to_record()
    assert EvaluateReply.from_record(good).counts == (1.0, -2.0, 3.5)
    m = dict(good["evaluation"].items())
    for bad, why in (({**m, "counts": [1.0, float("inf")]}, "infinite"),
                     ({**m, "bins": 1}, "integers >= 2"),
                     ({**m, "noise-std": -1.0}, "noise-std"),
                     ({**m, "test-patients": 12}, "undeclared")):
        with pytest.raises(ProtocolError, match=why):
            EvaluateReply.from_record(RecordDict({**dict(good.items()),
                                                  "evaluation": MetricRecord(bad)}))
    run = RunRef("{}", "r", 0)
    req = EvaluateRequest(run, ArrayRecord(), ArrayRecord(
        {"images": torch.full((6, 1, 4, 4), float("nan"))})).to_record()
    with pytest.raises(ProtocolError, match="non-finite"):
        EvaluateRequest.from_record(req).synthetic_images()
    req = RecordDict({**dict(req.items()), "synthetic": pack(ArrayRecord(
        {"images": torch.zeros(6, 1, 4, 4), "labels": torch.zeros(6)}))})
    with pytest.raises(ProtocolError, match="exactly 'images'"):
        EvaluateRequest.from_record(req)


def test_a_train_request_carries_a_site_slot_only_as_a_non_negative_integer() -> None:
    from flwr.app import ConfigRecord, RecordDict

    from common.protocol import RunRef, TrainRequest

    run = RunRef("{}", "r", 0)
    req = TrainRequest(run, "diffusion", 1, ArrayRecord(), site_slot=2).to_record()
    assert TrainRequest.from_record(req).site_slot == 2
    assert TrainRequest.from_record(TrainRequest(run, "diffusion", 1, ArrayRecord())
                                    .to_record()).site_slot is None
    for bad in (-1, 1.5, "0", True):
        conf = {**dict(req["config"].items()), "site-slot": bad}
        with pytest.raises(ProtocolError, match="site-slot"):
            TrainRequest.from_record(RecordDict({**dict(req.items()),
                                                 "config": ConfigRecord(conf)}))


def protocol_table() -> str:
    """The README's "What leaves a site" table, generated from the protocol."""
    rows = ["| message | record.field | kind | what |", "|---|---|---|---|"]
    for kind, fields in reply_fields().items():
        seen = set()
        for f in fields:
            name = re.sub(r"^[a-z0-9_]+\.", "<attack>.", f.name) if "." in f.name else f.name
            if (f.record, name) in seen:
                continue
            seen.add((f.record, name))
            rows.append(f"| {kind} | `{f.record}.{name}` | {f.kind.name} | {f.doc} |")
    return "\n".join(rows)


def test_readme_lists_exactly_what_leaves_a_site() -> None:
    readme = (ROOT / "README.md").read_text()
    assert protocol_table() in readme, (
        "README 'What leaves a site' is out of date; paste the output of "
        "`python -c 'from tests.common.test_protocol import protocol_table as t; print(t())'`")


# --------------------------------------------------------------------------- update encoding
def test_float16_delta_halves_the_bytes_and_keeps_changes_a_float16_weight_would_lose() -> None:
    import torch

    from common.protocol import decode_update, encode_update

    g = torch.Generator().manual_seed(0)
    sent = {"w": torch.randn(64, 32, generator=g) + 1.0, "steps": torch.tensor([7])}
    change = 1e-5 * torch.randn(64, 32, generator=g)  # a small DP-SGD round's change
    update = {"w": sent["w"] + change, "steps": torch.tensor([9])}
    wire = encode_update(update, sent, "float16-delta")
    assert wire["w"].dtype == torch.float16 and wire["w"].element_size() == 2
    assert torch.equal(wire["steps"], update["steps"])  # counters travel exactly
    back = decode_update(wire, sent, "float16-delta")
    assert back["w"].dtype == torch.float32 and torch.equal(back["steps"], update["steps"])
    err = (back["w"] - update["w"]).abs()
    # Relative to the change (float16 mantissa), plus float16's subnormal step for changes under
    # 6e-5 and the float32 rounding of the sum: orders of magnitude below the DP noise.
    assert float((err - change.abs() * 2.0**-10).max()) <= 2.0**-25 + 2.0**-23
    # Rounding the weights themselves to float16 would lose most of this round's change.
    rounded = update["w"].half().float() - sent["w"].half().float()
    assert float((rounded == 0).float().mean()) > 0.9
    assert decode_update(update, sent, "float32") is update
    assert encode_update(update, sent, "float32") is update


def test_a_reply_that_does_not_use_the_declared_encoding_is_refused() -> None:
    import torch

    from common.protocol import decode_update, encode_update

    sent = {"w": torch.zeros(3)}
    with pytest.raises(ProtocolError, match="float16 differences"):
        decode_update({"w": torch.ones(3)}, sent, "float16-delta")  # float32 weights
    with pytest.raises(ProtocolError, match="sends the weights as torch.float32"):
        decode_update({"w": torch.ones(3, dtype=torch.float16)}, sent, "float32")
    with pytest.raises(ProtocolError, match="unknown transfer encoding"):
        encode_update({"w": torch.ones(3)}, sent, "int8")
