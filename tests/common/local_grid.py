"""An in-process Flower Grid: the real Coordinator talks to real ClientApps without a runtime.

Why: the protocol and hostile-site tests need to see (and tamper with) every reply of a whole
federation, which Flower's Ray simulation keeps in worker processes. Messages are built and
answered with Flower's own Message/RecordDict types, exactly as the runtime hands them over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

Tamper = Callable[[int, Message], Message | None]


class LocalGrid:
    """Nodes 101, 102, ... each run `app` with node config {"partition-id": k}."""

    def __init__(self, app: ClientApp, n_sites: int, tamper: Tamper | None = None,
                 unavailable: Callable[[int, Message], bool] | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.tamper, self.unavailable = app, tamper, unavailable
        self.pushed = 0
        self.nodes = {101 + k: Context(run_id=1, node_id=101 + k,
                                       node_config={"partition-id": k}, state=RecordDict(),
                                       run_config={}) for k in range(n_sites)}
        self.exchanges: list[tuple[int, Message, Message]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        out = []
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"msg-{self.pushed}"  # as push_messages does
            node = msg.metadata.dst_node_id
            if self.unavailable is not None and self.unavailable(node, msg):
                # What the SuperLink answers for a node that went offline (crashed): an error
                # from its own id, in reply to the message.
                out.append(create_message_error_unavailable_res_message(msg.metadata,
                                                                        "node_unavail"))
                continue
            reply = self.app(msg, self.nodes[node])
            reply.metadata.__dict__["_src_node_id"] = node  # what the runtime stamps
            if self.tamper is not None:
                reply = self.tamper(node, reply)
                if reply is None:  # lost on the way, as when a SuperNode dies mid-round
                    continue
            self.exchanges.append((node, msg, reply))
            out.append(reply)
        return out
