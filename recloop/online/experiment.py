"""Starting and concluding an online experiment: the actions on the registry around the decision rule.

* `start(registry, version, decision)`: a candidate that passed the offline gate (and the latency gate)
  gets the `experiment` alias instead of `champion`; serving then splits traffic between the two
  (A/B by user, or team-draft interleaving, docs/serving.md). Recorded in `recloop-promotions` like a gate
  decision (`Registry.start_experiment`).
* `conclude(lake, registry)`: one daily look. Reads the experiment's impression outcomes since it
  started, applies the sequential rule (`recloop.online.decision.decide_online`), logs the look as a
  run of `recloop-online-experiments` (per-arm table, looks, decision), and acts on a final outcome:
  promote (champion := the experiment's version, alias removed, recorded as a promotion with the online
  figures), or stop (alias removed, champion stays). `continue` changes nothing.

If the champion moved while the experiment ran (a rollback), the comparison no longer holds: the
experiment is stopped without a decision on its merits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recloop.online import decision as rule
from recloop.online.metrics import OUTCOMES_DATASET, read_outcomes

if TYPE_CHECKING:
    from recloop.lake import Lake
    from recloop.registry import GateDecision, Registry


def experiment_id(champion_version: str | int, challenger_version: str | int) -> str:
    """The id serving stamps on the experiment's impressions (contract 4)."""
    return f"exp-v{champion_version}-v{challenger_version}"


def start(registry: Registry, version: str | int, decision: GateDecision) -> str:
    """`version` under the `experiment` alias against the current champion; returns the experiment id."""
    return registry.start_experiment(version, decision)


@dataclass
class ExperimentResult:
    """One look at the running experiment and what was done about it."""

    experiment_id: str | None
    version: str | None  # the experiment's (challenger's) version
    champion_version: str | None
    started: str | None
    decision: rule.OnlineDecision | None
    applied: bool  # whether a final outcome changed the registry
    mlflow_run_id: str | None
    status: str
    lineage: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return self.decision.outcome if self.decision else "none"

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {
            "experiment_id": self.experiment_id or "",
            "version": self.version or "",
            "champion_version": self.champion_version or "",
            "started": self.started or "",
            "outcome": self.outcome,
            "applied": self.applied,
            "status": self.status,
            "mode": d.mode if d else "",
            "metric": d.metric if d else "",
            "p_value": d.p_value if d else None,
            "reasons": list(d.reasons) if d else [self.status],
            "arms": d.table() if d else [],
            "looks": [x.to_dict() for x in d.looks] if d else [],
            "mlflow_run_id": self.mlflow_run_id or "",
            "lineage": list(self.lineage),
        }


def catalog_size(lake: Lake, day: str) -> int | None:
    """Distinct videos known on `day` (`silver/videos` up to it), or None when there are none."""
    import pyarrow.compute as pc

    ids: set[str] = set()
    for p in lake.partitions("silver/videos"):
        if p <= day:
            ids.update(pc.unique(lake.read_partition("silver/videos", p)["video_id"]).to_pylist())
    return len(ids) or None


def conclude(lake: Lake, registry: Registry, *, as_of: str | None = None, config: rule.DecisionConfig | None = None,
             mode: str | None = None, apply: bool = True) -> ExperimentResult:
    """The daily look at the running experiment (see the module docstring).

    Args:
        as_of: the last day of data to use (default: the newest day of `silver/impression_outcomes`, or
            today UTC when there is none).
        config: the rule (default `DecisionConfig.from_env()`).
        mode: ab | interleave; None detects it from the impressions.
        apply: False decides and logs without touching the aliases (a dry run).
    """
    config = config or rule.DecisionConfig.from_env()
    info = registry.experiment_info()
    if info is None:
        return ExperimentResult(None, None, None, None, None, False, None,
                                "no online experiment running (no `experiment` alias)")
    exp_id, version, champion_at_start = info["experiment_id"], info["version"], info["champion_version"]
    started = info["started_at"].astimezone(UTC).date().isoformat()
    logged = lake.partitions(OUTCOMES_DATASET)
    days = [p for p in logged if p >= started]
    if not days and logged:
        # The days of data are behind the wall clock the registry stamped (a simulation, a replay of past
        # days): the experiment started on the first day its own impressions were logged.
        first = _first_day(lake, logged, exp_id)
        if first is not None:
            started, days = first, [p for p in logged if p >= first]
    if as_of is None:
        as_of = max(days) if days else max(started, datetime.now(UTC).date().isoformat())
    days = [d for d in days if d <= as_of]
    current = registry.champion()
    current_version = str(current.version) if current is not None else None
    if current_version != champion_at_start:
        reason = (f"STOP_NO_DIFFERENCE: the champion moved from v{champion_at_start} to "
                  f"v{current_version or 'none'} during {exp_id}: the comparison no longer holds, stopped "
                  "without a decision on its merits")
        decision = rule.OnlineDecision(rule.STOP_NO_DIFFERENCE, [reason], "ab", config.primary_metric,
                                       rule.m.Estimate(float("nan"), float("nan"), 0), 1.0, as_of, 0)
    else:
        frame = read_outcomes(lake, days, experiment=exp_id)
        decision = rule.decide_online(frame, started=started, as_of=as_of, config=config, mode=mode,
                                      catalog_size=catalog_size(lake, as_of))
    run_id = registry.log_online_experiment(
        experiment_id=exp_id, version=version, champion_version=champion_at_start, outcome=decision.outcome,
        params={"experiment_id": exp_id, "version": version, "champion_version": champion_at_start,
                "started": started, "as_of": as_of, "mode": decision.mode, "metric": decision.metric,
                "alpha": config.alpha, "max_days": config.max_days, "tau_relative": config.tau_relative,
                "tau_share": config.tau_share, "outcome": decision.outcome, "applied": apply and decision.final},
        metrics=decision.metrics(), reasons=decision.reasons,
        tables={"decision.json": decision.to_dict()},
    )
    applied = False
    if apply and decision.final:
        registry.end_experiment(promote=decision.promote, outcome=decision.outcome, reasons=decision.reasons,
                                metrics=decision.metrics(), primary_metric=decision.metric)
        applied = True
    status = decision.reasons[0]
    return ExperimentResult(exp_id, version, champion_at_start, started, decision, applied, run_id, status,
                            registry.lineage())


def _first_day(lake: Lake, days: list[str], experiment_id: str) -> str | None:
    """The first day of the newest run of `days` whose impression outcomes hold rows of `experiment_id`
    (None: none does); read from the newest day back, so a long history costs one day past the run."""
    first = None
    for day in sorted(days, reverse=True):
        if len(read_outcomes(lake, [day], experiment=experiment_id)):
            first = day
        elif first is not None:
            break
    return first
