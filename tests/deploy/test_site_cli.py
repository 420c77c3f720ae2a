"""`fedldm site check|init|start|budget`: validation and summaries, without starting Flower."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main as cli
from client.ledger import PrivacyLedger
from client.site_config import SiteConfig
from tests.deploy.keys import ca_cert, site_keypair


def _png(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, dtype=np.uint8)).save(path)


def test_check_summarises_a_manifest(demo_manifest: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["site", "check", "--data", str(demo_manifest.parent)]) == 0
    out = capsys.readouterr().out
    assert "manifest layout, 108 images" in out
    assert "patients  36" in out
    assert "decoded 108: 16x16 L (108)" in out
    assert "ok " in out


def test_check_warns_about_file_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("normal", "tumor"):
        for i in range(6):
            _png(tmp_path / cls / f"img{i}.png")  # same names in both classes
    _png(tmp_path / "tumor" / "with space.png")
    _png(tmp_path / "normal" / "été.png")
    assert cli.main(["site", "check", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no patient ids" in out
    assert "file name(s) with spaces" in out
    assert "non-ASCII" in out
    assert "under more than one class" in out


@pytest.mark.parametrize("layout", ["empty", "one-class", "unreadable"])
def test_check_exits_2_on_bad_data(tmp_path: Path, layout: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    if layout == "one-class":
        for i in range(12):
            _png(tmp_path / "normal" / f"{i}.png")
    elif layout == "unreadable":
        for cls in ("normal", "tumor"):
            for i in range(6):
                _png(tmp_path / cls / f"{i}.png")
        (tmp_path / "tumor" / "broken.png").write_bytes(b"not a png")
    assert cli.main(["site", "check", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fedldm site check:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _init(state: Path, site: str = "hospital-a", epsilon: str = "8",
          delta: str = "1e-5") -> int:
    return cli.main(["site", "init", "--state-dir", str(state), "--site-id", site,
                     "--epsilon", epsilon, "--delta", delta])


@pytest.fixture
def site_files(tmp_path: Path, demo_manifest: Path) -> dict[str, Path]:
    """An enrolled site (ledger at the `site start` defaults: epsilon 8, delta 1e-5)."""
    priv, pub = site_keypair(tmp_path / "keys")
    state = tmp_path / "state dir with space"
    assert _init(state) == 0
    return {"data": demo_manifest.parent, "state": state,
            "ca": ca_cert(tmp_path / "ca.crt"), "key": priv, "pub": pub}


def _start(f: dict[str, Path], *extra: str, site: str = "hospital-a") -> list[str]:
    return ["site", "start", "--superlink", "127.0.0.1:8000", "--data", str(f["data"]),
            "--state-dir", str(f["state"]), "--site-id", site, "--dry-run", *extra]


def test_start_node_config_round_trips_through_flower(site_files: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.common.config import parse_config_args

    site_files["state"] = site_files["state"].with_name("inf state")
    assert _init(site_files["state"], epsilon="inf", delta="1e-6") == 0
    argv = _start(site_files, "--root-certificates", str(site_files["ca"]), "--auth-key",
                  str(site_files["key"]), "--epsilon", "inf", "--delta", "1e-6", "--port", "9200")
    assert cli.main(argv) == 0
    worker, command = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "flower-supernode --superlink 127.0.0.1:8000 --port 9200" in command
    # The SuperNode runs no ClientApp itself (no coordinator-shipped code at the site): the
    # site's own worker answers its tasks, on the same runtime port, with the start's secret.
    assert "--isolation process" in command
    secret = site_files["state"] / "superexec.secret"
    assert f"--superexec-auth-secret-file {secret}" in command
    assert "-m client.site_worker --runtime-api 127.0.0.1:9200" in worker
    assert f"--secret-file {secret}" in worker
    assert f"--auth-supernode-private-key {site_files['key']}" in command
    node_config = site_files["state"] / "node-config.toml"
    assert f"--node-config {node_config}" in command
    assert node_config.stat().st_mode & 0o777 == 0o600
    site = SiteConfig.from_node_config(parse_config_args([str(node_config)]))
    assert site.site_id == "hospital-a"
    assert site.state_dir == site_files["state"]
    assert Path(site.data) == site_files["data"]
    assert math.isinf(site.epsilon) and site.delta == 1e-6
    assert site.partition == "all" and not site.allow_audit  # audits are opt-in
    assert not site.allow_masks  # so are paired image/mask runs


def test_allow_masks_reaches_the_node_config_only_for_data_with_masks(
        site_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    from flwr.common.config import parse_config_args

    assert cli.main(_start(site_files, "--insecure", "--allow-masks")) == 0
    node_config = site_files["state"] / "node-config.toml"
    assert SiteConfig.from_node_config(parse_config_args([str(node_config)])).allow_masks
    # A manifest whose last image has no mask: refused at start, naming the file.
    manifest = site_files["data"] / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    rows[-1]["mask"] = ""
    partial = tmp_path / "partial.csv"
    with partial.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str(site_files["data"] / r["path"]),
                     "mask": r["mask"] and str(site_files["data"] / r["mask"])} for r in rows)
    site_files["data"] = partial
    capsys.readouterr()
    assert cli.main(_start(site_files, "--insecure", "--allow-masks")) == 2
    err = capsys.readouterr().err
    assert "--allow-masks" in err and Path(rows[-1]["path"]).name in err
    assert cli.main(_start(site_files, "--insecure")) == 0  # without it the masks are not needed


@pytest.mark.parametrize(("extra", "message"), [
    (["--superlink", "https://host:8000"], "without a scheme"),
    (["--superlink", "host"], "expected HOST:PORT"),
    (["--data", "/no/such/folder"], "no such file or folder"),
    (["--auth-key", "PUB"], "this is a PUBLIC key"),
    (["--auth-key", "CA"], "not an unencrypted OpenSSH private key"),
    (["--root-certificates", "KEY"], "not a PEM certificate"),
    (["--insecure", "--root-certificates", "CA"], "--insecure turns TLS off"),
    (["--delta", "2"], "delta must be in (0, 1)"),
])
def test_start_rejects_bad_input(site_files: dict[str, Path], extra: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    names = {"PUB": site_files["pub"], "CA": site_files["ca"], "KEY": site_files["key"]}
    extra = [str(names.get(a, a)) for a in extra]
    assert cli.main(_start(site_files, *extra)) == 2
    err = capsys.readouterr().err
    assert "fedldm site start:" in err and message in err


def test_start_refuses_another_sites_ledger(site_files: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    site_files["state"] = site_files["state"].with_name("other site")
    site_files["state"].mkdir()
    PrivacyLedger.create(site_files["state"] / "ledger.json", budget_epsilon=8.0, delta=1e-5,
                         site_id="hospital-b")
    assert cli.main(_start(site_files)) == 2
    assert "belongs to site 'hospital-b'" in capsys.readouterr().err


def test_insecure_is_loud(site_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_start(site_files, "--insecure")) == 0
    captured = capsys.readouterr()
    assert "INSECURE SITE" in captured.err
    assert "--insecure" in captured.out.splitlines()[-1]


def test_budget_shows_runs_and_phases_read_only(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.create(path, budget_epsilon=8.0, delta=1e-5, site_id="hospital-a")
    ledger.charge([(1.2, 0.1, 50)], run_id="run-1", phase="autoencoder", round=1)
    ledger.charge([(1.2, 0.1, 50)], run_id="run-1", phase="diffusion", round=1)
    before = path.read_bytes()
    assert cli.main(["site", "budget", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "site hospital-a" in out and "budget epsilon 8" in out
    assert "run-1" in out and "autoencoder" in out and "diffusion" in out
    assert "2 entries, hash chain and head verified" in out
    assert path.read_bytes() == before


def test_budget_without_ledger_exits_2(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["site", "budget", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no ledger" in err and "fedldm site init" in err


def test_init_creates_a_private_state_dir_and_ledger(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "new site"
    assert _init(state, epsilon="6", delta="1e-6") == 0
    assert "enrolled site hospital-a" in capsys.readouterr().out
    assert state.stat().st_mode & 0o777 == 0o700
    for name in ("ledger.json", "ledger.json.head"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    ledger = PrivacyLedger.open(state / "ledger.json", budget_epsilon=6.0, delta=1e-6,
                                site_id="hospital-a")
    assert ledger.budget_epsilon == 6.0 and ledger.history == []


def test_second_init_refuses_and_changes_nothing(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert _init(state) == 0
    PrivacyLedger.open(state / "ledger.json", budget_epsilon=8.0, delta=1e-5,
                       site_id="hospital-a").charge([(1.2, 0.1, 50)], run_id="r", phase="p",
                                                    round=1)
    before = {n: (state / n).read_bytes() for n in ("ledger.json", "ledger.json.head")}
    capsys.readouterr()
    assert _init(state, epsilon="100") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedldm site init:") and "already enrolled" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {n: (state / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("lost", ["folder", "ledger"])
def test_start_without_a_ledger_refuses(site_files: dict[str, Path], lost: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if lost == "folder":
        site_files["state"] = site_files["state"].with_name("never enrolled")
    else:  # the review's scenario: the state was deleted, the folder came back empty
        for f in site_files["state"].iterdir():
            f.unlink()
    capsys.readouterr()
    assert cli.main(_start(site_files)) == 2
    captured = capsys.readouterr()
    assert "fedldm site start:" in captured.err and "Traceback" not in captured.err
    assert f"fedldm site init --state-dir '{site_files['state']}'" in captured.err
    assert "flower-supernode" not in captured.out
    assert not (site_files["state"] / "ledger.json").exists()
    assert not (site_files["state"] / "node-config.toml").exists()


def test_start_refuses_a_truncated_ledger(site_files: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from client.ledger import PrivacyLedger

    PrivacyLedger.open(site_files["state"] / "ledger.json", budget_epsilon=8.0, delta=1e-5,
                       site_id="hospital-a").charge([(1.0, 0.01, 10)], run_id="r",
                                                    phase="autoencoder", round=1)
    (site_files["state"] / "ledger.json.head").unlink()  # spend, and no head: refused
    assert cli.main(_start(site_files)) == 2
    err = capsys.readouterr().err
    assert "fedldm site start:" in err and "head file" in err and "backup" in err


def test_the_worker_secret_is_fresh_and_private(tmp_path: Path) -> None:
    from cli.site import WORKER_SECRET_FILE
    from client.site_worker import SECRET_FILE, write_secret

    assert WORKER_SECRET_FILE == SECRET_FILE
    first = write_secret(tmp_path).read_bytes()
    path = write_secret(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32 and path.read_bytes() != first


def test_site_start_runs_its_worker_and_stops_when_the_worker_dies(
        site_files: dict[str, Path], tmp_path: Path) -> None:
    """No SuperLink is listening: the SuperNode keeps trying to connect, the worker waits for
    tasks. A worker that dies must take the SuperNode with it (nobody would answer its
    messages), and `site start` must exit non-zero so the site's supervisor restarts both."""
    import os
    import signal
    import time

    from tests.deploy.procs import Proc, fedldm_cmd, find_below, free_port, wait_gone

    (tmp_path / "logs").mkdir()
    site = Proc("site", [*fedldm_cmd(), "site", "start", "--superlink",
                         f"127.0.0.1:{free_port()}", "--data", str(site_files["data"]),
                         "--state-dir", str(site_files["state"]), "--site-id", "hospital-a",
                         "--insecure", "--port", str(free_port())], tmp_path / "logs")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                find_below(site.proc.pid, "client.site_worker")
                and find_below(site.proc.pid, "flower-supernode")):
            assert site.alive(), site.tail()
            time.sleep(0.3)
        workers = find_below(site.proc.pid, "client.site_worker")
        supernodes = find_below(site.proc.pid, "flower-supernode")
        assert workers and supernodes, site.tail()
        time.sleep(2.0)  # both settled
        assert not find_below(site.proc.pid, "flower-superexec")  # nothing runs the bundle
        os.kill(workers[0], signal.SIGKILL)
        assert site.wait(timeout=60) == 1, site.tail()
        assert "the site worker exited" in site.log()
        assert not wait_gone(supernodes), "the SuperNode outlived its worker"
    finally:
        site.stop()
