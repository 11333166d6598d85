#!/usr/bin/env bash
# The compose `mlflow` service without Docker: an MLflow tracking server on an existing
# PostgreSQL database and S3-compatible bucket (MinIO, AWS S3, ...), artifacts proxied.
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://cugan:<password>@db.internal:5432/mlflow
#   export MLFLOW_ARTIFACTS_DESTINATION=s3://cugan-mlflow/artifacts
#   export MLFLOW_S3_ENDPOINT_URL=http://minio.internal:9000     # omit for AWS S3
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...       # or an instance role
#   infra/services/mlflow-server.sh                              # serves on 0.0.0.0:5000
#
# Needs, in the Python that runs it: mlflow==3.17.2 and psycopg2-binary==2.9.13 (both in
# requirements.lock) and boto3 (pip install boto3==1.44.5). The URI must name its driver,
# postgresql+psycopg2://: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, on which some of
# MLflow 3.17's registry queries fail ("operator does not exist: integer = character varying").
# Options: MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS. The database schema is
# created/upgraded on start.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://user:pass@host:5432/mlflow)}"
case "${MLFLOW_BACKEND_STORE_URI}" in
    postgresql+psycopg2://*) ;;
    postgres://* | postgresql://* | postgresql+*)
        echo "error: MLFLOW_BACKEND_STORE_URI must start with postgresql+psycopg2:// (the driver this" \
            "project pins; a bare postgresql:// means psycopg 3 to SQLAlchemy 2.1)" >&2
        exit 2
        ;;
esac
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
