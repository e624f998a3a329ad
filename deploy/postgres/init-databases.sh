#!/usr/bin/env bash
# Creates the databases of the recloop stack and a read-only role for Grafana.
#
# The postgres image runs every script of /docker-entrypoint-initdb.d once, on the first start of an
# empty data volume, as POSTGRES_USER against POSTGRES_DB (docker-compose.yml mounts this folder there).
# To re-run it, remove the `postgres-data` volume, or run it by hand with psql's PG* variables set.
#
#   INIT_DATABASES        databases to create, space-separated (default: dagster mlflow feast recloop airflow)
#                         dagster: Dagster's runs, events and schedules (deploy/dagster.yaml)
#                         mlflow:  MLflow's tracking store and model registry
#                         feast:   Feast's SQL registry
#                         recloop: the alert delivery log and dead letters (RECLOOP_ALERTS_DB_URL)
#                         airflow: Airflow's metadata database (profile `airflow`)
#   MLFLOW_DATABASE       the one Grafana's drift panels read (default: mlflow)
#   GRAFANA_PG_USER       the read-only role Grafana logs in as (default: grafana_reader)
#   GRAFANA_PG_PASSWORD   its password (required)
#
# Idempotent: existing databases and roles are left as they are.
set -euo pipefail

owner="${POSTGRES_USER:-postgres}"
maintenance_db="${POSTGRES_DB:-$owner}"
databases="${INIT_DATABASES:-dagster mlflow feast recloop airflow}"
mlflow_db="${MLFLOW_DATABASE:-mlflow}"
reader="${GRAFANA_PG_USER:-grafana_reader}"
: "${GRAFANA_PG_PASSWORD:?GRAFANA_PG_PASSWORD must be set (password of the read-only role for Grafana)}"

run_psql() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$owner" --no-password "$@"
}

for db in $databases; do
    run_psql --dbname "$maintenance_db" -v db="$db" -v owner="$owner" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
-- Only its owner (and superusers) may connect; Grafana's role gets CONNECT on MLflow's database below.
REVOKE CONNECT ON DATABASE :"db" FROM PUBLIC;
SQL
done

# Grafana queries MLflow's tables (runs, tags, latest_metrics, experiments) for the drift panels. Grafana
# does not check what a dashboard's SQL does, so its role may only read, and only that database. MLflow
# creates its tables on first start, as POSTGRES_USER: default privileges grant SELECT on them as they come.
run_psql --dbname "$maintenance_db" -v reader="$reader" -v password="$GRAFANA_PG_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'reader', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reader') \gexec
SQL

run_psql --dbname "$mlflow_db" -v reader="$reader" -v owner="$owner" -v db="$mlflow_db" <<'SQL'
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"reader";
GRANT USAGE ON SCHEMA public TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
SQL

echo "recloop: databases ready: $databases; read-only role $reader on $mlflow_db"
