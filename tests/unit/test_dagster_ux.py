"""What a user sees in the Dagster UI: the partition range ends where the data ends when a home pins it
(the demo does), links are URLs a browser opens, the gate's figures are numbers, the automation starts
stopped unless RECLOOP_DAGSTER_AUTOMATION=on, and a day compared with nothing gets no `no_drift` verdict."""

from __future__ import annotations

import json
import math
from datetime import date

import pyarrow as pa
import pytest

from recloop.lake import LocalLake

TODAY = date(2026, 1, 10)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty RECLOOP_HOME with a landing zone holding events for 2025-01-01..2025-01-03."""
    from recloop.config import Settings

    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))
    for var in ("RECLOOP_PARTITION_START", "RECLOOP_PARTITION_END", "RECLOOP_LANDING_URI", "RECLOOP_ENV"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings.from_env()
    landing = LocalLake(settings.landing_uri)
    for day in ("2025-01-01", "2025-01-02", "2025-01-03"):
        landing.write_partition("events", day, pa.table({"a": [1]}))
    return settings, landing


# --- the partition range's end ----------------------------------------------------------------------


def test_the_end_is_yesterday_unless_pinned(home, monkeypatch):
    from recloop import partition_range as pr

    settings, landing = home
    rng = pr.resolve(settings, landing=landing, today=TODAY)
    assert (rng.first, rng.last, rng.pinned) == (date(2025, 1, 1), date(2026, 1, 9), False)
    with pytest.raises(pr.OutsideRange, match="once it has ended"):
        rng.check("2026-01-10")

    # The demo's pin: the last day with events in the landing zone, read by every later load of the home.
    path = pr.pin_end(settings, "data", set_by="recloop demo")
    assert json.loads(path.read_text())["end"] == "data" and path.parent == settings.home
    rng = pr.resolve(settings, landing=landing, today=TODAY)
    assert (rng.first, rng.last, rng.pinned) == (date(2025, 1, 1), date(2025, 1, 3), True)
    assert "recloop demo" in rng.end_source
    with pytest.raises(pr.OutsideRange, match="end at 2025-01-03.*RECLOOP_PARTITION_END=today") as err:
        rng.check("2025-01-04")
    assert "\n" not in str(err.value)
    # More data landed: the pinned range follows it.
    landing.write_partition("events", "2025-01-05", pa.table({"a": [1]}))
    assert pr.resolve(settings, landing=landing, today=TODAY).last == date(2025, 1, 5)
    # The environment wins over the pin: a day, or today (the default's end).
    monkeypatch.setenv("RECLOOP_PARTITION_END", "2025-01-02")
    assert pr.resolve(settings, landing=landing, today=TODAY).last == date(2025, 1, 2)
    monkeypatch.setenv("RECLOOP_PARTITION_END", "today")
    rng = pr.resolve(settings, landing=landing, today=TODAY)
    assert rng.last == date(2026, 1, 9) and not rng.pinned
    # A pinned end never goes past yesterday, and then it is the default's end (unpinned).
    monkeypatch.setenv("RECLOOP_PARTITION_END", "2030-01-01")
    rng = pr.resolve(settings, landing=landing, today=TODAY)
    assert rng.last == date(2026, 1, 9) and not rng.pinned


def test_a_wrong_end_is_refused_in_one_sentence(home, monkeypatch):
    from recloop import partition_range as pr

    settings, landing = home
    monkeypatch.setenv("RECLOOP_PARTITION_END", "soon")
    with pytest.raises(pr.BadDay, match="YYYY-MM-DD, data .* or today"):
        pr.resolve(settings, landing=landing, today=TODAY)
    monkeypatch.setenv("RECLOOP_PARTITION_END", "2024-12-01")
    with pytest.raises(pr.BadDay, match="before they start at 2025-01-01"):
        pr.resolve(settings, landing=landing, today=TODAY)
    monkeypatch.delenv("RECLOOP_PARTITION_END")
    pr.pin_path(settings).write_text("not json")
    with pytest.raises(pr.BadDay, match="not a partition pin"):
        pr.resolve(settings, landing=landing, today=TODAY)
    with pytest.raises(pr.BadDay, match="not a date"):
        pr.pin_end(settings, "whenever", set_by="me")


# --- links and figures --------------------------------------------------------------------------------


def test_mlflow_links(monkeypatch):
    from recloop import links

    monkeypatch.delenv("RECLOOP_MLFLOW_UI_URL", raising=False)
    assert links.mlflow_run_url("3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert (links.mlflow_run_url("3", "abc", artifact="drift_report.html")
            == "http://127.0.0.1:5000/#/experiments/3/runs/abc/artifacts/drift_report.html?workflowType=machine_learning")
    monkeypatch.setenv("RECLOOP_MLFLOW_UI_URL", "https://mlflow.example.com/")
    assert (links.mlflow_model_version_url("recloop recommender", 7)
            == "https://mlflow.example.com/#/models/recloop%20recommender/versions/7?workflowType=machine_learning")
    assert links.location_url("s3://bucket/lake/report.html") == "s3://bucket/lake/report.html"
    assert links.location_url("/tmp/lake/report.html") == "file:///tmp/lake/report.html"


def test_the_gates_figures_are_flat_finite_numbers():
    from recloop import lifecycle, model_plane
    from recloop.registry import GateDecision

    figures = lifecycle.evaluation_figures({
        model_plane.PRIMARY: {"ndcg_at_10": 0.2, "coverage": 0.5, "diversity": 0.7, "popularity_concentration": 0.3,
                 "recall_at_10": 0.4},
        "champion": {"ndcg_at_10": 0.16, "coverage": 0.45, "diversity": float("nan")},
        "popularity": {"ndcg_at_10": 0.1},
    })
    assert figures["challenger_ndcg_at_10"] == 0.2 and figures["champion_coverage"] == 0.45
    assert figures["popularity_ndcg_at_10"] == 0.1 and "champion_diversity" not in figures
    assert "challenger_recall_at_10" not in figures
    assert math.isclose(figures["ndcg_at_10_vs_champion"], 1.25)
    decision = GateDecision(promote=True, reasons=["PROMOTE"], checks={}, compared_to="champion:1",
                            metrics={"challenger.ndcg_at_10": 0.2, "champion.ndcg_at_10": 0.16,
                                     "challenger.coverage": 0.5, "challenger.map_at_10": 0.1,
                                     "sanity.distinct_items": 40.0, "champion.diversity": float("inf")})
    gate = lifecycle.GateOutcome("2", decision, None).figures()
    assert gate == {"challenger_ndcg_at_10": 0.2, "champion_ndcg_at_10": 0.16, "challenger_coverage": 0.5,
                    "sanity_distinct_items": 40.0}


def _outcome(**kw):
    from recloop.lifecycle import DriftOutcome

    base = dict(partition="2025-01-03", drifted=False, champion_version="1", drift_episode=None, reasons=[],
                summary={}, reference_partitions=[], report_uri=None, mlflow_run_id=None, status="no drift")
    return DriftOutcome(**{**base, **kw})


def test_a_day_compared_with_nothing_says_so():
    assert not _outcome(champion_version=None, status="no champion yet").compared
    assert _outcome(champion_version=None, status="no champion yet").nothing_compared == "nothing compared: no champion yet"
    assert not _outcome(status="no validated events on 2025-01-03").compared
    short = _outcome(summary={"decided": 0.0, "columns.tested": 0.0}, reasons=["no decision: 3 events < min_rows 500"])
    assert not short.compared and "min_rows" in short.nothing_compared
    assert not _outcome(summary={"decided": 1.0, "columns.tested": 0.0}).compared
    tested = _outcome(summary={"decided": 1.0, "columns.tested": 4.0, "columns.drifted": 0.0})
    assert tested.compared and tested.nothing_compared == ""
    assert _outcome(summary={"decided": 1.0, "columns.tested": 0.0, "signal.cold_start": 0.1,
                             "signal.cold_start.users": 0.2}).compared


# --- the code location ---------------------------------------------------------------------------------


def test_automation_is_stopped_unless_switched_on(recloop_env, monkeypatch):
    import dagster as dg

    from pipelines.definitions import defs

    monkeypatch.delenv("RECLOOP_DAGSTER_AUTOMATION", raising=False)
    loaded = defs()
    schedules = {s.name: s.default_status for s in loaded.schedules}
    sensors = {s.name: s.default_status for s in loaded.sensors}
    assert set(schedules.values()) == {dg.DefaultScheduleStatus.STOPPED}, schedules
    assert set(sensors.values()) == {dg.DefaultSensorStatus.STOPPED}, sensors
    assert {"retraining_schedule", "daily_data_plane_schedule"} <= set(schedules)
    assert {"drift_retraining_sensor", "retraining_failure_alerts"} == set(sensors)

    monkeypatch.setenv("RECLOOP_DAGSTER_AUTOMATION", "on")
    loaded = defs()
    assert loaded.resolve_schedule_def("retraining_schedule").default_status == dg.DefaultScheduleStatus.RUNNING
    assert {s.name: s.default_status for s in loaded.sensors} == {
        "drift_retraining_sensor": dg.DefaultSensorStatus.RUNNING,
        "retraining_failure_alerts": dg.DefaultSensorStatus.RUNNING}
    # The data plane's and the online schedules stay off until turned on in the UI.
    assert loaded.resolve_schedule_def("daily_data_plane_schedule").default_status == dg.DefaultScheduleStatus.STOPPED
    monkeypatch.setenv("RECLOOP_DAGSTER_AUTOMATION", "sometimes")
    with pytest.raises(ValueError, match="RECLOOP_DAGSTER_AUTOMATION must be on or off"):
        defs()


def test_partitions_end_where_the_setting_says(recloop_env, monkeypatch):
    from pipelines.definitions import defs
    from recloop.lake import open_lake

    landing = open_lake(recloop_env.landing_uri)
    for day in ("2025-01-01", "2025-01-02", "2025-01-03"):
        landing.write_partition("events", day, pa.table({"a": [1]}))
    monkeypatch.setenv("RECLOOP_PARTITION_END", "2025-01-02")
    loaded = defs()
    for job in ("data_plane_job", "drift_job", "served_traffic_job"):
        assert loaded.resolve_job_def(job).partitions_def.get_partition_keys() == ["2025-01-01", "2025-01-02"]
    monkeypatch.setenv("RECLOOP_PARTITION_END", "data")
    keys = defs().resolve_job_def("data_plane_job").partitions_def.get_partition_keys()
    assert keys == ["2025-01-01", "2025-01-02", "2025-01-03"]
    # Pinned, no day is due any more: no freshness deadline to turn the assets overdue.
    fresh = {s.key.to_user_string(): s.freshness_policy for s in defs().resolve_all_asset_specs()}
    assert fresh["silver/events"] is None and fresh["feast/online_features"] is None
    monkeypatch.delenv("RECLOOP_PARTITION_END")  # the default: up to yesterday, each day due by 06:00 UTC
    assert len(defs().resolve_job_def("data_plane_job").partitions_def.get_partition_keys()) > 300
    fresh = {s.key.to_user_string(): s.freshness_policy for s in defs().resolve_all_asset_specs()}
    assert fresh["silver/events"] is not None and fresh["feast/online_features"] is not None
    # The checks of partitioned assets are partitioned too: their evaluations name their day.
    graph = defs().resolve_asset_graph()
    checks = {f"{k.asset_key.to_user_string()}:{k.name}": graph.get_check_spec(k) for k in graph.asset_check_keys}
    for name in ("silver/events:row_conservation", "silver/events:quarantine_rate", "monitoring/drift:no_drift",
                 "online/served_traffic:served_traffic_within_bounds", "bronze/events:gx_schema"):
        assert checks[name].partitions_def is not None, name


def test_no_drift_has_no_verdict_on_a_day_compared_with_nothing(recloop_env, monkeypatch):
    """The drift asset as Dagster runs it, its comparison replaced: a day compared with nothing skips the
    check (no evaluation); a compared day's verdict names its partition and links the report in MLflow."""
    import dagster as dg

    from pipelines.run import instance, run_job
    from recloop import lifecycle
    from recloop.lake import open_lake
    from recloop.registry import open_registry

    day = "2025-01-03"
    open_lake(recloop_env.landing_uri).write_partition("events", day, pa.table({"a": [1]}))
    monkeypatch.setenv("RECLOOP_PARTITION_END", "data")
    monkeypatch.delenv("RECLOOP_MLFLOW_UI_URL", raising=False)
    registry = open_registry(recloop_env)
    # A real drift run in the embedded MLflow store, with its HTML, for the links.
    experiment = registry.client.create_experiment("recloop-monitoring")
    run_id = registry.client.create_run(experiment, run_name=f"drift {day}").info.run_id
    registry.client.log_text(run_id, "<html></html>", "drift_report.html")
    outcomes = iter([
        _outcome(partition=day, summary={"decided": 0.0, "columns.tested": 0.0},
                 reasons=["no decision: the partition has 3 events < min_rows 500"], status="no decision"),
        _outcome(partition=day, drifted=True, drift_episode=day, summary={"decided": 1.0, "columns.tested": 5.0,
                 "columns.drifted": 2.0}, reasons=["device_type drifted"], status="drifted",
                 report_uri=str(recloop_env.home / "lake" / "report.html"), mlflow_run_id=run_id),
    ])
    monkeypatch.setattr(lifecycle, "drift_report", lambda *a, **kw: next(outcomes))
    inst = instance(recloop_env)
    key = dg.AssetCheckKey(dg.AssetKey(["monitoring", "drift"]), "no_drift")

    nothing = run_job("drift_job", partition=day, inst=inst)
    assert nothing.success, nothing.error
    # Recorded as a run of the code location the UI loads: listed under its job and on the timeline.
    run = inst.get_run_by_id(nothing.run_id)
    assert run.remote_job_origin.repository_origin.get_label() == "__repository__@recloop"
    assert run.remote_job_origin.job_name == "drift_job" and run.tags["dagster/partition"] == day
    by_job = inst.get_run_records(dg.RunsFilter(job_name="drift_job", tags={".dagster/repository": "__repository__@recloop"}))
    assert [r.dagster_run.run_id for r in by_job] == [nothing.run_id]
    meta = nothing.materialized["monitoring/drift"]
    assert meta["compared"] is False and meta["status"].startswith("nothing compared: no decision")
    assert "monitoring/drift:no_drift" not in nothing.checks  # no PASS for a day nothing was compared on
    (record,) = inst.event_log_storage.get_asset_check_execution_history(key, limit=5)
    assert record.partition == day and record.event.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED

    compared = run_job("drift_job", partition=day, inst=inst)
    assert compared.success, compared.error
    assert compared.checks["monitoring/drift:no_drift"] is False
    check = compared.check_metadata["monitoring/drift:no_drift"]
    assert check["partition"] == day and compared.check_descriptions["monitoring/drift:no_drift"].startswith(day)
    run_url = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
    view = "?workflowType=machine_learning"
    report = f"{run_url}/artifacts/drift_report.html{view}"
    assert check["mlflow_run"] == run_url + view and check["report"] == report
    meta = compared.materialized["monitoring/drift"]
    assert meta["report"] == report and meta["mlflow_run"] == run_url + view
    event = inst.fetch_materializations(dg.AssetKey(["monitoring", "drift"]), limit=1).records[0]
    assert isinstance(event.asset_materialization.metadata["report"], dg.UrlMetadataValue)
    assert [r.partition for r in inst.event_log_storage.get_asset_check_execution_history(key, limit=5)] == [day, day]


def test_runs_are_recorded_under_the_location_the_ui_loads():
    import tomllib

    from pipelines.run import LOCATION, MODULE
    from recloop.config import REPO_ROOT

    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    assert (tool["code_location_name"], tool["module_name"]) == (LOCATION, MODULE)
    assert "dagster dev -h" in (REPO_ROOT / "Makefile").read_text()  # make ui loads [tool.dagster]


def test_the_data_end_counts_every_delivered_file(home, monkeypatch):
    from recloop import partition_range as pr

    settings, landing = home
    landing.write_bytes("events/date=2025-01-04/late.csv", b"event_id\ne1\n")  # a CSV-only day is data too
    landing.write_bytes("events/date=2025-01-09/_SUCCESS", b"")  # a marker is not
    landing.write_bytes("events/date=someday/x.csv", b"event_id\n")  # nor a folder that is not a day
    monkeypatch.setenv("RECLOOP_PARTITION_END", "data")
    assert pr.resolve(settings, landing=landing, today=TODAY).last == date(2025, 1, 4)
