"""The online decision rule: a sequential test that may be looked at every day, and a horizon.

The statistic is the challenger's effect on the primary metric: A/B, the difference challenger -
champion of watch time per impression (default) or CTR, with the cluster-robust standard error of
`recloop.online.metrics`; interleaving, the challenger's win share among decided requests minus 0.5.
Each look (one per day of data since the experiment started, on everything seen so far) turns the
estimate `d` and its variance `V` into the mixture likelihood ratio of a mixture SPRT (Robbins 1970;
Johari, Pekelis, Walsh, "Always valid inference", 2017/2022) with a N(0, tau^2) mixture over the effect:

    L = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

and the always-valid p-value is the running minimum of 1/L over the looks (capped at 1). Under "no
effect", L is a non-negative martingale with mean 1, so by Ville's inequality P(ever 1/L <= alpha) <=
alpha, however many looks and whenever they happen: a daily rerun, a skipped day or a rerun of the same
day does not inflate the error. (Exact for Gaussian estimates with known variance; with the CLT and a
plug-in variance it is asymptotic, which is why a minimum sample per arm is required before any look
counts.)

Outcomes, at the latest look:

* fewer than the minimum samples: `continue` (or `stop_no_difference` once the horizon has passed);
* p <= alpha and d > 0: `promote` -- unless a guardrail metric (A/B: CTR when the primary metric is watch
  time, and the reverse) is itself significantly worse by the same test: then `stop_worse`;
* p <= alpha and d < 0: `stop_worse`;
* otherwise, `max_days` calendar days after the start: `stop_no_difference`; before: `continue`.

Guarantee: a challenger that is not better (effect <= 0) is promoted with probability at most alpha
(default 0.05) over the whole experiment, whatever the number of looks. tau sets where the test is most
powerful: by default 5 % of the champion's level of the metric (A/B) or 0.05 of win share (interleaving).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from recloop.online import metrics as m

CONTINUE = "continue"
PROMOTE = "promote"
STOP_WORSE = "stop_worse"
STOP_NO_DIFFERENCE = "stop_no_difference"
OUTCOMES = (PROMOTE, STOP_WORSE, STOP_NO_DIFFERENCE, CONTINUE)

# Settings an operator tunes without a code change (read by `DecisionConfig.from_env`).
ENV = {
    "primary_metric": "RECLOOP_ONLINE_PRIMARY_METRIC",
    "alpha": "RECLOOP_ONLINE_ALPHA",
    "max_days": "RECLOOP_ONLINE_MAX_DAYS",
    "min_users_per_arm": "RECLOOP_ONLINE_MIN_USERS_PER_ARM",
    "min_impressions_per_arm": "RECLOOP_ONLINE_MIN_IMPRESSIONS_PER_ARM",
    "min_decided_requests": "RECLOOP_ONLINE_MIN_DECIDED_REQUESTS",
}


@dataclass(frozen=True)
class DecisionConfig:
    """The rule's parameters; defaults documented in docs/online.md."""

    primary_metric: str = "watch_time"  # watch_time | ctr (A/B); interleaving always uses the win share
    guardrail_metric: str | None = None  # default: the other of watch_time / ctr
    alpha: float = 0.05
    tau_relative: float = 0.05  # A/B mixture scale, as a share of the champion's level of the metric
    tau_share: float = 0.05  # interleaving mixture scale on the win share
    max_days: int = 14  # the horizon: calendar days from the start (inclusive)
    min_users_per_arm: int = 100
    min_impressions_per_arm: int = 1000
    min_decided_requests: int = 300  # interleaving
    # Interleaving credit: the team whose items got more watch time ("watch_time", the primary goal) or more
    # watches ("watches"): docs/online.md.
    interleaving_credit: str = "watch_time"
    unit: str = "user_id"

    def __post_init__(self) -> None:
        if self.primary_metric not in ("watch_time", "ctr"):
            raise ValueError(f"the online primary metric must be watch_time or ctr, got {self.primary_metric!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha!r}")
        if self.max_days < 1:
            raise ValueError(f"max_days must be at least 1, got {self.max_days!r}")

    @property
    def guardrail(self) -> str:
        return self.guardrail_metric or ("ctr" if self.primary_metric == "watch_time" else "watch_time")

    @classmethod
    def from_env(cls, **overrides: Any) -> DecisionConfig:
        """Defaults, the environment variables of `ENV` over them, `overrides` over those."""
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = os.environ.get(var)
            if raw in (None, ""):
                continue
            kind = type(getattr(cls(), name))
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"{var}: {raw!r} is not a valid {kind.__name__}") from None
        return replace(cls(), **{**values, **{k: v for k, v in overrides.items() if v is not None}})


def mixture_likelihood_ratio(estimate: float, variance: float, tau: float) -> float:
    """The normal-mixture SPRT statistic of H0: effect = 0 for an estimate with `variance` (see the
    module docstring); 1.0 when undefined (no information)."""
    if not (math.isfinite(estimate) and math.isfinite(variance) and variance > 0 and tau > 0):
        return 1.0
    total = variance + tau * tau
    exponent = tau * tau * estimate * estimate / (2.0 * variance * total)
    return math.exp(min(exponent, 700.0)) * math.sqrt(variance / total)


@dataclass(frozen=True)
class Look:
    """One daily look: data up to `day`, the estimate, its standard error and the always-valid p-value."""

    day: str
    effect: float
    se: float
    likelihood_ratio: float
    p_value: float
    enough: bool

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, "effect": self.effect, "se": self.se, "likelihood_ratio": self.likelihood_ratio,
                "p_value": self.p_value, "enough": self.enough}


@dataclass
class OnlineDecision:
    """The decision at `as_of`, with the figures it looked at."""

    outcome: str
    reasons: list[str]
    mode: str  # ab | interleave
    metric: str  # watch_time | ctr | win_share
    effect: m.Estimate
    p_value: float
    as_of: str
    days_elapsed: int
    looks: list[Look] = field(default_factory=list)
    arms: dict[str, m.ArmMetrics] = field(default_factory=dict)
    interleaving: m.InterleavingResult | None = None

    @property
    def promote(self) -> bool:
        return self.outcome == PROMOTE

    @property
    def final(self) -> bool:
        return self.outcome != CONTINUE

    def metrics(self) -> dict[str, float]:
        """Flat figures: `challenger.watch_time`, `champion.ctr_low`, `effect`, `p_value`, ..."""
        out: dict[str, float] = {"effect": self.effect.value, "effect_se": self.effect.se,
                                 "effect_low": self.effect.low, "effect_high": self.effect.high,
                                 "p_value": self.p_value, "days_elapsed": float(self.days_elapsed)}
        for arm, metrics in self.arms.items():
            for key, value in metrics.row().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{arm}.{key}"] = float(value)
        if self.interleaving is not None:
            r = self.interleaving
            out.update({"interleaving.requests": float(r.requests), "interleaving.ties": float(r.ties),
                        "interleaving.challenger_wins": float(r.challenger_wins),
                        "interleaving.champion_wins": float(r.champion_wins),
                        "interleaving.win_share": r.share.value, "interleaving.win_share_low": r.share.low,
                        "interleaving.win_share_high": r.share.high})
        return out

    def table(self) -> list[dict[str, Any]]:
        """The per-arm table (one row per arm)."""
        return [a.row() for a in self.arms.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reasons": list(self.reasons), "mode": self.mode, "metric": self.metric,
                "effect": self.effect.to_dict(), "p_value": self.p_value, "as_of": self.as_of,
                "days_elapsed": self.days_elapsed, "looks": [x.to_dict() for x in self.looks],
                "arms": self.table(),
                "interleaving": self.interleaving.to_dict() if self.interleaving else None}


def _ab_look(frame: pd.DataFrame, metric: str, config: DecisionConfig, catalog_size: int | None
             ) -> tuple[m.Estimate, float, bool, dict[str, m.ArmMetrics]]:
    arms = m.ab_metrics(frame, catalog_size=catalog_size, unit=config.unit)
    diff = m.ab_difference(arms, metric)
    level = arms[m.CHAMPION_ARM].metric(metric).value
    tau = config.tau_relative * abs(level) if math.isfinite(level) and level else math.nan
    enough = all(a.users >= config.min_users_per_arm and a.impressions >= config.min_impressions_per_arm
                 for a in arms.values())
    return diff, tau, enough, arms


def _interleave_look(frame: pd.DataFrame, config: DecisionConfig) -> tuple[m.Estimate, float, bool, m.InterleavingResult]:
    result = m.interleaving_result(frame, config.interleaving_credit)
    s = result.share
    effect = m.Estimate(s.value - 0.5, s.se, s.units)
    return effect, config.tau_share, result.challenger_wins + result.champion_wins >= config.min_decided_requests, result


_NUMERATOR = {"ctr": "watched", "watch_time": "watched_s", "completion_rate": "completed"}


def sequential_looks(frame: pd.DataFrame, days: Sequence[str], *, mode: str, metric: str, config: DecisionConfig,
                     catalog_size: int | None = None) -> list[Look]:
    """One look per day of `days` on the rows up to it; the p-value is always-valid (running minimum of
    1/L over the looks that had enough data). The rows are aggregated once per (arm, unit, day) (A/B) or
    credited once per request (interleaving), so a look costs a pass over units, not impressions."""
    looks, p = [], 1.0
    if mode == "interleave":
        credit = m.interleaving_credit(frame, config.interleaving_credit)
        first_day = frame.groupby("request_id")["day"].min()
        credit["day"] = credit["request_id"].map(first_day)
        credit = credit[credit["credit"] != "tie"]
    else:
        rows = m.normalise(frame)
        rows = rows[rows["arm"].isin(m.ARMS)]
        agg = rows.groupby(["arm", config.unit, "day"], sort=False).agg(
            n=("watched", "size"), y=(_NUMERATOR[metric], "sum")).reset_index()
    for day in sorted(days):
        if mode == "interleave":
            decided = credit[credit["day"] <= day]
            per_user = decided.assign(win=(decided["credit"] == m.CHALLENGER_ARM).astype("float64")).groupby(
                "user_id").agg(n=("win", "size"), wins=("win", "sum"))
            share = m.ratio_estimate(per_user["wins"].to_numpy(), per_user["n"].to_numpy())
            effect, tau = m.Estimate(share.value - 0.5, share.se, share.units), config.tau_share
            enough = len(decided) >= config.min_decided_requests
        else:
            upto = agg[agg["day"] <= day]
            per_unit = upto.groupby(["arm", config.unit], sort=False)[["n", "y"]].sum().reset_index()
            est, enough = {}, True
            for arm in m.ARMS:
                part = per_unit[per_unit["arm"] == arm]
                est[arm] = m.ratio_estimate(part["y"].to_numpy(dtype="float64"), part["n"].to_numpy(dtype="float64"))
                enough &= len(part) >= config.min_users_per_arm and float(part["n"].sum()) >= config.min_impressions_per_arm
            effect = m.difference(est[m.CHALLENGER_ARM], est[m.CHAMPION_ARM])
            level = est[m.CHAMPION_ARM].value
            tau = config.tau_relative * abs(level) if math.isfinite(level) and level else math.nan
        lr = mixture_likelihood_ratio(effect.value, effect.se**2, tau)
        if enough:
            p = min(p, 1.0 / lr if lr > 0 else 1.0)
        looks.append(Look(day, effect.value, effect.se, lr, min(p, 1.0), bool(enough)))
    return looks


def decide_online(
    frame: pd.DataFrame,
    *,
    started: str,
    as_of: str,
    config: DecisionConfig | None = None,
    mode: str | None = None,
    catalog_size: int | None = None,
) -> OnlineDecision:
    """The decision for an experiment started on day `started`, looked at on `as_of`, from its impression
    outcomes `frame` (`recloop.online.metrics.read_outcomes`, rows of this experiment only, with `day`).
    `mode` None: detected from the data (`detect_mode`). Pure: no lake, no registry."""
    from datetime import date

    config = config or DecisionConfig()
    frame = frame[(frame["day"] >= started) & (frame["day"] <= as_of)] if len(frame) else frame
    mode = mode or m.detect_mode(frame)
    if mode not in ("ab", "interleave"):
        raise ValueError(f"experiment mode must be ab or interleave, got {mode!r}")
    metric = "win_share" if mode == "interleave" else config.primary_metric
    elapsed = (date.fromisoformat(as_of) - date.fromisoformat(started)).days + 1
    days = sorted(set(frame["day"])) if len(frame) else []
    looks = sequential_looks(frame, days, mode=mode, metric=metric, config=config, catalog_size=catalog_size)
    arms: dict[str, m.ArmMetrics] = {}
    interleaving = None
    if mode == "interleave":
        effect, _, enough, interleaving = _interleave_look(frame, config)
        arms = m.ab_metrics(frame, catalog_size=catalog_size, unit=config.unit)  # descriptive only
    else:
        effect, _, enough, arms = _ab_look(frame, metric, config, catalog_size)
    p = looks[-1].p_value if looks else 1.0
    horizon = elapsed >= config.max_days
    what = ("challenger win share - 0.5" if mode == "interleave" else f"challenger - champion {m.METRIC_TEXT[metric]}")
    figures = (f"{what} = {effect.value:+.4g} (95% CI {effect.low:+.4g}..{effect.high:+.4g}), always-valid "
               f"p = {p:.4g} (alpha {config.alpha}), day {elapsed} of {config.max_days}")
    reasons: list[str] = []
    crossed = next((x for x in looks if x.enough and x.p_value <= config.alpha), None)
    if not enough and not crossed:
        need = (f"{config.min_decided_requests} decided requests" if mode == "interleave" else
                f"{config.min_users_per_arm} users and {config.min_impressions_per_arm} impressions per arm")
        outcome = STOP_NO_DIFFERENCE if horizon else CONTINUE
        reasons.append(f"{'STOP' if horizon else 'CONTINUE'}: too little traffic yet (needs {need})"
                       + (": the horizon passed without enough data" if horizon else "") + f"; {figures}")
    elif crossed is not None and crossed.effect > 0:
        outcome = PROMOTE
        reasons.append(f"PROMOTE: the challenger is better ({figures}); significant since {crossed.day}")
        if mode == "ab":
            guard = m.ab_difference(arms, config.guardrail)
            guard_looks = sequential_looks(frame, days, mode=mode, metric=config.guardrail, config=config,
                                           catalog_size=catalog_size)
            guard_p = guard_looks[-1].p_value if guard_looks else 1.0
            if guard_p <= config.alpha and guard.value < 0:
                outcome = STOP_WORSE
                reasons[0] = (f"STOP_WORSE: better on {metric} but significantly worse on the guardrail "
                              f"{config.guardrail} ({guard.value:+.4g}, p = {guard_p:.4g}); {figures}")
            else:
                reasons.append(f"guardrail {config.guardrail}: {guard.value:+.4g} "
                               f"(95% CI {guard.low:+.4g}..{guard.high:+.4g}), p = {guard_p:.4g}: not worse")
    elif crossed is not None:
        outcome = STOP_WORSE
        reasons.append(f"STOP_WORSE: the challenger is worse ({figures}); significant since {crossed.day}")
    elif horizon:
        outcome = STOP_NO_DIFFERENCE
        reasons.append(f"STOP_NO_DIFFERENCE: no significant difference within the horizon ({figures})")
    else:
        outcome = CONTINUE
        reasons.append(f"CONTINUE: no significant difference yet ({figures})")
    return OnlineDecision(outcome=outcome, reasons=reasons, mode=mode, metric=metric, effect=effect, p_value=p,
                          as_of=as_of, days_elapsed=elapsed, looks=looks, arms=arms, interleaving=interleaving)


def summary_numbers(decision: OnlineDecision) -> Mapping[str, float]:
    """The decision's flat figures (`OnlineDecision.metrics`)."""
    return decision.metrics()
