"""Online experiments and the served-traffic monitor as Dagster runs them, against the deployment's real
MLflow store (a fake bundle: the model's contents do not matter here), the real lake and a real signed
webhook receiver: the daily look promotes a better challenger (champion moved, alias removed, the
decision in the promotion log and a run in recloop-online-experiments, `model.promoted` delivered), and
a day whose served traffic collapsed onto a few videos fails the WARN check and sends `drift.detected`."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recloop.lake import open_lake

pytestmark = pytest.mark.slow


class FakeRecommender:
    def recommend(self, user_ids, k, *, exclude=None):
        return [[str(i) for i in range(k)] for _ in user_ids]


def fake_load_bundle(bundle_dir: str) -> FakeRecommender:
    return FakeRecommender()


def outcomes(day: str, experiment: str | None, users: int, ctr: dict[str, float], *, videos=None, seed=0, k=5):
    """One request of k impressions per user and arm; a user's click propensity is persistent."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in ("impression_id", "request_id", "user_id", "video_id", "position",
                                               "experiment", "arm", "propensity", "watched_s", "completed", "liked")}
    for arm, rate in ctr.items():
        p_user = rng.beta(rate * 4, (1 - rate) * 4, users)
        for u in range(users):
            request = f"rq-{arm}-{day}-{u}"
            for pos in range(k):
                watched = rng.random() < p_user[u]
                cols["impression_id"].append(f"{request}-{pos}")
                cols["request_id"].append(request)
                cols["user_id"].append(f"u-{arm}-{u}")
                cols["video_id"].append(str(rng.choice(videos) if videos is not None else rng.integers(0, 400)))
                cols["position"].append(pos)
                cols["experiment"].append(experiment)
                cols["arm"].append(arm)
                cols["propensity"].append(1.0)
                cols["watched_s"].append(float(rng.exponential(30.0)) if watched else 0.0)
                cols["completed"].append(bool(watched and rng.random() < 0.3))
                cols["liked"].append(False)
    return pa.table(cols)


@pytest.fixture()
def registry(recloop_env, monkeypatch, tmp_path):
    from recloop.registry import decide, open_registry

    monkeypatch.setenv("RECLOOP_BUNDLE_LOADER", f"{Path(__file__).resolve()}:fake_load_bundle")
    bundle = tmp_path / "bundle"
    for part in ("retrieval", "index", "ranker"):
        (bundle / part).mkdir(parents=True)
        (bundle / part / "w.bin").write_text(part * 50)
    reg = open_registry(recloop_env)
    metrics = {"ndcg_at_10": 0.2, "coverage": 0.4, "diversity": 0.6, "popularity_concentration": 0.3}
    run_id = reg.log_training_run(experiment="recloop-training", params={"x": 1},
                                  metrics={f"eval.full.{k}": v for k, v in metrics.items()},
                                  data={"partition_start": "2026-01-01", "partition_end": "2026-01-02"},
                                  features=["f"], bundle_dir=bundle, example_user_ids=["1"])
    sanity = {"finite_weights": True, "identical_list_share": 0.02, "distinct_items": 340}
    popularity = {"ndcg_at_10": 0.1, "coverage": 0.01, "diversity": 0.2, "popularity_concentration": 1.0}
    v1 = reg.register(run_id)
    reg.promote(v1, decide(challenger=metrics, champion=None, popularity=popularity, sanity=sanity))
    v2 = reg.register(run_id)
    gate = decide(challenger={**metrics, "ndcg_at_10": 0.25}, champion=metrics, popularity=popularity, sanity=sanity,
                  champion_version=v1)
    reg.start_experiment(v2, gate)
    return reg


def test_daily_look_promotes_a_better_challenger_and_alerts(recloop_env, webhook_receiver, registry):
    from pipelines.run import instance, run_job

    info = registry.experiment_info()
    assert info["experiment_id"] == "exp-v1-v2"
    lake = open_lake(recloop_env.lake_uri)
    today = info["started_at"].astimezone(UTC).date().isoformat()
    table = outcomes(today, info["experiment_id"], 800, {"champion": 0.2, "challenger": 0.3}, seed=1)
    lake.write_partition("silver/impression_outcomes", today, table)

    run = run_job("online_experiment_job", inst=instance(recloop_env))
    assert run.success, run.error
    out = run.materialized["online/experiment"]
    assert out["outcome"] == "promote" and out["applied"] is True, out["reasons"]
    assert {r["arm"] for r in out["arms_table"]} == {"champion", "challenger"}
    assert out["p_value"] <= 0.05 and "| arm |" in out["arms"]
    assert str(registry.champion().version) == "2" and registry.experiment() is None
    assert registry.history()[0]["decision"] == "promoted" and registry.lineage() == ["1", "2"]
    mlflow_run = registry.client.get_run(out["mlflow_run_id"])
    assert registry.client.get_experiment(mlflow_run.info.experiment_id).name == "recloop-online-experiments"
    promoted = webhook_receiver.of_type("model.promoted")
    assert len(promoted) == 1 and promoted[0]["data"]["asset"] == "online/experiment"
    assert promoted[0]["data"]["details"]["experiment_id"] == "exp-v1-v2"

    # The next look finds no experiment: nothing changes, nothing is sent.
    again = run_job("online_experiment_job", inst=instance(recloop_env))
    assert again.success and again.materialized["online/experiment"]["outcome"] == "none"
    assert len(webhook_receiver.of_type("model.promoted")) == 1


def test_served_traffic_collapse_warns_and_sends_a_signed_webhook(recloop_env, webhook_receiver, monkeypatch):
    from pipelines.run import instance, run_job

    first = date.today() - timedelta(days=10)
    monkeypatch.setenv("RECLOOP_PARTITION_START", first.isoformat())
    days = [(first + timedelta(days=i)).isoformat() for i in range(9)]
    lake = open_lake(recloop_env.lake_uri)
    lake.write_partition("silver/videos", days[0], pa.table({
        "video_id": [str(i) for i in range(400)], "category": [("music", "news", "sport", "gaming")[i % 4]
                                                                for i in range(400)]}))
    for i, d in enumerate(days[:8]):
        lake.write_partition("silver/impression_outcomes", d, outcomes(d, None, 300, {"champion": 0.2}, seed=i))
    # The last day: the loop served 8 music videos to everyone.
    lake.write_partition("silver/impression_outcomes", days[8],
                         outcomes(days[8], None, 300, {"champion": 0.2}, videos=np.arange(0, 32, 4), seed=9))
    inst = instance(recloop_env)

    quiet = run_job("served_traffic_job", partition=days[7], inst=inst)
    assert quiet.success, quiet.error
    assert quiet.checks["online/served_traffic:served_traffic_within_bounds"] is True
    assert webhook_receiver.of_type("drift.detected") == []

    collapsed = run_job("served_traffic_job", partition=days[8], inst=inst)
    assert collapsed.success, collapsed.error  # WARN: reported, not a failed run
    assert collapsed.checks["online/served_traffic:served_traffic_within_bounds"] is False
    out = collapsed.materialized["online/served_traffic"]
    assert out["breached"] is True and out["gini"] > out["reference_gini"]
    alerts = webhook_receiver.of_type("drift.detected")
    assert len(alerts) == 1 and alerts[0]["data"]["asset"] == "online/served_traffic"
    assert alerts[0]["data"]["partition"] == days[8] and alerts[0]["data"]["details"]["kind"] == "served_traffic"

    # A day without impressions: reported as such, not failed.
    empty = run_job("served_traffic_job", partition=(first + timedelta(days=9)).isoformat(), inst=inst)
    assert empty.success and "no impression outcomes" in empty.materialized["online/served_traffic"]["status"]
