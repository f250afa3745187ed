#!/usr/bin/env bash
# Create one SuperNode key pair and one edge admin token per store in PKI_DIR/stores/:
# STORE.key (0600, goes to that store box only), STORE.pub (registered on the SuperLink),
# STORE.admin-token (0600, the store's FEDREC_EDGE_ADMIN_TOKEN).
#   usage: create-store-keys.sh PKI_DIR STORE [STORE...]
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
if [[ $# -lt 2 ]]; then
    echo "usage: $0 PKI_DIR STORE [STORE...]" >&2
    exit 2
fi
pki="$1"
shift
for store in "$@"; do
    "$FEDREC" deploy pki store-key "$store" --dir "$pki"
done
