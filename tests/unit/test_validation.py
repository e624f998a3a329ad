"""Ingestion + Great Expectations validation on bad input: every row accepted or quarantined with a reason."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT
from recloop.ingestion import ingest_partition, read_bronze
from recloop.lake import LocalLake
from recloop.validation import SchemaValidationError, check_schema, read_quarantine, validate_partition

EXPECTATIONS = REPO_ROOT / "expectations"
DAY = "2025-01-02"
INGESTED_AT = datetime(2025, 1, 3, 6, 0, tzinfo=timezone.utc)

USERS_CSV = """user_id,country,age_bucket,signup_time,device
u1,US,25-34,2025-01-01T08:00:00Z,ios
u2,FR,18-24,2025-01-01T09:00:00Z,android
u3,DE,35-44,2025-01-02T10:00:00Z,web
"""
VIDEOS_CSV = """video_id,title,tags,category,creator_id,duration_s,upload_time
v1,Cats,cats|funny,pets,c1,120,2024-12-30T00:00:00Z
v2,Goals,football,sports,c2,300,2024-12-31T00:00:00Z
v3,Soup,recipes|soup,cooking,c3,600,2025-01-02T07:00:00Z
"""
HEADER = "event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked,debug_flag\n"
GOOD = [
    "e1,u1,v1,2025-01-02T10:00:00Z,home,0,120,true,true,x",
    "e2,u1,v2,2025-01-02T10:01:00Z,home,1,0,false,false,x",
    "e3,u2,v2,2025-01-02T11:00:00Z,up_next,0,150.5,false,true,x",
    "e4,u3,v3,2025-01-02 12:00:00,search,2,600,true,false,",
    "e5,u2,v3,2025-01-02T13:00:00+01:00,home,3,10,false,false,",
]
# (line, reason fragment the quarantined row must carry)
BAD = [
    ("e6,u1,v1,2025-01-02T10:00:00Z,home,0", "malformed line: expected 10 fields, found 6"),
    ("e7,u1,v1,2025-01-02T10:00:00Z,home,0,abc,false,false,", "watched_s=abc is not a number"),
    ("e8,,v1,2025-01-02T10:00:00Z,home,0,5,false,false,", "user_id is missing (null)"),
    ("e1,u1,v1,2025-01-02T10:00:00Z,home,0,120,true,true,dup", "duplicate event_id"),
    ("e9,u1,v1,2025-01-02T10:00:00Z,home,0,-3,false,false,", "negative watch time"),
    ("e10,u1,v1,2025-01-02T10:00:00Z,home,0,121,true,false,", "watch time over the video's duration"),
    ("e11,u1,v1,2030-01-01T00:00:00Z,home,0,5,false,false,", "event_time is in the future"),
    ("e12,u404,v1,2025-01-02T10:00:00Z,home,0,5,false,false,", "unknown user_id"),
    ("e13,u1,v404,2025-01-02T10:00:00Z,home,0,5,false,false,", "unknown video_id"),
]
LATIN1 = ("e14,u1,v1,2025-01-02T10:00:00Z,caf\xe9,0,5,false,false,", "column surface is not valid UTF-8 (byte 0xe9")


@pytest.fixture()
def lakes(tmp_path):
    landing = LocalLake(tmp_path / "landing")
    lake = LocalLake(tmp_path / "lake")
    landing.write_bytes(f"users/date={DAY}/part-0.csv", USERS_CSV.encode())
    landing.write_bytes(f"videos/date={DAY}/part-0.csv", VIDEOS_CSV.encode())
    for t in ("users", "videos"):
        ingest_partition(t, DAY, landing=landing, lake=lake, ingested_at=INGESTED_AT)
        validate_partition(lake, t, DAY, expectations_dir=EXPECTATIONS)
    return landing, lake


def _events_file(lines: list[str], extra: bytes = b"") -> bytes:
    return HEADER.encode() + "\n".join(lines).encode() + b"\n" + extra


def _ingest_events(landing, lake, data: bytes, name: str = "part-0.csv"):
    landing.delete_partition("events", DAY)
    landing.write_bytes(f"events/date={DAY}/{name}", data)
    return ingest_partition("events", DAY, landing=landing, lake=lake, ingested_at=INGESTED_AT)


def test_mixed_file_exact_counts_and_a_reason_per_row(lakes):
    landing, lake = lakes
    lines = GOOD + [line for line, _ in BAD]
    data = _events_file(lines, (LATIN1[0] + "\n").encode("latin-1"))
    ingested = _ingest_events(landing, lake, data)
    assert ingested.manifest.rows == len(GOOD) + len(BAD) + 1

    result = validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    assert (result.ingested, result.accepted, result.quarantined) == (15, 5, 10)
    assert result.conserved
    assert "debug_flag" in result.schema.extra_columns and result.schema.warnings

    accepted = lake.read_partition("silver/events", DAY)
    assert sorted(accepted.column("event_id").to_pylist()) == ["e1", "e2", "e3", "e4", "e5"]
    assert "debug_flag" not in accepted.column_names
    # +01:00 was converted to UTC
    e5 = accepted.filter(pa.compute.equal(accepted["event_id"], "e5")).to_pylist()[0]
    assert e5["event_time"] == datetime(2025, 1, 2, 12, 0, tzinfo=timezone.utc)
    # a timestamp without a zone is taken as UTC
    e4 = accepted.filter(pa.compute.equal(accepted["event_id"], "e4")).to_pylist()[0]
    assert e4["event_time"] == datetime(2025, 1, 2, 12, 0, tzinfo=timezone.utc)

    q = read_quarantine(lake, "events", DAY).to_pylist()
    assert len(q) == 10
    for line, fragment in BAD + [LATIN1]:
        event_id = line.split(",")[0]
        if fragment.startswith("malformed"):
            rows = [r for r in q if r["_raw_line"] == line]
            # the header is line 1, then the good rows, then this one
            assert rows and rows[0]["_source_line"] == len(GOOD) + 2
        elif fragment.startswith("duplicate"):
            rows = [r for r in q if r["event_id"] == "e1"]
        else:
            rows = [r for r in q if r["event_id"] == event_id]
        assert len(rows) == 1, (line, rows)
        assert fragment in rows[0]["reason"], (fragment, rows[0]["reason"])
        # one root cause per row here: no consequential "is missing" after a bad line or a bad value
        assert "; " not in rows[0]["reason"], rows[0]["reason"]
        assert rows[0]["partition"] == DAY
    # nothing is lost: the latin-1 value is kept, escaped, with the bronze row
    (latin,) = [r for r in q if r["event_id"] == "e14"]
    assert latin["surface"] == "caf\\xe9"
    # the bronze layer still holds every ingested row, extra column included
    bronze, _ = read_bronze(lake, "events", DAY)
    assert bronze.num_rows == 15 and "debug_flag" in bronze.column_names


def test_rerun_replaces_never_duplicates(lakes):
    landing, lake = lakes
    _ingest_events(landing, lake, _events_file(GOOD + [BAD[1][0]]))
    first = validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    _ingest_events(landing, lake, _events_file(GOOD + [BAD[1][0]]))
    second = validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    assert (first.accepted, first.quarantined) == (second.accepted, second.quarantined) == (5, 1)
    assert lake.read_partition("silver/events", DAY).num_rows == 5
    assert lake.read_partition("quarantine/events", DAY).num_rows == 1
    assert lake.read_partition("bronze/events", DAY).num_rows == 6
    assert len(lake.list_keys(f"silver/events/date={DAY}/")) == 1


def test_missing_column_stops_the_partition(lakes):
    landing, lake = lakes
    header = "event_id,user_id,video_id,event_time,surface,position,completed,liked\n"
    _ingest_events(landing, lake, (header + "e1,u1,v1,2025-01-02T10:00:00Z,home,0,true,true\n").encode())
    with pytest.raises(SchemaValidationError, match="watched_s"):
        validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    assert not lake.has_partition("silver/events", DAY)


def test_wrong_column_type_in_parquet_quarantines_rows(lakes):
    landing, lake = lakes
    good = {c: [v] for c, v in zip(HEADER.strip().split(",")[:-1], GOOD[0].split(",")[:-1])}
    table = pa.table(
        {
            **{k: pa.array(v * 2) for k, v in good.items() if k not in ("watched_s", "position")},
            "position": pa.array([0, 1], pa.int64()),
            # a text column where a number is expected: the second value does not convert
            "watched_s": pa.array(["12.5", "twelve"]),
        }
    ).set_column(0, "event_id", pa.array(["p1", "p2"]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _ingest_events(landing, lake, buf.getvalue(), name="part-0.parquet")
    result = validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    assert (result.accepted, result.quarantined) == (1, 1)
    (row,) = read_quarantine(lake, "events", DAY).to_pylist()
    assert row["event_id"] == "p2" and "watched_s=twelve is not a number" in row["reason"]


def test_malformed_parquet_file_is_kept_and_stops_the_partition(lakes):
    landing, lake = lakes
    _ingest_events(landing, lake, b"PAR1 this is not parquet", name="part-0.parquet")
    report, _, manifest = check_schema(lake, "events", DAY, expectations_dir=EXPECTATIONS)
    assert not report.passed
    assert manifest.rejected_files and "not a readable Parquet file" in manifest.rejected_files[0].reason
    assert lake.exists(f"quarantine/files/events/date={DAY}/part-0.parquet")
    with pytest.raises(SchemaValidationError, match="could not be read"):
        validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)


def test_utf16_file_is_rejected_with_a_clear_reason(lakes):
    landing, lake = lakes
    _ingest_events(landing, lake, _events_file(GOOD).decode().encode("utf-16"))
    with pytest.raises(SchemaValidationError, match="UTF-16"):
        validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)


@pytest.mark.parametrize("data", [HEADER.encode(), None], ids=["header-only", "no-file"])
def test_empty_events_partition_stops(lakes, data):
    landing, lake = lakes
    landing.delete_partition("events", DAY)
    if data is not None:
        landing.write_bytes(f"events/date={DAY}/part-0.csv", data)
    ingest_partition("events", DAY, landing=landing, lake=lake, ingested_at=INGESTED_AT)
    with pytest.raises(SchemaValidationError, match="empty"):
        validate_partition(lake, "events", DAY, expectations_dir=EXPECTATIONS)


def test_empty_users_partition_is_fine(lakes):
    landing, lake = lakes
    ingest_partition("users", "2025-01-05", landing=landing, lake=lake, ingested_at=INGESTED_AT)
    result = validate_partition(lake, "users", "2025-01-05", expectations_dir=EXPECTATIONS)
    assert (result.ingested, result.accepted, result.quarantined) == (0, 0, 0)
