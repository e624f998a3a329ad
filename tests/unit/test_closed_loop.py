"""The closed loop: the simulator's sessions/respond API, the loop with stub recommenders (responses follow
the ground truth, days are reproducible), and one run against a real in-process RecommendationService."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from recloop.data.closed_loop import NoChampion, gini, run_closed_loop, top_share
from recloop.data.schemas import SURFACES
from recloop.data.simulator import SimConfig, Simulator
from recloop.lake import LocalLake

TINY = dict(seed=5, days=3, initial_users=300, initial_videos=200, new_users_per_day=10, new_videos_per_day=10,
            events_per_day=1_200, n_creators=40)


class Oracle:
    """Shows each user the videos of best true affinity among a random pool (a recommender that knows)."""

    def __init__(self, sim: Simulator, pool: int = 60) -> None:
        self.sim, self.pool, self.rng = sim, pool, np.random.default_rng(0)
        self.feedback_events: list[dict] = []
        self.asked: list[tuple[dict, str]] = []

    def recommend(self, user_id, k, context, surface):
        sim = self.sim
        self.asked.append((dict(context), surface))
        u = int(user_id[1:])
        known = sim.catalog_size(sim.day_start_us(sim._next_day - 1))
        cand = self.rng.choice(known, size=min(self.pool, known), replace=False)
        score = sim._v_vec[cand] @ sim._u_vec[u] * 4.0 + sim._v_quality[cand]
        best = cand[np.argsort(-score)[:k]]
        return {"request_id": f"rq-{u}", "arm": "champion", "model_version": "1",
                "items": [{"video_id": f"v{v:07d}", "position": i} for i, v in enumerate(best)]}

    def feedback(self, events):
        self.feedback_events.extend(events)


class Random(Oracle):
    """Random videos of the known catalog."""

    def recommend(self, user_id, k, context, surface):
        sim = self.sim
        known = sim.catalog_size(sim.day_start_us(sim._next_day - 1))
        videos = self.rng.choice(known, size=k, replace=False)
        return {"items": [{"video_id": f"v{v:07d}"} for v in videos]}


class One(Oracle):
    """The same video (and its neighbours) for everybody: maximal concentration."""

    def recommend(self, user_id, k, context, surface):
        return {"items": [{"video_id": f"v{v:07d}"} for v in range(k)]}


def test_sessions_are_the_open_loop_sessions_and_respond_follows_the_ground_truth():
    config = SimConfig(**TINY)
    open_loop = Simulator(config).day(1)["events"].to_pandas()
    sim = Simulator(config)
    s = sim.sessions(1)
    assert int(s.length.sum()) == len(open_loop)
    first = open_loop[open_loop["position"] == 0].sort_values("event_time")
    order = np.argsort(s.start_us, kind="stable")
    assert [s.user_id(i) for i in order] == first["user_id"].tolist()
    assert [SURFACES[s.surface[i]] for i in order] == first["surface"].tolist()

    # the same impressions in the same order respond the same way after `sessions` restarts the stream
    users = [s.user_id(0)] * 50
    videos = [f"v{v:07d}" for v in range(50)]
    a = sim.respond(1, users, videos, np.zeros(50, np.int64))
    sim.sessions(1)
    b = sim.respond(1, users, videos, np.zeros(50, np.int64))
    np.testing.assert_array_equal(a.watched_s, b.watched_s)
    # position bias: the same impressions far down the slate are watched less
    u = np.repeat(np.arange(100), 40)
    v = np.tile(np.arange(40), 100)
    top = sim.respond(1, u, v, np.zeros(len(u), np.int64)).watched.mean()
    low = sim.respond(1, u, v, np.full(len(u), 19)).watched.mean()
    assert top > low + 0.05
    with pytest.raises(ValueError, match="unknown video id 'v9999999'"):
        sim.respond(1, ["u0000001"], ["v9999999"], [0])


def test_a_recommender_that_knows_the_users_beats_random_and_days_are_reproducible(tmp_path):
    config = SimConfig(**TINY)
    landing = LocalLake(str(tmp_path / "landing"))
    sim = Simulator(config)
    oracle = Oracle(sim)
    good = run_closed_loop(config, landing, oracle, simulator=sim)
    sim_r = Simulator(config)
    bad = run_closed_loop(config, None, Random(sim_r), simulator=sim_r)
    for g, r in zip(good.days, bad.days):
        assert g.impressions > 500 and r.impressions > 500
        assert g.ctr > r.ctr + 0.05, (g.ctr, r.ctr)
        assert g.watch_s_per_impression > r.watch_s_per_impression
    # each session asked with its surface and the user's country and device
    assert {surface for _, surface in oracle.asked} == set(SURFACES)
    assert all(set(context) == {"country", "device"} for context, _ in oracle.asked)
    # what was reported: watches only, with the answer's request_id, in the day's time range
    assert oracle.feedback_events and all(e["watched_s"] > 0 for e in oracle.feedback_events)
    assert sum(d.watches for d in good.days) == len(oracle.feedback_events)
    assert all(e["request_id"] == f"rq-{int(e['user_id'][1:])}" for e in oracle.feedback_events)
    assert good.days[0].by_arm["champion"]["impressions"] == good.days[0].impressions
    # the day's arrivals are in the landing zone for the data plane
    day0 = config.date_of(0).isoformat()
    users = pq.read_table(io.BytesIO(landing.read_bytes(f"users/date={day0}/part-0.parquet")))
    assert users.num_rows == TINY["initial_users"] + TINY["new_users_per_day"]

    sim2 = Simulator(config)
    again = run_closed_loop(config, None, Oracle(sim2), simulator=sim2)
    assert [d.as_dict() | {"seconds": 0} for d in again.days] == [d.as_dict() | {"seconds": 0} for d in good.days]


def test_concentration_and_coverage_tell_a_narrow_recommender_from_a_broad_one():
    config = SimConfig(**{**TINY, "days": 1})
    sim_one, sim_random = Simulator(config), Simulator(config)
    one = run_closed_loop(config, None, One(sim_one), simulator=sim_one).days[0]
    spread = run_closed_loop(config, None, Random(sim_random), simulator=sim_random).days[0]
    assert one.coverage < 0.15 < spread.coverage
    assert one.gini > 0.85 > spread.gini
    assert one.top1_share > spread.top1_share
    assert gini(np.ones(10)) == pytest.approx(0.0) and gini(np.eye(1, 100)[0]) == pytest.approx(0.99)
    assert top_share(np.arange(200)) == pytest.approx((199 + 198) / np.arange(200).sum())


def test_unwatched_impressions_are_reported_only_when_asked():
    config = SimConfig(**{**TINY, "days": 1})
    sim = Simulator(config)
    oracle = Oracle(sim)
    day = run_closed_loop(config, None, oracle, simulator=sim, report_unwatched=True).days[0]
    assert len(oracle.feedback_events) == day.impressions > day.watches


# --- a real service --------------------------------------------------------------------------------

SERVED = SimConfig(seed=11, days=5, initial_users=400, initial_videos=250, new_users_per_day=10,
                   new_videos_per_day=10, events_per_day=2_000, n_creators=50)
MODEL = "recloop-closed-loop-test"


def _serving_config(root, **overrides):
    from recloop.serving import ServingConfig

    safety = root / "safety.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    return ServingConfig(**{"poll_seconds": 3600.0, "safety_file": safety, "safety_check_seconds": 0.0,
                            "feedback_spool_dir": root / f"spool-{uuid.uuid4().hex[:6]}",
                            "feedback_flush_seconds": 3600.0, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """As tests/unit/test_serving.py builds it: a validated lake of the first 5 days, Feast, a two-tower +
    ranker bundle registered in a real MLflow registry as the champion, and the settings."""
    from recloop.config import Settings
    from recloop.data.simulator import simulate_validated
    from recloop.features import apply_repo, materialize_partition
    from recloop.model_plane import fit_config
    from recloop.model_plane.bundle import save_bundle
    from recloop.model_plane.fit import fit_recommender
    from recloop.model_plane.history import History
    from recloop.model_plane.ranker import RankerConfig
    from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
    from recloop.registry import CHAMPION, Registry
    from recloop.training import TwoTowerConfig, load_window

    root = tmp_path_factory.mktemp("closed-loop")
    settings = Settings(home=root / "home", landing_uri=str(root / "landing"), lake_uri=str(root / "lake"),
                        feast_data_dir=root / "feast", feast_project=f"t{uuid.uuid4().hex[:10]}")
    lake = LocalLake(settings.lake_uri)
    days = simulate_validated(SERVED, lake)
    apply_repo(settings)
    materialize_partition(settings, days[-1])
    config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=3, num_threads=1), max_users_per_fold=300,
                        ranker=RankerConfig(max_rounds=40, num_threads=1), l2_grid=(30.0, 300.0))
    fitted = fit_recommender(History.from_window(load_window(lake, days)), config=config, store=LakeSnapshots(lake))
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=(root / "artifacts").as_uri())
    run_id = registry.log_training_run(experiment="closed-loop-test", params={}, metrics={}, data={},
                                       features=list(RANKING_FEATURES), bundle_dir=save_bundle(root / "bundle", fitted.recommender),
                                       tags={}, example_user_ids=["u0000001"])
    registry.register(run_id)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, "1")
    return {"root": root, "settings": settings, "registry": registry}


def test_closed_loop_against_a_real_service_in_process(world):
    """The champion answers the day after its training data; the watches go back through record_feedback."""
    from recloop.serving import RecommendationService

    svc = RecommendationService(world["settings"], _serving_config(world["root"]), registry=world["registry"])
    try:
        landing = LocalLake(world["settings"].landing_uri)
        config = SimConfig(**{**{k: getattr(SERVED, k) for k in ("seed", "initial_users", "initial_videos",
                                                                   "new_users_per_day", "new_videos_per_day",
                                                                   "n_creators")},
                              "days": SERVED.days + 1, "events_per_day": 600})
        hooked = []
        result = run_closed_loop(config, landing, svc, days=[SERVED.days],
                                 after_day=lambda i, d, stats: hooked.append((i, d, stats.impressions)))
        day = result.days[0]
        assert svc.model is not None and svc.model.version == "1"
        assert hooked == [(SERVED.days, config.date_of(SERVED.days).isoformat(), day.impressions)]
        assert day.impressions > 0 and day.fallback_answers < day.sessions and 0 < day.ctr < 1
        assert 0 < day.coverage <= 1 and 0 <= day.gini <= 1
        # the watches went through record_feedback into the landing zone (flushed at the end of the day)
        prefix = f"events/date={config.date_of(SERVED.days).isoformat()}/"
        files = [k for k in landing.list_keys(prefix) if "feedback-" in k]
        assert sum(pq.read_table(io.BytesIO(landing.read_bytes(k))).num_rows for k in files) == day.watches > 0
    finally:
        svc.close()


def test_without_a_champion_the_loop_says_to_train_first(world, tmp_path):
    from recloop.registry import Registry
    from recloop.serving import RecommendationService

    empty = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "no-model", artifact_location=(tmp_path / "a").as_uri())
    svc = RecommendationService(world["settings"], _serving_config(tmp_path), registry=empty)
    try:
        with pytest.raises(NoChampion, match="train one first"):
            run_closed_loop(SimConfig(**TINY), None, svc)
    finally:
        svc.close()


def test_closed_loop_over_http_with_an_api_key(world, monkeypatch):
    """The same loop through the real FastAPI app: recommendations and feedback over HTTP with the key of
    RECLOOP_API_KEYS; a server refusing old feedback gets a one-sentence reason."""
    from fastapi.testclient import TestClient

    from recloop.data.closed_loop import HttpPlatform
    from recloop.serving import RecommendationService, create_app

    monkeypatch.setenv("RECLOOP_API_KEYS", "closed-loop-test-key-0123456789abcdef")
    config = SimConfig(**{**{k: getattr(SERVED, k) for k in ("seed", "initial_users", "initial_videos",
                                                               "new_users_per_day", "new_videos_per_day", "n_creators")},
                          "days": SERVED.days + 1, "events_per_day": 300})
    for max_age, ok in ((24 * 3650.0, True), (48.0, False)):
        svc = RecommendationService(world["settings"], _serving_config(world["root"], feedback_max_age_hours=max_age),
                                    registry=world["registry"])
        try:
            with TestClient(create_app(service=svc)) as client:
                assert client.post("/v1/feedback", json={"events": [{"user_id": "u1", "video_id": "v1"}]}).status_code == 401
                svc.refresh()  # the app's poller may not have loaded the champion yet
                platform = HttpPlatform("http://testserver", client=client)
                if ok:
                    accepted = svc.metrics.feedback_events.labels("accepted")
                    before = accepted._value.get()  # the metrics are process-wide (multiprocess mode)
                    day = run_closed_loop(config, None, platform, days=[SERVED.days]).days[0]
                    assert day.impressions > 0 and day.watches > 0 and day.fallback_answers < day.sessions
                    assert accepted._value.get() - before == day.watches
                else:
                    with pytest.raises(ValueError, match="RECLOOP_SERVING_FEEDBACK_MAX_AGE_HOURS"):
                        run_closed_loop(config, None, platform, days=[SERVED.days])
        finally:
            svc.close()


def test_cli_closed_loop_errors_are_one_sentence(recloop_env, capsys):
    from recloop.cli import main

    assert main(["simulate", "--run-pipeline", "--days", "1"]) == 2
    assert "--run-pipeline only applies with --closed-loop" in capsys.readouterr().err
    assert main(["simulate", "--closed-loop", "--days", "1", "--initial-users", "50", "--initial-videos", "40",
                 "--events-per-day", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("recloop simulate: there is no champion model to serve yet: train one first")
