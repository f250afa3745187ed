#!/usr/bin/env bash
# Revoke a store: unregister its node on the SuperLink. Its SuperNode is refused from its next
# request on and cannot rejoin with that key; a store that comes back needs a new key.
#   usage: revoke-store.sh STORE
#   env:   FEDREC_CONNECTION (default fedrec), FEDREC_DEPLOY_DIR (Flower home and registry)
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STORE" >&2
    exit 2
fi
exec "$FEDREC" deploy store revoke "$1" --connection "${FEDREC_CONNECTION:-fedrec}"
