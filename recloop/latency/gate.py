"""The latency gate's rule: pure logic over the replay's figures (`recloop.latency.replay`), no I/O.

A challenger passes when, on the same replayed requests in the same process:

* its p99 is within the absolute budget (`RECLOOP_LATENCY_BUDGET_MS`, default 25 ms), always;
* and, when there is a champion to compare with, its p99 is at most `RECLOOP_LATENCY_MAX_RATIO` (default
  1.5) times the champion's — a relative rule, because the absolute level depends on the machine the gate
  runs on while the ratio of two models replayed side by side (interleaved, sharing the machine's noise)
  does not.

Without a champion (the first model, or a champion that cannot be loaded) only the budget applies.
`RECLOOP_LATENCY_SAMPLE` is how many requests are replayed per model (default 300), after a warm-up
(`RECLOOP_LATENCY_WARMUP`, default 30) that is excluded from the figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

BUDGET_ENV = "RECLOOP_LATENCY_BUDGET_MS"
RATIO_ENV = "RECLOOP_LATENCY_MAX_RATIO"
SAMPLE_ENV = "RECLOOP_LATENCY_SAMPLE"
WARMUP_ENV = "RECLOOP_LATENCY_WARMUP"
PRIMARY = "p99_ms"


def _env_float(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name) or ""
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {raw!r}")
    return value


@dataclass(frozen=True)
class LatencyConfig:
    """The gate's settings (see the module docstring)."""

    budget_ms: float = 25.0
    max_ratio: float = 1.5
    sample: int = 300
    warmup: int = 30

    @classmethod
    def from_env(cls) -> "LatencyConfig":
        """The settings of this environment; a malformed value is a one-sentence `ValueError`."""
        d = cls()
        return cls(
            budget_ms=_env_float(BUDGET_ENV, d.budget_ms, minimum=0.001),
            max_ratio=_env_float(RATIO_ENV, d.max_ratio, minimum=1.0),
            sample=int(_env_float(SAMPLE_ENV, d.sample, minimum=1)),
            warmup=int(_env_float(WARMUP_ENV, d.warmup, minimum=0)),
        )


@dataclass(frozen=True)
class LatencyDecision:
    """Pass or refuse, every rule's outcome with its numbers (`metrics` flat: `challenger.p99_ms`, ...)."""

    passed: bool
    reasons: list[str]
    checks: dict[str, bool]
    compared_to: str  # "budget" (no champion) or "champion:<version>"
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _p99(figures: Mapping[str, Any] | None) -> float | None:
    if not figures or figures.get(PRIMARY) is None:
        return None
    value = float(figures[PRIMARY])
    return value if math.isfinite(value) else None


def decide_latency(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    config: LatencyConfig,
    *,
    champion_version: str | None = None,
) -> LatencyDecision:
    """The decision on the replay figures of the challenger and (optionally) the champion: each a mapping
    with `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`, `requests` (and `fallbacks`, answers not from the model)."""
    metrics: dict[str, float] = {"budget_ms": float(config.budget_ms), "max_ratio": float(config.max_ratio)}
    for role, figures in (("challenger", challenger), ("champion", champion)):
        for key, value in (figures or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{role}.{key}"] = float(value)
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    p99 = _p99(challenger)
    if p99 is None:
        checks["measured"] = False
        return LatencyDecision(False, ["the challenger's latency could not be measured (no p99 in the replay)"],
                               checks, "budget", metrics)
    fallbacks = int(challenger.get("fallbacks") or 0)
    checks["served_by_model"] = fallbacks == 0
    if fallbacks:
        reasons.append(f"{fallbacks} of {int(challenger.get('requests') or 0)} replayed requests were answered by "
                       "the popularity fallback, not the challenger's model")
    checks["budget"] = p99 <= config.budget_ms
    budget_text = f"p99 {p99:.2f} ms {'within' if checks['budget'] else 'over'} the budget of {config.budget_ms:g} ms"
    base = _p99(champion)
    compared_to = "budget"
    if base is not None and base > 0:
        compared_to = f"champion:{champion_version}" if champion_version else "champion"
        ratio = p99 / base
        metrics["ratio_p99"] = ratio
        checks["ratio"] = ratio <= config.max_ratio
        ratio_text = (f"p99 {p99:.2f} ms is {ratio:.2f}x the champion's {base:.2f} ms "
                      f"({'within' if checks['ratio'] else 'over'} the maximum of {config.max_ratio:g}x)")
        texts = [(checks["ratio"], ratio_text), (checks["budget"], budget_text)]
    else:
        texts = [(checks["budget"], budget_text + " (no champion to compare with: absolute budget only)")]
    passed = all(checks.values())
    # Failures first: the first reason says why a refusal was made.
    reasons = ([t for ok, t in texts if not ok] + reasons + [t for ok, t in texts if ok]) if not passed else \
        [t for _, t in texts]
    return LatencyDecision(passed, reasons, checks, compared_to, metrics)
