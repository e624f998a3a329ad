"""Offline evaluation of recommenders: metrics, baselines, splits and a harness that anyone can re-run on
their own split of their own files.

| module | what |
|---|---|
| `metrics.py` | Recall, NDCG, MAP, hit rate at k; coverage, diversity, novelty, popularity concentration, identical lists |
| `data.py` | interactions (positive engagements), seen items, the user x item matrix, time and random splits |
| `baselines.py` | popularity, ALS and BPR (`implicit`), EASE (closed form), each tuned on validation data |
| `harness.py` | `evaluate`: every recommender on the same users, checked and scored; the JSON result |
| `files.py` | `evaluate_files` (`recloop evaluate`): MovieLens folders, ratings files or event files in |

The protocol (documented in docs/evaluation.md):

* an **interaction** is a positive engagement -- a watch (``watched_s > 0``) that was completed, liked or
  lasted at least half of the video's duration; for ratings files, a rating >= 4;
* every recommender implements :class:`recloop.recommender.Recommender` and ranks the **whole catalogue**
  (no sampled negatives);
* the videos a user already watched (rated) in the history -- training data, and validation data when
  there is some -- are **excluded** from that user's recommendations (``exclude=`` is passed to every
  recommender) and from their relevant set;
* relevant items of a user are their test positives; users without any are skipped, and test users who
  are unknown in the training data (cold users) are counted and skipped.
"""

from recloop.evaluation.baselines import (
    ALS_DEFAULTS,
    ALS_GRID,
    BPR_DEFAULTS,
    BPR_GRID,
    EASE_GRID,
    EaseRecommender,
    ImplicitCFRecommender,
    PopularityRecommender,
    RecommenderFactory,
    baseline_factories,
    popularity_factory,
    tune,
    tuned_cf_factory,
    tuned_ease_factory,
)
from recloop.evaluation.data import (
    SeenItems,
    Split,
    _positive,
    interactions_from_events,
    random_split,
    time_split,
)
from recloop.evaluation.files import EvaluationInputError, evaluate_files, load_file, load_interactions_file
from recloop.evaluation.harness import PROTOCOL, EvaluationResult, evaluate, flat_metrics, write_json
from recloop.evaluation.metrics import (
    ACCURACY_METRICS,
    DEFAULT_KS,
    MAIN_K,
    accuracy_metrics,
    catalog_coverage,
    hit_rate_at_k,
    identical_list_share,
    intra_list_diversity,
    map_at_k,
    ndcg_at_k,
    novelty,
    popularity_concentration,
    recall_at_k,
)

__all__ = [
    "ACCURACY_METRICS", "ALS_DEFAULTS", "EvaluationInputError", "load_file", "ALS_GRID", "BPR_DEFAULTS", "BPR_GRID", "DEFAULT_KS", "EASE_GRID", "MAIN_K",
    "PROTOCOL", "EaseRecommender", "EvaluationResult", "ImplicitCFRecommender", "PopularityRecommender",
    "RecommenderFactory", "SeenItems", "Split", "_positive", "accuracy_metrics", "baseline_factories",
    "catalog_coverage", "evaluate", "evaluate_files", "flat_metrics", "hit_rate_at_k", "identical_list_share",
    "interactions_from_events", "intra_list_diversity", "load_interactions_file", "map_at_k", "ndcg_at_k", "novelty",
    "popularity_concentration", "popularity_factory", "random_split", "recall_at_k", "time_split", "tune",
    "tuned_cf_factory", "tuned_ease_factory", "write_json",
]
