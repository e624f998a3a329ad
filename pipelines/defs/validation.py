"""Validation: one daily-partitioned asset per table, splitting the bronze partition into accepted rows
(`silver/<table>`) and quarantined rows with their reasons, with two blocking checks: row conservation
(accepted + quarantined = ingested) and the quarantine rate. Thin adapters over `recloop.lifecycle`
(shared with the Airflow DAGs in dags/).
"""

from pathlib import Path

import dagster as dg

from pipelines.defs.ingestion import bronze_key
from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import AlertsResource, GreatExpectationsResource, LakeResource
from recloop import lifecycle
from recloop.data.schemas import TABLE_ORDER

# Events are checked against the users and videos accepted up to their day.
_DIMENSION_DEPS = {"events": ("users", "videos")}


def silver_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["silver", table])


def _silver_asset(table: str, daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    deps = [bronze_key(table), *(silver_key(d) for d in _DIMENSION_DEPS.get(table, ()))]

    @dg.asset(
        key=silver_key(table),
        group_name="validation",
        partitions_def=daily,
        deps=deps,
        kinds={"parquet", "great_expectations"},
        check_specs=[
            dg.AssetCheckSpec("row_conservation", asset=silver_key(table), blocking=True,
                              description="accepted + quarantined = ingested, exactly"),
            dg.AssetCheckSpec("quarantine_rate", asset=silver_key(table), blocking=True,
                              description="share of quarantined rows at most the configured maximum"),
        ],
        description=(
            f"Accepted `{table}` rows of the day, typed to the canonical schema. Rows breaking a row-level "
            f"expectation of expectations/{table}.json are kept in quarantine/{table} with their reasons."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, lake: LakeResource, gx: GreatExpectationsResource,
               alerts: AlertsResource) -> dg.MaterializeResult:
        outcome = lifecycle.validate(lake.open(), table, context.partition_key,
                                     expectations_dir=Path(gx.expectations_dir),
                                     max_quarantine_rate=gx.max_quarantine_rate, run_id=context.run.run_id)
        alerts.send(context.log, outcome.alert)
        out = outcome.summary()
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": out["accepted"],
                "ingested": out["ingested"],
                "accepted": out["accepted"],
                "quarantined": out["quarantined"],
                "quarantine_rate": out["quarantine_rate"],
                "quarantine_reasons": dg.MetadataValue.json(out["quarantine_reasons"]),
                "failed_expectations": dg.MetadataValue.json(out["failed_expectations"]),
                "extra_columns_dropped": dg.MetadataValue.json(out["extra_columns_dropped"]),
                "path": dg.MetadataValue.path(out["path"]),
                "quarantine_path": dg.MetadataValue.path(out["quarantine_path"]),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="row_conservation",
                    passed=out["conserved"],
                    metadata={"ingested": out["ingested"], "accepted": out["accepted"],
                              "quarantined": out["quarantined"]},
                ),
                dg.AssetCheckResult(
                    check_name="quarantine_rate",
                    passed=outcome.rate_ok,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=outcome.rate_description,
                    metadata={"quarantine_rate": out["quarantine_rate"],
                              "max_quarantine_rate": out["max_quarantine_rate"]},
                ),
            ],
        )

    return _asset


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    return dg.Definitions(assets=[_silver_asset(t, daily) for t in TABLE_ORDER])
