#!/bin/sh
# Entry point of the fedrec images: turn mounted secret files into the settings fedrec reads,
# write the admin tooling's SuperLink connection, then run the command (exec: it gets PID 1's
# signals through `init: true` / `docker run --init`).
set -eu

# The edge service reads its admin token from FEDREC_EDGE_ADMIN_TOKEN only; Docker secrets are
# files. The variable name stays outside the FEDREC_EDGE_ prefix on purpose.
if [ -n "${FEDREC_ADMIN_TOKEN_FILE:-}" ]; then
    if [ ! -r "$FEDREC_ADMIN_TOKEN_FILE" ]; then
        echo "error: cannot read FEDREC_ADMIN_TOKEN_FILE=$FEDREC_ADMIN_TOKEN_FILE" >&2
        exit 1
    fi
    FEDREC_EDGE_ADMIN_TOKEN="$(cat "$FEDREC_ADMIN_TOKEN_FILE")"
    export FEDREC_EDGE_ADMIN_TOKEN
    unset FEDREC_ADMIN_TOKEN_FILE
fi

# A site directory must exist before the SuperNode's ClientApp or the edge service use it.
if [ -n "${FEDREC_SITE_DIR:-}" ]; then
    mkdir -p "$FEDREC_SITE_DIR/models"
fi

# The `fedrec` connection admin commands (flwr, fedrec coordinator/deploy) use.
if [ -n "${FEDREC_CONNECTION_ADDRESS:-}" ]; then
    if [ -n "${FEDREC_CONNECTION_CA:-}" ]; then
        fedrec deploy connection fedrec --address "$FEDREC_CONNECTION_ADDRESS" \
            --ca "$FEDREC_CONNECTION_CA" >/dev/null
    else
        fedrec deploy connection fedrec --address "$FEDREC_CONNECTION_ADDRESS" \
            --insecure >/dev/null
    fi
fi

exec "$@"
