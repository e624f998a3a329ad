"""The Spark feature engine (`RECLOOP_FEATURE_ENGINE=spark`, recloop.spark_features) against the DuckDB one:
the same snapshots row for row on a simulated history ingested and validated for real (a video delivered
twice, a gap of two days without events, a single day, the hand-made edge cases of tests/unit/test_features.py),
written as the same partitions, and served by Feast. One local Spark session (`local[2]`) for the module.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recloop import features as F
from recloop.config import REPO_ROOT, Settings, SettingsError
from recloop.data.schemas import TABLE_ORDER
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import PART_FILE, LocalLake

pytestmark = pytest.mark.spark

DAYS = 9
GAP = (3, 4)  # days without events: a gap of two days (days[3] gets no snapshot, days[4] does)
REDELIVERED_ON = 6  # a video of the first day delivered again on this day, with another category


def _hand_module():
    """tests/unit/test_features.py (its hand-made lake: window edges, an event after its day, cold starts)."""
    spec = importlib.util.spec_from_file_location("_hand_features", Path(__file__).parents[1] / "unit" / "test_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[LocalLake, list[str]]:
    """A simulated history through the real ingestion and validation (GX), then the gap days' events
    removed from silver; one video re-delivered with another category before ingestion."""
    from recloop.ingestion import ingest_range
    from recloop.validation import validate_range

    root = tmp_path_factory.mktemp("spark_sim")
    landing, lake = LocalLake(root / "landing"), LocalLake(root / "lake")
    config = SimConfig(seed=11, days=DAYS, initial_users=150, initial_videos=80, events_per_day=500,
                       new_users_per_day=6, new_videos_per_day=4)
    simulate(config, landing)
    days = [config.date_of(i).isoformat() for i in range(DAYS)]
    first_video = landing.read_partition("videos", days[0]).slice(0, 1).to_pylist()[0]
    videos = landing.read_partition("videos", days[REDELIVERED_ON])
    again = {**first_video, "category": "redelivered",
             "upload_time": pd.Timestamp(days[REDELIVERED_ON], tz="UTC").to_pydatetime() + timedelta(hours=2)}
    landing.write_partition("videos", days[REDELIVERED_ON],
                            pa.concat_tables([videos, pa.Table.from_pylist([again], schema=videos.schema)]))
    ingest_range(landing, lake, days[0], days[-1])
    for table in TABLE_ORDER:
        validate_range(lake, table, days, expectations_dir=REPO_ROOT / "expectations")
    for i in GAP:
        lake.delete_partition("silver/events", days[i])
    return lake, days


def _frame(table: pa.Table, view: str) -> pd.DataFrame:
    keys = list(F.ENTITY_KEYS[view])
    return table.drop_columns(["created_timestamp"]).to_pandas().sort_values(keys).reset_index(drop=True)


def assert_same_snapshot(spark_table: pa.Table, duckdb_table: pa.Table, view: str, what: str) -> None:
    """Row for row, sorted by the view's keys: strings, integers and timestamps exactly, floats to 1e-9."""
    assert spark_table.schema.equals(F.FEATURE_SCHEMAS[view]), f"{what}: {spark_table.schema}"
    a, b = _frame(spark_table, view), _frame(duckdb_table, view)
    assert len(a) == len(b), f"{what}: {len(a)} rows on Spark, {len(b)} on DuckDB"
    for column in a.columns:
        if pd.api.types.is_float_dtype(b[column]):
            np.testing.assert_allclose(a[column], b[column], rtol=1e-9, atol=1e-12, err_msg=f"{what}.{column}")
        else:
            assert a[column].tolist() == b[column].tolist(), f"{what}.{column}"


def _written(lake: LocalLake, view: str, day: str) -> pa.Table:
    folder = lake.local_path(f"features/{view}/date={day}")
    assert sorted(p.name for p in folder.iterdir()) == [PART_FILE], f"{view}@{day}: {list(folder.iterdir())}"
    return pq.read_table(folder / PART_FILE)


def test_range_snapshots_equal_duckdb_row_for_row(simulated, spark_engine):
    lake, days = simulated
    out = F.compute_features_range(lake, days[0], days[-1])  # RECLOOP_FEATURE_ENGINE=spark
    wanted = F.snapshot_days(days[0], days[-1], lake.partitions("silver/events"))
    assert out["days"] == wanted and days[GAP[0]] not in wanted and days[GAP[1]] in wanted
    duck = dict(F.compute_feature_tables_range(lake, wanted))
    for day in wanted:
        for view in F.FEATURE_VIEWS:
            assert_same_snapshot(_written(lake, view, day), duck[day][view], view, f"{view}@{day}")
    assert out["rows"] == {v: sum(duck[d][v].num_rows for d in wanted) for v in F.FEATURE_VIEWS}
    # the re-delivered video's new category is what the later snapshots join
    later = _written(lake, F.USER_CATEGORY_AFFINITY, days[-1])
    assert "redelivered" in set(later.column("category").to_pylist())
    assert "redelivered" not in set(_written(lake, F.USER_CATEGORY_AFFINITY, days[REDELIVERED_ON - 1])
                                    .column("category").to_pylist())
    # the gap day after the gap is a snapshot with events of before the gap only (1-day windows empty)
    gap_day = _written(lake, F.USER_ACTIVITY, days[GAP[1]])
    assert gap_day.num_rows > 0 and pa.compute.sum(gap_day["impressions_1d"]).as_py() == 0


def test_single_day_equals_duckdb_and_replaces_the_partition(simulated, spark_engine):
    lake, days = simulated
    day = days[GAP[1] + 1]  # the first day after the gap
    duck = F.compute_feature_tables(lake, day)
    for view in F.FEATURE_VIEWS:  # an earlier run's files, which the new partition replaces whole
        lake.write_partition(f"features/{view}", day, duck[view].slice(0, 1))
        lake.write_bytes(f"features/{view}/date={day}/part-1.parquet", b"stale")
    written = F.compute_features(lake, day)
    for view in F.FEATURE_VIEWS:
        assert written[view].rows == duck[view].num_rows
        assert written[view].uri == str(lake.local_path(f"features/{view}/date={day}/{PART_FILE}"))
        assert_same_snapshot(_written(lake, view, day), duck[view], view, f"{view}@{day}")


def test_hand_made_edge_cases_and_feast_serves_the_spark_snapshots(tmp_path, spark_engine):
    """Window edges, an event after its day inside the day's partition, a video uploaded after the snapshot:
    equal to DuckDB; then Feast applies, materializes and serves the Spark-written partitions with the values
    tests/unit/test_features.py checks for the DuckDB ones."""
    hand = _hand_module()
    lake = hand.write_hand_lake(tmp_path / "lake")
    parts = ["2025-02-09", hand.D, "2025-02-11"]
    assert F.compute_features_range(lake, parts[0], parts[-1])["days"] == parts
    for part in parts:
        duck = F.compute_feature_tables(lake, part)
        for view in F.FEATURE_VIEWS:
            assert_same_snapshot(_written(lake, view, part), duck[view], view, f"{view}@{part}")
    settings = Settings(home=tmp_path / "home", lake_uri=str(tmp_path / "lake"), feast_data_dir=tmp_path / "home" / "feast")
    F.apply_repo(settings, project="t_spark")
    result = F.materialize_partition(settings, hand.D, project="t_spark")
    assert {v: result["views"][v]["rows"] for v in F.FEATURE_VIEWS} == \
        {v: _written(lake, v, hand.D).num_rows for v in F.FEATURE_VIEWS}
    df = F.online_features(settings, project="t_spark", user_ids=["u1", "u1", "u9"], video_ids=["v1", "v3", "v5"],
                           categories=["music", "music", "sports"]).set_index(["user_id", "video_id"])
    u1v1 = df.loc[("u1", "v1")]
    assert u1v1["user_activity__impressions_1d"] == 2
    assert u1v1["user_activity__watch_s_28d"] == 200.0
    assert u1v1["user_category_affinity__watch_share_28d"] == pytest.approx(0.75)
    assert u1v1["video_popularity__completion_rate_28d"] == pytest.approx(2 / 3)
    assert df.loc[("u1", "v3")]["video_popularity__age_days"] == 41.0
    assert pd.isna(df.loc[("u9", "v5")]["video_popularity__age_days"])


# --- the setting and its errors (no Spark session needed) ---------------------------------------------


def test_engine_settings_are_validated(monkeypatch):
    from recloop.config import feature_engine_from_env

    monkeypatch.delenv("RECLOOP_FEATURE_ENGINE", raising=False)
    monkeypatch.delenv("RECLOOP_SPARK_MASTER", raising=False)
    assert feature_engine_from_env() == ("duckdb", "local[2]")
    assert Settings.from_env().feature_engine == "duckdb"
    monkeypatch.setenv("RECLOOP_FEATURE_ENGINE", "Spark")
    monkeypatch.setenv("RECLOOP_SPARK_MASTER", "spark://head:7077")
    assert feature_engine_from_env() == ("spark", "spark://head:7077")
    monkeypatch.setenv("RECLOOP_FEATURE_ENGINE", "polars")
    monkeypatch.setenv("RECLOOP_SPARK_MASTER", "local[two]")
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert err.value.variables == ["RECLOOP_FEATURE_ENGINE", "RECLOOP_SPARK_MASTER"]
    with pytest.raises(SettingsError, match="must be one of duckdb, spark"):
        F.compute_features(LocalLake("/nonexistent"), "2025-01-01")


def test_missing_java_and_an_s3_lake_are_clear_errors(monkeypatch, tmp_path):
    from recloop import spark_features
    from recloop.lake import S3Lake

    monkeypatch.setenv("RECLOOP_FEATURE_ENGINE", "spark")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(spark_features.SparkUnavailable) as err:
        F.compute_features(LocalLake(tmp_path / "lake"), "2025-01-01")
    assert isinstance(err.value, SettingsError)
    assert "Java 17 or newer" in str(err.value) and "openjdk-17-jre-headless" in str(err.value)
    with pytest.raises(spark_features.SparkUnavailable, match="hadoop-aws"):
        spark_features.write_snapshots(S3Lake("bucket", "lake", client=object()), ["2025-01-01"])


def test_with_pyspark_installed_a_python_c_program_still_validates(tmp_path):
    """Great Expectations imports `pyspark.sql.connect` when pyspark is installed; without Spark Connect's
    own dependencies (grpcio-status, zstandard: the `connect` extra the `spark` extra asks for), that
    import calls `sys.exit(0)` in a program whose `__main__` has no file, such as `python -c` (the Airflow
    test's runner): the program ended, silently, at its first validation."""
    import subprocess
    import sys

    code = "import great_expectations, pyspark.sql.connect.dataframe; print('imported')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("imported"), proc.stderr[-2000:]
