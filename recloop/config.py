"""One settings object for recloop, read from the environment when asked for (never at import time).

`RECLOOP_ENV` is the one switch between the embedded default (`local`: folders, SQLite, DuckDB) and the
production stack (`production`: S3, Postgres, Redis). Every other setting has a default derived from
`RECLOOP_HOME` so that a fresh checkout runs with no configuration at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
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
    redis_url: str | None = None
    partition_start: date = date(2025, 1, 1)
    # Largest share of a partition's rows that may be quarantined before its validation check fails.
    max_quarantine_rate: float = 0.2

    def __post_init__(self) -> None:
        if self.env not in ("local", "production"):
            raise ValueError(f"RECLOOP_ENV must be 'local' or 'production', got {self.env!r}")

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("RECLOOP_HOME", ".recloop")).resolve()
        return cls(
            env=_env("RECLOOP_ENV", "local"),
            home=home,
            landing_uri=_env("RECLOOP_LANDING_URI", str(home / "landing")),
            lake_uri=_env("RECLOOP_LAKE_URI", str(home / "lake")),
            s3_endpoint_url=_env("RECLOOP_S3_ENDPOINT_URL"),
            feature_repo=Path(_env("RECLOOP_FEAST_REPO", str(REPO_ROOT / "feature_repo"))),
            expectations_dir=Path(_env("RECLOOP_EXPECTATIONS_DIR", str(REPO_ROOT / "expectations"))),
            feast_data_dir=Path(_env("RECLOOP_FEAST_DATA_DIR", str(home / "feast"))),
            feast_project=_env("RECLOOP_FEAST_PROJECT", "recloop"),
            redis_url=_env("RECLOOP_REDIS_URL"),
            partition_start=date.fromisoformat(_env("RECLOOP_PARTITION_START", "2025-01-01")),
            max_quarantine_rate=float(_env("RECLOOP_MAX_QUARANTINE_RATE", "0.2")),
        )

    @property
    def is_production(self) -> bool:
        return self.env == "production"
