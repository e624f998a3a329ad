"""Dagster steps on Celery workers (RECLOOP_DAGSTER_EXECUTOR=celery, `dagster-celery`) or in Kubernetes Jobs
(RECLOOP_DAGSTER_EXECUTOR=k8s, `dagster-k8s`: deploy/k8s/, below).

Every step of a run becomes a Celery task on the broker (RabbitMQ; `RECLOOP_CELERY_BROKER_URL`) in the
queue `RECLOOP_CELERY_QUEUE`; the workers started with

    dagster-celery worker start -A dagster_celery.app -y deploy/celery.yaml -q <queue>

take them, load the code location, run the step against the run's Dagster instance and send its events
back through the result backend (`RECLOOP_CELERY_BACKEND_URL`, `rpc://` by default). Celery's settings
(late acknowledgement, one task reserved at a time, ...) live in deploy/celery.yaml, read by both sides.

Workers need what a run worker needs: this code, recloop's settings, the same persistent Dagster
instance (DAGSTER_HOME: SQLite on one machine, PostgreSQL across machines) and RECLOOP_HOME (the training
job hands the candidate between its steps in `<RECLOOP_HOME>/models/candidate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from recloop.config import REPO_ROOT, Settings, mask_url

CELERY_YAML = REPO_ROOT / "deploy" / "celery.yaml"
# Kubernetes: the instance (K8sRunLauncher) and the executor (k8s_job_executor) configuration.
K8S_INSTANCE_YAML = REPO_ROOT / "deploy" / "k8s" / "dagster.yaml"
K8S_EXECUTOR_YAML = REPO_ROOT / "deploy" / "k8s" / "executor.yaml"
WORKER_APP = "dagster_celery.app"


class CeleryUnavailable(RuntimeError):
    """RECLOOP_DAGSTER_EXECUTOR=celery, but the broker cannot be reached or no worker listens on the queue:
    a run would wait forever. The message names the broker or the queue and how to start a worker."""


def worker_command(settings: Settings, config_yaml: Path = CELERY_YAML) -> list[str]:
    """The documented command that starts a worker for `settings`' queue."""
    return ["dagster-celery", "worker", "start", "-A", WORKER_APP, "-y", str(config_yaml), "-q", settings.celery_queue]


def config_source(config_yaml: Path = CELERY_YAML) -> dict[str, Any]:
    """The Celery settings of deploy/celery.yaml (`execution.config.config_source`), shared with the workers."""
    data = yaml.safe_load(config_yaml.read_text()) or {}
    return dict(((data.get("execution") or {}).get("config") or {}).get("config_source") or {})


def k8s_executor_config(config_yaml: Path = K8S_EXECUTOR_YAML) -> dict[str, Any]:
    """The configuration of `dagster_k8s.k8s_job_executor` (deploy/k8s/executor.yaml, `execution.config`)."""
    data = yaml.safe_load(config_yaml.read_text()) or {}
    return dict((data.get("execution") or {}).get("config") or {})


def _from_env(var: str, value: str) -> Any:
    """`value`, as Dagster's `{"env": var}` when the environment variable holds it: a URL with a password
    then stays out of the job's configuration (the UI shows the variable's name)."""
    import os

    return {"env": var} if os.environ.get(var) == value else value


def executor_config(settings: Settings) -> dict[str, Any]:
    """The configuration of `dagster_celery.celery_executor` for `settings`: the broker, the backend, and
    deploy/celery.yaml's Celery settings with the queue steps are sent to."""
    return {
        "broker": _from_env("RECLOOP_CELERY_BROKER_URL", settings.celery_broker_url),
        "backend": _from_env("RECLOOP_CELERY_BACKEND_URL", settings.celery_backend_url),
        "config_source": {**config_source(), "task_default_queue": settings.celery_queue},
    }


def listening_workers(settings: Settings, *, timeout: float = 3.0) -> list[str]:
    """The names of the workers consuming `settings.celery_queue`, asked through the broker. Raises
    `CeleryUnavailable` when the broker cannot be reached or no worker listens: a run sent to that queue
    would wait until one does."""
    from dagster_celery.make_app import make_app
    from kombu import Connection

    broker = settings.celery_broker_url or ""
    shown = mask_url(broker)
    try:
        with Connection(broker, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as err:  # kombu raises OperationalError, socket errors, auth errors ...
        raise CeleryUnavailable(
            f"RECLOOP_DAGSTER_EXECUTOR=celery: the Celery broker {shown} cannot be reached ({err}); start "
            "RabbitMQ or set RECLOOP_CELERY_BROKER_URL") from None
    app = make_app({"broker": broker, "backend": settings.celery_backend_url,
                    "config_source": {"task_default_queue": settings.celery_queue}})
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    workers = sorted(name for name, queues in replies.items()
                     if any(q.get("name") == settings.celery_queue for q in queues or []))
    if not workers:
        raise CeleryUnavailable(
            f"RECLOOP_DAGSTER_EXECUTOR=celery: no Celery worker listens on queue {settings.celery_queue!r} of "
            f"{shown}; start one with `{' '.join(worker_command(settings))}` (docs/deployment.md)")
    return workers


__all__ = ["CELERY_YAML", "K8S_EXECUTOR_YAML", "K8S_INSTANCE_YAML", "CeleryUnavailable", "config_source",
           "executor_config", "k8s_executor_config", "listening_workers", "worker_command"]
