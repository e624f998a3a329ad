"""recloop's lifecycle as Airflow 3 DAGs (TaskFlow), the alternative to the Dagster code location in
pipelines/. Every task is one call of `recloop.lifecycle` (or `recloop.model_plane`), the functions the
Dagster assets call; tasks pass small JSON values (a partition, counts, a version) through XCom, never
data: the data is in the lake, the candidate model in its working folder, versions in MLflow.

recloop_data_plane — one logical date = one daily partition (01:15 UTC for the day that ended, off until
    you unpause it, like Dagster's daily_data_plane_schedule):
    feast_apply ─────────────────────────────────────────────────────────┐
    ingest_<t> → check_schema_<t> → validate_<t>  (t = users, videos,      ├→ materialize_online
    impressions; events after them) → join_served → compute_features ──────┤
                                      join_served → impression_outcomes    └→ drift → request_retraining
                                      impression_outcomes → served_traffic, online_experiment
recloop_training — on the cron of RECLOOP_RETRAIN_CRON (default 03:00 UTC) OR on drift
    (AssetOrTimeSchedule): training_set → two_tower → ann_index, ranker → evaluation → register → gate
    → latency_gate → promote (skipped when a gate refuses: a refusal is not a failure; with online
    experiments on, promote starts an experiment instead, which online_experiment decides daily).

Drift triggers retraining through data-aware scheduling: `request_retraining` emits an event of the
asset `recloop://drift` only for the first day of a new drift episode, once per episode and champion,
and not within the cooldown (`recloop.lifecycle.plan_retraining`, the rule the Dagster sensor applies);
otherwise it is skipped and emits nothing. An asset rather than TriggerDagRunOperator: the training
DAG declares what it runs on (the cron or drift, in one `AssetOrTimeSchedule`), the data plane does not
need to know which DAG retrains, events arriving before the run starts are consumed by one run, and the
event history with its extras (episode key, champion version) is the record of what was requested.

Tasks retry with exponential backoff (RECLOOP_AIRFLOW_RETRIES, default 2; RECLOOP_AIRFLOW_RETRY_DELAY_S,
default 5 s, doubling). Bad data never retries: a failed schema check or validation fails its task at
once (AirflowFailException) after its `validation.failed` webhook. A training task that fails for good
sends `retraining.failed`; drift sends `drift.detected`, the gate `model.promoted` / `model.refused`:
the same signed webhooks, keys and payloads as the Dagster code location (`recloop.alerts`).
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, time, timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronDataIntervalTimetable,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from recloop import lifecycle, partition_range
from recloop.config import Settings
from recloop.data.schemas import SERVED_TABLES, TABLE_ORDER

log = logging.getLogger(__name__)

# Events of this asset ask for a retraining; extras: key (drift-<day>-champion-<version>), partition,
# champion_version.
DRIFT = Asset(name="recloop_drift", uri="recloop://drift", group="recloop")
TRAINING_DAG = "recloop_training"

_SETTINGS = Settings.from_env()
# The first daily partition, where the data starts (`recloop.partition_range`: the earliest day with events
# in the landing zone, or RECLOOP_PARTITION_START): the same first day as the Dagster code location's.
START = datetime.combine(partition_range.resolve(_SETTINGS).first, time(), tzinfo=UTC)
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "recloop",
    # Transient failures (a busy S3, a locked SQLite file) deserve a retry; a retry never duplicates data
    # because every partition write replaces the partition.
    "retries": int(os.environ.get("RECLOOP_AIRFLOW_RETRIES") or 2),
    "retry_delay": timedelta(seconds=float(os.environ.get("RECLOOP_AIRFLOW_RETRY_DELAY_S") or 5)),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


def _lake(uri: str):
    """The lake (or landing zone) at `uri`: a folder, or S3 through the deployment's endpoint."""
    from recloop.lake import open_lake

    return open_lake(uri, s3_endpoint_url=Settings.from_env().s3_endpoint_url)


def _registry():
    from recloop.registry import open_registry

    return open_registry(Settings.from_env())


def _workdir():
    from recloop import model_plane

    path = model_plane.workdir_for(Settings.from_env())
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_id() -> str:
    return str(get_current_context()["run_id"])


# --------------------------------------------------------------------------------------------------
# recloop_data_plane
# --------------------------------------------------------------------------------------------------


@task
def partition() -> str:
    """The day this run processes: the `partition` param if given, else the run's logical date (UTC)."""
    ctx = get_current_context()
    given = ctx["params"].get("partition")
    logical = ctx.get("logical_date")
    if logical is None and not given:
        raise AirflowFailException("this run has no logical date: trigger it with a date or the `partition` param")
    day = str(given) if given else logical.astimezone(UTC).date().isoformat()
    try:  # the same range as the Dagster code location's daily partitions; one sentence when outside it
        return partition_range.resolve().check(day, what="partition")
    except ValueError as err:
        raise AirflowFailException(str(err)) from None


@task
def feast_apply() -> dict[str, Any]:
    """`feast apply` of feature_repo/ (idempotent): the registry materialization needs."""
    return lifecycle.jsonable(lifecycle.apply_feature_repo(Settings.from_env()))


@task
def ingest(table: str, day: str) -> dict[str, Any]:
    """The day's landing files of `table` into bronze/ (every column as text, read errors kept)."""
    s = Settings.from_env()
    return lifecycle.jsonable(lifecycle.ingest(table, day, landing=_lake(s.landing_uri), lake=_lake(s.lake_uri)))


@task
def check_schema(table: str, day: str) -> dict[str, Any]:
    """GX schema-level expectations on bronze; a failure alerts and stops the day (no retry)."""
    s = Settings.from_env()
    check = lifecycle.check_schema(_lake(s.lake_uri), table, day, expectations_dir=s.expectations_dir, run_id=_run_id())
    lifecycle.send_alert(check.alert, logger=log)
    if not check.passed:
        raise AirflowFailException(f"{table} of {day} failed its schema check: {check.description}")
    return lifecycle.jsonable(check.summary())


@task
def validate(table: str, day: str) -> dict[str, Any]:
    """GX row-level expectations: accepted rows into silver/, the others into quarantine/ with their
    reasons; rows lost or a quarantine rate above the maximum alert and stop the day (no retry)."""
    s = Settings.from_env()
    outcome = lifecycle.validate(_lake(s.lake_uri), table, day, expectations_dir=s.expectations_dir,
                                 max_quarantine_rate=s.max_quarantine_rate, run_id=_run_id())
    summary = lifecycle.jsonable(outcome.summary())
    log.info("validated %s of %s: %s", table, day, summary)
    lifecycle.send_alert(outcome.alert, logger=log)
    if not outcome.passed:
        raise AirflowFailException(f"{table} of {day} failed validation: {outcome.problem}")
    return summary


@task
def join_served(day: str) -> dict[str, Any]:
    """The day's served negatives (accepted impressions without feedback) appended to silver/events, after
    the events are validated (`recloop.served`)."""
    out = lifecycle.join_served(_lake(Settings.from_env().lake_uri), day)
    log.info("served join of %s: %s", day, out)
    return lifecycle.jsonable(out)


@task
def impression_outcomes(day: str) -> dict[str, Any]:
    """silver/impression_outcomes of the day: every impression with its feedback's outcome."""
    return lifecycle.jsonable(lifecycle.impression_outcomes(_lake(Settings.from_env().lake_uri), day))


@task
def served_traffic(day: str) -> dict[str, Any]:
    """What was served on the day (concentration, coverage, categories) against the days before; a breach
    is sent as `drift.detected` on online/served_traffic (docs/online.md)."""
    outcome = lifecycle.served_traffic_step(_lake(Settings.from_env().lake_uri), day)
    if outcome.alert is not None:
        lifecycle.send_alert(outcome.alert, logger=log)
    return lifecycle.jsonable(outcome.summary())


@task
def online_experiment(day: str) -> dict[str, Any]:
    """The daily look at the running online experiment: promote, stop or continue (docs/online.md)."""
    outcome = lifecycle.online_experiment_step(_lake(Settings.from_env().lake_uri), _registry(), as_of=day, run_id=_run_id())
    if outcome.alert is not None:
        lifecycle.send_alert(outcome.alert, logger=log)
    return lifecycle.jsonable(outcome.summary())


@task
def compute_features(day: str) -> dict[str, Any]:
    """Every feature view's point-in-time snapshot of the day (DuckDB; Feast's offline source)."""
    return lifecycle.jsonable(lifecycle.compute_features(_lake(Settings.from_env().lake_uri), day))


@task
def materialize_online(day: str) -> dict[str, Any]:
    """The day's snapshot into Feast's online store (an older day than the store holds is skipped)."""
    s = Settings.from_env()
    return lifecycle.jsonable(lifecycle.materialize_online(s, [day], lake=_lake(s.lake_uri)))


@task
def drift(day: str) -> dict[str, Any]:
    """Evidently drift report of the day against the champion's training window; `drift.detected` on the
    first day of a drift episode."""
    outcome = lifecycle.drift_report(_lake(Settings.from_env().lake_uri), _registry(), day)
    log.info("drift of %s: %s", day, outcome.explanation)
    lifecycle.send_alert(outcome.alert, logger=log)
    return lifecycle.jsonable(outcome.record())


@task(inlets=[DRIFT], outlets=[DRIFT])
def request_retraining(report: dict[str, Any]) -> dict[str, Any]:
    """Emits a `recloop://drift` event (which schedules recloop_training) when the day opens a new drift
    episode, unless that episode and champion were requested already or a request falls within the
    cooldown; skipped otherwise, which emits nothing."""
    if not report.get("new_episode"):
        raise AirflowSkipException(f"no new drift episode: {report.get('status')}")
    ctx = get_current_context()
    earlier = list(ctx["inlet_events"][DRIFT])
    since = datetime.now(UTC) - lifecycle.retrain_cooldown()
    recent = next((f"{e.source_dag_id}/{e.source_run_id} at {e.timestamp.isoformat()}" for e in reversed(earlier)
                   if e.timestamp >= since), None)
    plan = lifecycle.plan_retraining([report], recent_retraining=lambda: recent,
                                     already_requested={str((e.extra or {}).get("key")) for e in earlier})
    if not plan.requests:
        raise AirflowSkipException(plan.skip_reason)
    request = plan.requests[0]
    extra = {"key": request.key, "partition": request.partition, "champion_version": request.champion_version}
    ctx["outlet_events"][DRIFT].extra = extra
    log.info("retraining requested for the drift episode %s", request.key)
    return extra


@dag(
    dag_id="recloop_data_plane",
    schedule=CronDataIntervalTimetable("15 1 * * *", timezone="UTC"),
    start_date=START,
    catchup=False,
    max_active_runs=1,  # days in order: validation and features read the days before
    default_args=DEFAULT_ARGS,
    params={"partition": Param(None, type=["null", "string"],
                               description="Day to process (YYYY-MM-DD); default: the run's logical date.")},
    tags=["recloop", "data_plane"],
    doc_md=__doc__,
)
def recloop_data_plane() -> None:
    day = partition()
    applied = feast_apply()
    validated = {}
    for table in (*TABLE_ORDER, *SERVED_TABLES):
        ingested = ingest.override(task_id=f"ingest_{table}")(table, day)
        checked = check_schema.override(task_id=f"check_schema_{table}")(table, day)
        validated[table] = validate.override(task_id=f"validate_{table}")(table, day)
        ingested >> checked >> validated[table]
    # Events are checked against the users and videos accepted up to their day, then joined with the
    # day's accepted impressions (as in Dagster's silver/events).
    [validated["users"], validated["videos"], validated["impressions"]] >> validated["events"]
    joined = join_served(day)
    validated["events"] >> joined
    outcomes = impression_outcomes(day)
    joined >> outcomes
    outcomes >> [served_traffic(day), online_experiment(day)]
    features = compute_features(day)
    [*validated.values(), joined] >> features
    online = materialize_online(day)
    [applied, features] >> online
    report = drift(day)
    features >> report
    request_retraining(report)


recloop_data_plane()


# --------------------------------------------------------------------------------------------------
# recloop_training
# --------------------------------------------------------------------------------------------------


def _trigger(ctx: Any) -> tuple[str, str | None, str | None]:
    """(trigger, drift partition, champion version) of the run: drift, schedule or manual."""
    run_type = str(getattr(ctx.get("dag_run"), "run_type", "") or "")
    if run_type.startswith("asset"):
        events = list((ctx.get("triggering_asset_events") or {}).get(DRIFT, []))
        extra = dict(events[-1].extra) if events else {}
        return "drift", extra.get("partition"), extra.get("champion_version")
    return ("schedule" if run_type == "scheduled" else "manual"), None, None


def _retraining_failed(context: Any) -> None:
    """on_failure_callback of every training task (after its last retry): `retraining.failed`."""
    ti, run = context["ti"], context["dag_run"]
    trigger, drift_partition, version = _trigger(context)
    alert = lifecycle.retraining_failed_alert(
        job=TRAINING_DAG, run_id=run.run_id, run_label=run.run_id, trigger=trigger,
        failure=f"{ti.task_id}: {context.get('exception')}", steps_failed=[ti.task_id],
        partition=drift_partition, model_version=version)
    lifecycle.send_alert(alert, logger=log)


@task
def training_set() -> dict[str, Any]:
    """Impressions of the training window with labels and point-in-time features (Feast historical
    retrieval); the newest `test_days` validated days are held out."""
    s, p = Settings.from_env(), get_current_context()["params"]
    trigger, drift_partition, version = _trigger(get_current_context())
    log.info("training run triggered by %s%s", trigger, f" (drift of {drift_partition} on champion v{version})"
             if drift_partition else "")
    out = lifecycle.build_training_set(s, _lake(s.lake_uri), _workdir(), train_days=int(p["train_days"]),
                                       test_days=int(p["test_days"]),
                                       train_period=p.get("train_period") or None,
                                       test_period=p.get("test_period") or None)
    return lifecycle.jsonable({k: v for k, v in out.items() if k not in ("partitions", "features")})


@task
def two_tower() -> dict[str, Any]:
    """Two-tower retrieval on the window's positives (in-batch negatives, log-Q correction)."""
    from recloop import model_plane

    return lifecycle.jsonable(model_plane.train_retrieval(_lake(Settings.from_env().lake_uri), _workdir()))


@task
def ann_index() -> dict[str, Any]:
    """FAISS index over the video embeddings; recall@100 against exact search."""
    from recloop import model_plane

    return lifecycle.jsonable(model_plane.build_ann_index(_workdir()))


@task
def ranker() -> dict[str, Any]:
    """Candidate sources on time folds, the LambdaRank ranker on their lists (Feast point-in-time
    features), the bundle."""
    out = lifecycle.train_ranking(Settings.from_env(), _workdir())
    return lifecycle.jsonable({k: v for k, v in out.items() if k not in ("features", "importance")})


@task
def evaluation() -> dict[str, Any]:
    """Held-out days, full ranking, watched videos excluded: the candidate and its sources beside
    popularity, ALS, EASE and the current champion on the same split."""
    s = Settings.from_env()
    out = lifecycle.evaluate_candidate(_lake(s.lake_uri), _registry(), _workdir(), settings=s)
    for alert in lifecycle.corrupt_model_alerts(out):  # a corrupt champion: skipped, and said once
        lifecycle.send_alert(alert, logger=log)
    return lifecycle.jsonable(out)


@task
def register() -> dict[str, Any]:
    """The candidate as one MLflow run and a registered version, alias `challenger`."""
    return lifecycle.register_candidate(_registry(), _workdir())


def _gate_config() -> Any:
    p = get_current_context()["params"]
    return lifecycle.gate_config(min_improvement=p["min_improvement"],
                                 max_identical_list_share=p["max_identical_list_share"])


@task
def gate() -> dict[str, Any]:
    """The promotion gate; a refusal is recorded in the registry and sent as `model.refused`."""
    outcome = lifecycle.check_gate(_registry(), _workdir(), config=_gate_config(), run_id=_run_id())
    log.info("gate for version %s: %s", outcome.version, outcome.decision.reasons[0])
    lifecycle.send_alert(outcome.alert, logger=log)
    return lifecycle.jsonable(outcome.summary())


@task
def latency_gate(decision: dict[str, Any]) -> dict[str, Any]:
    """The latency gate (docs/latency.md): sampled real requests replayed against the candidate's and the
    champion's bundles in a separate process; a refusal is recorded and sent as `model.refused`."""
    if not decision["promote"]:
        raise AirflowSkipException(f"version {decision['version']} refused by the gate: {decision['reasons'][0]}")
    outcome = lifecycle.check_latency(_registry(), _workdir(), gate=_gate_config(), run_id=_run_id())
    log.info("latency gate for version %s: %s", outcome.version, outcome.status)
    lifecycle.send_alert(outcome.alert, logger=log)
    return lifecycle.jsonable({**outcome.summary(), "promote": outcome.passed})


@task
def promote(decision: dict[str, Any]) -> dict[str, Any]:
    """Alias `champion` to the version both gates passed (or, with online experiments on, alias
    `experiment`: docs/online.md), the decision recorded, `model.promoted` sent; skipped when a gate refused."""
    if not decision["promote"]:
        raise AirflowSkipException(f"version {decision['version']} refused: {decision['reasons'][0]}")
    promotion = lifecycle.promote_candidate(_registry(), _workdir(), config=_gate_config(), run_id=_run_id())
    if promotion.alert is not None:
        lifecycle.send_alert(promotion.alert, logger=log)
    return lifecycle.jsonable(promotion.summary())


_CRON, _TIMEZONE = lifecycle.retrain_schedule()


@dag(
    dag_id=TRAINING_DAG,
    # The cadence is the floor; drift (an event of recloop://drift) retrains in between.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(_CRON, timezone=_TIMEZONE), assets=DRIFT),
    start_date=START,
    catchup=False,
    max_active_runs=1,  # one candidate at a time: the cycle's working folder is shared
    is_paused_upon_creation=False,  # like Dagster's retraining schedule and drift sensor: on by default
    default_args={**DEFAULT_ARGS, "on_failure_callback": _retraining_failed},
    params={
        "train_days": Param(7, type="integer", minimum=1, description="Validated days the candidate trains on."),
        "test_days": Param(1, type="integer", minimum=1, description="Newest validated days held out."),
        "train_period": Param(None, type=["null", "string"], description=(
            "Instead of train_days: the calendar period to train on, e.g. 90d, 6m, 1y, or 'all'.")),
        "test_period": Param(None, type=["null", "string"], description=(
            "Instead of test_days: the newest calendar period held out, e.g. 14d, 2w, 1m.")),
        "min_improvement": Param(0.02, type="number", description="Relative NDCG@10 margin over the champion."),
        "max_identical_list_share": Param(0.5, type="number", description="Largest share of identical lists."),
    },
    tags=["recloop", "models"],
    doc_md=__doc__,
)
def recloop_training() -> None:
    window = training_set()
    retrieval = two_tower()
    index = ann_index()
    ranking = ranker()
    window >> retrieval >> [index, ranking]
    evaluated = evaluation()
    [index, ranking] >> evaluated
    registered = register()
    evaluated >> registered
    decision = gate()
    registered >> decision
    promote(latency_gate(decision))


recloop_training()
