"""Browser links to what recloop records elsewhere: MLflow runs, their artifacts and registered model
versions (the MLflow UI at `RECLOOP_MLFLOW_UI_URL`, default http://127.0.0.1:5000: what compose publishes,
and where `mlflow ui` listens locally), and lake files. Pure URL building: no MLflow call here.

The MLflow UI routes (MLflow 3): `#/experiments/<id>/runs/<run>` (a run), `.../artifacts/<path>` (one of
its artifacts, HTML rendered in place), `#/models/<name>/versions/<n>` (a registered version).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

UI_URL_ENV = "RECLOOP_MLFLOW_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"


def mlflow_ui_url() -> str:
    """The MLflow UI's base URL as a browser reaches it ($RECLOOP_MLFLOW_UI_URL, no trailing slash)."""
    return (os.environ.get(UI_URL_ENV) or "").strip().rstrip("/") or DEFAULT_UI_URL


def mlflow_experiment_url(experiment_id: str, *, base: str | None = None) -> str:
    """The page of an MLflow experiment."""
    return f"{base or mlflow_ui_url()}/#/experiments/{quote(str(experiment_id), safe='')}"


def mlflow_run_url(experiment_id: str, run_id: str, *, artifact: str | None = None, base: str | None = None) -> str:
    """The page of an MLflow run; with `artifact` (a path inside the run's artifacts), that artifact's view."""
    url = f"{mlflow_experiment_url(experiment_id, base=base)}/runs/{quote(str(run_id), safe='')}"
    return f"{url}/artifacts/{quote(artifact.lstrip('/'))}" if artifact else url


def mlflow_model_version_url(model_name: str, version: str | int, *, base: str | None = None) -> str:
    """The page of a registered model version."""
    return f"{base or mlflow_ui_url()}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"


def location_url(location: str) -> str:
    """A lake location as a URL: `file://` for a local path, as it is for `s3://…` or `http(s)://…`."""
    if "://" in location:
        return location
    return Path(location).resolve().as_uri()
