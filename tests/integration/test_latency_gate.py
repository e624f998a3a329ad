"""The latency gate against real parts: a small simulated lake, a real Feast store (SQLite online store),
a bundle trained on it and registered in a real MLflow registry (SQLite) as champion, and two candidates:
the same bundle again (passes) and a deliberately slowed one (refused, the refusal recorded with its
figures, and `promote_candidate` refusing it). The replay runs as production does in the gate: the
`python -m recloop.latency.replay` subprocess, champion and challenger interleaved.

The slow bundle is genuinely slower, not flagged: its ranker is a LambdaRank booster of 5,000 trees of 63
leaves (the normal one has at most 60 trees of 15 leaves), scoring every candidate of every request.

No timed assertion: the gate's own rule decides (p99 ratio to the champion), with a tolerance (2x) below
the slow ranker's cost and above the noise between two replays of one bundle.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recloop import lifecycle
from recloop.config import Settings
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.features import apply_repo, materialize_partition
from recloop.lake import LocalLake
from recloop.latency.gate import LatencyConfig
from recloop.model_plane import fit_config
from recloop.model_plane.bundle import save_bundle
from recloop.model_plane.fit import fit_recommender
from recloop.model_plane.history import History
from recloop.model_plane.ranker import Ranker, RankerConfig
from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
from recloop.registry import CHAMPION, Registry
from recloop.training import TwoTowerConfig, load_window

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(
    seed=13, days=4, initial_users=300, initial_videos=200, new_users_per_day=10, new_videos_per_day=10,
    events_per_day=1_500, n_creators=40,
)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
MODEL = "recloop-latency-test"
GATE = LatencyConfig(budget_ms=60_000.0, max_ratio=2.0, sample=100, warmup=10)


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def slow_ranker(normal: Ranker, *, rounds: int = 200, leaves: int = 63, repeat: int = 25) -> Ranker:
    """A LambdaRank booster over the same features, much bigger: `rounds` trees of up to `leaves` leaves
    fitted on noise (so that every tree grows to its full size; quality does not matter here), each
    repeated `repeat` times in the model (the trees of a booster are added up: the order of the scores is
    unchanged, the work of scoring is `repeat` times larger) -- 5,000 trees, cheap to fit."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    n, group = 6_000, 60
    x = rng.normal(size=(n, len(normal.features))).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    params = {"objective": "lambdarank", "num_leaves": leaves, "min_data_in_leaf": 2, "learning_rate": 0.05,
              "max_bin": 63, "num_threads": 1, "verbosity": -1, "seed": 0, "deterministic": True,
              "force_row_wise": True}
    booster = lgb.train(params, lgb.Dataset(x, label=y, group=[group] * (n // group), feature_name=normal.features),
                        num_boost_round=rounds)
    text = booster.model_to_string()
    head, rest = text.split("\nTree=0\n", 1)
    trees, tail = rest.split("end of trees", 1)
    bodies = re.split(r"Tree=\d+\n", "Tree=0\n" + trees)[1:]
    head = re.sub(r"\ntree_sizes=[^\n]*", "", head)  # per-tree byte sizes: optional, and now wrong
    body = "".join(f"Tree={j}\n{tree}" for j, tree in enumerate(bodies * repeat))
    big = lgb.Booster(model_str=f"{head}\n{body}end of trees{tail}")
    return Ranker(big, list(normal.features), RankerConfig(num_leaves=leaves, max_rounds=rounds * repeat),
                  big.current_iteration())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Settings of the lake/Feast/MLflow; versions 1 (champion), 2 (slowed) and 3 (= 1) registered."""
    root = tmp_path_factory.mktemp("latency")
    settings = Settings(
        home=root / "home", landing_uri=str(root / "landing"), lake_uri=str(root / "lake"),
        feast_data_dir=root / "feast", feast_project=f"t{uuid.uuid4().hex[:10]}",
    )
    lake = LocalLake(settings.lake_uri)
    simulate_validated(SIM, lake)
    apply_repo(settings)
    materialize_partition(settings, DAYS[-1])
    window = load_window(lake, DAYS)
    config = fit_config(folds=2, two_tower=TwoTowerConfig(epochs=2, num_threads=1), max_users_per_fold=200,
                        ranker=RankerConfig(max_rounds=60, num_threads=1), l2_grid=(300.0,))
    rec = fit_recommender(History.from_window(window), config=config, store=LakeSnapshots(lake)).recommender
    normal = save_bundle(root / "bundle-normal", rec)
    slow = save_bundle(root / "bundle-slow", dataclasses.replace(rec, ranker=slow_ranker(rec.ranker)))

    registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=(root / "artifacts").as_uri())
    runs = {name: registry.log_training_run(experiment="latency-test", params={}, metrics={}, data={},
                                            features=list(RANKING_FEATURES), bundle_dir=path, tags={},
                                            example_user_ids=["u0000001"])
            for name, path in (("normal", normal), ("slow", slow))}
    assert registry.register(runs["normal"]) == "1"
    assert registry.register(runs["slow"]) == "2"
    assert registry.register(runs["normal"]) == "3"
    registry.client.set_registered_model_alias(MODEL, CHAMPION, "1")
    return {"root": root, "settings": settings, "registry": registry, "bundles": {"normal": normal, "slow": slow}}


def workdir_of(world, version: str):
    d = world["root"] / f"work-v{version}"
    d.mkdir(exist_ok=True)
    (d / lifecycle.VERSION_FILE).write_text(version)
    return d


def test_latency_gate_refuses_a_slowed_bundle_and_records_why(world):
    registry, work = world["registry"], workdir_of(world, "2")
    outcome = lifecycle.check_latency(registry, work, settings=world["settings"], config=GATE, run_id="test-run")
    assert outcome.status == "refused" and not outcome.passed, outcome.reasons
    figures = outcome.figures
    assert figures["source"] == "silver/events" and figures["requests"] == GATE.sample
    chal, champ = figures["challenger"], figures["champion"]
    assert chal["version"] == "2" and champ["version"] == "1"
    assert chal["requests"] == champ["requests"] == GATE.sample and chal["fallbacks"] == champ["fallbacks"] == 0
    assert chal["p50_ms"] <= chal["p95_ms"] <= chal["p99_ms"] <= chal["max_ms"]
    # the replayed answers were logged as impressions, but never into the deployment's landing zone
    assert not list(Path(world["settings"].landing_uri).rglob("impressions*"))
    assert chal["p99_ms"] > GATE.max_ratio * champ["p99_ms"]
    assert outcome.decision.checks == {"served_by_model": True, "budget": True, "ratio": False}
    assert outcome.decision.compared_to == "champion:1"
    assert "champion's" in outcome.reasons[0] and outcome.alert is not None
    assert outcome.alert.type == "model.refused" and "latency gate" in outcome.alert.text

    # recorded in the registry: the decision log (with the figures) and the version's tags
    last = registry.history()[0]
    assert (last["version"], last["decision"]) == ("2", "refused")
    assert last["why"][0].startswith("latency gate: ")
    assert last["metrics"]["challenger.p99_ms"] == pytest.approx(chal["p99_ms"])
    assert last["metrics"]["champion.p99_ms"] == pytest.approx(champ["p99_ms"])
    tags = registry.client.get_model_version(MODEL, "2").tags
    assert tags["recloop.decision"] == "refused" and float(tags["recloop.gate.challenger.p99_ms"]) > 0

    # the champion step refuses it too, and the champion stays
    assert lifecycle.latency_refusal(work) is not None
    with pytest.raises(lifecycle.GateRefused, match="latency gate"):
        lifecycle.promote_candidate(registry, work, run_id="test-run")
    assert str(registry.champion().version) == "1"


def test_latency_gate_passes_a_normal_bundle(world):
    registry, work = world["registry"], workdir_of(world, "3")
    outcome = lifecycle.check_latency(registry, work, settings=world["settings"], config=GATE, run_id="test-run")
    assert outcome.status == "passed" and outcome.alert is None, outcome.reasons
    assert outcome.figures["champion"]["version"] == "1" and outcome.decision.metrics["ratio_p99"] <= GATE.max_ratio
    assert lifecycle.latency_refusal(work) is None
    assert all(h["version"] != "3" for h in registry.history())  # a pass records nothing yet


def test_replay_without_champion_uses_the_budget_and_takes_bundle_folders(world):
    """The replay entry on bundle folders, no champion: absolute budget only (a tiny budget refuses)."""
    from recloop.latency.gate import decide_latency

    figures = lifecycle.replay_latency(world["settings"], str(world["bundles"]["normal"]), None, sample=20, warmup=2)
    assert figures["champion"] is None and figures["challenger"]["requests"] == 20
    tiny = decide_latency(figures["challenger"], None, LatencyConfig(budget_ms=0.001))
    assert not tiny.passed and tiny.compared_to == "budget" and "no champion" in tiny.reasons[0]
    with pytest.raises(RuntimeError, match="latency replay of version /nowhere failed: .*neither a bundle folder"):
        lifecycle.replay_latency(world["settings"], "/nowhere", None, sample=5, warmup=0)


def test_metrics_show_process_cpu_and_memory(world):
    from recloop.serving import RecommendationService, ServingConfig, create_app

    root = world["root"]
    config = ServingConfig(feedback_spool_dir=root / "spool-metrics", poll_seconds=3600.0)
    service = RecommendationService(world["settings"], config, registry=world["registry"])
    with TestClient(create_app(service=service)) as client:
        text = client.get("/metrics").text
    names = {line.split(" ")[0].split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
