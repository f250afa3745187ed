#!/usr/bin/env bash
# Issue (or rotate) the SuperLink's TLS certificate, signed by the CA in PKI_DIR, for every
# name and address stores and admins use to reach it. Writes superlink.crt, superlink.key.
#   usage: create-superlink-cert.sh PKI_DIR HOST [HOST...]
#   e.g.   create-superlink-cert.sh pki coordinator.example.com 10.0.0.5 localhost
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
if [[ $# -lt 2 ]]; then
    echo "usage: $0 PKI_DIR HOST [HOST...]" >&2
    exit 2
fi
pki="$1"
shift
args=()
for host in "$@"; do
    args+=(--host "$host")
done
exec "$FEDREC" deploy pki server --dir "$pki" "${args[@]}"
