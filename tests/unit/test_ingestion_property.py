"""Property-based: generated bad rows and bad files through ingestion and GX validation.

Every run ends in one of two ways, never in another exception: the partition is validated and
silver + quarantine = the rows ingested (= the rows written, for a well-formed CSV), or it stops at the
schema check with its reasons (SchemaValidationError). The number of examples is bounded so the module
runs in well under a minute.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.config import REPO_ROOT
from recloop.ingestion import ingest_partition, read_bronze
from recloop.lake import LocalLake
from recloop.validation import SchemaValidationError, validate_partition

EXPECTATIONS = REPO_ROOT / "expectations"
DAY = "2025-01-02"
INGESTED_AT = datetime(2025, 1, 3, 6, 0, tzinfo=timezone.utc)
COLUMNS = ["event_id", "user_id", "video_id", "event_time", "surface", "position", "watched_s", "completed", "liked"]
# pyarrow cannot hand a malformed line that is not UTF-8 to the invalid-row handler (it reports the
# decoding error as "ignored" and fails the parse): the file is then rejected whole, with its reason.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

# Text a CSV cell can hold on one line (line breaks and NUL are in the garbage lines below).
one_line_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
weird = st.one_of(
    one_line_text,
    st.sampled_from(["", " ", "NaN", "nan", "inf", "-Infinity", "1.5", "1e400", "-0", "yes", "no", "T", "F", "1", "0",
                     "TRUE", "False", "NA", "null", "0001-01-01", "9999-12-31T23:59:59-05:00", "2025-02-30",
                     "2025-01-02T10:00:00Z", "2025-01-03T00:00:00Z", "2025-01-02 23:59:59.999999",
                     "99999999999999999999", "-1", "\u00e9t\u00e9", "\U0001f600", "a,b", 'say "hi"']),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),  # huge strings
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)
valid = {
    "event_id": st.sampled_from(["e1", "e2", "e3", "e1"]),
    "user_id": st.sampled_from(["u1", "u2"]),
    "video_id": st.sampled_from(["v1"]),
    "event_time": st.sampled_from(["2025-01-02T10:00:00Z", "2025-01-02 12:00:00", "2025-01-02T13:00:00+01:00"]),
    "surface": st.sampled_from(["home", "search"]),
    "position": st.integers(0, 20).map(str),
    "watched_s": st.floats(0, 120, allow_nan=False).map(lambda v: f"{v:.3f}"),
    "completed": st.sampled_from(["true", "false", "True", "FALSE"]),
    "liked": st.sampled_from(["true", "false", ""]),
}
cell = {c: st.one_of(valid[c], valid[c], weird) for c in COLUMNS}
rows_strategy = st.lists(st.fixed_dictionaries(cell), max_size=25)


@st.composite
def one_bad_cell_rows(draw) -> list[dict[str, str]]:
    """Rows with unique ids, each valid but for at most one cell: that cell alone decides the row."""
    rows = []
    for i in range(draw(st.integers(1, 25))):
        r = {c: draw(valid[c]) for c in COLUMNS}
        r["event_id"] = f"r{i}"
        column = draw(st.sampled_from([None, *COLUMNS[1:]]))
        if column is not None:
            r[column] = draw(weird)
        rows.append(r)
    return rows
garbage_line = st.one_of(st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b),
                         st.sampled_from([b"only,three,fields", b'"unclosed quote,x', b"\xff\xfe\xfa", b"a\rb"]))


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("property")
    landing, lake = LocalLake(root / "landing"), LocalLake(root / "lake")
    landing.write_bytes(f"users/date={DAY}/part-0.csv",
                        b"user_id,country,age_bucket,signup_time,device\n"
                        b"u1,US,25-34,2025-01-01T08:00:00Z,ios\nu2,FR,18-24,2025-01-01T09:00:00Z,web\n")
    landing.write_bytes(f"videos/date={DAY}/part-0.csv",
                        b"video_id,title,tags,category,creator_id,duration_s,upload_time\n"
                        b"v1,Cats,cats,pets,c1,120,2024-12-30T00:00:00Z\n")
    for t in ("users", "videos"):
        ingest_partition(t, DAY, landing=landing, lake=lake, ingested_at=INGESTED_AT)
        validate_partition(lake, t, DAY, expectations_dir=EXPECTATIONS)
    return landing, lake


def _csv(rows: list[dict[str, str]], columns: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r[c] for c in columns])
    return buf.getvalue().encode()


def _run(lakes, files: dict[str, bytes]) -> tuple[int, object]:
    """Ingest and validate the files as the day's events; returns (bronze rows, result or the schema error)."""
    landing, lake = lakes
    landing.delete_partition("events", DAY)
    for name, data in files.items():
        landing.write_bytes(f"events/date={DAY}/{name}", data)
    ingested = ingest_partition("events", DAY, landing=landing, lake=lake, ingested_at=INGESTED_AT)
    bronze, manifest = read_bronze(lake, "events", DAY)
    assert bronze.num_rows == manifest.rows == ingested.manifest.rows == sum(f.rows for f in manifest.files)
    try:
        result = validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    except SchemaValidationError as err:
        assert err.reasons and all(isinstance(r, str) and r for r in err.reasons)
        return bronze.num_rows, err
    assert result.conserved and result.ingested == bronze.num_rows
    silver = lake.read_partition("silver/events", DAY)
    quarantine = lake.read_partition("quarantine/events", DAY)
    assert silver.num_rows + quarantine.num_rows == bronze.num_rows
    assert all(quarantine.column("reason").to_pylist())
    # what silver holds is exact: integers whole, booleans booleans, numbers finite, the day's events only
    for r in silver.to_pylist():
        assert r["event_time"].date().isoformat() == DAY
        assert math.isfinite(r["watched_s"]) and r["watched_s"] >= 0
    return bronze.num_rows, result


@SETTINGS
@given(rows=rows_strategy, drop=st.sampled_from([None, None, None, "liked", "watched_s"]),
       extra=st.booleans(), order=st.randoms(use_true_random=False))
def test_generated_rows_are_conserved(lakes, rows, drop, extra, order):
    columns = [c for c in COLUMNS if c != drop] + (["debug"] if extra else [])
    order.shuffle(columns)
    rows = [{**r, "debug": "x"} for r in rows]
    n, result = _run(lakes, {"part-0.csv": _csv(rows, columns)})
    assert n == len(rows)  # a well-formed CSV: one bronze row per data line
    if drop is not None:
        assert isinstance(result, SchemaValidationError) and drop in str(result)
    elif not rows:
        assert isinstance(result, SchemaValidationError) and "empty" in str(result)
    else:
        assert not isinstance(result, SchemaValidationError), result


@SETTINGS
@given(rows=one_bad_cell_rows())
def test_silver_holds_only_exact_values(lakes, rows):
    _, result = _run(lakes, {"part-0.csv": _csv(rows, COLUMNS)})
    assert not isinstance(result, SchemaValidationError), result
    source = {r["event_id"]: r for r in rows}
    for r in lakes[1].read_partition("silver/events", DAY).to_pylist():
        raw = {c: source[r["event_id"]][c].strip() for c in COLUMNS}
        # an integer from digits only (never a rounded 1.5), a boolean from true/false only
        assert raw["position"] == "" or raw["position"].lstrip("+-").isdigit(), raw["position"]
        for c in ("completed", "liked"):
            assert raw[c].lower() in ("", "true", "false"), raw[c]
            assert r[c] is None or r[c] == (raw[c].lower() == "true")


@SETTINGS
@given(rows=rows_strategy, garbage=st.lists(st.tuples(st.integers(0, 30), garbage_line), max_size=5))
def test_garbage_lines_never_crash_and_rows_are_conserved(lakes, rows, garbage):
    lines = _csv(rows, COLUMNS).split(b"\n")
    for at, line in garbage:
        lines.insert(1 + at % max(len(lines) - 1, 1), line)
    _run(lakes, {"part-0.csv": b"\n".join(lines)})


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


typed_column = st.sampled_from(["string", "int64", "float64", "bool", "timestamp", "list", "null", "binary"])


@st.composite
def parquet_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 8))
    cols = {}
    for c in COLUMNS:
        kind = draw(typed_column)
        if kind == "string":
            values = draw(st.lists(st.one_of(valid[c], weird, st.none()), min_size=n, max_size=n))
            cols[c] = pa.array(values, pa.string())
        elif kind == "int64":
            cols[c] = pa.array(draw(st.lists(st.integers(-(2**63), 2**63 - 1) | st.none(), min_size=n, max_size=n)), pa.int64())
        elif kind == "float64":
            cols[c] = pa.array(draw(st.lists(st.floats() | st.none(), min_size=n, max_size=n)), pa.float64())
        elif kind == "bool":
            cols[c] = pa.array(draw(st.lists(st.booleans() | st.none(), min_size=n, max_size=n)), pa.bool_())
        elif kind == "timestamp":
            cols[c] = pa.array(draw(st.lists(st.datetimes(timezones=st.just(timezone.utc)) | st.none(), min_size=n, max_size=n)),
                               pa.timestamp("us", tz="UTC"))
        elif kind == "list":
            cols[c] = pa.array(draw(st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=n, max_size=n)), pa.list_(pa.int64()))
        elif kind == "binary":
            cols[c] = pa.array(draw(st.lists(st.binary(max_size=8), min_size=n, max_size=n)), pa.binary())
        else:
            cols[c] = pa.nulls(n)
    return pa.table(cols)


@SETTINGS
@given(table=parquet_tables())
def test_generated_parquet_files_are_conserved(lakes, table):
    n, _ = _run(lakes, {"part-0.parquet": _parquet(table)})
    assert n == table.num_rows


GOOD_CSV = _csv([{"event_id": "g1", "user_id": "u1", "video_id": "v1", "event_time": "2025-01-02T10:00:00Z",
                  "surface": "home", "position": "0", "watched_s": "5", "completed": "true", "liked": "false"}], COLUMNS)
bad_files = st.one_of(
    st.just(("empty.csv", b"")),
    st.just(("header-only.csv", ",".join(COLUMNS).encode() + b"\n")),
    st.binary(max_size=300).map(lambda b: ("garbage.csv", b)),
    st.binary(max_size=300).map(lambda b: ("garbage.parquet", b)),
    st.just(("utf16.csv", GOOD_CSV.decode().encode("utf-16"))),
    st.integers(1, 200).map(lambda k: ("cut.parquet", _parquet(pa.table({c: ["x"] * 50 for c in COLUMNS}))[:-k])),
    st.just(("events.json", b'{"event_id": "e1"}\n')),
    st.just(("reserved.csv", GOOD_CSV.replace(b"liked\n", b"_source_row\n", 1))),
    st.just(("twice.csv", GOOD_CSV.replace(b"liked\n", b"event_id\n", 1))),
    st.just(("no-lines.csv", b"x" * 5000)),
)


@SETTINGS
@given(files=st.lists(bad_files, min_size=1, max_size=3, unique_by=lambda f: f[0]), with_good=st.booleans())
def test_bad_files_stop_the_day_with_a_reason_and_never_crash(lakes, files, with_good):
    named = dict(files)
    if with_good:
        named["part-0.csv"] = GOOD_CSV
    n, result = _run(lakes, named)
    landing, lake = lakes
    _, manifest = read_bronze(lake, "events", DAY)
    for rejected in manifest.rejected_files:
        assert rejected.reason and lake.exists(rejected.kept_at.split(str(lake.root) + "/", 1)[-1])
        assert isinstance(result, SchemaValidationError) and rejected.name in str(result)
