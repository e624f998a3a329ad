"""The data plane as Dagster runs it: simulated days → bronze → GX → silver/quarantine → features → Feast.

Runs the real code location (`pipelines.definitions`) in process against a real Dagster instance, the
real GX suites, a real Feast registry and SQLite online store, all under a temporary RECLOOP_HOME.
"""

from __future__ import annotations

import io
import warnings

import pyarrow.parquet as pq
import pytest

from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", category=UserWarning, module="dagster")


def _simulate(settings, days: int = 2) -> list[str]:
    config = SimConfig(seed=11, days=days, initial_users=400, initial_videos=200, events_per_day=2_000,
                       new_users_per_day=20, new_videos_per_day=10)
    simulate(config, open_lake(settings.landing_uri))
    return [config.date_of(i).isoformat() for i in range(days)]


def _counts(run, table: str) -> tuple[int, int, int]:
    meta = run.materialized[f"silver/{table}"]
    return meta["ingested"], meta["accepted"], meta["quarantined"]


def test_data_plane_end_to_end_and_rerun_is_idempotent(recloop_env):
    from pipelines.run import run_data_plane, run_job
    from recloop.features import online_features

    settings = recloop_env
    days = _simulate(settings)
    apply_run, *runs = run_data_plane(days, settings=settings)
    assert apply_run.success and "feast/registry" in apply_run.materialized
    for run in runs:
        assert run.success, run.error
        for table in ("users", "videos", "events"):
            ingested, accepted, quarantined = _counts(run, table)
            assert accepted + quarantined == ingested
        assert _counts(run, "events")[0] > 1_500
        assert all(run.checks.values()), run.checks
        assert {"bronze/events:gx_schema", "silver/events:row_conservation", "silver/events:quarantine_rate"} <= set(run.checks)
        assert run.materialized["feast/online_features"]["rows_written"] > 0

    lake = open_lake(settings.lake_uri)
    before = {t: lake.read_partition(f"silver/{t}", days[-1]).num_rows for t in ("users", "videos", "events")}
    features_before = lake.read_partition("features/user_activity", days[-1]).num_rows

    # The online store serves the last day's snapshot for a user active that day.
    events = lake.read_partition("silver/events", days[-1])
    user = events.column("user_id")[0].as_py()
    video = events.column("video_id")[0].as_py()
    online = online_features(settings, user_ids=[user], video_ids=[video], project=settings.feast_project)
    assert online["user_activity__impressions_1d"].iloc[0] >= 1

    # Re-running a day replaces it: same rows, nothing duplicated, nothing dropped.
    from pipelines.run import instance

    rerun = run_job("data_plane_job", partition=days[-1], inst=instance(settings))
    assert rerun.success, rerun.error
    after = {t: lake.read_partition(f"silver/{t}", days[-1]).num_rows for t in ("users", "videos", "events")}
    assert after == before
    assert lake.read_partition("features/user_activity", days[-1]).num_rows == features_before
    assert lake.read_partition("bronze/events", days[-1]).num_rows == _counts(rerun, "events")[0]

    # Re-running an older day does not write its older snapshot over the newer one online.
    older = run_job("data_plane_job", partition=days[0], inst=instance(settings))
    assert older.success and older.materialized["feast/online_features"]["skipped"] is True


def test_online_backfill_over_a_range_loads_only_the_newest_day(recloop_env, monkeypatch):
    import dagster as dg

    from pipelines.definitions import defs
    from pipelines.run import instance, run_data_plane, run_job
    from recloop.features import snapshot_time

    settings = recloop_env
    days = _simulate(settings, days=3)
    assert all(r.success for r in run_data_plane(days, settings=settings))
    # A new, empty Feast project over the same lake: one ranged run (the asset's single-run backfill
    # policy) loads the newest day and records the older ones as superseded.
    monkeypatch.setenv("RECLOOP_FEAST_PROJECT", "fresh_project")
    inst = instance(settings)
    assert run_job("feast_apply_job", inst=inst).success
    job = defs().resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=inst,
        asset_selection=[dg.AssetKey(["feast", "online_features"])],
        tags={"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]},
    )
    assert result.success
    event = result.get_asset_materialization_events()[0]
    meta = event.step_materialization_data.materialization.metadata
    assert meta["snapshot"].value == snapshot_time(days[-1]).isoformat()
    assert meta["superseded_days"].value == days[:-1]
    assert meta["rows_written"].value > 0
    materialized = {e.partition for e in result.get_asset_materialization_events()}
    assert materialized == set(days)


def test_schema_failure_blocks_the_partition(recloop_env, webhook_receiver):
    from pipelines.run import run_data_plane

    settings = recloop_env
    days = _simulate(settings, days=1)
    landing = open_lake(settings.landing_uri)
    # Deliver the day's events without the watched_s column.
    table = pq.read_table(io.BytesIO(landing.read_bytes(f"events/date={days[0]}/part-0.parquet")))
    landing.write_partition("events", days[0], table.drop_columns(["watched_s"]))

    _, run = run_data_plane(days, settings=settings)
    assert not run.success
    assert run.checks["bronze/events:gx_schema"] is False
    # users and videos went through; events stopped at the blocking check and nothing downstream ran
    assert "silver/users" in run.materialized and "silver/videos" in run.materialized
    assert "bronze/events" in run.materialized
    for key in ("silver/events", "features/user_activity", "feast/online_features"):
        assert key not in run.materialized
    lake = open_lake(settings.lake_uri)
    assert not lake.has_partition("silver/events", days[0])
    # the delivered rows are not lost: bronze holds all of them
    assert lake.read_partition("bronze/events", days[0]).num_rows == table.num_rows
    # and a signed validation.failed webhook says which check failed where
    (alert,) = webhook_receiver.of_type("validation.failed")
    assert alert["data"]["asset"] == "bronze/events" and alert["data"]["partition"] == days[0]
    assert "watched_s" in alert["text"] and alert["data"]["details"]["check"] == "gx_schema"


@pytest.mark.postgres
def test_dagster_runs_recorded_in_postgres(recloop_env, pg_database, tmp_path, monkeypatch):
    """The production instance storage (dagster-postgres) records the data plane's runs and checks."""
    import dagster as dg

    from pipelines.run import run_job

    # dagster-postgres speaks psycopg2; SQLAlchemy 2.1 maps a bare postgresql:// URL to psycopg 3.
    dagster_url = pg_database.replace("postgresql://", "postgresql+psycopg2://", 1)
    home = tmp_path / "dagster_pg"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        f"storage:\n  postgres:\n    postgres_url: \"{dagster_url}\"\n"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    settings = recloop_env
    days = _simulate(settings, days=1)
    with dg.DagsterInstance.get() as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        assert run_job("feast_apply_job", inst=inst).success
        run = run_job("data_plane_job", partition=days[0], inst=inst)
        assert run.success, run.error
        stored = inst.get_run_by_id(run.run_id)
        assert stored is not None and stored.is_success
        mats = inst.fetch_materializations(dg.AssetKey(["silver", "events"]), limit=10).records
        assert len(mats) == 1 and mats[0].partition_key == days[0]

    import psycopg

    with psycopg.connect(pg_database) as conn:
        (n,) = conn.execute("select count(*) from runs where run_id = %s", (run.run_id,)).fetchone()
    assert n == 1

