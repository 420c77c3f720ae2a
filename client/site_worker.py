"""The site's own ClientApp runner: the code that touches a site's data is the site's, never the
coordinator's.

Why this exists. Flower's default (`flower-supernode --isolation subprocess`) runs, for every
message, a fresh `flwr-clientapp` process that installs the app bundle (FAB) the coordinator
submitted with the run and executes *its* ClientApp. The coordinator may be malicious: a bundle
whose ClientApp reads the images and returns them would bypass DP, the ledger and every check
in this package, and the site would only find out afterwards. `fedldm site start` therefore
starts the SuperNode with `--isolation process` (the SuperNode then launches nothing itself)
and this worker next to it. The worker takes each ClientApp task from the SuperNode's local
runtime API, exactly as Flower's own SuperExec does, and answers it with the ClientApp of the
fedldm installed at the site (`client.client_app.app`): the bundle's code is never installed or
imported; its hash goes to the site's log. What the coordinator still chooses is the message
(run config, weights, queries), which the site's handlers vet and charge as before.

A second effect is speed: the worker imports torch, MONAI and Opacus once, where Flower's
subprocess mode paid that start (about 3 s a message on a quiet core) plus the bundle
installation for every message, and it asks for tasks every POLL_S instead of every second.

Only the SuperNode on this machine can give it tasks (the runtime API listens on 127.0.0.1),
and taking a task needs the per-start secret in the state directory (0o600), so another local
user cannot take the site's messages either.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from ldm_core.logs import file_logger

__all__ = ["POLL_S", "SECRET_FILE", "write_secret", "serve_task", "serve_forever", "main"]

POLL_S = 0.2
MAX_CONCURRENT_TASKS = 8  # bounds the memory of tasks stuck on the network
SECRET_FILE = "superexec.secret"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
_LOG = logging.getLogger("fedldm.site_worker")


def write_secret(state_dir: Path) -> Path:
    """A fresh shared secret for this start (0o600), given to the SuperNode and the worker."""
    path = state_dir / SECRET_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    return path


def _client(address: str, *interceptors: object) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower's `run_clientapp.pull_task_input`, polling the local SuperNode every 50-500 ms.

    Why not Flower's: the SuperNode creates the task before it has pulled the message's weights
    from the SuperLink, and Flower's puller backs off 1, 2, 4, 8, 10 s while it waits, which put
    up to 20 s between a task and its training on loopback (its per-message process start used
    to absorb the first seconds). The SuperNode is on this machine: polling it fast is cheap.
    No per-object try limit (a large message on a slow link may take minutes to arrive), the
    same two-hour overall limit as Flower's."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for the task from the SuperNode's runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, max_tries_per_object=None, initial_backoff=0.05, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's runner sets it
    return message, context, run, fab


def serve_task(address: str, token: str, app: ClientApp) -> str:
    """Answer one ClientApp task with `app`; returns Flower's sub-status of the task.

    Mirrors `flwr.supernode.runtime.run_clientapp.run_clientapp` minus the bundle: the task's
    FAB is pulled (the API sends it) and only its hash is logged."""
    client = _client(address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        line = (f"run {run.run_id}: answering a {message.metadata.message_type} message with "
                f"this site's own ClientApp; the coordinator's app bundle {run.fab_id or '?'} "
                f"(fab {fab.hash_str}) is not executed")
        _LOG.info("%s", line)
        state_dir = str(context.node_config.get("state-dir", ""))
        if state_dir:
            file_logger(Path(state_dir) / "site.log").info("%s", line)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - Flower's own runner turns every failure into a reply
        _LOG.exception("ClientApp task failed")
        details = f"{type(exc).__name__}"  # the site's handlers already hide details
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status


def _serve_logged(address: str, token: str, app: ClientApp) -> None:
    try:
        serve_task(address, token, app)
    except Exception:  # noqa: BLE001 - a lost task expires at the SuperNode; keep serving
        _LOG.exception("could not hand a task's outcome back to the SuperNode")


def serve_forever(address: str, secret: bytes, *, poll_s: float = POLL_S,
                  max_tasks: int | None = None) -> None:
    """Take ClientApp tasks from the SuperNode at `address` and answer each in its own thread.

    Why threads: a task can block for a long time without computing (a message whose weights
    never fully arrived because the coordinator died while sending waits up to Flower's pull
    limit, two hours), and Flower's own runtime, a process per task, would still answer the
    next message meanwhile; so must this worker. Concurrent tasks are as safe as concurrent
    processes were: each has its own Context, and the ledger and reply store lock their files.
    The SuperNode may restart (`fedldm site start` retries a refused activation); a failed poll
    is logged and retried rather than ending the worker."""
    from client.client_app import app  # the heavy imports, once

    acquire = _client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={_ACQUIRE}))
    running: list[threading.Thread] = []
    served, failing = 0, False
    while max_tasks is None or served < max_tasks:
        running = [t for t in running if t.is_alive()]
        if len(running) >= MAX_CONCURRENT_TASKS:
            time.sleep(poll_s)
            continue
        try:
            res = acquire.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
            failing = False
        except Exception as exc:  # noqa: BLE001 - the SuperNode is (re)starting
            if not failing:
                _LOG.warning("runtime API at %s not answering (%s); retrying", address, exc)
            failing = True
            time.sleep(1.0)
            continue
        if res.HasField("task") and res.token:
            _LOG.info("task %d of run %d taken", res.task.task_id, res.task.run_id)
            thread = threading.Thread(target=_serve_logged, args=(address, res.token, app),
                                      name=f"task-{res.task.task_id}", daemon=True)
            thread.start()
            running.append(thread)
            served += 1
            continue
        time.sleep(poll_s)
    for thread in running:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.site_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api", required=True, help="the SuperNode's runtime API, HOST:PORT")
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (fedldm site start) ends")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s fedldm site worker: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call otherwise
    if a.parent_pid is not None:
        start_parent_process_monitor(a.parent_pid)
    try:
        secret = a.secret_file.read_bytes()
    except OSError as e:
        print(f"fedldm site worker: cannot read {a.secret_file} ({e}); it is written by "
              "`fedldm site start`", file=sys.stderr)
        return 2
    serve_forever(a.runtime_api, secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
