"""The online half of the loop, serving side: request ids and the impressions log, feedback's request id,
online experiments (A/B and team-draft interleaving) and the exploration slot.

The pure parts (arm assignment, the interleaving merge, exploration draws) are tested on their own; the
rest against the real app (TestClient) around a service with a trained bundle registered in a real
MLflow registry (SQLite) as versions 1 (`champion`) and 2 (set as `experiment` by the tests), built
once per module as in tests/unit/test_serving.py.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from recloop.config import Settings
from recloop.data.schemas import IMPRESSIONS
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.features import apply_repo, materialize_partition
from recloop.lake import LocalLake
from recloop.model_plane import fit_config
from recloop.model_plane.bundle import save_bundle
from recloop.model_plane.fit import fit_recommender
from recloop.model_plane.history import History
from recloop.model_plane.ranker import RankerConfig
from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
from recloop.registry import CHAMPION, EXPERIMENT, Registry
from recloop.serving import RecommendationService, ServingConfig, create_app
from recloop.serving.experiment import ab_arm, bucket, experiment_id, team_draft_interleave
from recloop.serving.explore import apply_exploration, explore_slots
from recloop.serving.impressions import ImpressionWriter, request_seed
from recloop.serving.service import Item, Recommendation
from recloop.training import TwoTowerConfig, load_window

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(
    seed=12, days=4, initial_users=400, initial_videos=300, new_users_per_day=10, new_videos_per_day=10,
    events_per_day=2_000, n_creators=60,
)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
MODEL = "recloop-serving-online-test"
K = 20
REQUEST_ID = re.compile(r"^rq-[0-9a-f]{32}$")


# --- pure parts -----------------------------------------------------------------------------------------


class Scripted(random.Random):
    """A random source whose `random()` returns the given values in turn (the interleaving's coin)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_team_draft_interleaving_hand_made_example():
    a = ["a1", "a2", "a3", "a4"]
    b = ["b1", "a1", "b2", "a3"]
    # tie -> coin 0.3: A picks a1; B behind: b1; tie -> coin 0.7: B, whose a1 is placed: b2; A behind: a2;
    # tie -> coin 0.2: A: a3; B behind but has nothing left (a3 placed): A again: a4.
    merged = team_draft_interleave(a, b, 6, Scripted([0.3, 0.7, 0.2]))
    assert merged == [("a1", 0), ("b1", 1), ("b2", 1), ("a2", 0), ("a3", 0), ("a4", 0)]
    assert team_draft_interleave(a, b, 3, Scripted([0.3, 0.7])) == merged[:3]
    # deterministic for a seed, never a duplicate, teams balanced while both have items
    for seed in range(50):
        run = team_draft_interleave(list(range(30)), list(range(29, -1, -1)), 10, seed)
        assert run == team_draft_interleave(list(range(30)), list(range(29, -1, -1)), 10, seed)
        assert len({item for item, _ in run}) == 10
        assert abs(sum(team for _, team in run) - 5) <= 1
    # identical rankings interleave to the same ranking
    assert [item for item, _ in team_draft_interleave(a, a, 4, 1)] == a
    assert team_draft_interleave([], [], 5, 1) == []


def test_ab_arms_are_stable_per_user_and_match_the_share():
    users = [f"u{i:07d}" for i in range(10_000)]
    exp = experiment_id("3", "4")
    assert exp == "exp-v3-v4"
    arms = [ab_arm(exp, u, 0.3) for u in users]
    challengers = arms.count("challenger")
    # binomial(10000, 0.3): sd ~46; 4.5 sd of tolerance
    assert abs(challengers - 3_000) < 210, challengers
    assert arms == [ab_arm(exp, u, 0.3) for u in users]  # stable
    assert all(ab_arm(exp, u, 0.0) == "champion" for u in users[:500])
    assert all(ab_arm(exp, u, 1.0) == "challenger" for u in users[:500])
    # a larger share only moves users from champion to challenger (buckets are fixed per user)
    assert all(ab_arm(exp, u, 0.5) == "challenger" for u, arm in zip(users, arms) if arm == "challenger")
    # another experiment reshuffles users
    other = [ab_arm("exp-v4-v5", u, 0.3) for u in users]
    assert 0.3 < sum(x != y for x, y in zip(arms, other)) / len(users) < 0.5
    assert all(0.0 <= bucket(exp, u) < 1.0 for u in users[:100])


def test_exploration_draws_and_propensities():
    share, k, pool = 0.2, 20, 100
    explored = 0
    for seed in range(2_000):
        slots = explore_slots(k, pool, share, seed)
        assert slots == explore_slots(k, pool, share, seed)  # deterministic per seed
        left = pool
        for index, propensity in slots:
            if index is None:
                assert propensity == pytest.approx(1 - share)
            else:
                assert 0 <= index < left and propensity == pytest.approx(share / left)
                left -= 1
                explored += 1
    # 40,000 slots, binomial sd ~80
    assert abs(explored / (2_000 * k) - share) < 0.01
    assert explore_slots(5, pool, 0.0, 1) == [(None, 1.0)] * 5
    assert explore_slots(3, 0, 0.5, 1) == [(None, 1.0)] * 3  # nothing to explore with
    # every slot explored from a pool of 2: two draws, then the pool is empty
    assert [p for _, p in explore_slots(3, 2, 1.0, 7)] == [0.5, 1.0, 1.0]
    items, extra = [f"v{i}" for i in range(10)], [f"x{i}" for i in range(30)]
    for seed in range(200):
        out = apply_exploration(items, extra, 0.5, seed)
        videos = [v for v, _, _ in out]
        assert len(set(videos)) == 10
        for slot, (video, was_explored, _) in enumerate(out):
            assert (video in extra) == was_explored and (was_explored or video == items[slot])


def test_impressions_spool_survives_a_crash_and_skips_a_torn_line(tmp_path):
    landing = LocalLake(tmp_path / "landing")
    rec = Recommendation("u1", [Item("v1", 2.0, "two_tower", 0, model_version="3"),
                                Item("v2", 1.0, "explore", 1, 0.05, True, "challenger", "4")],
                         "3", False, None, False, {}, {}, "rq-" + "a" * 32, "exp-v3-v4", "challenger")
    served = int(datetime(2025, 1, 6, 23, 59, tzinfo=timezone.utc).timestamp() * 1e6)
    ImpressionWriter(landing, tmp_path / "spool").log(rec, "home", served)  # spooled, then the process "dies"
    (segment,) = (tmp_path / "spool").glob("segment-*.jsonl")
    with segment.open("a") as f:
        f.write('{"request_id": "rq-torn", "items": [["v')  # a write cut by the crash, never acknowledged
    assert not landing.list_keys("impressions/")
    written = ImpressionWriter(landing, tmp_path / "spool").flush()  # what start() does first
    assert len(written) == 1 and "impressions/date=2025-01-06/impressions-" in written[0]
    table = pq.read_table(written[0])
    assert table.schema == IMPRESSIONS.schema
    rows = table.to_pylist()
    assert [r["impression_id"] for r in rows] == ["rq-" + "a" * 32 + "-0", "rq-" + "a" * 32 + "-1"]
    assert rows[1] | {"served_at": None} == {
        "impression_id": "rq-" + "a" * 32 + "-1", "request_id": "rq-" + "a" * 32, "user_id": "u1",
        "video_id": "v2", "served_at": None, "position": 1, "source": "explore", "score": 1.0,
        "model_version": "4", "experiment": "exp-v3-v4", "arm": "challenger", "propensity": 0.05,
        "explored": True, "fallback": False, "surface": "home"}
    assert rows[0]["served_at"] == datetime(2025, 1, 6, 23, 59, tzinfo=timezone.utc)
    assert not list((tmp_path / "spool").iterdir())
    # Without fsync per line (the default), the line is in the file (the kernel) when `log` returns, which
    # is what survives kill -9; the background fsync then clears the dirty flag.
    quick = ImpressionWriter(landing, tmp_path / "spool2", fsync=False)
    quick.log(rec, None, served)
    (segment,) = (tmp_path / "spool2").glob("segment-*.jsonl")
    assert rec.request_id in segment.read_text() and quick._dirty
    quick.sync()
    assert not quick._dirty
    assert request_seed("rq-" + "0" * 31 + "1") == 0 and request_seed("rq-" + "f" * 32) == 2**64 - 1


# --- the service ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The lake, Feast, MLflow (versions 1 and 2 of one bundle, champion = 1) and the settings."""
    root = tmp_path_factory.mktemp("serving-online")
    settings = Settings(
        home=root / "home", landing_uri=str(root / "landing"), lake_uri=str(root / "lake"),
        feast_data_dir=root / "feast", feast_project=f"t{uuid.uuid4().hex[:10]}",
    )
    lake = LocalLake(settings.lake_uri)
    simulate_validated(SIM, lake)
    apply_repo(settings)
    materialize_partition(settings, DAYS[-1])
    window = load_window(lake, DAYS)
    config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=3, num_threads=1), max_users_per_fold=300,
                        ranker=RankerConfig(max_rounds=40, num_threads=1), l2_grid=(30.0, 300.0))
    fitted = fit_recommender(History.from_window(window), config=config, store=LakeSnapshots(lake))
    bundle = save_bundle(root / "bundle", fitted.recommender)
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=(root / "artifacts").as_uri())
    run_id = registry.log_training_run(
        experiment="serving-online-test", params={}, metrics={}, data={}, features=list(RANKING_FEATURES),
        bundle_dir=bundle, tags={}, example_user_ids=["u0000001"],
    )
    for _ in range(2):
        registry.register(run_id)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, "1")
    return {"root": root, "settings": settings, "lake": lake, "registry": registry}


def _config(root: Path, **overrides) -> ServingConfig:
    safety = root / f"safety-{uuid.uuid4().hex[:6]}.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    values = {
        "poll_seconds": 3600.0, "safety_file": safety, "safety_check_seconds": 0.0,
        "feedback_spool_dir": root / f"spool-{uuid.uuid4().hex[:6]}", "feedback_flush_seconds": 3600.0,
        "impressions_spool_dir": root / f"impressions-{uuid.uuid4().hex[:6]}", "impressions_flush_seconds": 3600.0,
        "feedback_max_age_hours": 24 * 3650.0,
    }
    return ServingConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def service(world):
    svc = RecommendationService(world["settings"], _config(world["root"]), registry=world["registry"])
    assert svc.refresh() and svc.model is not None and svc.model.version == "1" and svc.challenger is None
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service=service)) as c:
        yield c


def recommend(client: TestClient, user_id: str, **body) -> dict:
    response = client.post("/v1/recommendations", json={"user_id": user_id, **body})
    assert response.status_code == 200, response.text
    return response.json()


def users(service: RecommendationService, n: int) -> list[str]:
    return sorted(service.model.user_row)[:n]


def metric(client: TestClient, name: str, **labels: str) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def landed_impressions(service: RecommendationService) -> dict[str, list[dict]]:
    """Flush the service's impressions; every landed row by request id, in position order."""
    service.impressions.flush()
    root = Path(service.settings.landing_uri) / "impressions"
    by_request: dict[str, list[dict]] = {}
    for path in sorted(root.rglob("*.parquet")):
        table = pq.read_table(path)
        assert table.schema == IMPRESSIONS.schema
        for row in table.to_pylist():
            by_request.setdefault(row["request_id"], []).append(row)
    return {rid: sorted(rows, key=lambda r: r["position"]) for rid, rows in by_request.items()}


def test_every_answer_has_a_request_id_and_lands_as_impressions(client, service):
    user = users(service, 1)[0]
    body = recommend(client, user, surface="home")
    assert REQUEST_ID.match(body["request_id"]) and body["experiment"] is None and body["arm"] == "champion"
    assert [i["position"] for i in body["items"]] == list(range(K))
    assert all(i["propensity"] == 1.0 and i["explored"] is False for i in body["items"])
    fallback = recommend(client, user, context={"country": "nowhere"}, exclude=[i["video_id"] for i in body["items"]])
    assert fallback["request_id"] != body["request_id"]
    assert metric(client, "recloop_serving_stage_seconds_count", stage="log") >= 2
    assert metric(client, "recloop_serving_impressions_total", outcome="logged") >= 2 * K

    landed = landed_impressions(service)
    rows = landed[body["request_id"]]
    assert [(r["video_id"], r["position"], r["source"], r["score"]) for r in rows] == [
        (i["video_id"], i["position"], i["source"], i["score"]) for i in body["items"]]
    for r in rows:
        assert r["impression_id"] == f"{body['request_id']}-{r['position']}" and r["user_id"] == user
        assert (r["model_version"], r["experiment"], r["arm"], r["propensity"], r["explored"], r["fallback"],
                r["surface"]) == ("1", None, "champion", 1.0, False, False, "home")
        assert abs((datetime.now(timezone.utc) - r["served_at"]).total_seconds()) < 600
    assert len(landed[fallback["request_id"]]) == len(fallback["items"])
    assert metric(client, "recloop_serving_impressions_total", outcome="flushed") >= 2 * K


def test_feedback_carries_the_request_id_into_the_landing_zone(client, service):
    body = recommend(client, users(service, 2)[1])
    item = body["items"][0]
    events = [{"user_id": body["user_id"], "video_id": item["video_id"], "watched_s": 3.0,
               "request_id": body["request_id"], "position": 0},
              {"user_id": body["user_id"], "video_id": "v-other", "watched_s": 0.0}]
    response = client.post("/v1/feedback", json={"events": events})
    assert response.status_code == 202, response.text
    written = [w for w in service.feedback.flush() if "/events/" in w]
    rows = [r for w in written for r in pq.read_table(w).to_pylist()]
    assert pq.read_table(written[0]).schema.names[-1] == "request_id"
    by_video = {r["video_id"]: r for r in rows}
    assert by_video[item["video_id"]]["request_id"] == body["request_id"]
    assert by_video["v-other"]["request_id"] is None
    too_long = {**events[0], "request_id": "rq-" + "a" * 70}
    assert client.post("/v1/feedback", json={"events": [too_long]}).status_code == 422


def test_ab_experiment_splits_users_by_arm_and_ends_with_the_alias(world, client, service):
    registry = world["registry"]
    registry.client.set_registered_model_alias(MODEL, EXPERIMENT, "2")
    try:
        assert service.refresh() and service.challenger is not None and service.challenger.version == "2"
        assert service.experiment == "exp-v1-v2" and service.status()["experiment"] == "exp-v1-v2"
        assert not service.refresh()  # the same experiment: nothing reloaded
        answers = {u: recommend(client, u) for u in users(service, 60)}
        for user, body in answers.items():
            arm = ab_arm("exp-v1-v2", user, 0.5)
            assert body["experiment"] == "exp-v1-v2" and body["arm"] == arm
            assert body["model_version"] == ("2" if arm == "challenger" else "1")
            assert recommend(client, user)["arm"] == arm  # stable
        arms = [b["arm"] for b in answers.values()]
        assert 0 < arms.count("challenger") < len(arms)
        assert metric(client, "recloop_serving_experiment_requests_total", arm="challenger") == 2 * arms.count("challenger")
        assert metric(client, "recloop_serving_experiment_requests_total", arm="champion") == 2 * arms.count("champion")
        landed = landed_impressions(service)
        for body in answers.values():
            rows = landed[body["request_id"]]
            assert {(r["experiment"], r["arm"], r["model_version"]) for r in rows} == {
                ("exp-v1-v2", body["arm"], body["model_version"])}
    finally:
        registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
    service.refresh()
    assert service.challenger is None and service.experiment is None
    after = recommend(client, users(service, 1)[0])
    assert after["experiment"] is None and after["arm"] == "champion" and after["model_version"] == "1"


def test_a_promoted_challenger_becomes_the_champion_without_a_reload(world, client, service):
    registry = world["registry"]
    registry.client.set_registered_model_alias(MODEL, EXPERIMENT, "2")
    try:
        service.refresh()
        challenger = service.challenger
        assert challenger is not None and challenger.version == "2"
        # the online decision promotes: champion := the experiment's version, alias removed
        registry.client.set_registered_model_alias(MODEL, CHAMPION, "2")
        registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
        assert service.refresh()
        assert service.model is challenger and service.challenger is None and service.experiment is None
        body = recommend(client, users(service, 1)[0])
        assert body["model_version"] == "2" and body["experiment"] is None
    finally:
        registry.client.set_registered_model_alias(MODEL, CHAMPION, "1")
        if registry.experiment() is not None:
            registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
        service.refresh()
    assert service.model.version == "1"


def test_interleaving_merges_both_rankings_and_credits_each_team(world, service, client, tmp_path):
    registry = world["registry"]
    registry.client.set_registered_model_alias(MODEL, EXPERIMENT, "2")
    svc = RecommendationService(world["settings"], _config(tmp_path, experiment_mode="interleave"),
                                registry=registry)
    try:
        svc.refresh()
        assert svc.experiment == "exp-v1-v2"
        with TestClient(create_app(service=svc)) as interleaved:
            for user in users(service, 17)[2:]:  # (not the user an earlier test gave feedback for)
                body = recommend(interleaved, user)
                alone = recommend(client, user)  # the champion alone (no experiment on `service` now)
                assert body["arm"] == "interleaved" and body["experiment"] == "exp-v1-v2"
                # versions 1 and 2 are the same bundle: team-draft interleaving of two equal rankings is
                # that ranking, each pair of slots one pick per team
                assert [i["video_id"] for i in body["items"]] == [i["video_id"] for i in alone["items"]]
                rows = landed_impressions(svc)[body["request_id"]]
                teams = [r["arm"] for r in rows]
                assert all({teams[i], teams[i + 1]} == {"champion", "challenger"} for i in range(0, K - 1, 2))
                assert {r["model_version"] for r in rows if r["arm"] == "challenger"} == {"2"}
            assert metric(interleaved, "recloop_serving_experiment_requests_total", arm="interleaved") == 15
    finally:
        registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
        svc.close()


def test_the_start_log_and_the_landing_page_name_the_model_and_the_experiment(world, tmp_path, caplog):
    """Started with a champion and an experiment alias, the service logs one INFO line naming both (name,
    version, alias, URI, the registry's source) and `/` shows them; when the experiment ends, both say so."""
    registry = world["registry"]
    registry.client.set_registered_model_alias(MODEL, EXPERIMENT, "2")
    caplog.set_level(logging.INFO, logger="recloop.serving.service")
    svc = RecommendationService(world["settings"], _config(tmp_path), registry=registry)
    try:
        with TestClient(create_app(service=svc)) as http:  # the start: the first refresh, in the background
            deadline = time.monotonic() + 120
            while svc.experiment is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert svc.experiment == "exp-v1-v2"
            deadline = time.monotonic() + 10  # the line follows the experiment step in the same refresh
            while not [r for r in caplog.records if r.getMessage().startswith("serving model")] \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            lines = [r for r in caplog.records
                     if r.name == "recloop.serving.service" and r.getMessage().startswith("serving ")]
            assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]
            champion = registry.champion()
            source, run = champion.source, champion.run_id
            assert source and run
            assert lines[0].getMessage().startswith(
                f"serving model {MODEL} version 1 (alias champion, models:/{MODEL}/1, source {source}, run {run}; ")
            assert lines[0].getMessage().endswith(
                f"; online experiment exp-v1-v2: challenger version 2 (alias experiment, models:/{MODEL}/2), "
                f"ab, 50% of users on the challenger")

            page = http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            text = page.text
            assert f"<strong>{MODEL}</strong> version <strong>1</strong> (alias <code>champion</code>)" in text
            assert f"<code>models:/{MODEL}/1</code> (training run <code>{run}</code>)" in text and "ready (" in text
            assert ("<strong>exp-v1-v2</strong>: challenger version <strong>2</strong> (alias <code>experiment"
                    f"</code>, <code>models:/{MODEL}/2</code>), A/B, 50% of users on the challenger") in text
            assert source not in text  # artifact locations stay in the log (the page is open to anyone)
            for path in ("/docs", "/redoc", "/metrics", "/healthz", "/readyz"):
                assert f'href="{path}"' in text

            registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
            svc.refresh()
            assert svc.experiment is None
            ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving model")]
            assert len(ended) == 2 and ended[-1].endswith("; no online experiment")
            assert "<td>none: every answer comes from the champion</td>" in http.get("/").text
    finally:
        if registry.experiment() is not None:
            registry.client.delete_registered_model_alias(MODEL, EXPERIMENT)
        svc.close()


def test_exploration_fills_a_share_of_slots_from_the_pool_with_propensities(world, service, client, tmp_path):
    share = 0.25
    svc = RecommendationService(world["settings"], _config(tmp_path, explore_share=share, explore_pool=50),
                                registry=world["registry"])
    try:
        svc.refresh()
        slots = explored = 0
        with TestClient(create_app(service=svc)) as exploring:
            for user in users(service, 42)[2:]:
                body = recommend(exploring, user)
                plain = recommend(client, user)["items"]
                assert len({i["video_id"] for i in body["items"]}) == len(body["items"]) == K
                watched = svc.history.watched(user)
                pool_left = 50
                for slot, item in enumerate(body["items"]):
                    assert item["position"] == slot
                    if item["explored"]:
                        assert item["source"] == "explore" and item["video_id"] not in watched
                        assert item["video_id"] not in {i["video_id"] for i in plain}  # ranked below the top k
                        assert item["propensity"] == pytest.approx(share / pool_left)
                        pool_left -= 1
                        explored += 1
                    else:
                        # the model's own video of that slot, kept with probability 1 - ε
                        assert item["video_id"] == plain[slot]["video_id"] and item["source"] != "explore"
                        assert item["propensity"] == pytest.approx(1 - share)
                    slots += 1
                rows = landed_impressions(svc)[body["request_id"]]
                assert [(r["explored"], r["propensity"], r["source"]) for r in rows] == [
                    (i["explored"], i["propensity"], i["source"]) for i in body["items"]]
            assert metric(exploring, "recloop_serving_explored_slots_total") == explored
        # 800 slots, binomial sd ~12: within 4.5 sd
        assert abs(explored - share * slots) < 55, (explored, slots)
    finally:
        svc.close()
