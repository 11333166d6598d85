-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d):
-- POSTGRES_DB creates `mlflow`; Prefect gets its own database on the same server.
CREATE DATABASE prefect OWNER cugan;
