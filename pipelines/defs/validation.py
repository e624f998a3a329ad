"""Validation: one daily-partitioned asset per table, splitting the bronze partition into accepted rows
(`silver/<table>`) and quarantined rows with their reasons, with two blocking checks: row conservation
(accepted + quarantined = ingested) and the quarantine rate.
"""


import dagster as dg

from pipelines.defs.ingestion import bronze_key
from pipelines.defs.partitions import DAILY
from pipelines.defs.resources import AlertsResource, GreatExpectationsResource, LakeResource
from recloop.data.schemas import TABLE_ORDER

# Events are checked against the users and videos accepted up to their day.
_DIMENSION_DEPS = {"events": ("users", "videos")}


def silver_key(table: str) -> dg.AssetKey:
    return dg.AssetKey(["silver", table])


def _silver_asset(table: str) -> dg.AssetsDefinition:
    deps = [bronze_key(table), *(silver_key(d) for d in _DIMENSION_DEPS.get(table, ()))]

    @dg.asset(
        key=silver_key(table),
        group_name="validation",
        partitions_def=DAILY,
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
        partition = context.partition_key
        result = gx.validate(lake=lake.open(), table=table, partition=partition)
        rate_ok = result.quarantine_rate <= gx.max_quarantine_rate
        failed = {e["expectation"] + (f"({e['column']})" if e["column"] else ""): e["unexpected_count"]
                  for e in result.expectations if not e["success"]}
        if not (rate_ok and result.conserved):
            problem = (f"{result.quarantined} of {result.ingested} rows quarantined ({result.quarantine_rate:.2%}; "
                       f"maximum {gx.max_quarantine_rate:.0%})" if result.conserved else
                       f"rows lost: {result.accepted} accepted + {result.quarantined} quarantined != {result.ingested}")
            alerts.send(context.log, "validation.failed", key=f"{silver_key(table).to_user_string()}/{partition}/{context.run.run_id}",
                        text=f":x: recloop: {table} of {partition} failed validation: {problem}",
                        asset=silver_key(table).to_user_string(), partition=partition,
                        numbers={"ingested": result.ingested, "accepted": result.accepted,
                                 "quarantined": result.quarantined, "quarantine_rate": result.quarantine_rate},
                        report_url=result.quarantine_written.uri,
                        details={"quarantine_reasons": result.reasons, "failed_expectations": failed})
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.accepted,
                "ingested": result.ingested,
                "accepted": result.accepted,
                "quarantined": result.quarantined,
                "quarantine_rate": round(result.quarantine_rate, 6),
                "quarantine_reasons": dg.MetadataValue.json(result.reasons),
                "failed_expectations": dg.MetadataValue.json(failed),
                "extra_columns_dropped": dg.MetadataValue.json(result.schema.extra_columns),
                "path": dg.MetadataValue.path(result.accepted_written.uri),
                "quarantine_path": dg.MetadataValue.path(result.quarantine_written.uri),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="row_conservation",
                    passed=result.conserved,
                    metadata={"ingested": result.ingested, "accepted": result.accepted,
                              "quarantined": result.quarantined},
                ),
                dg.AssetCheckResult(
                    check_name="quarantine_rate",
                    passed=rate_ok,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=(
                        f"{result.quarantined} of {result.ingested} rows quarantined "
                        f"({result.quarantine_rate:.2%}; maximum {gx.max_quarantine_rate:.0%})"
                    ),
                    metadata={"quarantine_rate": round(result.quarantine_rate, 6),
                              "max_quarantine_rate": gx.max_quarantine_rate},
                ),
            ],
        )

    return _asset


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=[_silver_asset(t) for t in TABLE_ORDER])
