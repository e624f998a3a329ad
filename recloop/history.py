"""Importing a history: a folder of past data into the landing zone, one partition per table and day,
ready for one bulk run of the data plane (`pipelines.run.run_history`, the `history_job`).

What `recloop import PATH` accepts (`detect`):

* a MovieLens folder (ML-100K, ML-1M/10M, ml-latest/20M/25M; `recloop.data.movielens`): mapped to users,
  videos and events, each table landed on the days it has rows;
* a folder in the landing layout (`users/`, `videos/`, `events/` with `date=YYYY-MM-DD/` folders): its
  files are copied as they are;
* a folder holding the three tables as files or folders of files, not split by day: `users.csv`,
  `videos.parquet`, `events/part-1.csv`, ... (docs/data_schema.md); each file is split by the UTC day of
  its table's time column, byte for byte for CSV (a malformed line or a bad byte still reaches ingestion,
  which quarantines it with its reason), row for row for Parquet;
* a single CSV or Parquet file: the events table (users and videos already imported).

A row whose time does not parse (or a malformed CSV line) lands on the import's newest day, where
validation quarantines it with its reason: nothing is dropped on the way in.

An import replaces the landing zone's content of its range `[first, last]`, table by table: a day of the
range this import does not deliver is removed from the landing zone and its bronze/silver/quarantine
partitions from the lake, so importing the same folder again gives the same lake. The range and the
import are recorded in the landing zone (`recloop.partition_range`), which is how the daily partitions
start where the data starts.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa

from recloop.data.schemas import TABLE_ORDER, TABLES
from recloop.lake import Lake, partition_key

KINDS = ("movielens", "landing", "tables", "events_file")
SUFFIXES = (".csv", ".parquet")


class HistoryInputError(ValueError):
    """A history that cannot be imported as given; the message says why in one sentence."""


@dataclass(frozen=True)
class Source:
    """What `recloop import` was given: its kind and, per table, the files holding it."""

    path: Path
    kind: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    layout: str = ""

    def describe(self) -> str:
        if self.kind == "movielens":
            return f"MovieLens {self.layout} folder {self.path}"
        if self.kind == "landing":
            return f"landing-layout folder {self.path}"
        if self.kind == "events_file":
            return f"events file {self.path}"
        return f"folder {self.path} ({', '.join(f'{t}: {len(f)} file(s)' for t, f in self.files.items())})"


@dataclass
class LandedHistory:
    """What an import wrote into the landing zone."""

    source: str
    kind: str
    first: str
    last: str
    event_days: list[str]
    rows: dict[str, int]
    files_written: int
    rows_without_day: dict[str, int] = field(default_factory=dict)
    days_removed: int = 0

    @property
    def calendar_days(self) -> int:
        return (date.fromisoformat(self.last) - date.fromisoformat(self.first)).days + 1

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source, "kind": self.kind, "first": self.first, "last": self.last,
            "calendar_days": self.calendar_days, "days_with_events": len(self.event_days),
            "days_without_events": self.calendar_days - len(self.event_days), "rows": dict(self.rows),
            "files_written": self.files_written,
            **({"rows_without_a_day": self.rows_without_day} if any(self.rows_without_day.values()) else {}),
            **({"landing_days_removed": self.days_removed} if self.days_removed else {}),
        }


# --------------------------------------------------------------------------------------------------
# What was given
# --------------------------------------------------------------------------------------------------


def _table_files(folder: Path, table: str) -> list[Path]:
    """`<table>.csv|parquet` in `folder`, and every CSV/Parquet file below `<folder>/<table>/`."""
    out = [folder / f"{table}{s}" for s in SUFFIXES if (folder / f"{table}{s}").is_file()]
    sub = folder / table
    if sub.is_dir():
        out += sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                      and not p.name.startswith((".", "_")))
    return out


def detect(path: str | Path) -> Source:
    """What kind of history `path` is (see the module docstring); `HistoryInputError` when none."""
    from recloop.data.movielens import detect_layout

    p = Path(path).expanduser()
    if not p.exists():
        raise HistoryInputError(f"{p} does not exist: give a MovieLens folder, a folder with users, videos and "
                                "events files, or an events file")
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise HistoryInputError(f"{p} is neither a CSV nor a Parquet file: an events file must end in .csv or .parquet")
        return Source(p, "events_file", {"events": [p]})
    try:
        layout, folder = detect_layout(p)
        return Source(folder, "movielens", layout=layout)
    except ValueError:
        pass
    events = p / "events"
    if events.is_dir() and any(c.is_dir() and c.name.startswith("date=") for c in events.iterdir()):
        return Source(p, "landing")
    files = {t: _table_files(p, t) for t in TABLE_ORDER}
    if not files["events"]:
        raise HistoryInputError(
            f"{p} holds no history recloop can read: expected a MovieLens folder (u.data, ratings.dat or "
            "ratings.csv), a landing-layout folder (events/date=YYYY-MM-DD/...), or users, videos and events "
            "as .csv/.parquet files or folders (docs/data_schema.md)")
    return Source(p, "tables", {t: f for t, f in files.items() if f})


# --------------------------------------------------------------------------------------------------
# Splitting files by day
# --------------------------------------------------------------------------------------------------


def _days_of(texts: list[str | None]) -> list[str | None]:
    """The UTC day of each timestamp text, parsed as validation parses it (DuckDB TIMESTAMPTZ, no zone =
    UTC); None where it does not parse."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("t", pa.table({"t": pa.array(texts, pa.string())}))
        days = con.sql("SELECT CAST(CAST(TRY_CAST(NULLIF(trim(t), '') AS TIMESTAMPTZ) AS DATE) AS VARCHAR) AS d "
                       "FROM t").to_arrow_table().column("d").to_pylist()
    finally:
        con.close()
    return days


def split_csv(data: bytes, time_column: str) -> tuple[bytes, dict[str | None, list[bytes]]]:
    """A CSV file's header line and its records' raw lines grouped by the UTC day of `time_column`, byte
    for byte (a record spans several lines when a quoted value holds a line break). Records with the
    wrong number of fields, an unreadable time or no such column are grouped under None."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", errors="surrogateescape")
    lines = io.StringIO(text, newline="").readlines()
    if not lines:
        return b"", {}
    header_line = lines[0]
    try:
        header = next(csv.reader([header_line]))
    except (csv.Error, StopIteration):
        header = []
    where = header.index(time_column) if time_column in header else None
    body = lines[1:]
    reader = csv.reader(iter(body))
    records: list[tuple[int, int, str | None]] = []  # (first line, end line, time text or None)
    start = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error:
            # A broken quote runs to the end of the file: keep the rest as one unreadable record.
            records.append((start, len(body), None))
            start = len(body)
            break
        end = reader.line_num
        if fields:  # blank lines are skipped by ingestion too
            ok = where is not None and len(fields) == len(header)
            records.append((start, end, fields[where] if ok else None))
        start = end
    if start < len(body):
        records.append((start, len(body), None))
    days = _days_of([t for _, _, t in records])
    groups: dict[str | None, list[bytes]] = {}
    for (lo, hi, _), day in zip(records, days):
        chunk = "".join(body[lo:hi])
        if not chunk.endswith(("\n", "\r")):
            chunk += "\n"
        groups.setdefault(day, []).append(chunk.encode("utf-8", errors="surrogateescape"))
    head = header_line if header_line.endswith(("\n", "\r")) else header_line + "\n"
    return head.encode("utf-8", errors="surrogateescape"), groups


def split_parquet(data: bytes, time_column: str) -> dict[str | None, pa.Table] | None:
    """A Parquet file's rows grouped by the UTC day of `time_column` (its own schema kept); None when the
    file cannot be read (it is landed whole, and ingestion rejects it with its reason)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError):
        return None
    if time_column not in table.column_names:
        return {None: table}
    col = table.column(time_column)
    if pa.types.is_timestamp(col.type):
        utc = col.cast(pa.timestamp("us", tz="UTC")) if col.type.tz else col.cast(pa.timestamp("us"))
        days = pc.cast(pc.cast(utc, pa.timestamp("us")), pa.date32()).cast(pa.string()).to_pylist()
    else:
        days = _days_of([None if v is None else str(v) for v in col.to_pylist()])
    keys = np.array([d if d is not None else "" for d in days], dtype=object)
    out: dict[str | None, pa.Table] = {}
    for day in sorted(set(keys.tolist())):
        out[day or None] = table.take(pa.array(np.flatnonzero(keys == day)))
    return out


# --------------------------------------------------------------------------------------------------
# Landing
# --------------------------------------------------------------------------------------------------


def _landed_partitions(landing: Lake, table: str, first: str, last: str) -> set[str]:
    from recloop.ingestion import landed_days

    return set(landed_days(landing, table, first, last))


def _clear_range(landing: Lake, lake: Lake | None, first: str, last: str, written: dict[str, set[str]]) -> int:
    """Remove the days of `[first, last]` this import does not deliver, table by table, from the landing
    zone and (their bronze, silver and quarantine partitions) from the lake."""
    removed = 0
    for table in TABLE_ORDER:
        for day in sorted(_landed_partitions(landing, table, first, last) - written.get(table, set())):
            landing.delete_prefix(partition_key(table, day) + "/")
            removed += 1
            if lake is not None:
                for layer in ("bronze", "silver", "quarantine"):
                    lake.delete_partition(f"{layer}/{table}", day)
    return removed


def land(source: Source, landing: Lake, *, lake: Lake | None = None, fmt: str = "parquet") -> LandedHistory:
    """Write `source` into the landing zone, one partition per table and day, replacing the range it covers
    (see the module docstring), and record the range (progress: stage "land", in days)."""
    from recloop import partition_range, progress

    def stage(total: int):
        return progress.stage("land", total, "day")

    if source.kind == "movielens":
        out = _land_movielens(source, landing, fmt, stage)
    elif source.kind == "landing":
        out = _land_copy(source, landing, stage)
    else:
        out = _land_tables(source, landing, stage)
    written, landed = out
    landed.days_removed = _clear_range(landing, lake, landed.first, landed.last, written)
    partition_range.record_history(landing, landed.first, landed.last, source=str(source.path),
                                   days_with_events=len(landed.event_days))
    return landed


def _range_of(written: dict[str, set[str]], what: str) -> tuple[str, str, list[str]]:
    events = sorted(written.get("events", set()))
    if not events:
        raise HistoryInputError(f"{what} holds no event with a readable day: nothing to import")
    every = sorted(set().union(*written.values()))
    return every[0], every[-1], events


def _land_movielens(source, landing, fmt, stage):
    from recloop.data.movielens import read_movielens, write_landing

    try:
        tables = read_movielens(source.path)
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError, KeyError) as err:
        raise HistoryInputError(f"the {source.describe()} cannot be read: {str(err).splitlines()[0]}") from None
    if tables["events"].num_rows == 0:
        raise HistoryInputError(f"{source.describe()} holds no ratings: nothing to import")
    days_by_table: dict[str, set[str]] = {}
    import numpy as np

    for name in TABLE_ORDER:
        col = TABLES[name].time_column
        us = tables[name][col].cast(pa.int64()).to_numpy(zero_copy_only=False)
        days_by_table[name] = {str(d) for d in np.unique(us // 86_400_000_000).astype("datetime64[D]")}
    with stage(len(set().union(*days_by_table.values()))) as bar:
        result = write_landing(tables, landing, fmt, empty_tables=False, on_day=lambda _d: bar.update(1))
    first, last, events = _range_of(days_by_table, source.describe())
    landed = LandedHistory(str(source.path), f"movielens ({source.layout})", first, last, events,
                           dict(result["rows"]), sum(len(d) for d in days_by_table.values()))
    return days_by_table, landed


def _land_copy(source, landing, stage):
    files: dict[tuple[str, str], list[Path]] = {}
    for table in TABLE_ORDER:
        folder = source.path / table
        if not folder.is_dir():
            continue
        for day_dir in sorted(folder.iterdir()):
            if not (day_dir.is_dir() and day_dir.name.startswith("date=")):
                continue
            day = day_dir.name.removeprefix("date=")
            try:
                date.fromisoformat(day)
            except ValueError:
                raise HistoryInputError(f"{day_dir} is not a day folder: name it date=YYYY-MM-DD") from None
            found = sorted(p for p in day_dir.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
            if found:
                files[table, day] = found
    written: dict[str, set[str]] = {}
    for table, day in files:
        written.setdefault(table, set()).add(day)
    first, last, events = _range_of(written, source.describe())
    rows: dict[str, int] = {t: 0 for t in TABLE_ORDER}
    with stage(len(files)) as bar:
        for (table, day), found in files.items():
            landing.replace_partition(table, day, {p.name: p.read_bytes() for p in found})
            rows[table] += len(found)
            bar.update(1)
    landed = LandedHistory(str(source.path), "landing layout", first, last, events, {}, sum(len(f) for f in files.values()))
    landed.rows = {f"{t}_files": n for t, n in rows.items()}
    return written, landed


def _land_tables(source, landing, stage):
    """Split each table file by day; rows without a readable day go to the import's newest day."""
    split: dict[str, list[tuple[Path, Any]]] = {}
    for table, paths in source.files.items():
        time_column = TABLES[table].time_column
        for path in paths:
            data = path.read_bytes()
            if path.suffix == ".csv":
                head, groups = split_csv(data, time_column)
                split.setdefault(table, []).append((path, ("csv", head, groups)))
            else:
                groups = split_parquet(data, time_column)
                split.setdefault(table, []).append((path, ("parquet", data, groups)))
    written: dict[str, set[str]] = {}
    for table, items in split.items():
        for _, (_, _, groups) in items:
            for day in (groups or {}):
                if day is not None:
                    written.setdefault(table, set()).add(day)
    first, last, events = _range_of(written, source.describe())
    fallback = events[-1]
    per_partition: dict[tuple[str, str], dict[str, bytes]] = {}
    rows = {t: 0 for t in TABLE_ORDER}
    without_day = {t: 0 for t in TABLE_ORDER}
    import pyarrow.parquet as pq

    # Each source file keeps its name in the day partitions it lands in (prefixed by its folder, or its
    # number, when two sources share a name).
    names: dict[tuple[str, Path], str] = {}
    for table, items in split.items():
        used: set[str] = set()
        for i, (path, _) in enumerate(items):
            name = path.name if path.name not in used else f"{path.parent.name}-{path.name}"
            name = name if name not in used else f"{i}-{path.name}"
            used.add(name)
            names[table, path] = name
    for table, items in split.items():
        for path, (kind, head, groups) in items:
            name = names[table, path]
            if groups is None:  # an unreadable Parquet file: landed whole, rejected by ingestion with its reason
                per_partition.setdefault((table, fallback), {})[name] = head
                written.setdefault(table, set()).add(fallback)
                continue
            by_target: dict[str, list[Any]] = {}
            for day, part in groups.items():
                n = len(part) if kind == "csv" else part.num_rows
                rows[table] += n
                if day is None:
                    without_day[table] += n
                    written.setdefault(table, set()).add(fallback)
                by_target.setdefault(day or fallback, []).append(part)
            for target, parts in by_target.items():
                if kind == "csv":
                    blob = head + b"".join(line for part in parts for line in part)
                else:
                    buf = io.BytesIO()
                    pq.write_table(pa.concat_tables(parts, promote_options="permissive"), buf, compression="zstd")
                    blob = buf.getvalue()
                per_partition.setdefault((table, target), {})[name] = blob
    with stage(len(per_partition)) as bar:
        for (table, day), files in sorted(per_partition.items()):
            landing.replace_partition(table, day, files)
            bar.update(1)
    landed = LandedHistory(str(source.path), source.kind, first, last, events, rows,
                           sum(len(f) for f in per_partition.values()), without_day)
    return written, landed


def days_between(first: str, last: str) -> Iterable[str]:
    from datetime import timedelta

    d, end = date.fromisoformat(first), date.fromisoformat(last)
    while d <= end:
        yield d.isoformat()
        d += timedelta(days=1)
