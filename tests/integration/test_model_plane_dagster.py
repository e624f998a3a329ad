"""The model plane as Dagster runs it, on simulated data through the real data plane: training window →
two-tower → FAISS → ranker (candidate sources on time folds, LambdaRank with Feast point-in-time features)
→ evaluation → MLflow (real sqlite store) → promotion gate → champion; then a second cycle that must beat
the champion on the same split, and the refusal recorded."""

from __future__ import annotations

import pytest

from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = pytest.mark.slow


def test_training_cycle_promotes_then_gate_refuses_an_equal_challenger(recloop_env, monkeypatch):
    from pipelines.run import instance, run_data_plane, run_job
    from recloop.registry import open_registry

    settings = recloop_env
    # The latency gate runs (a replay in a subprocess); its 25 ms budget is for a serving machine, not for a
    # test machine shared by other processes: the budget is lifted here, the ratio rule has no champion yet.
    monkeypatch.setenv("RECLOOP_LATENCY_BUDGET_MS", "60000")
    monkeypatch.setenv("RECLOOP_LATENCY_SAMPLE", "60")
    config = SimConfig(seed=5, days=4, initial_users=1_200, initial_videos=400, events_per_day=6_000,
                       new_users_per_day=30, new_videos_per_day=15)
    simulate(config, open_lake(settings.landing_uri))
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    assert all(r.success for r in run_data_plane(days, settings=settings))

    ops = {"model__training_set": {"config": {"TrainDays": 3, "TestDays": 1}}}
    first = run_job("training_job", inst=instance(settings), run_config_ops=ops)
    assert first.success, first.error
    m = first.materialized
    assert m["model/training_set"]["dagster/row_count"] > 10_000
    assert m["model/ann_index"]["recall_at_100_vs_exact"] >= 0.95
    ranker = m["model/ranker"]
    assert ranker["best_iteration"] >= 1 and 0 < ranker["valid_ndcg_at_10"] <= 1
    assert ranker["source_recall/all_candidates"] >= ranker["source_recall/item_to_item"] > 0
    by = m["model/evaluation"]["by_recommender"]
    assert set(by) == {"recloop", "recloop/item_to_item", "recloop/two_tower", "recloop/popular", "recloop/fresh",
                       "popularity", "als", "ease"}
    # the first model is compared with popularity, and must beat it clearly; the ranker improves on its
    # best source alone
    assert by["recloop"]["recall_at_10"] > 2 * by["popularity"]["recall_at_10"]
    assert by["recloop"]["ndcg_at_10"] > max(by["recloop/item_to_item"]["ndcg_at_10"], by["recloop/two_tower"]["ndcg_at_10"])
    assert first.checks["model/registered_version:promotion_gate"] is True
    assert first.checks["model/registered_version:latency_gate"] is True
    assert m["model/champion"]["champion"] == m["model/registered_version"]["version"] == "1"

    registry = open_registry(settings)
    assert str(registry.champion().version) == "1"
    run = registry.client.get_run(registry.client.get_model_version(registry.model_name, "1").run_id)
    assert run.data.params and "eval.full.ndcg_at_10" in run.data.metrics
    assert "eval.source.item_to_item.ndcg_at_10" in run.data.metrics and "train.source_recall.two_tower" in run.data.metrics
    assert run.info.run_name.startswith("multi-stage ") and "ranker.learning_rate" in run.data.params
    curve = registry.client.get_metric_history(run.info.run_id, "train.ranker.valid_ndcg_at_10")
    assert len(curve) >= 2 and [p.step for p in curve] == sorted(p.step for p in curve)
    assert len(registry.client.get_metric_history(run.info.run_id, "train.two_tower.loss")) >= 2
    assert run.data.tags.get("recloop.data_range") or any(k.startswith("data.") for k in run.data.params)

    # Same data, same seeds: the challenger cannot beat the champion by the 2 % margin on the same split.
    second = run_job("training_job", inst=instance(settings), run_config_ops=ops)
    assert second.success, second.error  # a refusal is a normal outcome, not a failed run
    assert second.checks["model/registered_version:promotion_gate"] is False
    assert second.checks["model/registered_version:latency_gate"] is True  # not measured: refused offline
    assert "champion" in second.materialized["model/evaluation"]["by_recommender"]
    assert "model/champion" not in second.materialized
    assert str(registry.champion().version) == "1"
    decisions = [(h["version"], h["decision"]) for h in registry.history()]
    assert decisions[0] == ("2", "refused") and ("1", "promoted") in decisions
