"""The promotion gate: pure logic over metric dicts (no MLflow). `decide` judges a challenger against the
champion (or, for the first model, the popularity baseline) by the rules of a `GateConfig`: the primary
metric (a strict improvement, or non-inferiority when online experiments are the judge), relative and
absolute guardrails (coverage, diversity, concentration) and sanity checks; `GateDecision` says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateConfig:
    """Rules a challenger must pass to become champion.

    Relative rules compare with the champion (or, for the first model, with the popularity baseline on
    the primary metric only); absolute rules and sanity checks always apply.
    """

    primary_metric: str = "ndcg_at_10"
    # Names of the guardrail metrics in the metric dicts (e.g. `catalog_coverage_at_10` for the names of
    # `recloop.evaluation.flat_metrics`).
    coverage_metric: str = "coverage"
    diversity_metric: str = "diversity"
    concentration_metric: str = "popularity_concentration"
    # Relative margin over the baseline on the primary metric: 0.02 = at least 2% better.
    min_improvement: float = 0.02
    # With online experiments on, the live experiment judges the improvement and the offline gate against a
    # champion only asks for non-inferiority: the challenger's primary metric at least (1 - margin) x the
    # champion's. Once the platform serves its own recommendations, the held-out day is made of what the
    # champion chose to show (its positives can only be videos it put on screen), so offline superiority
    # over the logging champion is biased against every challenger (docs/online.md). None: superiority
    # (`min_improvement`), as without experiments. The first model is always judged on superiority over
    # popularity; the guardrails and sanity checks are unchanged.
    noninferiority_margin: float | None = None
    # Guardrails against the champion: at least these shares of the champion's coverage and diversity --
    # or of the best classical baseline's (`reference`: tuned ALS and EASE trained on the challenger's own
    # window, same users) when that is lower: once the platform serves its own recommendations, the
    # newer data covers fewer videos (the feedback loop, which exploration and the served-traffic monitor
    # watch), and the guardrail is there to catch a model narrower than the data allows, not to refuse
    # every model trained on it.
    min_coverage_ratio: float = 0.8
    min_diversity_ratio: float = 0.9
    # Coverage and diversity like for like: the champion serves users who joined after its training window
    # its cold-start list (popular, then fresh: diverse, and nothing a personalised list covers), so on all
    # evaluated users its numbers are partly not its personalisation's. When both metric dicts carry the
    # same guardrail metric on the users both models know (`<metric><common_suffix>`, with their number
    # `users_evaluated<common_suffix>`, equal in both: the evaluation's `common` segment), the two ratios
    # are judged on those users; otherwise on all evaluated users. None: always on all evaluated users.
    # The primary metric and the concentration guardrails stay on all evaluated users.
    common_suffix: str | None = "_common"
    max_concentration_increase: float = 0.1
    # Absolute guardrail, also for the first model: at most this share of the slots for the top 1% most
    # popular videos — or, on data where collaborative filtering itself concentrates more (a small
    # catalogue of well-known movies), no more than the classical baselines evaluated on the same split
    # (`reference`: tuned ALS and EASE) plus `max_concentration_increase`.
    max_popularity_concentration: float = 0.5
    # Both concentration guardrails judge the challenger's level less `concentration_z` standard errors
    # over users (`<concentration_metric>_stderr` when the evaluation gives it; 1.645: one-sided 95 %):
    # they refuse when the evidence says the ceiling is exceeded, not on the sampling noise of a
    # held-out period with a few dozen users. 0 judges the level as measured.
    concentration_z: float = 1.645
    # Sanity of the challenger itself.
    max_identical_list_share: float = 0.5
    require_finite_weights: bool = True
    k: int = 10
    min_distinct_items: int | None = None  # default 2 * k

    @property
    def distinct_items_floor(self) -> int:
        return self.min_distinct_items if self.min_distinct_items is not None else 2 * self.k


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str]
    checks: dict[str, bool]
    compared_to: str  # "popularity" or "champion:<version>"
    primary_metric: str = "ndcg_at_10"
    # The numbers the decision looked at, flat: "challenger.ndcg_at_10", "champion.coverage", ...
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _concentration_margin(challenger: Mapping[str, Any], config: "GateConfig") -> tuple[float, str]:
    """(z x the standard error of the challenger's concentration, the text that says so) -- (0, "") when
    the evaluation gave no standard error."""
    level = _num(challenger, config.concentration_metric)
    se = _num(challenger, f"{config.concentration_metric}_stderr")
    if level is None or se is None or not math.isfinite(se) or config.concentration_z <= 0:
        return 0.0, ""
    margin = config.concentration_z * se
    return margin, f" (standard error {se:.4f} over users: judged at {level - margin:.4f})"


def _common_pair(challenger: Mapping[str, Any], champion: Mapping[str, Any], key: str,
                 suffix: str | None) -> tuple[int, float, float] | None:
    """(number of users, challenger's, champion's) `key` on the users both models know, when both metric
    dicts have it for the same number of users (`users_evaluated<suffix>`); else None."""
    if not suffix:
        return None
    ours, theirs = _num(challenger, f"{key}{suffix}"), _num(champion, f"{key}{suffix}")
    users = _num(challenger, f"users_evaluated{suffix}")
    if ours is None or theirs is None or users is None or users < 1:
        return None
    if _num(champion, f"users_evaluated{suffix}") != users:
        return None  # not the same users: nothing like for like to compare
    return int(users), ours, theirs


def _best_reference(reference: Mapping[str, Mapping[str, Any]] | None, key: str) -> tuple[str, float] | None:
    """(name, value) of the reference baseline with the highest finite `key` (None: none has it)."""
    values = [(name, v) for name, m in (reference or {}).items()
              if (v := _num(m, key)) is not None and math.isfinite(v)]
    return max(values, key=lambda nv: nv[1]) if values else None


def _num(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    if not metrics or metrics.get(key) is None:
        return None
    try:
        return float(metrics[key])
    except (TypeError, ValueError):
        return None


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


def decide(
    *,
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    popularity: Mapping[str, Any],
    sanity: Mapping[str, Any],
    config: GateConfig | None = None,
    champion_version: str | int | None = None,
    reference: Mapping[str, Mapping[str, Any]] | None = None,
) -> GateDecision:
    """Promote or refuse a challenger, with every rule's outcome written out with its numbers.

    Args:
        challenger: flat offline metrics of the challenger (`ndcg_at_10`, `coverage`, `diversity`,
            `popularity_concentration`, ...).
        champion: the same metrics of the current champion on the same evaluation data, or None when
            there is no champion yet (then the popularity baseline is the bar). With `coverage_common`,
            `diversity_common` and `users_evaluated_common` in both (the users both models know), the
            relative coverage and diversity guardrails compare on those users (`GateConfig.common_suffix`).
        popularity: the popularity baseline's metrics on the same evaluation data.
        sanity: `finite_weights` (bool), `identical_list_share` (0..1), `distinct_items` (int).
        config: the rules; defaults to `GateConfig()`.
        champion_version: the champion's version, for `compared_to` (else `champion["version"]`).
        reference: classical baselines evaluated on the same data (name -> metrics, e.g. tuned ALS and
            EASE): the concentration guardrail allows what they do, plus `max_concentration_increase`.
    Returns:
        A `GateDecision`; `promote` is True only if every check passed.
    """
    config = config or GateConfig()
    metric = config.primary_metric
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    numbers: dict[str, float] = {}

    def record(name: str, ok: bool, text: str) -> None:
        checks[name] = ok
        reasons.append(f"{'PASS' if ok else 'FAIL'} {name}: {text}")

    for prefix, source in (("challenger", challenger), ("champion", champion), ("popularity", popularity)):
        for key, value in (source or {}).items():
            number = _num(source, key)
            if number is not None and key != "version":
                numbers[f"{prefix}.{key}"] = number

    if champion is not None:
        version = str(champion_version or champion.get("version") or "unknown")
        compared_to, baseline_name, baseline = f"champion:{version}", f"champion v{version}", champion
    else:
        compared_to, baseline_name, baseline = "popularity", "popularity baseline", popularity

    # Primary metric: beat the baseline by the relative margin.
    ours, theirs = _num(challenger, metric), _num(baseline, metric)
    if ours is None or not math.isfinite(ours):
        record("primary_metric", False, f"challenger {metric} is {_fmt(ours)}, a finite number is required")
    elif theirs is None or not math.isfinite(theirs):
        record(
            "primary_metric", False, f"{baseline_name} {metric} is {_fmt(theirs)}: nothing to compare with"
        )
    elif champion is not None and config.noninferiority_margin is not None:
        bar = theirs * (1 - config.noninferiority_margin)
        ok = ours >= bar and ours > 0
        change = (ours / theirs - 1) if theirs else math.inf if ours > 0 else 0.0
        record(
            "primary_metric",
            ok,
            f"challenger {metric} {ours:.4f} vs {baseline_name} {theirs:.4f} ({change:+.1%}); "
            f"needs >= {bar:.4f} (non-inferiority, -{config.noninferiority_margin:.1%}: "
            "the online experiment judges the improvement)",
        )
    else:
        bar = theirs * (1 + config.min_improvement)
        ok = ours >= bar and ours > theirs
        change = (ours / theirs - 1) if theirs else math.inf if ours > 0 else 0.0
        record(
            "primary_metric",
            ok,
            f"challenger {metric} {ours:.4f} vs {baseline_name} {theirs:.4f} "
            f"({change:+.1%}); needs >= {bar:.4f} (+{config.min_improvement:.1%})",
        )

    # Guardrails relative to the champion.
    if champion is not None:
        for name, key, ratio in (
            ("coverage_guardrail", config.coverage_metric, config.min_coverage_ratio),
            ("diversity_guardrail", config.diversity_metric, config.min_diversity_ratio),
        ):
            ours, theirs = _num(challenger, key), _num(champion, key)
            common = _common_pair(challenger, champion, key, config.common_suffix)
            if common is None and theirs is None:
                reasons.append(f"SKIP {name}: champion v{version} has no {key}")
                continue
            if common is not None:
                users, mine, champs = common
                on, also = (f" on the {users} users both models know",
                            f"; on all evaluated users: challenger {_fmt(ours)} vs champion {_fmt(theirs)}")
                suffix = config.common_suffix or ""
            else:
                mine, champs, on, also, suffix = ours, theirs, "", "", ""
            # The bar is the champion's, unless classical CF trained on the challenger's own window (the
            # `reference` baselines, on the same users) does not reach it either: then what the data allows.
            best = _best_reference(reference, f"{key}{suffix}")
            bar, bar_name = champs, "champion's"
            if best is not None and best[1] < champs:
                bar, bar_name = best[1], (f"{best[0]}'s {best[1]:.4f} on this window, below the champion's: "
                                          "the data's, not the model's")
            floor = ratio * bar
            ok = mine is not None and math.isfinite(mine) and mine >= floor
            record(
                name,
                ok,
                f"challenger {key} {_fmt(mine)} vs champion {champs:.4f}{on}; needs >= {floor:.4f} "
                f"({ratio:.0%} of {bar_name}{also})",
            )
        conc = config.concentration_metric
        ours, theirs = _num(challenger, conc), _num(champion, conc)
        margin, noise = _concentration_margin(challenger, config)
        if theirs is None:
            reasons.append(f"SKIP concentration_increase_guardrail: champion v{version} has no {conc}")
        else:
            ceiling = theirs + config.max_concentration_increase
            ok = ours is not None and math.isfinite(ours) and ours - margin <= ceiling
            record(
                "concentration_increase_guardrail",
                ok,
                f"challenger {conc} {_fmt(ours)}{noise} vs champion {theirs:.4f}; "
                f"needs <= {ceiling:.4f} (+{config.max_concentration_increase:.2f})",
            )

    # Absolute guardrail (or what classical collaborative filtering does on this data, plus a margin).
    ours = _num(challenger, config.concentration_metric)
    ceiling, why = config.max_popularity_concentration, ""
    levels = {name: v for name, m in (reference or {}).items()
              if (v := _num(m, config.concentration_metric)) is not None and math.isfinite(v)}
    if levels and max(levels.values()) + config.max_concentration_increase > ceiling:
        name = max(levels, key=levels.get)
        ceiling = levels[name] + config.max_concentration_increase
        why = f" ({name} {levels[name]:.4f} on this data +{config.max_concentration_increase:.2f})"
    margin, noise = _concentration_margin(challenger, config)
    ok = ours is not None and math.isfinite(ours) and ours - margin <= ceiling
    record(
        "popularity_concentration_guardrail",
        ok,
        f"challenger {config.concentration_metric} {_fmt(ours)}{noise}; needs <= {ceiling:.4f}{why}",
    )

    # Sanity of the challenger's outputs and weights.
    if config.require_finite_weights:
        finite = sanity.get("finite_weights")
        record(
            "finite_weights",
            finite is True,
            "all weights are finite"
            if finite is True
            else f"weights are not all finite (finite_weights={finite!r})",
        )
    share = _num(sanity, "identical_list_share")
    ok = share is not None and share <= config.max_identical_list_share
    record(
        "identical_lists",
        ok,
        f"{'missing' if share is None else f'{share:.1%}'} of users get the most common list; "
        f"needs <= {config.max_identical_list_share:.1%}",
    )
    distinct = _num(sanity, "distinct_items")
    ok = distinct is not None and distinct >= config.distinct_items_floor
    record(
        "distinct_items",
        ok,
        f"{'missing' if distinct is None else int(distinct)} distinct items recommended; "
        f"needs >= {config.distinct_items_floor} (2 x k={config.k} unless set)",
    )
    for key in ("identical_list_share", "distinct_items"):
        if (value := _num(sanity, key)) is not None:
            numbers[f"sanity.{key}"] = value

    promote = all(checks.values())
    failed = [name for name, ok in checks.items() if not ok]
    summary = (
        f"PROMOTE: passed all {len(checks)} checks against {compared_to}"
        if promote
        else f"REFUSE: failed {', '.join(failed)} against {compared_to}"
    )
    return GateDecision(
        promote=promote,
        reasons=[summary, *reasons],
        checks=checks,
        compared_to=compared_to,
        primary_metric=metric,
        metrics=numbers,
    )
