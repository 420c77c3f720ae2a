"""The coordinator's public entry point: a TLS-terminating reverse proxy that lets the sites
reach the SuperLink's Fleet API and nothing else.

Why: Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (register and
unregister site keys, submit and stop runs: `flwr supernode register`, `flwr run`) and the
ServerApp runtime API on ONE HTTP port, and the Control API has no authentication of its own in
open-source Flower: anyone holding the public ca.crt could register a key or remove a site. So
`fedldm coordinator start` binds the SuperLink to 127.0.0.1 and puts this proxy on the public
address. It presents the SuperLink's certificate, forwards only `POST` to the exact Fleet paths
a SuperNode calls (`ALLOWED_FLEET_PATHS`), and answers 403 to everything else.

Where the paths come from (flwr 1.42): `flwr/supernode/fleet_http_client.py` (FleetHttpClient,
the SuperNode's only transport: `supernode/start_client_internal.py` uses
`fleet_http_connection.http_request_response`, one unary `POST /v1/fleet/<rpc>` per call) and
`flwr/superlink/routers/fleet/router.py` (prefix `/v1/fleet`). The Control API lives under
`/v1/control/` (`superlink/routers/control/router.py`), the runtime API under `/v1/runtime/`
(`supercore/routers/runtime`), plus `/health` and FastAPI's `/docs` and `/openapi.json`.
`register-node` and `unregister-node` of the Fleet API are only used by SuperNodes without an
auth key (self-registration); with SuperNode authentication on, the SuperLink refuses them
anyway, and this proxy does not even forward them.

What is bounded: request head (`max_header_bytes`), request body (`max_body_bytes`, checked on
Content-Length before any byte is forwarded; bodies without a length are refused with 411),
open connections, and time (TLS handshake, waiting for a request head, receiving a body, waiting
for the SuperLink's answer). HTTP/1.1 only (the SuperNode's httpx client speaks it).

Standard library + h11 (a dependency of httpx/uvicorn, both Flower dependencies). Run as
`python -m common.proxy ...`; `fedldm coordinator start` starts and supervises it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import h11

__all__ = ["ALLOWED_FLEET_PATHS", "SELF_REGISTRATION_PATHS", "Limits", "allowed_routes",
           "FleetProxy", "main"]

# What an authenticated SuperNode calls (flwr 1.42, supernode/fleet_http_client.py).
ALLOWED_FLEET_PATHS = (
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)
# Only SuperNodes without an auth key call these (insecure trials: no SuperNode authentication).
SELF_REGISTRATION_PATHS = ("/v1/fleet/register-node", "/v1/fleet/unregister-node")

# Hop-by-hop headers (RFC 9110 7.6.1) and those this proxy handles itself: never forwarded.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"expect", b"proxy-authorization",
                         b"proxy-authenticate"})


def allowed_routes(self_registration: bool = False) -> frozenset[tuple[bytes, bytes]]:
    """(method, exact request target) pairs forwarded to the SuperLink."""
    paths: Iterable[str] = ALLOWED_FLEET_PATHS
    if self_registration:
        paths = (*ALLOWED_FLEET_PATHS, *SELF_REGISTRATION_PATHS)
    return frozenset((b"POST", p.encode("ascii")) for p in paths)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024  # Flower chunks arrays at 5 MB per object
    max_header_bytes: int = 16 * 1024
    max_connections: int = 256
    handshake_timeout_s: float = 15.0
    head_timeout_s: float = 30.0  # waiting for a whole request head (idle keep-alive included)
    read_timeout_s: float = 30.0  # silence while receiving a body
    body_timeout_s: float = 600.0  # a whole request body
    upstream_timeout_s: float = 300.0  # the SuperLink's answer (head), and silence within it


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


# An upstream connection idle longer than this is not reused: the SuperLink's uvicorn closes
# idle keep-alive connections after 5 s, and a request sent into that close would fail.
UPSTREAM_REUSE_S = 2.0


@dataclass
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.writer.close()

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def fresh(self) -> bool:
        return (time.monotonic() - self.last_used < UPSTREAM_REUSE_S
                and not self.reader.at_eof())


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader,
                      read_timeout: float | None = None) -> object:
    """The next h11 event, reading (each read bounded by read_timeout) as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if read_timeout is None:
            data = await reader.read(65536)
        else:
            data = await asyncio.wait_for(reader.read(65536), read_timeout)
        conn.receive_data(data)  # b"" = end of stream


def _log(msg: str) -> None:
    print(f"fedldm proxy: {msg}", file=sys.stderr, flush=True)


class FleetProxy:
    """Listen on (host, port) with TLS (or plain HTTP when `server_ssl` is None) and forward the
    allowlisted Fleet requests to the SuperLink at 127.0.0.1:upstream_port."""

    def __init__(self, *, host: str, port: int, upstream_port: int,
                 server_ssl: ssl.SSLContext | None, upstream_ssl: ssl.SSLContext | None,
                 routes: frozenset[tuple[bytes, bytes]] | None = None,
                 limits: Limits | None = None, upstream_host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.server_ssl, self.upstream_ssl = server_ssl, upstream_ssl
        self.routes = allowed_routes() if routes is None else routes
        self.limits = limits or Limits()
        self.active = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.server_ssl,
            ssl_handshake_timeout=self.limits.handshake_timeout_s if self.server_ssl else None,
            backlog=128)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    # -- one client connection ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = peer[0] if isinstance(peer, tuple) else str(peer)
        if self.active >= self.limits.max_connections:
            writer.close()
            return
        self.active += 1
        upstream: _Upstream | None = None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.limits.head_timeout_s):
                        event = await _next_event(conn, reader)
                except TimeoutError:
                    if conn.trailing_data[0]:  # a head was started, not finished: slowloris
                        await self._refuse(conn, writer, 408, "request head too slow", peer_s)
                    return  # else an idle keep-alive connection: just close it
                except h11.RemoteProtocolError as e:
                    await self._refuse(conn, writer, e.error_status_hint, f"bad request ({e})",
                                       peer_s)
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or junk): nothing more to serve
                try:
                    length = self._check(event)
                except _Refused as r:
                    await self._refuse(conn, writer, r.status, r.why, peer_s, event)
                    return
                if upstream is not None and not upstream.fresh():
                    upstream.close()
                    upstream = None
                if upstream is None:
                    try:
                        upstream = await self._open_upstream()
                    except (OSError, TimeoutError, ssl.SSLError) as e:
                        await self._refuse(conn, writer, 502, f"SuperLink unreachable ({e})",
                                           peer_s, event)
                        return
                if not await self._forward(event, length, conn, reader, writer, upstream, peer_s):
                    return
                upstream.last_used = time.monotonic()
                if not upstream.reusable():
                    upstream.close()
                    upstream = None
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                if upstream is not None:
                    upstream.conn.start_next_cycle()
        except (ConnectionError, ssl.SSLError, h11.LocalProtocolError, TimeoutError):
            pass
        finally:
            self.active -= 1
            if upstream is not None:
                upstream.close()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    def _check(self, req: h11.Request) -> int:
        """The request's Content-Length, or _Refused (431 head too large, 403 not allowlisted,
        411, 413)."""
        # h11 bounds only a head still arriving; one that came in a single read is whole here.
        head = len(req.method) + len(req.target) + sum(len(k) + len(v) + 4 for k, v in req.headers)
        if head > self.limits.max_header_bytes:
            raise _Refused(431, "request head too large")
        if (req.method, req.target) not in self.routes:
            raise _Refused(403, "not a Fleet API call")
        lengths = [v for k, v in req.headers if k == b"content-length"]
        if not lengths:
            raise _Refused(411, "a Content-Length is required")
        length = int(lengths[0])  # h11 has checked it is a number, and that there is one
        if length > self.limits.max_body_bytes:
            raise _Refused(413, f"body of {length} bytes exceeds {self.limits.max_body_bytes}")
        return length

    async def _open_upstream(self) -> _Upstream:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.upstream_host, self.upstream_port, ssl=self.upstream_ssl,
            server_hostname=self.upstream_host if self.upstream_ssl else None,
            limit=2**20), self.limits.handshake_timeout_s)
        return _Upstream(reader, writer)

    async def _forward(self, req: h11.Request, length: int, conn: h11.Connection,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       up: _Upstream, peer: str) -> bool:
        """Relay one request and its answer; False when the connection must end."""
        headers = [(k, v) for k, v in req.headers if k not in _HOP_BY_HOP]
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            up.writer.write(up.conn.send(h11.Request(method=req.method, target=req.target,
                                                     headers=headers)))
            received = 0
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    event = await _next_event(conn, reader, self.limits.read_timeout_s)
                    if isinstance(event, h11.Data):
                        received += len(event.data)
                        up.writer.write(up.conn.send(h11.Data(data=event.data)))
                        await up.writer.drain()
                    elif isinstance(event, h11.EndOfMessage):
                        up.writer.write(up.conn.send(h11.EndOfMessage()))
                        await up.writer.drain()
                        break
                    else:
                        return False  # the client went away mid-body
        except TimeoutError:
            await self._refuse(conn, writer, 408, f"request body too slow ({received} of "
                               f"{length} bytes)", peer, req)
            return False
        except h11.RemoteProtocolError as e:
            await self._refuse(conn, writer, 400, f"bad request body ({e})", peer, req)
            return False
        except (OSError, h11.ProtocolError) as e:
            await self._refuse(conn, writer, 502, f"SuperLink connection failed ({e})", peer,
                               req)
            return False

        started = False
        try:
            async with asyncio.timeout(self.limits.upstream_timeout_s):
                event = await _next_event(up.conn, up.reader)
                while isinstance(event, h11.InformationalResponse):
                    event = await _next_event(up.conn, up.reader)
            if not isinstance(event, h11.Response):
                raise h11.RemoteProtocolError("no response from the SuperLink")
            writer.write(conn.send(h11.Response(
                status_code=event.status_code, reason=event.reason,
                headers=[(k, v) for k, v in event.headers if k not in _HOP_BY_HOP])))
            started = True
            while True:
                event = await _next_event(up.conn, up.reader, self.limits.upstream_timeout_s)
                if isinstance(event, h11.Data):
                    writer.write(conn.send(h11.Data(data=event.data)))
                    await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    return True
                else:
                    return False  # the SuperLink closed mid-answer: the client sees a cut
        except (TimeoutError, OSError, h11.ProtocolError) as e:
            if not started:
                status = 504 if isinstance(e, TimeoutError) else 502
                await self._refuse(conn, writer, status, f"SuperLink did not answer ({e!r})",
                                   peer, req)
            return False

    async def _refuse(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                      why: str, peer: str, req: h11.Request | None = None) -> None:
        """Answer `status` with a one-line body and close (the body, if any, is not read)."""
        what = f"{req.method.decode('ascii', 'replace')} {req.target[:200]!r}" if req else "-"
        _log(f"{status} {what} from {peer}: {why}")
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {why}\n".encode()
        try:
            writer.write(conn.send(h11.Response(status_code=status, headers=[
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close")])))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, h11.ProtocolError, TimeoutError):
            pass


# ---------------------------------------------------------------------------------------------
# command line: `python -m common.proxy`


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_context(ca_certfile: str) -> ssl.SSLContext:
    """Verify the SuperLink's certificate chain against the consortium CA. The host name is not
    checked: the upstream is 127.0.0.1, reached without any name resolution."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certfile)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True, help="public listen address")
    p.add_argument("--port", type=int, required=True, help="public listen port")
    p.add_argument("--upstream-port", type=int, required=True,
                   help="the SuperLink's port on 127.0.0.1")
    p.add_argument("--certfile", help="certificate presented to the sites (superlink.crt)")
    p.add_argument("--keyfile", help="its private key (superlink.key)")
    p.add_argument("--ca-certfile", help="CA that signed the SuperLink's certificate (ca.crt)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    p.add_argument("--allow-self-registration", action="store_true",
                   help="also forward Fleet register-node/unregister-node (no node auth)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    return p


async def _amain(args: argparse.Namespace) -> int:
    if args.insecure:
        server_ssl = upstream_ssl = None
    else:
        if not (args.certfile and args.keyfile and args.ca_certfile):
            _log("--certfile, --keyfile and --ca-certfile are required without --insecure")
            return 2
        server_ssl = server_context(args.certfile, args.keyfile)
        upstream_ssl = upstream_context(args.ca_certfile)
    proxy = FleetProxy(host=args.host, port=args.port, upstream_port=args.upstream_port,
                       server_ssl=server_ssl, upstream_ssl=upstream_ssl,
                       routes=allowed_routes(args.allow_self_registration),
                       limits=Limits(max_body_bytes=args.max_body_bytes))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: _log(
        f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    try:
        await proxy.start()
    except OSError as e:
        _log(f"cannot listen on {args.host}:{args.port}: {e}")
        return 1
    stop = asyncio.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    names = ", ".join(sorted(p.decode().rsplit("/", 1)[1] for _, p in proxy.routes))
    _log(f"listening on {args.host}:{args.port} ({'HTTP' if args.insecure else 'HTTPS'}); "
         f"forwarding only POST /v1/fleet/{{{names}}} to 127.0.0.1:{args.upstream_port}; "
         "everything else: 403")
    started = time.monotonic()
    await stop.wait()
    await proxy.close()
    _log(f"stopped after {time.monotonic() - started:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_amain(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
