"""Ingestion: land one daily partition of one table from the landing zone into the lake's bronze layer.

Bronze keeps rows exactly as they came: every source column as text (so nothing is lost to a failed
type conversion), plus where each row came from and what, if anything, already went wrong reading it
(`_ingest_error`: a malformed line, bytes that are not UTF-8). Typing and rules are validation's job.
Files that cannot be read at all are copied whole to `quarantine/files/` and named in the partition's
manifest, which travels inside the Parquet file's metadata so a partition and its manifest are always
replaced together.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recloop.data.schemas import table as table_schema
from recloop.lake import Lake, WrittenPartition

BRONZE = "bronze"
MANIFEST_KEY = b"recloop.manifest"
# Columns ingestion adds to every bronze row.
META_COLUMNS = ("_source_file", "_source_row", "_source_line", "_raw_line", "_ingest_error")
SUPPORTED = (".parquet", ".csv")


@dataclass
class FileReport:
    name: str
    format: str
    bytes: int
    rows: int = 0
    malformed_rows: int = 0
    encoding_errors: int = 0
    columns: list[str] = field(default_factory=list)


@dataclass
class RejectedFile:
    name: str
    reason: str
    kept_at: str


@dataclass
class Manifest:
    table: str
    partition: str
    ingested_at: str
    rows: int = 0
    files: list[FileReport] = field(default_factory=list)
    rejected_files: list[RejectedFile] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        raw = json.loads(text)
        raw["files"] = [FileReport(**f) for f in raw.get("files", [])]
        raw["rejected_files"] = [RejectedFile(**f) for f in raw.get("rejected_files", [])]
        return cls(**raw)

    @property
    def ingested_time(self) -> datetime:
        return datetime.fromisoformat(self.ingested_at)


@dataclass(frozen=True)
class IngestResult:
    manifest: Manifest
    written: WrittenPartition
    # The bronze table itself, when the caller asked to keep it (a range validated right after ingestion).
    table: pa.Table | None = field(default=None, compare=False, repr=False)


class UnreadableFile(Exception):
    """A landing file that cannot be parsed at all; the file is kept whole in quarantine."""


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Nested or exotic types: keep a faithful JSON rendering rather than lose the value.
        return pa.chunked_array([pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())])


def _decode_binary(column: pa.ChunkedArray, name: str, errors: list[str | None]) -> pa.Array:
    """Binary CSV cells to text; a cell that is not UTF-8 is kept (escaped) and its row flagged."""
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    values = []
    for i, raw in enumerate(column.to_pylist()):
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            bad = raw[err.start : err.start + 1].hex()
            values.append(raw.decode("utf-8", errors="backslashreplace"))
            msg = f"column {name} is not valid UTF-8 (byte 0x{bad} at offset {err.start})"
            errors[i] = msg if errors[i] is None else f"{errors[i]}; {msg}"
    return pa.array(values, pa.string())


def read_csv_file(data: bytes, name: str) -> tuple[pa.Table, FileReport]:
    """Parse a CSV file into an all-text table with per-row ingest errors.

    Lines with the wrong number of fields and cells that are not UTF-8 become rows with an
    `_ingest_error`; a file that is not CSV text at all raises UnreadableFile.
    """
    report = FileReport(name=name, format="csv", bytes=len(data))
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise UnreadableFile("not UTF-8 text (it looks like UTF-16 or binary); export the file as UTF-8 CSV")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not first_line.strip():
        raise UnreadableFile("no header row: the first line of a CSV file must name its columns")
    try:
        header = next(iter(pcsv.read_csv(io.BytesIO(first_line + b"\n"), read_options=pcsv.ReadOptions(autogenerate_column_names=True)).to_pylist()), {})
        names = [str(v) for v in header.values()]
    except pa.ArrowInvalid as err:
        raise UnreadableFile(f"header row cannot be parsed: {err}") from None
    if len(set(names)) != len(names):
        raise UnreadableFile(f"header row repeats a column name: {names}")

    malformed: list[tuple[int | None, str, int, int]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        malformed.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    try:
        parsed = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(use_threads=False, column_names=names, skip_rows=1),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.binary() for n in names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise UnreadableFile(f"not parseable as CSV: {err}") from None

    errors: list[str | None] = [None] * parsed.num_rows
    columns = {n: _decode_binary(parsed.column(n), n, errors) for n in names}
    report.encoding_errors = sum(e is not None for e in errors)
    n = parsed.num_rows
    columns["_source_row"] = pa.array(range(1, n + 1), pa.int64())
    columns["_source_line"] = pa.nulls(n, pa.int64())
    columns["_raw_line"] = pa.nulls(n, pa.string())
    columns["_ingest_error"] = pa.array(errors, pa.string())
    good = pa.table(columns)

    if malformed:
        bad_cols: dict[str, pa.Array] = {c: pa.nulls(len(malformed), pa.string()) for c in names}
        bad_cols["_source_row"] = pa.nulls(len(malformed), pa.int64())
        # pyarrow numbers physical lines of the file, the header being line 1.
        bad_cols["_source_line"] = pa.array([m[0] for m in malformed], pa.int64())
        bad_cols["_raw_line"] = pa.array([m[1] for m in malformed], pa.string())
        bad_cols["_ingest_error"] = pa.array(
            [f"malformed line: expected {m[2]} fields, found {m[3]}" for m in malformed], pa.string()
        )
        good = pa.concat_tables([good, pa.table(bad_cols)])
    report.rows = good.num_rows
    report.malformed_rows = len(malformed)
    report.columns = names
    return good, report


def read_parquet_file(data: bytes, name: str) -> tuple[pa.Table, FileReport]:
    """Read a Parquet file into an all-text table; an unreadable file raises UnreadableFile."""
    report = FileReport(name=name, format="parquet", bytes=len(data))
    try:
        src = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowInvalid, OSError) as err:
        raise UnreadableFile(f"not a readable Parquet file: {err}") from None
    n = src.num_rows
    columns = {c: _as_text(src.column(c)) for c in src.column_names}
    columns["_source_row"] = pa.array(range(1, n + 1), pa.int64())
    columns["_source_line"] = pa.nulls(n, pa.int64())
    columns["_raw_line"] = pa.nulls(n, pa.string())
    columns["_ingest_error"] = pa.nulls(n, pa.string())
    report.rows = n
    report.columns = list(src.column_names)
    return pa.table(columns), report


def _unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate per-file tables, filling columns a file lacks with nulls (the schema check sees it)."""
    names: list[str] = []
    for t in tables:
        names.extend(c for c in t.column_names if c not in names)
    aligned = []
    for t in tables:
        cols = {}
        for c in names:
            if c in t.column_names:
                cols[c] = t.column(c)
            else:
                cols[c] = pa.nulls(t.num_rows, pa.int64() if c in ("_source_row", "_source_line") else pa.string())
        aligned.append(pa.table(cols))
    return pa.concat_tables(aligned)


def _empty_bronze(table_name: str) -> pa.Table:
    cols: dict[str, pa.Array] = {c: pa.array([], pa.string()) for c in table_schema(table_name).columns}
    cols["_source_file"] = pa.array([], pa.string())
    for c in ("_source_row", "_source_line"):
        cols[c] = pa.array([], pa.int64())
    for c in ("_raw_line", "_ingest_error"):
        cols[c] = pa.array([], pa.string())
    return pa.table(cols)


def landing_files(landing: Lake, table_name: str, partition: str) -> list[str]:
    return [k for k in landing.list_keys(f"{table_name}/date={partition}/") if not k.rsplit("/", 1)[-1].startswith((".", "_"))]


def ingest_partition(
    table_name: str,
    partition: str,
    *,
    landing: Lake,
    lake: Lake,
    ingested_at: datetime | None = None,
    files: list[str] | None = None,
) -> IngestResult:
    """Land `table_name`'s files for `partition` from `landing` into `bronze/<table>/date=<partition>`
    (`files`: the partition's landing keys when the caller listed them already).

    Re-running replaces the bronze partition, so a partition is never duplicated.
    """
    table_schema(table_name)  # a clear error for an unknown table
    ingested_at = ingested_at or datetime.now(timezone.utc)
    manifest = Manifest(table=table_name, partition=partition, ingested_at=ingested_at.isoformat())
    tables: list[pa.Table] = []
    for key in (landing_files(landing, table_name, partition) if files is None else files):
        name = key.rsplit("/", 1)[-1]
        data = landing.read_bytes(key)
        try:
            if name.endswith(".csv"):
                parsed, report = read_csv_file(data, key)
            elif name.endswith(".parquet"):
                parsed, report = read_parquet_file(data, key)
            else:
                raise UnreadableFile(f"unsupported file type; expected one of {', '.join(SUPPORTED)}")
        except UnreadableFile as err:
            kept = lake.write_bytes(f"quarantine/files/{table_name}/date={partition}/{name}", data)
            manifest.rejected_files.append(RejectedFile(name=key, reason=str(err), kept_at=kept))
            continue
        parsed = parsed.append_column("_source_file", pa.array([key] * parsed.num_rows, pa.string()))
        tables.append(parsed)
        manifest.files.append(report)

    bronze = _unify(tables) if tables else _empty_bronze(table_name)
    manifest.rows = bronze.num_rows
    bronze = bronze.replace_schema_metadata({MANIFEST_KEY: manifest.to_json().encode()})
    written = lake.write_partition(f"{BRONZE}/{table_name}", partition, bronze)
    return IngestResult(manifest=manifest, written=written, table=bronze)


def landed_days(landing: Lake, table_name: str, first: str | None = None, last: str | None = None) -> dict[str, list[str]]:
    """Day -> landing keys of `table_name` (one listing of the table's folder), for the days in
    `[first, last]` that hold at least one file."""
    out: dict[str, list[str]] = {}
    for key in landing.list_keys(f"{table_name}/"):
        parts = key.split("/")
        if len(parts) != 3 or not parts[1].startswith("date=") or parts[2].startswith((".", "_")):
            continue
        day = parts[1].removeprefix("date=")
        if (first is None or day >= first) and (last is None or day <= last):
            out.setdefault(day, []).append(key)
    return dict(sorted(out.items()))


def ingest_range(
    landing: Lake,
    lake: Lake,
    first: str,
    last: str,
    *,
    tables: tuple[str, ...] | list[str] | None = None,
    ingested_at: datetime | None = None,
    keep_rows: int = 0,
) -> dict[str, dict[str, IngestResult]]:
    """Every landed day of `[first, last]` into bronze, one partition per table and day as
    `ingest_partition` writes it (one listing of each table's landing folder, one ingestion time for the
    whole range). Days without landing files of a table are left alone. Returns table -> day -> result;
    the results keep their bronze tables (`IngestResult.table`) while they hold `keep_rows` rows in all,
    so a validation right after needs not read them again."""
    from recloop import progress
    from recloop.data.schemas import TABLE_ORDER

    tables = tuple(tables or TABLE_ORDER)
    ingested_at = ingested_at or datetime.now(timezone.utc)
    landed = {t: landed_days(landing, t, first, last) for t in tables}
    out: dict[str, dict[str, IngestResult]] = {t: {} for t in tables}
    with progress.stage("ingest", sum(len(d) for d in landed.values()), "partition") as bar:
        for t in tables:
            for day, keys in landed[t].items():
                result = ingest_partition(t, day, landing=landing, lake=lake, ingested_at=ingested_at, files=keys)
                keep_rows -= result.manifest.rows
                out[t][day] = result if keep_rows >= 0 else replace(result, table=None)
                bar.update(1)
    return out


def read_manifest(lake: Lake, table_name: str, partition: str) -> tuple[list[str], Manifest]:
    """The bronze partition's columns and manifest, from the Parquet footer only (no rows read)."""
    from recloop.lake import PART_FILE, partition_key

    key = f"{partition_key(f'{BRONZE}/{table_name}', partition)}/{PART_FILE}"
    path = lake.local_path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no bronze partition {partition} of {table_name} at {path}")
        schema = pq.read_schema(path)
    else:
        schema = pq.read_schema(io.BytesIO(lake.read_bytes(key)))
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        raise ValueError(f"bronze partition {table_name}/{partition} has no manifest; re-ingest it")
    return list(schema.names), Manifest.from_json(meta[MANIFEST_KEY])


def read_bronze(lake: Lake, table_name: str, partition: str) -> tuple[pa.Table, Manifest]:
    """The bronze partition and its manifest; FileNotFoundError if it was never ingested."""
    t = lake.read_partition(f"{BRONZE}/{table_name}", partition)
    meta = t.schema.metadata or {}
    if MANIFEST_KEY not in meta:
        raise ValueError(f"bronze partition {table_name}/{partition} has no manifest; re-ingest it")
    return t, Manifest.from_json(meta[MANIFEST_KEY])


__all__ = [
    "BRONZE",
    "META_COLUMNS",
    "IngestResult",
    "Manifest",
    "UnreadableFile",
    "ingest_partition",
    "ingest_range",
    "landed_days",
    "read_bronze",
    "read_manifest",
    "read_csv_file",
    "read_parquet_file",
]
