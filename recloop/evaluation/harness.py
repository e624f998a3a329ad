"""The harness: every recommender asked for the same users, checked, and scored by the same metrics;
the JSON result (`EvaluationResult`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import pandas as pd

from recloop.recommender import Recommender
from recloop.evaluation.data import SeenItems, _check_interactions
from recloop.evaluation.metrics import (
    ACCURACY_METRICS,
    DEFAULT_KS,
    MAIN_K,
    RESULT_FORMAT,
    UNKNOWN_CATEGORY,
    _flatten,
    accuracy_metrics,
    catalog_coverage,
    identical_list_share,
    intra_list_diversity,
    novelty,
    popularity_concentration,
    popularity_concentration_stderr,
)

log = logging.getLogger(__name__)


# --- the harness -------------------------------------------------------------------------------------


class AccuracyAtK(TypedDict):
    recall: float | None
    ndcg: float | None
    map: float | None
    hit_rate: float | None


class RecommenderResult(TypedDict, total=False):
    users_evaluated: int
    metrics: dict[str, AccuracyAtK]  # keyed by str(k)
    beyond_accuracy: dict[str, Any]  # at the main k
    seconds: dict[str, float]
    params: dict[str, Any]
    tuning: dict[str, Any]


class EvaluationResult(TypedDict):
    """The JSON written by :func:`write_json` (every key a string, every value JSON-native)."""

    format: int
    protocol: dict[str, Any]
    split: dict[str, Any]
    catalog_size: int
    ks: list[int]
    main_k: int
    interactions: dict[str, int]
    users: dict[str, int]
    users_evaluated: int
    platform: str | None  # the name of recloop's own recommender among `recommenders`, if it is there
    recommenders: dict[str, RecommenderResult]
    # Only when `evaluate(..., segments=...)` asked for them: name -> {"users_evaluated", "recommenders"}.
    segments: NotRequired[dict[str, dict[str, Any]]]
    # Only when `max_users` sampled the users: {"max_users", "seed", "of", "description"}.
    user_sample: NotRequired[dict[str, Any]]


PROTOCOL = {
    "positive": "a watch (watched_s > 0) that was completed, liked or lasted >= 50% of the video's "
    "duration; ratings: rating >= 4",
    "ranking": "full ranking over all catalogue items (no sampled negatives)",
    "relevant": "a user's test positives, minus videos already in their history (train positives, and every "
    "video they watched in train or validation when the caller gives that history)",
    "excluded": "the same history is excluded from every recommender's lists",
    "users": "test users present in train with at least one relevant video; cold users are skipped; at most "
    "`max_users` of them (a seeded sample, the same for every recommender of the evaluation)",
}
# At most this many evaluated users (a seeded sample of those with relevant videos): full-ranking evaluation
# costs users x catalogue per recommender, both of which grow with the events; 5,000 users give a recall@10
# with a standard error of ~0.005 (and the same users for every recommender, so the comparison is paired).
MAX_EVAL_USERS = 5000


def sample_users(n: int, max_users: int | None, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of at most `max_users` of `n` users: all of them, or a seeded sample."""
    if max_users is None or n <= max_users:
        return np.arange(n)
    if max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    return np.sort(np.random.default_rng(seed).choice(n, max_users, replace=False))


def _history(train: pd.DataFrame, history: pd.DataFrame | None) -> pd.DataFrame:
    """The (user, video) pairs never to recommend: train's, plus `history` (all that was watched)."""
    parts = [train[["user_id", "video_id"]]] + ([history[["user_id", "video_id"]]] if history is not None else [])
    return pd.concat(parts, ignore_index=True).astype(str).drop_duplicates()


def _relevant(
    train: pd.DataFrame, test: pd.DataFrame, *, exclude_seen: bool, history: pd.DataFrame | None = None
) -> tuple[list[str], list[set[str]], dict[str, int]]:
    """Evaluated users (sorted), their relevant sets (test positives not in the history), and user counts."""
    _check_interactions(test, "test")
    train_users = pd.Index(train["user_id"].astype(str).unique())
    t = test[["user_id", "video_id"]].astype(str).drop_duplicates()
    test_users = t["user_id"].nunique()
    warm = t["user_id"].isin(train_users)
    cold = int(t.loc[~warm, "user_id"].nunique())
    t = t.loc[warm]
    if exclude_seen and len(t):
        seen = _history(train, history)
        t = t.merge(seen, on=["user_id", "video_id"], how="left", indicator=True)
        t = t.loc[t["_merge"] == "left_only", ["user_id", "video_id"]]
    t = t.sort_values(["user_id", "video_id"], kind="stable")
    grouped = t.groupby("user_id", sort=True)["video_id"]
    users = list(grouped.groups.keys())
    truth = [set(v) for v in grouped.agg(list).tolist()] if len(users) else []
    counts = {
        "train": int(len(train_users)),
        "test": int(test_users),
        "cold_test_users": cold,
        "without_relevant_videos": int(test_users - cold - len(users)),
        "evaluated": len(users),
    }
    return [str(u) for u in users], truth, counts


def _check_lists(name: str, users: list[str], recs: list[list[str]], k: int, seen: SeenItems | None) -> None:
    """A recommender's answer must be one list per user of at most k distinct, non-excluded videos."""
    if len(recs) != len(users):
        raise ValueError(f"{name}: returned {len(recs)} lists for {len(users)} users")
    for user, r in zip(users, recs):
        if len(r) > k:
            raise ValueError(f"{name}: returned {len(r)} > k={k} videos for user {user!r}")
        if len(set(r)) != len(r):
            raise ValueError(f"{name}: repeated videos in the list of user {user!r}")
    if seen is None or not len(users):
        return
    rows, _, items = _flatten(recs)
    s_users, s_items = seen.pairs()
    s_rows = pd.Index(users).get_indexer(s_users)
    keep = s_rows >= 0
    codes, uniques = pd.factorize(np.concatenate([items.astype(str), s_items[keep].astype(str)]))
    n = max(len(uniques), 1)
    bad = np.isin(rows * n + codes[: len(items)], s_rows[keep] * n + codes[len(items) :])
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: recommended excluded (already seen) video {items[j]!r} to user {users[rows[j]]!r}")


def _json_float(x: float | np.floating) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _json_float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (pd.Timestamp, Path)):
        return str(obj)
    return str(obj)


def _catalog_frame(catalog: pd.DataFrame | Iterable[str], *extra: pd.DataFrame) -> pd.DataFrame:
    if isinstance(catalog, pd.DataFrame):
        cat = catalog.copy()
    else:
        cat = pd.DataFrame({"video_id": list(catalog)})
    cat["video_id"] = cat["video_id"].astype(str)
    if "category" not in cat.columns:
        cat["category"] = UNKNOWN_CATEGORY
    ids = [cat["video_id"]] + [df["video_id"].astype(str) for df in extra]
    missing = pd.Index(pd.unique(pd.concat(ids, ignore_index=True))).difference(pd.Index(cat["video_id"]))
    if len(missing):
        cat = pd.concat([cat, pd.DataFrame({"video_id": missing, "category": UNKNOWN_CATEGORY})], ignore_index=True)
    return cat.drop_duplicates("video_id", keep="first").reset_index(drop=True)


def evaluate(
    recommenders: Mapping[str, Recommender],
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    catalog: pd.DataFrame | Iterable[str],
    ks: Iterable[int] = DEFAULT_KS,
    exclude_seen: bool = True,
    main_k: int = MAIN_K,
    split: Mapping[str, Any] | None = None,
    history: pd.DataFrame | None = None,
    platform: str | None = None,
    segments: Mapping[str, Iterable[str]] | None = None,
    max_users: int | None = MAX_EVAL_USERS,
    seed: int = 0,
    on_lists: Callable[[str, list[str], list[list[str]]], None] | None = None,
) -> EvaluationResult:
    """Evaluate fitted recommenders on `test` (JSON-ready result, see :class:`EvaluationResult`).

    `train` / `test` are interaction frames (``user_id, video_id, event_time`` positives); `catalog` the
    videos (``video_id`` and, for diversity, ``category``) -- videos of train or test missing from it are
    added. `history`: further (user, video) pairs the users already watched (all of train's, liked or
    not; validation's). Every recommender is asked once for max(ks ∪ {main_k}) videos per evaluated user
    with ``exclude`` = the user's training positives and history (when `exclude_seen`), and shorter
    cut-offs use the prefix of that list. `platform` names the recommender that is recloop's own model
    (recorded in the result as ``platform``). Its answer is checked (one list per user, at most k distinct videos, none
    excluded); a breach raises ValueError.

    `segments` (name -> user ids): the same lists scored again on the evaluated users of each segment
    (users outside the evaluated set are ignored), in the result's ``segments``: name ->
    ``{"users_evaluated", "recommenders": {name: {"users_evaluated", "metrics", "beyond_accuracy"}}}``;
    read them flat with ``flat_metrics(result, name, segment=...)``.

    `max_users`: at most this many evaluated users, a sample (`seed`) of the test users with relevant
    videos, drawn once so every recommender (candidate, champion, baselines) is scored on the same users;
    when it samples, the result's ``users`` says ``with_relevant_videos`` (how many there were) and
    ``user_sample`` gives the cap and the seed. None: every such user.

    `on_lists(name, users, lists)`: called with each recommender's lists once they are checked (for a
    caller that looks at them further, e.g. the model's sanity checks, without asking again).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or main_k < 1:
        raise ValueError(f"ks and main_k must be >= 1, got {ks} and {main_k}")
    _check_interactions(train, "train")
    cat = _catalog_frame(catalog, train, test)
    catalog_size = len(cat)
    users, truth, user_counts = _relevant(train, test, exclude_seen=exclude_seen, history=history)
    picked = sample_users(len(users), max_users, seed)
    sampled = len(picked) < len(users)
    if sampled:
        users, truth = [users[i] for i in picked], [truth[i] for i in picked]
        user_counts = {**user_counts, "with_relevant_videos": user_counts["evaluated"], "evaluated": len(users)}
    seen = SeenItems(_history(train, history)) if exclude_seen else None
    popularity = pd.Series(0.0, index=pd.Index(cat["video_id"]))
    counts = train["video_id"].astype(str).value_counts()
    popularity = popularity.add(counts.astype(np.float64), fill_value=0.0)
    category = pd.Series(cat["category"].astype(str).to_numpy(), index=cat["video_id"].to_numpy())
    k_max = max(max(ks), main_k)

    def score(recs: list[list[str]], truth: list[set[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(accuracy at each k, beyond-accuracy at main_k) of these users' lists."""
        accuracy = accuracy_metrics(recs, truth, sorted(set(ks) | {main_k})) if recs else {}
        main = [r[:main_k] for r in recs]
        beyond: dict[str, Any] = {"k": main_k}
        if recs:
            beyond.update({m: accuracy[main_k][m] for m in ACCURACY_METRICS})
            beyond.update(
                catalog_coverage=catalog_coverage(main, catalog_size),
                intra_list_diversity=intra_list_diversity(main, category),
                novelty=novelty(main, popularity) if popularity.sum() > 0 else float("nan"),
                popularity_concentration=popularity_concentration(main, popularity),
                popularity_concentration_stderr=popularity_concentration_stderr(main, popularity),
                identical_list_share=identical_list_share(main),
            )
        metrics = {str(k): ({m: accuracy[k][m] for m in ACCURACY_METRICS} if recs
                            else dict.fromkeys(ACCURACY_METRICS)) for k in ks}
        return metrics, beyond

    # Each segment: the positions, among the evaluated users, of its users (the others are not evaluated).
    position = {u: i for i, u in enumerate(users)}
    segment_rows = {str(seg): sorted({position[u] for u in map(str, members) if u in position})
                    for seg, members in (segments or {}).items()}
    segment_results: dict[str, dict[str, RecommenderResult]] = {seg: {} for seg in segment_rows}

    out: dict[str, RecommenderResult] = {}
    for name, rec in recommenders.items():
        t0 = time.perf_counter()
        recs = rec.recommend(users, k_max, exclude=seen) if users else []
        seconds = time.perf_counter() - t0
        recs = [list(map(str, r)) for r in recs]
        _check_lists(name, users, recs, k_max, seen)
        if on_lists is not None:
            on_lists(name, users, recs)
        metrics, beyond = score(recs, truth)
        result: RecommenderResult = {
            "users_evaluated": len(users),
            "metrics": metrics,
            "beyond_accuracy": beyond,
            "seconds": {"recommend": round(seconds, 3)},
        }
        for segment, rows in segment_rows.items():
            seg_metrics, seg_beyond = score([recs[i] for i in rows], [truth[i] for i in rows])
            segment_results[segment][name] = {"users_evaluated": len(rows), "metrics": seg_metrics,
                                              "beyond_accuracy": seg_beyond}
        params = getattr(rec, "params", None)
        if isinstance(params, Mapping):
            result["params"] = dict(params)
        tuning = getattr(rec, "tuning", None)
        if isinstance(tuning, Mapping):
            result["tuning"] = dict(tuning)
        out[name] = result
        log.info("evaluated %s on %d users in %.2fs", name, len(users), seconds)

    result_all = {
        "format": RESULT_FORMAT,
        "protocol": {**PROTOCOL, "exclude_seen": exclude_seen},
        "split": dict(split or {}),
        "catalog_size": catalog_size,
        "ks": ks,
        "main_k": main_k,
        "interactions": {"train": len(train), "test": len(test)},
        "users": user_counts,
        "users_evaluated": len(users),
        "platform": platform,
        "recommenders": out,
    }
    if sampled:
        result_all["user_sample"] = {"max_users": max_users, "seed": seed, "of": user_counts["with_relevant_videos"],
                                     "description": f"{len(users):,} of the {user_counts['with_relevant_videos']:,} "
                                                    f"test users with relevant videos, a seeded sample (seed {seed}) "
                                                    "shared by every recommender"}
    if segments is not None:
        result_all["segments"] = {
            seg: {"users_evaluated": len(segment_rows[seg]), "recommenders": segment_results[seg]}
            for seg in segment_rows
        }
    return _jsonable(result_all)


def flat_metrics(
    result: Mapping[str, Any], recommender: str, *, segment: str | None = None
) -> dict[str, float]:
    """One recommender's numbers as flat names (``recall_at_10``, ``catalog_coverage_at_10``, ...), e.g.
    for MLflow; metrics that are undefined (None) are left out. With `segment`: the same names on that
    segment's users (`evaluate(..., segments=...)`); {} when the result has no such segment."""
    if segment is not None:
        r = ((result.get("segments") or {}).get(segment) or {}).get("recommenders", {}).get(recommender)
        if r is None:
            return {}
    else:
        r = result["recommenders"][recommender]
    flat: dict[str, float] = {}
    for k, values in r["metrics"].items():
        for m, v in values.items():
            if v is not None:
                flat[f"{m}_at_{k}"] = v
    beyond = r["beyond_accuracy"]
    for m, v in beyond.items():
        if m != "k" and m not in ACCURACY_METRICS and v is not None:
            flat[f"{m}_at_{beyond['k']}"] = v
    return flat


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write `result` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return path


