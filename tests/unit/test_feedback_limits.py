"""Input robustness and feedback limits of the serving API (recloop.serving.inputs, .history, .feedback):

* 422, never 500, for NaN/Infinity, infinite floats and lone surrogates in JSON bodies, and for
  datetimes UTC cannot express (`9999-12-31T23:59:59-05:00`);
* feedback `event_time` within a configurable window around now, a bound on distinct days and on
  events per request, exact booleans and integers, no repeated event id: a refused request stores
  nothing (no spool line, no landing file, no history);
* the in-memory watch history is bounded (LRU by user, per user, in all) and says so in /metrics;
* the spool survives crashes without doubling (a re-flushed segment replaces its landing file) or
  refusing to start (a torn last line);
* a property-based test: whatever feedback body hypothesis makes, the answer is 202 (and exactly the
  accepted events land) or 422 (and nothing does), never a 5xx.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from recloop.config import Settings
from recloop.lake import LocalLake
from recloop.registry import open_registry
from recloop.serving import RecommendationService, ServingConfig, create_app
from recloop.serving.feedback import FeedbackWriter
from recloop.serving.history import UserHistory

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feedback-limits")


@pytest.fixture(scope="module")
def registry(home):
    return open_registry(Settings(home=home / "home"))


@pytest.fixture()
def make_client(home, registry, monkeypatch, tmp_path):
    """`make_client(**config)`: an app around a fresh service with its own landing zone and spool (the
    embedded default without API keys: open, so these tests are about the bodies only)."""
    monkeypatch.delenv("RECLOOP_API_KEYS", raising=False)
    opened = []

    def make(**overrides) -> TestClient:
        settings = Settings(home=home / "home", landing_uri=str(tmp_path / f"landing-{len(opened)}"),
                            lake_uri=str(home / "lake"), feast_data_dir=home / "feast")
        config = ServingConfig(**{"poll_seconds": 3600.0, "feedback_flush_seconds": 3600.0,
                                  "feedback_spool_dir": tmp_path / f"spool-{len(opened)}", **overrides})
        service = RecommendationService(settings, config, registry=registry)
        client = TestClient(create_app(service=service), raise_server_exceptions=False)
        client.__enter__()
        opened.append((client, service))
        return client

    yield make
    for client, service in opened:
        client.__exit__(None, None, None)
        service.close()


@pytest.fixture()
def client(make_client) -> TestClient:
    return make_client()


def now_iso(**delta) -> str:
    return (datetime.now(timezone.utc) + timedelta(**delta)).isoformat()


def event(**fields) -> dict:
    return {"user_id": "u1", "video_id": "v1", "watched_s": 1.0, "event_time": now_iso(), **fields}


def landed(client: TestClient) -> list[dict]:
    """Flush the service's spool and read every event of its landing zone."""
    service = client.app.state.service
    service.feedback.flush()
    root = Path(service.settings.landing_uri)
    return [row for path in sorted(root.rglob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def assert_nothing_stored(client: TestClient) -> None:
    assert landed(client) == []
    assert client.app.state.service.history.stats().feedback_events == 0


# --- bodies JSON cannot carry --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    '{"user_id": "u", "k": NaN}',
    '{"user_id": "u", "k": Infinity}',
    '{"user_id": "u", "k": -Infinity}',
    '{"user_id": "u", "k": 1e999}',
    '{"user_id": "\\ud800"}',
    '{"user_id": "u", "exclude": ["v1", "\\udfff"]}',
    '{"user_id": "u", "context": {"country": "\\udc80"}}',
    b'{"user_id": "\xed\xa0\x80"}',  # a surrogate written as (invalid) UTF-8 bytes
])
def test_recommendation_bodies_json_cannot_carry_are_422(client, body):
    response = client.post("/v1/recommendations", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["type"] == "json_invalid"
    assert any(word in error["ctx"]["error"] for word in ("not a JSON number", "out of range", "surrogate"))


def test_a_valid_surrogate_pair_is_an_ordinary_character(client):
    response = client.post("/v1/recommendations", content='{"user_id": "u\\ud83d\\ude00"}', headers=JSON)
    assert response.status_code == 200 and response.json()["user_id"] == "u\U0001F600"


@pytest.mark.parametrize("field, raw", [
    ("watched_s", "NaN"), ("watched_s", "Infinity"), ("watched_s", "1e400"), ("position", "-Infinity"),
    ("user_id", '"\\ud800"'), ("video_id", '"v\\udbff"'), ("event_id", '"\\udc00x"'), ("surface", '"\\ud800"'),
])
def test_feedback_bodies_json_cannot_carry_are_422_and_store_nothing(client, field, raw):
    fields = {"user_id": '"u1"', "video_id": '"v1"', "watched_s": "1.0", field: raw}
    body = '{"events": [{' + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}]}"
    response = client.post("/v1/feedback", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert_nothing_stored(client)


@pytest.mark.parametrize("when", [
    "9999-12-31T23:59:59-05:00",  # UTC would be year 10000
    "0001-01-01T00:00:00+05:00",  # UTC would be year 0
])
def test_datetimes_utc_cannot_express_are_422(client, when):
    response = client.post("/v1/feedback", json={"events": [event(event_time=when)]})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "events", 0, "event_time"] and "out of range" in error["msg"]
    assert_nothing_stored(client)


# --- the window, days and size of a request ----------------------------------------------------------------


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00", "1970-01-01T00:00:00Z", "2099-01-01T00:00:00Z",
                                  "9999-12-31T23:59:59Z"])
def test_event_time_far_from_now_is_422_and_names_the_window(client, when):
    response = client.post("/v1/feedback", json={"events": [event(), event(event_time=when)]})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "events", 1, "event_time"]
    assert "outside the accepted window" in error["msg"] and "RECLOOP_SERVING_FEEDBACK_MAX_AGE_HOURS" in error["msg"]
    assert_nothing_stored(client)  # the valid event of the same request is not stored either


def test_the_window_is_configurable(make_client):
    client = make_client(feedback_max_age_hours=1.0, feedback_max_future_seconds=60.0)
    assert client.post("/v1/feedback", json={"events": [event(event_time=now_iso(hours=-2))]}).status_code == 422
    assert client.post("/v1/feedback", json={"events": [event(event_time=now_iso(minutes=5))]}).status_code == 422
    ok = client.post("/v1/feedback", json={"events": [event(event_time=now_iso(minutes=-30)),
                                                      event(event_time=now_iso(seconds=30))]})
    assert ok.status_code == 202, ok.text
    naive = client.post("/v1/feedback", json={"events": [event(event_time=datetime.utcnow().isoformat())]})
    assert naive.status_code == 202  # naive times are UTC
    assert len(landed(client)) == 3


def test_one_request_cannot_spread_over_many_days(make_client):
    """The probe's 1,000 events on 1,000 days made 1,000 landing partitions."""
    client = make_client(feedback_max_age_hours=24 * 2000.0)
    start = datetime.now(timezone.utc) - timedelta(days=1500)
    spread = [event(event_time=(start + timedelta(days=i)).isoformat(), user_id=f"u{i}") for i in range(1000)]
    response = client.post("/v1/feedback", json={"events": spread})
    assert response.status_code == 422
    assert "1000 distinct UTC days" in response.text and "RECLOOP_SERVING_FEEDBACK_MAX_DAYS" in response.text
    four = [event(event_time=now_iso(days=-d)) for d in range(4)]
    assert client.post("/v1/feedback", json={"events": four}).status_code == 422
    assert client.post("/v1/feedback", json={"events": four[:3]}).status_code == 202
    assert len({r["event_time"].date() for r in landed(client)}) == 3


def test_events_per_request_are_bounded(make_client):
    client = make_client(feedback_max_events=50)
    response = client.post("/v1/feedback", json={"events": [event(user_id=f"u{i}") for i in range(51)]})
    assert response.status_code == 422 and "at most 50" in response.text
    assert client.post("/v1/feedback", json={"events": [event(user_id=f"u{i}") for i in range(50)]}).status_code == 202
    ceiling = client.post("/v1/feedback", json={"events": [event()] * 10_001})  # the schema's own bound
    assert ceiling.status_code == 422
    with pytest.raises(ValueError, match="feedback_max_events"):
        ServingConfig(feedback_max_events=10_001)


@pytest.mark.parametrize("field, value", [
    ("completed", "yes"), ("completed", 1), ("liked", "T"), ("liked", "true"), ("position", 1.5),
    ("position", "2"), ("position", True), ("event_id", ""),
])
def test_booleans_and_integers_take_exact_values_only(client, field, value):
    response = client.post("/v1/feedback", json={"events": [event(**{field: value})]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == field
    assert_nothing_stored(client)


def test_an_event_id_names_one_event_of_a_request(client):
    response = client.post("/v1/feedback", json={"events": [event(event_id="a1"), event(event_id="a1")]})
    assert response.status_code == 422 and "a1" in response.text
    assert_nothing_stored(client)


# --- the bounded history --------------------------------------------------------------------------


def test_history_evicts_least_recently_used_users_and_caps_each_user():
    history = UserHistory(max_users=3, max_events=10, max_user_events=4)
    history.add([("a", "v1", 1, True, True), ("b", "v1", 1, True, True), ("c", "v1", 1, True, True)])
    assert history.watched("a") == {"v1"}  # reading "a" makes "b" the least recently used
    history.add([("d", "v2", 2, True, True)])
    assert history.watched("b") == set() and history.watched("a") == {"v1"}
    history.add([("a", f"w{i}", 10 + i, True, False) for i in range(6)])  # "a" over its cap: oldest out
    assert history.watched("a") == {"w2", "w3", "w4", "w5"}
    stats = history.stats()
    assert stats.feedback_users == 3 and stats.feedback_events == 6
    assert stats.evicted_users == 1 and stats.evicted_events == {"lru_user": 1, "user_cap": 3}
    history.add([("e", f"x{i}", 20 + i, True, False) for i in range(4)] + [("f", "y", 30, True, False)])
    stats = history.stats()
    assert stats.feedback_events <= 10 and stats.feedback_users <= 3  # the total bound evicts users too
    assert history.watched("f") == {"y"}


def test_sustained_feedback_keeps_the_history_bounded_and_reports_it(make_client):
    client = make_client(history_max_users=100, history_max_events=500, history_max_user_events=20)
    for batch in range(10):
        body = {"events": [event(user_id=f"u{batch}-{i % 150}", video_id=f"v{i}") for i in range(300)]}
        assert client.post("/v1/feedback", json=body).status_code == 202
    stats = client.app.state.service.history.stats()
    assert stats.feedback_users <= 100 and stats.feedback_events <= 500
    metrics = client.get("/metrics").text
    assert f'recloop_serving_history_events{{source="feedback"}} {float(stats.feedback_events)}' in metrics
    assert f'recloop_serving_history_users{{source="feedback"}} {float(stats.feedback_users)}' in metrics
    evicted = [line for line in metrics.splitlines() if line.startswith("recloop_serving_history_evicted_users_total ")]
    assert evicted and float(evicted[0].split()[-1]) > 0
    assert len(landed(client)) == 3000  # evicted from memory, never from the landing zone


# --- the spool across crashes ---------------------------------------------------------------------------


def spool_rows(n: int, tag: str) -> list[dict]:
    t = datetime(2025, 1, 6, 9, tzinfo=timezone.utc)
    return [{"event_id": f"{tag}{i}", "user_id": "u1", "video_id": f"v{i}", "surface": "home", "position": i,
             "event_time": t + timedelta(hours=i * 10), "watched_s": 1.0, "completed": False, "liked": False}
            for i in range(n)]


def landing_ids(root: Path) -> list[str]:
    return [r["event_id"] for path in sorted(root.rglob("*.parquet")) for r in pq.read_table(path).to_pylist()]


def test_a_segment_flushed_again_after_a_crash_replaces_its_landing_files(tmp_path):
    """Killed after the landing write and before the spool segment was deleted: the next start flushes
    the segment again, and each event is still in the landing zone once."""
    landing, spool = LocalLake(tmp_path / "landing"), tmp_path / "spool"
    writer = FeedbackWriter(landing, spool)
    writer.submit(spool_rows(4, "a"))  # 4 events over 2 days
    (segment,) = spool.glob("segment-*.jsonl")
    kept = tmp_path / "segment.copy"
    shutil.copy(segment, kept)
    writer.flush()
    shutil.copy(kept, segment)  # the state a kill -9 between the two steps leaves
    FeedbackWriter(landing, spool).flush()  # what the next start does first
    ids = landing_ids(tmp_path / "landing")
    assert sorted(ids) == ["fb-a0", "fb-a1", "fb-a2", "fb-a3"]
    assert not list(spool.glob("segment-*"))


def test_a_torn_last_spool_line_is_skipped_and_the_rest_lands(tmp_path):
    """Killed in the middle of writing a request (never acknowledged): the next start still starts, lands
    every acknowledged event and none of the torn request's."""
    landing, spool = LocalLake(tmp_path / "landing"), tmp_path / "spool"
    writer = FeedbackWriter(landing, spool)
    writer.submit(spool_rows(2, "ok"))
    (segment,) = spool.glob("segment-*.jsonl")
    torn = json.dumps([{"event_id": f"torn{i}", "event_time": "2025-01-06T09:00:00+00:00"} for i in range(3)])
    with open(segment, "a", encoding="utf-8") as f:
        f.write(torn[: len(torn) // 2])
    FeedbackWriter(landing, spool).start()  # raised (JSONDecodeError) before: the service could not start
    assert sorted(landing_ids(tmp_path / "landing")) == ["fb-ok0", "fb-ok1"]


def test_an_old_spool_of_one_event_per_line_is_still_read(tmp_path):
    landing, spool = LocalLake(tmp_path / "landing"), tmp_path / "spool"
    spool.mkdir()
    lines = [json.dumps({**r, "event_time": r["event_time"].isoformat()}) for r in spool_rows(2, "fb-old")]
    (spool / "segment-20250106T090000000000-abcdef12.jsonl").write_text("\n".join(lines) + "\n")
    FeedbackWriter(landing, spool).flush()
    assert sorted(landing_ids(tmp_path / "landing")) == ["fb-old0", "fb-old1"]


# --- property: any body gets 202 or 422, never a 5xx -------------------------------------------------------

_text = st.text(max_size=12) | st.sampled_from(["\ud800", "u\udfff", "", "u1", "fb-x", "e0000001"])
_number = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20) | st.booleans() \
    | st.sampled_from(["1", "yes", None])
_time = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(lambda d: d.isoformat()) \
    | st.sampled_from(["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "not a time", None]) \
    | st.integers(-3, 3).map(lambda h: now_iso(hours=h)) \
    | st.tuples(st.integers(0, 23), st.sampled_from(["+14:00", "-12:00", "Z"])).map(
        lambda t: (datetime.now(timezone.utc) + timedelta(hours=t[0] - 12)).strftime("%Y-%m-%dT%H:%M:%S") + t[1])
_event = st.fixed_dictionaries(
    {"user_id": _text, "video_id": _text},
    optional={"event_id": _text, "event_time": _time, "watched_s": _number, "position": _number,
              "completed": _number, "liked": _number, "surface": _text | st.none()},
)


def _dump(body: object, ascii_only: bool) -> bytes:
    # allow_nan: NaN/Infinity as a lax client writes them; not ascii_only: lone surrogates as raw bytes
    return json.dumps(body, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@pytest.fixture()
def property_client(make_client) -> TestClient:
    return make_client(feedback_max_days=2)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(_event, min_size=0, max_size=5), ascii_only=st.booleans())
def test_any_feedback_body_is_accepted_whole_or_refused_whole(property_client, events, ascii_only):
    client = property_client
    service = client.app.state.service
    before = service.history.stats().feedback_events
    response = client.post("/v1/feedback", content=_dump({"events": events}, ascii_only), headers=JSON)
    assert response.status_code in (202, 422), response.text
    after = service.history.stats().feedback_events
    if response.status_code == 202:
        ids = response.json()["event_ids"]
        assert len(ids) == len(events) and all(i.startswith("fb-") for i in ids)
        assert after == before + len(events)
        written = {r["event_id"] for r in landed(client)}
        assert set(ids) <= written
    else:
        assert after == before
        json.dumps(response.json())  # the 422 itself is valid JSON
