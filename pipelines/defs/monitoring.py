"""The monitoring loop: a daily Evidently drift report against the champion's training window, a sensor
that turns a drifted partition into one retraining run, a cron schedule that retrains on a cadence, and
signed webhooks for drift, failed retraining (and, from the other stages, failed validation, promotion
and refusal). Thin adapters over `recloop.lifecycle` (drift episodes, the retraining decision, the alerts;
shared with the Airflow DAGs in dags/), `recloop.drift`, `recloop.alerts` and `recloop.registry`.

Drift comes in episodes: consecutive drifted days under one champion. The first day of an episode sends
the `drift.detected` alert and asks for one retraining run; the days after it are reported (metadata,
MLflow, the `no_drift` check) but do not page or retrain again. A retrained model goes through the same
promotion gate as any other: drift never bypasses it. A day compared with nothing (no champion yet, no
data, too few rows) has no `no_drift` verdict: the check is skipped, the asset's `status` says why.

The report opens in the MLflow UI (`report`, a link to the drift run's HTML artifact); the schedule and
the sensors start stopped unless RECLOOP_DAGSTER_AUTOMATION=on (`pipelines.defs.automation`).
"""

from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.automation import schedule_status, sensor_status
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
    # A multi-asset that may skip its check (`can_subset`): a day compared with nothing gets no verdict.
    @dg.multi_asset(
        name="monitoring__drift",
        specs=[dg.AssetSpec(
            DRIFT,
            group_name="monitoring",
            deps=[silver_key("events"), silver_key("users"), silver_key("videos"), *FEATURE_KEYS.values()],
            kinds={"evidently"},
            description=("Evidently drift report of the day against the champion's training window: feature drift per "
                         "column, prediction drift, popularity concentration, cold-start shares, user-embedding "
                         "shift. HTML in the lake and in the day's run of MLflow's recloop-monitoring experiment "
                         "(metadata `report` opens it), summary numbers as metadata."),
        )],
        partitions_def=daily,
        check_specs=[dg.AssetCheckSpec(NO_DRIFT_CHECK, asset=DRIFT, partitions_def=daily, description=(
            "Warns when the day's inputs, the champion's scores or the recommender signals drifted from the "
            "champion's training window. Skipped on a day compared with nothing (no champion yet, no validated "
            "events, too few rows): the asset's `status` says why."))],
        can_subset=True,
    )
    def drift_report(context: dg.AssetExecutionContext, config: DriftRunConfig, lake: LakeResource,
                     registry: MlflowRegistryResource, alerts: AlertsResource):
        partition = context.partition_key
        the_registry = registry.open(context.run.run_id)
        outcome = lifecycle.drift_report(lake.open(), the_registry, partition, config_path=config.ConfigPath)
        if outcome.alert is not None:  # drift.detected, or a corrupt champion's model.corrupt
            alerts.send(context.log, outcome.alert)
        if not outcome.compared:
            context.log.info(f"no_drift skipped for {partition}: {outcome.nothing_compared}")
        elif outcome.drifted:
            context.log.info(outcome.status)
        links = lifecycle.drift_links(the_registry, outcome)
        if DRIFT in context.selected_asset_keys:
            yield dg.MaterializeResult(asset_key=DRIFT, metadata=_drift_metadata(outcome, links))
        check = dg.AssetCheckKey(DRIFT, NO_DRIFT_CHECK)
        if outcome.compared and check in context.selected_asset_check_keys:
            yield dg.AssetCheckResult(
                asset_key=DRIFT, check_name=NO_DRIFT_CHECK, passed=not outcome.drifted,
                severity=dg.AssetCheckSeverity.WARN, description=f"{partition}: {outcome.explanation}",
                metadata={"partition": partition, "champion_version": outcome.champion_version or "",
                          "columns_tested": outcome.summary.get("columns.tested", 0.0),
                          "columns_drifted": outcome.summary.get("columns.drifted", 0.0),
                          **_urls(links)},
            )

    return drift_report


def _urls(links: dict[str, str]) -> dict[str, Any]:
    """`report_url` / `mlflow_run_url` as clickable Dagster metadata `report` / `mlflow_run`."""
    names = {"report_url": "report", "mlflow_run_url": "mlflow_run"}
    return {names[k]: dg.MetadataValue.url(v) for k, v in links.items() if k in names}


def _drift_metadata(outcome: lifecycle.DriftOutcome, links: dict[str, str]) -> dict[str, Any]:
    if outcome.champion_version is None:  # no champion (or a corrupt one): nothing to compare with
        return {"drifted": False, "compared": False, "status": outcome.status}
    return {
        # The summary first: its numeric `drifted` (for plots) gives way to the boolean below.
        **{k: float(v) for k, v in outcome.summary.items()},
        "drifted": outcome.drifted,
        "compared": outcome.compared,
        "status": outcome.status if outcome.compared else outcome.nothing_compared,
        "drift_episode": outcome.drift_episode or "",
        "champion_version": outcome.champion_version,
        "reasons": dg.MetadataValue.json(outcome.reasons),
        "reference_partitions": dg.MetadataValue.json(outcome.reference_partitions),
        **_urls(links),
        "report_in_lake": _location(outcome.report_uri),
        "mlflow_run_id": outcome.mlflow_run_id or "",
    }


def _location(uri: str | None) -> Any:
    """A report's lake URI as Dagster metadata: a path for a local lake, the URI as text otherwise."""
    if not uri:
        return ""
    return uri if "://" in uri else dg.MetadataValue.path(uri)


def drift_retraining_sensor(status: dg.DefaultSensorStatus | None = None) -> dg.SensorDefinition:
    """Stopped unless automation is on (`pipelines.defs.automation`); `pipelines.run.tick_sensor` ticks it
    either way."""
    return dg.SensorDefinition(
        name="drift_retraining_sensor",
        evaluation_fn=_plan_drift_retraining,
        job=training_job,
        minimum_interval_seconds=60,
        default_status=status or sensor_status(),
        description=("Starts one training_job per drift episode (run key: first drifted partition + champion version, "
                     "so a re-evaluated tick never starts two), unless a drift-triggered run started within the "
                     f"cooldown (${COOLDOWN_ENV}, default 24 h). The new model still has to pass the promotion gate."),
    )


def _plan_drift_retraining(context: dg.SensorEvaluationContext) -> dg.SensorResult:
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


def retraining_schedule(status: dg.DefaultScheduleStatus | None = None) -> dg.ScheduleDefinition:
    """training_job on a cadence: the floor under drift-triggered retraining (daily at 03:00 UTC unless
    RECLOOP_RETRAIN_CRON / RECLOOP_RETRAIN_TIMEZONE say otherwise); stopped unless automation is on."""
    cron, timezone = lifecycle.retrain_schedule()
    return dg.ScheduleDefinition(
        name="retraining_schedule",
        job=training_job,
        cron_schedule=cron,
        execution_timezone=timezone,
        tags={TRIGGER_TAG: "schedule"},
        default_status=status or schedule_status(),
        description=f"Retrain, evaluate and gate a new champion on a cadence ({cron}, {timezone}).",
    )


def retraining_failure_alerts(status: dg.DefaultSensorStatus | None = None) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name="retraining_failure_alerts",
        monitored_jobs=[training_job],
        default_status=status or sensor_status(),
        description="A `retraining.failed` webhook for every failed training run (a promotion refusal is not a "
                    "failure: the gate sends `model.refused`).",
    )
    def retraining_failure_alerts(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
        _alert_failed_retraining(context, alerts)

    return retraining_failure_alerts


def _alert_failed_retraining(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
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
        sensors=[drift_retraining_sensor(), retraining_failure_alerts()],
    )
