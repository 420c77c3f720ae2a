"""deploy/certs/generate.sh makes what Flower 1.42 and the fedldm CLIs expect."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from tests.deploy.procs import REPO

SCRIPT = REPO / "deploy" / "certs" / "generate.sh"


def generate(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, check=check)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="openssl is not installed: generate.sh needs it for the CA")
def test_ca_superlink_certificate_and_site_keys(tmp_path: Path) -> None:
    generate("--out", str(tmp_path), "--hosts", "fedldm.example.org,10.0.0.7",
             "--sites", "hospital-a,hospital-b")
    ca, crt = _cert(tmp_path / "ca.crt"), _cert(tmp_path / "superlink.crt")
    crt.verify_directly_issued_by(ca)
    san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fedldm.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for secret in ("ca.key", "superlink.key"):
        assert (tmp_path / secret).stat().st_mode & 0o077 == 0
    for site in ("hospital-a", "hospital-b"):
        folder = tmp_path / "sites" / site
        key = load_ssh_private_key((folder / "auth.key").read_bytes(), None)
        pub = load_ssh_public_key((folder / "auth.key.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert (folder / "auth.key").stat().st_mode & 0o077 == 0

    # Rerunning keeps everything; --renew re-issues only the SuperLink certificate.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    generate("--out", str(tmp_path), "--sites", "hospital-a")
    assert {p: p.read_bytes() for p in before} == before
    generate("--out", str(tmp_path), "--renew")
    assert (tmp_path / "ca.crt").read_bytes() == before[tmp_path / "ca.crt"]
    assert (tmp_path / "superlink.crt").read_bytes() != before[tmp_path / "superlink.crt"]
    _cert(tmp_path / "superlink.crt").verify_directly_issued_by(ca)


def test_site_key_alone_needs_no_ca(tmp_path: Path) -> None:
    generate("site-key", "hospital-c", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "auth.key", "auth.key.pub"]
    key = load_ssh_private_key((tmp_path / "sites/hospital-c/auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize("args", [["site-key", "bad/name"], ["--days", "soon"], ["--nope"]])
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str]) -> None:
    done = generate(*args, "--out", str(tmp_path / "x"), check=False)
    assert done.returncode == 2
    assert "generate.sh:" in done.stderr
