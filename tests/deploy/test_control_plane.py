"""Who can reach what on a running coordinator (`fedldm coordinator start`, TLS + node auth).

The attack this guards against: with only the public ca.crt, an outsider registered its own
site key and unregistered a legitimate site through the SuperLink's Control API, which Flower
1.42 serves on the same port as the sites' Fleet API. Now the SuperLink listens on 127.0.0.1
only and the public port is the Fleet-only proxy (common/proxy.py):

- a SuperNode's Fleet calls go through (a real signed ActivateNode with a registered key);
- Control (register/unregister/list nodes, start/stop runs), runtime and anything else: 403,
  also through Flower's own `flwr` CLI (what `fedldm coordinator register-site` uses);
- the SuperLink's own port is bound to the loopback address only;
- request bodies and heads above the bounds are refused before they reach the SuperLink;
- if the proxy dies, the coordinator stops the SuperLink too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.procs import (
    REPO,
    Proc,
    descendants,
    fedldm_cmd,
    fedldm_inprocess,
    free_port,
    wait_for_port,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is not installed: deploy/certs/generate.sh needs "
                                "it to make the CA and the SuperLink's TLS certificate")

MAX_MIB = 1  # the coordinator below accepts request bodies up to 1 MiB


@dataclass
class Coordinator:
    root: Path
    certs: Path
    port: int  # public: the proxy
    local_port: int  # the SuperLink, 127.0.0.1 only
    proc: Proc

    def public(self) -> list[str]:
        return ["--superlink", f"127.0.0.1:{self.port}", "--certs", str(self.certs)]

    def local(self) -> list[str]:
        return ["--superlink", f"127.0.0.1:{self.local_port}", "--certs", str(self.certs)]

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs / "ca.crt"))


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("control-plane")
    certs = root / "certs"
    subprocess.run(["bash", str(REPO / "deploy" / "certs" / "generate.sh"), "--out", str(certs),
                    "--sites", "site-a,site-b,outsider"], check=True, capture_output=True,
                   timeout=60)
    (root / "logs").mkdir()
    port, local_port = free_port(), free_port()
    proc = Proc("coordinator", [*fedldm_cmd(), "coordinator", "start", "--port", str(port),
                                "--local-port", str(local_port), "--state-dir",
                                str(root / "state"), "--certs", str(certs),
                                "--max-request-mib", str(MAX_MIB)], root / "logs")
    try:
        wait_for_port(port, proc, timeout=90)
        yield Coordinator(root, certs, port, local_port, proc)
    finally:
        proc.stop()


def _register(coord: Coordinator, site: str) -> int:
    code, out, err = fedldm_inprocess("coordinator", "register-site",
                                      str(coord.certs / "sites" / site / "auth.key.pub"),
                                      *coord.local(), "--name", site)
    assert code == 0, err
    return int(re.search(r"(?:as node (\d+))", out).group(1))


def _node_ids(coord: Coordinator) -> set[int]:
    code, out, err = fedldm_inprocess("coordinator", "sites", *coord.local())
    assert code == 0, err
    return {int(m) for m in re.findall(r"^(\d+)\s", out, re.M)}


def _post(coord: Coordinator, path: str, **kw: object) -> httpx.Response:
    with httpx.Client(verify=coord.tls(), timeout=30) as client:
        return client.post(coord.url(path), headers={"content-type": "application/protobuf"},
                           **kw)


def _raw(coord: Coordinator, head: bytes, body: bytes = b"") -> bytes:
    """One raw HTTP/1.1 exchange over TLS (for what httpx will not send)."""
    with socket.create_connection(("127.0.0.1", coord.port), timeout=30) as sock, \
            coord.tls().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_site_s_fleet_calls_go_through(coord: Coordinator) -> None:
    """What a SuperNode does first: a signed ActivateNode with its registered key."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
        ActivateNodeRequest,
        DeactivateNodeRequest,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    node_id = _register(coord, "site-a")
    key = load_ssh_private_key((coord.certs / "sites" / "site-a" / "auth.key").read_bytes(), None)
    with FleetHttpClient.from_server_address(
            f"127.0.0.1:{coord.port}", False, str(coord.certs / "ca.crt"),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())]) as client:
        res = client.ActivateNode(ActivateNodeRequest(
            public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=30))
        assert res.node_id == node_id
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    # Unsigned: forwarded, and refused by the SuperLink's own node authentication (not by us).
    res = _post(coord, "/v1/fleet/get-run", content=b"")
    assert res.status_code == 401, res.text
    assert "SuperNode authentication" in res.text


@pytest.mark.parametrize("path", [
    "/v1/control/register-node", "/v1/control/unregister-node", "/v1/control/list-nodes",
    "/v1/control/start-run", "/v1/control/stop-run", "/v1/control/list-runs",
    "/v1/control/stream-logs", "/v1/control/add-node-to-federation",
    "/v1/runtime/get-nodes", "/v1/runtime/push-messages", "/v1/runtime/create-task",
    # self-registration is for SuperNodes without a key; with node auth it has no use
    "/v1/fleet/register-node", "/v1/fleet/unregister-node",
    "/docs", "/openapi.json", "/health", "/", "/v1/fleet/", "/v1/fleet/nope",
    # spellings that a prefix match or a path normaliser could let through
    "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes",
    "/v1/fleet/get-run/../../control/list-nodes", "//v1/control/list-nodes",
    "/v1/fleet/get-run?x=1", "/V1/CONTROL/list-nodes", "/v1/fleet/get-run/",
])
def test_everything_else_is_403_with_only_the_ca(coord: Coordinator, path: str) -> None:
    res = _post(coord, path, content=b"")
    assert res.status_code == 403, (path, res.status_code, res.text)
    # Not on GET either: only POST to the exact Fleet paths.
    with httpx.Client(verify=coord.tls(), timeout=30) as client:
        assert client.get(coord.url("/v1/fleet/get-run")).status_code == 403


def test_absolute_form_targets_are_403(coord: Coordinator) -> None:
    data = _raw(coord, b"POST https://127.0.0.1/v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 403"), data


def test_the_outsider_attack_fails_through_the_public_port(coord: Coordinator) -> None:
    """The reported attack, with Flower's own CLI: register a key, unregister a real site."""
    victim = _register(coord, "site-b")
    before = _node_ids(coord)
    outsider = coord.certs / "sites" / "outsider" / "auth.key.pub"
    code, out, err = fedldm_inprocess("coordinator", "register-site", str(outsider),
                                      *coord.public())
    assert code != 0, out + err
    assert "403" in err or "forbidden" in err.lower(), err
    assert "loopback port" in err  # says where such commands belong
    code, out, err = fedldm_inprocess("coordinator", "unregister-site", str(victim),
                                      *coord.public())
    assert code != 0, out + err
    code, out, err = fedldm_inprocess("coordinator", "sites", *coord.public())
    assert code != 0, out + err
    assert _node_ids(coord) == before and victim in before


def test_superlink_port_is_bound_to_loopback_only(coord: Coordinator) -> None:
    listening = _listening_addresses()
    assert listening.get(coord.local_port) == {"127.0.0.1"}, listening.get(coord.local_port)
    # The default public address is loopback too (exposing it is an explicit --host).
    assert listening.get(coord.port) == {"127.0.0.1"}, listening.get(coord.port)
    # Flower's legacy gRPC servers (env switches) are not started: nothing else listens.
    ours = {p for p, hosts in listening.items() if p in (9091, 9092, 9093)}
    assert not ours or all(listening[p] <= {"127.0.0.1", "::1"} for p in ours)
    other = _non_loopback_address()
    if other is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            assert s.connect_ex((other, coord.local_port)) != 0, f"{other}:{coord.local_port}"


def test_request_bounds(coord: Coordinator) -> None:
    limit = MAX_MIB * 1024 * 1024
    # Announced too large: refused on the head, nothing read or forwarded.
    data = _raw(coord, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/protobuf\r\nContent-Length: 10000000000\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413"), data
    res = _post(coord, "/v1/fleet/push-object", content=b"\0" * (limit + 1))
    assert res.status_code == 413
    # At the bound: forwarded (the SuperLink answers: not a protobuf, or not signed).
    assert _post(coord, "/v1/fleet/push-object", content=b"\0" * limit).status_code in (400, 401)
    # No length (chunked): refused, the size could not be bounded up front.
    res = _post(coord, "/v1/fleet/push-object", content=iter([b"\0" * 10]))
    assert res.status_code == 411
    # An oversized head.
    data = _raw(coord, b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40000
                + b"\r\nContent-Length: 0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431"), data


def test_state_is_private(coord: Coordinator) -> None:
    state = coord.root / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    made = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "superlink.db" for p in made)
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in made if p.stat().st_mode & 0o077]
    assert not loose


def test_the_coordinator_stops_when_its_proxy_dies(tmp_path: Path) -> None:
    port, local_port = free_port(), free_port()
    proc = Proc("coordinator", [*fedldm_cmd(), "coordinator", "start", "--insecure", "--port",
                                str(port), "--local-port", str(local_port), "--state-dir",
                                str(tmp_path / "state")], tmp_path)
    try:
        wait_for_port(port, proc, timeout=90)
        proxies = [pid for pid in descendants(proc.proc.pid)
                   if b"common.proxy" in _cmdline(pid)]
        assert len(proxies) == 1, proc.tail()
        os.kill(proxies[0], signal.SIGKILL)
        code = proc.wait(timeout=60)
        assert code not in (None, 0), proc.tail()
        assert "stopping the others" in proc.log()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and local_port in _listening_addresses():
            time.sleep(0.2)
        assert local_port not in _listening_addresses(), "the SuperLink outlived its proxy"
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _listening_addresses() -> dict[int, set[str]]:
    """port -> local addresses of the TCP sockets in LISTEN state (from /proc/net/tcp{,6})."""
    out: dict[int, set[str]] = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            out.setdefault(int(port_hex, 16), set()).add(addr)
    if not out:
        pytest.skip("/proc/net/tcp is not readable here")
    return out


def _non_loopback_address() -> str | None:
    """One of this machine's own non-loopback IPv4 addresses (from /proc/net/fib_trie), if any."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return None
    for prev, line in zip(lines, lines[1:], strict=False):
        if "/32 host LOCAL" in line:
            addr = prev.strip().split()[-1]
            if not addr.startswith("127."):
                return addr
    return None


# ---------------------------------------------------------------------------------------------
# the proxy alone, in-process, plain HTTP, against a stand-in upstream (no Flower, no TLS)


def test_proxy_keeps_alive_relays_bodies_and_reports_a_missing_superlink() -> None:
    import asyncio

    from common.proxy import FleetProxy, Limits

    seen: list[tuple[str, bytes]] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            body = await reader.readexactly(length)
            seen.append((head.split(b" ")[1].decode(), body))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body) + 3, b"ok:" + body))
            await writer.drain()

    async def scenario() -> None:
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]
        proxy = FleetProxy(host="127.0.0.1", port=0, upstream_port=up_port, server_ssl=None,
                           upstream_ssl=None, limits=Limits(max_body_bytes=100))
        await proxy.start()
        port = proxy._server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for body in (b"one", b"two" * 30):  # one client connection, kept alive
                res = await client.post("/v1/fleet/get-run", content=body)
                assert (res.status_code, res.content) == (200, b"ok:" + body)
            assert (await client.post("/v1/fleet/get-run", content=b"x" * 101)).status_code == 413
            assert (await client.post("/v1/control/list-nodes")).status_code == 403
            up.close()
            await up.wait_closed()
            proxy.upstream_port = free_port()  # nothing listens there
            res = await client.post("/v1/fleet/get-run", content=b"")
            assert res.status_code == 502
        await proxy.close()

    asyncio.run(scenario())
    assert seen == [("/v1/fleet/get-run", b"one"), ("/v1/fleet/get-run", b"two" * 30)]
