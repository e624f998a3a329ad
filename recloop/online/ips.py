"""Off-policy estimates of a target policy's CTR from logged impressions (inverse propensity scoring).

Serving logs, for every impression, the probability with which the logging policy put that item in that
slot (`propensity`, docs/data_schema.md): `1 - epsilon` for a slot that was not explored, `epsilon /
|pool|` for an explored slot (the item drawn uniformly from the exploration pool). Given the probability
`target` that another policy would have put the same item in the same slot (1 or 0 for a deterministic
ranking), the CTR that policy would have had is estimated without serving it:

* IPS (Horvitz-Thompson): mean over impressions of w * r, w = target / propensity, r = watched (0/1).
  Unbiased when every item the target policy would place has a positive logging propensity.
* clipped IPS: w capped at `clip` (bias towards lower values, much lower variance when propensities are
  small).
* self-normalised IPS (SNIPS): sum(w r) / sum(w). Slightly biased, scale-free, and usually the one to
  read when exploration is rare.

Standard errors treat a request as the unit (impressions of one request share their user and moment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recloop.online.metrics import Estimate, normalise, ratio_estimate


@dataclass(frozen=True)
class IpsEstimate:
    """The estimate, its standard error, and how much of the log supports it."""

    estimator: str  # ips | clipped_ips | snips
    estimate: Estimate
    impressions: int
    matched: int  # impressions the target policy gives a positive probability
    effective_sample_size: float  # (sum w)^2 / sum w^2

    @property
    def value(self) -> float:
        return self.estimate.value

    def to_dict(self) -> dict[str, float | int | str]:
        return {"estimator": self.estimator, **self.estimate.to_dict(), "impressions": self.impressions,
                "matched": self.matched, "effective_sample_size": self.effective_sample_size}


def _weights(logged: pd.DataFrame, target: pd.Series | np.ndarray | float, clip: float | None) -> np.ndarray:
    propensity = pd.to_numeric(logged["propensity"], errors="coerce").to_numpy(dtype="float64")
    if np.any(~np.isfinite(propensity)) or np.any(propensity <= 0) or np.any(propensity > 1):
        raise ValueError("every logged impression needs a propensity in (0, 1] for inverse propensity scoring")
    t = np.broadcast_to(np.asarray(target, dtype="float64"), propensity.shape)
    if np.any(t < 0) or np.any(t > 1) or np.any(~np.isfinite(t)):
        raise ValueError("target probabilities must be between 0 and 1")
    w = t / propensity
    return np.minimum(w, clip) if clip is not None else w


def ips(logged: pd.DataFrame, target: pd.Series | np.ndarray | float, *, clip: float | None = None,
        self_normalised: bool = False, reward: str = "watched") -> IpsEstimate:
    """The target policy's CTR (mean `reward` per impression) from `logged` impressions.

    Args:
        logged: impressions with `propensity`, `request_id` and the outcome (`watched_s` or `watched`).
        target: per impression, the probability that the target policy places this item in this slot.
        clip: cap on the importance weight (clipped IPS); None: no cap.
        self_normalised: SNIPS, sum(w r) / sum(w), instead of sum(w r) / n.
        reward: the outcome column (`watched`: watched_s > 0).
    """
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be positive, got {clip!r}")
    frame = normalise(logged) if reward == "watched" else logged
    w = _weights(frame, target, clip)
    r = pd.to_numeric(frame[reward], errors="coerce").fillna(0.0).to_numpy(dtype="float64")
    units = frame["request_id"].to_numpy() if "request_id" in frame else np.arange(len(frame))
    per = pd.DataFrame({"unit": units, "wr": w * r, "w": w, "n": 1.0}).groupby("unit", sort=False).sum()
    name = "snips" if self_normalised else ("clipped_ips" if clip is not None else "ips")
    if self_normalised:
        estimate = ratio_estimate(per["wr"].to_numpy(), per["w"].to_numpy())
    else:
        estimate = ratio_estimate(per["wr"].to_numpy(), per["n"].to_numpy())
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w**2).sum() > 0 else 0.0
    if not math.isfinite(estimate.value):
        estimate = Estimate(math.nan, math.nan, estimate.units)
    return IpsEstimate(name, estimate, int(len(frame)), int((w > 0).sum()), ess)


def snips(logged: pd.DataFrame, target: pd.Series | np.ndarray | float, *, clip: float | None = None,
          reward: str = "watched") -> IpsEstimate:
    """Self-normalised IPS (`ips(..., self_normalised=True)`)."""
    return ips(logged, target, clip=clip, self_normalised=True, reward=reward)


def logged_ctr(logged: pd.DataFrame) -> float:
    """The logging policy's own CTR (watched impressions / impressions), for comparison."""
    frame = normalise(logged)
    return float(frame["watched"].mean()) if len(frame) else math.nan
