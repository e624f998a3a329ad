"""Issue 13 (ingestion and validation): ingested events win over feedback, duplicates of earlier days,
events outside their day, exact integers and booleans, and large files read as a stream."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT
from recloop.ingestion import ingest_partition, ingest_range, read_bronze
from recloop.lake import LocalLake
from recloop.validation import read_quarantine, validate_partition, validate_range

EXPECTATIONS = REPO_ROOT / "expectations"
D1, D2, D3 = "2025-01-02", "2025-01-03", "2025-01-04"
INGESTED_AT = datetime(2025, 1, 10, 6, 0, tzinfo=timezone.utc)

USERS_CSV = "user_id,country,age_bucket,signup_time,device\nu1,US,25-34,2025-01-01T08:00:00Z,ios\n"
VIDEOS_CSV = ("video_id,title,tags,category,creator_id,duration_s,upload_time\n"
              "v1,Cats,cats,pets,c1,120,2024-12-30T00:00:00Z\n")
HEADER = "event_id,user_id,video_id,event_time,surface,position,watched_s,completed,liked\n"


def row(event_id: str, day: str = D1, *, time: str = "10:00:00Z", position: str = "0", watched: str = "5",
        completed: str = "false", liked: str = "false", user: str = "u1") -> str:
    return f"{event_id},{user},v1,{day}T{time},home,{position},{watched},{completed},{liked}"


def csv(*rows: str) -> bytes:
    return (HEADER + "\n".join(rows) + "\n").encode()


@pytest.fixture()
def lakes(tmp_path):
    landing = LocalLake(tmp_path / "landing")
    lake = LocalLake(tmp_path / "lake")
    landing.write_bytes(f"users/date={D1}/part-0.csv", USERS_CSV.encode())
    landing.write_bytes(f"videos/date={D1}/part-0.csv", VIDEOS_CSV.encode())
    for t in ("users", "videos"):
        ingest_partition(t, D1, landing=landing, lake=lake, ingested_at=INGESTED_AT)
        validate_partition(lake, t, D1, expectations_dir=EXPECTATIONS)
    return landing, lake


def run_day(landing, lake, day: str, files: dict[str, bytes]):
    landing.delete_partition("events", day)
    for name, data in files.items():
        landing.write_bytes(f"events/date={day}/{name}", data)
    ingest_partition("events", day, landing=landing, lake=lake, ingested_at=INGESTED_AT)
    return validate_partition(lake, "events", day, expectations_dir=EXPECTATIONS)


def silver(lake, day: str) -> dict[str, dict]:
    return {r["event_id"]: r for r in lake.read_partition("silver/events", day).to_pylist()}


def quarantined(lake, day: str) -> dict[str, str]:
    return {r["event_id"]: r["reason"] for r in read_quarantine(lake, "events", day).to_pylist()}


def feedback_parquet(event_id: str, user: str = "u1", watched: float = 99.0) -> bytes:
    from recloop.serving.feedback import events_table

    buf = io.BytesIO()
    pq.write_table(events_table([{"event_id": event_id, "user_id": user, "video_id": "v1",
                                  "event_time": datetime(2025, 1, 2, 11, tzinfo=timezone.utc), "surface": "home",
                                  "position": 0, "watched_s": watched, "completed": False, "liked": True}]), buf)
    return buf.getvalue()


# --- ingested events win over feedback ------------------------------------------------------------------


@pytest.mark.parametrize("batch_name", ["part-0.csv", "a.csv", "zz-late-delivery.csv"])
def test_a_delivered_event_wins_over_a_feedback_event_with_its_id(lakes, batch_name):
    landing, lake = lakes
    result = run_day(landing, lake, D1, {
        "feedback-20250102T110000000000-0badc0de.parquet": feedback_parquet("e1", watched=99.0),
        batch_name: csv(row("e1", watched="5"), row("e2")),
    })
    assert result.conserved and (result.accepted, result.quarantined) == (2, 1)
    assert silver(lake, D1)["e1"]["watched_s"] == 5.0  # the delivered row, not the forged one
    (q,) = read_quarantine(lake, "events", D1).to_pylist()
    assert q["_source_file"].rsplit("/", 1)[-1].startswith("feedback-") and "duplicate event_id" in q["reason"]


def test_bronze_orders_delivered_files_before_feedback(lakes):
    landing, lake = lakes
    run_day(landing, lake, D1, {"feedback-1.parquet": feedback_parquet("f1"), "part-0.csv": csv(row("e1")),
                                "feedback-0.parquet": feedback_parquet("f0")})
    bronze, manifest = read_bronze(lake, "events", D1)
    files = [f.rsplit("/", 1)[-1] for f in bronze.column("_source_file").to_pylist()]
    assert files == ["part-0.csv", "feedback-0.parquet", "feedback-1.parquet"]
    assert [f.name.rsplit("/", 1)[-1] for f in manifest.files] == files


# --- duplicates of events accepted on earlier days ----------------------------------------------------------


def test_an_event_id_accepted_on_an_earlier_day_is_quarantined_and_reruns_are_idempotent(lakes):
    landing, lake = lakes
    first = run_day(landing, lake, D1, {"part-0.csv": csv(row("e1"), row("e2"))})
    assert first.accepted == 2
    second = run_day(landing, lake, D2, {"part-0.csv": csv(row("e1", D2), row("e3", D2))})
    assert (second.accepted, second.quarantined) == (1, 1)
    assert quarantined(lake, D2) == {"e1": f"duplicate event_id: an event accepted on {D1} has the same event_id"}
    assert "duplicate event_id: an event accepted on an earlier day" in " ".join(second.reasons)
    # re-running either day gives the same split: a day's own rows are never duplicates of themselves
    for _ in range(2):
        again = run_day(landing, lake, D2, {"part-0.csv": csv(row("e1", D2), row("e3", D2))})
        assert (again.accepted, again.quarantined) == (1, 1)
        rerun = run_day(landing, lake, D1, {"part-0.csv": csv(row("e1"), row("e2"))})
        assert (rerun.accepted, rerun.quarantined) == (2, 0)
    assert sorted(silver(lake, D2)) == ["e3"]


def test_a_range_quarantines_ids_accepted_before_the_range(lakes):
    landing, lake = lakes
    run_day(landing, lake, D1, {"part-0.csv": csv(row("e1"), row("e2"))})
    landing.write_bytes(f"events/date={D2}/part-0.csv", csv(row("e1", D2), row("e3", D2)))
    landing.write_bytes(f"events/date={D3}/part-0.csv", csv(row("e3", D3), row("e4", D3)))
    ingest_range(landing, lake, D2, D3, tables=["events"], ingested_at=INGESTED_AT)
    for _ in range(2):  # a re-run gives the same lake
        out = validate_range(lake, "events", [D2, D3], expectations_dir=EXPECTATIONS)
        assert out.conserved and (out.accepted, out.quarantined) == (2, 2)
        assert quarantined(lake, D2) == {"e1": f"duplicate event_id: an event accepted on {D1} has the same event_id"}
        assert "e3" in quarantined(lake, D3) and "earlier day of the range" in quarantined(lake, D3)["e3"]


# --- events outside their partition's day ------------------------------------------------------------------


def test_an_event_of_another_day_is_quarantined_with_its_reason(lakes):
    landing, lake = lakes
    result = run_day(landing, lake, D1, {"part-0.csv": csv(
        row("in-day"), row("last-us", time="23:59:59.999999Z"), row("next-day", D2, time="00:00:01Z"),
        row("offset", time="23:30:00-05:00"), row("day-before", "2025-01-01", time="23:59:59Z"))})
    assert (result.accepted, result.quarantined) == (2, 3)
    q = quarantined(lake, D1)
    assert q["next-day"] == f"event_time 2025-01-03T00:00:01Z is not on the partition's day {D1} (UTC)"
    assert q["offset"] == f"event_time 2025-01-03T04:30:00Z is not on the partition's day {D1} (UTC)"
    assert "2025-01-01T23:59:59Z is not on the partition's day" in q["day-before"]
    assert result.reasons == {"event_time is not on the partition's day": 3}


def test_a_range_quarantines_events_outside_their_day(lakes):
    landing, lake = lakes
    landing.write_bytes(f"events/date={D2}/part-0.csv", csv(row("a", D2), row("b", D3)))
    landing.write_bytes(f"events/date={D3}/part-0.csv", csv(row("c", D3)))
    ingest_range(landing, lake, D2, D3, tables=["events"], ingested_at=INGESTED_AT)
    out = validate_range(lake, "events", [D2, D3], expectations_dir=EXPECTATIONS)
    assert (out.accepted, out.quarantined) == (2, 1)
    assert "is not on the partition's day" in quarantined(lake, D2)["b"]


# --- exact integers and booleans -----------------------------------------------------------------------------


def test_integers_and_booleans_accept_only_exact_values(lakes):
    landing, lake = lakes
    rows = [row("ok", position="2", completed="true", liked="FALSE"), row("ok2", position="+3", completed="True"),
            row("frac", position="1.5"), row("exp", position="1e1"), row("big", position="99999999999"),
            row("yes", completed="yes"), row("one", completed="1"), row("t", liked="T"), row("zero", liked="0"),
            row("nan", watched="NaN"), row("inf", watched="inf"), row("NA"), row("null")]
    result = run_day(landing, lake, D1, {"part-0.csv": csv(*rows)})
    assert result.conserved and sorted(silver(lake, D1)) == ["NA", "null", "ok", "ok2"]  # ids, not nulls
    s = silver(lake, D1)
    assert (s["ok"]["position"], s["ok"]["completed"], s["ok"]["liked"]) == (2, True, False)
    q = quarantined(lake, D1)
    assert q["frac"] == "position=1.5 is not an integer"
    assert q["exp"] == "position=1e1 is not an integer"
    assert q["big"] == "position=99999999999 is not an integer"
    assert q["yes"] == "completed=yes is not true or false"
    assert q["one"] == "completed=1 is not true or false"
    assert q["t"] == "liked=T is not true or false"
    assert q["zero"] == "liked=0 is not true or false"
    assert q["nan"] == "watched_s=NaN is not a finite number"
    assert q["inf"] == "watched_s=inf is not a finite number"


def test_parquet_numbers_keep_their_exact_values(lakes):
    landing, lake = lakes
    t = pa.table({"event_id": ["p1", "p2", "p3"], "user_id": ["u1"] * 3, "video_id": ["v1"] * 3,
                  "event_time": pa.array([datetime(2025, 1, 2, 10, tzinfo=timezone.utc)] * 3, pa.timestamp("us", tz="UTC")),
                  "surface": ["home"] * 3, "position": pa.array([1.0, 1.5, 2.0]), "watched_s": [1.0, float("nan"), 2.0],
                  "completed": [True, False, None], "liked": pa.array([1, 0, 1], pa.int8())})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    result = run_day(landing, lake, D1, {"part-0.parquet": buf.getvalue()})
    q = quarantined(lake, D1)
    assert set(q) == {"p1", "p2", "p3"}  # int8 1/0 are not booleans either
    assert "position=1.5 is not an integer" in q["p2"] and "watched_s=nan is not a finite number" in q["p2"].lower()
    assert q["p1"] == "liked=1 is not true or false"
    assert result.conserved


def test_a_huge_value_is_cut_in_its_reason(lakes):
    landing, lake = lakes
    run_day(landing, lake, D1, {"part-0.csv": csv(row("huge", position="9" * 100_000 + "x"))})
    (reason,) = quarantined(lake, D1).values()
    assert reason.startswith("position=999") and reason.endswith(" is not an integer") and len(reason) < 200
    assert read_quarantine(lake, "events", D1).column("position")[0].as_py() == "9" * 100_000 + "x"  # kept whole


# --- large files stream ------------------------------------------------------------------------------------------


def test_a_large_csv_is_read_in_blocks_and_written_incrementally(lakes, monkeypatch):
    landing, lake = lakes
    import recloop.ingestion as ingestion

    lines = [row(f"e{i}", time=f"10:{i // 60 % 60:02d}:{i % 60:02d}Z") for i in range(20_000)]
    lines[12_345] = "broken,line"
    landing.write_bytes(f"events/date={D1}/part-0.csv", csv(*lines))
    with monkeypatch.context() as m:
        m.setattr(ingestion, "CSV_BLOCK_BYTES", 64 << 10, raising=False)
        # the landing file is never read whole into memory
        m.setattr(LocalLake, "read_bytes", lambda self, key: pytest.fail(f"read {key} whole"))
        result = ingest_partition("events", D1, landing=landing, lake=lake, ingested_at=INGESTED_AT)
    assert result.manifest.rows == 20_000 and result.manifest.files[0].malformed_rows == 1
    path = lake.local_path(f"bronze/events/date={D1}/part-0.parquet")
    assert pq.ParquetFile(path).num_row_groups > 1  # written batch by batch
    bronze, _ = read_bronze(lake, "events", D1)
    ok = bronze.filter(pc.is_null(bronze["_ingest_error"]))
    assert ok.column("_source_row").to_pylist() == list(range(1, 20_000))
    bad = bronze.filter(pc.invert(pc.is_null(bronze["_ingest_error"]))).to_pylist()
    assert [(r["_source_line"], r["_raw_line"]) for r in bad] == [(12_347, "broken,line")]
