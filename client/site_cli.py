"""`fedldm site ...`: what a hospital runs next to its images (check, init, start, budget).

Why a wrapper around `flower-supernode` and not the raw command: the site's data path, ledger
folder and privacy budget must reach the ClientApp through the SuperNode's node config, and a
typo there only shows up rounds later as an error reply. `site start` validates everything first
(data readable, state dir writable, certificate and key parseable, an existing ledger belongs to
this site), writes the node config to a TOML file (so paths with spaces or quotes survive), then
runs the SuperNode as a child process and forwards signals to it.

`site init` enrols the site once: it creates the state dir (0o700) and the privacy ledger
(0o600). `site start` never creates a ledger: a missing one means the state folder was lost (or
the site never enrolled), and silently starting from zero would forget the epsilon already spent.

The process helpers at the bottom (`run_supervised`, `flower_env`, `parse_address`) are shared
with `server.coordinator_cli`: the coordinator side supervises its SuperLink the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SUPERNODE_DEFAULT_PORT = 9094
NODE_CONFIG_FILE = "node-config.toml"
LEDGER_FILE = "ledger.json"
STATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
FLWR_HOME_DIR = "flwr-home"
IMAGE_SAMPLE = 300
# After forwarding SIGINT/SIGTERM, how long the child may take before it is killed.
STOP_GRACE_S = 30.0


class SiteCliError(RuntimeError):
    """Bad input to a site command; the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by server.coordinator_cli)


def warn(msg: str) -> None:
    print(f"fedldm: warning: {msg}", file=sys.stderr, flush=True)


def insecure_warning(role: str) -> None:
    """--insecure is for trials on one machine; say so every time, on stderr."""
    bar = "!" * 78
    print(f"{bar}\n!! INSECURE {role}: TLS is OFF (and with it SuperNode authentication).\n"
          "!! Model weights travel unencrypted and any machine that can reach the port can\n"
          "!! join or control the federation. Use this only for local trials on 127.0.0.1.\n"
          f"{bar}", file=sys.stderr, flush=True)


def parse_address(text: str, flag: str = "--superlink") -> str:
    """HOST:PORT (IPv6 as [::1]:PORT) without a scheme; raises with the expected form."""
    if "://" in text:
        raise SiteCliError(f"{flag} {text!r}: give HOST:PORT without a scheme "
                           "(e.g. coordinator.example.org:8000)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SiteCliError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return text


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (flower-supernode, flwr, ...)."""
    return Path(sys.executable).parent


def flower_tool(name: str) -> str:
    """Path of a Flower console script next to this Python, else the name (found on PATH)."""
    candidate = venv_bin() / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path | None) -> dict[str, str]:
    """Environment for Flower child processes.

    Flower starts `flower-superexec`, `flwr-clientapp` and `flwr-serverapp` by name, so this
    interpreter's bin folder goes first on PATH (otherwise another installation could answer).
    FLWR_HOME keeps Flower's installed apps and config under the role's state directory.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    if flwr_home is not None and "FLWR_HOME" not in os.environ:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_supervised(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run a long-lived child, forwarding SIGINT/SIGTERM/SIGHUP; return its exit status.

    The child gets its own session so that a Ctrl-C reaches it once (forwarded by us) rather
    than twice; a child that ignores a forwarded stop for STOP_GRACE_S seconds is killed.
    """
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    stop_deadline: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)
            if signum != signal.SIGHUP and not stop_deadline:
                stop_deadline.append(time.monotonic() + STOP_GRACE_S)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_deadline and time.monotonic() > stop_deadline[0]:
                    proc.kill()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code


def check_readable(path: Path, flag: str, what: str) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise SiteCliError(f"{flag} {path}: no such file ({what})")
    if not os.access(path, os.R_OK):
        raise SiteCliError(f"{flag} {path}: not readable by this user; fix its permissions")
    return path.resolve()


def check_ca_file(path: Path, flag: str = "--root-certificates") -> Path:
    """A PEM CA bundle that parses, so a wrong file fails here and not as a TLS error later."""
    from cryptography import x509

    path = check_readable(path, flag, "the consortium CA certificate, ca.crt")
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as e:
        raise SiteCliError(f"{flag} {path}: not a PEM certificate ({e}); pass the ca.crt made "
                           "by deploy/certs/generate.sh") from e
    if not certs:
        raise SiteCliError(f"{flag} {path}: holds no certificate")
    return path


def check_auth_private_key(path: Path, flag: str = "--auth-key") -> Path:
    """The site's OpenSSH ECDSA private key (the format flower-supernode reads)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = check_readable(path, flag, "the site's private key, auth.key")
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"ecdsa-sha2-"):
        raise SiteCliError(f"{flag} {path}: this is a PUBLIC key; pass the private key "
                           "(auth.key, not auth.key.pub)")
    try:
        key = load_ssh_private_key(raw, None)
    except (ValueError, TypeError) as e:
        raise SiteCliError(f"{flag} {path}: not an unencrypted OpenSSH private key ({e}); make "
                           "one with `deploy/certs/generate.sh site-key NAME`") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SiteCliError(f"{flag} {path}: Flower needs an ECDSA (NIST curve) key, got "
                           f"{type(key).__name__}; use `deploy/certs/generate.sh site-key NAME`")
    if path.stat().st_mode & 0o007:
        warn(f"{path} is readable by any user; restrict it: chmod 600 {path}")
    return path


# ---------------------------------------------------------------------------------------------
# site check


def _name_problems(paths: Sequence[Path], class_of: Sequence[str]) -> list[str]:
    problems: list[str] = []
    spaces = [p for p in paths if " " in p.name]
    non_ascii = [p for p in paths if not str(p).isascii()]
    dup_paths = [p for p, n in Counter(paths).items() if n > 1]
    labels_by_name: dict[str, set[str]] = {}
    for p, c in zip(paths, class_of, strict=True):
        labels_by_name.setdefault(p.name, set()).add(c)
    dup_names = sorted(n for n, cs in labels_by_name.items() if len(cs) > 1)
    for found, what in ((spaces, "file name(s) with spaces"),
                        (non_ascii, "path(s) with non-ASCII characters")):
        if found:
            problems.append(f"{len(found)} {what}, e.g. {found[0]}")
    if dup_paths:
        problems.append(f"{len(dup_paths)} file(s) listed more than once, e.g. {dup_paths[0]}")
    if dup_names:
        problems.append(f"{len(dup_names)} file name(s) appear under more than one class "
                        f"(same image, two labels?), e.g. {dup_names[0]}")
    return problems


def _sample_sizes(paths: Sequence[Path], n: int) -> tuple[Counter[str], list[str]]:
    """Pixel sizes/modes of up to n files spread over the list; unreadable files are errors."""
    from PIL import Image, UnidentifiedImageError

    step = max(1, len(paths) // n)
    sizes: Counter[str] = Counter()
    bad: list[str] = []
    for p in list(paths)[::step][:n]:
        try:
            with Image.open(p) as im:
                sizes[f"{im.size[0]}x{im.size[1]} {im.mode}"] += 1
        except (OSError, UnidentifiedImageError) as e:
            bad.append(f"{p}: {e}")
    return sizes, bad


def site_check(data: Path, *, sample: int = IMAGE_SAMPLE, out: Callable[[str], None] = print
               ) -> int:
    """Validate a site's dataset and print a summary; 0 if usable, 1 if not."""
    from ldm_core.data import DataError, scan, split_by_patient

    try:
        index = scan(data)
        splits = split_by_patient(index.records)
    except DataError as e:
        print(f"fedldm site check: {e}", file=sys.stderr)
        return 1
    records = index.records
    if not records:
        print(f"fedldm site check: {data}: no images found; put them in class folders "
              "(ROOT/<class>/*.png) or list them in a manifest.csv", file=sys.stderr)
        return 1
    names = index.class_names
    per_class = Counter(names[r.label] for r in records)
    out(f"data      {index.root}  ({index.layout} layout, {len(records)} images)")
    out(f"classes   {','.join(names)}   <- the coordinator's --class-names must match")
    width = max(len(c) for c in names)
    for c in names:
        counts = {s: sum(1 for r in splits[s] if names[r.label] == c) for s in splits}
        out(f"  {c:<{width}}  {per_class[c]:>6} images  (train {counts['train']}, holdout "
            f"{counts['holdout']}, test {counts['test']})")
    if index.has_patient_ids:
        n_pat = len({r.patient for r in records})
        out(f"patients  {n_pat} (splits are by patient: no patient in two splits)")
    else:
        out("patients  no patient ids: each image counts as its own patient (slices of one "
            "patient may straddle train/test; add a manifest.csv with a patient column)")
    paths = [r.path for r in records]
    sizes, unreadable = _sample_sizes(paths, sample)
    seen = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(6))
    out(f"images    sampled {sum(sizes.values()) + len(unreadable)} of {len(paths)}: {seen}")
    problems = _name_problems(paths, [names[r.label] for r in records])
    tiny = [c for c in names if per_class[c] < 10]
    if tiny:
        problems.append(f"class(es) with fewer than 10 images: {', '.join(tiny)}")
    for p in problems:
        out(f"warning   {p}")
    if unreadable:
        for u in unreadable[:5]:
            print(f"fedldm site check: unreadable image {u}", file=sys.stderr)
        print(f"fedldm site check: {len(unreadable)} sampled image(s) cannot be read; fix or "
              "remove them (training would stop at the first one)", file=sys.stderr)
        return 1
    out("ok        the data can be used" + (" (see warnings)" if problems else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# site start


def _init_command(state_dir: Path, site_id: str, epsilon: float, delta: float) -> str:
    return (f"fedldm site init --state-dir {_shell_quote(state_dir)} --site-id "
            f"{_shell_quote(site_id)} --epsilon {epsilon:g} --delta {delta:g}")


def _shell_quote(value: object) -> str:
    import shlex

    return shlex.quote(str(value))


def _require_ledger(state_dir: Path, site_id: str, epsilon: float, delta: float) -> Path:
    """Refuse to start a site that has no ledger: it was never enrolled, or its state was lost."""
    path = state_dir / LEDGER_FILE
    if not path.is_file():
        raise SiteCliError(
            f"--state-dir {state_dir}: no privacy ledger ({path}). If this site has never "
            f"trained, enrol it once: `{_init_command(state_dir, site_id, epsilon, delta)}`. "
            "If the folder was deleted or moved, restore ledger.json and ledger.json.head from "
            "backup instead: re-initialising forgets the epsilon already spent, and the "
            "coordinator refuses a site whose spend went down."
        )
    return path


def _check_state_dir(state_dir: Path, site_id: str, epsilon: float, delta: float) -> Path:
    state_dir = state_dir.expanduser().resolve()
    _require_ledger(state_dir, site_id, epsilon, delta)
    try:
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SiteCliError(f"--state-dir {state_dir}: not writable ({e}); the privacy ledger "
                           "lives there, so pick a folder on a local disk this user owns") from e
    return state_dir


def _read_ledger_header(path: Path) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SiteCliError(f"{path}: unreadable privacy ledger ({e}); restore it from a backup "
                           "(never delete it: that would forget the epsilon already spent)"
                           ) from e
    if not isinstance(doc, dict) or "site_id" not in doc or "delta" not in doc:
        raise SiteCliError(f"{path}: not a fedldm privacy ledger (no site_id/delta)")
    return doc


def _check_existing_ledger(state_dir: Path, site_id: str, delta: float, epsilon: float) -> None:
    """Refuse now what the ClientApp would refuse every round: another site's or delta's ledger,
    or one whose hash chain / head shows it was edited or truncated."""
    from client.ledger import LedgerError, PrivacyLedger

    path = state_dir / LEDGER_FILE
    if not path.exists():
        return
    doc = _read_ledger_header(path)
    if doc["site_id"] != site_id:
        raise SiteCliError(f"{path} belongs to site {doc['site_id']!r}, not {site_id!r}: use "
                           f"--site-id {doc['site_id']} or another --state-dir")
    if float(doc["delta"]) != delta:
        raise SiteCliError(f"{path} was kept at delta {doc['delta']:g}; pass --delta "
                           f"{doc['delta']:g} (epsilons at different deltas do not add up)")
    stored = doc.get("budget_epsilon")
    stored_f = math.inf if stored == "inf" else float(stored)
    if epsilon > stored_f:
        warn(f"--epsilon {epsilon:g} is above the budget {stored_f:g} stored in {path}; the "
             "stored (lower) budget stays in force")
    try:
        PrivacyLedger(path, site_id=site_id, delta=delta).remaining()  # full verified read
    except LedgerError as e:
        raise SiteCliError(str(e)) from e


def toml_value(v: Any) -> str:
    """One TOML value; infinity becomes the string "inf", which is how the apps read it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return '"inf"'
    if isinstance(v, (int, float)):
        return repr(v)
    import json

    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_private_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by this user only (0o600, also when it existed):
    a site's files name its data paths and budget, which other local users need not see."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), PRIVATE_FILE_MODE)
        f.write(text)
    return path


def write_node_config(path: Path, values: dict[str, Any]) -> Path:
    """Node config as TOML: flower-supernode reads `--node-config FILE.toml` verbatim."""
    lines = ["# written by `fedldm site start`; read by the ClientApp (client.site_config)"]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return write_private_text(path, "\n".join(lines) + "\n")


def build_supernode_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate a `site start` invocation; return the flower-supernode command and env."""
    from client.site_config import SiteConfig, SiteConfigError
    from ldm_core.data import DataError, scan

    superlink = parse_address(args.superlink)
    if not 0 < args.port < 65536:
        raise SiteCliError(f"--port {args.port}: must be in 1..65535")
    data = args.data.expanduser().resolve()
    if not data.exists():
        raise SiteCliError(f"--data {data}: no such file or folder")
    try:
        scan(data)
    except DataError as e:
        raise SiteCliError(f"--data: {e} (run `fedldm site check --data {data}`)") from e
    try:
        SiteConfig(site_id=args.site_id, data=str(data),
                   state_dir=args.state_dir.expanduser().resolve(),
                   epsilon=args.epsilon, delta=args.delta, partition=args.partition)
    except SiteConfigError as e:
        raise SiteCliError(str(e)) from e
    state_dir = _check_state_dir(args.state_dir, args.site_id, args.epsilon, args.delta)
    _check_existing_ledger(state_dir, args.site_id, args.delta, args.epsilon)

    cmd = [flower_tool("flower-supernode"), "--superlink", superlink,
           "--port", str(args.port)]
    if args.insecure:
        if args.root_certificates is not None:
            raise SiteCliError("--insecure turns TLS off: drop --root-certificates, or drop "
                               "--insecure (the normal case)")
        insecure_warning("SITE")
        cmd.append("--insecure")
    elif args.root_certificates is not None:
        cmd += ["--root-certificates", str(check_ca_file(args.root_certificates))]
    else:
        warn("no --root-certificates: the SuperLink's certificate is checked against the "
             "system CAs only (pass the consortium's ca.crt)")
    if args.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(check_auth_private_key(args.auth_key))]
    elif not args.insecure:
        warn("no --auth-key: a SuperLink with SuperNode authentication will refuse this site")
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    node_config = write_node_config(state_dir / NODE_CONFIG_FILE, {
        "site-id": args.site_id, "data-path": str(data), "state-dir": str(state_dir),
        "epsilon": args.epsilon, "delta": args.delta, "partition": args.partition,
        "device": args.device, "allow-audit": args.allow_audit, "progress": False,
    })
    cmd += ["--node-config", str(node_config)]
    return cmd, flower_env(state_dir / FLWR_HOME_DIR)


def site_start(args: argparse.Namespace) -> int:
    cmd, env = build_supernode_command(args)
    print(f"fedldm site {args.site_id}: budget epsilon {args.epsilon:g}, delta {args.delta:g} "
          f"(the coordinator can lower it per run, never raise it); ledger "
          f"{args.state_dir.expanduser().resolve() / LEDGER_FILE}", flush=True)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    return run_supervised(cmd, env)


# ---------------------------------------------------------------------------------------------
# site init


def _make_state_dir(state_dir: Path) -> Path:
    """Create the state dir 0o700 (the ledger, keys' paths and logs are this site's business)."""
    state_dir = state_dir.expanduser().resolve()
    if not state_dir.exists():
        try:
            state_dir.mkdir(parents=True, mode=STATE_DIR_MODE)
            state_dir.chmod(STATE_DIR_MODE)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise SiteCliError(f"--state-dir {state_dir}: cannot create it ({e})") from e
    elif not state_dir.is_dir():
        raise SiteCliError(f"--state-dir {state_dir}: exists and is not a folder")
    elif state_dir.stat().st_mode & 0o077:
        warn(f"{state_dir} is accessible to other users; restrict it: chmod 700 {state_dir}")
    return state_dir


def site_init(state_dir: Path, *, site_id: str, epsilon: float, delta: float,
              out: Callable[[str], None] = print) -> int:
    """Enrol this site once: create its state dir and an empty privacy ledger."""
    from client.ledger import LedgerError, PrivacyLedger

    state_dir = _make_state_dir(state_dir)
    path = state_dir / LEDGER_FILE
    try:
        PrivacyLedger.create(path, budget_epsilon=epsilon, delta=delta, site_id=site_id)
    except ValueError as e:
        raise SiteCliError(str(e)) from e
    except LedgerError as e:
        raise SiteCliError(f"{e} (nothing was changed)") from e
    out(f"enrolled site {site_id}: privacy ledger {path} (budget epsilon {epsilon:g} at delta "
        f"{delta:g}). Back up {path.name} and {path.name}.head together; never delete them.")
    return 0


# ---------------------------------------------------------------------------------------------
# site budget


def site_budget(state_dir: Path, *, out: Callable[[str], None] = print) -> int:
    """Print what this site has spent, per run and phase, from its ledger (never modified)."""
    from client.ledger import LedgerError, PrivacyLedger

    path = state_dir.expanduser() / LEDGER_FILE
    if not path.is_file():
        print(f"fedldm site budget: {path}: no ledger: this site is not enrolled (`fedldm site "
              "init`), or --state-dir is not the folder given to `fedldm site start`",
              file=sys.stderr)
        return 1
    doc = _read_ledger_header(path)
    ledger = PrivacyLedger(path, site_id=str(doc["site_id"]), delta=float(doc["delta"]))
    try:
        s = ledger.summary()
    except LedgerError as e:
        print(f"fedldm site budget: {e}", file=sys.stderr)
        return 1
    n = s["entries"]
    out(f"site {s['site_id']}   ledger {path} ({n} entr{'y' if n == 1 else 'ies'}, hash chain "
        "and head verified)")
    out(f"budget epsilon {s['budget_epsilon']:g} at delta {s['delta']:g}; spent "
        f"{s['epsilon']:.4g}; remaining {s['remaining']:.4g}")
    if s["phases"]:
        out(f"{'run':<20} {'phase':<14} {'rounds':>7} {'steps':>7} {'epsilon +':>10} "
            f"{'total after':>11}")
    for row in s["phases"]:
        out(f"{row['run_id']:<20} {row['phase']:<14} {len(row['rounds']):>7} "
            f"{row['steps']:>7} {row['epsilon_contribution']:>10.4g} "
            f"{row['epsilon_after']:>11.4g}")
    for c in s["budget_changes"]:
        out(f"budget changed {c['from']:g} -> {c['to']:g} ({c.get('reason', '')})")
    return 0


# ---------------------------------------------------------------------------------------------
# argparse wiring


def positive_float_or_inf(s: str) -> float:
    if s.lower() in ("inf", "infinity"):
        return math.inf
    try:
        v = float(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (or 'inf')") from e
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0 ('inf' = no DP)")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `fedldm site {check,init,start,budget}`."""
    site = subparsers.add_parser("site", help="hospital side: check data, enrol, run the site "
                                 "daemon, show the privacy budget")
    sub = site.add_subparsers(dest="site_command", required=True)

    c = sub.add_parser("check", help="validate a site's dataset and print a summary")
    c.add_argument("--data", type=Path, required=True,
                   help="class-folder tree, manifest.csv, or a folder holding manifest.csv")
    c.add_argument("--sample", type=int, default=IMAGE_SAMPLE,
                   help="how many image files to open to check sizes and readability")

    i = sub.add_parser(
        "init", help="enrol this site once: create its state dir and privacy ledger",
        description="Create the state dir (mode 700) and an empty privacy ledger (mode 600). "
        "Run it once per site, on purpose: it refuses if a ledger exists. If the state folder "
        "was lost, restore ledger.json and ledger.json.head from backup instead of running "
        "init again, or the epsilon already spent is forgotten.")
    i.add_argument("--state-dir", type=Path, required=True,
                   help="local folder for the privacy ledger (the one given to site start)")
    i.add_argument("--site-id", required=True, help="this site's name, e.g. hospital-a")
    i.add_argument("--epsilon", type=positive_float_or_inf, required=True,
                   help="the site's total DP budget over all runs ('inf' = no DP)")
    i.add_argument("--delta", type=float, required=True, help="DP delta, e.g. 1e-5")

    s = sub.add_parser(
        "start", help="run this site's Flower SuperNode (long-lived; Ctrl-C stops it)",
        description="Start the site daemon. The privacy budget (--epsilon/--delta) belongs to "
        "the site: a run may ask for less, never more (client.site_config.effective_target), "
        "and the ledger in --state-dir keeps it across runs and restarts.")
    s.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the coordinator's SuperLink address")
    s.add_argument("--data", type=Path, required=True, help="the site's images (see site check)")
    s.add_argument("--state-dir", type=Path, required=True,
                   help="local folder for the privacy ledger, site.log and Flower's files "
                   "(made once by `fedldm site init`)")
    s.add_argument("--site-id", required=True, help="this site's name, e.g. hospital-a")
    s.add_argument("--root-certificates", type=Path, metavar="CA.pem",
                   help="the consortium CA certificate (ca.crt) that signed the SuperLink's")
    s.add_argument("--auth-key", type=Path, metavar="KEY",
                   help="this site's private key (auth.key); its .pub must be registered")
    s.add_argument("--epsilon", type=positive_float_or_inf, default=8.0,
                   help="the site's total DP budget over all runs (default 8; the coordinator "
                   "cannot raise it)")
    s.add_argument("--delta", type=float, default=1e-5, help="DP delta (default 1e-5)")
    s.add_argument("--port", type=int, default=SUPERNODE_DEFAULT_PORT,
                   help="local port of the SuperNode's runtime API (127.0.0.1 only; change it "
                   "when several sites share a machine)")
    s.add_argument("--partition", default="all",
                   help="'all' (default: the site trains on all its data) or a scheme for "
                   "trials where sites share one dataset")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    s.add_argument("--allow-audit", action="store_true",
                   help="answer the end-of-run privacy audit: the site attacks its own records "
                   "with samples it draws itself and releases a few DP aggregates, charged to "
                   "its ledger (off by default)")
    s.add_argument("--max-wait-time", type=float, metavar="SECONDS",
                   help="give up when the SuperLink cannot be reached for this long "
                   "(default: retry forever)")
    s.add_argument("--insecure", action="store_true",
                   help="NO TLS, for local trials only (loud warning)")
    s.add_argument("--dry-run", action="store_true",
                   help="validate and print the flower-supernode command, start nothing")

    b = sub.add_parser("budget", help="privacy budget spent per run and phase (read-only)")
    b.add_argument("--state-dir", type=Path, required=True)


def main(args: argparse.Namespace) -> int:
    """Dispatch `fedldm site ...`; bad input exits 2 with the message on stderr."""
    try:
        if args.site_command == "check":
            return site_check(args.data, sample=args.sample)
        if args.site_command == "init":
            return site_init(args.state_dir, site_id=args.site_id, epsilon=args.epsilon,
                             delta=args.delta)
        if args.site_command == "start":
            return site_start(args)
        if args.site_command == "budget":
            return site_budget(args.state_dir)
    except SiteCliError as e:
        print(f"fedldm site {args.site_command}: {e}", file=sys.stderr)
        return 2
    raise SiteCliError(f"unknown site command {args.site_command!r}")
