"""Send one batch of messages and collect their replies, looking for replies often.

Why not `Grid.send_and_receive`: Flower 1.42's HTTP grid (what a ServerApp gets in a deployment)
sleeps a fixed 3 s between two looks for replies, so the last site's reply waits 1.5 s on average
and up to 3 s before the coordinator sees it, in every round and every query. A look is one
request from the ServerApp to its own SuperLink on the same machine (a database read), so looking
every `POLL_S` costs nothing a round would notice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message

POLL_S = 0.2


def send_and_receive(grid: Any, messages: Iterable[Message], *, timeout: float,
                     poll_s: float = POLL_S, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> list[Message]:
    """Push `messages` through `grid` and return the replies that arrive within `timeout` s.

    The same contract as Flower's `Grid.send_and_receive` (replies in arrival order; a message
    without a reply within the timeout simply has none). A grid without `push_messages` and
    `pull_messages` (a test double) is asked with its own `send_and_receive`."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = {i for i in grid.push_messages(messages) if i}  # None: a message not pushed
    end = clock() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        left = end - clock()
        if not waiting or left <= 0:
            break
        sleep(min(poll_s, left))
    return replies
