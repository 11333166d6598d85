# MLflow tracking server with the drivers its stores need: the official image has neither the
# PostgreSQL driver (backend store) nor boto3 (S3/MinIO artifact store). Built by compose.yaml.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5
