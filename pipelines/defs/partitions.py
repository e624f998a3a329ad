"""The daily partitioning every data-plane asset shares (one partition = one UTC day of data)."""


import dagster as dg

from recloop.config import Settings


def daily_partitions() -> dg.DailyPartitionsDefinition:
    """Daily partitions from RECLOOP_PARTITION_START (default 2025-01-01) up to today, in UTC."""
    start = Settings.from_env().partition_start
    return dg.DailyPartitionsDefinition(start_date=start.isoformat(), timezone="UTC")


DAILY = daily_partitions()
