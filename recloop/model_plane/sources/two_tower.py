"""Two-tower candidates: the user tower's vector searched in a FAISS index of the video tower's vectors.

The model itself (towers, in-batch softmax with log-Q correction, id dropout so that new videos get a
vector from their metadata) is `recloop.models.two_tower`, trained by `recloop.training.train_two_tower`;
the index is `recloop.index.AnnIndex` (HNSW). This source adds what the multi-stage recommender needs:
the catalog row of every index entry, user vectors as of the history's cutoff, the ANN top-n and the
score `u . v` of any (user, video) pair (a feature of the ranker for every candidate, whichever source
proposed it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from recloop.index import AnnIndex
from recloop.model_plane.history import History

NAME = "two_tower"
SCORES = ("tt_score",)


@dataclass
class TwoTowerSource:
    model: Any  # recloop.training.TwoTowerResult
    index: AnnIndex
    item_rows: np.ndarray  # catalog row of each index entry (-1: a video the history does not know)
    n_candidates: int = 100
    fit_seconds: float = 0.0
    name: str = NAME

    @classmethod
    def fit(cls, history: History, config: Any = None, *, n_candidates: int = 100, index_kind: str = "hnsw") -> "TwoTowerSource":
        from recloop.training import TwoTowerConfig, train_two_tower

        t0 = time.perf_counter()
        model = train_two_tower(history.to_window(), config or TwoTowerConfig())
        source = cls.from_model(model, history, n_candidates=n_candidates, index_kind=index_kind)
        source.fit_seconds = time.perf_counter() - t0
        return source

    @classmethod
    def from_model(cls, model: Any, history: History, *, n_candidates: int = 100, index_kind: str = "hnsw",
                   index: AnnIndex | None = None) -> "TwoTowerSource":
        """The source of a trained two-tower over the videos it knows (its catalog at the cutoff)."""
        from recloop.training import video_embeddings

        if index is None:
            ids, vectors = video_embeddings(model, model.videos, model.cutoff)
            index = AnnIndex.build(ids, vectors, kind=index_kind)
        rows = history.items.get_indexer(np.asarray(index.ids, dtype=object))
        return cls(model, index, rows.astype(np.int64), n_candidates)

    def user_vectors(self, user_ids: Sequence[str], as_of: Any = None) -> np.ndarray:
        from recloop.training import user_embeddings

        return user_embeddings(self.model, list(user_ids), as_of)

    def item_vectors(self, n_items: int) -> np.ndarray:
        """[n_items, d] vectors by catalog row (zero for videos outside the index)."""
        out = np.zeros((n_items, self.index.dim), np.float32)
        ok = self.item_rows >= 0
        out[self.item_rows[ok]] = self.index.vectors[ok]
        return out

    def top(self, user_vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """([users, n'] catalog rows, -1 for none; scores) of the ANN top-n."""
        labels, scores = self.index.search_labels(user_vectors, min(n, len(self.index)))
        rows = np.where(labels >= 0, self.item_rows[np.maximum(labels, 0)], -1)
        return rows, scores

    def save(self, directory: Path) -> None:
        from recloop.training import save_two_tower

        save_two_tower(self.model, directory / "model")
        self.index.save(directory / "index")

    @classmethod
    def load(cls, directory: Path, history: History, n_candidates: int = 100) -> "TwoTowerSource":
        from recloop.training import load_two_tower

        model = load_two_tower(directory / "model")
        return cls.from_model(model, history, n_candidates=n_candidates, index=AnnIndex.load(directory / "index"))
