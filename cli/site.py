"""`fedldm site ...`: what a hospital runs next to its images (check, init, start, budget).

Why a wrapper around `flower-supernode` and not the raw command: the site's data path, ledger
folder and privacy budget must reach the ClientApp through the SuperNode's node config, and a
typo there only shows up rounds later as an error reply. `site start` validates everything first
(data readable, state dir writable, certificate and key parseable, an existing ledger belongs to
this site), writes the node config to a TOML file (so paths with spaces or quotes survive), then
runs the SuperNode as a child process and forwards signals to it (common.procs).

`site init` enrols the site once: it creates the state dir (0o700) and the privacy ledger
(0o600). `site start` never creates a ledger: a missing one means the state folder was lost (or
the site never enrolled), and silently starting from zero would forget the epsilon already spent.

`site check` decodes every image (not only its header) and reports every problem in one pass.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli import args as A
from cli.errors import BadInput
from common import files, jsonio
from common.procs import flower_env, flower_tool, run_supervised, warn
from common.tls import check_auth_private_key, check_ca_file, insecure_warning, parse_address

SUPERNODE_DEFAULT_PORT = 9094
NODE_CONFIG_FILE = "node-config.toml"
LEDGER_FILE = "ledger.json"
STATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
WORKER_SECRET_FILE = "superexec.secret"  # client.site_worker.SECRET_FILE (not imported: torch)
FLWR_HOME_DIR = "flwr-home"
# `site check` warns about images outside this range of pixels per side.
MIN_SIDE, MAX_SIDE = 16, 4096
# `site check` lists this many problems of one kind, then counts the rest.
SHOW = 20


class SiteCliError(BadInput):
    """Bad input to a site command; the message names the file or flag and the fix (exit 2)."""


# ---------------------------------------------------------------------------------------------
# site check


@dataclass(frozen=True)
class ImageInfo:
    """What decoding one file found: its size and mode, or why it cannot be used."""

    path: Path
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None


def _decode_volume(path: Path) -> ImageInfo:
    """Read a NIfTI file or DICOM series folder whole (width/height: its first two axes)."""
    from ldm_core.data import DataError
    from ldm_core.volumes import read_volume

    try:
        data, _ = read_volume(path)
    except (DataError, OSError, ValueError) as e:
        return ImageInfo(path, error=str(e))
    return ImageInfo(path, int(data.shape[0]), int(data.shape[1]), f"volume {data.shape}")


def decode_image(path: Path) -> ImageInfo:
    """Open and fully decode one image (a truncated file fails here, not only a bad header)."""
    from PIL import Image

    from ldm_core.volumes import is_volume_path

    if is_volume_path(path):
        return _decode_volume(path)
    try:
        if path.stat().st_size == 0:
            return ImageInfo(path, error="empty file (0 bytes)")
        with Image.open(path) as im:
            im.load()
            return ImageInfo(path, im.size[0], im.size[1], im.mode)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        return ImageInfo(path, error=f"{type(e).__name__}: {e}")


def decode_images(paths: Sequence[Path], workers: int | None = None) -> list[ImageInfo]:
    """`decode_image` for every path, on a few threads (PIL releases the GIL while decoding)."""
    n = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(decode_image, paths))


def _listed(what: str, items: Sequence[str]) -> list[str]:
    lines = [f"{what}: {item}" for item in items[:SHOW]]
    if len(items) > SHOW:
        lines.append(f"{what}: ... and {len(items) - SHOW} more")
    return lines


def _name_warnings(paths: Sequence[Path], class_of: Sequence[str]) -> list[str]:
    problems: list[str] = []
    spaces = [p for p in paths if " " in p.name]
    non_ascii = [p for p in paths if not str(p).isascii()]
    labels_by_name: dict[str, set[str]] = {}
    for p, c in zip(paths, class_of, strict=True):
        labels_by_name.setdefault(p.name, set()).add(c)
    dup_names = sorted(n for n, cs in labels_by_name.items() if len(cs) > 1)
    for found, what in ((spaces, "file name(s) with spaces"),
                        (non_ascii, "path(s) with non-ASCII characters")):
        if found:
            problems.append(f"{len(found)} {what}, e.g. {found[0]}")
    if dup_names:
        problems.append(f"{len(dup_names)} file name(s) appear under more than one class "
                        f"(same image, two labels?), e.g. {dup_names[0]}")
    return problems


def _patient_warnings(records: Sequence[Any], names: Sequence[str]) -> list[str]:
    warnings: list[str] = []
    with_id = [r for r in records if r.patient is not None]
    if with_id and len(with_id) < len(records):
        empty = [str(r.path) for r in records if r.patient is None]
        warnings.append(f"{len(empty)} image(s) with an empty patient id (each counts as its "
                        f"own patient, so a patient may straddle splits), e.g. {empty[0]}")
    labels: dict[str, set[str]] = defaultdict(set)
    for r in with_id:
        labels[r.patient].add(names[r.label])
    several = sorted(p for p, ls in labels.items() if len(ls) > 1)
    if several:
        first = several[0]
        warnings.append(f"{len(several)} patient(s) have images under several labels (their "
                        f"split is stratified by their majority label), e.g. {first!r}: "
                        f"{', '.join(sorted(labels[first]))}")
    return warnings


def _size_warnings(infos: Sequence[ImageInfo]) -> list[str]:
    ok = [i for i in infos if i.error is None]
    small = [i for i in ok if min(i.width, i.height) < MIN_SIDE]
    large = [i for i in ok if max(i.width, i.height) > MAX_SIDE]
    out = []
    if small:
        out.append(f"{len(small)} image(s) smaller than {MIN_SIDE} px a side, e.g. "
                   f"{small[0].path} ({small[0].width}x{small[0].height})")
    if large:
        out.append(f"{len(large)} image(s) larger than {MAX_SIDE} px a side (slow to load; "
                   f"downscale them), e.g. {large[0].path} ({large[0].width}x{large[0].height})")
    return out


def site_check(data: Path, *, out: Callable[[str], None] = print) -> int:
    """Validate a site's dataset, decoding every image; print a summary and every problem.

    Returns 0 when the data can be used (warnings allowed). Raises `SiteCliError` (exit 2) when
    it cannot, after printing all the problems found.
    """
    from ldm_core.data import DataError, scan, split_by_patient

    index = scan(data)  # DataError: the file list itself is unusable (one message, exit 2)
    records = index.records
    if not records:
        raise SiteCliError(f"--data {data}: no images found; put them in class folders "
                           "(ROOT/<class>/*.png) or list them in a manifest.csv")
    errors: list[str] = []
    try:
        splits = split_by_patient(records)
    except DataError as e:
        errors.append(str(e))
        splits = {"train": list(records), "holdout": [], "test": []}
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
    infos = decode_images(paths)
    sizes = Counter(f"{i.width}x{i.height} {i.mode}" for i in infos if i.error is None)
    seen = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(6))
    out(f"images    decoded {len(infos)}: {seen or 'none readable'}")
    unreadable = [f"{i.path}: {i.error}" for i in infos if i.error is not None]
    warnings = _name_warnings(paths, [names[r.label] for r in records])
    warnings += _patient_warnings(records, names)
    warnings += _size_warnings(infos)
    tiny = [c for c in names if per_class[c] < 10]
    if tiny:
        warnings.append(f"class(es) with fewer than 10 images: {', '.join(tiny)}")
    for w in warnings:
        out(f"warning   {w}")
    for line in _listed("error     unreadable image", unreadable):
        out(line)
    for e in errors:
        out(f"error     {e}")
    if unreadable or errors:
        what = []
        if unreadable:
            what.append(f"{len(unreadable)} image(s) cannot be decoded (first: "
                        f"{unreadable[0]}; all are listed above): fix or remove them")
        what += errors
        raise SiteCliError(f"--data {data}: the data cannot be used: {'; '.join(what)}")
    out("ok        the data can be used" + (" (see warnings)" if warnings else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# site start


def _shell_quote(value: object) -> str:
    import shlex

    return shlex.quote(str(value))


def _init_command(state_dir: Path, site_id: str, epsilon: float, delta: float) -> str:
    return (f"fedldm site init --state-dir {_shell_quote(state_dir)} --site-id "
            f"{_shell_quote(site_id)} --epsilon {epsilon:g} --delta {delta:g}")


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


def read_ledger_header(path: Path) -> dict[str, Any]:
    """The ledger's top-level fields (site_id, delta, budget), read without verifying it."""
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
    from client.ledger import PrivacyLedger

    path = state_dir / LEDGER_FILE
    if not path.exists():
        return
    doc = read_ledger_header(path)
    if doc["site_id"] != site_id:
        raise SiteCliError(f"{path} belongs to site {doc['site_id']!r}, not {site_id!r}: use "
                           f"--site-id {doc['site_id']} or another --state-dir")
    try:
        stored_delta = float(doc["delta"])
        stored = float(jsonio.decode_float(doc.get("budget_epsilon")))
    except (TypeError, ValueError) as e:
        raise SiteCliError(f"{path}: delta or budget_epsilon is not a number; the ledger is "
                           "corrupt: restore it from a backup") from e
    if stored_delta != delta:
        raise SiteCliError(f"{path} was kept at delta {stored_delta:g}; pass --delta "
                           f"{stored_delta:g} (epsilons at different deltas do not add up)")
    if epsilon > stored:
        warn(f"--epsilon {epsilon:g} is above the budget {stored:g} stored in {path}; the "
             "stored (lower) budget stays in force")
    PrivacyLedger(path, site_id=site_id, delta=delta).remaining()  # full verified read


def write_node_config(path: Path, values: dict[str, Any]) -> Path:
    """Node config as TOML (flower-supernode reads `--node-config FILE.toml` verbatim), 0o600:
    it names the site's data paths and budget, which other local users need not see."""
    lines = ["# written by `fedldm site start`; read by the ClientApp (client.site_config)"]
    lines += [f"{k} = {A.toml_value(v)}" for k, v in values.items()]
    return files.write_text_atomic(path, "\n".join(lines) + "\n", mode=PRIVATE_FILE_MODE)


def build_supernode_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate a `site start` invocation; return the flower-supernode command and env."""
    from client.site_config import SiteConfig
    from ldm_core.data import DataError, scan

    superlink = parse_address(args.superlink)
    data = args.data.expanduser().resolve()
    if not data.exists():
        raise SiteCliError(f"--data {data}: no such file or folder")
    try:
        index = scan(data)
    except DataError as e:
        raise SiteCliError(f"--data: {e} (run `fedldm site check --data {data}`)") from e
    unmasked = [r for r in index.records if r.mask is None]
    if args.allow_masks and unmasked:
        raise SiteCliError(
            f"--allow-masks: {unmasked[0].path} has no mask ({len(unmasked)} of "
            f"{len(index.records)} images have none); give the CSV manifest a 'mask' column for "
            "every image, or drop --allow-masks")
    SiteConfig(site_id=args.site_id, data=str(data),
               state_dir=args.state_dir.expanduser().resolve(),
               epsilon=args.epsilon, delta=args.delta, partition=args.partition)
    state_dir = _check_state_dir(args.state_dir, args.site_id, args.epsilon, args.delta)
    _check_existing_ledger(state_dir, args.site_id, args.delta, args.epsilon)

    # `--isolation process`: the SuperNode launches no ClientApp of its own; the site's worker
    # (client.site_worker) answers every message with the fedldm installed here, never with the
    # app bundle the coordinator submitted (a malicious coordinator could ship any code in it).
    cmd = [flower_tool("flower-supernode"), "--superlink", superlink,
           "--port", str(args.port), "--isolation", "process",
           "--superexec-auth-secret-file", str(state_dir / WORKER_SECRET_FILE)]
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
        "device": args.device, "allow-audit": args.allow_audit,
        "allow-evaluate": args.allow_evaluate, "allow-masks": args.allow_masks,
        "progress": False,
    })
    cmd += ["--node-config", str(node_config)]
    return cmd, flower_env(state_dir / FLWR_HOME_DIR)


# What flower-supernode logs when the SuperLink refuses to activate it (flwr 1.42 error catalog).
ACTIVATION_FAILED = "Failed to activate SuperNode"


def worker_command(args: argparse.Namespace) -> list[str]:
    """The site's ClientApp worker (client.site_worker), which answers the SuperNode's tasks."""
    state_dir = args.state_dir.expanduser().resolve()
    return [sys.executable, "-m", "client.site_worker", "--runtime-api",
            f"127.0.0.1:{args.port}", "--secret-file", str(state_dir / WORKER_SECRET_FILE),
            "--parent-pid", str(os.getpid())]


def site_start(args: argparse.Namespace) -> int:
    cmd, env = build_supernode_command(args)
    worker = worker_command(args)
    print(f"fedldm site {args.site_id}: budget epsilon {args.epsilon:g}, delta {args.delta:g} "
          f"(the coordinator can lower it per run, never raise it); ledger "
          f"{args.state_dir.expanduser().resolve() / LEDGER_FILE}", flush=True)
    if args.dry_run:
        print(" ".join(worker))
        print(" ".join(cmd))
        return 0
    from client.site_worker import write_secret

    write_secret(args.state_dir.expanduser().resolve())
    # The worker must import this very fedldm (the one that validated the site), not another.
    worker_env = {**env, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])}
    # Its own session: a Ctrl-C at the terminal reaches the SuperNode through us, not the worker.
    proc = subprocess.Popen(worker, env=worker_env, start_new_session=True)
    stopping = threading.Event()

    def watch() -> None:
        # Without its worker the SuperNode would take messages nobody answers: stop it too, so
        # the site's supervisor (systemd, compose) restarts the pair.
        code = proc.wait()
        if not stopping.is_set():
            warn(f"the site worker exited (status {code}); stopping the SuperNode")
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    try:
        # A site restarted soon after a crash is refused until the SuperLink marks its previous
        # session offline: wait that out instead of exiting (common.procs.run_supervised).
        code = run_supervised(cmd, env, retry_marker=ACTIVATION_FAILED, retry_hint=(
            "Either this site's public key is not registered at the SuperLink (the coordinator "
            "registers it with `fedldm coordinator register-site`), or another SuperNode with "
            "this key is running."))
        return 1 if proc.poll() is not None and not stopping.is_set() else code
    finally:
        stopping.set()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


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

    if not site_id.strip():
        raise SiteCliError("--site-id is empty: give this site's name, e.g. hospital-a")
    created = not state_dir.expanduser().resolve().exists()
    state_dir = _make_state_dir(state_dir)
    path = state_dir / LEDGER_FILE
    try:
        PrivacyLedger.create(path, budget_epsilon=epsilon, delta=delta, site_id=site_id)
    except (ValueError, LedgerError) as e:
        if created:
            _remove_empty(state_dir)
        if isinstance(e, LedgerError):
            raise SiteCliError(f"{e} (nothing was changed)") from e
        raise SiteCliError(str(e)) from e
    out(f"enrolled site {site_id}: privacy ledger {path} (budget epsilon {epsilon:g} at delta "
        f"{delta:g}). Back up {path.name} and {path.name}.head together; never delete them.")
    return 0


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: never removes anything but the folder we just made


# ---------------------------------------------------------------------------------------------
# site budget


def site_budget(state_dir: Path, *, out: Callable[[str], None] = print) -> int:
    """Print what this site has spent, per run and phase, from its ledger (never modified)."""
    from client.ledger import PrivacyLedger

    path = state_dir.expanduser() / LEDGER_FILE
    if not path.is_file():
        raise SiteCliError(f"--state-dir {state_dir}: no ledger ({path}): this site is not "
                           "enrolled (`fedldm site init`), or --state-dir is not the folder "
                           "given to `fedldm site start`")
    doc = read_ledger_header(path)
    try:
        delta = float(doc["delta"])
    except (TypeError, ValueError) as e:
        raise SiteCliError(f"{path}: delta {doc['delta']!r} is not a number; the ledger is "
                           "corrupt: restore it from a backup") from e
    s = PrivacyLedger(path, site_id=str(doc["site_id"]), delta=delta).summary()
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `fedldm site {check,init,start,budget}`."""
    site = subparsers.add_parser("site", help="hospital side: check data, enrol, run the site "
                                 "daemon, show the privacy budget")
    sub = site.add_subparsers(dest="site_command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="validate a site's dataset (decodes every image) and "
                       "print a summary and every problem")
    c.add_argument("--data", type=A.path, required=True,
                   help="class-folder tree, manifest.csv, or a folder holding manifest.csv")
    c.add_argument("--sample", type=A.positive_int, help=argparse.SUPPRESS)  # no longer used

    i = sub.add_parser(
        "init", help="enrol this site once: create its state dir and privacy ledger",
        description="Create the state dir (mode 700) and an empty privacy ledger (mode 600). "
        "Run it once per site, on purpose: it refuses if a ledger exists. If the state folder "
        "was lost, restore ledger.json and ledger.json.head from backup instead of running "
        "init again, or the epsilon already spent is forgotten.")
    i.add_argument("--state-dir", type=A.path, required=True,
                   help="local folder for the privacy ledger (the one given to site start)")
    i.add_argument("--site-id", required=True, help="this site's name, e.g. hospital-a")
    i.add_argument("--epsilon", type=A.epsilon, required=True,
                   help="the site's total DP budget over all runs ('inf' = no DP)")
    i.add_argument("--delta", type=A.delta, required=True, help="DP delta, e.g. 1e-5")

    s = sub.add_parser(
        "start", help="run this site's Flower SuperNode (long-lived; Ctrl-C stops it)",
        description="Start the site daemon. The privacy budget (--epsilon/--delta) belongs to "
        "the site: a run may ask for less, never more (client.site_config.effective_target), "
        "and the ledger in --state-dir keeps it across runs and restarts.")
    s.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the coordinator's SuperLink address")
    s.add_argument("--data", type=A.path, required=True, help="the site's images (see site "
                   "check)")
    s.add_argument("--state-dir", type=A.path, required=True,
                   help="local folder for the privacy ledger, site.log and Flower's files "
                   "(made once by `fedldm site init`)")
    s.add_argument("--site-id", required=True, help="this site's name, e.g. hospital-a")
    s.add_argument("--root-certificates", type=A.path, metavar="CA.pem",
                   help="the consortium CA certificate (ca.crt) that signed the SuperLink's")
    s.add_argument("--auth-key", type=A.path, metavar="KEY",
                   help="this site's private key (auth.key); its .pub must be registered")
    s.add_argument("--epsilon", type=A.epsilon, default=8.0,
                   help="the site's total DP budget over all runs (default 8; the coordinator "
                   "cannot raise it)")
    s.add_argument("--delta", type=A.delta, default=1e-5, help="DP delta (default 1e-5)")
    s.add_argument("--port", type=A.port, default=SUPERNODE_DEFAULT_PORT,
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
    s.add_argument("--allow-evaluate", action="store_true",
                   help="answer the end-of-run evaluation: the site scores the coordinator's "
                   "synthetic-trained classifier and one it trains itself with DP-SGD on its "
                   "own test patients and releases one DP vector of counts, charged to its "
                   "ledger (off by default; reserved in the run's budget when on)")
    s.add_argument("--allow-masks", action="store_true",
                   help="take part in paired image/mask runs (model.mask_channels=1): the site "
                   "trains on the lesion masks of its manifest's mask column, under the same "
                   "DP-SGD and ledger as its images (off by default: a site without it refuses "
                   "such runs before reading or charging anything)")
    s.add_argument("--max-wait-time", type=float, metavar="SECONDS",
                   help="give up when the SuperLink cannot be reached for this long "
                   "(default: retry forever)")
    s.add_argument("--insecure", action="store_true",
                   help="NO TLS, for local trials only (loud warning)")
    s.add_argument("--dry-run", action="store_true",
                   help="validate and print the flower-supernode command, start nothing")

    b = sub.add_parser("budget", help="privacy budget spent per run and phase (read-only)")
    b.add_argument("--state-dir", type=A.path, required=True)


def run(args: argparse.Namespace) -> int:
    """Dispatch `fedldm site ...` (errors are reported by cli.main)."""
    if args.site_command == "check":
        if args.sample is not None:
            warn("--sample is ignored: site check now decodes every image")
        return site_check(args.data)
    if args.site_command == "init":
        return site_init(args.state_dir, site_id=args.site_id, epsilon=args.epsilon,
                         delta=args.delta)
    if args.site_command == "start":
        return site_start(args)
    if args.site_command == "budget":
        return site_budget(args.state_dir)
    raise SiteCliError(f"unknown site command {args.site_command!r}")


def command_name(args: argparse.Namespace) -> str:
    return f"site {args.site_command}"
