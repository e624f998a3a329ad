"""The one interface every recommender in recloop offers, so that evaluation, the promotion gate and
serving treat the popularity baseline, the CF baseline and the two-tower + ranker pipeline alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Recommender(Protocol):
    """Top-k video ids per user. `exclude` maps a user to videos never to return (already seen)."""

    name: str

    def recommend(
        self,
        user_ids: Sequence[str],
        k: int,
        *,
        exclude: Mapping[str, set[str]] | None = None,
    ) -> list[list[str]]:
        """One list of at most k distinct video ids per user, best first, none of them excluded."""
        ...
