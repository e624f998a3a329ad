"""The range of daily partitions, derived from the data: nobody sets it by hand.

Every daily partition of recloop (Dagster's data-plane assets, `recloop run`, the Airflow DAGs) lives in
one range `[first, last]`:

* `first` is the earliest day the landing zone holds events for: the earlier of the days recorded by
  history imports (`<landing>/_recloop/history.json`, written by `recloop import` and
  `recloop movielens`) and the earliest `events/date=D` folder in the landing zone. `RECLOOP_PARTITION_START`,
  when set, overrides it (an operator who wants to hide older data); with no data at all it is 2025-01-01
  (the simulator's default first day).
* `last` is the last complete UTC day (yesterday): Dagster's daily partitions end there, and a day
  becomes a partition once it has ended.

A day outside the range is refused with one sentence (`OutsideRange`), never a Dagster traceback.

The record also keeps each imported history's bounds: a day inside one of them without events is a gap
of the history (a day nobody rated anything in MovieLens), not a failed delivery (`in_imported_history`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recloop.config import Settings
    from recloop.lake import Lake

RECORD_KEY = "_recloop/history.json"
ENV_VAR = "RECLOOP_PARTITION_START"
DEFAULT_FIRST = date(2025, 1, 1)
# The earliest day a partition may be: the Unix epoch (event times are epoch-based; Dagster's daily
# partitions do not reach year 1). A landed folder before it (a stray `date=0001-01-01`) is not a partition.
MIN_DAY = date(1970, 1, 1)


class OutsideRange(ValueError):
    """A day that is not a daily partition; the message is one sentence for the user."""


class BadDay(ValueError):
    """Text that is not a day (YYYY-MM-DD)."""


def parse_day(text: str, *, what: str = "day") -> date:
    """`text` as a date, or `BadDay` with a sentence naming `what`."""
    try:
        return date.fromisoformat(str(text).strip())
    except ValueError:
        raise BadDay(f"{what} {text!r} is not a date: write it as YYYY-MM-DD") from None


@dataclass(frozen=True)
class PartitionRange:
    first: date
    last: date
    source: str
    imported: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __contains__(self, day: object) -> bool:
        d = day if isinstance(day, date) else parse_day(str(day))
        return self.first <= d <= self.last

    def describe(self) -> str:
        return f"{self.first.isoformat()} to {self.last.isoformat()}"

    def check(self, day: str | date, *, what: str = "day") -> str:
        """`day` as YYYY-MM-DD when it is a partition, else `OutsideRange` (or `BadDay`) with one sentence."""
        d = day if isinstance(day, date) else parse_day(str(day), what=what)
        if d < MIN_DAY:
            raise OutsideRange(
                f"{what} {d.isoformat()} is outside the daily partitions ({self.describe()}): no partition can be "
                f"earlier than {MIN_DAY.isoformat()}; give a day in that range")
        if d < self.first:
            raise OutsideRange(
                f"{what} {d.isoformat()} is outside the daily partitions ({self.describe()}), which start at "
                f"{self.first.isoformat()}, {self.source}; land or import that day's data first "
                "(recloop import PATH)")
        if d > self.last:
            raise OutsideRange(
                f"{what} {d.isoformat()} is outside the daily partitions ({self.describe()}): a day becomes a "
                f"partition once it has ended (UTC), so the newest one is {self.last.isoformat()}")
        return d.isoformat()

    def check_span(self, start: str | date, end: str | date) -> tuple[str, str]:
        """A `[start, end]` span inside the range, in order; `OutsideRange` / `BadDay` otherwise."""
        first = self.check(start, what="--start")
        last = self.check(end, what="--end")
        if first > last:
            raise OutsideRange(f"--start {first} is after --end {last}: give the earlier day first")
        return first, last

    def in_imported_history(self, day: str) -> tuple[str, str] | None:
        """The imported history (first, last) `day` falls in, if any."""
        return next(((a, b) for a, b in self.imported if a <= day <= b), None)


# --------------------------------------------------------------------------------------------------
# The record in the landing zone
# --------------------------------------------------------------------------------------------------


def read_record(landing: Lake) -> dict[str, Any]:
    """The landing zone's history record (`{"first_day", "last_day", "imports": [...]}`), {} when none."""
    try:
        return json.loads(landing.read_bytes(RECORD_KEY))
    except FileNotFoundError:
        return {}
    except (ValueError, OSError):
        return {}


def record_history(landing: Lake, first: str, last: str, *, source: str, days_with_events: int,
                   imported: bool = True) -> dict[str, Any]:
    """Note in the landing zone that days `first`..`last` hold a history landed from `source` (widening
    the recorded range); an import of the same source and bounds replaces its earlier entry."""
    record = read_record(landing)
    record["first_day"] = min(filter(None, [record.get("first_day"), first]))
    record["last_day"] = max(filter(None, [record.get("last_day"), last]))
    if imported:
        entry = {"source": source, "first": first, "last": last, "days_with_events": days_with_events,
                 "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}
        imports = [e for e in record.get("imports", []) if (e.get("source"), e.get("first"), e.get("last"))
                   != (source, first, last)]
        record["imports"] = [*imports, entry]
    landing.write_bytes(RECORD_KEY, json.dumps(record, indent=1).encode())
    return record


def earliest_landed_day(landing: Lake) -> str | None:
    """The earliest `events/date=D` partition of the landing zone (one listing), or None."""
    days = [d for d in landing.partitions("events") if d >= MIN_DAY.isoformat()]
    if days:
        return days[0]
    # CSV-only landing zones: `partitions` lists Parquet files; look for any file.
    found = sorted({part.removeprefix("date=") for key in landing.list_keys("events/")
                    for part in key.split("/") if part.startswith("date=")})
    found = [d for d in found if d >= MIN_DAY.isoformat()]
    return found[0] if found else None


def resolve(settings: Settings | None = None, *, landing: Lake | None = None, today: date | None = None) -> PartitionRange:
    """The partition range of this deployment (see the module docstring)."""
    from recloop.config import Settings

    settings = settings or Settings.from_env()
    if landing is None:
        from recloop.lake import open_lake

        landing = open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url)
    today = today or datetime.now(UTC).date()
    last = today - timedelta(days=1)
    record = read_record(landing)
    imported = tuple((e["first"], e["last"]) for e in record.get("imports", []) if e.get("first") and e.get("last"))
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        first = parse_day(explicit, what=ENV_VAR)
        if first < MIN_DAY:
            raise BadDay(f"{ENV_VAR} {first.isoformat()} is before {MIN_DAY.isoformat()}, the earliest day a partition "
                         f"can be: set a later day or unset it")
        return PartitionRange(first, last, f"as {ENV_VAR} sets", imported)
    candidates = [d for d in (record.get("first_day"), earliest_landed_day(landing)) if d and d >= MIN_DAY.isoformat()]
    if not candidates:
        return PartitionRange(DEFAULT_FIRST, last, "the default (the landing zone holds no events yet)", imported)
    first = min(candidates)
    return PartitionRange(parse_day(first), last, f"the earliest day with events in the landing zone {landing.uri()}",
                          imported)
