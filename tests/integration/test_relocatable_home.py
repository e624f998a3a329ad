"""A RECLOOP_HOME is relocatable (issue 13, point 3): copied with `cp -a` after a real run, both the copy
and the original keep working, and neither touches the other; a moved home works where it lands.

The probe's reproduction, with the real CLI in subprocesses (as a user types it): simulate a few days, run
the data plane, register a model version in the home's MLflow (SQLite), then `cp -a A B` and
`RECLOOP_HOME=B recloop run --partition D`. Before the fix that run dropped A's online tables (Feast's
registry kept A's SQLite path in its infra, and `feast apply` tore down the "old" tables) and B's MLflow
still pointed every artifact location into A (a new run in B wrote its files into A).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from recloop.config import REPO_ROOT, Settings
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

SIM = SimConfig(seed=9, days=4, initial_users=300, initial_videos=150, events_per_day=1_500, new_users_per_day=10,
                new_videos_per_day=5)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
MODEL = "recloop-recommender"
LOADER = f"{Path(__file__).resolve()}:fake_load_bundle"


class FakeRecommender:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def recommend(self, user_ids, k, *, exclude=None):
        return [[f"v{i}" for i in range(k)] for _ in user_ids]


def fake_load_bundle(bundle_dir: str) -> FakeRecommender:
    """The loader of this test's stand-in model (RECLOOP_BUNDLE_LOADER); its files are verified first."""
    return FakeRecommender(json.loads((Path(bundle_dir) / "bundle.json").read_text())["tag"])


def _env(home: Path, project: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RECLOOP_", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))}
    env.update(RECLOOP_HOME=str(home), RECLOOP_FEAST_PROJECT=project, PYTHONPATH=str(REPO_ROOT), CI=env.get("CI", ""))
    return env


def recloop(home: Path, project: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "recloop.cli", *args], env=_env(home, project), cwd=home.parent,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"recloop {' '.join(args)} in {home} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def online_rows(home: Path) -> dict[str, int]:
    con = sqlite3.connect(home / "feast" / "online.db")
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def registry_of(home: Path, monkeypatch):
    from recloop.registry import open_registry

    monkeypatch.setenv("RECLOOP_HOME", str(home))
    return open_registry(Settings.from_env())


def log_version(registry, root: Path, tag: str) -> str:
    bundle = root / f"bundle-{tag}"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"tag": tag}))
    (bundle / "weights.bin").write_bytes(os.urandom(256))
    run_id = registry.log_training_run(experiment="recloop-training", params={"tag": tag}, metrics={}, data={},
                                       features=[], bundle_dir=bundle, example_user_ids=["u1"])
    return registry.register(run_id)


def test_a_copied_home_and_its_original_both_run_and_a_moved_home_works(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("RECLOOP_")] + ["DAGSTER_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RECLOOP_BUNDLE_LOADER", LOADER)
    project = f"t{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("RECLOOP_FEAST_PROJECT", project)
    a, b, moved = tmp_path / "A", tmp_path / "B", tmp_path / "moved"

    # A: a few simulated days through the data plane, and a model version in its MLflow.
    simulate(SIM, open_lake(str(a / "landing")))
    recloop(a, project, "run", "--start", DAYS[0], "--end", DAYS[-2])
    registry_a = registry_of(a, monkeypatch)
    version = log_version(registry_a, tmp_path, "a")
    before = online_rows(a)
    assert len(before) == 3 and all(before.values()), before

    subprocess.run(["cp", "-a", str(a), str(b)], check=True)

    # The copy runs the next day: the original's online store is untouched.
    recloop(b, project, "run", "--partition", DAYS[-1])
    assert online_rows(a) == before
    after_b = online_rows(b)
    assert set(after_b) == set(before) and all(after_b.values())
    # Nothing in the copy's stores points into the original any more.
    for store in ("feast/registry.db", "mlflow/mlflow.db"):
        assert str(a).encode() not in (b / store).read_bytes(), f"{store} of the copy still names {a}"

    # The original runs the same day as well (before: "no such table" once its tables were dropped).
    recloop(a, project, "run", "--partition", DAYS[-1])
    assert set(online_rows(a)) == set(before) and all(online_rows(a).values())

    # MLflow in the copy: its version's files are the copy's, and a run logged there writes into the copy.
    artifacts_a = files(a / "mlflow" / "artifacts")
    registry_b = registry_of(b, monkeypatch)
    download = registry_b.client.get_model_version_download_uri(MODEL, version)
    assert download.startswith((b / "mlflow" / "artifacts").as_uri() + "/"), download
    registry_b.verify(version)
    version_b = log_version(registry_b, tmp_path, "b")
    assert registry_b.client.get_model_version_download_uri(MODEL, version_b).startswith((b / "mlflow").as_uri())
    assert files(a / "mlflow" / "artifacts") == artifacts_a  # nothing written into the original
    assert len(registry_a.client.search_model_versions(f"name = '{MODEL}'")) == 1

    # A home moved elsewhere (the old place gone) works where it is.
    b.rename(moved)
    recloop(moved, project, "run", "--partition", DAYS[-1])
    assert all(online_rows(moved).values())
    registry_moved = registry_of(moved, monkeypatch)
    for v in (version, version_b):
        registry_moved.verify(v)
    for store in ("feast/registry.db", "mlflow/mlflow.db"):
        assert str(b).encode() not in (moved / store).read_bytes()
