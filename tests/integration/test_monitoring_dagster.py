"""The monitoring loop as Dagster runs it, on simulated data with a drift scenario switched on: the drift
report of each day against the champion's training window (HTML in the lake, a run in MLflow), a signed
`drift.detected` webhook to a real local receiver, the sensor turning the drift episode into exactly one
retraining run (a re-evaluated tick starts none), that run going through the promotion gate, the cron
schedule, and the `retraining.failed` webhook of a failed training run."""

from __future__ import annotations

import json

import pytest

from recloop.data.simulator import SimConfig, simulate
from recloop.drift import summary_key
from recloop.lake import open_lake

pytestmark = pytest.mark.slow

SENSOR = "drift_retraining_sensor"
GATE = "model/registered_version:promotion_gate"


@pytest.fixture()
def receiver(webhook_receiver):
    return webhook_receiver


def test_drift_alerts_once_and_retrains_once_through_the_gate(recloop_env, receiver, monkeypatch):
    import dagster as dg

    from pipelines.run import instance, run_data_plane, run_job, tick_sensor
    from recloop.registry import open_registry

    settings = recloop_env
    config = SimConfig(seed=5, days=7, initial_users=800, initial_videos=300, events_per_day=4_000,
                       new_users_per_day=30, new_videos_per_day=15, scenario="device_shift", drift_day=5)
    simulate(config, open_lake(settings.landing_uri))
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    inst = instance(settings)

    before = run_data_plane(days[:5], settings=settings)
    assert all(r.success for r in before)
    # No champion yet: the drift report says so, nothing is alerted, and `no_drift` gives no verdict.
    assert before[-1].materialized["monitoring/drift"]["drifted"] is False
    assert "no champion" in before[-1].materialized["monitoring/drift"]["status"]
    assert "monitoring/drift:no_drift" not in before[-1].checks

    first = run_job("training_job", inst=inst,
                    run_config_ops={"model__training_set": {"config": {"TrainDays": 3, "TestDays": 1}}})
    assert first.success, first.error
    assert [e["type"] for e in receiver.events] == ["model.promoted"]
    # What the UI shows of it: numbers Dagster plots, links to MLflow.
    mlflow_ui = "http://127.0.0.1:5000/#/"
    registered = first.materialized["model/registered_version"]
    assert registered["version"] == "1" and registered["mlflow_run"].startswith(f"{mlflow_ui}experiments/")
    view = "?workflowType=machine_learning"  # MLflow's classic view, not the GenAI one (recloop.links)
    assert registered["mlflow_run"].endswith(f"/runs/{registered['mlflow_run_id']}{view}")
    assert registered["model_version"] == f"{mlflow_ui}models/recloop-recommender/versions/1{view}"
    assert all(isinstance(registered[k], float) for k in ("ndcg_at_10", "recall_at_10", "coverage", "diversity"))
    evaluation = first.materialized["model/evaluation"]
    assert evaluation["challenger_ndcg_at_10"] == evaluation["ndcg_at_10"] and "popularity_ndcg_at_10" in evaluation
    gate = first.check_metadata[GATE]
    assert isinstance(gate["challenger_ndcg_at_10"], float) and isinstance(gate["popularity_ndcg_at_10"], float)
    assert gate["model_version"] == registered["model_version"] and gate["mlflow_run"] == registered["mlflow_run"]
    latency = first.check_metadata["model/registered_version:latency_gate"]
    assert isinstance(latency["challenger_p99_ms"], float)
    assert first.materialized["model/champion"]["model_version"] == registered["model_version"]
    mats = inst.fetch_materializations(dg.AssetKey(["model", "registered_version"]), limit=1).records
    stored = mats[0].asset_materialization.metadata
    assert isinstance(stored["mlflow_run"], dg.UrlMetadataValue) and isinstance(stored["ndcg_at_10"], dg.FloatMetadataValue)

    # The stationary held-out day against the champion's window: no drift, nothing to retrain.
    stationary = run_job("drift_job", partition=days[4], inst=inst)
    assert stationary.success and stationary.materialized["monitoring/drift"]["drifted"] is False
    assert stationary.checks["monitoring/drift:no_drift"] is True
    assert tick_sensor(SENSOR, inst=inst).runs == []

    # The first drifted day: drift reported, explained, linked, alerted once.
    day5 = run_job("data_plane_job", partition=days[5], inst=inst)
    assert day5.success, day5.error
    drift = day5.materialized["monitoring/drift"]
    assert drift["drifted"] is True and drift["drift_episode"] == days[5] and drift["champion_version"] == "1"
    assert any("device" in reason for reason in drift["reasons"])
    assert day5.checks["monitoring/drift:no_drift"] is False
    assert day5.check_metadata["monitoring/drift:no_drift"]["partition"] == days[5]
    lake = open_lake(settings.lake_uri)
    report_key = drift["report_in_lake"].split(str(lake.uri("")).rstrip("/") + "/", 1)[-1]
    assert b"<html" in lake.read_bytes(report_key)[:2000].lower()
    assert f"Drift report of {days[5]}: DRIFTED".encode() in lake.read_bytes(report_key)
    summary = json.loads(lake.read_bytes(summary_key(days[5])))  # the report's summary, next to it
    assert summary["champion_version"] == "1" and "device" in summary["columns"]["drifted_names"]
    assert summary["report"] == drift["report_in_lake"] and summary["reasons"] == drift["reasons"]
    registry = open_registry(settings)
    mlflow_run = registry.client.get_run(drift["mlflow_run_id"])
    assert mlflow_run.data.tags["recloop.report_uri"] == drift["report_in_lake"]
    assert mlflow_run.data.tags["recloop.drifted"] == "true"
    # The report opens in the MLflow UI: the drift run's HTML artifact.
    run_url = f"{mlflow_ui}experiments/{mlflow_run.info.experiment_id}/runs/{drift['mlflow_run_id']}"
    assert drift["mlflow_run"] == run_url + view and drift["report"] == f"{run_url}/artifacts/drift_report.html{view}"
    assert "drift_report.html" in [a.path for a in registry.client.list_artifacts(drift["mlflow_run_id"])]
    alerts = receiver.of_type("drift.detected")
    assert len(alerts) == 1
    assert alerts[0]["data"]["partition"] == days[5] and alerts[0]["data"]["model_version"] == "1"
    assert alerts[0]["data"]["report_url"] == drift["report_in_lake"] and alerts[0]["data"]["numbers"]

    # The sensor: one retraining run for the episode, tagged with it; evaluated again, it starts none.
    tick = tick_sensor(SENSOR, inst=inst)
    assert len(tick.runs) == 1
    retrain = tick.runs[0]
    run = inst.get_run_by_id(retrain.run_id)
    assert run.tags["recloop/trigger"] == "drift" and run.tags["dagster/run_key"] == f"drift-{days[5]}-champion-1"
    assert retrain.checks.get(GATE) is not None, "a drift-triggered model must meet the promotion gate"
    decision = "model.promoted" if retrain.checks[GATE] else "model.refused"
    assert len(receiver.of_type(decision)) == (2 if decision == "model.promoted" else 1)
    assert tick_sensor(SENSOR, inst=inst).runs == []
    # Re-evaluated from scratch: the cooldown holds it back; without a cooldown, the run key does.
    replay = tick_sensor(SENSOR, inst=inst, cursor=None)
    assert replay.runs == [] and "cooldown" in replay.skip_reason
    monkeypatch.setenv("RECLOOP_RETRAIN_COOLDOWN_HOURS", "0")
    replay = tick_sensor(SENSOR, inst=inst, cursor=None)
    assert replay.runs == [] and replay.duplicate_run_keys == [f"drift-{days[5]}-champion-1"]
    monkeypatch.delenv("RECLOOP_RETRAIN_COOLDOWN_HOURS")

    # The next day drifts on: same episode (when the champion did not change), no new alert or retraining.
    day6 = run_job("data_plane_job", partition=days[6], inst=inst)
    assert day6.success and day6.materialized["monitoring/drift"]["drifted"] is True
    if not retrain.checks[GATE]:
        assert day6.materialized["monitoring/drift"]["drift_episode"] == days[5]
        assert len(receiver.of_type("drift.detected")) == 1
        assert tick_sensor(SENSOR, inst=inst).runs == []
    assert receiver.rejected == 0


def test_retraining_schedule_cron_and_timezone_from_the_environment(recloop_env, monkeypatch):
    import dagster as dg

    monkeypatch.setenv("RECLOOP_RETRAIN_CRON", "30 4 * * 1")
    monkeypatch.setenv("RECLOOP_RETRAIN_TIMEZONE", "Europe/Paris")
    from pipelines.definitions import defs

    schedule = defs().resolve_schedule_def("retraining_schedule")
    assert schedule.cron_schedule == "30 4 * * 1" and schedule.execution_timezone == "Europe/Paris"
    assert schedule.job_name == "training_job"
    # Stopped unless RECLOOP_DAGSTER_AUTOMATION=on (tests/unit/test_dagster_ux.py); it evaluates either way.
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    data = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=None))
    assert len(data.run_requests) == 1 and data.run_requests[0].tags["recloop/trigger"] == "schedule"


def test_a_failed_retraining_run_sends_a_signed_webhook(recloop_env, receiver):
    import dagster as dg

    from pipelines.defs.monitoring import retraining_failure_alerts
    from pipelines.defs.resources import AlertsResource
    from pipelines.run import instance, run_job

    inst = instance(recloop_env)
    # An empty lake: planning the training window fails.
    failed = run_job("training_job", inst=inst, tags={"recloop/trigger": "schedule"})
    assert not failed.success and "validated days" in failed.error
    run = inst.get_run_by_id(failed.run_id)
    failure = next(e.dagster_event for e in inst.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE))
    context = dg.build_run_status_sensor_context(
        sensor_name="retraining_failure_alerts", dagster_event=failure, dagster_instance=inst, dagster_run=run,
        resources={"alerts": AlertsResource()},
    ).for_run_failure()
    sensor = retraining_failure_alerts()
    sensor(context)
    sensor(context)  # a re-evaluated tick: the receiver still gets it once
    events = receiver.of_type("retraining.failed")
    assert len(events) == 1
    assert events[0]["data"]["details"]["run_id"] == run.run_id
    assert events[0]["data"]["details"]["trigger"] == "schedule"
