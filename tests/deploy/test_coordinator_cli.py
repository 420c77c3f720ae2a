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


def _dry_run_commands(out: str) -> tuple[list[str], list[str]]:
    """The SuperLink's and the proxy's command lines printed by `coordinator start --dry-run`."""
    lines = [ln.split() for ln in out.strip().splitlines()]
    (link,) = [c for c in lines if c and c[0].endswith("flower-superlink")]
    (proxy,) = [c for c in lines if c[1:3] == ["-m", "common.proxy"]]
    return link, proxy


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_start_runs_superlink_on_loopback_behind_the_fleet_proxy(
        certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert cli.main(["coordinator", "start", "--state-dir", str(state), "--certs", str(certs),
                     "--port", "8443", "--dry-run"]) == 0
    out = capsys.readouterr().out
    link, proxy = _dry_run_commands(out)
    # The SuperLink (Fleet + Control + runtime APIs on one port) only ever on loopback.
    for flag, value in (("--port", "8001"), ("--host", "127.0.0.1"),
                        ("--database", str(state / "superlink.db")),
                        ("--ssl-ca-certfile", str(certs / "ca.crt")),
                        ("--ssl-certfile", str(certs / "superlink.crt")),
                        ("--ssl-keyfile", str(certs / "superlink.key"))):
        assert _flag(link, flag) == value, flag
    assert "--enable-supernode-auth" in link
    assert "--disable-runtime-dependency-installation" in link
    assert "--insecure" not in link
    # The public side: the proxy, with the SuperLink's certificate, on 127.0.0.1 by default.
    for flag, value in (("--host", "127.0.0.1"), ("--port", "8443"), ("--upstream-port", "8001"),
                        ("--certfile", str(certs / "superlink.crt")),
                        ("--keyfile", str(certs / "superlink.key")),
                        ("--ca-certfile", str(certs / "ca.crt")),
                        ("--max-body-bytes", str(64 * 1024 * 1024))):
        assert _flag(proxy, flag) == value, flag
    assert "--insecure" not in proxy and "--allow-self-registration" not in proxy
    assert "public      127.0.0.1:8443" in out and "local only  127.0.0.1:8001" in out
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "flwr-home").stat().st_mode & 0o777 == 0o700


def test_start_exposes_only_the_proxy_when_asked(certs: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "superlink.db").write_bytes(b"")
    (state / "superlink.db").chmod(0o644)
    assert cli.main(["coordinator", "start", "--state-dir", str(state), "--certs", str(certs),
                     "--host", "0.0.0.0", "--local-port", "9999", "--max-request-mib", "8",
                     "--dry-run"]) == 0
    link, proxy = _dry_run_commands(capsys.readouterr().out)
    assert (_flag(link, "--host"), _flag(link, "--port")) == ("127.0.0.1", "9999")
    assert (_flag(proxy, "--host"), _flag(proxy, "--port")) == ("0.0.0.0", "8000")
    assert _flag(proxy, "--upstream-port") == "9999"
    assert _flag(proxy, "--max-body-bytes") == str(8 * 1024 * 1024)
    # An older, world-readable state folder is made private.
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "superlink.db").stat().st_mode & 0o777 == 0o600


def test_start_refuses_one_port_for_both(certs: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path), "--certs", str(certs),
                     "--port", "8001", "--dry-run"]) == 2
    assert "must differ" in capsys.readouterr().err


def test_start_needs_certs_unless_loudly_insecure(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path), "--dry-run"]) == 2
    assert "--certs DIR is required" in capsys.readouterr().err
    assert cli.main(["coordinator", "start", "--state-dir", str(tmp_path), "--insecure",
                     "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "INSECURE COORDINATOR" in captured.err
    link, proxy = _dry_run_commands(captured.out)
    assert "--insecure" in link and "--enable-supernode-auth" not in link
    assert _flag(link, "--host") == "127.0.0.1"
    # Without node auth SuperNodes register themselves: the proxy lets that through, only then.
    assert "--insecure" in proxy and "--allow-self-registration" in proxy


def test_operator_commands_default_to_the_loopback_port() -> None:
    from cli.main import build_parser

    for cmd in (["sites"], ["unregister-site", "3"], ["run", "--out", "x"]):
        args = build_parser().parse_args(["coordinator", *cmd])
        assert args.superlink == "127.0.0.1:8001"


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
