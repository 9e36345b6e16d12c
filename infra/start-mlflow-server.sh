#!/usr/bin/env bash
# Start an MLflow tracking server + model registry on 127.0.0.1.
#   BACKEND   SQL store (default: sqlite under ./amed-runs/mlflow-server)
#   ARTIFACTS artifact destination (default: a local folder; e.g. s3://bucket/mlflow with AWS_* /
#             MLFLOW_S3_ENDPOINT_URL in the environment)
# Then:  export MLFLOW_TRACKING_URI=http://127.0.0.1:${PORT}
set -euo pipefail
PORT="${PORT:-5000}"
DIR="${MLFLOW_DIR:-$PWD/amed-runs/mlflow-server}"
mkdir -p "$DIR"
BACKEND="${BACKEND:-sqlite:///$DIR/mlflow.db}"
ARTIFACTS="${ARTIFACTS:-$DIR/artifacts}"
export MLFLOW_DISABLE_TELEMETRY=true
echo "MLflow UI/API: http://127.0.0.1:${PORT}   (backend: $BACKEND, artifacts: $ARTIFACTS)"
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host 127.0.0.1 --port "$PORT"
