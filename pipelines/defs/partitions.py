"""The daily partitioning every data-plane asset shares (one partition = one UTC day of data), over the
range the data gives (`recloop.partition_range`): from the earliest day with events in the landing zone
(or RECLOOP_PARTITION_START when set) up to the last complete day, or up to a pinned end
(RECLOOP_PARTITION_END, or the pin `recloop demo` leaves in RECLOOP_HOME) when the data stops at a known day.

The range is read when the definitions load (`defs()`), not at import: `dagster dev` shows a newly
imported history after "Reload definitions", and every in-process run (`pipelines.run.run_job`) loads
the definitions afresh.
"""

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from functools import lru_cache

import dagster as dg

from recloop import partition_range
from recloop.config import Settings


_loading: dg.DailyPartitionsDefinition | None = None


def daily_partitions(settings: Settings | None = None) -> dg.DailyPartitionsDefinition:
    """Daily partitions over the deployment's partition range, in UTC (during `loading()`: the one
    resolved when the load started, so every module of one load agrees and the landing zone is listed once)."""
    if _loading is not None and settings is None:
        return _loading
    rng = partition_range.resolve(settings or Settings.from_env())
    # Unpinned, the partitions have no end date: a long-running code server adds each day once it ends.
    end = (rng.last + timedelta(days=1)).isoformat() if rng.pinned else None
    return _daily(rng.first.isoformat(), end)


@contextlib.contextmanager
def loading() -> Iterator[dg.DailyPartitionsDefinition]:
    """Resolve the partition range once for a load of the definitions (`pipelines.definitions.defs`)."""
    global _loading
    outer = _loading
    _loading = outer or daily_partitions()
    try:
        yield _loading
    finally:
        _loading = outer


@lru_cache(maxsize=8)
def _daily(start: str, end: str | None) -> dg.DailyPartitionsDefinition:
    # One object per range: the modules of one load share it. `end_date` is exclusive (the day after the last).
    return dg.DailyPartitionsDefinition(start_date=start, end_date=end, timezone="UTC")
