"""Where the registry lives: the MLflow tracking/registry URI, the model's name and the artifact root, from
recloop's settings (`registry_settings`), and `open_registry`, the registry they configure."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recloop.registry.names import DEFAULT_MODEL_NAME
from recloop.registry.store import Registry

if TYPE_CHECKING:
    from recloop.config import Settings


@dataclass(frozen=True)
class RegistrySettings:
    tracking_uri: str
    model_name: str
    artifact_location: str | None


def registry_settings(settings: Settings | None = None) -> RegistrySettings:
    """MLflow location and model name from the settings (environment).

    * `RECLOOP_MLFLOW_TRACKING_URI` unset: `sqlite:///<RECLOOP_HOME>/mlflow/mlflow.db`, artifacts in
      `<RECLOOP_HOME>/mlflow/artifacts` (the embedded default).
    * an `http(s)://` tracking server: the server decides where artifacts go (in production
      `mlflow server --serve-artifacts --artifacts-destination s3://…`, clients upload through it).
    * a database backend (`postgresql://…`, the client talks to the database directly): artifacts of new
      experiments go to `RECLOOP_MLFLOW_ARTIFACT_URI` (`s3://bucket/prefix`, required in production).

    `RECLOOP_MLFLOW_ARTIFACT_URI`, when set, is the artifact root of new experiments for every kind of
    store. When the S3 store is S3-compatible (`RECLOOP_S3_ENDPOINT_URL`, e.g. MinIO) and the store is
    not embedded, MLflow's own `MLFLOW_S3_ENDPOINT_URL` defaults to it (set in this process's
    environment if unset), so boto3 inside MLflow reaches the same endpoint as the lake.
    `RECLOOP_MODEL_NAME` names the registered model (default `recloop-recommender`).
    """
    from recloop.config import Settings

    settings = settings or Settings.from_env()
    mlflow_home = settings.home / "mlflow"
    tracking_uri = (
        settings.mlflow_tracking_uri
        or os.environ.get("RECLOOP_MLFLOW_TRACKING_URI")
        or f"sqlite:///{mlflow_home / 'mlflow.db'}"
    )
    scheme = tracking_uri.split(":", 1)[0].lower() if "://" in tracking_uri else ""
    server = scheme in ("http", "https", "databricks", "databricks-uc", "uc")
    local_store = scheme in ("", "sqlite", "file")
    artifact_uri = settings.mlflow_artifact_uri or os.environ.get("RECLOOP_MLFLOW_ARTIFACT_URI")
    if artifact_uri:
        artifact_location: str | None = artifact_uri.rstrip("/")
    elif server:
        artifact_location = None
    else:  # an embedded store, or a database with no artifact root given (local use only)
        artifact_location = (mlflow_home / "artifacts").as_uri()
    if settings.s3_endpoint_url and not local_store:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    return RegistrySettings(
        tracking_uri=tracking_uri,
        model_name=os.environ.get("RECLOOP_MODEL_NAME") or DEFAULT_MODEL_NAME,
        artifact_location=artifact_location,
    )


def open_registry(settings: Settings | None = None, *, run_tags: Mapping[str, str] | None = None) -> Registry:
    """The registry configured by `registry_settings(settings)`; `run_tags` go on every run it creates (e.g.
    `recloop.links.dagster_run_tags(run_id)`)."""
    rs = registry_settings(settings)
    return Registry(rs.tracking_uri, rs.model_name, artifact_location=rs.artifact_location, run_tags=run_tags)
