"""`fedldm coordinator ...`: the consortium side of a real deployment.

- `start` runs Flower's SuperLink with TLS, SuperNode authentication and a SQLite state
  database (registered sites and runs survive a restart), bound to 127.0.0.1 only, and in front
  of it the Fleet-only proxy (common/proxy.py) on the public `--host/--port`: the sites reach the
  Fleet API and nothing else; the Control API (register/unregister keys, submit runs) and the
  ServerApp runtime API stay on the loopback `--local-port`. Both run supervised together.
- `register-site` / `sites` / `unregister-site` manage which site public keys may connect
  (Flower 1.42: `flwr supernode register|ls|unregister` against the SuperLink's Control API),
  on the coordinator machine, through the loopback port (default --superlink 127.0.0.1:8001).
- `run` submits the fedldm app (`flwr run`) with the run options as run config, streams the
  coordinator's log, waits for the end and checks that the run folder is complete.

Why every `flwr` call gets a private, temporary FLWR_HOME: Flower 1.42 reads SuperLink
connections only from `$FLWR_HOME/config.toml`; writing the one connection we need there keeps the
operator's own ~/.flwr untouched and makes the command self-contained.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli import args as A
from cli.errors import BadInput, RuntimeFailure
from common import files, jsonio
from common.procs import Child, flower_env, flower_tool, run_supervised_group, warn
from common.tls import (
    check_auth_public_key,
    check_ca_file,
    check_readable,
    insecure_warning,
    parse_address,
)

CONNECTION = "fedldm"
DEFAULT_PUBLIC_PORT = 8000  # the proxy: what the sites connect to
DEFAULT_LOCAL_PORT = 8001  # the SuperLink itself, on 127.0.0.1 only
DEFAULT_SUPERLINK = f"127.0.0.1:{DEFAULT_LOCAL_PORT}"
DEFAULT_MAX_REQUEST_MIB = 64
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Environment variables that make flower-superlink open extra legacy gRPC servers on 0.0.0.0
# (flwr/superlink/cli/flower_superlink.py, SuperLinkLifespan.startup): never passed on.
LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
CHILD_UMASK = 0o077  # the SuperLink's database, logs and app files: this user only
CERT_FILES = ("ca.crt", "superlink.crt", "superlink.key")
RUN_OUTPUTS = ("checkpoints/final", "metrics.json", "report.html")
FLWR_CALL_TIMEOUT_S = 120.0


class CoordinatorCliError(BadInput):
    """Bad input to a coordinator command (exit 2); the message says what to do."""


class CoordinatorRunError(RuntimeFailure):
    """A coordinator step failed at run time (exit 1): a SuperLink that does not answer, too
    few sites online, a run that ended badly."""


# ---------------------------------------------------------------------------------------------
# talking to a SuperLink through the `flwr` CLI


@dataclass(frozen=True)
class Connection:
    address: str
    root_certificates: Path | None
    insecure: bool

    @staticmethod
    def from_args(args: argparse.Namespace) -> Connection:
        address = parse_address(args.superlink)
        ca = args.root_certificates
        if ca is None and getattr(args, "certs", None) is not None:
            ca = args.certs / "ca.crt"
        if args.insecure:
            if ca is not None:
                raise CoordinatorCliError("--insecure turns TLS off: drop --root-certificates/"
                                          "--certs, or drop --insecure")
            insecure_warning("CONNECTION")
            return Connection(address, None, True)
        if ca is None:
            warn("no --root-certificates/--certs: the SuperLink's certificate is checked "
                 "against the system CAs only")
            return Connection(address, None, False)
        return Connection(address, check_ca_file(ca, "--root-certificates"), False)

    def toml(self) -> str:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f"address = {json.dumps(self.address)}"]
        if self.insecure:
            lines.append("insecure = true")
        elif self.root_certificates is not None:
            lines.append(f"root-certificates = {json.dumps(str(self.root_certificates))}")
        return "\n".join(lines) + "\n"


class Flwr:
    """Runs `flwr` subcommands against one SuperLink from a private FLWR_HOME."""

    def __init__(self, conn: Connection, home: Path) -> None:
        self.conn = conn
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(home / "config.toml", conn.toml(), mode=0o600)
        self.env = dict(os.environ, FLWR_HOME=str(home))
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                            self.env.get("PATH", "")])

    def cmd(self, *args: str) -> list[str]:
        return [flower_tool("flwr"), *args]

    def json(self, *args: str, timeout: float = FLWR_CALL_TIMEOUT_S) -> dict[str, Any]:
        """`flwr ARGS --format json`; raises with Flower's own message when it fails."""
        try:
            proc = subprocess.run(self.cmd(*args, "--format", "json"), env=self.env,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise CoordinatorRunError(f"`flwr {' '.join(args)}` did not answer within "
                                      f"{timeout:.0f}s; is the SuperLink at "
                                      f"{self.conn.address} up?") from e
        doc = _last_json(proc.stdout)
        if doc is None or not doc.get("success", False):
            why = _clean((doc or {}).get("error-message") or proc.stderr or proc.stdout)
            if "unavailable" in why.lower():
                why += (" (if the SuperLink is up: the CA given must be the one that signed its "
                        "certificate, and the host must be in that certificate)")
            if "403" in why or "forbidden" in why.lower():
                why += (" (the coordinator's public port serves only the sites' Fleet API; run "
                        "this on the coordinator machine against its loopback port, "
                        f"--superlink {DEFAULT_SUPERLINK} unless `coordinator start` was given "
                        "another --local-port)")
            raise FlwrError(f"`flwr {' '.join(args)}` against {self.conn.address} failed: "
                            f"{why}")
        return doc


class FlwrError(CoordinatorRunError):
    """A `flwr` command failed; the message carries Flower's own explanation."""


def _clean(text: str) -> str:
    """Flower's error text without its progress chatter."""
    keep = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.startswith(("Using SuperLink", " Listing", "Listing"))]
    return " ".join(keep)


def _last_json(text: str) -> dict[str, Any] | None:
    """The last top-level JSON object in `text` (Flower may print notes before it)."""
    start = text.find("{")
    while start != -1:
        try:
            doc = json.loads(text[start:])
            return doc if isinstance(doc, dict) else None
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


@contextmanager
def flwr_session(conn: Connection) -> Iterator[Flwr]:
    with tempfile.TemporaryDirectory(prefix="fedldm-flwr-") as home:
        yield Flwr(conn, Path(home))


def online_sites(flwr: Flwr) -> list[dict[str, Any]]:
    return [n for n in flwr.json("supernode", "ls", CONNECTION).get("nodes", [])
            if n.get("status") == "online"]


# ---------------------------------------------------------------------------------------------
# coordinator start


def _check_certs(certs: Path) -> tuple[Path, Path, Path]:
    """ca.crt, superlink.crt, superlink.key from --certs; the certificate must chain to the CA."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    certs = certs.expanduser()
    paths = [check_readable(certs / name, "--certs", f"{name} from deploy/certs/generate.sh")
             for name in CERT_FILES]
    ca_path, crt_path, key_path = paths
    check_ca_file(ca_path, "--certs")
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        crt = x509.load_pem_x509_certificate(crt_path.read_bytes())
    except ValueError as e:
        raise CoordinatorCliError(f"--certs {crt_path}: not a PEM certificate ({e}); pass the "
                                  "folder written by deploy/certs/generate.sh") from e
    try:
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CoordinatorCliError(f"--certs {key_path}: not an unencrypted PEM private key "
                                  f"({e}); pass the folder written by deploy/certs/generate.sh"
                                  ) from e
    try:
        crt.verify_directly_issued_by(ca)
    except Exception as e:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        raise CoordinatorCliError(f"{crt_path} was not signed by {ca_path} ({type(e).__name__}); "
                                  "re-issue it: "
                                  "deploy/certs/generate.sh --out DIR --renew") from e
    left = crt.not_valid_after_utc.timestamp() - time.time()
    if left < 0:
        raise CoordinatorCliError(f"{crt_path} expired; re-issue it: deploy/certs/generate.sh "
                                  "--out DIR --renew (sites keep their ca.crt)")
    if left < 30 * 86400:
        warn(f"{crt_path} expires in {left / 86400:.0f} days; renew it with generate.sh --renew")
    if key_path.stat().st_mode & 0o007:
        warn(f"{key_path} is readable by any user; chmod 600 {key_path}")
    return ca_path, crt_path, key_path


@dataclass(frozen=True)
class StartPlan:
    """What `coordinator start` runs: the SuperLink on 127.0.0.1:local_port and the Fleet-only
    proxy on host:port, both with this environment."""

    superlink: list[str]
    proxy: list[str]
    env: dict[str, str]
    state: Path


def _private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except OSError as e:
        warn(f"cannot make {path} private (chmod 700): {e}")


def build_start_plan(args: argparse.Namespace) -> StartPlan:
    """Validate a `coordinator start` invocation (before creating anything); return the
    flower-superlink and proxy commands and their environment."""
    for flag, port in (("--port", args.port), ("--local-port", args.local_port)):
        if not 0 < port < 65536:
            raise CoordinatorCliError(f"{flag} {port}: must be in 1..65535")
    if args.local_port == args.port:
        raise CoordinatorCliError(f"--local-port {args.local_port} is also --port: the "
                                  "SuperLink's loopback port and the public port must differ")
    if args.max_request_mib < 1:
        raise CoordinatorCliError(f"--max-request-mib {args.max_request_mib}: must be >= 1")
    state = args.state_dir.expanduser().resolve()
    if state.exists() and not state.is_dir():
        raise CoordinatorCliError(f"--state-dir {state}: exists and is not a folder")
    superlink = [flower_tool("flower-superlink"), "--host", "127.0.0.1",
                 "--port", str(args.local_port), "--database", str(state / "superlink.db"),
                 # Dependencies come from this installation: hospitals' networks are often
                 # offline.
                 "--disable-runtime-dependency-installation"]
    proxy = [sys.executable, "-m", "common.proxy", "--host", args.host, "--port", str(args.port),
             "--upstream-port", str(args.local_port),
             "--max-body-bytes", str(args.max_request_mib * 1024 * 1024)]
    if args.insecure:
        if args.certs is not None:
            raise CoordinatorCliError("--insecure turns TLS off: drop --certs or --insecure")
        insecure_warning("COORDINATOR")
        superlink.append("--insecure")
        # Without node authentication SuperNodes register themselves through the Fleet API.
        proxy += ["--insecure", "--allow-self-registration"]
    else:
        if args.certs is None:
            raise CoordinatorCliError("--certs DIR is required (ca.crt, superlink.crt, "
                                      "superlink.key from deploy/certs/generate.sh); --insecure "
                                      "is for local trials only")
        ca, crt, key = _check_certs(args.certs)
        superlink += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt),
                      "--ssl-keyfile", str(key), "--enable-supernode-auth"]
        proxy += ["--certfile", str(crt), "--keyfile", str(key), "--ca-certfile", str(ca)]
    try:  # only now, when everything else was accepted
        _private_dir(state)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".write-test-"):
            pass
        _private_dir(state / "flwr-home")
        for f in state.glob("superlink.db*"):  # written by an earlier, laxer version
            if f.is_file() and f.stat().st_mode & 0o077:
                f.chmod(0o600)
    except OSError as e:
        raise CoordinatorCliError(f"--state-dir {state}: not writable ({e})") from e
    env = flower_env(state / "flwr-home")
    for name in LEGACY_GRPC_ENV:
        env.pop(name, None)
    # `python -m common.proxy` must find this very package, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return StartPlan(superlink, proxy, env, state)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def coordinator_start(args: argparse.Namespace) -> int:
    plan = build_start_plan(args)
    scheme = "HTTP" if args.insecure else "HTTPS"
    print(f"fedldm coordinator: state in {plan.state} (0700)\n"
          f"  public      {args.host}:{args.port}  {scheme}, Fleet API only (the sites); "
          "anything else is answered 403\n"
          f"  local only  127.0.0.1:{args.local_port}  the SuperLink itself (Control and "
          "runtime APIs): for `fedldm coordinator register-site|sites|unregister-site|run` on "
          f"this machine, --superlink 127.0.0.1:{args.local_port}", flush=True)
    if args.host in LOOPBACK_HOSTS:
        print("  the public port is on loopback too: sites on other machines cannot reach it; "
              "expose it with --host 0.0.0.0 (or one interface's address)", flush=True)
    elif not args.insecure:
        print(f"  sites connect with --superlink THIS_HOST:{args.port} --root-certificates "
              "ca.crt; register each site's auth.key.pub with `fedldm coordinator "
              "register-site`", flush=True)
    if args.dry_run:
        print(" ".join(plan.superlink))
        print(" ".join(plan.proxy))
        return 0
    for host, port, flag in (("127.0.0.1", args.local_port, "--local-port"),
                             (args.host, args.port, "--port")):
        if not _port_free(host, port):
            raise CoordinatorRunError(f"{host}:{port} is already in use (another coordinator?); "
                                      f"stop it or choose another {flag}")
    return run_supervised_group([
        Child("the SuperLink", plan.superlink, plan.env,
              ready=lambda: _accepts(args.local_port), umask=CHILD_UMASK),
        Child("the Fleet proxy", plan.proxy, plan.env, umask=CHILD_UMASK),
    ])


# ---------------------------------------------------------------------------------------------
# site keys


def register_site(args: argparse.Namespace) -> int:
    pub = check_auth_public_key(args.pubkey)
    extra = ["--name", args.name] if args.name else []
    with flwr_session(Connection.from_args(args)) as flwr:
        try:
            doc = flwr.json("supernode", "register", str(pub), CONNECTION, *extra)
        except FlwrError as e:
            if "already in use" not in str(e):
                raise
            print(f"{pub} is already registered (nothing to do)")
            return 0
    print(f"registered {pub} as node {doc.get('node-id')}; the site can now connect "
          "(`fedldm site start ... --auth-key auth.key`)")
    return 0


def list_sites(args: argparse.Namespace) -> int:
    with flwr_session(Connection.from_args(args)) as flwr:
        nodes = flwr.json("supernode", "ls", CONNECTION).get("nodes", [])
    print(f"{'node-id':<22} {'status':<13} {'registered':<22} online since")
    for n in nodes:
        since = n.get("online-at") if n.get("status") == "online" else "-"
        print(f"{n.get('node-id', '?'):<22} {n.get('status', '?'):<13} "
              f"{n.get('created-at', '?'):<22} {since}")
    return 0


def unregister_site(args: argparse.Namespace) -> int:
    with flwr_session(Connection.from_args(args)) as flwr:
        flwr.json("supernode", "unregister", str(args.node_id), CONNECTION)
    print(f"unregistered node {args.node_id}: its key can no longer connect")
    return 0


# ---------------------------------------------------------------------------------------------
# coordinator run


def default_app_dir() -> Path | None:
    """The fedldm project folder (pyproject.toml with [tool.flwr.app]) this code came from."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def run_config_from_args(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The ServerApp's run config (keys of pyproject's [tool.flwr.app.config]), validated here
    with the ServerApp's own parser so that a typo fails before any site spends budget."""
    overrides = dict(args.set)
    for flag, key in (("ae_rounds", "autoencoder.rounds"), ("dm_rounds", "diffusion.rounds")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    rc: dict[str, Any] = {
        "preset": args.preset, "image-size": args.image_size or 0, "seed": args.seed,
        "epsilon": str(jsonio.encode_float(float(args.epsilon))),
        "delta": float(args.delta), "class-names": args.class_names,
        "overrides": json.dumps(overrides), "min-sites": args.min_sites,
        "num-sites": args.num_sites or 0, "out": str(out),
        "round-timeout": float(args.round_timeout), "round-retries": args.round_retries,
        "accept": args.accept or "",
    }
    from ldm_core.phases import check_models
    from server.federation import FederationError
    from server.plan_check import check_plan_fits
    from server.server_app import config_from_run_config

    try:
        cfg = config_from_run_config(rc)[0]
        check_models(cfg)
        # A fresh site that allows neither audit nor evaluation reserves the least: if even it
        # cannot hold the plan, every site would refuse its first round.
        check_plan_fits(cfg, cfg.privacy.epsilon, cfg.privacy.delta, audit=False,
                        evaluate=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, FederationError) as e:
        raise CoordinatorCliError(f"run options rejected before submitting: {e}") from e
    try:
        check_plan_fits(cfg, cfg.privacy.epsilon, cfg.privacy.delta, audit=True, evaluate=True)
    except FederationError as e:
        warn(f"sites that allow audits and evaluations (--allow-audit --allow-evaluate) will "
             f"refuse this run: {e}")
    return rc


def _wait_for_sites(flwr: Flwr, need: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = len(online_sites(flwr))
        if n >= need:
            return n
        if time.monotonic() > deadline:
            raise CoordinatorRunError(
                f"only {n} site(s) online at {flwr.conn.address} after {timeout:.0f}s, {need} "
                "needed; nothing was submitted. Check `fedldm coordinator sites` and the sites' "
                "`fedldm site start` output (an unregistered key, or a site trusting another "
                "CA, never comes online)")
        time.sleep(2.0)


def _run_status(flwr: Flwr, run_id: str) -> dict[str, Any]:
    runs = flwr.json("ls", CONNECTION, "--run-id", run_id).get("runs", [])
    return runs[0] if runs else {}


def _follow(flwr: Flwr, run_id: str, timeout: float | None) -> dict[str, Any]:
    """Stream the run's log until it finishes; return its final `flwr ls` row."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stream = subprocess.Popen(flwr.cmd("log", run_id, CONNECTION, "--stream"), env=flwr.env)
    try:
        while True:
            try:
                stream.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    raise CoordinatorRunError(f"run {run_id} still running after --timeout "
                                              f"{timeout:.0f}s") from None
                continue
            row = _run_status(flwr, run_id)
            if str(row.get("status", "")).startswith("finished"):
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise CoordinatorRunError(f"run {run_id} still running after --timeout "
                                          f"{timeout:.0f}s")
            time.sleep(3.0)  # the log stream dropped: keep waiting on the status
            stream = subprocess.Popen(flwr.cmd("log", run_id, CONNECTION, "--stream"),
                                      env=flwr.env, stdout=subprocess.DEVNULL)
    finally:
        if stream.poll() is None:
            stream.terminate()
            try:
                stream.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stream.kill()


def _check_outputs(out: Path, row: dict[str, Any]) -> None:
    missing = [p for p in RUN_OUTPUTS if not (out / p).exists()]
    if not missing:
        return
    if not out.exists():
        raise CoordinatorRunError(
            f"run finished ({row.get('status')}) but {out} does not exist on this machine: the "
            "ServerApp writes the run folder on the SuperLink's host. Run `fedldm coordinator "
            "run` on that host (or give --out a folder both share)")
    raise CoordinatorRunError(f"run finished but {out} lacks {', '.join(missing)}; see "
                              f"{out / 'run.log'}")


def _summary(out: Path) -> list[str]:
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    sites = metrics.get("privacy", {}).get("sites", {})
    return [f"  site {s}: epsilon {_num(v.get('epsilon'))} of budget "
            f"{_num(v.get('budget_epsilon'))} (delta {_num(v.get('delta'))})"
            for s, v in sorted(sites.items())]


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def coordinator_run(args: argparse.Namespace) -> int:
    out = args.out.expanduser().resolve()
    app = args.app if args.app is not None else default_app_dir()
    if app is None or not (app / "pyproject.toml").is_file():
        raise CoordinatorCliError("cannot find the fedldm app (pyproject.toml with "
                                  "[tool.flwr.app]); pass --app /path/to/fedldm")
    rc = run_config_from_args(args, out)
    conn = Connection.from_args(args)
    need = args.num_sites or args.min_sites
    with flwr_session(conn) as flwr:
        n = _wait_for_sites(flwr, need, args.wait_for_sites)
        print(f"fedldm coordinator: {n} site(s) online; submitting {app} -> {out}", flush=True)
        rc_file = flwr.home / "run-config.toml"
        files.write_text_atomic(rc_file, "".join(f"{k} = {A.toml_value(v)}\n"
                                                 for k, v in rc.items()))
        doc = flwr.json("run", str(app), CONNECTION, "--run-config", str(rc_file))
        run_id = str(doc["run-id"])
        print(f"fedldm coordinator: run {run_id} started (fab {doc.get('fab-hash', '?')})",
              flush=True)
        if args.detach:
            print(f"detached: run {run_id} goes on at the SuperLink; it writes {out} (progress "
                  f"in {out / 'run.log'})")
            return 0
        try:
            row = _follow(flwr, run_id, args.timeout)
        except KeyboardInterrupt:
            subprocess.run(flwr.cmd("stop", run_id, CONNECTION), env=flwr.env,
                           timeout=FLWR_CALL_TIMEOUT_S, check=False)
            print(f"\nstopped run {run_id}; {out} keeps the last finished round: rerun the same "
                  "command to resume", file=sys.stderr)
            return 130
    status = str(row.get("status", "?"))
    if status != "finished:completed":
        raise CoordinatorRunError(f"run {run_id} ended as {status}: "
                                  f"{row.get('status-details') or 'no details'}; see "
                                  f"{out / 'run.log'} (rerun the same command to resume)")
    _check_outputs(out, row)
    print("\n".join([f"fedldm coordinator: run {run_id} completed -> {out}",
                     f"  {out / 'checkpoints' / 'final'}", f"  {out / 'metrics.json'}",
                     f"  {out / 'report.html'}", *_summary(out)]))
    return 0


# ---------------------------------------------------------------------------------------------
# argparse wiring


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", default=DEFAULT_SUPERLINK, metavar="HOST:PORT",
                   help="the SuperLink's loopback port on the coordinator machine (default "
                   f"{DEFAULT_SUPERLINK}; the public port refuses these calls)")
    p.add_argument("--root-certificates", type=A.path, metavar="CA.pem",
                   help="CA certificate that signed the SuperLink's (ca.crt)")
    p.add_argument("--certs", type=A.path, metavar="DIR", help="folder holding ca.crt")
    p.add_argument("--insecure", action="store_true", help="NO TLS: local trials only")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `fedldm coordinator {start,register-site,sites,unregister-site,run}`."""
    coord = subparsers.add_parser("coordinator", help="consortium side: SuperLink, site keys, "
                                  "training runs")
    sub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="run the SuperLink (TLS + SuperNode authentication) "
                       "behind the Fleet-only proxy")
    s.add_argument("--host", default="127.0.0.1",
                   help="public listen address of the Fleet-only proxy (default 127.0.0.1; "
                   "--host 0.0.0.0 exposes it to the sites)")
    s.add_argument("--port", type=A.port, default=DEFAULT_PUBLIC_PORT,
                   help=f"public port: the sites' Fleet API (default {DEFAULT_PUBLIC_PORT})")
    s.add_argument("--local-port", type=A.port, default=DEFAULT_LOCAL_PORT,
                   help="the SuperLink's own port, bound to 127.0.0.1 only: Control and runtime "
                   f"APIs for this machine's operator commands (default {DEFAULT_LOCAL_PORT})")
    s.add_argument("--max-request-mib", type=A.positive_int, default=DEFAULT_MAX_REQUEST_MIB,
                   help="largest request body the proxy accepts from a site, in MiB "
                   f"(default {DEFAULT_MAX_REQUEST_MIB}; Flower sends arrays in 5 MB chunks)")
    s.add_argument("--state-dir", type=A.path, required=True,
                   help="SQLite state (registered sites, runs) and Flower's files")
    s.add_argument("--certs", type=A.path, metavar="DIR",
                   help="ca.crt, superlink.crt, superlink.key (deploy/certs/generate.sh)")
    s.add_argument("--insecure", action="store_true",
                   help="NO TLS and NO site authentication: local trials only")
    s.add_argument("--dry-run", action="store_true", help="validate, print the command, exit")

    r = sub.add_parser("register-site", help="allow a site's public key (auth.key.pub)")
    r.add_argument("pubkey", type=A.path, metavar="PUBKEY")
    r.add_argument("--name", help="a label for the site")
    _connection_args(r)

    ls = sub.add_parser("sites", help="registered sites and whether they are online")
    _connection_args(ls)

    u = sub.add_parser("unregister-site", help="revoke a site's key (by node id, see `sites`)")
    u.add_argument("node_id", type=A.nonneg_int, metavar="NODE_ID")
    _connection_args(u)

    run = sub.add_parser("run", help="submit a training run, follow it, check its outputs")
    _connection_args(run)
    run.add_argument("--out", type=A.path, required=True,
                     help="run folder, written by the ServerApp on the SuperLink's host")
    run.add_argument("--app", type=A.path, help="the fedldm project folder (default: this one)")
    run.add_argument("--preset", default="quick", choices=("tiny", "quick", "standard"))
    run.add_argument("--image-size", type=A.positive_int, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epsilon", type=A.epsilon, default=8.0,
                     help="the cumulative epsilon each site may reach by the end of this run "
                     "(earlier runs count); a site's own budget still caps it")
    run.add_argument("--delta", type=A.delta, default=1e-5)
    run.add_argument("--class-names", default="cyst,edema,normal,tumor",
                     help="comma-separated; must match the sites' class folders")
    run.add_argument("--set", type=A.override, action="append", default=[], metavar="KEY=VALUE",
                     help="any config field, e.g. --set diffusion.rounds=8")
    run.add_argument("--ae-rounds", type=A.nonneg_int,
                     help="shortcut for --set autoencoder.rounds=N")
    run.add_argument("--dm-rounds", type=A.nonneg_int, help="shortcut for --set diffusion.rounds=N")
    run.add_argument("--min-sites", type=A.positive_int, default=2,
                     help="sites that must answer every round (default 2)")
    run.add_argument("--num-sites", type=A.nonneg_int, default=0,
                     help="wait for this many sites before starting (default: --min-sites)")
    run.add_argument("--round-timeout", type=A.positive_float, default=3600.0,
                     metavar="SECONDS",
                     help="wait this long for a round's replies, then ask the silent sites again "
                     "(a site that crashed and restarted never answers the lost request)")
    run.add_argument("--round-retries", type=A.nonneg_int, default=2,
                     help="how often a round is re-sent to silent sites (default 2)")
    run.add_argument("--wait-for-sites", type=float, default=300.0, metavar="SECONDS",
                     help="how long to wait for the sites to be online before giving up")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="give up following the run after this long (it keeps running)")
    run.add_argument("--accept", default=None, metavar="CRITERIA",
                     help="acceptance criteria, declared before training and judged in the "
                     "report, e.g. 'ratio>=0.9,mia_auc<=0.55,epsilon<=8' (README)")
    run.add_argument("--detach", action="store_true", help="submit and return")


COMMANDS = {"start": coordinator_start, "register-site": register_site, "sites": list_sites,
            "unregister-site": unregister_site, "run": coordinator_run}


def run(args: argparse.Namespace) -> int:
    """Dispatch `fedldm coordinator ...` (errors are reported by cli.main)."""
    return COMMANDS[args.coordinator_command](args)


def command_name(args: argparse.Namespace) -> str:
    return f"coordinator {args.coordinator_command}"
