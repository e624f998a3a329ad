"""The monitoring loop: a daily Evidently drift report against the champion's training window, a sensor
that turns a drifted partition into one retraining run, a cron schedule that retrains on a cadence, and
signed webhooks for drift, failed retraining (and, from the other stages, failed validation, promotion
and refusal). Thin adapters over `recloop.lifecycle` (drift episodes, the retraining decision, the alerts;
shared with the Airflow DAGs in dags/), `recloop.drift`, `recloop.alerts` and `recloop.registry`.

Drift comes in episodes: consecutive drifted days under one champion. The first day of an episode sends
the `drift.detected` alert and asks for one retraining run; the days after it are reported (metadata,
MLflow, the `no_drift` check) but do not page or retrain again. A retrained model goes through the same
promotion gate as any other: drift never bypasses it.
"""

from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.features import FEATURE_KEYS
from pipelines.defs.models import GATE_CHECK, MlflowRegistryResource, training_job
from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import AlertsResource, LakeResource
from pipelines.defs.validation import silver_key
from pipelines.run import metadata_values, root_cause
from recloop import lifecycle
from recloop.lifecycle import COOLDOWN_ENV

DRIFT = dg.AssetKey(["monitoring", "drift"])
NO_DRIFT_CHECK = "no_drift"
TRIGGER_TAG = "recloop/trigger"

# Sensor and schedule settings come from the environment (`recloop.lifecycle.retrain_cooldown`,
# `retrain_schedule`): a sensor has no run config, and a deployment changes them without a code change.


class DriftRunConfig(dg.Config):
    ConfigPath: str | None = Field(default=None, description="Drift methods/thresholds file (default monitoring/drift.yaml).")


def _drift_report(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=DRIFT,
        partitions_def=daily,
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
        reg = registry.open(context.run.run_id)
        outcome = lifecycle.drift_report(lake.open(), reg, context.partition_key, config_path=config.ConfigPath)
        if outcome.champion_version is None:
            context.log.info(outcome.status)
            alerts.send(context.log, outcome.alert)  # a corrupt champion's model.corrupt (else None: nothing)
            return dg.MaterializeResult(
                metadata={"drifted": False, "status": outcome.status},
                check_results=[dg.AssetCheckResult(check_name=NO_DRIFT_CHECK, passed=True, description=outcome.status)],
            )
        if outcome.alert is not None:
            alerts.send(context.log, outcome.alert)
        elif outcome.drifted:
            context.log.info(outcome.status)
        return dg.MaterializeResult(
            metadata={
                # The summary first: its numeric `drifted` (for plots) gives way to the boolean below.
                **{k: float(v) for k, v in outcome.summary.items()},
                "drifted": outcome.drifted,
                "drift_episode": outcome.drift_episode or "",
                "champion_version": outcome.champion_version,
                "reasons": dg.MetadataValue.json(outcome.reasons),
                "reference_partitions": dg.MetadataValue.json(outcome.reference_partitions),
                "report": _link(outcome.report_uri),
                "mlflow_run_id": outcome.mlflow_run_id,
                **({"mlflow_run_url": dg.MetadataValue.url(reg.run_url(outcome.mlflow_run_id))}
                   if outcome.mlflow_run_id else {}),
            },
            check_results=[dg.AssetCheckResult(
                check_name=NO_DRIFT_CHECK, passed=not outcome.drifted, severity=dg.AssetCheckSeverity.WARN,
                description=outcome.explanation, metadata={"report": outcome.report_uri or ""},
            )],
        )

    return drift_report


def _link(uri: str | None) -> Any:
    """A report's lake URI as Dagster metadata: a link for s3://…, a path for a local lake."""
    if not uri:
        return ""
    return dg.MetadataValue.url(uri) if "://" in uri else dg.MetadataValue.path(uri)


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
    reports = [{**metadata_values(r.asset_materialization.metadata), "partition": r.asset_materialization.partition}
               for r in records if r.asset_materialization is not None]
    # A run key already used is dropped by the daemon: `already_requested` is left to it.
    plan = lifecycle.plan_retraining(reports, recent_retraining=lambda: _recent_drift_run(context.instance))
    cursor = str(records[-1].storage_id) if records else context.cursor
    if not plan.requests:
        return dg.SensorResult(skip_reason=plan.skip_reason, cursor=cursor)
    for reason in plan.skipped:
        context.log.info(reason)
    return dg.SensorResult(cursor=cursor, run_requests=[
        dg.RunRequest(run_key=r.key, tags={TRIGGER_TAG: "drift", "recloop/drift_partition": r.partition,
                                            "recloop/champion_version": r.champion_version})
        for r in plan.requests
    ])


def _recent_drift_run(instance: dg.DagsterInstance) -> str | None:
    """The id of a drift-triggered training run created within the cooldown, if any."""
    since = datetime.now(UTC) - lifecycle.retrain_cooldown()
    runs = instance.get_run_records(
        filters=dg.RunsFilter(job_name=training_job.name, tags={TRIGGER_TAG: "drift"}, created_after=since), limit=1
    )
    return runs[0].dagster_run.run_id if runs else None


def retraining_schedule() -> dg.ScheduleDefinition:
    """training_job on a cadence: the floor under drift-triggered retraining (daily at 03:00 UTC unless
    RECLOOP_RETRAIN_CRON / RECLOOP_RETRAIN_TIMEZONE say otherwise)."""
    cron, timezone = lifecycle.retrain_schedule()
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
    alerts.send(context.log, lifecycle.retraining_failed_alert(
        job=training_job.name, run_id=run.run_id, trigger=run.tags.get(TRIGGER_TAG, "manual"), failure=failure,
        steps_failed=[e.step_key for e in steps if e.step_key], partition=run.tags.get("recloop/drift_partition"),
        model_version=run.tags.get("recloop/champion_version"),
    ))


def _gate_refused(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether the run's promotion gate evaluated and failed (a refusal, already alerted)."""
    logs = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return any(
        e.dagster_event is not None and e.dagster_event.event_specific_data.check_name == GATE_CHECK
        and not e.dagster_event.event_specific_data.passed
        for e in logs
    )


def drift_job(daily: dg.PartitionsDefinition):
    return dg.define_asset_job(
        name="drift_job",
        selection=dg.AssetSelection.keys(DRIFT),
        partitions_def=daily,
        description="Re-run the day's drift report (the data plane job ends with it).",
        tags={"recloop/stage": "monitoring"},
    )


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    return dg.Definitions(
        assets=[_drift_report(daily)],
        jobs=[drift_job(daily)],
        schedules=[retraining_schedule()],
        sensors=[drift_retraining_sensor, retraining_failure_alerts],
    )
