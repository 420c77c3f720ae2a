"""`fedldm coordinator ...` validation, without a running SuperLink (see test_e2e for that)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cli import main as cli
from cli.coordinator import CONNECTION, Connection
from tests.deploy.keys import ca_cert, rsa_public_key, site_keypair
from tests.deploy.procs import REPO, free_port

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl is not installed (deploy/certs/generate.sh)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (deploy/certs/generate.sh)")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "deploy" / "certs" / "generate.sh"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


def test_start_runs_superlink_with_tls_auth_and_database(certs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    state = tmp_path / "state"
    assert cli.main(["coordinator", "start", "--state-dir", str(state), "--certs", str(certs),
                     "--port", "8443", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert cmd[0].endswith("flower-superlink")
    for flag, value in (("--port", "8443"), ("--host", "0.0.0.0"),
                        ("--database", str(state / "superlink.db")),
                        ("--ssl-ca-certfile", str(certs / "ca.crt")),
                        ("--ssl-certfile", str(certs / "superlink.crt")),
                        ("--ssl-keyfile", str(certs / "superlink.key"))):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd


def test_start_needs_certs_unless_loudly_insecure(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path), "--dry-run"]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path), "--insecure",
                     "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "INSECURE COORDINATOR" in captured.err
    cmd = captured.out.strip().splitlines()[-1].split()
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd


@needs_openssl
def test_start_refuses_a_certificate_from_another_ca(certs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(certs, mixed)
    ca_cert(mixed / "ca.crt")  # a different CA than the one that signed superlink.crt
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path / "s"), "--certs",
                     str(mixed), "--dry-run"]) == 2
    assert "was not signed by" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "message"), [("private", "is a PRIVATE key"),
                                               ("rsa", "needs an ECDSA"),
                                               ("garbage", "not an OpenSSH public key")])
def test_register_site_checks_the_key_first(tmp_path: Path, kind: str, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    priv, _ = site_keypair(tmp_path)
    key = {"private": priv, "rsa": rsa_public_key(tmp_path / "rsa.pub"),
           "garbage": tmp_path / "garbage.pub"}[kind]
    if kind == "garbage":
        key.write_text("hello\n")
    assert cli.main(["coordinator", "register-site", str(key), "--insecure"]) == 2
    assert message in capsys.readouterr().err


def test_connection_is_what_flower_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    (tmp_path / "ca dir").mkdir()
    ca = ca_cert(tmp_path / "ca dir" / "ca.crt")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(Connection("10.1.2.3:8000", ca, False).toml())
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection(CONNECTION)
    assert conn.address == "10.1.2.3:8000"
    assert conn.root_certificates == str(ca)
    (home / "config.toml").write_text(Connection("127.0.0.1:8000", None, True).toml())
    assert read_superlink_connection(None).insecure


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "diffusion.no_such_field=3"], "rejected before submitting"),
    (["--class-names", "tumor"], "class-names"),
    (["--preset", "tiny", "--set", "autoencoder.batch_size=0"], "batch_size must be >= 1"),
])
def test_run_rejects_bad_options_before_contacting_anyone(tmp_path: Path, extra: list[str],
                                                          message: str,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    out = tmp_path / "run"
    argv = ["coordinator", "run", "--superlink", f"127.0.0.1:{free_port()}", "--insecure",
            "--out", str(out), *extra]
    assert cli.main(argv) == 2  # bad config: exit 2, nothing submitted
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_without_superlink_fails_cleanly(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["coordinator", "run", "--superlink", f"127.0.0.1:{free_port()}",
                     "--insecure", "--out", str(out), "--preset", "tiny",
                     "--wait-for-sites", "0"]) == 1
    err = capsys.readouterr().err
    assert "unavailable" in err.lower()
    assert not out.exists()
