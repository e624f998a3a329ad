"""One `ConfigurableResource` per external system: the landing zone and the lake, Great Expectations,
Feast, the alert webhooks. Each is a thin, typed handle on the core `recloop` functions; no pipeline logic lives here.

Values come from the environment through `recloop.config.Settings` when the code location loads
(never at import), so the embedded default needs no configuration and production only sets variables.
A value that carries a secret (a URL with a password) is handed to Dagster as `dg.EnvVar`, so the UI's
resource view shows the variable's name, never the password.
"""


import contextlib
import io
import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from recloop import features as feature_ops
from recloop.config import Settings
from recloop.lake import Lake, open_lake

if TYPE_CHECKING:
    from recloop.lifecycle import Alert


class LakeResource(dg.ConfigurableResource):
    """A lake of daily Parquet partitions: a local folder or `s3://bucket/prefix` (through boto3)."""

    uri: str = Field(description="Folder path, or s3://bucket/prefix for the S3 implementation.")
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible store (MinIO, moto); None for AWS."
    )

    def open(self) -> Lake:
        """Returns: the `Lake` this resource points at."""
        return open_lake(self.uri, s3_endpoint_url=self.s3_endpoint_url)


class GreatExpectationsResource(dg.ConfigurableResource):
    """Where the Great Expectations suites live (`expectations/`) and how much quarantine a partition
    may have: the ingestion and validation assets run them through `recloop.lifecycle`."""

    expectations_dir: str = Field(description="Folder holding one GX suite (JSON) per table.")
    max_quarantine_rate: float = Field(
        default=0.2, description="Share of a partition's rows that may be quarantined before its check fails."
    )



class FeastResource(dg.ConfigurableResource):
    """The Feast feature store of `feature_repo/`: apply, materialize, read.

    Embedded: file registry and SQLite online store under `data_dir`. Production: Feast's SQL registry on
    PostgreSQL (RECLOOP_FEAST_REGISTRY_URL, read through `Settings`) and the Redis online store."""

    repo_path: str = Field(description="The Feast repo (feature_store.yaml and definitions).")
    data_dir: str = Field(description="Where the file registry and the SQLite online store live (embedded).")
    lake_uri: str = Field(description="The lake whose features/ datasets are Feast's offline sources.")
    project: str = Field(default="recloop", description="Feast project name.")
    online_store: str = Field(default="sqlite", description="'sqlite' (embedded) or 'redis' (production).")
    redis_url: str | None = Field(default=None, description="Redis URL when online_store is 'redis'.")

    def settings(self) -> Settings:
        base = Settings.from_env()
        return replace(
            base,
            feature_repo=Path(self.repo_path),
            feast_data_dir=Path(self.data_dir),
            lake_uri=self.lake_uri,
            redis_url=self.redis_url or base.redis_url,
        )

    def _kw(self) -> dict[str, Any]:
        return {"project": self.project, "online": self.online_store, "redis_url": self.redis_url}

    def apply(self) -> dict[str, Any]:
        """Returns: the entities, sources, views and services registered by Feast's apply."""
        with contextlib.redirect_stdout(io.StringIO()):
            return feature_ops.apply_repo(self.settings(), **self._kw())

    def materialize(self, *, partition: str, lake: Lake) -> dict[str, Any]:
        """Loads day `partition`'s feature snapshot into the online store (skips superseded days).

        Feast prints progress bars to stdout; they are captured and returned under "feast_output".
        """
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = feature_ops.materialize_partition(self.settings(), partition, lake=lake, **self._kw())
        return {**result, "feast_output": out.getvalue()}

    def freshness(self, *, now: datetime | None = None) -> dict[str, Any]:
        """Returns: age of the newest online snapshot per feature view."""
        store = feature_ops.feature_store(self.settings(), **self._kw())
        return feature_ops.feature_freshness(self.settings(), project=self.project, now=now, store=store)


class AlertsResource(dg.ConfigurableResource):
    """Signed alert webhooks (Standard Webhooks) to the endpoints of `monitoring/alerts.yaml` and
    RECLOOP_ALERT_WEBHOOK_URL, with retries, a delivery log and a dead-letter store (`recloop.alerts`)."""

    config_path: str | None = Field(default=None, description="Endpoints file (default: monitoring/alerts.yaml).")

    def send(self, log: Any, alert: "Alert | None") -> list[Any]:
        """Sends a step's alert (`recloop.lifecycle.Alert`; None sends nothing) through
        `recloop.lifecycle.send_alert`, logging each endpoint's outcome to the step's log. The event id is
        derived from type + key, so a re-run step does not deliver it twice. A receiver that is down never
        fails the step: its delivery ends in the dead-letter store (`recloop alerts resend`). A broken
        configuration does raise."""
        from recloop.lifecycle import send_alert

        return send_alert(alert, logger=log, config_path=self.config_path)


def secret_value(var: str, value: str | None) -> str | None:
    """`value`, as `dg.EnvVar(var)` when it is what the environment variable `var` holds: Dagster then
    resolves it when the resource is built and shows only the variable's name in its UI."""
    if value and os.environ.get(var) == value:
        return dg.EnvVar(var)
    return value


def resources_from_settings(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources for one deployment, from one settings object (RECLOOP_ENV picks the Feast stores)."""
    return {
        "landing": LakeResource(uri=settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url),
        "lake": LakeResource(uri=settings.lake_uri, s3_endpoint_url=settings.s3_endpoint_url),
        "gx": GreatExpectationsResource(
            expectations_dir=str(settings.expectations_dir), max_quarantine_rate=settings.max_quarantine_rate
        ),
        "feast": FeastResource(
            repo_path=str(settings.feature_repo),
            data_dir=str(settings.feast_data_dir),
            lake_uri=settings.lake_uri,
            project=settings.feast_project,
            online_store="redis" if settings.is_production else "sqlite",
            redis_url=secret_value("RECLOOP_REDIS_URL", settings.redis_url),
        ),
        "alerts": AlertsResource(),
    }


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(resources=resources_from_settings(Settings.from_env()))


__all__ = [
    "AlertsResource", "FeastResource", "GreatExpectationsResource", "LakeResource", "resources_from_settings",
    "secret_value",
]
