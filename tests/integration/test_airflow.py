"""The lifecycle as Airflow 3 runs it (dags/), against a real Airflow metadata database (SQLite, `airflow db
migrate`) in a temporary AIRFLOW_HOME, with `dag.test()`:

1. the DAG folder imports with no errors: the two DAGs, their schedules (cron; cron or drift), retries;
2. end to end on a tiny simulated data set: data plane days (ingest → GX → silver/quarantine → features →
   Feast → drift), training through the promotion gate to a champion in MLflow, then a drifted day whose
   `drift.detected` webhook arrives signed and whose `recloop://drift` event queues the training DAG;
   and a failing training run that retries with backoff, then sends `retraining.failed`;
3. parity: the same seed through Dagster (pipelines.run) in another RECLOOP_HOME gives the same
   accepted/quarantined rows, the same feature snapshots, the same gate decision and drift decision.

Airflow reads its configuration when it is imported, and this process has Dagster and the rest loaded: the
Airflow side runs in a subprocess (`RUNNER`) that executes a list of DAG runs and prints what they did.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT
from recloop.data.schemas import TABLE_ORDER
from recloop.data.simulator import SimConfig, simulate
from recloop.features import FEATURE_VIEWS
from recloop.lake import open_lake

BIN = Path(sys.executable).parent

# Airflow is the optional extra `airflow` (`make setup` installs it): without it these tests skip on a
# developer's machine and fail in CI, where it must be installed.
if importlib.util.find_spec("airflow") is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail('CI=true: Apache Airflow is needed by these tests: pip install -e ".[airflow]"', pytrace=False)
    pytest.skip('Apache Airflow is not installed (pip install -e ".[airflow]")', allow_module_level=True)

DAGS = REPO_ROOT / "dags"
TABLES = TABLE_ORDER
VIEWS = tuple(FEATURE_VIEWS)

# Tiny, but enough for every stage: >= 1,000 impressions a day (the drift reports' minimum sample), four
# days to train on three and evaluate on one, and a fifth on which the device mix shifts.
SIM = SimConfig(seed=13, days=5, initial_users=300, initial_videos=150, events_per_day=1_500,
                new_users_per_day=10, new_videos_per_day=5, scenario="device_shift", drift_day=4)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
BEFORE_DRIFT, DRIFT_DAY = DAYS[:4], DAYS[4]
BAD_DAY = DAYS[1]
TRAINING = {"train_days": 3, "test_days": 1}

# Runs DAG runs with dag.test() and prints one JSON line: per run its state, its task instances (state,
# tries) and their XCom return values; the asset events and the asset-triggered DAG run queue.
RUNNER = r'''
import json, os, sys
from datetime import datetime, timezone

spec = json.loads(sys.argv[1])
from airflow.dag_processing.dagbag import DagBag
from airflow import settings
from sqlalchemy import text

bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
assert not bag.import_errors, bag.import_errors
runs = []
for step in spec["runs"]:
    os.environ.update(step.get("env", {}))
    dag = bag.dags[step["dag"]]
    logical = step.get("logical_date")
    dr = dag.test(logical_date=datetime.fromisoformat(logical).replace(tzinfo=timezone.utc) if logical else None,
                  run_conf=step.get("conf"))
    with settings.Session() as s:
        tis = s.execute(text("select task_id, state, try_number from task_instance where dag_id=:d and run_id=:r"),
                        {"d": dag.dag_id, "r": dr.run_id}).all()
        xcoms = s.execute(text("select task_id, value from xcom where dag_id=:d and run_id=:r and key='return_value'"),
                          {"d": dag.dag_id, "r": dr.run_id}).all()
    runs.append({"dag": dag.dag_id, "run_id": dr.run_id, "state": str(dr.state),
                 "tasks": {t: {"state": str(st), "tries": n} for t, st, n in tis},
                 "xcom": {t: json.loads(v) if isinstance(v, str) else v for t, v in xcoms}})
with settings.Session() as s:
    events = s.execute(text("select a.uri, e.extra, e.source_dag_id, e.source_run_id from asset_event e "
                            "join asset a on a.id = e.asset_id order by e.id")).all()
    queued = s.execute(text("select q.target_dag_id, a.uri from asset_dag_run_queue q "
                            "join asset a on a.id = q.asset_id")).all()
    paused = dict(s.execute(text("select dag_id, is_paused from dag")).all())
print("RESULT " + json.dumps({
    "runs": runs,
    "asset_events": [{"uri": u.rstrip("/"), "extra": json.loads(x) if isinstance(x, str) else x, "dag": d, "run_id": r}
                     for u, x, d, r in events],
    "queued": [{"dag": d, "uri": u.rstrip("/")} for d, u in queued],
    "paused": {k: bool(v) for k, v in paused.items()},
}, default=str))
'''

# Prints the DAG folder as Airflow's DagBag parses it.
BAG = r'''
import json, os
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import AssetOrTimeSchedule

bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    tt = dag.timetable
    cron = getattr(getattr(tt, "timetable", tt), "expression", None)
    out["dags"][dag.dag_id] = {
        "timetable": type(tt).__name__, "cron": cron,
        "timezone": str(getattr(getattr(tt, "timetable", tt), "timezone", "")),
        "assets": ([c.uri.rstrip("/") for c in getattr(tt.asset_condition, "objects", [tt.asset_condition])]
                   if isinstance(tt, AssetOrTimeSchedule) else []),
        "tasks": sorted(t.task_id for t in dag.tasks),
        "retries": sorted({t.retries for t in dag.tasks}),
        "backoff": sorted({t.retry_exponential_backoff for t in dag.tasks}),
        "retry_delay_s": sorted({t.retry_delay.total_seconds() for t in dag.tasks}),
        "failure_callbacks": sorted({bool(t.on_failure_callback) for t in dag.tasks}),
        "max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
        "outlets": {t.task_id: [a.uri.rstrip("/") for a in t.outlets] for t in dag.tasks if t.outlets},
    }
print("RESULT " + json.dumps(out))
'''


def _airflow_env(airflow_home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "PYTHONWARNINGS": "ignore",
        # The DAGs' defaults (2 retries, 5 s doubling), whatever this shell exports.
        "RECLOOP_AIRFLOW_RETRIES": "",
        "RECLOOP_AIRFLOW_RETRY_DELAY_S": "",
        # The latency gate runs (and passes) whatever this shared machine's load; its rule has its own tests.
        "RECLOOP_LATENCY_BUDGET_MS": "60000",
        "RECLOOP_LATENCY_MAX_RATIO": "100",
        "RECLOOP_LATENCY_SAMPLE": "40",
        **extra,
    }


def _python(code: str, *args: str, env: dict[str, str], log: Path, timeout: int) -> dict:
    """Runs `code` in a fresh interpreter; returns its RESULT line as JSON (the output goes to `log`)."""
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}; output tail:\n{text[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """A fresh Airflow metadata database (SQLite) made by `airflow db migrate`."""
    home = tmp_path_factory.mktemp("airflow")
    proc = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=_airflow_env(home), capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (home / "airflow.db").is_file()
    return home


def test_dag_folder_imports_with_the_dags_schedules_and_retries(airflow_home, tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_RETRAIN_CRON", "30 4 * * 1")
    monkeypatch.setenv("RECLOOP_RETRAIN_TIMEZONE", "Europe/Paris")
    out = _python(BAG, env=_airflow_env(airflow_home), log=tmp_path / "bag.log", timeout=180)
    assert out["errors"] == {}
    assert set(out["dags"]) == {"recloop_data_plane", "recloop_training"}
    data, training = out["dags"]["recloop_data_plane"], out["dags"]["recloop_training"]

    assert data["timetable"] == "CronDataIntervalTimetable" and data["cron"] == "15 1 * * *"
    assert {f"{step}_{t}" for t in TABLES for step in ("ingest", "check_schema", "validate")} <= set(data["tasks"])
    assert {"partition", "feast_apply", "compute_features", "materialize_online", "drift",
            "request_retraining", "join_served", "impression_outcomes", "served_traffic",
            "online_experiment"} <= set(data["tasks"])
    assert data["outlets"] == {"request_retraining": ["recloop://drift"]}
    # Retraining: on the cron from the environment OR on a drift event.
    assert training["timetable"] == "AssetOrTimeSchedule"
    assert training["cron"] == "30 4 * * 1" and training["timezone"] == "Europe/Paris"
    assert training["assets"] == ["recloop://drift"]
    assert training["tasks"] == sorted(["training_set", "two_tower", "ann_index", "ranker", "evaluation", "register",
                                        "gate", "latency_gate", "promote"])
    assert training["failure_callbacks"] == [True]
    for dag in (data, training):
        assert dag["retries"] == [2] and dag["backoff"] == [2.0] and dag["retry_delay_s"] == [5.0]
        assert dag["max_active_runs"] == 1 and dag["catchup"] is False


def _bad_delivery(landing, day: str) -> int:
    """A second events file for `day`: two good rows and rows broken the usual ways (negative and
    impossible watch times, an unknown user, a future time, text in a number, a duplicate id)."""
    events = pq.read_table(landing.local_path(f"events/date={day}/part-0.parquet")).slice(0, 2).to_pylist()
    a, b = events
    t = a["event_time"].strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [
        f"x-1,{a['user_id']},{a['video_id']},{t},home,0,0,false,false",
        f"x-2,{b['user_id']},{b['video_id']},{t},home,1,3.5,false,true",
        f"x-3,{a['user_id']},{a['video_id']},{t},home,2,-4,false,false",
        f"x-4,u9999999,{a['video_id']},{t},home,3,1,false,false",
        f"x-5,{a['user_id']},{a['video_id']},{t},home,4,99999,true,false",
        f"x-6,{a['user_id']},{a['video_id']},2099-01-01T00:00:00Z,home,5,1,false,false",
        f"x-7,{a['user_id']},{a['video_id']},{t},home,6,ten,false,false",
        f"x-1,{a['user_id']},{a['video_id']},{t},home,0,0,false,false",
    ]
    head = "event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked"
    landing.write_bytes(f"events/date={day}/late-delivery.csv", ("\n".join([head, *rows]) + "\n").encode())
    return len(rows)


def _simulate(landing_uri: str) -> None:
    landing = open_lake(landing_uri)
    simulate(SIM, landing)
    _bad_delivery(landing, BAD_DAY)


def _home_env(home: Path, project: str) -> dict[str, str]:
    return {"RECLOOP_HOME": str(home), "RECLOOP_FEAST_PROJECT": project, "DAGSTER_HOME": str(home / "dagster")}


@pytest.fixture(scope="module")
def airflow_lifecycle(airflow_home, tmp_path_factory):
    """The whole Airflow lifecycle over SIM, once for the module: a failing training run on an empty
    deployment, then the data plane for four days, training, and the drifted fifth day (twice); with a
    real Standard Webhooks receiver for the alerts. Returns (runner output, RECLOOP_HOME, the events
    received, how many deliveries the receiver rejected)."""
    from recloop.alerts import WebhookReceiver, new_secret

    root = tmp_path_factory.mktemp("recloop-airflow")
    home, empty = root / "home", root / "empty"
    _simulate(str(home / "landing"))
    secret = new_secret()
    with WebhookReceiver(secret) as receiver, pytest.MonkeyPatch.context() as mp:
        for var in ("RECLOOP_LANDING_URI", "RECLOOP_LAKE_URI", "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV",
                    "RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_ALERTS_DB_URL", "RECLOOP_ALERTS_CONFIG"):
            mp.delenv(var, raising=False)
        mp.setenv("RECLOOP_ALERT_WEBHOOK_URL", receiver.url)
        mp.setenv("RECLOOP_ALERT_WEBHOOK_SECRET", secret)
        project = f"t{uuid.uuid4().hex[:10]}"
        runs = [{"dag": "recloop_training", "conf": TRAINING, "env": _home_env(empty, project)}]
        runs += [{"dag": "recloop_data_plane", "logical_date": day, "env": _home_env(home, project)}
                 for day in BEFORE_DRIFT]
        # The drifted day twice: a re-run must not ask for a second retraining nor page twice.
        runs += [{"dag": "recloop_training", "conf": TRAINING},
                 {"dag": "recloop_data_plane", "logical_date": DRIFT_DAY},
                 {"dag": "recloop_data_plane", "logical_date": DRIFT_DAY}]
        # Retries as configured, with a 1 s base delay so that the failing run's retries take seconds.
        out = _python(RUNNER, json.dumps({"runs": runs}),
                      env=_airflow_env(airflow_home, RECLOOP_AIRFLOW_RETRY_DELAY_S="1"),
                      log=root / "airflow.log", timeout=900)
        received, rejected = list(receiver.events), receiver.rejected
    out["skip_reasons"] = re.findall(r"Skipping task\.\s.*reason='([^']*)'", (root / "airflow.log").read_text())
    return out, home, received, rejected


def _task_states(run: dict) -> dict[str, str]:
    return {task: ti["state"] for task, ti in run["tasks"].items()}


@pytest.mark.slow
def test_airflow_lifecycle_end_to_end(airflow_lifecycle):
    out, home, received, rejected = airflow_lifecycle
    failed, *data_plane, training, drifted, rerun = out["runs"]
    assert rejected == 0  # every webhook carried a valid signature

    # A training run on an empty lake fails in training_set, after its two retries with backoff, and
    # the failure callback sends one retraining.failed; the tasks after it never ran.
    assert failed["state"] == "failed"
    assert failed["tasks"]["training_set"] == {"state": "failed", "tries": 3}
    assert _task_states(failed)["promote"] == "upstream_failed"
    failures = [e for e in received if e["type"] == "retraining.failed"]
    assert len(failures) == 1
    assert failures[0]["data"]["details"]["run_id"] == failed["run_id"]
    assert failures[0]["data"]["details"]["steps_failed"] == ["training_set"]
    assert failures[0]["data"]["details"]["trigger"] == "manual"
    assert "validated days" in failures[0]["text"]

    # The data plane, day by day: every row accepted or quarantined, the bad delivery quarantined.
    lake = open_lake(str(home / "lake"))
    for day, run in zip(BEFORE_DRIFT, data_plane, strict=True):
        assert run["state"] == "success", _task_states(run)
        assert run["xcom"]["partition"] == day
        for table in TABLES:
            v = run["xcom"][f"validate_{table}"]
            assert v["accepted"] + v["quarantined"] == v["ingested"] > 0
            assert lake.read_partition(f"silver/{table}", day).num_rows == v["accepted"]
        events = run["xcom"]["validate_events"]
        if day == BAD_DAY:
            assert events["quarantined"] == 6 and lake.read_partition("quarantine/events", day).num_rows == 6
            assert sum(events["quarantine_reasons"].values()) == 6
            assert "unknown user_id: no accepted user has this id" in events["quarantine_reasons"]
        else:
            assert events["quarantined"] == 0
        for view in VIEWS:
            assert lake.read_partition(f"features/{view}", day).num_rows == run["xcom"]["compute_features"][view]["rows"] > 0
        assert run["xcom"]["materialize_online"]["rows_written"] > 0
        # No champion yet: nothing to compare with, no retraining asked for.
        assert run["xcom"]["drift"]["champion_version"] is None
        assert _task_states(run)["request_retraining"] == "skipped"

    # Training: the Feast training set through the gate to the champion alias, model.promoted sent.
    assert training["state"] == "success", _task_states(training)
    assert training["xcom"]["training_set"]["train_partitions"] == BEFORE_DRIFT[:3]
    assert training["xcom"]["evaluation"]["champion_compared"].startswith("none")
    assert training["xcom"]["gate"]["promote"] is True and training["xcom"]["gate"]["compared_to"] == "popularity"
    assert training["xcom"]["latency_gate"]["status"] == "passed", training["xcom"]["latency_gate"]
    assert training["xcom"]["promote"]["champion"] == training["xcom"]["register"]["version"] == "1"
    registry = open_registry_at(home)
    assert str(registry.champion().version) == "1"
    run = registry.client.get_run(registry.client.get_model_version(registry.model_name, "1").run_id)
    assert "eval.full.ndcg_at_10" in run.data.metrics
    promoted = [e for e in received if e["type"] == "model.promoted"]
    assert len(promoted) == 1 and promoted[0]["data"]["model_version"] == "1"
    assert promoted[0]["data"]["details"]["run_id"] == training["run_id"]

    # The drifted day: drift found and explained, alerted once, and a recloop://drift event that queues
    # the training DAG (the scheduler starts the run: data-aware scheduling).
    assert drifted["state"] == "success", _task_states(drifted)
    report = drifted["xcom"]["drift"]
    assert report["drifted"] is True and report["new_episode"] is True and report["champion_version"] == "1"
    assert any("device" in reason for reason in report["reasons"])
    assert b"<html" in Path(report["report"]).read_bytes()[:2000].lower()
    alerts = [e for e in received if e["type"] == "drift.detected"]
    assert len(alerts) == 1 and alerts[0]["data"]["partition"] == DRIFT_DAY and alerts[0]["data"]["model_version"] == "1"
    request = drifted["xcom"]["request_retraining"]
    assert request == {"key": f"drift-{DRIFT_DAY}-champion-1", "partition": DRIFT_DAY, "champion_version": "1"}
    assert out["asset_events"] == [{"uri": "recloop://drift", "extra": request, "dag": "recloop_data_plane",
                                    "run_id": drifted["run_id"]}]
    assert {"dag": "recloop_training", "uri": "recloop://drift"} in out["queued"]
    assert out["paused"]["recloop_training"] is False and out["paused"]["recloop_data_plane"] is True

    # The same day again: the same decision, but the episode's retraining was requested already (no
    # second event) and its drift.detected has the same id (delivered once).
    assert rerun["state"] == "success" and rerun["xcom"]["drift"]["new_episode"] is True
    assert _task_states(rerun)["request_retraining"] == "skipped"
    assert out["skip_reasons"][-1] == (f"{DRIFT_DAY}: retraining for this drift episode was requested already "
                                       f"(drift-{DRIFT_DAY}-champion-1)")
    assert len(out["asset_events"]) == 1
    assert [e["type"] for e in received] == ["retraining.failed", "model.promoted", "drift.detected"]


def open_registry_at(home: Path):
    """The MLflow registry of the deployment at `home` (as the DAG tasks open it)."""
    from recloop.config import Settings
    from recloop.registry import open_registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(home))
        mp.delenv("RECLOOP_MLFLOW_TRACKING_URI", raising=False)
        return open_registry(Settings.from_env())


def _snapshot(lake, view: str, day: str) -> pd.DataFrame:
    """A feature snapshot sorted, without `created_timestamp` (when it was computed: the wall clock)."""
    df = lake.read_partition(f"features/{view}", day).to_pandas().drop(columns="created_timestamp")
    return df.sort_values(list(df.columns)).reset_index(drop=True)


@pytest.mark.slow
def test_dagster_and_airflow_agree_on_the_same_seed(airflow_lifecycle, recloop_env):
    from pipelines.run import instance, run_data_plane, run_job

    out, airflow_home_dir, _, _ = airflow_lifecycle
    _, *airflow_days, airflow_training, airflow_drift, _ = out["runs"]
    settings = recloop_env
    assert Path(settings.home) != airflow_home_dir
    _simulate(settings.landing_uri)
    dagster_days = run_data_plane(BEFORE_DRIFT, settings=settings)[1:]
    assert all(r.success for r in dagster_days), [r.error for r in dagster_days]

    # Accepted and quarantined rows, per table and day.
    for day, dagster, airflow in zip(BEFORE_DRIFT, dagster_days, airflow_days, strict=True):
        for table in TABLES:
            d, a = dagster.materialized[f"silver/{table}"], airflow["xcom"][f"validate_{table}"]
            assert (d["ingested"], d["accepted"], d["quarantined"]) == (a["ingested"], a["accepted"], a["quarantined"])
            assert d["quarantine_reasons"] == a["quarantine_reasons"]
    # The same feature snapshots, value for value (entities, event time, every feature).
    dagster_lake, airflow_lake = open_lake(settings.lake_uri), open_lake(str(airflow_home_dir / "lake"))
    for view in VIEWS:
        for day in BEFORE_DRIFT:
            dagster_features = _snapshot(dagster_lake, view, day)
            assert len(dagster_features) > 0 and len(dagster_features.columns) > 3
            pd.testing.assert_frame_equal(dagster_features, _snapshot(airflow_lake, view, day))

    # Both models meet the same gate with the same decision.
    inst = instance(settings)
    dagster_training = run_job("training_job", inst=inst, run_config_ops={
        "model__training_set": {"config": {"TrainDays": TRAINING["train_days"], "TestDays": TRAINING["test_days"]}}})
    assert dagster_training.success, dagster_training.error
    gate = dagster_training.check_metadata["model/registered_version:promotion_gate"]
    airflow_gate = airflow_training["xcom"]["gate"]
    assert dagster_training.checks["model/registered_version:promotion_gate"] is airflow_gate["promote"] is True
    assert gate["compared_to"] == airflow_gate["compared_to"] == "popularity"
    assert gate["checks"] == airflow_gate["checks"]
    # Same data, same seeds: the same model, metric for metric (training is deterministic on CPU).
    assert gate["metrics"] == pytest.approx(airflow_gate["metrics"], rel=1e-6)

    # And the drifted day gets the same decision against each one's champion.
    day = run_job("data_plane_job", partition=DRIFT_DAY, inst=inst)
    assert day.success, day.error
    d, a = day.materialized["monitoring/drift"], airflow_drift["xcom"]["drift"]
    assert (d["drifted"], d["drift_episode"], d["champion_version"]) == (a["drifted"], a["drift_episode"],
                                                                         a["champion_version"]) == (True, DRIFT_DAY, "1")
