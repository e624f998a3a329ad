"""The model plane: training set → two-tower → ANN index → ranker → evaluation → registered version →
champion, with the promotion gate as a blocking check in front of promotion. Thin adapters over
`recloop.model_plane`; every number worth plotting is asset metadata."""

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.features import FEAST_REGISTRY, FEATURE_KEYS
from pipelines.defs.resources import AlertsResource, FeastResource, LakeResource
from pipelines.defs.validation import silver_key
from recloop import model_plane
from recloop.registry import GateConfig, Registry

TRAINING_SET = dg.AssetKey(["model", "training_set"])
TWO_TOWER = dg.AssetKey(["model", "two_tower"])
ANN_INDEX = dg.AssetKey(["model", "ann_index"])
RANKER = dg.AssetKey(["model", "ranker"])
EVALUATION = dg.AssetKey(["model", "evaluation"])
REGISTERED = dg.AssetKey(["model", "registered_version"])
CHAMPION = dg.AssetKey(["model", "champion"])
GATE_CHECK = "promotion_gate"


class MlflowRegistryResource(dg.ConfigurableResource):
    """The MLflow tracking store and model registry (aliases `champion` / `challenger`)."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///… embedded, http://… server).")
    model_name: str = Field(default="recloop-recommender", description="Registered model name.")
    artifact_location: str | None = Field(default=None, description="Artifact root for new experiments.")

    def open(self) -> Registry:
        return Registry(self.tracking_uri, self.model_name, artifact_location=self.artifact_location)


class ModelWorkspaceResource(dg.ConfigurableResource):
    """The folder where one training cycle's artifacts are assembled before they go to the registry."""

    path: str = Field(description="Working folder of the candidate in progress.")

    def dir(self) -> Path:
        p = Path(self.path)
        p.mkdir(parents=True, exist_ok=True)
        return p


class TrainingWindowConfig(dg.Config):
    TrainDays: int = Field(default=7, description="Validated days of events the candidate trains on.")
    TestDays: int = Field(default=1, description="Newest validated days held out for offline evaluation.")
    RankerDays: int = Field(default=3, description=(
        "Newest training days the ranker trains on (the last one validates); a two-tower trained on the "
        "days before them scores their rows, so the ranker sees out-of-sample retrieval scores."))


class GateRunConfig(dg.Config):
    MinImprovement: float = Field(default=0.02, description="Relative NDCG@10 margin over the champion (or popularity).")
    MaxIdenticalListShare: float = Field(default=0.5, description="Largest share of users given the same list.")


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


@dg.asset(
    key=TRAINING_SET,
    group_name="models",
    deps=[silver_key("events"), FEAST_REGISTRY, *FEATURE_KEYS.values()],
    kinds={"feast", "parquet"},
    description="Impressions of the training window with labels and point-in-time features (Feast historical retrieval).",
)
def training_set(config: TrainingWindowConfig, lake: LakeResource, feast: FeastResource,
                 workspace: ModelWorkspaceResource) -> dg.MaterializeResult:
    plan = model_plane.plan_window(lake.open(), train_days=config.TrainDays, test_days=config.TestDays,
                                   ranker_days=config.RankerDays)
    out = model_plane.build_training_set(feast.settings(), lake.open(), plan, workspace.dir())
    return dg.MaterializeResult(metadata={
        "dagster/row_count": out["rows"],
        **_numbers({k: v for k, v in out.items() if k not in ("rows", "partitions")}),
        "features": dg.MetadataValue.json(out["features"]),
        "train_partitions": dg.MetadataValue.json(plan.train_partitions),
        "test_partitions": dg.MetadataValue.json(plan.test_partitions),
    })


@dg.asset(key=TWO_TOWER, group_name="models", deps=[TRAINING_SET], kinds={"pytorch"},
          description="Two-tower retrieval model (in-batch negatives, log-Q correction) on the training window's positives.")
def two_tower(lake: LakeResource, workspace: ModelWorkspaceResource) -> dg.MaterializeResult:
    out = model_plane.train_retrieval(lake.open(), workspace.dir())
    return dg.MaterializeResult(metadata={
        "final_loss": out["loss"][-1] if out["loss"] else float("nan"),
        "loss_by_epoch": dg.MetadataValue.json(out["loss"]),
        "samples_per_s": out["samples_per_s"],
        "config": dg.MetadataValue.json(out["config"]),
    })


@dg.asset(key=ANN_INDEX, group_name="models", deps=[TWO_TOWER], kinds={"faiss"},
          description="FAISS index over the video tower's embeddings; recall@100 against exact search measured.")
def ann_index(workspace: ModelWorkspaceResource) -> dg.MaterializeResult:
    out = model_plane.build_ann_index(workspace.dir())
    return dg.MaterializeResult(metadata={**_numbers(out), "params": dg.MetadataValue.json(out["params"])})


@dg.asset(key=RANKER, group_name="models", deps=[TRAINING_SET, TWO_TOWER], kinds={"pytorch"},
          description=("Multi-task ranker (P(completed), expected watch time) on Feast features + an out-of-sample "
                       "retrieval score (from a two-tower trained on earlier days); time split."))
def ranker(lake: LakeResource, workspace: ModelWorkspaceResource) -> dg.MaterializeResult:
    out = model_plane.train_ranking(lake.open(), workspace.dir())
    return dg.MaterializeResult(metadata={
        **_numbers(out),
        "features": dg.MetadataValue.json(out["features"]),
        "ranker_partitions": dg.MetadataValue.json(out["ranker_partitions"]),
        "retrieval_score_partitions": dg.MetadataValue.json(out["retrieval_score_partitions"]),
    })


@dg.asset(key=EVALUATION, group_name="models", deps=[ANN_INDEX, RANKER], kinds={"python"},
          description=("Offline evaluation on the held-out days, full ranking, seen items excluded: full pipeline, "
                       "retrieval alone, popularity, tuned ALS and the current champion on the same split."))
def evaluation(lake: LakeResource, workspace: ModelWorkspaceResource, registry: MlflowRegistryResource) -> dg.MaterializeResult:
    reg = registry.open()
    champion = reg.champion()
    bundle = reg.bundle_path(champion.version) if champion is not None else None
    ev = model_plane.evaluate_candidate(lake.open(), workspace.dir(), champion_bundle=bundle,
                                        champion_version=str(champion.version) if champion else None)
    table = {name: {m: round(v, 4) for m, v in values.items() if m in (
        "recall_at_10", "ndcg_at_10", "map_at_10", "hit_rate_at_10", "coverage", "diversity", "novelty_at_10",
        "popularity_concentration")} for name, values in ev.metrics.items()}
    full, pop = ev.metrics[model_plane.PRIMARY], ev.metrics["popularity"]
    return dg.MaterializeResult(metadata={
        "ndcg_at_10": full["ndcg_at_10"],
        "recall_at_10": full["recall_at_10"],
        "recall_at_10_vs_popularity": round(full["recall_at_10"] / pop["recall_at_10"], 3) if pop["recall_at_10"] else float("inf"),
        "users_evaluated": ev.result["recommenders"][model_plane.PRIMARY]["users_evaluated"],
        "by_recommender": dg.MetadataValue.json(table),
        "sanity": dg.MetadataValue.json(ev.sanity),
        "champion_compared": ev.champion_version or "none (first model: compared with popularity)",
    })


def _gate_config(config: GateRunConfig | None = None) -> GateConfig:
    c = config or GateRunConfig()
    return GateConfig(min_improvement=c.MinImprovement, max_identical_list_share=c.MaxIdenticalListShare)


@dg.asset(
    key=REGISTERED,
    group_name="models",
    deps=[EVALUATION],
    kinds={"mlflow"},
    description="The candidate logged to MLflow (params, metrics, data, features, bundle) and registered as one version; alias `challenger`.",
)
def registered_version(context: dg.AssetExecutionContext, workspace: ModelWorkspaceResource,
                       registry: MlflowRegistryResource) -> dg.MaterializeResult:
    version = model_plane.register_candidate(registry.open(), workspace.dir())
    context.log.info(f"registered version {version} as challenger")
    (workspace.dir() / "version.txt").write_text(version)
    return dg.MaterializeResult(metadata={"version": version, "model_name": registry.model_name,
                                          "model_uri": f"models:/{registry.model_name}/{version}"})


@dg.asset_check(
    asset=REGISTERED,
    name=GATE_CHECK,
    blocking=True,
    description=("Beat popularity (first model) or the champion on NDCG@10 by the margin, without breaking the "
                 "coverage/diversity/concentration guardrails, with finite weights and non-identical lists. "
                 "A refusal is recorded in the registry; promotion does not run."),
)
def promotion_gate(context: dg.AssetCheckExecutionContext, config: GateRunConfig, workspace: ModelWorkspaceResource,
                   registry: MlflowRegistryResource, alerts: AlertsResource) -> dg.AssetCheckResult:
    version = (workspace.dir() / "version.txt").read_text().strip()
    decision = model_plane.gate_decision(workspace.dir(), config=_gate_config(config))
    if not decision.promote:
        registry.open().refuse(version, decision)
        _alert_decision(context, alerts, "model.refused", version, decision,
                        f":no_entry: recloop: version {version} refused by the promotion gate: {decision.reasons[0]}")
    return dg.AssetCheckResult(
        passed=decision.promote,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.reasons[0],
        metadata={"version": version, "compared_to": decision.compared_to,
                  "reasons": dg.MetadataValue.json(decision.reasons),
                  "checks": dg.MetadataValue.json(decision.checks),
                  "metrics": dg.MetadataValue.json(decision.metrics)},
    )


def _alert_decision(context: Any, alerts: AlertsResource, type: str, version: str, decision: Any, text: str) -> None:
    alerts.send(context.log, type, key=f"version-{version}", text=text, asset=REGISTERED.to_user_string(),
                model_version=version,
                numbers={k: v for k, v in decision.metrics.items() if isinstance(v, (int, float))},
                details={"compared_to": decision.compared_to, "reasons": decision.reasons, "run_id": context.run.run_id})


@dg.asset(key=CHAMPION, group_name="models", deps=[REGISTERED], kinds={"mlflow"},
          description="Alias `champion` moved to the version that passed the gate; the decision recorded with when, why and the metrics.")
def champion(context: dg.AssetExecutionContext, config: GateRunConfig, workspace: ModelWorkspaceResource,
             registry: MlflowRegistryResource, alerts: AlertsResource) -> dg.MaterializeResult:
    version = (workspace.dir() / "version.txt").read_text().strip()
    decision = model_plane.gate_decision(workspace.dir(), config=_gate_config(config))
    if not decision.promote:
        raise dg.Failure(f"version {version} did not pass the promotion gate: {decision.reasons[0]}")
    reg = registry.open()
    reg.promote(version, decision)
    context.log.info(f"version {version} is now champion: {decision.reasons[0]}")
    _alert_decision(context, alerts, "model.promoted", version, decision,
                    f":white_check_mark: recloop: version {version} is the new champion: {decision.reasons[0]}")
    return dg.MaterializeResult(metadata={"champion": version, "compared_to": decision.compared_to,
                                          "lineage": dg.MetadataValue.json(reg.lineage()),
                                          "reasons": dg.MetadataValue.json(decision.reasons)})


training_job = dg.define_asset_job(
    name="training_job",
    selection=dg.AssetSelection.groups("models"),
    description="Train, evaluate, register and (if the gate passes) promote a new champion.",
    tags={"recloop/stage": "model_plane"},
)


@dg.definitions
def defs() -> dg.Definitions:
    from recloop.config import Settings
    from recloop.registry import registry_settings

    settings = Settings.from_env()
    rs = registry_settings(settings)
    return dg.Definitions(
        assets=[training_set, two_tower, ann_index, ranker, evaluation, registered_version, champion],
        asset_checks=[promotion_gate],
        jobs=[training_job],
        resources={
            "registry": MlflowRegistryResource(tracking_uri=rs.tracking_uri, model_name=rs.model_name,
                                               artifact_location=rs.artifact_location),
            "workspace": ModelWorkspaceResource(path=str(model_plane.workdir_for(settings))),
        },
    )
