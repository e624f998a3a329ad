"""Business rules applied after the model: what may be shown, diversity caps and a freshness boost.

Pure functions over the candidate arrays of one request, so the rules are tested on their own:

* `eligible`: never a video the user already watched, never a blocked video or a video with a blocked
  tag (the safety list). Applied before ranking (no point scoring what cannot be shown) and it is the
  only gate: nothing added later bypasses it.
* `freshness_boost`: `weight * exp(-age_days / half_life_days)` added to the ranking score, so new
  uploads (few interactions, weak features) get exposure; the model's own score stays the main term.
* `diversify`: walks the candidates best first and skips a video once its creator or category has
  reached its cap; a response may be shorter than k rather than break a cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from recloop.serving.safety import SafetyRules

US_PER_DAY = 86_400 * 1_000_000


def blocked_mask(video_ids: Sequence[str], tags: Sequence[frozenset[str]], rules: SafetyRules) -> np.ndarray:
    """For a catalog: True where the safety list blocks the video (by id or by one of its tags)."""
    return np.fromiter((rules.blocks(v, t) for v, t in zip(video_ids, tags)), dtype=bool, count=len(video_ids))


def eligible(video_ids: Iterable[str], watched: set[str] | frozenset[str], blocked: np.ndarray) -> np.ndarray:
    """True for candidates that may be shown: not watched by the user, not blocked (`blocked` aligned)."""
    ids = list(video_ids)
    seen = np.fromiter((v in watched for v in ids), dtype=bool, count=len(ids))
    return ~(seen | blocked)


def freshness_boost(upload_us: np.ndarray, now_us: float, weight: float, half_life_days: float) -> np.ndarray:
    """The score bonus of each candidate by its age at `now_us` (0 for an unknown upload time)."""
    if not weight:
        return np.zeros(len(upload_us))
    age = np.maximum(now_us - np.asarray(upload_us, dtype=np.float64), 0.0) / US_PER_DAY
    boost = weight * np.exp(-age / half_life_days)
    return np.nan_to_num(boost, nan=0.0)


def diversify(
    order: np.ndarray,
    creators: Sequence[str],
    categories: Sequence[str],
    k: int,
    max_per_creator: int,
    max_per_category: int,
) -> list[int]:
    """Positions from `order` (best first), at most k, none pushing a creator or category over its cap.

    Unknown creators (`unknown`, empty) are not capped together: they are many different people.
    """
    picked: list[int] = []
    per_creator: dict[str, int] = {}
    per_category: dict[str, int] = {}
    for i in order:
        creator, category = creators[i], categories[i]
        capped_creator = creator not in ("", "unknown") and creator is not None
        if capped_creator and per_creator.get(creator, 0) >= max_per_creator:
            continue
        if per_category.get(category, 0) >= max_per_category:
            continue
        picked.append(int(i))
        if capped_creator:
            per_creator[creator] = per_creator.get(creator, 0) + 1
        per_category[category] = per_category.get(category, 0) + 1
        if len(picked) == k:
            break
    return picked
