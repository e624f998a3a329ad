"""Validation: one daily-partitioned asset per table, splitting the bronze partition into accepted rows
(`silver/<table>`) and quarantined rows with their reasons, with two blocking checks: row conservation
(accepted + quarantined = ingested) and the quarantine rate. Thin adapters over `recloop.lifecycle`
(shared with the Airflow DAGs in dags/).

Served impressions (issue 14): silver/impressions is validated like the other tables (its own suite,
expectations/impressions.json); silver/events depends on it because, once the day's events are validated,
the same step appends the day's *served negatives* (impressions without feedback, `recloop.served`) so
features, drift and training see one row per impression; silver/impression_outcomes (every impression
with the outcome its feedback reported, what online metrics read) follows both.
"""

from pathlib import Path

import dagster as dg

from pipelines.defs.ingestion import INGESTED_TABLES, bronze_key
from pipelines.defs.partitions import daily_partitions
from pipelines.defs.resources import AlertsResource, GreatExpectationsResource, LakeResource
from recloop import lifecycle

# Events are checked against the users and videos accepted up to their day, and joined with the day's
# accepted impressions (served negatives).
_DIMENSION_DEPS = {"events": ("users", "videos", "impressions")}
IMPRESSION_OUTCOMES = dg.AssetKey(["silver", "impression_outcomes"])


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
            # Partitioned like the asset: each evaluation is recorded for its day.
            dg.AssetCheckSpec("row_conservation", asset=silver_key(table), blocking=True, partitions_def=daily,
                              description="accepted + quarantined = ingested, exactly"),
            dg.AssetCheckSpec("quarantine_rate", asset=silver_key(table), blocking=True, partitions_def=daily,
                              description="share of quarantined rows at most the configured maximum"),
        ],
        description=(
            f"Accepted `{table}` rows of the day, typed to the canonical schema. Rows breaking a row-level "
            f"expectation of expectations/{table}.json are kept in quarantine/{table} with their reasons."
            + (" Then the day's served negatives (accepted impressions without feedback) are appended: "
               "watched_s = 0, event_id = impression_id." if table == "events" else "")
        ),
    )
    def _asset(context: dg.AssetExecutionContext, lake: LakeResource, gx: GreatExpectationsResource,
               alerts: AlertsResource) -> dg.MaterializeResult:
        outcome = lifecycle.validate(lake.open(), table, context.partition_key,
                                     expectations_dir=Path(gx.expectations_dir),
                                     max_quarantine_rate=gx.max_quarantine_rate, run_id=context.run.run_id)
        alerts.send(context.log, outcome.alert)
        out = outcome.summary()
        joined: dict = {}
        if table == "events" and outcome.passed:
            joined = lifecycle.join_served(lake.open(), context.partition_key)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": joined.get("events", out["accepted"]),
                **({"served_negatives": joined["served_negatives"], "feedback_events": joined["feedback_events"],
                    "served_join": dg.MetadataValue.json(joined)} if joined else {}),
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
                    description=(f"{context.partition_key}: {out['accepted']} accepted + {out['quarantined']} "
                                 f"quarantined {'=' if out['conserved'] else '!='} {out['ingested']} ingested"),
                    metadata={"partition": context.partition_key, "ingested": out["ingested"],
                              "accepted": out["accepted"], "quarantined": out["quarantined"]},
                ),
                dg.AssetCheckResult(
                    check_name="quarantine_rate",
                    passed=outcome.rate_ok,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=f"{context.partition_key}: {outcome.rate_description}",
                    metadata={"partition": context.partition_key, "quarantine_rate": out["quarantine_rate"],
                              "max_quarantine_rate": out["max_quarantine_rate"]},
                ),
            ],
        )

    return _asset


def _impression_outcomes(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=IMPRESSION_OUTCOMES,
        group_name="validation",
        partitions_def=daily,
        deps=[silver_key("impressions"), silver_key("events")],
        kinds={"parquet", "duckdb"},
        description=(
            "Every accepted impression of the day with the outcome its feedback reported: watched_s (0 when "
            "none), completed, liked, feedback (an event was reported). What online experiment metrics read. "
            "A day without impressions is an empty partition."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        out = lifecycle.impression_outcomes(lake.open(), context.partition_key)
        return dg.MaterializeResult(metadata={
            "dagster/row_count": out["impressions"],
            "with_feedback": out["with_feedback"],
            "watched": out["watched"],
            "feedback_rate": out["feedback_rate"],
            "path": dg.MetadataValue.path(out["path"]),
        })

    return _asset


@dg.definitions
def defs() -> dg.Definitions:
    daily = daily_partitions()
    return dg.Definitions(assets=[*(_silver_asset(t, daily) for t in INGESTED_TABLES), _impression_outcomes(daily)])
