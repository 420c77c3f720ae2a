"""What a federated round costs beyond the sites' training in a real deployment over loopback.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deployment_overhead.py [--sites 3] \
        [--dm-rounds 2] [--patients 4267] [--runtime site-worker|flower-subprocess]

The same measurement as benchmarks/federation_overhead.py, but through the deployment path a
consortium runs, all on 127.0.0.1: certificates from deploy/certs/generate.sh, `fedldm
coordinator start` (SuperLink behind the Fleet-only TLS proxy), each site's key registered,
`fedldm site init` + `fedldm site start` per site (a SuperNode with TLS and node
authentication, its own demo data: `fedldm demo-data --patients P`, P = the simulation
default's share), then `fedldm coordinator run --preset quick`. Per round, the coordinator's
round wall time (metrics.json) against the time the sites spent in `train_round` (each site's
own site.log). On 2 cores the sites do not all train at once, so the overhead is the part of
the round in which no site was training. Target: overhead <= 5% of a round with >= 60 s of
local compute. Prints JSON lines and a markdown table. Needs openssl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the deployment tests' process helpers

from federation_overhead import print_rows, round_rows  # noqa: E402

from tests.deploy.procs import (  # noqa: E402
    Proc,
    fedldm_cmd,
    fedldm_inprocess,
    free_port,
    wait_for_port,
)

GENERATE = REPO / "deploy" / "certs" / "generate.sh"


def flower_default_supernode(start: list[str], state: Path) -> list[str]:
    """The SuperNode `site start` would run, but in Flower's default runtime (`--isolation
    subprocess`: a fresh `flwr-clientapp` per message that installs and runs the submitted app
    bundle). For comparison only: a site must not run that way (client/site_worker.py)."""
    code, out, err = fedldm_inprocess(*start, "--dry-run")
    if code != 0:
        raise SystemExit(f"site start --dry-run failed:\n{err}")
    cmd = out.strip().splitlines()[-1].split(" ")  # temp paths, no spaces
    i = cmd.index("--isolation")
    del cmd[i:i + 2]
    i = cmd.index("--superexec-auth-secret-file")
    del cmd[i:i + 2]
    bin_dir = Path(sys.executable).parent
    return ["env", f"FLWR_HOME={state / 'flwr-home'}",
            f"PATH={bin_dir}:{os.environ.get('PATH', '')}", *cmd]


def deploy_and_run(args: argparse.Namespace, root: Path) -> tuple[Path, Path, float]:
    """Start the deployment, run one training run to the end; (run folder, states, wall s)."""
    (root / "logs").mkdir(parents=True)
    certs, states = root / "certs", root / "state"
    names = [f"site-{i + 1}" for i in range(args.sites)]
    subprocess.run(["bash", str(GENERATE), "--out", str(certs), "--sites", ",".join(names)],
                   check=True, capture_output=True, timeout=120)
    procs: dict[str, Proc] = {}
    port, local = free_port(), free_port()
    connection = ["--superlink", f"127.0.0.1:{local}", "--certs", str(certs)]
    try:
        procs["superlink"] = Proc("superlink", [
            *fedldm_cmd(), "coordinator", "start", "--host", "127.0.0.1", "--port", str(port),
            "--local-port", str(local), "--state-dir", str(root / "link"), "--certs",
            str(certs)], root / "logs")
        for i, name in enumerate(names):
            data = root / "data" / name
            code, _, err = fedldm_inprocess(
                "demo-data", "--out", str(data), "--patients", str(args.patients), "--slices",
                "1", "--sites", "1", "--image-size", "32", "--seed", str(i + 1))
            if code != 0:
                raise SystemExit(f"demo-data for {name} failed:\n{err}")
        wait_for_port(port, procs["superlink"], timeout=120)
        for name in names:
            code, _, err = fedldm_inprocess("coordinator", "register-site",
                                            str(certs / "sites" / name / "auth.key.pub"),
                                            *connection, "--name", name)
            if code != 0:
                raise SystemExit(f"register-site {name} failed:\n{err}")
            code, _, err = fedldm_inprocess("site", "init", "--state-dir", str(states / name),
                                            "--site-id", name, "--epsilon", "8", "--delta",
                                            "1e-5")
            if code != 0:
                raise SystemExit(f"site init {name} failed:\n{err}")
            start = [
                "site", "start", "--superlink", f"127.0.0.1:{port}", "--data",
                str(root / "data" / name), "--state-dir", str(states / name), "--site-id", name,
                "--root-certificates", str(certs / "ca.crt"), "--auth-key",
                str(certs / "sites" / name / "auth.key"), "--epsilon", "8", "--delta", "1e-5",
                "--port", str(free_port())]
            cmd = ([*fedldm_cmd(), *start] if args.runtime == "site-worker"
                   else flower_default_supernode(start, states / name))
            procs[name] = Proc(name, cmd, root / "logs")
        out = root / "runs" / "overhead"
        t0 = time.monotonic()
        procs["run"] = Proc("run", [
            *fedldm_cmd(), "coordinator", "run", *connection, "--out", str(out), "--preset",
            args.preset, "--dm-rounds", str(args.dm_rounds), "--min-sites", str(args.sites),
            "--num-sites", str(args.sites), "--wait-for-sites", "300", "--timeout", "7200"],
            root / "logs")
        code = procs["run"].wait(timeout=7500)
        wall = time.monotonic() - t0
        if code != 0:
            tails = "\n".join(f"--- {n}\n{p.tail(20)}" for n, p in procs.items())
            raise SystemExit(f"coordinator run exited with {code}:\n{tails}")
        return out, states, wall
    finally:
        for p in reversed(procs.values()):
            p.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--dm-rounds", type=int, default=2)
    ap.add_argument("--patients", type=int, default=4267,
                    help="demo patients per site (simulate's default 12,800 over 3 sites)")
    ap.add_argument("--runtime", choices=("site-worker", "flower-subprocess"),
                    default="site-worker", help="how the sites answer messages: fedldm's own "
                    "worker (`site start`, the default) or, for comparison, Flower's default "
                    "runtime that runs the submitted app bundle per message")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is not installed: deploy/certs/generate.sh needs it")
    if args.keep:
        out, states, wall = deploy_and_run(args, args.keep)
        rows = round_rows(out / "metrics.json", states, args.sites, wall)
    else:
        with tempfile.TemporaryDirectory(prefix="fedldm-deploy-overhead-") as tmp:
            out, states, wall = deploy_and_run(args, Path(tmp))
            rows = round_rows(out / "metrics.json", states, args.sites, wall)
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
