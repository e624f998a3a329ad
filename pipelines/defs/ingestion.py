"""Ingestion: one daily-partitioned asset per table landing raw files into the lake's bronze layer, and
the blocking schema check (Great Expectations, schema-level expectations) that guards everything after.
The delivered tables (users, videos, events) and the impressions the serving API logs (bronze/impressions:
a day without serving traffic is an empty partition, not a failure). Thin adapters over
`recloop.lifecycle` (shared with the Airflow DAGs in dags/).
"""

from pathlib import Path

import dagster as dg

from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import AlertsResource, GreatExpectationsResource, LakeResource
from recloop import lifecycle
from recloop.data.schemas import SERVED_TABLES, TABLE_ORDER

# Every table landed into bronze: the delivered ones, then those the serving API writes.
INGESTED_TABLES = (*TABLE_ORDER, *SERVED_TABLES)


def bronze_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["bronze", table])


def _bronze_asset(table: str, daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=bronze_key(table),
        group_name="ingestion",
        partitions_def=daily,
        kinds={"parquet"},
        description=(
            f"Raw `{table}` files of the day, landed as they came (every column as text, with source file, "
            "row and any read error). Re-running replaces the partition."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, landing: LakeResource, lake: LakeResource) -> dg.MaterializeResult:
        out = lifecycle.ingest(table, context.partition_key, landing=landing.open(), lake=lake.open())
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": out["rows"],
                "bytes": out["bytes"],
                "path": dg.MetadataValue.path(out["path"]),
                "files": out["files"],
                "malformed_lines": out["malformed_lines"],
                "encoding_errors": out["encoding_errors"],
                "rejected_files": dg.MetadataValue.json(out["rejected_files"]),
                "ingested_at": out["ingested_at"],
            }
        )

    return _asset


def _schema_check(table: str, daily: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=bronze_key(table),
        name="gx_schema",
        blocking=True,
        partitions_def=daily,
        description=(
            f"Great Expectations schema-level expectations of expectations/{table}.json on the ingested "
            "partition: readable files, required columns, rows present. A failure stops the partition."
        ),
    )
    def _check(context: dg.AssetCheckExecutionContext, lake: LakeResource, gx: GreatExpectationsResource,
               alerts: AlertsResource) -> dg.AssetCheckResult:
        check = lifecycle.check_schema(lake.open(), table, context.partition_key,
                                       expectations_dir=Path(gx.expectations_dir), run_id=context.run.run_id)
        alerts.send(context.log, check.alert)
        summary = check.summary()
        return dg.AssetCheckResult(
            passed=check.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=check.description,
            metadata={
                "partition": summary["partition"],
                "rows": summary["rows"],
                "failures": dg.MetadataValue.json(summary["failures"]),
                "warnings": dg.MetadataValue.json(summary["warnings"]),
                "missing_columns": dg.MetadataValue.json(summary["missing_columns"]),
                "extra_columns_dropped": dg.MetadataValue.json(summary["extra_columns_dropped"]),
            },
        )

    return _check


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    return dg.Definitions(
        assets=[_bronze_asset(t, daily) for t in INGESTED_TABLES],
        asset_checks=[_schema_check(t, daily) for t in INGESTED_TABLES],
    )
