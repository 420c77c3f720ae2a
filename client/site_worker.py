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
import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from ldm_core.logs import file_logger

__all__ = ["POLL_S", "SECRET_FILE", "write_secret", "serve_task", "serve_forever", "main"]

POLL_S = 0.2
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


def serve_forever(address: str, secret: bytes, *, poll_s: float = POLL_S,
                  max_tasks: int | None = None) -> None:
    """Take ClientApp tasks from the SuperNode at `address` and answer them, one at a time.

    The SuperNode may restart (`fedldm site start` retries a refused activation); a failed poll
    is logged and retried rather than ending the worker."""
    from client.client_app import app  # the heavy imports, once

    acquire = _client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={_ACQUIRE}))
    served, failing = 0, False
    while max_tasks is None or served < max_tasks:
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
            try:
                serve_task(address, res.token, app)
            except Exception:  # noqa: BLE001 - a lost task expires at the SuperNode; keep serving
                _LOG.exception("could not hand a task's outcome back to the SuperNode")
            served += 1
            continue
        time.sleep(poll_s)


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
