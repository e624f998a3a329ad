"""The model plane's lifecycle steps as plain functions, one per Dagster asset / Airflow task:

    plan the window → training set (the window's history) → two-tower → ANN index → ranker (candidate
    sources on label folds, LambdaRank, the bundle) → evaluation beside the baselines and the current
    champion, on the same split → registered version → gate → promotion or refusal.

Each step reads what the previous one wrote in the cycle's working folder (`<models_dir>/candidate`):
`plan.json`, `window/`, `retrieval/`, `index/`, `bundle/` (+ `fit_report.json`), `evaluation.json`.
The registry (MLflow) keeps every version; the working folder is only the cycle in progress.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recloop.config import Settings
from recloop.lake import Lake

PLAN = "plan.json"
WINDOW = "window"
EVALUATION = "evaluation.json"
FIT_REPORT = "fit_report.json"
PRIMARY = "recloop"  # the platform's full recommender, in evaluation results and the gate
# The evaluation segment of the users both the candidate and the champion know (in both training windows'
# users); its metrics carry this suffix (`coverage_common`, `users_evaluated_common`), read by the gate.
COMMON = "common"


@dataclass(frozen=True)
class TrainingPlan:
    """Which validated days train the candidate and which held-out days evaluate it."""

    train_partitions: list[str]
    test_partitions: list[str]
    # How the window was asked for, when as periods (`recloop.periods`): e.g. "all" and "14d".
    train_period: str | None = None
    test_period: str | None = None

    @classmethod
    def read(cls, workdir: Path) -> "TrainingPlan":
        path = Path(workdir) / PLAN
        if not path.is_file():
            raise FileNotFoundError(f"no training plan at {path}: materialize model/training_set first")
        raw = json.loads(path.read_text())
        return cls(train_partitions=raw["train_partitions"], test_partitions=raw["test_partitions"],
                   train_period=raw.get("train_period"), test_period=raw.get("test_period"))

    def write(self, workdir: Path) -> None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / PLAN).write_text(json.dumps(asdict(self), indent=2))

    @property
    def data_info(self) -> dict[str, Any]:
        return {
            "partition_start": self.train_partitions[0],
            "partition_end": self.train_partitions[-1],
            "test_start": self.test_partitions[0],
            "test_end": self.test_partitions[-1],
            "partitions": self.train_partitions,
        }


def plan_window(
    lake: Lake, *, train_days: int = 7, test_days: int = 1, train_period: str | None = None,
    test_period: str | None = None,
) -> TrainingPlan:
    """Which validated days (`silver/events` partitions: days with events) train and which evaluate.

    As counts of days with data: the newest `test_days` days evaluate, the `train_days` before them train.
    As periods of calendar time (`recloop.periods`: `14d`, `2w`, `6m`, `1y`; `all` for training), which
    is what a sparse history needs: `test_period` holds out the days with data in the newest period of the
    data (the calendar days ending at the newest day with events: "14d" is 14 calendar days, however many
    of them hold events), and `train_period` trains on the days with data in the period before it, or on
    every earlier day with `all`. A period, when given, wins over the count of its side."""
    from datetime import date, timedelta

    from recloop.periods import parse_period

    days = lake.partitions("silver/events")
    if not days:
        raise ValueError(f"no validated days of events in {lake.uri('silver/events')}: import or run the data plane first")
    if test_period:
        held = parse_period(test_period, allow_all=False, what="the test period")
        test_start = held.start(date.fromisoformat(days[-1]))
        test = [d for d in days if d >= test_start.isoformat()]
    else:
        test = days[-test_days:]
        test_start = date.fromisoformat(test[0])
    before = [d for d in days if d < test[0]]
    if train_period:
        # The training period ends where the held-out period starts (calendar time).
        period = parse_period(train_period, what="the training period")
        start = period.start(test_start - timedelta(days=1))
        train = [d for d in before if date.fromisoformat(d) >= start]
    else:
        train = before[-train_days:]
    if len(train) < 2:
        asked = (f"the training period {train_period}" if train_period else f"{train_days} training days")
        held_out = (f"the test period {test_period} ({len(test)} day(s) with events from {test[0]})" if test_period
                    else f"{len(test)} held-out day(s)")
        raise ValueError(
            f"need at least 2 validated days of events to train on, found {len(train)} in {asked} before "
            f"{held_out}; {len(days)} days with events in {lake.uri('silver/events')} from {days[0]} to {days[-1]}")
    return TrainingPlan(train_partitions=train, test_partitions=test, train_period=train_period or None,
                        test_period=test_period or None)


def workdir_for(settings: Settings) -> Path:
    return settings.home / "models" / "candidate"


def fit_config(**overrides: Any) -> Any:
    """The lifecycle's fit configuration: time folds (train on the past, label the next period), users'
    features at the cutoff, the two-tower as a source; `overrides` replace fields."""
    from recloop.model_plane.fit import FitConfig
    from recloop.model_plane.recommender import CandidateConfig
    from recloop.training import TwoTowerConfig

    base = FitConfig(split="time", folds=3, fold_share=0.1, two_tower=TwoTowerConfig(),
                     candidates=CandidateConfig(user_time="cutoff"), max_users_per_fold=2000)
    return FitConfig(**{**base.__dict__, **overrides})


# --- training set -----------------------------------------------------------------------------------


def _window(lake: Lake, plan: TrainingPlan) -> Any:
    from recloop.training import load_window

    return load_window(lake, plan.train_partitions)


def _read_window(workdir: Path) -> Any:
    from recloop.training import Window

    d = Path(workdir) / WINDOW
    if not d.is_dir():
        raise FileNotFoundError(f"no training window in {d}: materialize model/training_set first")
    meta = json.loads((d / "window.json").read_text())
    return Window.from_tables(pd.read_parquet(d / "events.parquet"), pd.read_parquet(d / "videos.parquet"),
                              pd.read_parquet(d / "users.parquet"), cutoff=meta["cutoff"], partitions=meta["partitions"])


def build_training_set(settings: Settings, lake: Lake, plan: TrainingPlan, workdir: Path) -> dict[str, Any]:
    """The training window as the model plane reads it: every validated event of the training days
    (watched or not), the videos and users known at its end. Writes `plan.json` and `window/`."""
    from recloop.model_plane.history import History

    t0 = time.perf_counter()
    wd = Path(workdir)
    plan.write(wd)
    window = _window(lake, plan)
    d = wd / WINDOW
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    window.events.to_parquet(d / "events.parquet", index=False)
    window.videos.to_parquet(d / "videos.parquet", index=False)
    window.users.to_parquet(d / "users.parquet", index=False)
    (d / "window.json").write_text(json.dumps({"cutoff": window.cutoff.isoformat(), "partitions": window.partitions,
                                               "source": lake.uri("silver/events")}))
    history = History.from_window(window)
    described = history.describe()
    return {
        "rows": described["events"],
        "watched": described["watched"],
        "positives": described["positives"],
        "users": described["users"],
        "videos": described["items"],
        "path": str(d),
        "seconds": round(time.perf_counter() - t0, 2),
        **plan.data_info,
    }


# --- models -----------------------------------------------------------------------------------------


def train_retrieval(lake: Lake, workdir: Path, config: Any = None) -> dict[str, Any]:
    """Trains the two-tower on the whole training window (the one the bundle serves); saves `retrieval/`."""
    from recloop.training import TwoTowerConfig, save_two_tower, train_two_tower

    window = _read_window(workdir)
    result = train_two_tower(window, config or TwoTowerConfig())
    save_two_tower(result, Path(workdir) / "retrieval")
    return {
        "examples": int(result.n_examples),
        "loss": [round(float(x), 5) for x in result.epoch_losses],
        "samples_per_s": round(float(result.samples_per_s)),
        "seconds": round(float(result.train_seconds), 2),
        "config": asdict(result.config),
    }


def build_ann_index(workdir: Path, *, kind: str = "hnsw", recall_queries: int = 1000, k: int = 100) -> dict[str, Any]:
    """Embeds the catalog with the video tower, builds the FAISS index, measures recall@k vs exact search
    with real user queries; saves `index/`."""
    from recloop.index import AnnIndex, recall_at_k
    from recloop.training import load_two_tower, user_embeddings, video_embeddings

    t0 = time.perf_counter()
    tt = load_two_tower(Path(workdir) / "retrieval")
    ids, vectors = video_embeddings(tt, tt.videos, tt.cutoff)
    index = AnnIndex.build(ids, vectors, kind=kind)
    users = tt.users["user_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    sample = rng.choice(users, size=min(recall_queries, len(users)), replace=False)
    queries = user_embeddings(tt, list(sample), tt.cutoff)
    recall = recall_at_k(index, queries, k=min(k, len(index)))
    index.save(Path(workdir) / "index")
    return {"kind": index.kind, "size": len(index), "dim": index.dim, "params": index.params,
            f"recall_at_{k}_vs_exact": round(float(recall), 4), "seconds": round(time.perf_counter() - t0, 2)}


def train_ranking(workdir: Path, *, store: Any = None, config: Any = None) -> dict[str, Any]:
    """Fits the multi-stage recommender (`recloop.model_plane.fit.fit_recommender`): EASE and the
    two-tower on time folds of the window, the LambdaRank ranker on their candidate lists (with the
    feature store's columns from `store`), the sources on the whole window (reusing `retrieval/` and
    `index/`); writes `bundle/` and `fit_report.json`."""
    from recloop.index import AnnIndex
    from recloop.model_plane import quantization
    from recloop.model_plane.bundle import save_bundle
    from recloop.model_plane.fit import fit_recommender
    from recloop.model_plane.history import History
    from recloop.model_plane.sources import TwoTowerSource
    from recloop.training import load_two_tower

    wd = Path(workdir)
    history = History.from_window(_read_window(wd))
    cfg = config or fit_config()
    final_tt = None
    if (wd / "retrieval").is_dir() and (wd / "index").is_dir():
        final_tt = TwoTowerSource.from_model(load_two_tower(wd / "retrieval"), history,
                                             n_candidates=cfg.candidates.n_two_tower, index=AnnIndex.load(wd / "index"))
    result = fit_recommender(history, config=cfg, store=store, final_two_tower=final_tt)
    bundle = wd / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    plan = TrainingPlan.read(wd)
    # RECLOOP_QUANTIZE=int8: the online user tower in int8 if retrieval keeps its recall (model_plane.quantization).
    quantized = quantization.decide(result.recommender.two_tower, history)
    save_bundle(bundle, result.recommender, metadata={"plan": asdict(plan), "fit": {"split": cfg.split,
                                                                                      "folds": cfg.folds},
                                                      "quantization": quantized})
    report = result.report.to_dict()
    (wd / FIT_REPORT).write_text(json.dumps(report, indent=2, default=str))
    ranker = report["ranker"]
    return {
        "train_rows": ranker["train_rows"],
        "valid_rows": ranker["valid_rows"],
        "best_iteration": ranker["best_iteration"],
        "valid_ndcg_at_10": (max(ranker["curves"].get("valid_ndcg@10") or [float("nan")])),
        "source_recall": report["source_recall"],
        "l2": report["l2"].get("chosen", {}),
        "folds": report["folds"],
        "importance": dict(list(ranker["importance"].items())[:15]),
        "features": ranker["features"],
        "seconds": report["seconds"].get("total"),
        "quantized_user_tower": quantized["user_tower"],
        "quantization": quantized,
    }


# --- evaluation ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    result: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    sanity: dict[str, Any]
    champion_version: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def gate_metrics(flat: dict[str, float], k: int = 10) -> dict[str, float]:
    """Evaluation's flat names → the names the promotion gate reads."""
    out = dict(flat)
    for src, dst in ((f"catalog_coverage_at_{k}", "coverage"), (f"intra_list_diversity_at_{k}", "diversity"),
                     (f"popularity_concentration_at_{k}", "popularity_concentration"),
                     (f"popularity_concentration_stderr_at_{k}", "popularity_concentration_stderr")):
        if src in flat:
            out[dst] = flat[src]
    return out


def evaluation_metrics(result: dict[str, Any], name: str, k: int = 10) -> dict[str, float]:
    """One recommender's flat metrics for the gate and MLflow (`gate_metrics`), plus, when the evaluation
    has the segment of the users both the candidate and the champion know, the same names on it with the
    suffix `_common` (`coverage_common`, `diversity_common`, `ndcg_at_10_common`, ...) and their number,
    `users_evaluated_common`."""
    from recloop.evaluation import flat_metrics

    out = gate_metrics(flat_metrics(result, name), k)
    common = gate_metrics(flat_metrics(result, name, segment=COMMON), k)
    if common:
        out.update({f"{m}_{COMMON}": v for m, v in common.items()})
        out[f"users_evaluated_{COMMON}"] = float(result["segments"][COMMON]["users_evaluated"])
    return out


def _events(lake: Lake, partitions: list[str]) -> pd.DataFrame:
    import pyarrow as pa

    return pa.concat_tables([lake.read_partition("silver/events", p) for p in partitions], promote_options="default").to_pandas()


def evaluate_candidate(
    lake: Lake,
    workdir: Path,
    *,
    store: Any = None,
    champion_bundle: Path | None = None,
    champion_version: str | None = None,
    champions: Iterable[tuple[str, Callable[[], Path]]] = (),
    ks: tuple[int, ...] = (5, 10, 20, 50),
    als_grid: dict[str, Any] | None = None,
) -> Evaluation:
    """Evaluates, on the plan's held-out days with full ranking and every video a user watched in the
    window excluded: the platform's recommender (`recloop`) and each of its candidate sources alone,
    popularity, tuned ALS and tuned EASE — and the current champion on the very same split, so the
    gate compares like with like. With a champion, the lists are also scored on the segment `common`: the
    evaluated users both the candidate and the champion know (in both training windows' users; the
    others get a model's cold-start list), on which the gate compares coverage and diversity.

    The champion is the first of `champions` (version, bundle download), newest first, whose bundle
    loads: `champion_bundle` first when given. One that does not (a corrupt file, an older bundle
    format) is skipped and listed in `extras["champions_skipped"]` with the reason; when none loads, the
    candidate is compared with popularity and the evaluation says so."""
    from recloop.evaluation import (
        PopularityRecommender,
        evaluate,
        interactions_from_events,
        time_split,
        tuned_cf_factory,
        tuned_ease_factory,
    )
    from recloop.model_plane.bundle import load_bundle, sanity
    from recloop.model_plane.recommender import PRIMARY as RANKER

    plan = TrainingPlan.read(workdir)
    wd = Path(workdir)
    candidate = load_bundle(wd / "bundle", store=store)
    window = _read_window(wd)
    videos = window.videos
    test_events = _events(lake, plan.test_partitions)
    # The positives of each part, then together (not a copy of every column of both parts first).
    interactions = pd.concat([interactions_from_events(window.events, videos), interactions_from_events(test_events, videos)],
                             ignore_index=True).sort_values(["user_id", "video_id", "event_time"], kind="stable",
                                                            ignore_index=True)
    del test_events
    split = time_split(interactions, pd.Timestamp(plan.test_partitions[0], tz="UTC"))
    watched = window.events.loc[pd.to_numeric(window.events["watched_s"], errors="coerce").fillna(0) > 0,
                                ["user_id", "video_id"]]
    catalog = videos["video_id"].astype(str)
    # The candidate and each of its sources alone, their lists computed in one pass over the users.
    views = candidate.components(with_self=True)
    recommenders: dict[str, Any] = {PRIMARY: views.pop(RANKER)}
    recommenders.update({f"{PRIMARY}/{name}": r for name, r in views.items()})
    recommenders["popularity"] = PopularityRecommender().fit(split.train, catalog)
    recommenders["als"] = tuned_cf_factory("als", als_grid)(split.train, videos)
    recommenders["ease"] = tuned_ease_factory()(split.train, videos)
    candidates = list(champions)
    if champion_bundle is not None:
        candidates.insert(0, (str(champion_version), lambda: Path(champion_bundle)))
    champion, champion_version, skipped = load_newest_champion(candidates, store=store)
    if champion is not None:
        champion.name = "champion"
        recommenders["champion"] = champion
    extras: dict[str, Any] = {"champions_skipped": skipped} if skipped else {}
    test_users = sorted(set(split.test["user_id"].astype(str)))
    segments = None
    if champion is not None:
        both = candidate.knows(test_users) & champion.knows(test_users)
        segments = {COMMON: [u for u, known in zip(test_users, both) if known]}
    evaluated: dict[str, tuple[list[str], list[list[str]]]] = {}

    def keep_candidate_lists(name: str, users: list[str], lists: list[list[str]]) -> None:
        if name == PRIMARY:
            evaluated[name] = (users, lists)

    result = evaluate(recommenders, split.train, split.test, catalog=videos, ks=ks, split=split.description,
                      history=watched, platform=PRIMARY, segments=segments, on_lists=keep_candidate_lists)
    if "user_sample" in result:  # the figures are over a seeded sample of the test users (`evaluate`'s max_users)
        extras["user_sample"] = result["user_sample"]
    if champion is not None:
        result["segments"][COMMON]["description"] = (
            f"evaluated users both the candidate and champion v{champion_version} know (in both training "
            "windows' users): the relative coverage and diversity guardrails compare on them")
    # The sanity checks read the candidate's lists of the evaluated users (not asked again).
    sane_users, sane_lists = evaluated.get(PRIMARY) or (test_users[:2000], None)
    raw_sanity = sanity(candidate, sane_users, k=10, lists=sane_lists)
    checks = {
        "finite_weights": bool(raw_sanity["weights_finite"]),
        "identical_list_share": float(raw_sanity["share_same_top_k"]),
        "distinct_items": int(raw_sanity["distinct_items"]),
    }
    metrics = {name: evaluation_metrics(result, name) for name in recommenders}
    (wd / EVALUATION).write_text(json.dumps({"result": result, "sanity": checks, "champion_version": champion_version,
                                             "extras": extras}, indent=2, default=str))
    return Evaluation(result=result, metrics=metrics, sanity=checks, champion_version=champion_version, extras=extras)


def load_newest_champion(
    champions: Iterable[tuple[str, Callable[[], Path]]], *, store: Any = None,
) -> tuple[Any, str | None, list[dict[str, Any]]]:
    """The first of `champions` (version, bundle download) whose bundle downloads, verifies and loads:
    (recommender, version, skipped); (None, None, skipped) when none does. Each skipped version says
    why (`corrupt`: files do not match their checksums, `problems`: which and how)."""
    from recloop.model_plane.bundle import CorruptModelError, load_bundle

    skipped: list[dict[str, Any]] = []
    for version, bundle in champions:
        try:
            return load_bundle(bundle(), store=store), str(version), skipped
        except Exception as err:  # noqa: BLE001 - any champion that cannot load is skipped, with why
            reason = getattr(err, "summary", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = f"corrupt: {reason}" if isinstance(err, CorruptModelError) else reason
            skipped.append({"version": str(version), "corrupt": isinstance(err, CorruptModelError),
                            "problems": dict(getattr(err, "problems", {})), "reason": reason})
    return None, None, skipped


def load_evaluation(workdir: Path) -> Evaluation:
    raw = json.loads((Path(workdir) / EVALUATION).read_text())
    result = raw["result"]
    metrics = {name: evaluation_metrics(result, name) for name in result["recommenders"]}
    return Evaluation(result=result, metrics=metrics, sanity=raw["sanity"], champion_version=raw.get("champion_version"),
                      extras=raw.get("extras", {}))


# --- registry -----------------------------------------------------------------------------------------


def _metric_prefix(name: str) -> str:
    if name == PRIMARY:
        return "eval.full"
    if name.startswith(f"{PRIMARY}/"):
        return f"eval.source.{name.split('/', 1)[1]}"
    return f"eval.{name}"


def run_name(plan: TrainingPlan, version: str | None = None) -> str:
    """A run name that says what was trained on which days, and (once registered) as which version:
    `train 2025-01-01..2025-01-07 v3`."""
    name = f"train {plan.train_partitions[0]}..{plan.train_partitions[-1]}"
    return f"{name} v{version}" if version else name


def _span(days: list[str]) -> str:
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"


def run_description(plan: TrainingPlan, report: dict[str, Any], ev: "Evaluation") -> str:
    """The training run's description in the MLflow UI (markdown): what was trained on which window, how it
    compares on the held-out days."""
    rounds = report.get("ranker", {}).get("best_iteration")
    folds = len(report.get("folds", []))
    ours = ev.metrics.get(PRIMARY, {}).get("ndcg_at_10")
    bars = [f"{name} {ev.metrics[name]['ndcg_at_10']:.4f}" for name in ("popularity", "champion")
            if isinstance(ev.metrics.get(name, {}).get("ndcg_at_10"), (int, float))]
    versus = f" (champion v{ev.champion_version})" if ev.champion_version else " (no champion yet: the bar is popularity)"
    lines = [
        "Multi-stage recommender: EASE item-to-item, two-tower + FAISS, popular and fresh candidates, re-ranked by "
        f"LightGBM LambdaRank ({folds} time folds, {rounds} boosting rounds).",
        f"Trained on silver/events {_span(plan.train_partitions)} ({len(plan.train_partitions)} days with events), "
        f"evaluated on {_span(plan.test_partitions)}{versus}.",
    ]
    if isinstance(ours, (int, float)):
        lines.append(f"NDCG@10 {ours:.4f}" + (f" vs {', '.join(bars)}" if bars else "") + ".")
    users = ev.result.get("users_evaluated")
    if isinstance(users, int):
        sample = (ev.result.get("user_sample") or {}).get("description")
        lines.append(f"Evaluated on {users:,} users" + (f": {sample}." if sample else "."))
    return "\n\n".join(lines)


def window_datasets(workdir: Path, plan: TrainingPlan) -> list[tuple[Any, str]]:
    """The training window's events as an `mlflow.data` dataset (context `training`: name, source = the lake's
    `silver/events`, digest, schema, row count) and the held-out days (context `evaluation`, by reference)."""
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset

    d = Path(workdir) / WINDOW
    meta = json.loads((d / "window.json").read_text()) if (d / "window.json").is_file() else {}
    source = _dataset_source(meta.get("source") or str(d / "events.parquet"))
    out: list[tuple[Any, str]] = []
    if (d / "events.parquet").is_file():
        events = pd.read_parquet(d / "events.parquet")
        with warnings.catch_warnings():  # MLflow's hint about integer columns is for model signatures
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(events, source=source, name=f"silver/events {_span(plan.train_partitions)}")
            # `schema` is a cached property: filled here with `_events_schema` (MLflow's own inference reads every
            # value of the string columns, 6 s at 700k rows), under the filter.
            dataset.__dict__["schema"] = _events_schema(events)
        out.append((dataset, "training"))
    out.append((MetaDataset(source, name=f"silver/events {_span(plan.test_partitions)}"), "evaluation"))
    return out


def _events_schema(events: pd.DataFrame, sample: int = 20_000) -> Any:
    """MLflow's schema of `events`, inferred by MLflow from an evenly spaced sample of `sample` rows, with each
    column's `required` (no missing value) read from every row."""
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.types.utils import _infer_schema

    inferred = _infer_schema(events.iloc[:: max(1, len(events) // sample)])
    return Schema([ColSpec(c.type, c.name, required=not bool(events[c.name].isna().any())) for c in inferred.inputs])


def _dataset_source(uri: str) -> Any:
    """MLflow's dataset source for a lake URI (a local path, s3://...), or a plain reference to it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        with warnings.catch_warnings():  # a local path matches MLflow's "local" source type twice: it says so
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(uri)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source type for: keep the URI as a reference
        return HTTPDatasetSource(uri)


def register_candidate(registry: Any, workdir: Path, *, training: dict[str, Any] | None = None) -> str:
    """Logs the cycle as one MLflow run (hyper-parameters, per-epoch and per-round training curves, each
    source's recall, evaluation metrics, data, features, the bundle as one pyfunc model), registers it
    as a new version and points `challenger` at it. The run is named after its window and, once registered,
    its version (`train 2025-01-01..2025-01-07 v3`); the training window is its `training` dataset.
    Returns the version."""
    wd = Path(workdir)
    plan = TrainingPlan.read(wd)
    ev = load_evaluation(wd)
    manifest = json.loads((wd / "bundle" / "bundle.json").read_text())
    report = json.loads((wd / FIT_REPORT).read_text()) if (wd / FIT_REPORT).is_file() else {}
    metrics: dict[str, float] = {}
    for name, values in ev.metrics.items():
        prefix = _metric_prefix(name)
        metrics.update({f"{prefix}.{m}": v for m, v in values.items() if isinstance(v, (int, float)) and np.isfinite(v)})
    metrics.update({f"sanity.{k}": float(v) for k, v in ev.sanity.items()})
    metrics.update({f"train.source_recall.{k}": float(v) for k, v in report.get("source_recall", {}).items()})
    ranker = report.get("ranker", {})
    if ranker:
        metrics["train.ranker.best_iteration"] = float(ranker.get("best_iteration", 0))
        metrics["train.ranker.train_rows"] = float(ranker.get("train_rows", 0))
    for step, values in (training or {}).items():
        metrics.update({f"train.{step}.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    curves = {f"train.ranker.{name.replace('@', '_at_')}": series for name, series in ranker.get("curves", {}).items()}
    tt = report.get("two_tower") or {}
    if tt.get("epoch_losses"):
        curves["train.two_tower.loss"] = tt["epoch_losses"]
    fit_cfg = (manifest.get("metadata") or {}).get("fit", {})
    params = {
        "plan": asdict(plan),
        "fit": fit_cfg,
        "candidates": manifest["candidates"],
        "sources": manifest["sources"],
        "ease": report.get("l2", {}).get("chosen", {}),
        "ranker": _ranker_params(wd),
        "two_tower": _two_tower_params(wd),
    }
    data = {**plan.data_info, "training_set": (training or {}).get("training_set", {})}
    run_id = registry.log_training_run(
        experiment="recloop-training",
        params=params,
        metrics=metrics,
        data=data,
        features=manifest.get("feature_columns", []),
        bundle_dir=wd / "bundle",
        tags={"recloop.champion_compared": ev.champion_version or ""},
        run_name=run_name(plan),
        example_user_ids=tuple(manifest.get("popular", [])[:0]) or ("u0000001",),
        curves=curves,
        artifacts={"fit_report.json": report, "evaluation.json": ev.result},
        datasets=window_datasets(wd, plan),
        description=run_description(plan, report, ev),
    )
    version = registry.register(run_id, description=(
        f"recloop bundle (two-tower + FAISS index + LightGBM ranker) trained on {_span(plan.train_partitions)}, "
        f"evaluated on {_span(plan.test_partitions)}; run {run_name(plan, None)} ({run_id})"))
    registry.rename_run(run_id, run_name(plan, version))
    registry.set_challenger(version)
    return version


def _ranker_params(wd: Path) -> dict[str, Any]:
    path = wd / "bundle" / "ranker" / "ranker.json"
    return json.loads(path.read_text())["config"] if path.is_file() else {}


def _two_tower_params(wd: Path) -> dict[str, Any]:
    path = wd / "bundle" / "sources" / "two_tower" / "model" / "model_args.json"
    return json.loads(path.read_text())["config"] if path.is_file() else {}


def gate_decision(workdir: Path, *, config: Any = None) -> Any:
    """The promotion gate's decision for the candidate evaluated in `workdir` (pure: nothing recorded)."""
    from recloop.registry import GateConfig, decide

    ev = load_evaluation(workdir)
    champion = ev.metrics.get("champion")
    decision = decide(
        challenger=ev.metrics[PRIMARY],
        champion=champion,
        popularity=ev.metrics["popularity"],
        sanity=ev.sanity,
        config=config or GateConfig(),
        champion_version=ev.champion_version if champion else None,
        reference={name: ev.metrics[name] for name in ("als", "ease") if name in ev.metrics},
    )
    # A champion that could not be loaded is not the bar; the record says which and why.
    decision.reasons += [f"NOTE champion v{s['version']} not compared (it does not load): {s['reason']}"
                         for s in ev.extras.get("champions_skipped", [])]
    return decision
