"""The ranker: LightGBM's LambdaRank over each user's candidate list (`objective="lambdarank"`, one query
per user and label period), optimising NDCG@10 — the order the user sees — rather than a pointwise
probability.

Rows are candidates from the sources (hard negatives come for free: every candidate the user did not go
on to like is a negative of their list); features are `recloop.model_plane.features`. Training stops
early on a validation set of candidate lists; the per-iteration curves are kept for MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RankerConfig:
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 100
    max_rounds: int = 600
    early_stopping_rounds: int = 60
    max_bin: int = 63
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    eval_at: int = 10
    seed: int = 0
    num_threads: int = 0  # 0: LightGBM's default (all cores)


@dataclass
class Ranker:
    booster: Any  # lightgbm.Booster
    features: list[str]
    config: RankerConfig
    best_iteration: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    train_rows: int = 0
    valid_rows: int = 0
    seconds: float = 0.0

    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        train_groups: np.ndarray,
        valid: pd.DataFrame | None,
        valid_groups: np.ndarray | None,
        features: list[str],
        config: RankerConfig | None = None,
        *,
        rounds: int | None = None,
    ) -> "Ranker":
        """Train on `train` (rows grouped by query, `train_groups` = consecutive group sizes, a `label`
        column). With `valid`, stop when its NDCG@k has not improved for `early_stopping_rounds`; with
        `rounds`, train exactly that many rounds (a refit on more data after early stopping)."""
        import lightgbm as lgb

        config = config or RankerConfig()
        t0 = time.perf_counter()
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [config.eval_at],
            "learning_rate": config.learning_rate,
            "num_leaves": config.num_leaves,
            "min_data_in_leaf": config.min_child_samples,
            "feature_fraction": config.feature_fraction,
            "bagging_fraction": config.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": config.lambda_l2,
            "max_bin": config.max_bin,
            "seed": config.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": config.num_threads,
            "verbosity": -1,
        }
        dtrain = lgb.Dataset(train[features].to_numpy(np.float32), label=train["label"].to_numpy(),
                             group=train_groups, feature_name=features, free_raw_data=True)
        valid_sets, names = [dtrain], ["train"]
        if valid is not None and len(valid) and rounds is None:
            dvalid = lgb.Dataset(valid[features].to_numpy(np.float32), label=valid["label"].to_numpy(),
                                 group=valid_groups, reference=dtrain)
            valid_sets.append(dvalid)
            names.append("valid")
        record: dict[str, Any] = {}
        callbacks = [lgb.record_evaluation(record)]
        if len(valid_sets) > 1:
            callbacks.append(lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False))
        booster = lgb.train(params, dtrain, num_boost_round=rounds or config.max_rounds, valid_sets=valid_sets,
                            valid_names=names, callbacks=callbacks)
        best = int(booster.best_iteration or booster.current_iteration())
        metric = f"ndcg@{config.eval_at}"
        curves = {f"{name}_{metric}": [float(x) for x in record.get(name, {}).get(metric, [])] for name in names}
        return cls(booster, list(features), config, best, curves, len(train), len(valid) if valid is not None else 0,
                   time.perf_counter() - t0)

    def score(self, x: pd.DataFrame | np.ndarray) -> np.ndarray:
        values = x[self.features].to_numpy(np.float32) if isinstance(x, pd.DataFrame) else np.asarray(x, np.float32)
        if not len(values):
            return np.zeros(0)
        return self.booster.predict(values, num_iteration=self.best_iteration, num_threads=1 if len(values) < 5000 else 0)

    def importance(self) -> dict[str, float]:
        """Total gain of each feature, largest first."""
        gain = self.booster.feature_importance(importance_type="gain", iteration=self.best_iteration)
        return dict(sorted(((f, round(float(g), 3)) for f, g in zip(self.features, gain)), key=lambda kv: -kv[1]))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / "model.txt"), num_iteration=self.best_iteration)
        (directory / "ranker.json").write_text(json.dumps({
            "features": self.features, "config": asdict(self.config), "best_iteration": self.best_iteration,
            "curves": self.curves, "train_rows": self.train_rows, "valid_rows": self.valid_rows,
            "seconds": self.seconds,
        }, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Ranker":
        import lightgbm as lgb

        meta = json.loads((directory / "ranker.json").read_text())
        booster = lgb.Booster(model_file=str(directory / "model.txt"))
        return cls(booster, list(meta["features"]), RankerConfig(**meta["config"]), int(booster.current_iteration()),
                   meta.get("curves", {}), meta.get("train_rows", 0), meta.get("valid_rows", 0), meta.get("seconds", 0.0))
