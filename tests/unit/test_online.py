"""recloop.online: per-arm metrics with clustered intervals, interleaving credit, the sequential decision
rule and its error rate, IPS, the served-traffic monitor, and the registry/lifecycle side of experiments
(a real MLflow store with a fake bundle, as tests/unit/test_registry.py)."""

from __future__ import annotations

import json
import math
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recloop.lake import open_lake
from recloop.online import decision as rule
from recloop.online import ips as ips_mod
from recloop.online import metrics as m
from recloop.online import traffic

START = date(2026, 3, 1)
EXP = "exp-v1-v2"


def day(i: int) -> str:
    return (START + timedelta(days=i)).isoformat()


def ab_frame(days: int, users: int, *, ctr: tuple[float, float], watch: tuple[float, float] = (30.0, 30.0),
             k: int = 5, seed: int = 0, spread: float = 4.0) -> pd.DataFrame:
    """A/B impressions: `users` per arm, one request of k impressions per user and day; each user has a
    persistent click propensity (Beta around the arm's CTR: outcomes cluster by user)."""
    rng = np.random.default_rng(seed)
    frames = []
    for a, arm in enumerate(m.ARMS):
        p_user = rng.beta(ctr[a] * spread, (1 - ctr[a]) * spread, size=users)
        for d in range(days):
            uid = np.repeat(np.arange(users), k)
            watched = rng.random(users * k) < p_user[uid]
            seconds = np.where(watched, rng.exponential(watch[a], users * k), 0.0)
            req = np.array([f"rq-{arm}-{d}-{u}" for u in uid])
            frames.append(pd.DataFrame({
                "impression_id": [f"{r}-{i % k}" for i, r in enumerate(req)], "request_id": req,
                "user_id": [f"u-{arm}-{u}" for u in uid], "video_id": rng.integers(0, 300, users * k).astype(str),
                "position": np.tile(np.arange(k), users), "experiment": EXP, "arm": arm, "propensity": 1.0,
                "explored": False, "watched_s": seconds, "completed": watched & (rng.random(users * k) < 0.3),
                "liked": False, "day": day(d)}))
    return m.normalise(pd.concat(frames, ignore_index=True))


# --- metrics ---------------------------------------------------------------------------------------


def test_ratio_estimate_is_the_pooled_ratio_with_a_cluster_robust_error():
    # Two users: one saw 10 impressions and watched all, one saw 10 and watched none.
    e = m.ratio_estimate([10, 0], [10, 10])
    assert e.value == 0.5
    # Residuals 5 and -5 -> Var = 2/1 * 50 / 400 = 0.25: the two users are the sample, not 20 impressions.
    assert e.se == pytest.approx(0.5)
    naive = math.sqrt(0.25 / 20)
    assert e.se > 4 * naive
    assert math.isnan(m.ratio_estimate([], []).value)


def test_per_arm_metrics_and_intervals_cover_the_truth():
    frame = ab_frame(3, 400, ctr=(0.2, 0.3), watch=(30.0, 30.0), seed=1)
    arms = m.ab_metrics(frame, catalog_size=600)
    champion, challenger = arms["champion"], arms["challenger"]
    assert champion.impressions == challenger.impressions == 3 * 400 * 5
    assert champion.users == 400 and champion.requests == 1200
    assert champion.ctr.low < 0.2 < champion.ctr.high
    assert challenger.ctr.low < 0.3 < challenger.ctr.high
    # watch time per impression = CTR x mean watched seconds
    assert challenger.watch_time.value == pytest.approx(0.3 * 30, rel=0.1)
    assert 0 < champion.coverage <= 300 / 600
    diff = m.ab_difference(arms, "ctr")
    assert diff.low > 0  # a 10-point lift on 400 users per arm is visible
    row = champion.row()
    assert {"ctr", "ctr_low", "ctr_high", "watch_time", "completion_rate", "coverage"} <= set(row)


def test_interleaving_credits_the_right_arm_on_a_hand_made_example():
    rows = [
        # r1: the challenger's two items watched, the champion's one: challenger
        ("r1", "u1", "champion", 10.0), ("r1", "u1", "challenger", 5.0), ("r1", "u1", "challenger", 3.0),
        ("r1", "u1", "champion", 0.0),
        # r2: champion's item watched, challenger's not: champion
        ("r2", "u1", "champion", 40.0), ("r2", "u1", "challenger", 0.0),
        # r3: nothing watched: tie
        ("r3", "u2", "champion", 0.0), ("r3", "u2", "challenger", 0.0),
        # r4: one watch each (long vs short): tie (watches are counted, not seconds)
        ("r4", "u2", "champion", 100.0), ("r4", "u2", "challenger", 1.0),
        # r5: only the challenger's item watched: challenger
        ("r5", "u3", "challenger", 7.0), ("r5", "u3", "champion", 0.0),
    ]
    frame = pd.DataFrame(rows, columns=["request_id", "user_id", "arm", "watched_s"]).assign(
        video_id="v", completed=False, liked=False)
    credit = m.interleaving_credit(frame).set_index("request_id")["credit"].to_dict()
    assert credit == {"r1": "challenger", "r2": "champion", "r3": "tie", "r4": "tie", "r5": "challenger"}
    result = m.interleaving_result(frame)
    assert (result.challenger_wins, result.champion_wins, result.ties) == (2, 1, 2)
    # u1: 1 of 2 decided, u3: 1 of 1 -> 2 / 3
    assert result.share.value == pytest.approx(2 / 3)
    assert m.detect_mode(frame) == "interleave"
    # An explored slot (a random video in the champion's slot) is no team's placement: its watch does not
    # turn r3 into a champion win.
    explored = pd.concat([frame.assign(explored=False), pd.DataFrame(
        [{"request_id": "r3", "user_id": "u2", "arm": "champion", "watched_s": 9.0, "video_id": "x",
          "completed": False, "liked": False, "explored": True}])], ignore_index=True)
    assert m.interleaving_credit(explored).set_index("request_id")["credit"]["r3"] == "tie"
    # Credit by watch time (what the decision uses with the watch-time goal): r1 (10 s vs 5 + 3 s) and r4
    # (100 s vs 1 s) go to the champion.
    by_time = m.interleaving_credit(frame, "watch_time").set_index("request_id")["credit"].to_dict()
    assert by_time == {"r1": "champion", "r2": "champion", "r3": "tie", "r4": "champion", "r5": "challenger"}
    with pytest.raises(ValueError, match="watch_time"):
        m.interleaving_credit(frame, "clicks")


# --- the decision rule -----------------------------------------------------------------------------


def test_msprt_with_daily_looks_keeps_its_error_rate_under_no_difference():
    """Monte Carlo of the mixture SPRT under H0 with 30 daily looks: the share of experiments that ever
    reject stays under alpha (a fixed-horizon z-test looked at daily would reject ~25 % of the time)."""
    rng = np.random.default_rng(7)
    alpha, n_exp, looks, per_day = 0.05, 2000, 30, 50
    increments = rng.normal(0.0, 1.0, size=(n_exp, looks, per_day)).sum(axis=2)
    cum = np.cumsum(increments, axis=1)
    n = per_day * np.arange(1, looks + 1)
    rejected = naive = 0
    for e in range(n_exp):
        p = 1.0
        ever_naive = False
        for j in range(looks):
            estimate, variance = cum[e, j] / n[j], 1.0 / n[j]
            p = min(p, 1.0 / rule.mixture_likelihood_ratio(estimate, variance, tau=0.1))
            ever_naive |= abs(estimate) / math.sqrt(variance) > 1.96
        rejected += p <= alpha
        naive += ever_naive
    assert rejected / n_exp <= alpha
    assert naive / n_exp > 2 * alpha  # the peeking problem the rule avoids, shown on the same draws


def test_a_better_challenger_is_promoted_and_a_worse_one_stopped():
    better = ab_frame(4, 400, ctr=(0.2, 0.3), seed=2)
    d = rule.decide_online(better, started=day(0), as_of=day(3), config=rule.DecisionConfig(primary_metric="ctr"))
    assert d.outcome == rule.PROMOTE, d.reasons
    assert d.p_value <= 0.05 and d.effect.value > 0 and d.mode == "ab"
    assert d.reasons[0].startswith("PROMOTE") and "guardrail" in d.reasons[1]
    # the last look (aggregated per user and day) is the full-data estimate
    assert d.looks[-1].effect == pytest.approx(d.effect.value) and d.looks[-1].se == pytest.approx(d.effect.se)
    assert [x.day for x in d.looks] == [day(i) for i in range(4)]
    assert all(a.p_value >= b.p_value for a, b in zip(d.looks, d.looks[1:]))  # running minimum
    worse = ab_frame(4, 400, ctr=(0.3, 0.2), seed=3)
    d = rule.decide_online(worse, started=day(0), as_of=day(3))
    assert d.outcome == rule.STOP_WORSE, d.reasons


def test_no_difference_continues_then_stops_at_the_horizon_and_little_traffic_waits():
    same = ab_frame(3, 300, ctr=(0.25, 0.25), seed=4)
    config = rule.DecisionConfig(max_days=5)
    d = rule.decide_online(same, started=day(0), as_of=day(2), config=config)
    assert d.outcome == rule.CONTINUE, d.reasons
    d = rule.decide_online(same, started=day(0), as_of=day(4), config=config)
    assert d.outcome == rule.STOP_NO_DIFFERENCE and d.days_elapsed == 5, d.reasons
    tiny = ab_frame(1, 20, ctr=(0.1, 0.9), seed=5)
    d = rule.decide_online(tiny, started=day(0), as_of=day(0), config=config)
    assert d.outcome == rule.CONTINUE and "too little traffic" in d.reasons[0]


def test_guardrail_blocks_a_promotion_when_ctr_is_significantly_worse():
    # More seconds per impression (long watches) but fewer watches: better on watch time, worse on CTR.
    frame = ab_frame(4, 500, ctr=(0.3, 0.2), watch=(20.0, 60.0), seed=6)
    d = rule.decide_online(frame, started=day(0), as_of=day(3))
    assert d.effect.value > 0
    assert d.outcome == rule.STOP_WORSE and "guardrail" in d.reasons[0], d.reasons


def test_interleaving_decides_on_the_win_share():
    rng = np.random.default_rng(8)
    rows = []
    for r in range(1500):
        u = f"u{r % 300}"
        for arm, p in (("champion", 0.2), ("challenger", 0.35)):
            for pos in range(3):
                rows.append((f"rq{r}", u, arm, 10.0 if rng.random() < p else 0.0, day(r // 500)))
    frame = pd.DataFrame(rows, columns=["request_id", "user_id", "arm", "watched_s", "day"]).assign(
        video_id="v", completed=False, liked=False)
    d = rule.decide_online(frame, started=day(0), as_of=day(2))
    assert d.mode == "interleave" and d.metric == "win_share"
    assert d.outcome == rule.PROMOTE and d.interleaving.share.value > 0.5, d.reasons
    assert d.looks[-1].effect == pytest.approx(d.interleaving.share.value - 0.5)


def test_decision_config_from_the_environment(monkeypatch):
    monkeypatch.setenv("RECLOOP_ONLINE_MAX_DAYS", "21")
    monkeypatch.setenv("RECLOOP_ONLINE_PRIMARY_METRIC", "ctr")
    c = rule.DecisionConfig.from_env()
    assert (c.max_days, c.primary_metric, c.guardrail) == (21, "ctr", "watch_time")
    monkeypatch.setenv("RECLOOP_ONLINE_ALPHA", "lots")
    with pytest.raises(ValueError, match="RECLOOP_ONLINE_ALPHA"):
        rule.DecisionConfig.from_env()


# --- IPS -------------------------------------------------------------------------------------------


def test_ips_recovers_a_target_policys_ctr_from_epsilon_greedy_logs():
    """One slot, a pool of 10 alternatives besides the greedy item; epsilon = 0.2. Logged propensities
    follow the contract: 1 - eps for the greedy item, eps / |pool| for an explored one. The target
    policy always shows item 3: its CTR (0.5) is recovered, while the log's own CTR is ~0.12."""
    rng = np.random.default_rng(11)
    n, eps, pool = 200_000, 0.2, 10
    ctr = np.linspace(0.05, 0.5, pool + 1)[::-1].copy()  # item 0 is the greedy one
    ctr[0], ctr[3] = 0.1, 0.5
    explored = rng.random(n) < eps
    item = np.where(explored, rng.integers(1, pool + 1, n), 0)
    propensity = np.where(explored, eps / pool, 1 - eps)
    watched = rng.random(n) < ctr[item]
    logged = pd.DataFrame({"request_id": [f"rq{i}" for i in range(n)], "video_id": item.astype(str),
                           "propensity": propensity, "watched_s": np.where(watched, 10.0, 0.0)})
    target = (item == 3).astype(float)
    plain = ips_mod.ips(logged, target)
    self_norm = ips_mod.snips(logged, target)
    assert abs(plain.value - 0.5) < 3 * plain.estimate.se and plain.estimate.low < 0.5 < plain.estimate.high
    assert self_norm.value == pytest.approx(0.5, abs=0.02)
    assert ips_mod.logged_ctr(logged) < 0.2
    clipped = ips_mod.ips(logged, target, clip=10.0)
    assert clipped.value < plain.value  # clipping trades bias for variance
    # The logging policy itself: weights 1, IPS = the logged CTR exactly.
    same = ips_mod.ips(logged, propensity)
    assert same.value == pytest.approx(ips_mod.logged_ctr(logged))
    with pytest.raises(ValueError, match="propensity"):
        ips_mod.ips(logged.assign(propensity=0.0), target)


# --- the served-traffic monitor ---------------------------------------------------------------------


def test_gini_and_top_share():
    assert traffic.gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert traffic.gini([0, 0, 0, 100]) == pytest.approx(0.75)
    assert traffic.top_share([50, 30, 20] + [0] * 97, 100) == pytest.approx(0.5)


def write_outcomes(lake, d: str, videos: np.ndarray) -> None:
    n = len(videos)
    lake.write_partition("silver/impression_outcomes", d, pa.table({
        "impression_id": [f"i{d}{i}" for i in range(n)], "request_id": [f"rq{i // 10}" for i in range(n)],
        "user_id": [f"u{i % 97}" for i in range(n)], "video_id": videos.astype(str),
        "watched_s": np.zeros(n), "completed": np.zeros(n, bool), "liked": np.zeros(n, bool)}))


def test_served_traffic_breach_on_a_collapsing_day_and_quiet_on_a_normal_one(tmp_path, monkeypatch):
    lake = open_lake(str(tmp_path / "lake"))
    rng = np.random.default_rng(3)
    catalog = pa.table({"video_id": [str(i) for i in range(500)],
                        "category": [("music", "news", "sport", "gaming")[i % 4] for i in range(500)]})
    lake.write_partition("silver/videos", day(0), catalog)
    for i in range(7):
        write_outcomes(lake, day(i), rng.integers(0, 500, 5000))
    report = traffic.monitor(lake, day(6))
    assert report.judged and not report.breached, report.reasons
    assert report.reference_days == [day(i) for i in range(6)]
    # Day 7: the loop collapsed onto a few music videos.
    write_outcomes(lake, day(7), rng.choice(np.arange(0, 40, 4), 5000))
    report = traffic.monitor(lake, day(7))
    assert report.breached and {"gini", "top1_share", "coverage", "category_shift"} == {
        n for n, ok in report.checks.items() if not ok}
    assert report.stats.category_share["music"] == 1.0
    assert json.loads(lake.read_bytes(f"monitoring/served_traffic/date={day(7)}/served_traffic.json"))["breached"]
    # Thresholds from the environment: a lenient deployment tolerates it.
    for var in ("RECLOOP_TRAFFIC_MAX_GINI_INCREASE", "RECLOOP_TRAFFIC_MAX_TOP1_INCREASE",
                "RECLOOP_TRAFFIC_MAX_CATEGORY_SHIFT"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("RECLOOP_TRAFFIC_MIN_COVERAGE_RATIO", "0")
    assert not traffic.monitor(lake, day(7)).breached
    monkeypatch.setenv("RECLOOP_TRAFFIC_REFERENCE_DAYS", "zero")
    with pytest.raises(ValueError, match="RECLOOP_TRAFFIC_REFERENCE_DAYS"):
        traffic.TrafficThresholds.from_env()


# --- registry and lifecycle: start, conclude -------------------------------------------------------

MODEL = "recloop-online-test"
POPULARITY = {"ndcg_at_10": 0.10, "coverage": 0.01, "diversity": 0.2, "popularity_concentration": 1.0}
SANE = {"finite_weights": True, "identical_list_share": 0.02, "distinct_items": 340}
METRICS = {"ndcg_at_10": 0.2, "coverage": 0.4, "diversity": 0.6, "popularity_concentration": 0.3}


class FakeRecommender:
    def recommend(self, user_ids, k, *, exclude=None):
        return [[str(i) for i in range(k)] for _ in user_ids]


def fake_load_bundle(bundle_dir: str) -> FakeRecommender:
    return FakeRecommender()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from recloop.registry import Registry

    root = tmp_path_factory.mktemp("mlflow-online")
    bundle = root / "bundle"
    for part in ("retrieval", "index", "ranker"):
        (bundle / part).mkdir(parents=True)
        (bundle / part / "w.bin").write_text(part * 50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_BUNDLE_LOADER", f"{Path(__file__).resolve()}:fake_load_bundle")
        registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=(root / "a").as_uri())
        run_id = registry.log_training_run(experiment="recloop-training", params={"x": 1},
                                           metrics={f"eval.full.{k}": v for k, v in METRICS.items()},
                                           data={"partition_start": day(0), "partition_end": day(1)},
                                           features=["f"], bundle_dir=bundle, example_user_ids=["1"])
    return root / "mlflow.db", run_id


@pytest.fixture()
def registry(template, tmp_path, monkeypatch):
    from recloop.registry import Registry

    monkeypatch.setenv("RECLOOP_BUNDLE_LOADER", f"{Path(__file__).resolve()}:fake_load_bundle")
    shutil.copy(template[0], tmp_path / "mlflow.db")
    reg = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", MODEL, artifact_location=(tmp_path / "a").as_uri())
    reg.run_id = template[1]
    return reg


def gate(registry, ndcg: float = 0.25):
    from recloop.registry import decide

    champion = registry.champion()
    return decide(challenger={**METRICS, "ndcg_at_10": ndcg}, champion=METRICS if champion else None,
                  popularity=POPULARITY, sanity=SANE, champion_version=champion.version if champion else None)


@pytest.fixture()
def candidate(registry, tmp_path, monkeypatch):
    """`promote_candidate`'s inputs: a workdir naming a freshly registered version, the gate's decision
    computed from fixed metrics (the evaluation itself is the model plane's, tested there)."""
    from recloop import lifecycle, model_plane

    workdir = tmp_path / "work"
    workdir.mkdir()

    def register() -> str:
        version = registry.register(registry.run_id)
        (workdir / lifecycle.VERSION_FILE).write_text(version)
        return version

    monkeypatch.setattr(model_plane, "gate_decision", lambda wd, config=None: gate(registry))
    monkeypatch.setattr(model_plane, "load_evaluation",
                        lambda wd: type("E", (), {"extras": {}})())
    return workdir, register


def test_promote_candidate_starts_an_experiment_when_online_experiments_are_on(registry, candidate, monkeypatch):
    from recloop import lifecycle

    workdir, register = candidate
    v1 = register()
    monkeypatch.setenv(lifecycle.ONLINE_EXPERIMENTS_ENV, "on")
    first = lifecycle.promote_candidate(registry, workdir, run_id="r1")
    assert first.experiment is None and str(registry.champion().version) == v1  # the first model: promoted
    v2 = register()
    started = lifecycle.promote_candidate(registry, workdir, run_id="r2")
    assert started.experiment == f"exp-v{v1}-v{v2}" and started.alert is None
    assert str(registry.champion().version) == v1 and str(registry.experiment().version) == v2
    assert started.summary()["champion"] == v1 and started.summary()["candidate"] == v2
    again = lifecycle.promote_candidate(registry, workdir, run_id="r2")  # a retried step: the same experiment
    assert again.experiment == started.experiment
    v3 = register()
    waiting = lifecycle.promote_candidate(registry, workdir, run_id="r3")
    assert waiting.experiment is None and "still running" in waiting.note
    assert str(registry.experiment().version) == v2
    history = registry.history()
    assert history[0]["decision"] == "experiment_started" and history[0]["version"] == v2
    monkeypatch.setenv(lifecycle.ONLINE_EXPERIMENTS_ENV, "off")
    assert not lifecycle.online_experiments_enabled()
    monkeypatch.setenv(lifecycle.ONLINE_EXPERIMENTS_ENV, "maybe")
    with pytest.raises(ValueError, match="RECLOOP_ONLINE_EXPERIMENTS"):
        lifecycle.online_experiments_enabled()
    assert v3 == str(int(v2) + 1)


def write_experiment(lake, frame: pd.DataFrame, experiment: str) -> None:
    for d, part in frame.groupby("day"):
        out = part.drop(columns=["day", "watched"]).assign(experiment=experiment)
        lake.write_partition("silver/impression_outcomes", d, pa.Table.from_pandas(out, preserve_index=False))


def started_experiment(registry) -> tuple[str, str, str]:
    from recloop.registry import decide

    v1 = registry.register(registry.run_id)
    registry.promote(v1, decide(challenger=METRICS, champion=None, popularity=POPULARITY, sanity=SANE))
    v2 = registry.register(registry.run_id)
    return v1, v2, registry.start_experiment(v2, gate(registry))


def test_conclude_promotes_a_better_challenger_like_a_gate_promotion(registry, tmp_path):
    from recloop import lifecycle

    lake = open_lake(str(tmp_path / "lake"))
    v1, v2, exp = started_experiment(registry)
    today = registry.experiment_info()["started_at"].date()
    frame = ab_frame(3, 1000, ctr=(0.2, 0.3), seed=9)
    frame["day"] = frame["day"].map(lambda d: (today + (date.fromisoformat(d) - START)).isoformat())
    write_experiment(lake, frame, exp)
    # another experiment's rows on the same days are not counted
    write_outcomes(lake, (today + timedelta(days=5)).isoformat(), np.arange(50))

    outcome = lifecycle.online_experiment_step(lake, registry, as_of=(today + timedelta(days=2)).isoformat(), run_id="x")
    assert outcome.outcome == "promote", outcome.result.status
    assert str(registry.champion().version) == v2 and registry.experiment() is None
    assert registry.lineage() == [v1, v2]
    latest = registry.history()[0]
    assert latest["decision"] == "promoted" and latest["version"] == v2 and latest["compared_to"] == f"champion:{v1}"
    assert latest["metrics"]["challenger.watch_time"] > latest["metrics"]["champion.watch_time"]
    assert outcome.alert.type == "model.promoted" and exp in outcome.alert.key
    run = registry.client.get_run(outcome.result.mlflow_run_id)
    assert run.data.params["outcome"] == "promote" and run.data.tags["recloop.experiment_id"] == exp
    assert registry.client.get_experiment(run.info.experiment_id).name == "recloop-online-experiments"
    tags = registry.client.get_model_version(MODEL, v2).tags
    assert tags["recloop.online.last_run"] == run.info.run_id and tags["recloop.experiment_outcome"] == "promote"
    # rollback still works on the lineage the promotion extended
    assert registry.rollback(check=lambda v: None) == (v2, v1)
    # nothing running now: a look does nothing
    assert lifecycle.online_experiment_step(lake, registry, run_id="y").outcome == "none"


def test_conclude_stops_a_worse_challenger_and_the_champion_stays(registry, tmp_path):
    from recloop import lifecycle

    lake = open_lake(str(tmp_path / "lake"))
    v1, v2, exp = started_experiment(registry)
    today = registry.experiment_info()["started_at"].date()
    frame = ab_frame(2, 400, ctr=(0.3, 0.15), seed=10)
    frame["day"] = frame["day"].map(lambda d: (today + (date.fromisoformat(d) - START)).isoformat())
    write_experiment(lake, frame, exp)
    outcome = lifecycle.online_experiment_step(lake, registry, run_id="z")
    assert outcome.outcome == "stop_worse", outcome.result.status
    assert str(registry.champion().version) == v1 and registry.experiment() is None
    assert registry.history()[0]["decision"] == "experiment_stopped"
    assert registry.lineage() == [v1]
    assert outcome.alert.type == "model.refused"


def test_an_experiment_on_days_behind_the_wall_clock_starts_on_its_first_logged_day(registry, tmp_path):
    """A simulation or a replay logs days long before the day the registry stamped: the experiment's own
    impressions say when it started (an older run of another experiment is not counted)."""
    from recloop.online.experiment import conclude

    lake = open_lake(str(tmp_path / "lake"))
    v1, v2, exp = started_experiment(registry)
    frame = ab_frame(2, 400, ctr=(0.3, 0.15), seed=10)  # days START, START + 1: years before today
    write_experiment(lake, frame, exp)
    write_outcomes(lake, (START - timedelta(days=3)).isoformat(), np.arange(50))
    result = conclude(lake, registry, apply=False)
    assert result.started == START.isoformat(), result.status
    assert result.decision is not None and result.decision.outcome == "stop_worse", result.status


def test_conclude_stops_an_experiment_whose_champion_moved(registry, tmp_path):
    from recloop.registry import CHAMPION
    from recloop.online.experiment import conclude

    lake = open_lake(str(tmp_path / "lake"))
    v1, v2, exp = started_experiment(registry)
    v3 = registry.register(registry.run_id)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, v3)
    result = conclude(lake, registry)
    assert result.outcome == "stop_no_difference" and "moved" in result.status
    assert registry.experiment() is None and str(registry.champion().version) == v3
