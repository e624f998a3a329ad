"""recloop's Dagster code location: the definitions of every lifecycle stage, one defs module each, with
cross-cutting policy applied once, here."""

from datetime import timedelta

import dagster as dg

from pipelines.defs import (
    features, history, ingestion, jobs, models, monitoring, online, partitions, resources, validation,
)

# A day's data is due in the lake and the online store by 06:00 UTC the next day (the daily schedule
# starts at 01:15); Dagster marks the assets stale in the UI when a deadline passes without a run.
DAILY_FRESHNESS = dg.FreshnessPolicy.cron(deadline_cron="0 6 * * *", lower_bound_delta=timedelta(hours=5), timezone="UTC")
FRESH_BY_DEADLINE = dg.AssetSelection.groups("validation") | dg.AssetSelection.keys(features.ONLINE_FEATURES)


@dg.definitions
def defs() -> dg.Definitions:
    with partitions.loading() as daily:  # one partition range for every module of this load
        merged = dg.Definitions.merge(
            resources.defs(),
            ingestion.defs(),
            validation.defs(),
            features.defs(),
            history.defs(),
            models.defs(),
            monitoring.defs(),
            online.defs(),
            jobs.defs(),
        )
    if daily.end is not None:
        # Partitions pinned to data that stops at a known day (the demo's, an imported history): no day is
        # due any more, and a deadline would only mark the assets overdue.
        return merged
    return merged.map_resolved_asset_specs(
        func=lambda spec: spec.replace_attributes(freshness_policy=DAILY_FRESHNESS),
        selection=FRESH_BY_DEADLINE,
    )
