"""The model plane: how recloop turns an interaction history into a recommender, and the lifecycle steps
that train, evaluate and register it.

| part | module | what |
|---|---|---|
| data | `history.py` | `History`: a window's events as user x video matrices (positives, watched, negatives) and statistics |
| candidate sources | `sources/` | EASE item-to-item, two-tower + FAISS, popular, fresh: a few hundred candidates per user each |
| ranker features | `features.py` | one row per (user, candidate): every source's score and rank, video, user, affinity, feature-store columns |
| ranker | `ranker.py` | LightGBM LambdaRank over each user's candidate list |
| recommender | `recommender.py` | `MultiStageRecommender`: sources → merged lists → features → ranker → top-k; each source alone |
| training loop | `fit.py` | `fit_recommender`: label folds, L2 tuning, ranker training with early stopping, final sources |
| feature store | `store.py` | Feast's point-in-time retrieval of the `ranking_features` service for ranker rows |
| bundle | `bundle.py` | save / load one consistent directory (the MLflow artifact), sanity checks |
| lifecycle steps | `steps.py` | plan → training set → two-tower → index → ranker → evaluation → registry → gate |

The neural networks themselves are `recloop.models` (two-tower towers); the two-tower's training loop
is `recloop.training`, its ANN index `recloop.index`.
"""

from recloop.model_plane.steps import (
    COMMON,
    EVALUATION,
    FIT_REPORT,
    PLAN,
    PRIMARY,
    Evaluation,
    TrainingPlan,
    build_ann_index,
    build_training_set,
    evaluate_candidate,
    evaluation_metrics,
    fit_config,
    gate_decision,
    gate_metrics,
    load_evaluation,
    plan_window,
    register_candidate,
    train_ranking,
    train_retrieval,
    workdir_for,
)

__all__ = [
    "COMMON", "EVALUATION", "FIT_REPORT", "PLAN", "PRIMARY", "Evaluation", "TrainingPlan", "build_ann_index",
    "build_training_set", "evaluate_candidate", "evaluation_metrics", "fit_config", "gate_decision", "gate_metrics",
    "load_evaluation", "plan_window", "register_candidate", "train_ranking", "train_retrieval", "workdir_for",
]
