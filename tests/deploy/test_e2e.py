"""A real deployment on 127.0.0.1: SuperLink + SuperNodes as processes, TLS + node auth.

The sites reach the coordinator only through its public port, the Fleet-only proxy
(common/proxy.py); the operator's commands use the SuperLink's loopback port.

Certificates come from deploy/certs/generate.sh; sites get their data from `fedldm demo-data`;
the run goes through the `fedldm coordinator run` console script. Besides the two good sites,
two bad ones try to join: one whose key was never registered and one that trusts another CA.
They must be refused, leave nothing behind, and a run that needs them must not start.

To keep the wall time down on small machines, the good run is started by the fixture and the
refusal checks happen while it trains (the refused sites cannot disturb it: that is the point).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli import main as cli
from tests.deploy.procs import REPO, Proc, fedldm_cmd, fedldm_inprocess, free_port, wait_for_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None,
                       reason="openssl is not installed: deploy/certs/generate.sh needs it to "
                       "make the CA and the SuperLink's TLS certificate"),
]

GENERATE = REPO / "deploy" / "certs" / "generate.sh"
GOOD = ("site-a", "site-b")
EVALUATES = "site-a"
RUN_TIMEOUT_S = 420
BUNDLE_RAN = "coordinator-bundle-ran-at-a-site"


@dataclass
class Deployment:
    root: Path
    port: int  # public: the Fleet-only proxy, what the sites use
    local_port: int  # the SuperLink on 127.0.0.1: the operator's commands
    certs: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def connection(self) -> list[str]:
        return ["--superlink", f"127.0.0.1:{self.local_port}", "--certs", str(self.certs)]

    def state(self, site: str) -> Path:
        return self.root / "state" / site

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / "tiny"


def _site(dep: Deployment, name: str, *, key: str, ca: Path, data: Path,
          give_up_s: float | None = None, allow_evaluate: bool = False) -> Proc:
    extra = ["--max-wait-time", str(give_up_s)] if give_up_s is not None else []
    extra += ["--allow-evaluate"] if allow_evaluate else []
    # Enrolment is a deliberate, one-time step: `site start` refuses a missing ledger.
    code, _, err = fedldm_inprocess("site", "init", "--state-dir", str(dep.state(name)),
                                    "--site-id", name, "--epsilon", "8", "--delta", "1e-5")
    assert code == 0, err
    return Proc(name, [*fedldm_cmd(), "site", "start", "--superlink", f"127.0.0.1:{dep.port}",
                       "--data", str(data), "--state-dir", str(dep.state(name)),
                       "--site-id", name, "--root-certificates", str(ca),
                       "--auth-key", str(dep.certs / "sites" / key / "auth.key"),
                       "--epsilon", "8", "--delta", "1e-5", "--port", str(free_port()),
                       *extra], dep.root / "logs")


def _tampered_app(root: Path) -> Path:
    """The fedldm app as a malicious coordinator could submit it: its ClientApp leaves a mark
    (as code that reads the images would) the moment a site imports it. The sites must answer
    with their own installed fedldm, so the mark must never appear."""
    app = root / "app"
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))
    entry = app / "client" / "flower_app.py"
    entry.write_text(entry.read_text() + "\nfrom pathlib import Path as _Path\n\n"
                     f"_Path({str(root / BUNDLE_RAN)!r}).write_text('the bundle ran at a site')\n")
    return app


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    (root / "logs").mkdir()
    certs, other = root / "certs", root / "other-ca"
    for args in (["--out", str(certs), "--sites", "site-a,site-b,site-c,rogue"],
                 ["--out", str(other)]):
        subprocess.run(["bash", str(GENERATE), *args], check=True, capture_output=True,
                       timeout=60)
    data = {}
    for i, site in enumerate(GOOD):
        data[site] = root / "data" / site
        assert cli.main(["demo-data", "--out", str(data[site]), "--patients", "24", "--slices",
                         "3", "--sites", "2", "--image-size", "16", "--seed", str(i + 1)]) == 0
    dep = Deployment(root=root, port=free_port(), local_port=free_port(), certs=certs)
    try:
        link = Proc("superlink", [*fedldm_cmd(), "coordinator", "start", "--host", "127.0.0.1",
                                  "--port", str(dep.port), "--local-port", str(dep.local_port),
                                  "--state-dir", str(root / "link"), "--certs", str(certs)],
                    root / "logs")
        dep.procs["superlink"] = link
        wait_for_port(dep.port, link, timeout=90)
        for site in (*GOOD, "site-c"):  # "rogue" is never registered
            code, out, err = fedldm_inprocess("coordinator", "register-site",
                                              str(certs / "sites" / site / "auth.key.pub"),
                                              *dep.connection(), "--name", site)
            assert code == 0, err
            dep.node_ids[site] = re.search(r"as node (\d+)", out).group(1)
        for site in GOOD:
            # site-a allows the end-of-run evaluation, site-b does not (the default).
            dep.procs[site] = _site(dep, site, key=site, ca=certs / "ca.crt", data=data[site],
                                    allow_evaluate=site == EVALUATES)
        dep.procs["run"] = Proc("run", [
            *fedldm_cmd(), "coordinator", "run", *dep.connection(), "--out", str(dep.run_dir),
            "--app", str(_tampered_app(root)),
            "--preset", "tiny", "--set", "autoencoder.rounds=1", "--set", "diffusion.rounds=1",
            "--min-sites", "2", "--wait-for-sites", "120", "--timeout", str(RUN_TIMEOUT_S)],
            root / "logs")
        # Registered key, but it trusts another CA: must fail the TLS handshake.
        dep.procs["wrong-ca"] = _site(dep, "wrong-ca", key="site-c", ca=other / "ca.crt",
                                      data=data["site-a"], give_up_s=5)
        # Right CA, key never registered: the SuperLink must refuse to activate it.
        dep.procs["rogue"] = _site(dep, "rogue", key="rogue", ca=certs / "ca.crt",
                                   data=data["site-a"], give_up_s=5)
        yield dep
    finally:
        for p in reversed(dep.procs.values()):
            p.stop()


def _acquire_task(port: int, secret: bytes) -> object:
    """One AcquireTask call on the SuperNode's runtime API, signed with `secret`."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{port}", insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(
                          master_secret=secret,
                          protected_methods={"/flwr.proto.Runtime/AcquireTask"})],
        retry_invoker=None)
    try:
        return client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
    finally:
        client.close()


def test_refused_sites_never_join(deployment: Deployment) -> None:
    dep = deployment
    for name, why in (("rogue", "Failed to activate SuperNode"),
                      ("wrong-ca", "CERTIFICATE_VERIFY_FAILED")):
        proc = dep.procs[name]
        code = proc.wait(timeout=120)
        assert code is not None and code != 0, f"{name} is still running:\n{proc.tail()}"
        assert why in proc.log(), proc.tail()
        # Nothing was trained or charged there: an empty ledger, no site log.
        assert json.loads((dep.state(name) / "ledger.json").read_text())["entries"] == []
        assert not (dep.state(name) / "site.log").exists()
    code, out, err = fedldm_inprocess("coordinator", "sites", *dep.connection())
    assert code == 0, err
    row = next(ln for ln in out.splitlines() if ln.startswith(dep.node_ids["site-c"]))
    assert " online " not in row  # registered, never connected
    # A run that needs a third site must not start, and must leave no run folder behind.
    bad = dep.root / "runs" / "needs-three"
    code, out, err = fedldm_inprocess("coordinator", "run", *dep.connection(), "--out",
                                      str(bad), "--preset", "tiny", "--min-sites", "2",
                                      "--num-sites", "3", "--wait-for-sites", "3")
    assert code == 1, out + err
    assert re.search(r"only [0-2] site\(s\) online", err), err
    assert "nothing was submitted" in err
    assert not bad.exists()


def test_two_site_federation_end_to_end(deployment: Deployment,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dep = deployment
    run_proc = dep.procs["run"]
    # While the run trains: taking a site's tasks from its runtime API needs the secret its
    # `site start` wrote (the site's own worker has it); any other local process is refused.
    args = dep.procs["site-a"].proc.args
    runtime_port = int(args[args.index("--port") + 1])
    wait_for_port(runtime_port, dep.procs["site-a"], timeout=120)
    with pytest.raises(Exception, match="(?i)auth|denied|unauthenticated|permission|401|403"):
        _acquire_task(runtime_port, b"x" * 32)
    code = run_proc.wait(timeout=RUN_TIMEOUT_S + 60)
    logs = "\n".join(f"--- {n}\n{p.tail(15)}" for n, p in dep.procs.items())
    assert code == 0, f"{run_proc.tail(60)}\n{logs}"
    print(f"deployment up to run completed: {time.monotonic() - dep.started:.0f}s")
    assert "completed" in run_proc.log()

    run = dep.run_dir
    final = run / "checkpoints" / "final"
    assert (final / "meta.json").is_file()
    assert list(final.glob("*.safetensors"))
    assert (run / "report.html").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {r["phase"] for r in metrics["rounds"]} == {"autoencoder", "diffusion"}
    assert set(metrics["privacy"]["sites"]) == set(GOOD)
    run_name = json.loads((run / "checkpoints" / "state.json").read_text())["run_name"]

    # The run was submitted with a tampered app bundle (_tampered_app); no site executed it.
    assert not (dep.root / BUNDLE_RAN).exists()
    for site in GOOD:
        s = metrics["privacy"]["sites"][site]
        assert 0 < s["epsilon"] <= s["budget_epsilon"] + 1e-9
        ledger = json.loads((dep.state(site) / "ledger.json").read_text())
        assert ledger["site_id"] == site
        phases = {e["phase"] for e in ledger["entries"] if e["run_id"] == run_name}
        assert {"autoencoder", "diffusion"} <= phases
        capsys.readouterr()
        assert cli.main(["site", "budget", "--state-dir", str(dep.state(site))]) == 0
        shown = capsys.readouterr().out
        assert run_name in shown and "diffusion" in shown
        # Only the site that allows evaluations was charged for one, before it answered.
        assert ("evaluate" in phases) == (site == EVALUATES)
        # The site answered every message with its own fedldm (client.site_worker): the app
        # bundle the coordinator submitted was never installed, let alone run, at the site.
        apps = dep.state(site) / "flwr-home" / "apps"
        assert not apps.exists() or not any(apps.iterdir()), sorted(apps.iterdir())
        site_log = (dep.state(site) / "site.log").read_text()
        own = site_log.count("with this site's own ClientApp; the coordinator's app bundle")
        answered = len(list((dep.state(site) / "replies" / run_name).iterdir()))
        assert own >= answered >= 3, site_log[-2000:]  # autoencoder, latent-scale, diffusion

    # Utility and recall measured at the sites, with no reference set at the coordinator: what
    # site-a released (one DP vector), pooled; site-b's refusal is named as missing.
    u = metrics["utility"]
    assert u["measured_at"] == "sites" and u["sites"] == [EVALUATES]
    assert len(u["sites_missing"]) == 1 and "site-b" in u["sites_missing"][0]
    assert u["noise_std"] > 0 and "DP-SGD" in u["trtr_kind"]
    for key in ("tstr_auc", "trtr_auc", "tstr_acc", "trtr_acc"):
        assert key in u
    assert "recall" in metrics["fidelity"]["sites"]
    a = metrics["privacy"]["sites"][EVALUATES]
    assert a["epsilon"] <= a["budget_epsilon"] + 1e-9
    report = (run / "report.html").read_text()
    assert "Measured at the sites" in report
