"""Online experiments and the served-traffic monitor: the daily look at the experiment between the
`champion` and `experiment` aliases (per-arm metrics, the sequential decision, the MLflow run in
recloop-online-experiments, the registry changed on a final outcome), and the day's served traffic
against its reference window (popularity concentration, coverage, category shares) with a WARN check
and a signed `drift.detected` webhook on a breach. Thin adapters over `recloop.lifecycle` and
`recloop.online` (docs/online.md); both read `silver/impression_outcomes`."""

from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.models import MlflowRegistryResource
from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import AlertsResource, LakeResource
from pipelines.defs.validation import silver_key
from recloop import lifecycle

EXPERIMENT = dg.AssetKey(["online", "experiment"])
SERVED_TRAFFIC = dg.AssetKey(["online", "served_traffic"])
TRAFFIC_CHECK = "served_traffic_within_bounds"
OUTCOMES = silver_key("impression_outcomes")


class ExperimentRunConfig(dg.Config):
    AsOf: str = Field(default="", description="Last day of data to decide on (YYYY-MM-DD); empty: the newest day.")
    Mode: str = Field(default="", description="ab or interleave; empty: detected from the impressions.")


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no traffic"
    keys = ["arm", "impressions", "users", "ctr", "ctr_low", "ctr_high", "watch_time", "watch_time_low",
            "watch_time_high", "completion_rate", "coverage"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows)])


@dg.asset(
    key=EXPERIMENT,
    group_name="online",
    deps=[OUTCOMES],
    kinds={"mlflow"},
    description=("The daily look at the online experiment (alias `experiment` against `champion`): per-arm CTR, watch "
                 "time per impression, completion rate and coverage with clustered 95% intervals (or the interleaving "
                 "win share), a mixture SPRT with always-valid p-values and a horizon. promote moves `champion`, "
                 "stop_* removes the alias, continue waits; every look is a run in recloop-online-experiments."),
)
def experiment(context: dg.AssetExecutionContext, config: ExperimentRunConfig, lake: LakeResource,
               registry: MlflowRegistryResource, alerts: AlertsResource) -> dg.MaterializeResult:
    the_registry = registry.open(context.run.run_id)
    outcome = lifecycle.online_experiment_step(lake.open(), the_registry, as_of=config.AsOf or None,
                                               mode=config.Mode or None, run_id=context.run.run_id)
    out = outcome.summary()
    run_url = the_registry.run_url(out["mlflow_run_id"])
    context.log.info(out["status"])
    alerts.send(context.log, outcome.alert)
    return dg.MaterializeResult(metadata={
        "outcome": out["outcome"],
        "experiment_id": out["experiment_id"],
        "version": out["version"],
        "champion_version": out["champion_version"],
        "applied": out["applied"],
        "mode": out["mode"],
        "metric": out["metric"],
        "p_value": out["p_value"] if out["p_value"] is not None else float("nan"),
        "arms": dg.MetadataValue.md(_markdown(out["arms"])),
        "arms_table": dg.MetadataValue.json(out["arms"]),
        "looks": dg.MetadataValue.json(out["looks"]),
        "reasons": dg.MetadataValue.json(out["reasons"]),
        "mlflow_run_id": out["mlflow_run_id"],
        **({"mlflow_run": dg.MetadataValue.url(run_url)} if run_url else {}),
        "lineage": dg.MetadataValue.json(out["lineage"]),
    })


def _served_traffic(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=SERVED_TRAFFIC,
        partitions_def=daily,
        group_name="online",
        deps=[OUTCOMES, silver_key("videos")],
        kinds={"python"},
        check_specs=[dg.AssetCheckSpec(TRAFFIC_CHECK, asset=SERVED_TRAFFIC, partitions_def=daily, description=(
            "Warns when the day's served traffic concentrated (Gini, top-1% share), lost coverage or moved between "
            "categories beyond the thresholds (RECLOOP_TRAFFIC_MAX_GINI_INCREASE and the others of docs/online.md) against the reference window."))],
        description=("What the recommender actually served on the day: Gini and top-1% share of impressions over the "
                     "catalogue, catalogue coverage, per-category shares, against the previous days (docs/online.md)."),
    )
    def served_traffic(context: dg.AssetExecutionContext, lake: LakeResource,
                       alerts: AlertsResource) -> dg.MaterializeResult:
        outcome = lifecycle.served_traffic_step(lake.open(), context.partition_key)
        alerts.send(context.log, outcome.alert)
        if outcome.report is None:
            context.log.info(outcome.status)
            return dg.MaterializeResult(
                metadata={"status": outcome.status, "breached": False},
                check_results=[dg.AssetCheckResult(check_name=TRAFFIC_CHECK, passed=True,
                                                   description=f"{context.partition_key}: {outcome.status}",
                                                   metadata={"partition": context.partition_key})])
        report = outcome.report
        return dg.MaterializeResult(
            metadata={
                **{k: float(v) for k, v in report.summary().items()},
                "breached": report.breached,
                "status": report.status,
                "category_share": dg.MetadataValue.json(report.stats.category_share),
                "reference_days": dg.MetadataValue.json(report.reference_days),
                "reasons": dg.MetadataValue.json(report.reasons),
            },
            check_results=[dg.AssetCheckResult(
                check_name=TRAFFIC_CHECK, passed=not report.breached, severity=dg.AssetCheckSeverity.WARN,
                description=f"{context.partition_key}: {report.status}",
                metadata={"partition": context.partition_key, "checks": dg.MetadataValue.json(report.checks)})],
        )

    return served_traffic


online_experiment_job = dg.define_asset_job(
    name="online_experiment_job",
    selection=dg.AssetSelection.keys(EXPERIMENT),
    description="Look at the running online experiment and promote, stop or continue it.",
    tags={"recloop/stage": "online"},
)


def served_traffic_job(daily: dg.PartitionsDefinition):
    return dg.define_asset_job(
        name="served_traffic_job",
        selection=dg.AssetSelection.keys(SERVED_TRAFFIC),
        partitions_def=daily,
        description="The day's served-traffic report against its reference window.",
        tags={"recloop/stage": "online"},
    )


online_experiment_schedule = dg.ScheduleDefinition(
    name="online_experiment_schedule",
    job=online_experiment_job,
    cron_schedule="30 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=("Every day at 06:30 UTC, once the data plane has joined the previous day's impressions with their "
                 "outcomes: the online experiment's daily look. Stopped by default (turn on with online experiments)."),
)


def served_traffic_schedule(job) -> dg.ScheduleDefinition:
    return dg.build_schedule_from_partitioned_job(
        job,
        name="served_traffic_schedule",
        hour_of_day=6,
        minute_of_hour=15,
        description="Every day at 06:15 UTC, the served-traffic report of the day that just ended. Stopped by default.",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    traffic_job = served_traffic_job(daily)
    return dg.Definitions(
        assets=[experiment, _served_traffic(daily)],
        jobs=[online_experiment_job, traffic_job],
        schedules=[online_experiment_schedule, served_traffic_schedule(traffic_job)],
    )
