"""Served impressions through the data plane (issue 14, contracts 1-3): landing → bronze → GX →
silver/impressions with quarantine reasons, the optional request_id of events, and the join that appends
served negatives to silver/events and writes silver/impression_outcomes, on hand-made days in a real lake
with the real GX suites."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recloop import lifecycle, served
from recloop.data.schemas import EVENTS, IMPRESSION_SOURCES, IMPRESSIONS, USERS, VIDEOS
from recloop.lake import LocalLake

EXPECTATIONS = Path(__file__).resolve().parents[2] / "expectations"
DAY0, DAY1 = "2026-03-01", "2026-03-02"
USERS_IDS = ["u1", "u2", "u3"]
VIDEO_IDS = ["v1", "v2", "v3", "v4", "v5"]


def _at(day: str, hour: int, minute: int = 0) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=UTC)


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _rid(n: int) -> str:
    return f"rq-{n:032x}"


def _impression(req: int, pos: int, user: str, video: str, at: datetime, **over) -> dict:
    row = {"impression_id": f"{_rid(req)}-{pos}", "request_id": _rid(req), "user_id": user, "video_id": video,
           "served_at": at, "position": pos, "source": "two_tower", "score": 1.0 - pos / 10, "model_version": "3",
           "experiment": None, "arm": "champion", "propensity": 1.0, "explored": False, "fallback": False,
           "surface": "home"}
    row.update(over)
    return row


def _event(eid: str, user: str, video: str, at: datetime, watched: float, **over) -> dict:
    row = {"event_id": eid, "user_id": user, "video_id": video, "event_time": at, "surface": "home",
           "position": 0, "watched_s": watched, "completed": False, "liked": False}
    row.update(over)
    return row


FEEDBACK_SCHEMA = EVENTS.schema.append(pa.field("request_id", pa.string()))


def _land_day(landing: LocalLake, day: str, *, impressions: list[dict], batch: list[dict], feedback: list[dict]) -> None:
    users = pa.Table.from_pylist([{"user_id": u, "country": "FR", "age_bucket": "25-34",
                                   "signup_time": _at(DAY0, 0), "device": "ios"} for u in USERS_IDS], USERS.schema)
    videos = pa.Table.from_pylist([{"video_id": v, "title": v, "tags": "", "category": "music", "creator_id": "c1",
                                    "duration_s": 100.0, "upload_time": _at(DAY0, 0)} for v in VIDEO_IDS], VIDEOS.schema)
    if day == DAY0:
        landing.write_bytes(f"users/date={day}/users.parquet", _parquet(users))
        landing.write_bytes(f"videos/date={day}/videos.parquet", _parquet(videos))
    landing.write_bytes(f"events/date={day}/batch.parquet", _parquet(pa.Table.from_pylist(batch, EVENTS.schema)))
    if feedback:
        landing.write_bytes(f"events/date={day}/feedback-0001.parquet",
                            _parquet(pa.Table.from_pylist(feedback, FEEDBACK_SCHEMA)))
    if impressions:
        landing.write_bytes(f"impressions/date={day}/impressions-0001.parquet",
                            _parquet(pa.Table.from_pylist(impressions, IMPRESSIONS.schema)))


def _run_day(landing: LocalLake, lake: LocalLake, day: str) -> dict:
    out = {}
    for table in ("users", "videos", "impressions", "events"):
        lifecycle.ingest(table, day, landing=landing, lake=lake)
        check = lifecycle.check_schema(lake, table, day, expectations_dir=EXPECTATIONS, run_id="t")
        assert check.passed, check.description
        out[f"schema_{table}"] = check.report
        out[table] = lifecycle.validate(lake, table, day, expectations_dir=EXPECTATIONS, max_quarantine_rate=1.0,
                                        run_id="t").result
    out["join"] = lifecycle.join_served(lake, day)
    out["outcomes"] = lifecycle.impression_outcomes(lake, day)
    return out


@pytest.fixture()
def lakes(tmp_path):
    return LocalLake(tmp_path / "landing"), LocalLake(tmp_path / "lake")


def _day0(landing: LocalLake) -> None:
    impressions = [
        _impression(1, 0, "u1", "v1", _at(DAY0, 10)),  # feedback: watched
        _impression(1, 1, "u1", "v2", _at(DAY0, 10)),  # no feedback: served negative
        _impression(1, 2, "u1", "v3", _at(DAY0, 10), source="explore", explored=True, propensity=0.25),  # liked
        _impression(2, 0, "u2", "v4", _at(DAY0, 11), arm="challenger", experiment="exp-v3-v4"),  # negative
        _impression(3, 0, "u9", "v1", _at(DAY0, 12)),  # unknown user: outcome, but no negative
    ]
    feedback = [
        {**_event("fb-1", "u1", "v1", _at(DAY0, 10, 1), 40.0), "request_id": _rid(1)},
        {**_event("fb-2", "u1", "v1", _at(DAY0, 10, 2), 90.0, completed=True), "request_id": _rid(1)},
        {**_event("fb-3", "u1", "v3", _at(DAY0, 10, 3), 5.0, liked=True, position=2), "request_id": _rid(1)},
        {**_event("fb-4", "u3", "v5", _at(DAY0, 13), 7.0), "request_id": None},  # feedback without an answer
    ]
    batch = [_event("b-1", "u2", "v5", _at(DAY0, 9), 12.0), _event("b-2", "u3", "v1", _at(DAY0, 9, 30), 0.0)]
    _land_day(landing, DAY0, impressions=impressions, batch=batch, feedback=feedback)


def test_join_appends_served_negatives_writes_outcomes_and_reruns_identically(lakes):
    landing, lake = lakes
    _day0(landing)
    out = _run_day(landing, lake, DAY0)

    # request_id is optional: the batch file lacks it without a warning; feedback keeps it through silver.
    assert out["schema_events"].warnings == [] and out["schema_events"].extra_columns == []
    assert out["events"].quarantined == 0 and out["impressions"].quarantined == 0
    events = lake.read_partition("silver/events", DAY0)
    assert events.schema == EVENTS.silver_schema
    by_id = {r["event_id"]: r for r in events.to_pylist()}
    assert by_id["fb-1"]["request_id"] == _rid(1) and by_id["b-1"]["request_id"] is None

    # Served negatives: the impressions without feedback of known users, one row each.
    negatives = {f"{_rid(1)}-1", f"{_rid(2)}-0"}
    assert set(by_id) == {"b-1", "b-2", "fb-1", "fb-2", "fb-3", "fb-4"} | negatives
    n = by_id[f"{_rid(2)}-0"]
    assert (n["user_id"], n["video_id"], n["watched_s"], n["completed"], n["liked"], n["request_id"]) == (
        "u2", "v4", 0.0, False, False, _rid(2))
    assert n["event_time"] == _at(DAY0, 11) and n["position"] == 0 and n["surface"] == "home"
    assert out["join"]["served_negatives"] == 2 and out["join"]["skipped_unknown"] == 1
    assert out["join"]["impressions_with_feedback"] == 2 and out["join"]["feedback_events"] == 3

    # Outcomes: every impression, the longest watch, any completion or like.
    outcomes = {r["impression_id"]: r for r in lake.read_partition("silver/impression_outcomes", DAY0).to_pylist()}
    assert len(outcomes) == 5 and out["outcomes"]["impressions"] == 5 and out["outcomes"]["with_feedback"] == 2
    first = outcomes[f"{_rid(1)}-0"]
    assert (first["feedback"], first["watched_s"], first["completed"], first["liked"]) == (True, 90.0, True, False)
    assert outcomes[f"{_rid(1)}-2"]["liked"] is True and outcomes[f"{_rid(1)}-2"]["propensity"] == 0.25
    for iid in (f"{_rid(1)}-1", f"{_rid(2)}-0", f"{_rid(3)}-0"):
        assert (outcomes[iid]["feedback"], outcomes[iid]["watched_s"]) == (False, 0.0)
    assert outcomes[f"{_rid(2)}-0"]["arm"] == "challenger"

    # Re-running the join alone, or the whole day, gives the same lake: no negative twice.
    before = {d: lake.read_partition(d, DAY0) for d in ("silver/events", "silver/impression_outcomes")}
    assert lifecycle.join_served(lake, DAY0)["served_negatives"] == 2
    assert lake.read_partition("silver/events", DAY0).equals(before["silver/events"])
    again = _run_day(landing, lake, DAY0)
    assert again["join"]["served_negatives"] == 2
    for dataset, table in before.items():
        assert lake.read_partition(dataset, DAY0).sort_by("event_id" if "events" in dataset else "impression_id").equals(
            table.sort_by("event_id" if "events" in dataset else "impression_id"))


def test_impressions_quarantined_with_reasons_and_empty_day_is_an_empty_partition(lakes):
    landing, lake = lakes
    _day0(landing)
    _run_day(landing, lake, DAY0)
    bad = [
        _impression(10, 0, "u1", "v1", _at(DAY1, 8)),  # good
        _impression(10, 1, None, "v2", _at(DAY1, 8)),  # no user
        _impression(10, 2, "u1", "v3", _at(DAY1, 8), propensity=0.0),
        _impression(10, 3, "u1", "v4", _at(DAY1, 8), propensity=1.5),
        _impression(10, 4, "u1", "v5", _at(DAY1, 8), arm="control"),
        _impression(11, 0, "u2", "v1", _at(DAY1, 9), source="trending"),
        _impression(11, 1, "u2", "v2", _at(DAY0, 9)),  # served the day before
        {**_impression(11, 2, "u2", "v3", _at(DAY1, 9)), "position": -1, "impression_id": f"{_rid(11)}--1"},
        _impression(10, 0, "u1", "v1", _at(DAY1, 8)),  # the same impression twice in the day
        _impression(1, 1, "u1", "v2", _at(DAY1, 10)),  # accepted on DAY0 already
    ]
    batch = [_event("b-10", "u1", "v1", _at(DAY1, 7), 3.0)]
    _land_day(landing, DAY1, impressions=bad, batch=batch, feedback=[])
    out = _run_day(landing, lake, DAY1)
    result = out["impressions"]
    assert (result.ingested, result.accepted, result.quarantined) == (10, 1, 9)
    reasons = {r["impression_id"]: r["reason"] for r in lake.read_partition("quarantine/impressions", DAY1).to_pylist()}
    assert reasons[f"{_rid(10)}-1"] == "user_id is missing (null)"
    assert reasons[f"{_rid(10)}-2"] == reasons[f"{_rid(10)}-3"] == "propensity outside (0, 1]"
    assert reasons[f"{_rid(10)}-4"] == "unknown arm: expected champion or challenger"
    assert reasons[f"{_rid(11)}-0"].startswith("unknown source")
    assert reasons[f"{_rid(11)}-1"] == f"served_at {DAY0}T09:00:00Z is not on the partition's day {DAY1} (UTC)"
    assert reasons[f"{_rid(11)}--1"] == "negative slate position"
    assert reasons[f"{_rid(10)}-0"] == "duplicate impression_id: an earlier row of this partition has the same impression_id"
    assert reasons[f"{_rid(1)}-1"] == (f"duplicate impression_id: an impression accepted on {DAY0} has the same "
                                       "impression_id")
    # The one accepted impression has no feedback: its negative is the day's only served row.
    assert out["join"]["served_negatives"] == 1
    assert lake.read_partition("silver/events", DAY1).num_rows == 2

    # A day without impressions (open-loop, batch only): an empty partition, not a failure; nothing joined.
    day2 = "2026-03-03"
    _land_day(landing, day2, impressions=[], batch=[_event("b-20", "u1", "v2", _at(day2, 7), 3.0)], feedback=[])
    out2 = _run_day(landing, lake, day2)
    assert out2["schema_impressions"].passed and out2["impressions"].ingested == 0
    assert lake.has_partition("silver/impressions", day2) and lake.read_partition("silver/impressions", day2).num_rows == 0
    assert out2["join"]["served_negatives"] == 0 and out2["join"]["path"] is None
    assert lake.read_partition("silver/events", day2).num_rows == 1
    assert lake.read_partition("silver/impression_outcomes", day2).num_rows == 0


def test_suite_knows_the_sources_and_arms_of_the_schema_module():
    suite = json.loads((EXPECTATIONS / "impressions.json").read_text())
    sets = {e["kwargs"]["column"]: e["kwargs"]["value_set"] for e in suite["expectations"]
            if e["type"] == "expect_column_values_to_be_in_set"}
    assert tuple(sets["source"]) == IMPRESSION_SOURCES and sets["arm"] == ["champion", "challenger"]


def test_training_set_contains_the_served_negatives(lakes, tmp_path, monkeypatch):
    from recloop.config import Settings

    landing, lake = lakes
    _day0(landing)
    _run_day(landing, lake, DAY0)
    _land_day(landing, DAY1, impressions=[_impression(20, 0, "u3", "v2", _at(DAY1, 8))],
              batch=[_event("b-30", "u3", "v1", _at(DAY1, 7), 30.0)], feedback=[])
    _run_day(landing, lake, DAY1)
    day2 = "2026-03-03"
    _land_day(landing, day2, impressions=[], batch=[_event("b-40", "u1", "v2", _at(day2, 7), 3.0)], feedback=[])
    _run_day(landing, lake, day2)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path / "home"))
    out = lifecycle.build_training_set(Settings.from_env(), lake, tmp_path / "work", train_days=2, test_days=1)
    assert out["train_partitions"] == [DAY0, DAY1]
    window = pq.read_table(Path(out["path"]) / "events.parquet").to_pandas()
    ids = set(window["event_id"])
    negatives = {f"{_rid(1)}-1", f"{_rid(2)}-0", f"{_rid(20)}-0"}
    assert negatives <= ids
    assert (window[window["event_id"].isin(negatives)]["watched_s"] == 0).all()
    assert len(ids) == len(window) == 6 + 2 + 1 + 1  # day 0: 6 events + 2 negatives; day 1: 1 event + 1 negative


def test_range_validation_keeps_request_id_and_the_range_join_restores_the_negatives(lakes):
    """A history range run over days with served impressions (`history_job`): the range validation rewrites
    silver/events without the served negatives, `join_served_range` puts them back, once."""
    landing, lake = lakes
    _day0(landing)
    _run_day(landing, lake, DAY0)
    joined = lake.read_partition("silver/events", DAY0)
    ingestion = lifecycle.ingest_range(landing, lake, DAY0, DAY0)
    outcome = lifecycle.validate_range(lake, ingestion, expectations_dir=EXPECTATIONS, max_quarantine_rate=1.0,
                                       run_id="t")
    assert outcome.passed and outcome.results["events"].extra_columns == []
    events = lake.read_partition("silver/events", DAY0)
    assert events.schema == EVENTS.silver_schema and events.num_rows == 6
    assert dict(zip(events["event_id"].to_pylist(), events["request_id"].to_pylist()))["fb-3"] == _rid(1)
    assert lifecycle.join_served_range(lake, DAY0, DAY0) == {"days": 1, "served_negatives": 2}
    assert lake.read_partition("silver/events", DAY0).sort_by("event_id").equals(joined.sort_by("event_id"))
