#!/usr/bin/env bash
# The compose `mlflow` service without Docker: an MLflow tracking server on an existing
# PostgreSQL database and S3-compatible bucket (MinIO, AWS S3, ...), artifacts proxied.
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql://cugan:<password>@db.internal:5432/mlflow
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://cugan-mlflow/artifacts
#   export MLFLOW_S3_ENDPOINT_URL=http://minio.internal:9000     # omit for AWS S3
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...       # or an instance role
#   infra/services/mlflow-server.sh                              # serves on 0.0.0.0:5000
#
# Needs, in the Python that runs it: mlflow==3.17.2 (the lock's), psycopg2-binary and boto3
# (pip install psycopg2-binary==2.9.13 boto3==1.44.5). Options: MLFLOW_HOST, MLFLOW_PORT,
# MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS. The database schema is created/upgraded on start.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://user:pass@host:5432/mlflow)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
allowed="${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*,10.*,192.168.*,172.*}"

for module in psycopg2 boto3; do
    if ! python3 -c "import ${module}" 2>/dev/null; then
        echo "error: python module ${module} is missing (pip install psycopg2-binary boto3)" >&2
        exit 2
    fi
done

exec "${mlflow_bin}" server \
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" \
    --serve-artifacts \
    --host "${host}" --port "${port}" --workers "${workers}" \
    --allowed-hosts "${allowed}"
