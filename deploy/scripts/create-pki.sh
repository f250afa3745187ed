#!/usr/bin/env bash
# Everything deploy/compose needs, in one go: CA, SuperLink certificate (for `superlink`, the
# name SuperNodes use inside compose, `localhost` and any extra HOSTS), and key pair + admin
# token for store-01..store-NN. Existing files are kept, so it is safe to run again.
#   usage: create-pki.sh [PKI_DIR] [N_STORES] [HOST...]
#   default PKI_DIR: <repo>/state/compose/pki (what the compose files read), N_STORES: 3
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pki="${1:-$here/../../state/compose/pki}"
n="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))
args=(--host superlink --host localhost)
for host in "$@"; do
    args+=(--host "$host")
done
for i in $(seq 1 "$n"); do
    args+=(--store "$(printf 'store-%02d' "$i")")
done
exec "$FEDREC" deploy pki init --dir "$pki" "${args[@]}"
