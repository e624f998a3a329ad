"""Popular videos per user segment: the cold-start candidates and the fallback answer.

A segment is what is known about a user before any watch: country and age bucket (from the request's
context, or the user's sign-up row). Lists are kept at three levels, most specific first,
`(country, age_bucket)` → `(country,)` → everyone; a segment's list is its own top videos topped up from
the coarser levels, so a small segment still gets a full list.

Built from the lake (positives of the last `days` validated days, recloop's one positive rule), not from
the model: the fallback must work when no model can be loaded at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

SEGMENT_LEVELS: tuple[tuple[str, ...], ...] = (("country", "age_bucket"), ("country",), ())
SEGMENT_FIELDS = ("country", "age_bucket")
_MAX_CACHED_SEGMENTS = 10_000


@dataclass(frozen=True, eq=False)
class Popularity:
    """Top videos per segment key at each level, with their positive counts."""

    lists: dict[tuple[str, ...], dict[tuple[str, ...], tuple[tuple[str, int], ...]]]
    user_segments: dict[str, dict[str, str]] = field(default_factory=dict)
    # (category, creator_id, tags) of every listed video: the fallback applies the business rules
    # without a model.
    video_meta: dict[str, tuple[str, str, frozenset[str]]] = field(default_factory=dict)
    n: int = 200
    _merged: dict[tuple[str, ...], tuple[tuple[str, int], ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, events: pd.DataFrame, users: pd.DataFrame, videos: pd.DataFrame, n: int = 200) -> "Popularity":
        """From events (`user_id, video_id, positive`, as `lakeview.recent_events`), users (USERS) and
        videos (VIDEOS) tables."""
        attrs = users.set_index("user_id")[list(SEGMENT_FIELDS)].astype(object).fillna("unknown")
        pos = events.loc[events["positive"], ["user_id", "video_id"]]
        pos = pos.join(attrs, on="user_id").fillna({f: "unknown" for f in SEGMENT_FIELDS})
        lists: dict[tuple[str, ...], dict[tuple[str, ...], tuple[tuple[str, int], ...]]] = {}
        for level in SEGMENT_LEVELS:
            counts = pos.groupby([*level, "video_id"]).size().rename("count").reset_index()
            counts = counts.sort_values([*level, "count", "video_id"], ascending=[*([True] * len(level)), False, True])
            top = counts.groupby(list(level)).head(n) if level else counts.head(n)
            groups = top.groupby(list(level), sort=False) if level else [((), top)]
            lists[level] = {
                (key if isinstance(key, tuple) else (key,)) if level else (): tuple(
                    zip(g["video_id"].tolist(), g["count"].astype(int).tolist())
                )
                for key, g in groups
            }
        segments = attrs.to_dict(orient="index") if len(attrs) else {}
        listed = {v for level in lists.values() for top in level.values() for v, _ in top}
        vids = videos[videos["video_id"].isin(listed)].drop_duplicates("video_id", keep="last")
        meta = {
            v: (str(c or "unknown"), str(cr or "unknown"), frozenset(t for t in str(tags or "").split("|") if t))
            for v, c, cr, tags in zip(vids["video_id"], vids["category"], vids["creator_id"], vids["tags"])
        }
        return cls(lists, segments, meta, n)

    def segment_of(self, user_id: str, context: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The user's segment: the request's context where given, else the user's sign-up row."""
        known = self.user_segments.get(user_id, {})
        ctx = context or {}
        return {f: str(ctx.get(f) or known.get(f) or "unknown") for f in SEGMENT_FIELDS}

    def top(self, segment: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
        """Up to `n` (video_id, positives) for the segment, most specific level first, no duplicates."""
        values = tuple(segment.get(f, "unknown") for f in SEGMENT_FIELDS)
        merged = self._merged.get(values)
        if merged is None:
            merged = self._merge(values)
            # Context values come from clients: bound the cache (a benign race may compute a list twice).
            if len(self._merged) < _MAX_CACHED_SEGMENTS:
                self._merged[values] = merged
        return merged

    def _merge(self, values: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
        seen: set[str] = set()
        out: list[tuple[str, int]] = []
        for level in SEGMENT_LEVELS:
            key = tuple(values[SEGMENT_FIELDS.index(f)] for f in level)
            for video, count in self.lists.get(level, {}).get(key, ()):
                if video not in seen and len(out) < self.n:
                    seen.add(video)
                    out.append((video, count))
        return tuple(out)
