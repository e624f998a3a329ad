"""The registry against a real MLflow store (SQLite backend + local artifacts in tmp), with a fake bundle.

Logging a bundle model costs ~1.5 s, so one training run is logged once per module into a template
database; each test gets its own copy of that database (fresh registered models, aliases and promotion
log) and its own artifact root for anything it writes.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402

from recloop.registry import (  # noqa: E402
    CHAMPION,
    GateConfig,
    GateDecision,
    Registry,
    RegistryError,
    decide,
    open_registry,
    registry_settings,
)

MODEL = "recloop-test"
ITEMS = [f"v{i}" for i in range(30)]
METRICS = {
    "train.loss": 0.5,
    "eval.full.ndcg_at_10": 0.21,
    "eval.full.recall_at_10": 0.3,
    "eval.full.coverage": 0.4,
    "eval.full.diversity": 0.6,
    "eval.full.popularity_concentration": 0.3,
}
DATA = {
    "partition_start": "2025-01-01",
    "partition_end": "2025-01-28",
    "rows": {"events": 12345, "users": 200},
    "validation": {"passed": True, "quarantined": 3},
}
FEATURES = ["user_watch_count_7d", "video_popularity_7d", "video_category"]
POPULARITY = {"ndcg_at_10": 0.10, "coverage": 0.01, "diversity": 0.2, "popularity_concentration": 1.0}
SANE = {"finite_weights": True, "identical_list_share": 0.02, "distinct_items": 340}


# --- the fake bundle: a directory shaped like recloop.pipeline.save_bundle's, and its loader --------


class FakeRecommender:
    name = "fake-bundle"

    def __init__(self, items: list[str], tag: str) -> None:
        self.items, self.tag = items, tag

    def recommend(self, user_ids, k, *, exclude=None):
        # Deterministic per user, so different users get different lists.
        n = len(self.items)
        return [[self.items[(int(u.lstrip("u") or 0) + i) % n] for i in range(k)] for u in user_ids]


def fake_load_bundle(bundle_dir: str) -> FakeRecommender:
    root = Path(bundle_dir)
    for part in ("retrieval", "index", "ranker"):
        assert (root / part).is_dir(), f"bundle part {part}/ missing from {root}"
    meta = json.loads((root / "bundle.json").read_text())
    return FakeRecommender(meta["items"], meta["tag"])


def make_bundle(root: Path, tag: str = "a") -> Path:
    bundle = root / f"bundle-{tag}"
    for part, files in {
        "retrieval": {"two_tower.pt": "w" * 200, "args.json": "{}", "vocab.json": json.dumps(ITEMS)},
        "index": {"faiss.index": "i" * 200, "ids.json": json.dumps(ITEMS)},
        "ranker": {"ranker.pt": "r" * 200, "args.json": "{}"},
    }.items():
        (bundle / part).mkdir(parents=True)
        for name, text in files.items():
            (bundle / part / name).write_text(text)
    (bundle / "bundle.json").write_text(json.dumps({"items": ITEMS, "tag": tag}))
    return bundle


LOADER = f"{Path(__file__).resolve()}:fake_load_bundle"


def log_run(registry: Registry, bundle: Path, **overrides) -> str:
    return registry.log_training_run(
        experiment="recloop-training",
        params=overrides.get("params", {"retrieval": {"dim": 32, "epochs": 2}, "ranker": {"lr": 0.01}}),
        metrics=overrides.get("metrics", METRICS),
        data=overrides.get("data", DATA),
        features=FEATURES,
        bundle_dir=bundle,
        tags={"trigger": "test"},
        example_user_ids=["u1", "u2"],
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A migrated MLflow database holding one logged training run (artifacts in a module tmp dir)."""
    root = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLOOP_BUNDLE_LOADER", LOADER)
        artifacts = (root / "artifacts").as_uri()
        registry = Registry(f"sqlite:///{root / 'mlflow.db'}", MODEL, artifact_location=artifacts)
        run_id = log_run(registry, make_bundle(root))
    return root / "mlflow.db", run_id


@pytest.fixture()
def registry(template: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("RECLOOP_BUNDLE_LOADER", LOADER)
    db = tmp_path / "mlflow.db"
    shutil.copy(template[0], db)
    return Registry(f"sqlite:///{db}", MODEL, artifact_location=(tmp_path / "artifacts").as_uri())


@pytest.fixture()
def run_id(template: tuple[Path, str]) -> str:
    return template[1]


def first_decision(ndcg: float = 0.21) -> GateDecision:
    return decide(
        challenger={"ndcg_at_10": ndcg, "coverage": 0.4, "diversity": 0.6, "popularity_concentration": 0.3},
        champion=None,
        popularity=POPULARITY,
        sanity=SANE,
        config=GateConfig(),
    )


def decision_against(registry: Registry, version: str, ndcg: float) -> GateDecision:
    champion = registry.champion()
    assert champion is not None
    champ = {**registry.version_metrics(champion.version), "ndcg_at_10": 0.20}
    return decide(
        challenger={**champ, "ndcg_at_10": ndcg},
        champion=champ,
        popularity=POPULARITY,
        sanity=SANE,
        champion_version=champion.version,
    )


def promote_chain(registry: Registry, run_id: str, n: int) -> list[str]:
    """Register n versions and promote each in turn."""
    versions = []
    for i in range(n):
        version = registry.register(run_id)
        decision = first_decision() if i == 0 else decision_against(registry, version, 0.25)
        registry.promote(version, decision)
        versions.append(version)
    return versions


# --- logging and registering ---------------------------------------------------------------------


def test_training_run_records_params_metrics_data_features_and_one_bundle_model(registry, run_id) -> None:
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["retrieval.dim"] == "32" and params["ranker.lr"] == "0.01"
    assert params["data.partition_start"] == "2025-01-01" and params["data.rows.events"] == "12345"
    assert params["data.validation.passed"] == "true"
    assert metrics["eval.full.ndcg_at_10"] == pytest.approx(0.21)
    assert metrics["train.loss"] == pytest.approx(0.5)
    assert tags["recloop.data_range"] == "2025-01-01..2025-01-28"
    assert tags["recloop.features.count"] == "3" and tags["trigger"] == "test"

    run_files = {a.path for a in registry.client.list_artifacts(run_id)}
    assert {"data.json", "features.json"} <= run_files
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/features.json") == FEATURES
    data = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/data.json")
    assert data["rows"] == {"events": 12345, "users": 200}

    # The bundle is ONE logged model from code: the code file, the three parts, explicit requirements.
    (output,) = run.outputs.model_outputs
    model = registry.client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == run_id
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location))
    assert (local / "bundle_model.py").is_file()
    assert not list(local.rglob("*.pkl")), "nothing may be pickled"
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    bundle = local / flavor["artifacts"]["bundle"]["path"]
    for part in ("retrieval/two_tower.pt", "index/faiss.index", "ranker/ranker.pt", "bundle.json"):
        assert (bundle / part).is_file(), part
    requirements = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and not any("+" in r for r in requirements)
    assert sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) < 50_000


def test_missing_bundle_dir_is_refused(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        log_run(registry, tmp_path / "nope")


def test_register_twice_gives_versions_1_and_2_with_few_tags_and_metrics_on_the_run(registry, run_id, tmp_path) -> None:
    second = log_run(
        registry,
        make_bundle(tmp_path, "b"),
        metrics={**METRICS, "eval.full.ndcg_at_10": 0.25},
        data={**DATA, "partition_end": "2025-02-04"},
    )
    assert registry.register(run_id) == "1"
    assert registry.register(second) == "2"
    v1 = registry.client.get_model_version(MODEL, "1")
    v2 = registry.client.get_model_version(MODEL, "2")
    assert v1.run_id == run_id and v2.run_id == second
    # The version carries its source run and window, not a copy of every metric: those stay on the run.
    assert v2.tags == {"recloop.run_id": second, "recloop.data_range": "2025-01-01..2025-02-04"}
    assert registry.version_metrics("1")["ndcg_at_10"] == pytest.approx(0.21)
    assert registry.version_metrics("2")["ndcg_at_10"] == pytest.approx(0.25)
    assert registry.champion() is None


def test_register_a_run_without_a_model_fails_clearly(registry: Registry) -> None:
    run = registry.client.create_run(registry.client.get_experiment_by_name("recloop-training").experiment_id)
    with pytest.raises(RegistryError, match="no logged model"):
        registry.register(run.info.run_id)


# --- promotion, refusal, history ------------------------------------------------------------------


def test_promote_moves_the_alias_and_history_shows_when_why_and_metrics(registry, run_id) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    v1 = registry.register(run_id)
    registry.promote(v1, first_decision())
    assert str(registry.champion().version) == "1"

    v2 = registry.register(run_id)
    registry.set_challenger(v2)
    assert str(registry.challenger().version) == "2"
    decision = decision_against(registry, v2, 0.25)
    assert decision.promote and decision.compared_to == "champion:1"
    registry.promote(v2, decision)

    assert str(registry.champion().version) == "2"
    assert registry.challenger() is None  # it pointed at the promoted version
    tags = registry.client.get_model_version(MODEL, "2").tags
    assert tags["recloop.decision"] == "promoted"
    assert datetime.fromisoformat(tags["recloop.decided_at"]) >= before
    assert json.loads(tags["recloop.reasons"])[0].startswith("PROMOTE")
    assert tags["recloop.gate.challenger.ndcg_at_10"] == "0.25"
    assert tags["recloop.gate.champion.ndcg_at_10"] == "0.2"

    history = registry.history()
    assert [(h["version"], h["decision"]) for h in history] == [("2", "promoted"), ("1", "promoted")]
    newest, oldest = history
    assert newest["when"] >= oldest["when"] >= before
    assert newest["compared_to"] == "champion:1" and oldest["compared_to"] == "popularity"
    assert newest["from_version"] == "1" and oldest["from_version"] == "none"
    assert newest["why"] == decision.reasons
    assert newest["metrics"]["challenger.ndcg_at_10"] == pytest.approx(0.25)
    assert newest["metrics"]["champion.ndcg_at_10"] == pytest.approx(0.20)
    assert oldest["metrics"]["popularity.ndcg_at_10"] == pytest.approx(0.10)

    # Read back from MLflow alone: a fresh client over the same store sees the same log.
    again = Registry(registry.tracking_uri, MODEL)
    assert [h["run_id"] for h in again.history()] == [h["run_id"] for h in history]
    runs = again.client.search_runs(
        [again.client.get_experiment_by_name("recloop-promotions").experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    assert runs[0].data.params["decision"] == "promoted" and runs[0].data.params["version"] == "2"


def test_refuse_keeps_the_champion_and_tags_the_version(registry: Registry, run_id: str) -> None:
    v1 = registry.register(run_id)
    registry.promote(v1, first_decision())
    v2 = registry.register(run_id)
    registry.set_challenger(v2)
    decision = decision_against(registry, v2, 0.203)  # +1.5%: below the 2% margin
    assert not decision.promote

    with pytest.raises(RegistryError, match="refused"):
        registry.promote(v2, decision)
    registry.refuse(v2, decision)

    assert str(registry.champion().version) == "1"
    assert registry.challenger() is None
    tags = registry.client.get_model_version(MODEL, v2).tags
    assert tags["recloop.decision"] == "refused"
    assert any("FAIL primary_metric" in r and "0.2030" in r for r in json.loads(tags["recloop.reasons"]))
    latest = registry.history()[0]
    assert (latest["version"], latest["decision"]) == ("2", "refused")
    assert latest["metrics"]["challenger.ndcg_at_10"] == pytest.approx(0.203)


def test_first_model_worse_than_popularity_is_refused_and_nothing_is_champion(registry, run_id) -> None:
    v1 = registry.register(run_id)
    assert registry.apply(v1, first_decision(ndcg=0.09)) is False
    assert registry.champion() is None
    assert registry.history()[0]["decision"] == "refused"


def test_a_stale_decision_cannot_promote(registry: Registry, run_id: str) -> None:
    v1, v2 = promote_chain(registry, run_id, 2)
    v3 = registry.register(run_id)
    with pytest.raises(RegistryError, match="stale decision"):
        registry.promote(v3, first_decision())  # decided against popularity, but v2 is champion
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote(v2, decision_against(registry, v2, 0.25))
    assert str(registry.champion().version) == v2


# --- rollback -------------------------------------------------------------------------------------


def test_rollback_restores_the_previous_champion_and_twice_goes_back_two(registry, run_id) -> None:
    assert promote_chain(registry, run_id, 3) == ["1", "2", "3"]
    assert registry.lineage() == ["1", "2", "3"]

    assert registry.rollback(reason="p95 latency regression") == ("3", "2")
    assert str(registry.champion().version) == "2"
    assert registry.rollback() == ("2", "1")
    assert str(registry.champion().version) == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    assert str(registry.champion().version) == "1"

    history = registry.history()
    latest = [(h["decision"], h["version"]) for h in history[:2]]
    assert latest == [("rolled_back", "2"), ("rolled_back", "3")]
    assert history[1]["to_version"] == "2" and "p95 latency regression" in history[1]["why"]
    assert registry.client.get_model_version(MODEL, "3").tags["recloop.decision"] == "rolled_back"

    # A promotion after a rollback continues the lineage from the restored champion.
    v4 = registry.register(run_id)
    registry.promote(v4, decision_against(registry, v4, 0.25))
    assert registry.lineage() == ["1", "4"]
    assert registry.rollback() == ("4", "1")


def test_rollback_without_a_previous_champion_raises(registry: Registry, run_id: str) -> None:
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    promote_chain(registry, run_id, 1)
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()


def test_rollback_refuses_when_the_alias_was_moved_by_hand(registry: Registry, run_id: str) -> None:
    promote_chain(registry, run_id, 2)
    registry.client.set_registered_model_alias(MODEL, CHAMPION, "1")
    with pytest.raises(RegistryError, match="outside recloop"):
        registry.rollback()


# --- loading --------------------------------------------------------------------------------------


def test_pyfunc_load_by_champion_alias_recommends(registry, run_id, tmp_path, monkeypatch) -> None:
    promote_chain(registry, run_id, 1)
    import pandas as pd

    # Plain MLflow, as a serving process would do it: only the store's URI and the model URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = model.predict(pd.DataFrame({"user_id": ["u1", "u2"], "k": [3, 2]}))
    assert list(out.columns) == ["user_id", "rank", "video_id"]
    assert out.to_dict("records") == [
        {"user_id": "u1", "rank": 1, "video_id": "v1"},
        {"user_id": "u1", "rank": 2, "video_id": "v2"},
        {"user_id": "u1", "rank": 3, "video_id": "v3"},
        {"user_id": "u2", "rank": 1, "video_id": "v2"},
        {"user_id": "u2", "rank": 2, "video_id": "v3"},
    ]
    # k is optional (default 10); Registry.load gives the same model.
    assert len(registry.load(CHAMPION).predict(pd.DataFrame({"user_id": ["u5"]}))) == 10

    bundle = registry.bundle_path(CHAMPION, dst_dir=tmp_path / "dl")
    assert (bundle / "bundle.json").is_file() and (bundle / "index" / "faiss.index").is_file()
    assert fake_load_bundle(str(bundle)).recommend(["u1"], 2) == [["v1", "v2"]]


def test_unknown_alias_or_version_fails_clearly(registry: Registry, run_id: str) -> None:
    registry.register(run_id)
    with pytest.raises(RegistryError, match="no version or alias 'champion'"):
        registry.load(CHAMPION)
    with pytest.raises(RegistryError, match="'7'"):
        registry.bundle_path("7")


# --- settings -------------------------------------------------------------------------------------


def test_registry_settings_defaults_under_recloop_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    monkeypatch.delenv("RECLOOP_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RECLOOP_MODEL_NAME", raising=False)
    rs = registry_settings()
    assert rs.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert rs.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    assert rs.model_name == "recloop-recommender"
    monkeypatch.setenv("RECLOOP_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("RECLOOP_MODEL_NAME", "other")
    rs = registry_settings()
    assert (rs.tracking_uri, rs.model_name, rs.artifact_location) == ("http://mlflow:5000", "other", None)
    registry = open_registry()  # no connection is made until the first call
    assert (registry.tracking_uri, registry.model_name) == ("http://mlflow:5000", "other")
