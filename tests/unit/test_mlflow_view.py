"""What a practitioner sees in MLflow after a training cycle (issue 15), against real parts: a small simulated
lake, a real training cycle (two-tower, FAISS index, LambdaRank ranker on time folds, evaluation beside the
baselines) registered in a real MLflow store (SQLite in tmp) by `lifecycle.register_candidate`, as a Dagster
run would (the registry opened with the run's tags).

What must hold: experiments open in MLflow's classic ML view (`mlflow.experimentKind`), the run's name says
what and when, its hyper-parameters are params, its training curves metric steps, its training window a
dataset input; it links back to the Dagster run; the version carries a handful of tags, not every metric;
`challenger` is visible until the decision, `champion` after it; every run recloop creates (decisions,
drift) has a readable name and the Dagster link; the summary links to the MLflow UI.
"""

from __future__ import annotations

import uuid

import pytest

from recloop import lifecycle
from recloop.config import Settings
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.lake import LocalLake
from recloop.links import dagster_run_tags, mlflow_run_url
from recloop.model_plane import steps
from recloop.model_plane.ranker import RankerConfig
from recloop.model_plane.store import LakeSnapshots
from recloop.registry import (
    CHALLENGER,
    CHAMPION,
    EXPERIMENT_KIND_TAG,
    ML_EXPERIMENT_KIND,
    GateDecision,
    Registry,
    open_registry,
)
from recloop.training import TwoTowerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(seed=4, days=4, initial_users=250, initial_videos=150, new_users_per_day=5, new_videos_per_day=5,
                events_per_day=1_500, n_creators=30)
DAGSTER_RUN = "5e0c1a7d-4bde-4a1c-9d0e-000000000001"
ENV = ("RECLOOP_MLFLOW_TRACKING_URI", "RECLOOP_MLFLOW_ARTIFACT_URI", "RECLOOP_LAKE_URI", "RECLOOP_LANDING_URI",
       "RECLOOP_FEAST_DATA_DIR", "RECLOOP_ENV", "RECLOOP_BUNDLE_LOADER", "RECLOOP_MODEL_NAME",
       "RECLOOP_MLFLOW_UI_URL", "RECLOOP_DAGSTER_URL")


def _decision(compared_to: str, ndcg: float = 0.3, bar: float = 0.2) -> GateDecision:
    role = "champion" if compared_to.startswith("champion") else "popularity"
    return GateDecision(promote=True, reasons=[f"PROMOTE: passed all 1 checks against {compared_to}",
                                               "PASS primary_metric: better"],
                        checks={"primary_metric": True}, compared_to=compared_to, primary_metric="ndcg_at_10",
                        metrics={"popularity.ndcg_at_10": 0.1, "challenger.ndcg_at_10": ndcg, f"{role}.ndcg_at_10": bar,
                                 "challenger.coverage": 0.5, "champion.coverage": 0.5})


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    """One real training cycle in a working folder, registered as version 1 by a 'Dagster run'."""
    root = tmp_path_factory.mktemp("mlflow-view")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_HOME", str(root / "home"))
        for var in ENV:
            mp.delenv(var, raising=False)
        mp.setenv("RECLOOP_FEAST_PROJECT", f"t{uuid.uuid4().hex[:10]}")
        mp.setenv("RECLOOP_DAGSTER_URL", "http://dagster.example:3000/")
        settings = Settings.from_env()
        lake = LocalLake(settings.lake_uri)
        simulate_validated(SIM, lake)
        plan = steps.plan_window(lake, train_days=3, test_days=1)
        wd = root / "candidate"
        steps.build_training_set(settings, lake, plan, wd)
        steps.train_retrieval(lake, wd, TwoTowerConfig(epochs=3, num_threads=1))
        steps.build_ann_index(wd, recall_queries=100)
        store = LakeSnapshots(lake)
        steps.train_ranking(wd, store=store, config=steps.fit_config(
            folds=2, two_tower=TwoTowerConfig(epochs=2, num_threads=1), max_users_per_fold=200,
            ranker=RankerConfig(max_rounds=30, num_threads=1), l2_grid=(100.0,)))
        steps.evaluate_candidate(lake, wd, store=store, ks=(10,),
                                 als_grid={"factors": [16], "regularization": [1.0], "alpha": [10.0], "iterations": [5]})
        registry = open_registry(settings, run_tags=dagster_run_tags(DAGSTER_RUN))
        summary = lifecycle.register_candidate(registry, wd)
        yield {"registry": registry, "summary": summary, "plan": plan, "settings": settings, "workdir": wd,
               "env": {"RECLOOP_HOME": str(root / "home"), "RECLOOP_DAGSTER_URL": "http://dagster.example:3000/"}}


@pytest.fixture()
def world(cycle, monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    for name, value in cycle["env"].items():
        monkeypatch.setenv(name, value)
    return cycle


def _version(registry: Registry, version: str):
    return registry.client.get_model_version(registry.model_name, version)


def test_the_training_run_says_what_and_when_with_params_curves_datasets_and_the_dagster_run(world):
    registry, plan = world["registry"], world["plan"]
    version = world["summary"]["version"]
    run = registry.client.get_run(_version(registry, version).run_id)
    first, last = plan.train_partitions[0], plan.train_partitions[-1]
    assert run.info.run_name == f"train {first}..{last} v{version}"
    assert run.info.status == "FINISHED"

    # The experiment opens as an ML experiment (runs, models), not MLflow 3's GenAI overview.
    experiment = registry.client.get_experiment(run.info.experiment_id)
    assert experiment.name == "recloop-training"
    assert experiment.tags[EXPERIMENT_KIND_TAG] == ML_EXPERIMENT_KIND == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]

    # Hyper-parameters of each part as params.
    params = run.data.params
    for name in ("ranker.learning_rate", "ranker.num_leaves", "two_tower.out_dim", "two_tower.epochs", "fit.folds",
                 "data.partition_start", "data.test_start"):
        assert name in params, name
    assert params["data.partition_start"] == first and params["data.test_start"] == plan.test_partitions[0]

    # Training curves as metric steps: the two-tower's loss per epoch, the ranker's validation NDCG per round.
    loss = registry.client.get_metric_history(run.info.run_id, "train.two_tower.loss")
    assert [p.step for p in loss] == [0, 1, 2] and all(p.value > 0 for p in loss)
    ndcg = registry.client.get_metric_history(run.info.run_id, "train.ranker.valid_ndcg_at_10")
    assert len(ndcg) >= 2 and [p.step for p in ndcg] == list(range(len(ndcg)))
    assert "eval.full.ndcg_at_10" in run.data.metrics

    # The training window as a dataset input (name, source = the lake, digest, row count), the held-out days too.
    inputs = {d.tags[0].value if d.tags else "": d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "evaluation"}
    training = inputs["training"]
    assert training.name == f"silver/events {first}..{last}" and training.source_type == "local"
    assert "silver/events" in training.source and training.digest
    import json

    assert json.loads(training.profile)["num_rows"] > 1000
    # Its schema (inferred by MLflow from a sample of the rows; `required` from every row): each column typed.
    schema = {c["name"]: c for c in json.loads(training.schema)["mlflow_colspec"]}
    assert schema["user_id"]["type"] == "string" and schema["event_time"]["type"] == "datetime"
    assert schema["watched_s"]["type"] == "double" and schema["liked"]["type"] == "boolean"
    assert inputs["evaluation"].name == f"silver/events {plan.test_partitions[0]}"

    # Back to the Dagster run that trained it; a description of what was trained.
    assert run.data.tags["dagster.run_id"] == DAGSTER_RUN
    assert run.data.tags["dagster.run_url"] == f"http://dagster.example:3000/runs/{DAGSTER_RUN}"
    note = run.data.tags["mlflow.note.content"]
    assert f"{first}..{last}" in note and "NDCG@10" in note


def test_the_version_has_a_few_tags_and_challenger_until_the_decision(world):
    registry = world["registry"]
    version = world["summary"]["version"]
    mv = _version(registry, version)
    # Registered: its source run, its window, the Dagster run; every metric stays on the run.
    assert set(mv.tags) == {"recloop.run_id", "recloop.data_range", "dagster.run_url"}
    assert mv.tags["dagster.run_url"].endswith(f"/runs/{DAGSTER_RUN}")
    assert "trained on" in mv.description
    assert registry.version_metrics(version)["ndcg_at_10"] == pytest.approx(
        registry.client.get_run(mv.run_id).data.metrics["eval.full.ndcg_at_10"])
    # The candidate is the challenger until the decision...
    assert str(registry.challenger().version) == version and CHALLENGER in mv.aliases


def test_the_summary_links_the_run_and_the_version_in_the_mlflow_ui(world, monkeypatch):
    registry, summary = world["registry"], world["summary"]
    run = registry.client.get_run(summary["mlflow_run_id"])
    assert summary["mlflow_run_url"] == (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
                                         f"{run.info.run_id}?workflowType=machine_learning")
    assert summary["mlflow_version_url"] == (f"http://127.0.0.1:5000/#/models/{registry.model_name}/versions/"
                                             f"{summary['version']}?workflowType=machine_learning")
    monkeypatch.setenv("RECLOOP_MLFLOW_UI_URL", "https://mlflow.example.com/")
    assert mlflow_run_url("7", "abc") == "https://mlflow.example.com/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_decisions_and_drift_runs_are_named_tagged_and_the_aliases_follow_the_decision(world, tmp_path):
    """On a copy of the store: promote v1, register v2 (challenger), promote it, roll back; drift."""
    import shutil

    home = world["settings"].home
    copy = tmp_path / "mlflow.db"
    shutil.copy(home / "mlflow" / "mlflow.db", copy)
    other_run = "5e0c1a7d-4bde-4a1c-9d0e-000000000002"
    registry = Registry(f"sqlite:///{copy}", world["registry"].model_name,
                        artifact_location=world["registry"].artifact_location, run_tags=dagster_run_tags(other_run))
    v1 = world["summary"]["version"]
    registry.promote(v1, _decision("popularity"))
    assert str(registry.champion().version) == v1 and registry.challenger() is None
    mv1 = _version(registry, v1)
    assert mv1.aliases == [CHAMPION]
    assert mv1.tags["recloop.decision"] == "promoted"
    assert mv1.tags["recloop.summary"] == "PROMOTE: passed all 1 checks against popularity"
    assert mv1.tags["recloop.gate.challenger.ndcg_at_10"] == "0.3"
    assert mv1.tags["recloop.gate.popularity.ndcg_at_10"] == "0.2"
    assert len(mv1.tags) <= 15, sorted(mv1.tags)

    # A second candidate: `challenger` while the gates decide, `champion` once promoted.
    v2 = registry.register(mv1.run_id)
    registry.set_challenger(v2)
    assert _version(registry, v2).aliases == [CHALLENGER]
    registry.promote(v2, _decision(f"champion:{v1}"))
    mv2 = _version(registry, v2)
    assert mv2.aliases == [CHAMPION] and registry.challenger() is None
    assert "recloop.gate.popularity.ndcg_at_10" not in mv2.tags  # only the bar it was compared with
    assert mv2.tags["recloop.gate.champion.ndcg_at_10"] == "0.2"
    assert registry.rollback(check=lambda version: None) == (v2, v1)

    drift = registry.log_drift_report(partition="2025-01-09", model_version=v1, drifted=True,
                                      summary={"drift_share": 0.4}, report_uri="/lake/reports/drift/2025-01-09.html",
                                      reasons=["feature drift: 4 of 10 columns"])
    mv1 = _version(registry, v1)
    assert mv1.tags["recloop.last_drift_run"] == drift and len(mv1.tags) <= 15, sorted(mv1.tags)

    promotions = registry.client.get_experiment_by_name("recloop-promotions")
    monitoring = registry.client.get_experiment_by_name("recloop-monitoring")
    for experiment in (promotions, monitoring):
        assert experiment.tags[EXPERIMENT_KIND_TAG] == ML_EXPERIMENT_KIND
    names = {r.info.run_name: r for r in registry.client.search_runs([promotions.experiment_id])}
    assert set(names) == {f"promoted v{v1}", f"promoted v{v2}", f"rolled back v{v2} -> v{v1}"}
    for run in [*names.values(), registry.client.get_run(drift)]:
        assert run.data.tags["dagster.run_id"] == other_run
        assert run.data.tags["dagster.run_url"] == f"http://dagster.example:3000/runs/{other_run}"
    assert registry.client.get_run(drift).info.run_name == f"drift 2025-01-09 v{v1}"
    assert "PROMOTE" in names[f"promoted v{v2}"].data.tags["mlflow.note.content"]
    assert [h["decision"] for h in registry.history()] == ["rolled_back", "promoted", "promoted"]

    # A candidate under an online experiment shows `experiment` (the champion keeps `champion`) until it ends.
    v3 = registry.register(mv1.run_id)
    registry.set_challenger(v3)
    experiment = registry.start_experiment(v3, _decision(f"champion:{v1}"))
    assert _version(registry, v3).aliases == ["experiment"] and registry.challenger() is None
    assert _version(registry, v1).aliases == [CHAMPION]
    registry.log_online_experiment(experiment_id=experiment, version=v3, champion_version=v1, outcome="stop_worse",
                                   params={"as_of": "2025-01-12"}, metrics={"p_value": 0.01}, reasons=["worse"])
    registry.end_experiment(promote=False, outcome="stop_worse", reasons=["worse"], metrics={"p_value": 0.01})
    mv3 = _version(registry, v3)
    assert mv3.aliases == [] and mv3.tags["recloop.decision"] == "experiment_stopped"
    assert mv3.tags["recloop.experiment_outcome"] == "stop_worse" and len(mv3.tags) <= 15, sorted(mv3.tags)
    names = {r.info.run_name for r in registry.client.search_runs([promotions.experiment_id])}
    assert {f"experiment started v{v3} vs v{v1}", f"experiment stopped v{v3}"} <= names
    online = registry.client.get_experiment_by_name("recloop-online-experiments")
    assert online.tags[EXPERIMENT_KIND_TAG] == ML_EXPERIMENT_KIND
    (look,) = registry.client.search_runs([online.experiment_id])
    assert look.info.run_name == f"{experiment} 2025-01-12 stop_worse"


def test_an_experiment_created_before_the_kind_tag_is_tagged_when_used(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    old = client.create_experiment("recloop-monitoring", artifact_location=(tmp_path / "a").as_uri())
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    registry = Registry(uri, "m", artifact_location=(tmp_path / "a").as_uri())
    assert registry._experiment_id("recloop-monitoring") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == ML_EXPERIMENT_KIND
    # without a Dagster run, no Dagster tags
    assert registry.run_tags == {} and dagster_run_tags(None) == {}


def test_the_window_schema_is_mlflows_inference_on_a_sample_with_required_read_from_every_row():
    import numpy as np
    import pandas as pd
    from mlflow.types.utils import _infer_schema

    n = 30_000
    events = pd.DataFrame({"user_id": [f"u{i}" for i in range(n)], "watched_s": np.arange(n, dtype=float),
                           "liked": np.arange(n) % 2 == 0, "event_time": pd.Timestamp("2025-01-01", tz="UTC")})
    assert steps._events_schema(events, sample=1000) == _infer_schema(events)
    events.loc[n - 7, "user_id"] = None  # a missing value the sample does not see: the column is optional
    schema = steps._events_schema(events, sample=1000)
    assert schema == _infer_schema(events) and not schema.inputs[0].required and schema.inputs[1].required
