"""Bytes a site sends and receives per training round, against the trained sub-model's size.

    .venv/bin/python benchmarks/bytes_per_round.py [--preset quick] [--transfer float16-delta] \
        [--set diffusion.train_only=class_embedding]

The messages are the protocol's own (common.protocol TrainRequest / TrainReply), serialised the
way Flower puts them on the wire (`flwr.common.serde.message_to_proto`), for each phase of the
preset: the reply carries the phase's model (its state dict: parameters and buffers) and the
DP scalars; the request carries the global model and, in the first round a site sees of a phase
that needs it, the frozen autoencoder. "Trained sub-model" is the float32 size of the phase's
trainable parameters (with a phase's `train_only`, only those parameters, and only they are in
the reply, as `client.tasks.train_round` sends them). Target: uplink bytes per round <= 1.05x
the trained sub-model, and about half of it with ``--transfer float16-delta``.
"Objects" counts what Flower 1.42 moves as separate HTTP requests between a SuperNode and the
SuperLink (the message, its records, each Array and each 5 MB chunk of one); fedldm packs a
record's tensors into one array per dtype (common.packed) so that this stays a handful.
Deterministic (no timing); prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json

from flwr.app import ArrayRecord, Message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from cli.args import override
from common.protocol import RunRef, TrainReply, TrainRequest, encode_update
from ldm_core.config import build_config
from ldm_core.phases import AUTOENCODER, PHASES
from ldm_core.training import frozen_names

TARGET = 1.05


def _wire_bytes(content: object, *, reply_to: Message | None = None) -> int:
    msg = (Message(content, reply_to=reply_to) if reply_to is not None
           else Message(content, dst_node_id=1, message_type="train"))
    return int(message_to_proto(msg).ByteSize())


def _objects(content: object) -> int:
    return len(get_all_nested_objects(Message(content, dst_node_id=1, message_type="train")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--transfer", default="float32", choices=("float32", "float16-delta"),
                    help="how the reply's weights travel (aggregation.transfer)")
    ap.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a runtime
    cfg = build_config(preset=args.preset, class_names=("cyst", "edema", "normal", "tumor"),
                       overrides=dict(args.set))
    run = RunRef(cfg.to_json(), "run-0123456789ab", 0)
    ae = AUTOENCODER.make_model(cfg.model)
    rows = []
    for name, spec in PHASES.items():
        model = spec.make_model(cfg.model)
        frozen = frozen_names(model, spec.config(cfg).train_only)
        trained_params = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
        trained = trained_params * 4
        weights = ArrayRecord(model.state_dict())
        first = TrainRequest(run, name, 1, weights,
                             autoencoder=ArrayRecord(ae.state_dict())
                             if spec.needs_autoencoder else None, scale_factor=1.0)
        later = TrainRequest(run, name, 2, weights, scale_factor=1.0)
        request = Message(first.to_record(), dst_node_id=1, message_type="train")
        sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trained_w = {k: v + 1e-3 if v.is_floating_point() else v for k, v in sent.items()
                     if k not in frozen}
        reply = TrainReply(site_id="site-0", weights=ArrayRecord(
            encode_update(trained_w, sent, args.transfer)), loss=0.1,
            epsilon=1.0, budget_epsilon=8.0, delta=1e-5, has_autoencoder=True)
        up = _wire_bytes(reply.to_record(), reply_to=request)
        row = {"phase": name, "transfer": args.transfer, "trained_params": trained_params,
               "train_only": list(spec.config(cfg).train_only),
            "trained_bytes": trained, "uplink_bytes": up,
            "downlink_first_round_bytes": _wire_bytes(first.to_record()),
            "downlink_later_round_bytes": _wire_bytes(later.to_record()),
            "uplink_over_trained": up / trained,
            "uplink_objects": _objects(reply.to_record()),
            "downlink_later_round_objects": _objects(later.to_record()),
            "buffers_bytes": sum(b.numel() * b.element_size() for b in model.buffers())}
        print(json.dumps(row))
        rows.append(row)
    print(f"\npreset {args.preset}, transfer {args.transfer}, overrides {dict(args.set)}; bytes "
          "as Flower serialises the messages")
    print("| phase | trained sub-model | uplink per round (x trained) | downlink first / later "
          "round | objects up / down | target uplink |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['trained_bytes'] / 1e6:.2f} MB | "
              f"{r['uplink_bytes'] / 1e6:.2f} MB ({r['uplink_over_trained']:.3f}x) | "
              f"{r['downlink_first_round_bytes'] / 1e6:.2f} / "
              f"{r['downlink_later_round_bytes'] / 1e6:.2f} MB | "
              f"{r['uplink_objects']} / {r['downlink_later_round_objects']} | <= {TARGET}x |")


if __name__ == "__main__":
    main()
