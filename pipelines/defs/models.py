"""The model plane: training set → two-tower → ANN index → ranker → evaluation → registered version →
champion, with the promotion gate as a check in front of promotion. A refusal is a normal outcome, not a
failed run: the gate check fails with WARN severity (its description and metadata say why) and the champion
asset materializes nothing, so the run succeeds and the alias stays where it was. Thin adapters over
`recloop.model_plane` and `recloop.lifecycle` (shared with the Airflow DAGs in dags/); every number worth
plotting is asset metadata. The latency gate (`recloop.latency`) is a second blocking check beside the
promotion gate, with the same WARN discipline: a version it refuses is not promoted either.

What the gate weighs is plottable: the evaluation's materialization carries the challenger's and the
champion's primary metric, coverage, diversity and concentration as numbers (Dagster plots them across
training runs), the gate checks carry the same figures and the p99 latencies; the registered version, its
checks and the champion link to the MLflow run and model version (`recloop.links`,
RECLOOP_MLFLOW_UI_URL)."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.defs.features import FEAST_REGISTRY, FEATURE_KEYS
from pipelines.defs.resources import AlertsResource, FeastResource, LakeResource, secret_value
from pipelines.defs.validation import silver_key
from recloop import lifecycle, model_plane
from recloop.links import dagster_run_tags
from recloop.registry import GateConfig, Registry

TRAINING_SET = dg.AssetKey(["model", "training_set"])
TWO_TOWER = dg.AssetKey(["model", "two_tower"])
ANN_INDEX = dg.AssetKey(["model", "ann_index"])
RANKER = dg.AssetKey(["model", "ranker"])
EVALUATION = dg.AssetKey(["model", "evaluation"])
REGISTERED = dg.AssetKey(["model", "registered_version"])
CHAMPION = dg.AssetKey(["model", "champion"])
GATE_CHECK = "promotion_gate"
LATENCY_CHECK = "latency_gate"


class MlflowRegistryResource(dg.ConfigurableResource):
    """The MLflow tracking store and model registry (aliases `champion` / `challenger`)."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///… embedded, http://… server).")
    model_name: str = Field(default="recloop-recommender", description="Registered model name.")
    artifact_location: str | None = Field(default=None, description="Artifact root for new experiments.")

    def open(self, run_id: str | None = None) -> Registry:
        """The registry; with the Dagster run's id, every MLflow run it creates is tagged `dagster.run_id`
        and `dagster.run_url` (a link back to the run in the Dagster UI, `RECLOOP_DAGSTER_URL`)."""
        return Registry(self.tracking_uri, self.model_name, artifact_location=self.artifact_location,
                        run_tags=dagster_run_tags(run_id))


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
    TrainPeriod: str = Field(default="", description=(
        "Instead of TrainDays: the calendar period before the held-out one to train on, e.g. 90d, 6m, 1y, or "
        "'all' (every earlier day with events). Empty: TrainDays."))
    TestPeriod: str = Field(default="", description=(
        "Instead of TestDays: the newest calendar period of the data to hold out, e.g. 14d, 2w, 1m (days "
        "without events in it count as calendar days). Empty: TestDays."))


class GateRunConfig(dg.Config):
    MinImprovement: float = Field(default=0.02, description="Relative NDCG@10 margin over the champion (or popularity).")
    MaxIdenticalListShare: float = Field(default=0.5, description="Largest share of users given the same list.")


def _numbers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


def _floats(d: dict[str, Any]) -> dict[str, Any]:
    """Numbers as Dagster float metadata (plotted on an asset's materializations)."""
    return {k: dg.MetadataValue.float(float(v)) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _links(out: dict[str, Any]) -> dict[str, Any]:
    """The MLflow UI URLs of `Registry.version_links` as clickable metadata."""
    names = {"mlflow_run_url": "mlflow_run", "mlflow_version_url": "model_version"}
    return {names[k]: dg.MetadataValue.url(v) for k, v in out.items() if k in names and v}


@dg.asset(
    key=TRAINING_SET,
    group_name="models",
    deps=[silver_key("events"), FEAST_REGISTRY, *FEATURE_KEYS.values()],
    kinds={"feast", "parquet"},
    description=("The training window as the model plane reads it: every validated event of the training days (watched "
                 "or not), the videos and users known at its end; the newest days held out for evaluation."),
)
def training_set(config: TrainingWindowConfig, lake: LakeResource, feast: FeastResource,
                 workspace: ModelWorkspaceResource) -> dg.MaterializeResult:
    out = lifecycle.build_training_set(feast.settings(), lake.open(), workspace.dir(), train_days=config.TrainDays,
                                      test_days=config.TestDays, train_period=config.TrainPeriod or None,
                                      test_period=config.TestPeriod or None)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": out["rows"],
        **_numbers({k: v for k, v in out.items() if k not in ("rows", "partitions")}),
        "train_partitions": dg.MetadataValue.json(out["train_partitions"]),
        "test_partitions": dg.MetadataValue.json(out["test_partitions"]),
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


@dg.asset(key=RANKER, group_name="models", deps=[TRAINING_SET, ANN_INDEX, FEAST_REGISTRY], kinds={"lightgbm", "feast"},
          description=("Candidate sources (EASE item-to-item, two-tower ANN, popular, fresh) fitted on time folds of the "
                       "window, and a LightGBM LambdaRank ranker over their candidate lists with every source's score, "
                       "history and Feast point-in-time features; the bundle of the whole recommender."))
def ranker(workspace: ModelWorkspaceResource, feast: FeastResource) -> dg.MaterializeResult:
    out = lifecycle.train_ranking(feast.settings(), workspace.dir(), project=feast.project)
    return dg.MaterializeResult(metadata={
        **_numbers(out),
        **{f"source_recall/{k}": v for k, v in out["source_recall"].items()},
        "l2": dg.MetadataValue.json(out["l2"]),
        "folds": dg.MetadataValue.json(out["folds"]),
        "importance": dg.MetadataValue.json(out["importance"]),
        "features": dg.MetadataValue.json(out["features"]),
        "quantization": dg.MetadataValue.json(out["quantization"]),
    })


@dg.asset(key=EVALUATION, group_name="models", deps=[RANKER], kinds={"python"},
          description=("Offline evaluation on the held-out days, full ranking, watched videos excluded: the platform's "
                       "recommender and each candidate source alone, popularity, tuned ALS, tuned EASE and the current "
                       "champion on the same split."))
def evaluation(context: dg.AssetExecutionContext, lake: LakeResource, workspace: ModelWorkspaceResource,
               registry: MlflowRegistryResource, feast: FeastResource, alerts: AlertsResource) -> dg.MaterializeResult:
    out = lifecycle.evaluate_candidate(lake.open(), registry.open(), workspace.dir(), settings=feast.settings(),
                                       project=feast.project)
    for alert in lifecycle.corrupt_model_alerts(out):  # a corrupt champion: skipped, and said once
        context.log.warning(alert.text)
        alerts.send(context.log, alert)
    return dg.MaterializeResult(metadata={
        "ndcg_at_10": out["ndcg_at_10"],
        "recall_at_10": out["recall_at_10"],
        "recall_at_10_vs_popularity": out["recall_at_10_vs_popularity"],
        "recall_at_10_vs_als": out["recall_at_10_vs_als"],
        "ndcg_at_10_vs_ease": out["ndcg_at_10_vs_ease"],
        "users_evaluated": out["users_evaluated"],
        "by_recommender": dg.MetadataValue.json(out["by_recommender"]),
        "sanity": dg.MetadataValue.json(out["sanity"]),
        "champion_compared": out["champion_compared"],
        "champions_skipped": dg.MetadataValue.json(out["champions_skipped"]),
        # What the promotion gate weighs, plotted across training runs: challenger_*, champion_*, popularity_*.
        **_floats(out["figures"]),
    })


def _gate_config(config: GateRunConfig | None = None) -> GateConfig:
    c = config or GateRunConfig()
    return lifecycle.gate_config(min_improvement=c.MinImprovement, max_identical_list_share=c.MaxIdenticalListShare)


@dg.asset(
    key=REGISTERED,
    group_name="models",
    deps=[EVALUATION],
    kinds={"mlflow"},
    description="The candidate logged to MLflow (params, metrics, data, features, bundle) and registered as one version; alias `challenger`.",
)
def registered_version(context: dg.AssetExecutionContext, workspace: ModelWorkspaceResource,
                       registry: MlflowRegistryResource) -> dg.MaterializeResult:
    out = lifecycle.register_candidate(registry.open(context.run.run_id), workspace.dir())
    context.log.info(f"registered version {out['version']} as challenger")
    return dg.MaterializeResult(metadata={
        "version": out["version"], "model_name": out["model_name"], "model_uri": out["model_uri"],
        **_floats(out["metrics"]),
        **_links(out),
        "mlflow_run_id": out.get("mlflow_run_id", ""),
    })


@dg.asset_check(
    asset=REGISTERED,
    name=GATE_CHECK,
    blocking=True,
    description=("Beat popularity (first model) or the champion on NDCG@10 by the margin, without breaking the "
                 "coverage/diversity/concentration guardrails, with finite weights and non-identical lists. "
                 "A refusal is recorded in the registry and fails this check with WARN severity (a normal "
                 "outcome, not a failed run); the champion asset then promotes nothing."),
)
def promotion_gate(context: dg.AssetCheckExecutionContext, config: GateRunConfig, workspace: ModelWorkspaceResource,
                   registry: MlflowRegistryResource, alerts: AlertsResource) -> dg.AssetCheckResult:
    the_registry = registry.open(context.run.run_id)
    gate = lifecycle.check_gate(the_registry, workspace.dir(), config=_gate_config(config), run_id=context.run.run_id)
    alerts.send(context.log, gate.alert)
    out = gate.summary()
    # WARN, not ERROR: a refusal must not fail the run (Dagster blocks downstream steps only on ERROR);
    # `champion` asks the gate again and promotes nothing for a refused version.
    return dg.AssetCheckResult(
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=out["reasons"][0],
        metadata={"version": out["version"], "compared_to": out["compared_to"],
                  "decision": "promoted" if gate.passed else "refused",
                  # The figures the decision weighed, as numbers: challenger_ndcg_at_10, champion_coverage, ...
                  **_floats(gate.figures()),
                  **_links(the_registry.version_links(out["version"])),
                  "reasons": dg.MetadataValue.json(out["reasons"]),
                  "checks": dg.MetadataValue.json(out["checks"]),
                  "metrics": dg.MetadataValue.json(out["metrics"])},
    )


@dg.asset_check(
    asset=REGISTERED,
    name=LATENCY_CHECK,
    blocking=True,
    description=("A sample of real requests (silver/impressions, else the users of the newest silver/events "
                 "days) replayed against the candidate's bundle and the champion's, interleaved in one separate "
                 "process through the serving code path: p99 within RECLOOP_LATENCY_BUDGET_MS and at most "
                 "RECLOOP_LATENCY_MAX_RATIO times the champion's. A refusal is recorded in the registry with "
                 "the figures and fails this check with WARN severity; the champion asset then promotes nothing."),
)
def latency_gate(context: dg.AssetCheckExecutionContext, config: GateRunConfig, workspace: ModelWorkspaceResource,
                 registry: MlflowRegistryResource, feast: FeastResource, alerts: AlertsResource) -> dg.AssetCheckResult:
    settings = replace(feast.settings(), feast_project=feast.project)
    the_registry = registry.open(context.run.run_id)
    gate = lifecycle.check_latency(the_registry, workspace.dir(), settings=settings,
                                   gate=_gate_config(config), run_id=context.run.run_id)
    alerts.send(context.log, gate.alert)
    out = gate.summary()
    figures = out["figures"]
    # WARN like the promotion gate: a refusal is a normal outcome; `champion` reads it and promotes nothing.
    return dg.AssetCheckResult(
        passed=gate.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=out["reasons"][0],
        metadata={"version": out["version"], "decision": out["status"], "compared_to": out["compared_to"] or "",
                  "requests_from": figures.get("source", ""),
                  **_floats({f"{role}_{k}": figures[role][k] for role in ("challenger", "champion")
                             if isinstance(figures.get(role), dict)
                             for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms") if k in figures[role]}),
                  **_links(the_registry.version_links(out["version"])),
                  "reasons": dg.MetadataValue.json(out["reasons"]),
                  "checks": dg.MetadataValue.json(out["checks"]),
                  "figures": dg.MetadataValue.json(figures)},
    )


@dg.asset(key=CHAMPION, group_name="models", deps=[REGISTERED], kinds={"mlflow"}, output_required=False,
          description=("Alias `champion` moved to the version that passed the gate; the decision recorded with when, "
                       "why and the metrics. Not materialized when the gate refused the version (the champion "
                       "stays; the gate check says why)."))
def champion(context: dg.AssetExecutionContext, config: GateRunConfig, workspace: ModelWorkspaceResource,
             registry: MlflowRegistryResource, alerts: AlertsResource):
    the_registry = registry.open()
    try:
        promotion = lifecycle.promote_candidate(the_registry, workspace.dir(), config=_gate_config(config),
                                                run_id=context.run.run_id)
    except lifecycle.GateRefused as refused:
        # A refusal: recorded and alerted by the gate check; nothing to materialize (a generator that yields
        # nothing, so the step succeeds without a materialization).
        context.log.info(f"{refused}; the champion stays")
        return
    if promotion.experiment or promotion.note:  # online experiments on: live traffic decides (online/experiment)
        context.log.info(promotion.note)
        return
    context.log.info(f"version {promotion.version} is now champion: {promotion.decision.reasons[0]}")
    alerts.send(context.log, promotion.alert)
    out = promotion.summary()
    yield dg.MaterializeResult(metadata={"champion": out["champion"], "compared_to": out["compared_to"],
                                          **_links(the_registry.version_links(out["champion"])),
                                          "lineage": dg.MetadataValue.json(out["lineage"]),
                                          "reasons": dg.MetadataValue.json(out["reasons"])})


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
        asset_checks=[promotion_gate, latency_gate],
        jobs=[training_job],
        resources={
            # A postgresql:// tracking URI carries a password: Dagster then shows the variable's name.
            "registry": MlflowRegistryResource(
                tracking_uri=secret_value("RECLOOP_MLFLOW_TRACKING_URI", rs.tracking_uri),
                model_name=rs.model_name,
                artifact_location=rs.artifact_location,
            ),
            "workspace": ModelWorkspaceResource(path=str(model_plane.workdir_for(settings))),
        },
    )
