"""client.site_worker's task loop (the deployment path is exercised end to end in
tests/deploy/test_e2e.py and tests/deploy/test_kills_deploy.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskResponse
from flwr.proto.task_pb2 import Task

from client import site_worker


class _FakeRuntime:
    """AcquireTask hands out the given tokens, then nothing."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = list(tokens)

    def AcquireTask(self, _req: Any) -> AcquireTaskResponse:  # noqa: N802 - Flower's name
        if not self.tokens:
            return AcquireTaskResponse()
        token = self.tokens.pop(0)
        return AcquireTaskResponse(task=Task(task_id=len(self.tokens) + 1), token=token)


def test_a_task_stuck_on_the_network_does_not_hold_up_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message whose weights never arrive (the coordinator died while sending) blocks its
    task for up to Flower's pull limit; the next message must still be answered meanwhile."""
    release = threading.Event()
    second_served = threading.Event()
    served: list[str] = []

    def serve_task(_address: str, token: str, _app: Any) -> str:
        served.append(token)
        if token == "stuck":
            assert release.wait(timeout=60), "the stuck task was never released"
        else:
            second_served.set()
        return "completed"

    monkeypatch.setattr(site_worker, "_client", lambda *_a, **_k: _FakeRuntime(["stuck", "next"]))
    monkeypatch.setattr(site_worker, "serve_task", serve_task)
    loop = threading.Thread(target=site_worker.serve_forever, args=("127.0.0.1:1", b"s" * 32),
                            kwargs={"poll_s": 0.01, "max_tasks": 2}, daemon=True)
    loop.start()
    try:
        assert second_served.wait(timeout=15), f"only {served} were answered"
    finally:
        release.set()
    loop.join(timeout=60)
    assert not loop.is_alive() and served == ["stuck", "next"]


def test_a_failing_task_does_not_end_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[str] = []

    def serve_task(_address: str, token: str, _app: Any) -> str:
        served.append(token)
        if token == "bad":
            raise ConnectionError("the SuperNode went away mid-reply")
        return "completed"

    monkeypatch.setattr(site_worker, "_client", lambda *_a, **_k: _FakeRuntime(["bad", "good"]))
    monkeypatch.setattr(site_worker, "serve_task", serve_task)
    site_worker.serve_forever("127.0.0.1:1", b"s" * 32, poll_s=0.01, max_tasks=2)
    assert served == ["bad", "good"]
