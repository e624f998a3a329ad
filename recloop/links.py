"""Links between the platform's UIs: the MLflow page of a run or of a model version, the Dagster page of a
run, and the tags that record the Dagster run on what it created in MLflow.

* `RECLOOP_MLFLOW_UI_URL` (default `http://127.0.0.1:5000`: `make mlflow` on the embedded store, or the
  compose stack's published MLflow port) is where a browser reaches the MLflow UI. It is not the tracking
  URI: inside the compose network the tracking server is `http://mlflow:5000`, which no browser resolves.
* `RECLOOP_DAGSTER_URL` (default `http://127.0.0.1:3000`: `make ui`, or the compose stack's Dagster
  webserver) is where a browser reaches the Dagster UI.

The MLflow UI routes (MLflow 3): `#/experiments/<id>/runs/<run>` (a run), `.../artifacts/<path>` (one of
its artifacts, HTML rendered in place), `#/models/<name>/versions/<n>` (a registered version). Lake
locations become `file://` URLs (`location_url`). Pure URL building: no MLflow call here.

MLflow 3's UI opens an experiment in its GenAI view (traces, sessions) unless told otherwise: the links
below carry `workflowType=machine_learning`, which opens the classic runs view; the experiments recloop
creates are also tagged `mlflow.experimentKind = custom_model_development` (`recloop.registry`).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

MLFLOW_UI_ENV = "RECLOOP_MLFLOW_UI_URL"
DAGSTER_UI_ENV = "RECLOOP_DAGSTER_URL"
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
DEFAULT_DAGSTER_UI_URL = "http://127.0.0.1:3000"

# Tags on the MLflow runs (and model versions) a Dagster run created.
DAGSTER_RUN_ID_TAG = "dagster.run_id"
DAGSTER_RUN_URL_TAG = "dagster.run_url"

# MLflow's UI: the classic (machine-learning) view rather than the GenAI one.
ML_VIEW = "workflowType=machine_learning"


def _base(env: str, default: str) -> str:
    return (os.environ.get(env) or "").strip().rstrip("/") or default


def mlflow_ui_url() -> str:
    """The MLflow UI's base URL ($RECLOOP_MLFLOW_UI_URL, default http://127.0.0.1:5000)."""
    return _base(MLFLOW_UI_ENV, DEFAULT_MLFLOW_UI_URL)


def dagster_ui_url() -> str:
    """The Dagster UI's base URL ($RECLOOP_DAGSTER_URL, default http://127.0.0.1:3000)."""
    return _base(DAGSTER_UI_ENV, DEFAULT_DAGSTER_UI_URL)


def mlflow_experiment_url(experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI."""
    return f"{mlflow_ui_url()}/#/experiments/{experiment_id}/runs?{ML_VIEW}"


def mlflow_run_url(experiment_id: str, run_id: str, *, artifact: str | None = None) -> str:
    """The run's page in the MLflow UI (params, metrics and their curves, datasets, artifacts); with
    `artifact` (a path inside the run's artifacts), that artifact's view."""
    url = f"{mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"
    if artifact:
        url += f"/artifacts/{quote(artifact.lstrip('/'))}"
    return f"{url}?{ML_VIEW}"


def mlflow_model_version_url(model_name: str, version: str | int) -> str:
    """The model version's page in the MLflow UI (aliases, tags, source run)."""
    return f"{mlflow_ui_url()}/#/models/{quote(model_name, safe='')}/versions/{version}?{ML_VIEW}"


def dagster_run_url(run_id: str) -> str:
    """The run's page in the Dagster UI."""
    return f"{dagster_ui_url()}/runs/{run_id}"


def dagster_run_tags(run_id: str | None) -> dict[str, str]:
    """`dagster.run_id` and `dagster.run_url` for the MLflow runs a Dagster run creates ({} without a run)."""
    if not run_id:
        return {}
    return {DAGSTER_RUN_ID_TAG: str(run_id), DAGSTER_RUN_URL_TAG: dagster_run_url(str(run_id))}


def location_url(location: str) -> str:
    """A lake location as a URL: `file://` for a local path, as it is for `s3://…` or `http(s)://…`."""
    if "://" in location:
        return location
    return Path(location).resolve().as_uri()
