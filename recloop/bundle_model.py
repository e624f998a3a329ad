"""The recloop model bundle as an MLflow pyfunc model, logged as *code* ("models from code").

MLflow copies this file into the logged model and executes it when the model is loaded; nothing is
pickled. The candidate sources (EASE, the two-tower and its FAISS index, popular and fresh lists), the
interaction history they read and the LambdaRank ranker travel as one artifact directory
(`artifacts["bundle"]`, written by `recloop.model_plane.bundle.save_bundle`) and are loaded together by
`recloop.model_plane.bundle.load_bundle`, so one registered version is always a consistent whole.

Every file of the bundle is checked against the sha256 it was saved with before the bundle is loaded
(`recloop.model_plane.bundle.verify_bundle`): a damaged artifact is a `CorruptModelError` naming the file.

Input: a DataFrame with a `user_id` column and an optional integer `k` column (default 10).
Output: a DataFrame with `user_id`, `rank` (1 = best) and `video_id`, one row per recommendation.

`RECLOOP_BUNDLE_LOADER` names the loader (`package.module:function` or `/path/to/file.py:function`,
default `recloop.model_plane.bundle:load_bundle`); tests point it at a fake loader. This file is executed as a
standalone module by MLflow, so it uses absolute imports only and imports the model plane lazily.
"""

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

LOADER_ENV = "RECLOOP_BUNDLE_LOADER"
DEFAULT_LOADER = "recloop.model_plane.bundle:load_bundle"
DEFAULT_K = 10
OUTPUT_COLUMNS = ["user_id", "rank", "video_id"]


def resolve_loader(spec: str | None = None) -> Callable[[str], Any]:
    """The bundle loader named by `spec` (or `RECLOOP_BUNDLE_LOADER`, or the model plane's `load_bundle`)."""
    spec = spec or os.environ.get(LOADER_ENV) or DEFAULT_LOADER
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"{LOADER_ENV} must look like 'module:function' or '/path/file.py:function', got {spec!r}"
        )
    if target.endswith(".py"):
        name = f"recloop_bundle_loader_{abs(hash(target))}"
        module = sys.modules.get(name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(name, target)
            if file_spec is None or file_spec.loader is None:
                raise ImportError(f"cannot load bundle loader file {target}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            sys.modules[name] = module
    else:
        module = importlib.import_module(target)
    return getattr(module, attr)


class BundleModel(PythonModel):
    """Serves a `recloop.recommender.Recommender` loaded from the bundle directory artifact."""

    def __init__(self) -> None:
        self.recommender: Any = None

    def load_context(self, context: PythonModelContext) -> None:
        bundle_dir = context.artifacts["bundle"]
        if (os.environ.get(LOADER_ENV) or DEFAULT_LOADER) != DEFAULT_LOADER:
            # The default loader verifies the checksums itself; another one gets verified files too.
            from recloop.model_plane.bundle import verify_bundle

            verify_bundle(bundle_dir)
        self.recommender = resolve_loader()(bundle_dir)

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if self.recommender is None:
            raise RuntimeError("BundleModel.predict called before load_context loaded the bundle")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError(f"model input needs a 'user_id' column, got {list(frame.columns)}")
        user_ids = [str(u) for u in frame["user_id"].tolist()]
        if "k" in frame.columns:
            ks = [DEFAULT_K if pd.isna(k) else int(k) for k in frame["k"].tolist()]
        else:
            ks = [DEFAULT_K] * len(user_ids)
        # One recommend() call per distinct k; rows keep the order of the input.
        lists: list[list[str]] = [[] for _ in user_ids]
        for k in sorted(set(ks)):
            positions = [i for i, row_k in enumerate(ks) if row_k == k]
            results = self.recommender.recommend([user_ids[i] for i in positions], k)
            for i, items in zip(positions, results, strict=True):
                lists[i] = list(items)
        rows = [
            (user_id, rank, str(video_id))
            for user_id, items in zip(user_ids, lists, strict=True)
            for rank, video_id in enumerate(items, start=1)
        ]
        out = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        return out.astype({"user_id": "object", "rank": "int64", "video_id": "object"})


mlflow.models.set_model(BundleModel())
