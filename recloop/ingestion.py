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
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recloop.data.schemas import table as table_schema
from recloop.lake import PART_FILE, Lake, WrittenPartition

BRONZE = "bronze"
MANIFEST_KEY = b"recloop.manifest"
# Columns ingestion adds to every bronze row.
META_COLUMNS = ("_source_file", "_source_row", "_source_line", "_raw_line", "_ingest_error")
SUPPORTED = (".parquet", ".csv")
# Landing files the serving feedback endpoint writes start with this (recloop.serving.feedback.FILE_PREFIX).
FEEDBACK_PREFIX = "feedback-"


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


def _as_text(column: pa.Array) -> pa.Array:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Nested or exotic types: keep a faithful JSON rendering rather than lose the value.
        return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], pa.string())


def _decode_binary(column: pa.ChunkedArray | pa.Array, name: str, errors: list[str | None]) -> pa.Array:
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


# --- reading landing files as a stream of all-text batches ------------------------------------------

# Bytes of CSV parsed at a time (pyarrow's block size): memory stays a few blocks whatever the file's size
# (bench/ingest_memory.py), and each block is one row group of bronze (~40k rows of events).
CSV_BLOCK_BYTES = 4 << 20
# Rows of a Parquet landing file read at a time.
PARQUET_BATCH_ROWS = 131_072
# A header line longer than this is not a CSV header (a binary file, or a file without line breaks).
MAX_HEADER_BYTES = 1 << 20


def _check_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise UnreadableFile(f"header row repeats a column name: {names}")
    reserved = [n for n in names if n in META_COLUMNS]
    if reserved:
        raise UnreadableFile(f"column name(s) {', '.join(reserved)} are reserved for ingestion's own columns; rename them")


def _csv_header(path: Path) -> tuple[list[str], int]:
    """The CSV file's column names and the byte offset of its first data line; UnreadableFile for a file
    that is not UTF-8 CSV text with a header row."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
            raise UnreadableFile("not UTF-8 text (it looks like UTF-16 or binary); export the file as UTF-8 CSV")
        bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        f.seek(bom)
        line = f.readline(MAX_HEADER_BYTES + 1)
    if len(line) > MAX_HEADER_BYTES:
        raise UnreadableFile(f"the first line is longer than {MAX_HEADER_BYTES} bytes: not a CSV header row")
    first_line = line.rstrip(b"\r\n")
    if not first_line.strip():
        raise UnreadableFile("no header row: the first line of a CSV file must name its columns")
    try:
        header = next(iter(pcsv.read_csv(io.BytesIO(first_line + b"\n"),
                                         read_options=pcsv.ReadOptions(autogenerate_column_names=True)).to_pylist()), {})
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise UnreadableFile(f"header row cannot be parsed: {err}") from None
    names = [str(v) for v in header.values()]
    if any(not n.strip() for n in names):
        raise UnreadableFile(f"header row has an empty column name: {names}")
    _check_names(names)
    return names, bom + len(line)


def _csv_batches(path: Path, report: FileReport) -> Iterator[dict[str, pa.Array]]:
    """The CSV file as batches of text columns plus `_source_row`, `_source_line`, `_raw_line` and
    `_ingest_error`: lines with the wrong number of fields become rows with an `_ingest_error` (after the
    batch they were found in), cells that are not UTF-8 are kept escaped and their rows flagged."""
    names, offset = _csv_header(path)
    report.columns = names
    malformed: list[tuple[int | None, str, int, int]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        malformed.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    # The file is cut at line ends into blocks of about CSV_BLOCK_BYTES, each parsed on its own: a line end
    # ends a row (pyarrow's default, without newlines in values, cuts its own blocks the same way), and
    # memory holds one block whatever the file's size (pyarrow's streaming reader, open_csv, reads ahead
    # of the batches consumed: its memory grew with the file).
    parse_options = pcsv.ParseOptions(invalid_row_handler=on_invalid)
    # Only an empty unquoted field is null: "NA", "null", "NaN" are values (an id, a country, a number
    # validation refuses), not pyarrow's default null spellings.
    convert_options = pcsv.ConvertOptions(column_types={n: pa.binary() for n in names}, null_values=[""],
                                          strings_can_be_null=True, quoted_strings_can_be_null=False)
    done = 0
    line = 1  # lines before the block (the header is line 1)
    with open(path, "rb") as f:
        f.seek(offset)
        carry = b""
        while True:
            data = f.read(CSV_BLOCK_BYTES)
            buf = carry + data if carry else data
            if data:
                cut = buf.rfind(b"\n") + 1
                if not cut:  # no line end yet (a very long line): read on
                    carry = buf
                    continue
                block, carry = buf[:cut], buf[cut:]
            else:
                block, carry = buf, b""
            del buf
            if block.strip(b"\r\n"):
                read_options = pcsv.ReadOptions(use_threads=False, column_names=names, block_size=len(block) + 1)
                batch = pcsv.read_csv(io.BytesIO(block), read_options=read_options, parse_options=parse_options,
                                      convert_options=convert_options).combine_chunks()
                n = batch.num_rows
                if n:
                    errors: list[str | None] = [None] * n
                    cols = {c: _decode_binary(batch.column(c).combine_chunks(), c, errors) for c in names}
                    report.encoding_errors += sum(e is not None for e in errors)
                    cols["_source_row"] = pa.array(range(done + 1, done + n + 1), pa.int64())
                    cols["_source_line"] = pa.nulls(n, pa.int64())
                    cols["_raw_line"] = pa.nulls(n, pa.string())
                    cols["_ingest_error"] = pa.array(errors, pa.string())
                    done += n
                    report.rows += n
                    del batch
                    yield cols
                if malformed:
                    m = len(malformed)
                    bad: dict[str, pa.Array] = {c: pa.nulls(m, pa.string()) for c in names}
                    bad["_source_row"] = pa.nulls(m, pa.int64())
                    # pyarrow numbers the block's lines from 1
                    bad["_source_line"] = pa.array([None if r[0] is None else r[0] + line for r in malformed], pa.int64())
                    bad["_raw_line"] = pa.array([r[1] for r in malformed], pa.string())
                    bad["_ingest_error"] = pa.array(
                        [f"malformed line: expected {r[2]} fields, found {r[3]}" for r in malformed], pa.string())
                    report.rows += m
                    report.malformed_rows += m
                    malformed.clear()
                    yield bad
            line += block.count(b"\n")
            if not data:
                return


def _parquet_columns(path: Path) -> list[str]:
    try:
        names = list(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as err:
        raise UnreadableFile(f"not a readable Parquet file: {err}") from None
    _check_names(names)
    return names


def _parquet_batches(path: Path, report: FileReport) -> Iterator[dict[str, pa.Array]]:
    """The Parquet file as batches of text columns (a value of another type as its text: `1.5`, `true`;
    a nested value as JSON) plus the ingestion columns."""
    report.columns = _parquet_columns(path)
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UnreadableFile(f"not a readable Parquet file: {err}") from None
    done = 0
    with source:
        for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, use_threads=False):
            n = batch.num_rows
            if not n:
                continue
            cols = {c: _as_text(batch.column(c)) for c in batch.schema.names}
            cols["_source_row"] = pa.array(range(done + 1, done + n + 1), pa.int64())
            cols["_source_line"] = pa.nulls(n, pa.int64())
            cols["_raw_line"] = pa.nulls(n, pa.string())
            cols["_ingest_error"] = pa.nulls(n, pa.string())
            done += n
            report.rows += n
            yield cols


def _file_format(name: str) -> str:
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    raise UnreadableFile(f"unsupported file type; expected one of {', '.join(SUPPORTED)}")


def _columns_of(path: Path, fmt: str) -> list[str]:
    return _csv_header(path)[0] if fmt == "csv" else _parquet_columns(path)


def _batches(path: Path, fmt: str, report: FileReport) -> Iterator[dict[str, pa.Array]]:
    return _csv_batches(path, report) if fmt == "csv" else _parquet_batches(path, report)


def _collect(batches: Iterator[dict[str, pa.Array]], report: FileReport) -> tuple[pa.Table, FileReport]:
    tables = [pa.table(b) for b in batches]
    out = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in report.columns})
    return out, report


def read_csv_file(data: bytes, name: str) -> tuple[pa.Table, FileReport]:
    """Parse CSV bytes into an all-text table with per-row ingest errors (what ingestion streams, whole);
    a file that is not CSV text at all raises UnreadableFile."""
    with tempfile.TemporaryDirectory(prefix="recloop-csv-") as tmp:
        path = Path(tmp) / "file.csv"
        path.write_bytes(data)
        report = FileReport(name=name, format="csv", bytes=len(data))
        try:
            return _collect(_csv_batches(path, report), report)
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            raise UnreadableFile(f"not parseable as CSV: {err}") from None


def read_parquet_file(data: bytes, name: str) -> tuple[pa.Table, FileReport]:
    """Read Parquet bytes into an all-text table; an unreadable file raises UnreadableFile."""
    with tempfile.TemporaryDirectory(prefix="recloop-parquet-") as tmp:
        path = Path(tmp) / "file.parquet"
        path.write_bytes(data)
        report = FileReport(name=name, format="parquet", bytes=len(data))
        try:
            return _collect(_parquet_batches(path, report), report)
        except (pa.ArrowInvalid, OSError) as err:
            raise UnreadableFile(f"not a readable Parquet file: {err}") from None


def _empty_bronze(table_name: str) -> pa.Table:
    return _bronze_schema(table_schema(table_name).columns).empty_table()


def _bronze_schema(data_columns: list[str]) -> pa.Schema:
    """Bronze: the files' columns as text (their union, in order of appearance), then ingestion's own."""
    fields = [pa.field(c, pa.string()) for c in data_columns]
    fields.append(pa.field("_source_file", pa.string()))
    fields += [pa.field(c, pa.int64()) for c in ("_source_row", "_source_line")]
    fields += [pa.field(c, pa.string()) for c in ("_raw_line", "_ingest_error")]
    return pa.schema(fields)


def is_feedback_file(key: str) -> bool:
    """Whether a landing file was written by the serving feedback endpoint (`feedback-*.parquet`,
    `recloop.serving.feedback`) rather than delivered by a batch source."""
    return key.rsplit("/", 1)[-1].startswith(FEEDBACK_PREFIX)


def ingestion_order(keys: list[str]) -> list[str]:
    """The order a partition's files are ingested in, which decides which copy of a duplicated key is
    kept (the first): delivered (batch) files first, then the feedback files, each group by name. So
    an event reported through feedback can never displace a delivered event with the same id."""
    return sorted(keys, key=lambda k: (is_feedback_file(k), k))


def landing_files(landing: Lake, table_name: str, partition: str) -> list[str]:
    return ingestion_order([k for k in landing.list_keys(f"{table_name}/date={partition}/")
                            if not k.rsplit("/", 1)[-1].startswith((".", "_"))])


class _Restart(Exception):
    """A file failed in the middle of its stream: ingest the partition again without it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key, self.reason = key, reason


def ingest_partition(
    table_name: str,
    partition: str,
    *,
    landing: Lake,
    lake: Lake,
    ingested_at: datetime | None = None,
    files: list[str] | None = None,
    keep_rows: int = 0,
) -> IngestResult:
    """Land `table_name`'s files for `partition` from `landing` into `bronze/<table>/date=<partition>`
    (`files`: the partition's landing keys when the caller listed them already; they are ingested in
    `ingestion_order`). Files are read and written as a stream of batches, so memory does not grow with a
    file's size. The bronze table is returned in memory (`IngestResult.table`) when it has at most
    `keep_rows` rows.

    Re-running replaces the bronze partition, so a partition is never duplicated.
    """
    table_schema(table_name)  # a clear error for an unknown table
    ingested_at = ingested_at or datetime.now(timezone.utc)
    keys = ingestion_order(landing_files(landing, table_name, partition) if files is None else list(files))
    broken: dict[str, str] = {}  # files that failed mid-stream on an earlier attempt -> reason
    while True:
        try:
            return _ingest_once(table_name, partition, keys, broken, landing=landing, lake=lake,
                                ingested_at=ingested_at, keep_rows=keep_rows)
        except _Restart as restart:
            broken[restart.key] = restart.reason


def _ingest_once(table_name: str, partition: str, keys: list[str], broken: dict[str, str], *, landing: Lake,
                 lake: Lake, ingested_at: datetime, keep_rows: int) -> IngestResult:
    manifest = Manifest(table=table_name, partition=partition, ingested_at=ingested_at.isoformat())

    def reject(key: str, reason: str) -> None:
        """The whole file to `quarantine/files/`, named in the manifest with its reason."""
        target = f"quarantine/files/{table_name}/date={partition}/{key.rsplit('/', 1)[-1]}"
        with landing.local_file(key) as path:
            local = lake.local_path(target)
            if local is not None:
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, local)
                kept = str(local)
            else:
                kept = lake.write_bytes(target, path.read_bytes())
        manifest.rejected_files.append(RejectedFile(name=key, reason=reason, kept_at=kept))

    # First the headers: the bronze schema (the union of the files' columns) is fixed before any row.
    readable: list[tuple[str, str]] = []
    names: list[str] = []
    for key in keys:
        if key in broken:
            reject(key, broken[key])
            continue
        try:
            fmt = _file_format(key.rsplit("/", 1)[-1])
            with landing.local_file(key) as path:
                cols = _columns_of(path, fmt)
        except UnreadableFile as err:
            reject(key, str(err))
            continue
        readable.append((key, fmt))
        names.extend(c for c in cols if c not in names)
    if not readable:
        names = table_schema(table_name).columns
    schema = _bronze_schema(names)

    kept: list[pa.RecordBatch] | None = [] if keep_rows > 0 else None
    with lake.partition_writer(f"{BRONZE}/{table_name}", partition, schema, store_schema=False) as writer:
        for key, fmt in readable:
            with landing.local_file(key) as path:
                report = FileReport(name=key, format=fmt, bytes=path.stat().st_size)
                try:
                    for cols in _batches(path, fmt, report):
                        n = len(cols["_source_row"])
                        cols["_source_file"] = pa.array([key] * n, pa.string())
                        batch = pa.RecordBatch.from_arrays(
                            [cols[c] if c in cols else pa.nulls(n, pa.string()) for c in schema.names], schema=schema)
                        writer.write_batch(batch)
                        if kept is not None:
                            kept.append(batch)
                            if manifest.rows + report.rows > keep_rows:
                                kept = None
                except UnreadableFile as err:
                    raise _Restart(key, str(err)) from None
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError, OSError) as err:
                    what = "CSV" if fmt == "csv" else "Parquet"
                    reason = f"not parseable as {what}: {str(err).splitlines()[0][:300]}"
                    if fmt == "csv" and "Expected" in reason and "columns" in reason:
                        reason += (" (a line with the wrong number of fields that is not UTF-8 either: the file "
                                   "cannot be split into rows; export it as UTF-8 CSV)")
                    raise _Restart(key, reason) from None
            manifest.files.append(report)
            manifest.rows += report.rows
        writer.add_key_value_metadata({MANIFEST_KEY: manifest.to_json().encode()})
    key = f"{BRONZE}/{table_name}/date={partition}/{PART_FILE}"
    written = WrittenPartition(uri=lake.uri(key), rows=manifest.rows, bytes=lake.size(key))
    table = None
    if kept is not None:
        table = pa.Table.from_batches(kept, schema=schema).replace_schema_metadata(
            {MANIFEST_KEY: manifest.to_json().encode()})
    return IngestResult(manifest=manifest, written=written, table=table)


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
                result = ingest_partition(t, day, landing=landing, lake=lake, ingested_at=ingested_at, files=keys,
                                          keep_rows=max(keep_rows, 0))
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
