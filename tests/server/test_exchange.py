"""The coordinator's receive loop: looks for replies every POLL_S, stops when all are in."""

from __future__ import annotations

import pytest
from flwr.app import Message, MessageType, RecordDict

from server.exchange import POLL_S, send_and_receive


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower 1.42 stamps a Message with the running task's identity (a ServerApp sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class SlowGrid:
    """Push/pull like Flower's grids; node n's reply exists from `ready[n]` seconds on."""

    def __init__(self, clock: Clock, ready: dict[int, float]) -> None:
        self.clock, self.ready = clock, ready
        self.sent: dict[str, Message] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{i}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in sorted(ids):
            m = self.sent[mid]
            if self.clock.now >= self.ready[m.metadata.dst_node_id]:
                out.append(Message(RecordDict(), reply_to=m))
        return out


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]


def test_replies_are_collected_as_soon_as_the_last_one_exists() -> None:
    clock = Clock()
    grid = SlowGrid(clock, {1: 0.0, 2: 4.05, 3: 1.0})
    got = send_and_receive(grid, _messages([1, 2, 3]), timeout=60, clock=clock.time,
                           sleep=clock.sleep)
    assert sorted(grid.sent[r.metadata.reply_to_message_id].metadata.dst_node_id
                  for r in got) == [1, 2, 3]
    # Flower's own loop sleeps 3 s between looks: it would see the last reply at 6 s.
    assert 4.05 <= clock.now <= 4.05 + POLL_S + 1e-9
    assert max(clock.sleeps) <= POLL_S


def test_a_silent_node_is_waited_for_until_the_timeout_only() -> None:
    clock = Clock()
    grid = SlowGrid(clock, {1: 0.0, 2: float("inf")})
    got = send_and_receive(grid, _messages([1, 2]), timeout=10, clock=clock.time,
                           sleep=clock.sleep)
    assert len(got) == 1
    assert clock.now == 10.0  # not a poll interval more


def test_a_grid_without_push_and_pull_is_asked_with_its_own_send_and_receive() -> None:
    class Plain:
        def send_and_receive(self, messages, *, timeout):
            return [Message(RecordDict(), reply_to=m) for m in messages if timeout == 5]

    assert len(send_and_receive(Plain(), _messages([1, 2]), timeout=5)) == 2
