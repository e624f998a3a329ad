"""Features: daily point-in-time snapshots (DuckDB) per feature view, Feast's registry (`feast apply`),
and the online store materialized per partition, with freshness checks. Thin adapters over
`recloop.lifecycle` and `recloop.features` (shared with the Airflow DAGs in dags/).
"""


from datetime import datetime

import dagster as dg

from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import FeastResource, LakeResource
from pipelines.defs.validation import silver_key
from recloop import features as feature_ops
from recloop import lifecycle

FEATURE_KEYS = {view: dg.AssetKey(["features", view]) for view in feature_ops.FEATURE_VIEWS}
FEAST_REGISTRY = dg.AssetKey(["feast", "registry"])
ONLINE_FEATURES = dg.AssetKey(["feast", "online_features"])


def _feature_snapshots(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name="feature_snapshots",
        specs=[
            dg.AssetSpec(
                key,
                group_name="features",
                deps=[silver_key("events"), silver_key("videos"), silver_key("users")],
                kinds={"duckdb", "parquet"},
                description=f"Daily snapshot of the `{view}` feature view as of the end of the day (Feast offline source).",
            )
            for view, key in FEATURE_KEYS.items()
        ],
        partitions_def=daily,
        can_subset=False,
    )
    def feature_snapshots(context: dg.AssetExecutionContext, lake: LakeResource):
        """Computes every feature view's snapshot for the partition's day in one DuckDB pass over the data."""
        written = lifecycle.compute_features(lake.open(), context.partition_key)
        for view, part in written.items():
            yield dg.MaterializeResult(
                asset_key=FEATURE_KEYS[view],
                metadata={
                    "dagster/row_count": part["rows"],
                    "bytes": part["bytes"],
                    "path": dg.MetadataValue.path(part["path"]),
                    "snapshot_time": part["snapshot_time"],
                },
            )

    return feature_snapshots


@dg.asset(
    key=FEAST_REGISTRY,
    group_name="features",
    kinds={"feast"},
    description="Feast's registry of feature_repo/ (entities, sources, views, services): `feast apply`.",
)
def feast_registry(feast: FeastResource) -> dg.MaterializeResult:
    applied = feast.apply()
    return dg.MaterializeResult(
        metadata={
            "project": applied["project"],
            "feature_views": dg.MetadataValue.json(applied["feature_views"]),
            "feature_services": dg.MetadataValue.json(applied["feature_services"]),
            "entities": dg.MetadataValue.json(applied["entities"]),
        }
    )


def _online_features(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=ONLINE_FEATURES,
        group_name="features",
        partitions_def=daily,
        # A backfill over many days runs once: only the newest day's snapshot is what serving needs, and
        # writing each older day first would be overwritten at once (SQLite writes ~4k rows/s).
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[FEAST_REGISTRY, *FEATURE_KEYS.values()],
        kinds={"feast", "sqlite"},
        description=(
            "The day's snapshot loaded into Feast's online store (Feast materialize). Over a range of days, "
            "the newest is loaded; a day older than what the online store already holds is skipped rather "
            "than written over newer values."
        ),
    )
    def online_features(context: dg.AssetExecutionContext, feast: FeastResource, lake: LakeResource) -> dg.MaterializeResult:
        days = sorted(context.partition_keys)
        out = lifecycle.online_summary(feast.materialize(partition=days[-1], lake=lake.open()), days)
        if out["skipped"]:
            context.log.info(f"online materialization skipped: {out['reason']}")
        return dg.MaterializeResult(
            metadata={
                "snapshot": out["snapshot"],
                "online_store": out["online_store"],
                "skipped": out["skipped"],
                "skipped_views": dg.MetadataValue.json(out["skipped_views"]),
                "superseded_days": dg.MetadataValue.json(out["superseded_days"]),
                "rows_written": out["rows_written"],
                "views": dg.MetadataValue.json(out["views"]),
                "seconds": out["seconds"],
            }
        )

    return online_features


@dg.asset_check(
    asset=ONLINE_FEATURES,
    name="online_snapshot_fresh",
    description=(
        "Every feature view's newest online snapshot is as new as the newest snapshot in the lake: "
        "serving reads the freshest features computed."
    ),
)
def online_snapshot_fresh(feast: FeastResource, lake: LakeResource) -> dg.AssetCheckResult:
    the_lake = lake.open()
    newest = {view: max(the_lake.partitions(feature_ops.feature_dataset(view)), default=None) for view in FEATURE_KEYS}
    freshness = feast.freshness()
    behind = {}
    for view, day in newest.items():
        if day is None:
            continue
        online = freshness["views"].get(view, {}).get("newest_snapshot")
        if online is None or datetime.fromisoformat(online) < feature_ops.snapshot_time(day):
            behind[view] = {"online": online, "lake": feature_ops.snapshot_time(day).isoformat()}
    return dg.AssetCheckResult(
        passed=not behind,
        severity=dg.AssetCheckSeverity.WARN,
        description="online store serves the newest snapshot" if not behind else f"online store is behind the lake: {behind}",
        metadata={"views": dg.MetadataValue.json(freshness["views"]), "behind": dg.MetadataValue.json(behind)},
    )


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    return dg.Definitions(
        assets=[_feature_snapshots(daily), feast_registry, _online_features(daily)],
        asset_checks=[online_snapshot_fresh],
    )
