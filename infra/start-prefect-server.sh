#!/usr/bin/env bash
# Start a Prefect API + UI on 127.0.0.1 (state in $PREFECT_HOME, default ./amed-runs/prefect-server).
# Then, in other shells:  export PREFECT_API_URL=http://127.0.0.1:${PORT}/api
set -euo pipefail
PORT="${PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/amed-runs/prefect-server}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# the API the UI's pages call: this server's own (Prefect's default is 127.0.0.1:4200, or $PREFECT_API_URL)
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://127.0.0.1:${PORT}/api}"
mkdir -p "$PREFECT_HOME"
echo "Prefect UI: http://127.0.0.1:${PORT}   API: http://127.0.0.1:${PORT}/api   (state: $PREFECT_HOME)"
exec prefect server start --host 127.0.0.1 --port "$PORT"
