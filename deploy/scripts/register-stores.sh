#!/usr/bin/env bash
# Admit stores: register each store's public key on the SuperLink (flwr supernode register)
# and record store -> node id in the store registry. Run where the admin tooling can reach the
# SuperLink's Control API (on the coordinator, or through its connection in FLWR_HOME).
#   usage: register-stores.sh PKI_DIR STORE [STORE...]
#   env:   FEDREC_CONNECTION (default fedrec), FEDREC_DEPLOY_DIR (Flower home and registry)
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
if [[ $# -lt 2 ]]; then
    echo "usage: $0 PKI_DIR STORE [STORE...]" >&2
    exit 2
fi
pki="$1"
shift
for store in "$@"; do
    "$FEDREC" deploy store register "$store" --key "$pki/stores/$store.pub" \
        --connection "${FEDREC_CONNECTION:-fedrec}"
done
