"""The monitoring loop: a daily Evidently drift report against the champion's training window, a sensor
that turns a drifted partition into one retraining run, a cron schedule that retrains on a cadence, and
signed webhooks for drift, failed retraining (and, from the other stages, failed validation, promotion
and refusal). Thin adapters over `recloop.drift`, `recloop.alerts` and `recloop.registry`.

Drift comes in episodes: consecutive drifted days under one champion. The first day of an episode sends
the `drift.detected` alert and asks for one retraining run; the days after it are reported (metadata,
MLflow, the `no_drift` check) but do not page or retrain again. A retrained model goes through the same
promotion gate as any other: drift never bypasses it.
"""

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.features import FEATURE_KEYS
from pipelines.defs.models import GATE_CHECK, MlflowRegistryResource, training_job
from pipelines.defs.partitions import DAILY
from pipelines.defs.resources import AlertsResource, LakeResource
from pipelines.defs.validation import silver_key
from pipelines.run import metadata_values, root_cause

DRIFT = dg.AssetKey(["monitoring", "drift"])
NO_DRIFT_CHECK = "no_drift"
TRIGGER_TAG = "recloop/trigger"

# Sensor and schedule settings come from the environment: they are read when the code location loads
# (a sensor has no run config), and a deployment changes them without a code change.
COOLDOWN_ENV = "RECLOOP_RETRAIN_COOLDOWN_HOURS"
CRON_ENV = "RECLOOP_RETRAIN_CRON"
TIMEZONE_ENV = "RECLOOP_RETRAIN_TIMEZONE"


class DriftRunConfig(dg.Config):
    ConfigPath: str | None = Field(default=None, description="Drift methods/thresholds file (default monitoring/drift.yaml).")


def _drift_of(instance: dg.DagsterInstance, partition: str) -> dict[str, Any] | None:
    """The metadata of the latest drift report of `partition`, or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=DRIFT, asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    return metadata_values(records[0].asset_materialization.metadata)


def episode_start(instance: dg.DagsterInstance, partition: str, champion_version: str) -> str:
    """The first day of the drift episode `partition` belongs to: the previous day's episode when that
    day drifted against the same champion, else `partition` itself."""
    previous = (datetime.fromisoformat(partition) - timedelta(days=1)).date().isoformat()
    before = _drift_of(instance, previous)
    if before and before.get("drifted") and str(before.get("champion_version")) == champion_version:
        return str(before.get("drift_episode") or previous)
    return partition


@dg.asset(
    key=DRIFT,
    partitions_def=DAILY,
    group_name="monitoring",
    deps=[silver_key("events"), silver_key("users"), silver_key("videos"), *FEATURE_KEYS.values()],
    kinds={"evidently"},
    check_specs=[dg.AssetCheckSpec(NO_DRIFT_CHECK, asset=DRIFT, description=(
        "Warns when the day's inputs, the champion's scores or the recommender signals drifted from the "
        "champion's training window."))],
    description=("Evidently drift report of the day against the champion's training window: feature drift per "
                 "column, prediction drift, popularity concentration, cold-start shares, user-embedding shift. "
                 "HTML in the lake, summary numbers as metadata, a run in MLflow's recloop-monitoring experiment."),
)
def drift_report(context: dg.AssetExecutionContext, config: DriftRunConfig, lake: LakeResource,
                 registry: MlflowRegistryResource, alerts: AlertsResource) -> dg.MaterializeResult:
    from recloop import drift
    from recloop.pipeline import load_bundle

    partition = context.partition_key
    reg = registry.open()
    champion = reg.champion()
    if champion is None:
        status = "no champion yet: no training window to compare with (the retraining schedule trains the first)"
        context.log.info(status)
        return dg.MaterializeResult(
            metadata={"drifted": False, "status": status},
            check_results=[dg.AssetCheckResult(check_name=NO_DRIFT_CHECK, passed=True, description=status)],
        )
    version = str(champion.version)
    bundle = reg.bundle_path(version)
    the_lake = lake.open()
    reference = drift.champion_reference(bundle)
    result = drift.detect_drift(the_lake, partition, reference,
                                config=drift.DriftConfig.load(config.ConfigPath),
                                champion=load_bundle(bundle, lake=the_lake))
    episode = episode_start(context.instance, partition, version) if result.drifted else None
    html = the_lake.read_bytes(drift.report_key(partition)).decode() if result.report_uri else None
    run_id = reg.log_drift_report(partition=partition, model_version=version, drifted=result.drifted,
                                  summary=result.summary, report_uri=result.report_uri, report_html=html,
                                  reasons=result.reasons)
    explanation = "; ".join(result.reasons) or "no drift"
    if result.drifted and episode == partition:
        alerts.send(context.log, "drift.detected", key=f"{partition}/champion-{version}",
                    text=(f":warning: recloop: drift on {partition} against champion v{version}'s training window: "
                          + "; ".join(result.reasons[:3])),
                    asset=DRIFT.to_user_string(), partition=partition, model_version=version,
                    numbers=result.summary, report_url=result.report_uri,
                    details={"reasons": result.reasons, "reference_partitions": reference, "mlflow_run_id": run_id})
    elif result.drifted:
        context.log.info(f"drift continues the episode that started on {episode}: no new alert or retraining")
    return dg.MaterializeResult(
        metadata={
            # The summary first: its numeric `drifted` (for plots) gives way to the boolean below.
            **{k: float(v) for k, v in result.summary.items()},
            "drifted": result.drifted,
            "drift_episode": episode or "",
            "champion_version": version,
            "reasons": dg.MetadataValue.json(result.reasons),
            "reference_partitions": dg.MetadataValue.json(reference),
            "report": _link(result.report_uri),
            "mlflow_run_id": run_id,
        },
        check_results=[dg.AssetCheckResult(
            check_name=NO_DRIFT_CHECK, passed=not result.drifted, severity=dg.AssetCheckSeverity.WARN,
            description=explanation, metadata={"report": result.report_uri or ""},
        )],
    )


def _link(uri: str | None) -> Any:
    """A report's lake URI as Dagster metadata: a link for s3://…, a path for a local lake."""
    if not uri:
        return ""
    return dg.MetadataValue.url(uri) if "://" in uri else dg.MetadataValue.path(uri)


def _cooldown() -> timedelta:
    return timedelta(hours=float(os.environ.get(COOLDOWN_ENV, "24")))


@dg.sensor(
    name="drift_retraining_sensor",
    job=training_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=("Starts one training_job per drift episode (run key: first drifted partition + champion version, so "
                 "a re-evaluated tick never starts two), unless a drift-triggered run started within the cooldown "
                 f"(${COOLDOWN_ENV}, default 24 h). The new model still has to pass the promotion gate."),
)
def drift_retraining_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=DRIFT, after_storage_id=after), limit=1000, ascending=True
    ).records
    requests, skipped = [], []
    for record in records:
        mat = record.asset_materialization
        meta = metadata_values(mat.metadata if mat else None)
        partition = mat.partition if mat else None
        if not meta.get("drifted") or meta.get("drift_episode") != partition:
            continue
        version = str(meta.get("champion_version"))
        if requests:  # one retraining covers every episode seen in this tick
            skipped.append(f"{partition}: covered by the retraining requested for {requests[0].tags['recloop/drift_partition']}")
            continue
        recent = _recent_drift_run(context.instance)
        if recent is not None:
            skipped.append(f"{partition}: a drift-triggered run ({recent}) started within the cooldown of {_cooldown()}")
            continue
        requests.append(dg.RunRequest(
            run_key=f"drift-{partition}-champion-{version}",
            tags={TRIGGER_TAG: "drift", "recloop/drift_partition": partition, "recloop/champion_version": version},
        ))
    cursor = str(records[-1].storage_id) if records else context.cursor
    if not requests:
        return dg.SensorResult(skip_reason="; ".join(skipped) or "no new drift episode", cursor=cursor)
    for reason in skipped:
        context.log.info(reason)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def _recent_drift_run(instance: dg.DagsterInstance) -> str | None:
    """The id of a drift-triggered training run created within the cooldown, if any."""
    since = datetime.now(UTC) - _cooldown()
    runs = instance.get_run_records(
        filters=dg.RunsFilter(job_name=training_job.name, tags={TRIGGER_TAG: "drift"}, created_after=since), limit=1
    )
    return runs[0].dagster_run.run_id if runs else None


def retraining_schedule() -> dg.ScheduleDefinition:
    """training_job on a cadence: the floor under drift-triggered retraining (daily at 03:00 UTC unless
    RECLOOP_RETRAIN_CRON / RECLOOP_RETRAIN_TIMEZONE say otherwise)."""
    cron = os.environ.get(CRON_ENV, "0 3 * * *")
    timezone = os.environ.get(TIMEZONE_ENV, "UTC")
    return dg.ScheduleDefinition(
        name="retraining_schedule",
        job=training_job,
        cron_schedule=cron,
        execution_timezone=timezone,
        tags={TRIGGER_TAG: "schedule"},
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Retrain, evaluate and gate a new champion on a cadence ({cron}, {timezone}).",
    )


@dg.run_failure_sensor(
    name="retraining_failure_alerts",
    monitored_jobs=[training_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A `retraining.failed` webhook for every failed training run (a promotion refusal is not a failure: "
                "the gate sends `model.refused`).",
)
def retraining_failure_alerts(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
    run = context.dagster_run
    if _gate_refused(context.instance, run.run_id):
        return
    steps = context.get_step_failure_events()
    failure = "; ".join(f"{e.step_key}: {root_cause(e.step_failure_data.error)}" for e in steps
                        if e.step_failure_data and e.step_failure_data.error) or (
        context.failure_event.message if context.failure_event else "run failed")
    alerts.send(context.log, "retraining.failed", key=f"run-{run.run_id}",
                text=f":x: recloop: retraining run {run.run_id[:8]} ({run.tags.get(TRIGGER_TAG, 'manual')}) failed: {failure}",
                asset=training_job.name, partition=run.tags.get("recloop/drift_partition"),
                model_version=run.tags.get("recloop/champion_version"),
                details={"run_id": run.run_id, "trigger": run.tags.get(TRIGGER_TAG, "manual"),
                         "steps_failed": [e.step_key for e in steps]})


def _gate_refused(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether the run's promotion gate evaluated and failed (a refusal, already alerted)."""
    logs = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return any(
        e.dagster_event is not None and e.dagster_event.event_specific_data.check_name == GATE_CHECK
        and not e.dagster_event.event_specific_data.passed
        for e in logs
    )


drift_job = dg.define_asset_job(
    name="drift_job",
    selection=dg.AssetSelection.keys(DRIFT),
    partitions_def=DAILY,
    description="Re-run the day's drift report (the data plane job ends with it).",
    tags={"recloop/stage": "monitoring"},
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        assets=[drift_report],
        jobs=[drift_job],
        schedules=[retraining_schedule()],
        sensors=[drift_retraining_sensor, retraining_failure_alerts],
    )
