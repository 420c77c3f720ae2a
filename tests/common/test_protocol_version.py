"""The protocol version is bumped whenever what a request means changes.

A site refuses requests of another `PROTOCOL_VERSION` (tests/client/test_client_app.py). That
only protects anyone if the version moves when the models or the replies do: a change of a
judge's strides keeps every weight's shape, so a coordinator and a site on different releases
would load each other's weights without an error and compute something else. The fingerprint
below covers what the shapes do not show (module types, strides, padding, groups, norms, heads)
for each preset, dimension and paired/unpaired model, and the training noise schedule, plus the
declared replies and the phases; it is pinned per version. It is a tripwire, not a proof: it
does not see code inside a module's forward (the autoencoder's activations are functional calls
in MONAI), the request fields, or how a site uses them; a change there needs the bump by hand.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.packed import pack
from common.protocol import (
    PROTOCOL_VERSION,
    AuditRequest,
    EvaluateRequest,
    LatentStatsRequest,
    ProtocolVersionError,
    RunRef,
    TrainRequest,
    query_task,
    reply_fields,
)
from ldm_core.classifier import make_classifier
from ldm_core.config import build_config
from ldm_core.models import make_autoencoder, make_denoiser, make_train_scheduler
from ldm_core.phases import PHASES

# The fingerprint of each protocol version. A red test here means the models, the replies or
# the phases changed: bump PROTOCOL_VERSION in common/protocol.py and add its fingerprint (the
# failure prints it). Never edit an old entry.
FINGERPRINTS = {
    1: "0d96d60f2d96cea2f1b45358d6398ce568675eb05f4ac4268869d949b72a8f16",
    # the same models and replies; the run config gained ae_init "public-generic"
    2: "0d96d60f2d96cea2f1b45358d6398ce568675eb05f4ac4268869d949b72a8f16",
    # the same models and replies; every ArrayRecord travels packed (common.packed), and the
    # fingerprint now covers that wire form
    3: "a3be285b6b9ab953e8318316d4968632d6e8ddea74f4ecc63146f570f1b56fcc",
}

_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
          "groups", "padding_mode", "output_padding", "num_groups", "num_channels", "eps",
          "affine", "normalized_shape", "in_features", "out_features", "num_embeddings",
          "embedding_dim", "scale_factor", "mode", "align_corners", "pad", "p",
          "negative_slope", "inplace", "num_heads", "head_dim", "scale")


def _module_spec(model: torch.nn.Module) -> list[Any]:
    spec: list[Any] = []
    for name, mod in model.named_modules():
        attrs = {a: repr(getattr(mod, a)) for a in _ATTRS if hasattr(mod, a)
                 and not callable(getattr(mod, a))}
        spec.append([name, type(mod).__name__, attrs])
    spec += [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    return spec


def protocol_fingerprint() -> str:
    """What a request's weights mean and what a reply may carry, as one hash."""
    classes = ("a", "b", "c", "d")
    spec: dict[str, Any] = {}
    plans = {f"{preset}-{dims}d{'-paired' if masks else ''}": (preset, {
        "model.spatial_dims": dims, "model.mask_channels": masks, "autoencoder.rounds": 1})
        for preset in ("tiny", "quick", "standard") for dims in (2, 3) for masks in (0, 1)}
    for name, (preset, overrides) in plans.items():
        cfg = build_config(preset=preset, class_names=classes, overrides=overrides)
        sched = make_train_scheduler(cfg.model)
        spec[name] = {"autoencoder": _module_spec(make_autoencoder(cfg.model)),
                      "denoiser": _module_spec(make_denoiser(cfg.model)),
                      "schedule": [sched.prediction_type, sched.num_train_timesteps,
                                   [round(float(b), 8) for b in sched.betas[::50]]]}
    for dims in (2, 3):
        spec[f"judge-{dims}d"] = _module_spec(make_classifier(len(classes), dims))
    spec["replies"] = {kind: [[f.record, f.name, f.kind.name] for f in fields]
                       for kind, fields in reply_fields().items()}
    spec["phases"] = [[p.name, p.prefix, p.checkpoint_key, p.needs_autoencoder]
                      for p in PHASES.values()]
    # How weights travel (since version 3): the wire form of a small record.
    wire = pack(ArrayRecord({"w": torch.zeros(2, 3), "n": torch.zeros(1, dtype=torch.int64)}))
    spec["wire"] = [[k, a.dtype, list(a.shape)] for k, a in wire.items()]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def test_the_models_and_replies_are_those_of_this_protocol_version() -> None:
    got = protocol_fingerprint()
    assert FINGERPRINTS.get(PROTOCOL_VERSION) == got, (
        "the models, the replies or the phases changed under protocol version "
        f"{PROTOCOL_VERSION}: a site on the previous release would load the new weights into "
        f"other networks. Bump PROTOCOL_VERSION in common/protocol.py and add "
        f"{PROTOCOL_VERSION + 1}: {got!r} to FINGERPRINTS in {__file__}")


def _requests() -> dict[str, RecordDict]:
    run = RunRef("{}", "r", 0)
    empty = torch.nn.Linear(1, 1).state_dict()

    return {
        "train request": TrainRequest(run, "autoencoder", 1, ArrayRecord(empty)).to_record(),
        "latent-stats request": LatentStatsRequest(run, ArrayRecord(empty)).to_record(),
        "audit request": AuditRequest(run, ArrayRecord(empty), ArrayRecord(empty),
                                      1.0).to_record(),
        "evaluate request": EvaluateRequest(run, ArrayRecord(empty), ArrayRecord(
            {"images": torch.zeros(2, 1, 4, 4)})).to_record(),
    }


PARSERS = {"train request": TrainRequest.from_record,
           "latent-stats request": LatentStatsRequest.from_record,
           "audit request": AuditRequest.from_record,
           "evaluate request": EvaluateRequest.from_record}


@pytest.mark.parametrize("kind", list(PARSERS))
@pytest.mark.parametrize("version", [None, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1,
                                     float(PROTOCOL_VERSION), "1", True])
def test_every_request_of_another_version_is_refused_first(kind: str, version: object) -> None:
    """Checked before anything else: a newer coordinator's extra record or new phase must get
    the version reason, not 'undeclared records' or 'unknown phase'."""
    good = _requests()[kind]
    PARSERS[kind](good)
    assert query_task(good) if kind != "train request" else True
    conf = {k: v for k, v in good["config"].items() if k != "protocol"}
    if version is not None:
        conf["protocol"] = version
    bad = RecordDict({**dict(good.items()), "config": ConfigRecord(conf),
                      "a-record-of-a-newer-release": ConfigRecord({"x": 1})})
    with pytest.raises(ProtocolVersionError, match=f"this site speaks {PROTOCOL_VERSION}"):
        PARSERS[kind](bad)
    if kind != "train request":
        with pytest.raises(ProtocolVersionError):
            query_task(bad)
