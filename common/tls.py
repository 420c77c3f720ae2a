"""Checks of what a site or the coordinator is given to connect: addresses, certificates, keys.

Why check here and not leave it to Flower: a wrong file (a public key where the private one is
needed, a key where the CA certificate is needed) otherwise shows up as an opaque TLS or gRPC
error minutes later. Every check raises `TlsError` whose message names the flag, the file and
the fix. Imports neither client nor server (`cryptography` comes with Flower).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.procs import warn

__all__ = ["TlsError", "parse_address", "check_readable", "check_ca_file",
           "check_auth_private_key", "check_auth_public_key", "insecure_warning"]


class TlsError(ValueError):
    """An address, certificate or key is unusable; the message names the flag, file and fix."""


def insecure_warning(role: str) -> None:
    """--insecure is for trials on one machine; say so every time, on stderr."""
    bar = "!" * 78
    print(f"{bar}\n!! INSECURE {role}: TLS is OFF (and with it SuperNode authentication).\n"
          "!! Model weights travel unencrypted and any machine that can reach the port can\n"
          "!! join the federation as a site (the control API stays on loopback). Use this\n"
          "!! only for local trials on 127.0.0.1.\n"
          f"{bar}", file=sys.stderr, flush=True)


def parse_address(text: str, flag: str = "--superlink") -> str:
    """HOST:PORT (IPv6 as [::1]:PORT) without a scheme; raises with the expected form."""
    if "://" in text:
        raise TlsError(f"{flag} {text!r}: give HOST:PORT without a scheme "
                       "(e.g. coordinator.example.org:8000)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TlsError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return text


def check_readable(path: Path, flag: str, what: str) -> Path:
    """An existing file this user can read, as an absolute path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TlsError(f"{flag} {path}: no such file ({what})")
    if not os.access(path, os.R_OK):
        raise TlsError(f"{flag} {path}: not readable by this user; fix its permissions")
    return path.resolve()


def check_ca_file(path: Path, flag: str = "--root-certificates") -> Path:
    """A PEM CA bundle that parses, so a wrong file fails here and not as a TLS error later."""
    from cryptography import x509

    path = check_readable(path, flag, "the consortium CA certificate, ca.crt")
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as e:
        raise TlsError(f"{flag} {path}: not a PEM certificate ({e}); pass the ca.crt made "
                       "by deploy/certs/generate.sh") from e
    if not certs:
        raise TlsError(f"{flag} {path}: holds no certificate")
    return path


def check_auth_private_key(path: Path, flag: str = "--auth-key") -> Path:
    """The site's OpenSSH ECDSA private key (the format flower-supernode reads)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = check_readable(path, flag, "the site's private key, auth.key")
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"ecdsa-sha2-"):
        raise TlsError(f"{flag} {path}: this is a PUBLIC key; pass the private key "
                       "(auth.key, not auth.key.pub)")
    try:
        key = load_ssh_private_key(raw, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TlsError(f"{flag} {path}: not an unencrypted OpenSSH private key ({e}); make "
                       "one with `deploy/certs/generate.sh site-key NAME`") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{flag} {path}: Flower needs an ECDSA (NIST curve) key, got "
                       f"{type(key).__name__}; use `deploy/certs/generate.sh site-key NAME`")
    if path.stat().st_mode & 0o007:
        warn(f"{path} is readable by any user; restrict it: chmod 600 {path}")
    return path


def check_auth_public_key(path: Path, flag: str = "PUBKEY") -> Path:
    """A site's OpenSSH ECDSA public key (auth.key.pub), as the SuperLink registers it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = check_readable(path, flag, "a site's auth.key.pub")
    raw = path.read_bytes()
    if b"PRIVATE KEY" in raw:
        raise TlsError(f"{flag} {path} is a PRIVATE key. Ask the site for its .pub file "
                       "only; the private key must never leave the site (the site "
                       "should now make a new key pair)")
    try:
        key = load_ssh_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise TlsError(f"{flag} {path}: not an OpenSSH public key ({e}); sites make theirs "
                       "with `deploy/certs/generate.sh site-key NAME`") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TlsError(f"{flag} {path}: Flower needs an ECDSA (NIST P-256/384/521) key, "
                       f"got {type(key).__name__}")
    return path
