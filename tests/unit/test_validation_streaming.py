"""Issue 13, point 10: a day is validated as a stream. DuckDB types the day and finds its duplicates once,
then GX sees record batches of at most `chunk_rows` rows, silver and quarantine are written batch by
batch, and the whole bronze partition is never loaded. The result is the same however the day is cut."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pyarrow.parquet as pq
import pytest

from recloop import validation
from recloop.config import REPO_ROOT
from recloop.ingestion import MANIFEST_KEY, ingest_partition, ingest_range
from recloop.lake import Lake, LocalLake
from recloop.validation import read_quarantine, validate_partition, validate_range

EXPECTATIONS = REPO_ROOT / "expectations"
D1, D2 = "2025-01-02", "2025-01-03"
INGESTED_AT = datetime(2025, 1, 10, 6, 0, tzinfo=timezone.utc)

USERS_CSV = "user_id,country,age_bucket,signup_time,device\nu1,US,25-34,2025-01-01T08:00:00Z,ios\n"
VIDEOS_CSV = ("video_id,title,tags,category,creator_id,duration_s,upload_time\n"
              "v1,Cats,cats,pets,c1,120,2024-12-30T00:00:00Z\n")
HEADER = "event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked\n"


def _row(event_id: str, *, day: str = D1, user: str = "u1", watched: str = "5", position: str = "0") -> str:
    return f"{event_id},{user},v1,{day}T10:00:00Z,home,{position},{watched},false,false"


# 23 lines: good rows, and a broken row of every kind spread over the batches; `e1` is repeated in a
# later batch (the duplicate is found across batches), `e2` three times.
LINES = [_row(f"e{i}") for i in range(1, 9)] + [
    _row("e1"),                                   # duplicate of a row in the first batch
    _row("e9", watched="abc"),                    # not a number
    _row("e10", user=""),                         # missing user
    _row("e11", watched="-3"),                    # negative
    _row("e12", watched="121"),                   # over the video's duration
    _row("e13", user="u404"),                     # unknown user
    _row("e14", position="1.5"),                  # not an integer
    "e15,u1,v1,2025-01-02T10:00:00Z,home",        # malformed line
    _row("e16", day=D2),                          # another day
    _row("e2"), _row("e2"),                       # duplicates, the last ones of the day
    _row("e17"), _row("e18"), _row("e19"), _row("e20"),
]


def _ingested(tmp_path, lines=LINES, day: str = D1) -> tuple[LocalLake, LocalLake]:
    landing, lake = LocalLake(tmp_path / "landing"), LocalLake(tmp_path / "lake")
    landing.write_bytes(f"users/date={D1}/part-0.csv", USERS_CSV.encode())
    landing.write_bytes(f"videos/date={D1}/part-0.csv", VIDEOS_CSV.encode())
    for t in ("users", "videos"):
        ingest_partition(t, D1, landing=landing, lake=lake, ingested_at=INGESTED_AT)
        validate_partition(lake, t, D1, expectations_dir=EXPECTATIONS)
    landing.write_bytes(f"events/date={day}/part-0.csv", (HEADER + "\n".join(lines) + "\n").encode())
    ingest_partition("events", day, landing=landing, lake=lake, ingested_at=INGESTED_AT)
    return landing, lake


def _outcome(lake: Lake, day: str = D1):
    silver = lake.read_partition("silver/events", day)
    assert silver.num_rows
    quarantine = read_quarantine(lake, "events", day)
    return (silver.to_pylist(),
            [(r["_source_row"], r["event_id"], r["reason"]) for r in quarantine.to_pylist()])


@pytest.fixture()
def gx_frames(monkeypatch):
    """The number of rows of every frame the row-level GX suite is run on."""
    sizes: list[int] = []
    real = validation._validation_definition

    def recording(name, expectations):
        vd = real(name, expectations)
        if not name.startswith("events_rows"):
            return vd

        class Recording:
            def run(self, *, batch_parameters, **kwargs):
                sizes.append(len(batch_parameters["dataframe"]))
                return vd.run(batch_parameters=batch_parameters, **kwargs)

        return Recording()

    monkeypatch.setattr(validation, "_validation_definition", recording)
    return sizes


def test_a_day_cut_into_batches_gives_the_same_split_and_reasons(tmp_path, gx_frames):
    _, lake = _ingested(tmp_path)
    whole = validate_partition(lake, "events", D1, expectations_dir=EXPECTATIONS, chunk_rows=1000)
    expected = _outcome(lake)
    assert gx_frames == [23]

    gx_frames.clear()
    cut = validate_partition(lake, "events", D1, expectations_dir=EXPECTATIONS, chunk_rows=4)
    assert gx_frames == [4, 4, 4, 4, 4, 3]  # GX never saw more than a batch
    assert _outcome(lake) == expected
    assert (cut.ingested, cut.accepted, cut.quarantined) == (whole.ingested, whole.accepted, whole.quarantined) \
        == (23, 12, 11)
    assert cut.conserved and cut.reasons == whole.reasons
    # an expectation failed in any batch is failed for the day, its unexpected rows summed over batches
    assert {e["expectation"] + str(e["column"]): (e["success"], e["unexpected_count"]) for e in cut.expectations} \
        == {e["expectation"] + str(e["column"]): (e["success"], e["unexpected_count"]) for e in whole.expectations}
    reasons = {row: reason for row, _, reason in expected[1]}  # by data row (from 1), None: malformed
    assert "duplicate event_id" in reasons[9]                 # e1 again, two batches after the first e1
    assert all("duplicate event_id" in reasons[n] for n in (17, 18))  # (a malformed line has no row number)
    assert "watched_s=abc is not a number" in reasons[10]
    assert reasons[None].startswith("malformed line")
    assert "is not on the partition's day" in reasons[16]
    assert [r["event_id"] for r in expected[0]] == [f"e{i}" for i in range(1, 9)] + [f"e{i}" for i in range(17, 21)]
    # the written partitions: rows and sizes as reported; quarantine keeps bronze's columns and manifest
    assert cut.accepted_written.rows == 12 and cut.accepted_written.bytes == \
        lake.local_path(f"silver/events/date={D1}/part-0.parquet").stat().st_size
    q_schema = pq.read_schema(lake.local_path(f"quarantine/events/date={D1}/part-0.parquet"))
    assert MANIFEST_KEY in q_schema.metadata
    assert q_schema.names[-3:] == ["reason", "partition", "quarantined_at"] and "_raw_line" in q_schema.names


def test_the_bronze_partition_is_never_loaded_whole(tmp_path, monkeypatch):
    _, lake = _ingested(tmp_path)
    real = Lake.read_partition

    def read_partition(self, dataset, partition):
        if dataset.startswith("bronze/"):
            raise AssertionError(f"{dataset}/{partition} loaded whole")
        return real(self, dataset, partition)

    monkeypatch.setattr(Lake, "read_partition", read_partition)
    result = validate_partition(lake, "events", D1, expectations_dir=EXPECTATIONS, chunk_rows=5)
    assert (result.accepted, result.quarantined) == (12, 11)
    report, bronze_schema, _ = validation.check_schema(lake, "events", D1, expectations_dir=EXPECTATIONS)
    assert report.passed and report.rows == 23 and "_raw_line" in bronze_schema.names


def test_an_empty_day_writes_empty_partitions_and_runs_no_gx(tmp_path, gx_frames):
    _, lake = _ingested(tmp_path, lines=[], day=D2)
    result = validate_partition(lake, "events", D2, expectations_dir=EXPECTATIONS, waive_empty=True)
    assert (result.ingested, result.accepted, result.quarantined) == (0, 0, 0)
    assert gx_frames == [] and result.expectations == []
    assert lake.read_partition("silver/events", D2).num_rows == 0


def test_a_failed_batch_changes_nothing(tmp_path, monkeypatch):
    _, lake = _ingested(tmp_path)
    validate_partition(lake, "events", D1, expectations_dir=EXPECTATIONS)
    before = _outcome(lake)
    calls = []
    real = validation._collect_failures

    def failing(r, found):
        calls.append(1)
        if len(calls) > 30:  # in the second batch
            raise RuntimeError("boom")
        return real(r, found)

    monkeypatch.setattr(validation, "_collect_failures", failing)
    with pytest.raises(RuntimeError, match="boom"):
        validate_partition(lake, "events", D1, expectations_dir=EXPECTATIONS, chunk_rows=5)
    assert _outcome(lake) == before
    leftovers = [p for p in (tmp_path / "lake").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_duckdb_out_of_memory_is_retried_with_more_memory(tmp_path, monkeypatch):
    limits = []

    def prepare(con):
        limits.append(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        if len(limits) < 3:
            raise duckdb.OutOfMemoryException("could not allocate")
        return "SELECT 1 AS x", 10

    validation._copy_typed(str(tmp_path), prepare, tmp_path / "typed.parquet")
    assert [validation._megabytes(v) for v in limits] == [122, 244, 488]
    assert pq.read_table(tmp_path / "typed.parquet").to_pylist() == [{"x": 1}]


def test_a_range_runs_gx_in_batches_with_the_same_result(tmp_path, monkeypatch, gx_frames):
    landing, lake = LocalLake(tmp_path / "landing"), LocalLake(tmp_path / "lake")
    landing.write_bytes(f"users/date={D1}/part-0.csv", USERS_CSV.encode())
    landing.write_bytes(f"videos/date={D1}/part-0.csv", VIDEOS_CSV.encode())
    day2 = ["f" + line.replace(D1, D2)[1:] for line in LINES]
    landing.write_bytes(f"events/date={D1}/part-0.csv", (HEADER + "\n".join(LINES) + "\n").encode())
    landing.write_bytes(f"events/date={D2}/part-0.csv", (HEADER + "\n".join(day2) + "\n").encode())
    ingest_range(landing, lake, D1, D2, ingested_at=INGESTED_AT)
    for t in ("users", "videos"):
        validate_range(lake, t, [D1], expectations_dir=EXPECTATIONS)
    whole = validate_range(lake, "events", [D1, D2], expectations_dir=EXPECTATIONS)
    expected = [_outcome(lake, d) for d in (D1, D2)]
    assert gx_frames == [46]

    gx_frames.clear()
    monkeypatch.setattr(validation, "VALIDATE_CHUNK_ROWS", 10)
    cut = validate_range(lake, "events", [D1, D2], expectations_dir=EXPECTATIONS)
    assert gx_frames == [10, 10, 10, 10, 6]
    assert [_outcome(lake, d) for d in (D1, D2)] == expected
    assert cut.reasons == whole.reasons and cut.quarantined == whole.quarantined and cut.conserved
