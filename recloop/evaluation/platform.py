"""recloop's own recommender in the evaluation harness: the multi-stage model (candidate sources +
LambdaRank ranker) fitted by `recloop.model_plane.fit.fit_recommender` — the function the training
job calls — on the tables of the user's files, so `recloop evaluate` scores exactly what training
registers, beside the baselines and on the same split."""

from __future__ import annotations

from typing import Any

import pandas as pd

PLATFORM = "recloop"


def file_fit_config(split: str, *, two_tower: bool = True) -> Any:
    """The fit configuration for files: random splits cut K random folds and take a user's features at
    the median time of their own events; time splits cut folds by period, features at the cutoff."""
    from recloop.model_plane.fit import FitConfig
    from recloop.model_plane.recommender import CandidateConfig
    from recloop.training import TwoTowerConfig

    tt = TwoTowerConfig() if two_tower else None
    if split == "random":
        return FitConfig(split="random", folds=5, two_tower=tt, candidates=CandidateConfig(user_time="median"))
    return FitConfig(split="time", two_tower=tt, candidates=CandidateConfig(user_time="cutoff"))


def platform_factory(config: Any = None, *, two_tower: bool = True):
    """A factory (`recloop.evaluation.RecommenderFactory`) fitting the platform's recommender on the
    train file's tables (`data=`: `recloop.evaluation.files.FileSplit`), tuned and early-stopped on the
    validation positives (`valid=`; without them, on a part carved from train)."""

    def factory(train: pd.DataFrame, videos: pd.DataFrame, valid: pd.DataFrame | None = None, data: Any = None) -> Any:
        from recloop.model_plane.fit import Labels, fit_recommender
        from recloop.model_plane.history import History
        from recloop.training import Window

        if data is None:
            raise ValueError("the platform's recommender trains on the files' full tables: evaluate_files passes them")
        window = Window.from_tables(data.train.events, data.videos, data.users)
        history = History.from_window(window)
        cfg = config or file_fit_config(data.split, two_tower=two_tower)
        labels = Labels.from_pairs(history, valid["user_id"], valid["video_id"]) if valid is not None else None
        result = fit_recommender(history, valid=labels, config=cfg)
        recommender = result.recommender
        recommender.report = result.report
        return recommender

    factory.__name__ = "platform_factory"
    return factory
