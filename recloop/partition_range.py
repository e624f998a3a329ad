"""The range of daily partitions, derived from the data: nobody sets it by hand.

Every daily partition of recloop (Dagster's data-plane assets, `recloop run`, the Airflow DAGs) lives in
one range `[first, last]`:

* `first` is the earliest day the landing zone holds events for: the earlier of the days recorded by
  history imports (`<landing>/_recloop/history.json`, written by `recloop import` and
  `recloop movielens`) and the earliest `events/date=D` folder in the landing zone. `RECLOOP_PARTITION_START`,
  when set, overrides it (an operator who wants to hide older data); with no data at all it is 2025-01-01
  (the simulator's default first day).
* `last` is the last complete UTC day (yesterday) by default: Dagster's daily partitions end there, and a
  day becomes a partition once it has ended. A deployment whose data stops at a known day (the demo's
  simulated January, an imported history) pins the end instead, so the UI shows the days that have data
  rather than hundreds of missing ones up to today: `RECLOOP_PARTITION_END` (a day, `data` for the last
  day with events in the landing zone, or `today` for the default), else the pin `recloop demo` writes
  in `<RECLOOP_HOME>/partitions.json` (`pin_end`), which a later `make ui` on the same home reads. A
  pinned end never goes past yesterday.

A day outside the range is refused with one sentence (`OutsideRange`), never a Dagster traceback.

The record also keeps each imported history's bounds: a day inside one of them without events is a gap
of the history (a day nobody rated anything in MovieLens), not a failed delivery (`in_imported_history`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recloop.config import Settings
    from recloop.lake import Lake

RECORD_KEY = "_recloop/history.json"
ENV_VAR = "RECLOOP_PARTITION_START"
END_ENV_VAR = "RECLOOP_PARTITION_END"
# The pinned end of a home (`pin_end`): `{"end": "data" | "YYYY-MM-DD", "set_by": ..., "set_at": ...}`.
PIN_FILE = "partitions.json"
END_DATA = "data"
END_TODAY = "today"
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
    # Why the range ends at `last`; `pinned` when it is a fixed day rather than "the last complete day".
    end_source: str = "the last complete day (UTC)"
    pinned: bool = False

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
        if d > self.last and self.pinned:
            raise OutsideRange(
                f"{what} {d.isoformat()} is outside the daily partitions ({self.describe()}), which end at "
                f"{self.last.isoformat()}, {self.end_source}; set {END_ENV_VAR}=today (or a later day) to "
                "go further")
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


def landed_days(landing: Lake) -> list[str]:
    """Every day from `MIN_DAY` on with a delivered file in `events/date=D` of the landing zone (Parquet,
    CSV or JSON; hidden `_`/`.` files aside), in order: one listing."""
    found = {part.removeprefix("date=") for key in landing.list_keys("events/")
             if not key.rsplit("/", 1)[-1].startswith(("_", "."))
             for part in key.split("/")[:-1] if part.startswith("date=")}
    return sorted(d for d in found if _is_day(d) and d >= MIN_DAY.isoformat())


def _is_day(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def earliest_landed_day(landing: Lake) -> str | None:
    """The earliest `events/date=D` partition of the landing zone (one listing), or None."""
    days = landed_days(landing)
    return days[0] if days else None


# --------------------------------------------------------------------------------------------------
# The end of the range
# --------------------------------------------------------------------------------------------------


def pin_path(settings: Settings) -> Path:
    """Where a home keeps its pinned end (`pin_end`)."""
    return Path(settings.home) / PIN_FILE


def pin_end(settings: Settings, end: str = END_DATA, *, set_by: str) -> Path:
    """Pins the end of this home's daily partitions (`data`: the last day with events in the landing
    zone; or a day, YYYY-MM-DD) for every later load of the definitions on the same RECLOOP_HOME
    (`make ui` after `make demo`); `RECLOOP_PARTITION_END` still wins. Returns the file written."""
    value = str(end).strip().lower()
    if value != END_DATA:
        value = parse_day(value, what="the partition end").isoformat()
    path = pin_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"end": value, "set_by": set_by,
                                "set_at": datetime.now(UTC).isoformat(timespec="seconds")}, indent=1) + "\n")
    return path


def _pinned_end(settings: Settings) -> tuple[str, str] | None:
    """(end, why) when RECLOOP_PARTITION_END or the home's pin fixes the end, None for the default."""
    explicit = (os.environ.get(END_ENV_VAR) or "").strip().lower()
    if explicit:
        return None if explicit == END_TODAY else (explicit, f"as {END_ENV_VAR}={explicit} sets")
    path = pin_path(settings)
    try:
        pin = json.loads(path.read_text())
        end = str(pin.get("end") or "").strip().lower()
    except FileNotFoundError:
        return None
    except (ValueError, OSError, AttributeError):
        raise BadDay(f"{path} is not a partition pin (JSON with an \"end\"): delete it, or set {END_ENV_VAR}") from None
    if not end or end == END_TODAY:
        return None
    return end, f"as {pin.get('set_by') or 'a pin'} set in {path} (delete it to follow today)"


def _resolve_end(settings: Settings, days: list[str], yesterday: date) -> tuple[date, str, bool]:
    """(last, why, pinned) of the range (see the module docstring)."""
    pinned = _pinned_end(settings)
    if pinned is None:
        return yesterday, "the last complete day (UTC)", False
    end, why = pinned
    if end == END_DATA:
        if not days:
            return yesterday, "the last complete day (UTC): the landing zone holds no events yet", False
        last, why = parse_day(days[-1]), f"the last day with events in the landing zone, {why}"
    else:
        try:
            last = parse_day(end)
        except BadDay:
            raise BadDay(f"the partition end {end!r} ({why}) is not a day: write YYYY-MM-DD, {END_DATA} (the last "
                         f"day with events in the landing zone) or {END_TODAY}") from None
    if last >= yesterday:
        return yesterday, "the last complete day (UTC)", False
    return last, why, True


def resolve(settings: Settings | None = None, *, landing: Lake | None = None, today: date | None = None) -> PartitionRange:
    """The partition range of this deployment (see the module docstring)."""
    from recloop.config import Settings

    settings = settings or Settings.from_env()
    if landing is None:
        from recloop.lake import open_lake

        landing = open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url)
    today = today or datetime.now(UTC).date()
    record = read_record(landing)
    imported = tuple((e["first"], e["last"]) for e in record.get("imports", []) if e.get("first") and e.get("last"))
    days = landed_days(landing)
    last, end_source, pinned = _resolve_end(settings, days, today - timedelta(days=1))
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        first = parse_day(explicit, what=ENV_VAR)
        if first < MIN_DAY:
            raise BadDay(f"{ENV_VAR} {first.isoformat()} is before {MIN_DAY.isoformat()}, the earliest day a partition "
                         f"can be: set a later day or unset it")
        source = f"as {ENV_VAR} sets"
    else:
        candidates = [d for d in (record.get("first_day"), days[0] if days else None) if d and d >= MIN_DAY.isoformat()]
        if candidates:
            first = parse_day(min(candidates))
            source = f"the earliest day with events in the landing zone {landing.uri()}"
        else:
            first, source = DEFAULT_FIRST, "the default (the landing zone holds no events yet)"
    if pinned and last < first:
        raise BadDay(f"the daily partitions would end at {last.isoformat()} ({end_source}), before they start at "
                     f"{first.isoformat()} ({source}): set {END_ENV_VAR} to a later day, or to today")
    return PartitionRange(first, last, source, imported, end_source, pinned)
