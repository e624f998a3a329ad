"""The model plane's steps: the training set, the ranker, the candidate's evaluation beside the
baselines and the champions it may be compared with, the `model.corrupt` alerts of champions that do not
load, and the registration of the candidate (`candidate_version`: what the gate reads)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import Settings
from recloop.lifecycle.alerts import Alert

if TYPE_CHECKING:
    from recloop.lake import Lake
    from recloop.registry import Registry

def build_training_set(settings: Settings, lake: Lake, workdir: Path, *, train_days: int = 7,
                       test_days: int = 1, train_period: str | None = None,
                       test_period: str | None = None) -> dict[str, Any]:
    """Plans the window (newest validated days held out; as counts of days, or as calendar periods such as
    `train_period="all"`, `test_period="14d"`) and writes its history in `workdir` (`recloop.model_plane`);
    returns its summary and the window."""
    from recloop import model_plane

    plan = model_plane.plan_window(lake, train_days=train_days, test_days=test_days, train_period=train_period,
                                   test_period=test_period)
    out = model_plane.build_training_set(settings, lake, plan, Path(workdir))
    return {**out, "train_partitions": plan.train_partitions, "test_partitions": plan.test_partitions}


def feature_store_columns(settings: Settings, *, project: str | None = None) -> Any:
    """The ranker's feature-store columns: Feast's point-in-time retrieval of `ranking_features`."""
    from recloop.model_plane.store import FeastHistorical

    return FeastHistorical(settings, project=project or settings.feast_project)


def train_ranking(settings: Settings, workdir: Path, *, project: str | None = None) -> dict[str, Any]:
    """The candidate sources on time folds, the LambdaRank ranker on their lists (with Feast's
    point-in-time features), the bundle (`recloop.model_plane.train_ranking`)."""
    from recloop import model_plane

    return model_plane.train_ranking(Path(workdir), store=feature_store_columns(settings, project=project))


def evaluate_candidate(lake: Lake, registry: Registry, workdir: Path, *, settings: Settings | None = None,
                       project: str | None = None) -> dict[str, Any]:
    """Evaluates the candidate in `workdir` on the held-out days beside the baselines and the current
    champion (when there is one), on the same split; returns the headline numbers and the table."""
    from recloop import model_plane

    store = feature_store_columns(settings or Settings.from_env(), project=project)
    ev = model_plane.evaluate_candidate(lake, Path(workdir), store=store, champions=champion_candidates(registry))
    skipped = ev.extras.get("champions_skipped", [])
    table = {name: {m: round(v, 4) for m, v in values.items() if m in (
        "recall_at_10", "ndcg_at_10", "map_at_10", "hit_rate_at_10", "coverage", "diversity", "novelty_at_10",
        "popularity_concentration", "coverage_common", "diversity_common")} for name, values in ev.metrics.items()}
    als, ease = ev.metrics.get("als", {}), ev.metrics.get("ease", {})
    full, pop = ev.metrics[model_plane.PRIMARY], ev.metrics["popularity"]
    return {
        "ndcg_at_10": full["ndcg_at_10"],
        "recall_at_10": full["recall_at_10"],
        "recall_at_10_vs_popularity": (round(full["recall_at_10"] / pop["recall_at_10"], 3)
                                       if pop["recall_at_10"] else float("inf")),
        "recall_at_10_vs_als": (round(full["recall_at_10"] / als["recall_at_10"], 3)
                                if als.get("recall_at_10") else float("inf")),
        "ndcg_at_10_vs_ease": (round(full["ndcg_at_10"] / ease["ndcg_at_10"], 3)
                               if ease.get("ndcg_at_10") else float("inf")),
        "users_evaluated": ev.result["recommenders"][model_plane.PRIMARY]["users_evaluated"],
        # With a champion: how many of them both models know (`coverage_common`, `diversity_common`).
        "users_evaluated_common": ((ev.result.get("segments") or {}).get(model_plane.COMMON) or {}).get(
            "users_evaluated"),
        "by_recommender": table,
        "sanity": ev.sanity,
        "champion_version": ev.champion_version,
        "champion_compared": _champion_compared(ev.champion_version, skipped),
        "champions_skipped": skipped,
        "figures": evaluation_figures(ev.metrics),
    }


# What the promotion gate compares (`recloop.registry.GateConfig`'s metrics), as flat plottable numbers.
GATE_FIGURES = ("ndcg_at_10", "coverage", "diversity", "popularity_concentration")


def evaluation_figures(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The numbers the promotion gate weighs, per recommender evaluated on the same split, flat and finite:
    `challenger_<m>`, `champion_<m>` (when a champion was compared), `popularity_<m>` for the primary
    metric, coverage, diversity and popularity concentration, and `ndcg_at_10_vs_champion` (the ratio)."""
    from recloop import model_plane

    roles = (("challenger", metrics.get(model_plane.PRIMARY) or {}), ("champion", metrics.get("champion") or {}),
             ("popularity", metrics.get("popularity") or {}))
    out = {f"{role}_{m}": float(values[m]) for role, values in roles for m in GATE_FIGURES
           if isinstance(values.get(m), (int, float)) and math.isfinite(float(values[m]))}
    ours, theirs = out.get("challenger_ndcg_at_10"), out.get("champion_ndcg_at_10")
    if ours is not None and theirs:
        out["ndcg_at_10_vs_champion"] = ours / theirs
    return out


def champion_candidates(registry: Registry) -> list[tuple[str, Callable[[], Path]]]:
    """The champions a candidate may be compared with, newest first, each with its bundle download: the
    current champion, then the earlier champions of the lineage (for when the newer cannot be loaded)."""
    current = registry.champion()
    if current is None:
        return []
    versions = dict.fromkeys([str(current.version), *reversed(registry.lineage())])
    return [(v, lambda v=v: registry.bundle_path(v)) for v in versions]


def _champion_compared(version: str | None, skipped: Sequence[Mapping[str, Any]]) -> str:
    why = "; ".join(f"v{s['version']}: {s['reason']}" for s in skipped)
    if version and skipped:
        return f"{version} (the newest champion that loads; skipped {why})"
    if skipped:
        return f"none: no champion loads ({why}); compared with the popularity baseline"
    return version or "none (first model: compared with popularity)"


CORRUPT_ASSET = "model/champion"


def corrupt_model_alert(version: str | int, problems: Mapping[str, str], *, seen_by: str = "training") -> Alert:
    """The `model.corrupt` alert of a registered version whose bundle fails its checksums (`problems`:
    damaged file -> what is wrong with it, as `CorruptModelError.problems`). Keyed by the version and the
    first damaged file: training and serving finding the same damage send one alert."""
    listed = "; ".join(f"{f} {p}" for f, p in problems.items()) or "its bundle does not load"
    first = next(iter(problems), "bundle")
    return Alert("model.corrupt", key=f"version-{version}/{first}",
                 text=(f":rotating_light: recloop: model version {version} is corrupt and cannot be loaded: {listed}. "
                       f"Serving answers with the popularity fallback until the champion loads; move it with "
                       f"`recloop rollback` (or --to VERSION), or retrain"),
                 fields={"asset": CORRUPT_ASSET, "model_version": str(version),
                         "details": {"files": dict(problems), "seen_by": seen_by}})


def corrupt_model_alerts(evaluation: Mapping[str, Any]) -> list[Alert]:
    """The `model.corrupt` alerts of the champions an evaluation (`evaluate_candidate`) skipped as corrupt."""
    return [corrupt_model_alert(s["version"], s.get("problems") or {}, seen_by="training")
            for s in evaluation.get("champions_skipped", []) if s.get("corrupt")]


VERSION_FILE = "version.txt"
# The offline metrics a registered version shows first (its run's `eval.full.*`).
KEY_METRICS = ("ndcg_at_10", "recall_at_10", "map_at_10", "hit_rate_at_10", "coverage", "diversity",
               "novelty_at_10", "popularity_concentration")


def register_candidate(registry: Registry, workdir: Path) -> dict[str, Any]:
    """Logs the candidate as one MLflow run, registers it as a version with alias `challenger` and notes
    the version in `workdir` for the gate and the promotion. The summary links the run and the version in
    the MLflow UI (`mlflow_run_url`, `mlflow_version_url`; base URL `RECLOOP_MLFLOW_UI_URL`)."""
    from recloop import model_plane

    version = model_plane.register_candidate(registry, Path(workdir))
    (Path(workdir) / VERSION_FILE).write_text(version)
    metrics = registry.version_metrics(version)
    return {"version": version, "model_name": registry.model_name,
            "model_uri": f"models:/{registry.model_name}/{version}",
            "metrics": {k: float(metrics[k]) for k in KEY_METRICS if k in metrics},
            **registry.version_links(version)}


def candidate_version(workdir: Path) -> str:
    """The version `register_candidate` registered for the candidate in `workdir`."""
    path = Path(workdir) / VERSION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no registered version in {workdir}: register the candidate first")
    return path.read_text().strip()
