"""One settings object for recloop, read from the environment when asked for (never at import time).

`RECLOOP_ENV` is the one switch between the embedded default (`local`: folders, SQLite, DuckDB) and the
production stack (`production`: S3, Postgres, Redis). Locally every setting has a default derived from
`RECLOOP_HOME`, so a fresh checkout runs with no configuration at all. In production nothing falls back
to a local file: `Settings.from_env()` fails at once with one `SettingsError` that lists every required
variable that is missing or malformed (see docs/production.md, "Production settings").

Secrets (passwords inside the database and Redis URLs, AWS keys) are read from the environment only:
never from a file, never from code. `repr(settings)` and `settings.describe()` mask them, so a settings
object can be logged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]

ENVIRONMENTS = ("local", "production")
# Engines of the feature snapshots (recloop.features: DuckDB in process; recloop.spark_features: Spark).
FEATURE_ENGINES = ("duckdb", "spark")
# A Spark master URL: local, local[N], local[*], local[N,F], spark://..., yarn, k8s://..., mesos://...
_SPARK_MASTER = re.compile(r"^(local(\[(\d+|\*)(,\d+)?\])?|yarn|(spark|k8s|mesos)://\S+)$")
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")

# Settings field -> the environment variable it is read from.
ENV_VARS: dict[str, str] = {
    "env": "RECLOOP_ENV",
    "home": "RECLOOP_HOME",
    "landing_uri": "RECLOOP_LANDING_URI",
    "lake_uri": "RECLOOP_LAKE_URI",
    "s3_endpoint_url": "RECLOOP_S3_ENDPOINT_URL",
    "feature_repo": "RECLOOP_FEAST_REPO",
    "expectations_dir": "RECLOOP_EXPECTATIONS_DIR",
    "feast_data_dir": "RECLOOP_FEAST_DATA_DIR",
    "feast_project": "RECLOOP_FEAST_PROJECT",
    "redis_url": "RECLOOP_REDIS_URL",
    "feast_registry_url": "RECLOOP_FEAST_REGISTRY_URL",
    "mlflow_tracking_uri": "RECLOOP_MLFLOW_TRACKING_URI",
    "mlflow_artifact_uri": "RECLOOP_MLFLOW_ARTIFACT_URI",
    "alerts_db_url": "RECLOOP_ALERTS_DB_URL",
    "dagster_pg_url": "RECLOOP_DAGSTER_PG_URL",
    "dagster_executor": "RECLOOP_DAGSTER_EXECUTOR",
    "dagster_max_concurrent": "RECLOOP_DAGSTER_MAX_CONCURRENT",
    "feature_engine": "RECLOOP_FEATURE_ENGINE",
    "spark_master": "RECLOOP_SPARK_MASTER",
    "celery_broker_url": "RECLOOP_CELERY_BROKER_URL",
    "celery_backend_url": "RECLOOP_CELERY_BACKEND_URL",
    "celery_queue": "RECLOOP_CELERY_QUEUE",
    "partition_start": "RECLOOP_PARTITION_START",
    "max_quarantine_rate": "RECLOOP_MAX_QUARANTINE_RATE",
    "train_processes": "RECLOOP_TRAIN_PROCESSES",
}

_POSTGRES = re.compile(r"^postgresql(\+[a-z0-9_]+)?$")
# dagster-postgres drives psycopg2 (its own dependency); SQLAlchemy 2.1 maps a bare postgresql:// URL
# to psycopg 3, so the Dagster URL names its driver.
_POSTGRES_PSYCOPG2 = re.compile(r"^postgresql\+psycopg2$")

# What each production variable must look like: (check, what to write in the error).
_PRODUCTION_REQUIRED: dict[str, tuple[str, str]] = {
    "landing_uri": ("s3", "s3://bucket/prefix where raw files arrive"),
    "lake_uri": ("s3", "s3://bucket/prefix of the lake"),
    "redis_url": ("redis", "redis://[:password@]host:6379/0, the Feast online store"),
    "feast_registry_url": ("postgres", "postgresql+psycopg://user:password@host:5432/feast, Feast's SQL registry"),
    "mlflow_tracking_uri": (
        "mlflow",
        "http://mlflow:5000 (tracking server with proxied S3 artifacts) or postgresql+psycopg://…/mlflow "
        "(backend store; then RECLOOP_MLFLOW_ARTIFACT_URI=s3://… too)",
    ),
    "alerts_db_url": ("postgres", "postgresql+psycopg://user:password@host:5432/recloop, the alert delivery log"),
    "dagster_pg_url": (
        "postgres_psycopg2",
        "postgresql+psycopg2://user:password@host:5432/dagster, the Dagster instance (deploy/dagster.yaml)",
    ),
}

# RECLOOP_DAGSTER_EXECUTOR=celery: the broker (RabbitMQ here; Redis works too) and the result backend.
LOCAL_CELERY_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
CELERY_BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss")
CELERY_BACKEND_SCHEMES = ("rpc", "redis", "rediss")
_CELERY_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")

_SECRET_QUERY_KEYS = re.compile(r"(password|passwd|secret|token|access_key|sslkey)", re.IGNORECASE)
MASK = "***"


class SettingsError(ValueError):
    """Settings that cannot run: every problem at once, each naming its environment variable."""

    def __init__(self, env: str, problems: list[str]) -> None:
        self.env = env
        self.problems = list(problems)
        head = (
            f"RECLOOP_ENV={env}: {len(problems)} setting(s) missing or invalid (production never falls back "
            "to local files; see docs/production.md):"
            if env == "production"
            else f"{len(problems)} setting(s) invalid:"
        )
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))

    @property
    def variables(self) -> list[str]:
        """The environment variables named by the problems, in order."""
        return [p.split(":", 1)[0] for p in self.problems]


def mask_url(value: str | None) -> str | None:
    """`value` with any password in its userinfo or query string replaced by `***`."""
    if not value or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, password = userinfo.partition(":")
        if sep and password:
            netloc = f"{user}:{MASK}@{hostport}"
        elif not sep and parts.scheme.startswith("redis") and user:
            # redis://secret@host: Redis reads a lone userinfo as the password
            netloc = f"{MASK}@{hostport}"
    query = "&".join(
        f"{k}={MASK}" if _SECRET_QUERY_KEYS.search(k) else f"{k}{eq}{v}"
        for k, eq, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if netloc == parts.netloc and query == parts.query:
        return value  # nothing to mask: as given (urlunsplit would rewrite sqlite:////abs/path)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _scheme(url: str | None) -> str:
    return url.split("://", 1)[0].lower() if url and "://" in url else ""


def _check(kind: str, value: str) -> bool:
    scheme = _scheme(value)
    if kind == "s3":
        return scheme == "s3" and bool(value[5:].split("/", 1)[0])
    if kind == "redis":
        return scheme in ("redis", "rediss")
    if kind == "postgres":
        return bool(_POSTGRES.match(scheme))
    if kind == "postgres_psycopg2":
        return bool(_POSTGRES_PSYCOPG2.match(scheme))
    if kind == "mlflow":
        return scheme in ("http", "https") or bool(_POSTGRES.match(scheme))
    raise AssertionError(kind)


def feature_engine_problems(engine: str, master: str) -> list[str]:
    """What is wrong with RECLOOP_FEATURE_ENGINE / RECLOOP_SPARK_MASTER (nothing: an empty list)."""
    out = []
    if engine not in FEATURE_ENGINES:
        out.append(f"RECLOOP_FEATURE_ENGINE: must be one of {', '.join(FEATURE_ENGINES)}, got {engine!r}")
    if not _SPARK_MASTER.match(master or ""):
        out.append(f"RECLOOP_SPARK_MASTER: {master!r} is not a Spark master URL (expected local[2], local[*], "
                   "spark://host:7077, yarn or k8s://https://host:443)")
    return out


def feature_engine_from_env() -> tuple[str, str]:
    """`(engine, spark master)` of this process's environment, checked like `Settings.from_env()` checks them
    (read on their own: computing features needs no other setting). Raises `SettingsError`."""
    engine = _env("RECLOOP_FEATURE_ENGINE", "duckdb").strip().lower()
    master = _env("RECLOOP_SPARK_MASTER", "local[2]").strip()
    problems = feature_engine_problems(engine, master)
    if problems:
        raise SettingsError(_env("RECLOOP_ENV", "local"), problems)
    return engine, master


def _train_processes_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"RECLOOP_TRAIN_PROCESSES: must be a whole number >= 1, got {value!r}"
    return None


def train_processes() -> int:
    """`RECLOOP_TRAIN_PROCESSES` (default 1), checked as `Settings` checks it: what the two-tower's training
    uses when its config does not choose (`recloop.training.TwoTowerConfig.processes`). Reads this one
    variable only, so that training does not depend on the rest of the deployment's settings."""
    raw = _env("RECLOOP_TRAIN_PROCESSES", "1")
    try:
        value: object = int(raw)
    except ValueError:
        value = raw
    problem = _train_processes_problem(value)
    if problem is not None:
        raise SettingsError(_env("RECLOOP_ENV", "local"), [problem])
    return int(value)


@dataclass(frozen=True, repr=False)
class Settings:
    env: str = "local"
    home: Path = field(default_factory=lambda: Path(".recloop").resolve())
    landing_uri: str = ""
    lake_uri: str = ""
    s3_endpoint_url: str | None = None
    feature_repo: Path = REPO_ROOT / "feature_repo"
    expectations_dir: Path = REPO_ROOT / "expectations"
    # Feast's file registry and SQLite online store (embedded default).
    feast_data_dir: Path = field(default_factory=lambda: Path(".recloop/feast").resolve())
    feast_project: str = "recloop"
    # Production: the Redis online store and the SQL registry of Feast.
    redis_url: str | None = None
    feast_registry_url: str | None = None
    # MLflow: None = sqlite under <home>/mlflow (see recloop.registry.registry_settings).
    mlflow_tracking_uri: str | None = None
    mlflow_artifact_uri: str | None = None
    # The alert delivery log (recloop.alerts); None = sqlite under <home>.
    alerts_db_url: str | None = None
    # The production Dagster instance storage (read by deploy/dagster.yaml through the environment).
    dagster_pg_url: str | None = None
    # Executor of the code location's jobs: multiprocess (at most `dagster_max_concurrent` steps at once),
    # in_process, celery (every step on a Celery worker: recloop.scaleout, deploy/celery.yaml) or k8s (every
    # step a Kubernetes Job: deploy/k8s/).
    dagster_executor: str = "multiprocess"
    dagster_max_concurrent: int = 2
    # What computes the feature snapshots: duckdb (in process) or spark (the same snapshots as Spark jobs on
    # `spark_master`; recloop.spark_features).
    feature_engine: str = "duckdb"
    spark_master: str = "local[2]"
    # RECLOOP_DAGSTER_EXECUTOR=celery: where steps are queued (the broker), where their results come back
    # (rpc:// = replies through the broker), and the queue the workers listen on (deploy/celery.yaml).
    # No broker in production falls back to this machine's: it must be given.
    celery_broker_url: str | None = None
    celery_backend_url: str = "rpc://"
    celery_queue: str = "dagster"
    partition_start: date = date(2025, 1, 1)
    # Largest share of a partition's rows that may be quarantined before its validation check fails.
    max_quarantine_rate: float = 0.2
    # Processes that train the two-tower together (PyTorch DistributedDataParallel under torchrun when > 1,
    # see recloop.distributed); 1 trains in the calling process.
    train_processes: int = 1

    def __post_init__(self) -> None:
        if self.env not in ENVIRONMENTS:
            raise ValueError(f"RECLOOP_ENV must be 'local' or 'production', got {self.env!r}")
        problems = self.problems()
        if problems:
            raise SettingsError(self.env, problems)

    def problems(self) -> list[str]:
        """Every missing or malformed setting, as `VARIABLE: what is wrong (what is expected)`."""
        out: list[str] = []
        if self.dagster_executor not in EXECUTORS:
            out.append(f"RECLOOP_DAGSTER_EXECUTOR: must be one of {', '.join(EXECUTORS)}, got {self.dagster_executor!r}")
        if isinstance(self.dagster_max_concurrent, bool) or not isinstance(self.dagster_max_concurrent, int) \
                or self.dagster_max_concurrent < 1:
            out.append(f"RECLOOP_DAGSTER_MAX_CONCURRENT: must be a whole number >= 1, got {self.dagster_max_concurrent!r}")
        out += feature_engine_problems(self.feature_engine, self.spark_master)
        if (problem := _train_processes_problem(self.train_processes)) is not None:
            out.append(problem)
        out += self._celery_problems()
        if not self.is_production:
            return out
        for name, (kind, expected) in _PRODUCTION_REQUIRED.items():
            value = getattr(self, name)
            var = ENV_VARS[name]
            if not value:
                out.append(f"{var}: missing (expected {expected})")
            elif not _check(kind, value):
                out.append(f"{var}: {mask_url(value)!r} is not valid (expected {expected})")
        if _POSTGRES.match(_scheme(self.mlflow_tracking_uri)):
            if not self.mlflow_artifact_uri:
                out.append(
                    "RECLOOP_MLFLOW_ARTIFACT_URI: missing (expected s3://bucket/prefix: artifacts of new "
                    "experiments when RECLOOP_MLFLOW_TRACKING_URI is a database)"
                )
        if self.mlflow_artifact_uri and not _check("s3", self.mlflow_artifact_uri):
            out.append(f"RECLOOP_MLFLOW_ARTIFACT_URI: {self.mlflow_artifact_uri!r} is not valid (expected s3://bucket/prefix)")
        return out

    def _celery_problems(self) -> list[str]:
        out: list[str] = []
        if self.dagster_executor == "celery" and not self.celery_broker_url:
            out.append("RECLOOP_CELERY_BROKER_URL: missing (expected amqp://user:password@host:5672// of the "
                       "RabbitMQ the Celery workers listen to, RECLOOP_DAGSTER_EXECUTOR=celery)")
        if self.celery_broker_url and _scheme(self.celery_broker_url) not in CELERY_BROKER_SCHEMES:
            out.append(f"RECLOOP_CELERY_BROKER_URL: {mask_url(self.celery_broker_url)!r} is not valid (expected "
                       f"a URL of scheme {', '.join(CELERY_BROKER_SCHEMES)}, e.g. amqp://user:password@rabbitmq:5672//)")
        if _scheme(self.celery_backend_url) not in CELERY_BACKEND_SCHEMES:
            out.append(f"RECLOOP_CELERY_BACKEND_URL: {mask_url(self.celery_backend_url)!r} is not valid (expected "
                       f"rpc:// or redis://host:6379/N)")
        if not _CELERY_QUEUE.match(self.celery_queue or ""):
            out.append(f"RECLOOP_CELERY_QUEUE: {self.celery_queue!r} is not a queue name (letters, digits, - _ .)")
        return out

    @classmethod
    def from_env(cls) -> "Settings":
        """The settings of this process's environment; raises `SettingsError` listing every problem."""
        env = _env("RECLOOP_ENV", "local")
        home = Path(_env("RECLOOP_HOME", ".recloop")).resolve()
        production = env == "production"
        problems: list[str] = []

        def number(name: str, default: str, kind: type):
            raw = _env(name, default)
            try:
                return kind(raw)
            except ValueError:
                problems.append(f"{name}: {raw!r} is not a {'whole number' if kind is int else 'number'}")
                return kind(default)

        def day(name: str, default: str) -> date:
            raw = _env(name, default)
            try:
                return date.fromisoformat(raw)
            except ValueError:
                problems.append(f"{name}: {raw!r} is not a date (YYYY-MM-DD)")
                return date.fromisoformat(default)

        values = dict(
            env=env,
            home=home,
            # In production the lake and landing zone have no local default: missing is an error.
            landing_uri=_env("RECLOOP_LANDING_URI", "" if production else str(home / "landing")),
            lake_uri=_env("RECLOOP_LAKE_URI", "" if production else str(home / "lake")),
            s3_endpoint_url=_env("RECLOOP_S3_ENDPOINT_URL"),
            feature_repo=Path(_env("RECLOOP_FEAST_REPO", str(REPO_ROOT / "feature_repo"))),
            expectations_dir=Path(_env("RECLOOP_EXPECTATIONS_DIR", str(REPO_ROOT / "expectations"))),
            feast_data_dir=Path(_env("RECLOOP_FEAST_DATA_DIR", str(home / "feast"))).resolve(),
            feast_project=_env("RECLOOP_FEAST_PROJECT", "recloop"),
            redis_url=_env("RECLOOP_REDIS_URL"),
            feast_registry_url=_env("RECLOOP_FEAST_REGISTRY_URL"),
            mlflow_tracking_uri=_env("RECLOOP_MLFLOW_TRACKING_URI"),
            mlflow_artifact_uri=_env("RECLOOP_MLFLOW_ARTIFACT_URI"),
            alerts_db_url=_env("RECLOOP_ALERTS_DB_URL"),
            dagster_pg_url=_env("RECLOOP_DAGSTER_PG_URL"),
            dagster_executor=_env("RECLOOP_DAGSTER_EXECUTOR", "multiprocess"),
            dagster_max_concurrent=number("RECLOOP_DAGSTER_MAX_CONCURRENT", "2", int),
            feature_engine=_env("RECLOOP_FEATURE_ENGINE", "duckdb").strip().lower(),
            spark_master=_env("RECLOOP_SPARK_MASTER", "local[2]").strip(),
            # Locally the RabbitMQ of this machine (guest/guest); in production it must be given.
            celery_broker_url=_env("RECLOOP_CELERY_BROKER_URL", None if production else LOCAL_CELERY_BROKER),
            celery_backend_url=_env("RECLOOP_CELERY_BACKEND_URL", "rpc://"),
            celery_queue=_env("RECLOOP_CELERY_QUEUE", "dagster"),
            partition_start=day("RECLOOP_PARTITION_START", "2025-01-01"),
            max_quarantine_rate=number("RECLOOP_MAX_QUARANTINE_RATE", "0.2", float),
            train_processes=number("RECLOOP_TRAIN_PROCESSES", "1", int),
        )
        if env not in ENVIRONMENTS:
            raise ValueError(f"RECLOOP_ENV must be 'local' or 'production', got {env!r}")
        try:
            settings = cls(**values)
        except SettingsError as err:
            raise SettingsError(env, problems + err.problems) from None
        if problems:
            raise SettingsError(env, problems)
        return settings

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    def describe(self) -> dict[str, str]:
        """Every setting by its environment variable, secrets masked: safe to log or print."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[ENV_VARS[f.name]] = "" if value is None else str(mask_url(str(value)))
        return out

    def __repr__(self) -> str:
        def shown(value: object) -> str:
            return repr(mask_url(value)) if isinstance(value, str) else repr(value)

        return "Settings(" + ", ".join(f"{f.name}={shown(getattr(self, f.name))}" for f in fields(self)) + ")"

    __str__ = __repr__
