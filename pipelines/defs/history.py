"""History: a range of days through the data plane in ONE run (`history_job`), for imported histories
(`recloop import`) and `recloop run --start --end`.

The daily assets run one day per run, and Dagster records an event per partition and asset: thousands of
days would mean thousands of runs (or tens of thousands of events in one ranged run, ~20 ms each in the
embedded SQLite instance). These assets are not partitioned: one materialization covers a range of days,
written to the very same lake datasets, one partition per day, exactly as the daily assets write them
(`recloop.lifecycle`'s range steps; tests/unit/test_history.py compares them with the daily path):

    history/bronze + history/silver  ingest every landed day, GX schema check (blocking), GX row-level
                                     expectations in one pass per table → silver/ and quarantine/ per day
                                     (checks: row_conservation, quarantine_rate; blocking)
    history/features                 the feature snapshots of every day with events and the day before each
    history/online_features          the newest snapshot into Feast's online store (after feast/registry)

The range comes from the `history_range` resource (`first`/`last`, YYYY-MM-DD): empty means the landing
zone's first and last day with events. `recloop import` and `recloop run --start --end` set it per run;
in the UI, set it in the Launchpad (resources → history_range) or leave it empty.
Drift reports are not made for history days: they compare a day with the champion's training window,
which is daily operation (`recloop drift --start … --end …` makes them on demand).
"""

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.features import FEAST_REGISTRY
from pipelines.defs.resources import AlertsResource, FeastResource, GreatExpectationsResource, LakeResource
from recloop import lifecycle, progress
from recloop.data.schemas import TABLE_ORDER

HISTORY_BRONZE = dg.AssetKey(["history", "bronze"])
HISTORY_SILVER = dg.AssetKey(["history", "silver"])
HISTORY_FEATURES = dg.AssetKey(["history", "features"])
HISTORY_ONLINE = dg.AssetKey(["history", "online_features"])


class HistoryRangeResource(dg.ConfigurableResource):
    """The range of days a history run processes; empty = the landing zone's first/last day with events."""

    first: str = Field(default="", description="First day (YYYY-MM-DD); empty: the first day the landing zone holds events for.")
    last: str = Field(default="", description="Last day (YYYY-MM-DD); empty: the last day the landing zone holds events for.")

    def resolve(self, landing: LakeResource) -> tuple[str, str]:
        return lifecycle.history_range(landing.open(), self.first or None, self.last or None)


def _log_progress(context: dg.AssetExecutionContext | dg.OpExecutionContext):
    """Progress lines in the run's log, unless a command (recloop import) draws its own bars."""
    return progress.unless_reporting(progress.LogReporter(context.log))


@dg.multi_asset(
    name="history_bronze_silver",
    specs=[
        dg.AssetSpec(HISTORY_BRONZE, group_name="history", kinds={"parquet"}, description=(
            "Every landed day of the range in bronze/<table>/date=D (as the daily bronze assets write it): "
            "one pass over the landing zone, one ingestion time.")),
        dg.AssetSpec(HISTORY_SILVER, group_name="history", deps=[HISTORY_BRONZE], kinds={"parquet", "great_expectations"},
                     skippable=True, description=(
                         "The range validated in one GX pass per table: silver/<table>/date=D for each day with "
                         "accepted rows, quarantine/<table>/date=D with reasons for each day with bad rows. Days "
                         "without events get nothing: they are days without data, not failures.")),
    ],
    check_specs=[
        dg.AssetCheckSpec("gx_schema", asset=HISTORY_BRONZE, blocking=True,
                          description="GX schema-level expectations on every ingested day (readable files, required columns)."),
        dg.AssetCheckSpec("row_conservation", asset=HISTORY_SILVER, blocking=True,
                          description="accepted + quarantined = ingested, on every day of the range"),
        dg.AssetCheckSpec("quarantine_rate", asset=HISTORY_SILVER, blocking=True,
                          description="each table's quarantined share over the range at most the configured maximum"),
    ],
    can_subset=False,
)
def history_bronze_silver(context: dg.AssetExecutionContext, history_range: HistoryRangeResource,
                          landing: LakeResource, lake: LakeResource, gx: GreatExpectationsResource,
                          alerts: AlertsResource):
    first, last = history_range.resolve(landing)
    the_lake = lake.open()
    with _log_progress(context):
        ingestion = lifecycle.ingest_range(landing.open(), the_lake, first, last)
        ingested = ingestion.summary()
        yield dg.MaterializeResult(asset_key=HISTORY_BRONZE, metadata={
            "first": first, "last": last,
            "dagster/row_count": sum(ingested[t]["rows"] for t in TABLE_ORDER),
            **{f"{t}_{k}": ingested[t][k] for t in TABLE_ORDER for k in ("days", "rows")},
            "days_without_events": ingested["days_without_events"],
            "summary": dg.MetadataValue.json(lifecycle.jsonable(ingested)),
        })
        schema = lifecycle.check_schema_range(the_lake, ingestion, expectations_dir=Path(gx.expectations_dir),
                                              run_id=context.run.run_id)
        alerts.send(context.log, schema.alert)
        yield dg.AssetCheckResult(asset_key=HISTORY_BRONZE, check_name="gx_schema", passed=schema.passed,
                                  severity=dg.AssetCheckSeverity.ERROR, description=schema.description,
                                  metadata={"summary": dg.MetadataValue.json(schema.summary())})
        if not schema.passed:
            context.log.error(f"history/silver not built: {schema.description}")
            return
        outcome = lifecycle.validate_range(the_lake, ingestion, expectations_dir=Path(gx.expectations_dir),
                                           max_quarantine_rate=gx.max_quarantine_rate, run_id=context.run.run_id)
        if outcome.passed:  # days with served impressions get their served negatives back (recloop.served)
            joined = lifecycle.join_served_range(the_lake, first, last)
            if joined["days"]:
                context.log.info(f"served join on {joined['days']} day(s): {joined['served_negatives']} served negatives")
    alerts.send(context.log, outcome.alert)
    out = outcome.summary()
    yield dg.MaterializeResult(asset_key=HISTORY_SILVER, metadata={
        "first": first, "last": last,
        "dagster/row_count": sum(out[t]["accepted"] for t in TABLE_ORDER),
        **{f"{t}_{k}": out[t][k] for t in TABLE_ORDER for k in ("ingested", "accepted", "quarantined")},
        "days_with_events": out["events"]["days_with_accepted_rows"],
        "summary": dg.MetadataValue.json(lifecycle.jsonable(out)),
    })
    yield dg.AssetCheckResult(asset_key=HISTORY_SILVER, check_name="row_conservation", passed=outcome.conserved,
                              metadata={t: dg.MetadataValue.json({k: out[t][k] for k in ("ingested", "accepted", "quarantined")})
                                        for t in TABLE_ORDER})
    yield dg.AssetCheckResult(asset_key=HISTORY_SILVER, check_name="quarantine_rate", passed=outcome.rate_ok,
                              severity=dg.AssetCheckSeverity.ERROR, description=outcome.rate_description,
                              metadata={"max_quarantine_rate": gx.max_quarantine_rate,
                                        **{t: out[t]["quarantine_rate"] for t in TABLE_ORDER}})


@dg.asset(key=HISTORY_FEATURES, group_name="history", deps=[HISTORY_SILVER], kinds={"duckdb", "parquet"}, description=(
    "The feature snapshots of the range (features/<view>/date=D) for every day with events and the day before "
    "each, computed in bulk exactly as the daily feature assets compute them one day at a time."))
def history_features(context: dg.AssetExecutionContext, history_range: HistoryRangeResource, landing: LakeResource,
                     lake: LakeResource) -> dg.MaterializeResult:
    first, last = history_range.resolve(landing)
    with _log_progress(context):
        out = lifecycle.compute_features_range(lake.open(), first, last)
    return dg.MaterializeResult(metadata={
        "first": first, "last": last, "snapshot_days": out["snapshot_days"], "newest": out["newest"] or "",
        "dagster/row_count": sum(out["rows"].values()),
        "rows": dg.MetadataValue.json(out["rows"]), "bytes": dg.MetadataValue.json(out["bytes"]),
        "removed_snapshots": out["removed"],
    })


@dg.asset(key=HISTORY_ONLINE, group_name="history", deps=[HISTORY_FEATURES, FEAST_REGISTRY], kinds={"feast"},
          description=("The range's newest snapshot loaded into Feast's online store (skipped when the store holds a "
                       "newer one): serving needs only the newest values."))
def history_online_features(context: dg.AssetExecutionContext, history_range: HistoryRangeResource,
                            landing: LakeResource, lake: LakeResource, feast: FeastResource) -> dg.MaterializeResult:
    from recloop.features import VIDEO_POPULARITY, feature_dataset

    first, last = history_range.resolve(landing)
    the_lake = lake.open()
    days = [p for p in the_lake.partitions(feature_dataset(VIDEO_POPULARITY)) if first <= p <= last]
    if not days:
        context.log.info(f"no feature snapshot between {first} and {last}: nothing to load online")
        return dg.MaterializeResult(metadata={"skipped": True, "reason": "no snapshot in the range"})
    with progress.stage("online store", 1, "snapshot") as bar:
        out = lifecycle.online_summary(feast.materialize(partition=days[-1], lake=the_lake), days[-1:])
        bar.update(1)
    if out["skipped"]:
        context.log.info(f"online materialization skipped: {out['reason']}")
    return dg.MaterializeResult(metadata={
        "snapshot": out["snapshot"], "online_store": out["online_store"], "skipped": out["skipped"],
        "rows_written": out["rows_written"], "views": dg.MetadataValue.json(out["views"]), "seconds": out["seconds"],
    })


def history_job_for(executor: str) -> Any:
    """The history job. Its steps run one after the other in one process (no per-step process start-up,
    ~10 s each), except with RECLOOP_DAGSTER_EXECUTOR=celery: then on the code location's executor, the
    Celery workers, like every job (a worker is already running: no start-up either)."""
    return dg.define_asset_job(
        name="history_job",
        selection=dg.AssetSelection.groups("history") | dg.AssetSelection.keys(FEAST_REGISTRY),
        description=("A range of days (an imported history) through ingest → GX → silver/quarantine → features → "
                     "Feast in one run; the range is the history_range resource (empty: everything the landing "
                     "zone holds)."),
        tags={"recloop/stage": "history"},
        executor_def=None if executor == "celery" else dg.in_process_executor,
    )


history_job = history_job_for("in_process")


@dg.definitions
def defs() -> dg.Definitions:
    from recloop.config import Settings

    return dg.Definitions(
        assets=[history_bronze_silver, history_features, history_online_features],
        jobs=[history_job_for(Settings.from_env().dagster_executor)],
        resources={"history_range": HistoryRangeResource()},
    )
