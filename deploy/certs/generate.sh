#!/usr/bin/env bash
# Certificates and keys for a fedldm deployment (Flower 1.42 SuperLink + SuperNodes).
#
# Why two kinds of key material:
#   * TLS (X.509, made with openssl): the sites check that they talk to the consortium's
#     SuperLink and nobody else. Sites only need ca.crt.
#   * SuperNode authentication (ECDSA P-384 key pairs in OpenSSH format, the format Flower 1.42
#     reads with `load_ssh_private_key` / `load_ssh_public_key`): the SuperLink only accepts
#     SuperNodes whose public key the coordinator registered (`fedldm coordinator register-site`).
#     A site's private key should be made AT THE SITE and never leave it (`site-key` below); the
#     coordinator only ever needs the .pub file.
#
# Usage:
#   generate.sh [--out DIR] [--hosts h1,h2,...] [--sites a,b,...] [--days N] [--renew]
#       CA (kept if it exists), SuperLink certificate, and one key pair per --sites name.
#       The SuperLink certificate always covers localhost, 127.0.0.1 and ::1, plus --hosts
#       (DNS names or IP addresses the sites use to reach the SuperLink).
#       --renew re-issues the SuperLink certificate with the existing CA (certificate rotation).
#   generate.sh site-key NAME [--out DIR]
#       Only a site's key pair, in DIR/sites/NAME/ (run this at the hospital; no CA involved).
#
# Output (DIR defaults to ./certs):
#   ca.crt                    give to every site (--root-certificates) and to `fedldm coordinator`
#   ca.key                    the CA's private key: keep it offline, it signs SuperLink certificates
#   superlink.crt/.key        the SuperLink's TLS certificate and key (coordinator only)
#   sites/NAME/auth.key       the site's private key (stays at the site, `fedldm site start --auth-key`)
#   sites/NAME/auth.key.pub   the site's public key (send to the coordinator to register)
#
# Existing keys are never overwritten: delete a file deliberately to replace it.
set -euo pipefail

OUT="certs"
HOSTS=""
SITES=""
DAYS=825
RENEW=0
MODE="all"
SITE_NAME=""

die() { echo "generate.sh: $*" >&2; exit 2; }

if [[ $# -gt 0 && "$1" == "site-key" ]]; then
    MODE="site-key"
    shift
    [[ $# -gt 0 && "$1" != --* ]] || die "site-key needs a NAME, e.g. generate.sh site-key hospital-a"
    SITE_NAME="$1"
    shift
fi

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --hosts) [[ $# -ge 2 ]] || die "--hosts needs a comma-separated list"; HOSTS="$2"; shift 2 ;;
        --sites) [[ $# -ge 2 ]] || die "--sites needs a comma-separated list"; SITES="$2"; shift 2 ;;
        --days) DAYS="${2:?--days needs a number}"; shift 2 ;;
        --renew) RENEW=1; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ "$DAYS" =~ ^[0-9]+$ ]] || die "--days must be a whole number of days, got '$DAYS'"
umask 077
mkdir -p "$OUT"

valid_name() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
        || die "site name '$1' may only use letters, digits, '.', '_' and '-'"
}

# One ECDSA P-384 key pair in OpenSSH format. ssh-keygen when present, else Python's
# `cryptography` (a Flower dependency, so it exists wherever fedldm is installed).
site_key() {
    local name="$1" dir="$OUT/sites/$1"
    valid_name "$name"
    mkdir -p "$dir"
    if [[ -e "$dir/auth.key" ]]; then
        echo "kept existing $dir/auth.key"
        return
    fi
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedldm-$name" -f "$dir/auth.key" </dev/null
    else
        local py="${PYTHON:-python3}"
        command -v "$py" >/dev/null 2>&1 \
            || die "need ssh-keygen or Python with 'cryptography' (set PYTHON=/path/to/python)"
        "$py" - "$dir/auth.key" "fedldm-$name" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, comment = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
with open(path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()))
pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH)
with open(path + ".pub", "wb") as f:
    f.write(pub + b" " + comment.encode() + b"\n")
PY
    fi
    chmod 600 "$dir/auth.key"
    chmod 644 "$dir/auth.key.pub"
    echo "wrote $dir/auth.key (private: stays at the site) and $dir/auth.key.pub (register it)"
}

if [[ "$MODE" == "site-key" ]]; then
    site_key "$SITE_NAME"
    exit 0
fi

command -v openssl >/dev/null 2>&1 || die "openssl is required for the CA and TLS certificates"

# -- CA ----------------------------------------------------------------------------------------
if [[ -e "$OUT/ca.key" && -e "$OUT/ca.crt" ]]; then
    echo "kept existing CA $OUT/ca.crt"
else
    [[ ! -e "$OUT/ca.key" && ! -e "$OUT/ca.crt" ]] \
        || die "$OUT holds only one of ca.key/ca.crt; restore the other or remove both"
    openssl req -x509 -new -nodes -sha384 -days "$DAYS" \
        -newkey ec -pkeyopt ec_paramgen_curve:P-384 \
        -keyout "$OUT/ca.key" -out "$OUT/ca.crt" \
        -subj "/O=fedldm consortium/CN=fedldm consortium CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 644 "$OUT/ca.crt"
    echo "wrote CA $OUT/ca.crt (+ ca.key: keep it offline)"
fi

# -- SuperLink certificate ---------------------------------------------------------------------
if [[ -e "$OUT/superlink.crt" && "$RENEW" -eq 0 ]]; then
    echo "kept existing $OUT/superlink.crt (use --renew to re-issue it)"
else
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    IFS=',' read -r -a host_list <<< "$HOSTS"
    for h in "${host_list[@]}"; do
        h="${h// /}"
        [[ -z "$h" ]] && continue
        if [[ "$h" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$h" == *:* ]]; then
            san="$san,IP:$h"
        else
            san="$san,DNS:$h"
        fi
    done
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    cat > "$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EOF
    openssl req -new -nodes -sha384 -newkey ec -pkeyopt ec_paramgen_curve:P-384 \
        -keyout "$tmp/superlink.key" -out "$tmp/superlink.csr" \
        -subj "/O=fedldm consortium/CN=fedldm-superlink" 2>/dev/null
    openssl x509 -req -sha384 -days "$DAYS" -in "$tmp/superlink.csr" \
        -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$tmp/ext.cnf" -out "$tmp/superlink.crt" 2>/dev/null
    mv "$tmp/superlink.key" "$OUT/superlink.key"
    mv "$tmp/superlink.crt" "$OUT/superlink.crt"
    chmod 600 "$OUT/superlink.key"
    chmod 644 "$OUT/superlink.crt"
    echo "wrote $OUT/superlink.crt for $san"
fi

# -- site key pairs ----------------------------------------------------------------------------
IFS=',' read -r -a site_list <<< "$SITES"
for s in "${site_list[@]}"; do
    s="${s// /}"
    [[ -n "$s" ]] && site_key "$s"
done
exit 0
