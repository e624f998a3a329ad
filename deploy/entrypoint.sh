#!/usr/bin/env bash
# Entry point of the recloop image (under tini): prepares the writable folders, then runs the command.
#
#   RECLOOP_HOME   local scratch of recloop (feedback spool, temporary files); a named volume in compose
#   DAGSTER_HOME   the Dagster instance folder: dagster.yaml (baked into the image from deploy/dagster.yaml)
#                  and storage/ (compute logs, shared by the code location, webserver and daemon)
#   AIRFLOW_HOME   Airflow's folder (profile `airflow`); with AIRFLOW_ADMIN_PASSWORD set, the password of
#                  the `admin` user of Airflow's simple auth manager is written there before the command
set -euo pipefail

mkdir -p "${RECLOOP_HOME:-/var/lib/recloop}"
if [ -n "${DAGSTER_HOME:-}" ]; then
    mkdir -p "$DAGSTER_HOME/storage"
fi

# Airflow 3's simple auth manager keeps its users' passwords in a JSON file and generates (and logs) one
# for every user missing from it. Giving it the file keeps the password a secret of the environment.
if [ -n "${AIRFLOW_ADMIN_PASSWORD:-}" ] && [ -n "${AIRFLOW_HOME:-}" ]; then
    passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated}"
    mkdir -p "$(dirname "$passwords")"
    python - "$passwords" <<'PY'
import json, os, sys
with open(sys.argv[1], "w") as f:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
os.chmod(sys.argv[1], 0o600)
PY
fi

exec "$@"
