"""What counts as a positive engagement in recloop — the one definition training, evaluation and the
baselines share."""

from __future__ import annotations

import numpy as np
import pandas as pd

# A watch lasting at least this share of the video's duration counts as a positive engagement.
POSITIVE_MIN_FRACTION = 0.5


def bool_flag(events: pd.DataFrame, column: str) -> np.ndarray:
    """A boolean column as bool: missing column or value = False; text ("true", "1", "t", "yes") parsed."""
    if column not in events.columns:
        return np.zeros(len(events), bool)
    s = events[column]
    if s.dtype == object or pd.api.types.is_string_dtype(s):
        return s.astype(str).str.strip().str.lower().isin(["true", "1", "t", "yes"]).to_numpy()
    return s.astype("boolean").fillna(False).to_numpy(dtype=bool)


def positive_mask(events: pd.DataFrame, duration_s: pd.Series | np.ndarray) -> np.ndarray:
    """THE positive-engagement rule of recloop, one boolean per event row.

    A positive is a watch (`watched_s > 0`) that was completed, liked, or lasted at least
    `POSITIVE_MIN_FRACTION` (50%) of the video's duration. `duration_s` is aligned with `events` row by
    row (NaN when the video is unknown: such a row can still be positive through completed/liked).
    Impressions that were not watched are never positive, whatever their flags say.
    """
    watched_s = pd.to_numeric(events["watched_s"], errors="coerce").astype("float64").to_numpy()
    duration = np.asarray(duration_s, dtype=np.float64)
    if duration.shape != watched_s.shape:
        raise ValueError(f"duration_s has {duration.shape[0]} rows, events {watched_s.shape[0]}")
    with np.errstate(invalid="ignore"):
        watched = watched_s > 0
        long_enough = watched_s >= POSITIVE_MIN_FRACTION * duration
    return watched & (bool_flag(events, "completed") | bool_flag(events, "liked") | long_enough)
