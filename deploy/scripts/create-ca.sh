#!/usr/bin/env bash
# Create the federation's CA (ca.crt, ca.key mode 0600) in PKI_DIR. Run it once, on an admin
# workstation; keep ca.key offline afterwards. Only ca.crt goes to the coordinator and stores.
#   usage: create-ca.sh PKI_DIR [DAYS]
set -euo pipefail
FEDREC="${FEDREC:-fedrec}"
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PKI_DIR [DAYS]" >&2
    exit 2
fi
exec "$FEDREC" deploy pki ca --dir "$1" --days "${2:-3650}"
