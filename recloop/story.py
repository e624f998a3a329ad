"""The online half of the loop, told on the closed-loop simulator: what `recloop demo` runs once the first
champion is serving.

    drift → retraining → offline gate → latency gate → online experiment → promotion

Every simulated day from `first_day` on is answered by the platform itself (an in-process
`RecommendationService`: `recloop.data.closed_loop`), with the drift scenario switched on from that day.
After each day, what the deployment's daemon would run, in process and recorded in the same Dagster
instance the UI reads (`pipelines.run`):

1. the day's data plane (`data_plane_job`: the served impressions joined with their feedback, features,
   the drift report against the champion's training window) and the served-traffic monitor
   (`served_traffic_job`);
2. without an experiment running: one tick of the drift sensor. A drifted day starts the retraining run
   (training → offline gate → latency gate → with online experiments on, alias `experiment` instead of a
   promotion). If no drift asked for retraining after `retrain_after` closed-loop days, the retraining
   schedule's run does it (the cron's role);
3. with an experiment running: the daily look (`online_experiment_job`): promote, stop or continue.

The service refreshes after each day, so the next day is served by what the registry now says (the
challenger's arm of the experiment, then the new champion). The story ends with the experiment's final
decision, or after `max_days`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from recloop.config import Settings
from recloop.data.simulator import SimConfig

ONLINE_EXPERIMENTS = "RECLOOP_ONLINE_EXPERIMENTS"


class _Decided(Exception):
    """The experiment reached its final decision: the story is told."""


@dataclasses.dataclass
class StoryDay:
    date: str
    served: dict[str, Any]
    drift: dict[str, Any] = dataclasses.field(default_factory=dict)
    traffic: dict[str, Any] = dataclasses.field(default_factory=dict)
    retraining: dict[str, Any] | None = None
    experiment: dict[str, Any] | None = None


@dataclasses.dataclass
class Story:
    days: list[StoryDay] = dataclasses.field(default_factory=list)
    champion_before: str | None = None
    champion_after: str | None = None
    experiment_outcome: str | None = None

    @property
    def promoted_online(self) -> bool:
        return self.experiment_outcome == "promote"

    def as_dict(self) -> dict[str, Any]:
        return {"champion_before": self.champion_before, "champion_after": self.champion_after,
                "experiment_outcome": self.experiment_outcome,
                "days": [dataclasses.asdict(d) for d in self.days]}


def _metadata(run: Any, key: str) -> dict[str, Any]:
    return dict(run.materialized.get(key) or {})


def run_online_story(
    settings: Settings,
    config: SimConfig,
    first_day: int,
    *,
    max_days: int = 8,
    retrain_after: int = 3,
    mode: str = "interleave",
    explore_share: float | None = None,
    events_per_day: int | None = None,
    say: Callable[[str], None] = print,
    training_summary: Callable[[Any], dict[str, Any]] | None = None,
) -> Story:
    """Serve simulated days `first_day`, `first_day + 1`, ... of `config` (the world the warm-up days came
    from; its scenario drifts from `config.drift_day`) in closed loop and run the loop after each (see the
    module docstring). `events_per_day` lowers the closed-loop traffic (the population is unchanged).
    Online experiments are switched on for this process (`RECLOOP_ONLINE_EXPERIMENTS=on`) unless the
    environment says otherwise; `mode` is the experiment's traffic split (`interleave` or `ab`);
    `explore_share` the share of slots explored (default: RECLOOP_SERVING_EXPLORE_SHARE)."""
    from pipelines.run import instance, run_job, tick_sensor
    from recloop.data.closed_loop import ServicePlatform, run_closed_loop
    from recloop.lake import open_lake
    from recloop.registry import open_registry
    from recloop.serving import RecommendationService, ServingConfig

    os.environ.setdefault(ONLINE_EXPERIMENTS, "on")
    inst = instance(settings)
    registry = open_registry(settings)
    story = Story()
    champion = registry.champion()
    story.champion_before = str(champion.version) if champion is not None else None
    if events_per_day:
        config = dataclasses.replace(config, events_per_day=events_per_day)
    config = dataclasses.replace(config, days=max(config.days, first_day + max_days))
    serving = dataclasses.replace(ServingConfig.from_env(), experiment_mode=mode, poll_seconds=3600.0)
    if explore_share is not None:
        serving = dataclasses.replace(serving, explore_share=explore_share)
    service = RecommendationService(settings, serving, registry=registry)
    closed = [0]
    last_training = [0]  # the closed-loop day of the last retraining run
    summarise = training_summary or (lambda run: {"success": run.success, "error": run.error})

    def after_day(index: int, day: str, stats: Any) -> None:
        record = StoryDay(day, {"sessions": stats.sessions, "impressions": stats.impressions,
                                "ctr": round(stats.ctr, 4), "gini": round(stats.gini, 3),
                                "coverage": round(stats.coverage, 3), "by_arm": stats.by_arm})
        story.days.append(record)
        closed[0] += 1
        data = run_job("data_plane_job", partition=day, inst=inst)
        if not data.success:
            raise RuntimeError(f"the data plane failed for {day}: {data.error}")
        record.drift = _metadata(data, "monitoring/drift")
        joined = _metadata(data, "silver/events")
        traffic = run_job("served_traffic_job", partition=day, inst=inst)
        record.traffic = _metadata(traffic, "online/served_traffic")
        arms = ", ".join(f"{arm} CTR {a['ctr']:.3f}" for arm, a in stats.by_arm.items()) if len(stats.by_arm) > 1 else ""
        say(f"      {day}: {stats.sessions:,} answers by v{service.model.version if service.model else '-'}"
            + (f" and v{service.challenger.version} ({mode})" if getattr(service, "challenger", None) else "")
            + f", CTR {stats.ctr:.3f}" + (f" ({arms})" if arms else "")
            + f"; served negatives joined {joined.get('served_negatives', '-')}; "
            + ("DRIFT" if record.drift.get("drifted") else "no drift")
            + f"; served Gini {stats.gini:.2f}, coverage {stats.coverage:.2f}")
        if registry.experiment() is not None:
            look = run_job("online_experiment_job", inst=inst,
                           run_config_ops={"online__experiment": {"config": {"AsOf": day}}})
            out = _metadata(look, "online/experiment")
            record.experiment = out
            reasons = out.get("reasons") or []
            say(f"        experiment {out.get('experiment_id')}: {out.get('outcome')}"
                + (f" (p = {out['p_value']:.3g})" if isinstance(out.get("p_value"), float) and out["p_value"] == out["p_value"] else "")
                + (f": {reasons[0]}" if reasons else ""))
            if out.get("outcome") not in (None, "continue"):
                story.experiment_outcome = out.get("outcome")
                raise _Decided()
            return
        runs = tick_sensor("drift_retraining_sensor", inst=inst).runs
        why = "the drift sensor"
        if runs:
            last_training[0] = closed[0]
        elif closed[0] - last_training[0] >= retrain_after:
            runs = [run_job("training_job", inst=inst)]
            last_training[0] = closed[0]
            why = f"the retraining schedule (every {retrain_after} days)"
        for run in runs:
            summary = summarise(run)
            record.retraining = summary
            say(f"        {why} started retraining run {run.run_id[:8]}: version {summary.get('registered_version')}")
            for line in _retraining_lines(run, summary):
                say(f"          {line}")

    platform = ServicePlatform(service)
    service.feedback.start()
    service.impressions.start()
    try:
        service.refresh()
        run_closed_loop(config, open_lake(settings.landing_uri, s3_endpoint_url=settings.s3_endpoint_url),
                        platform, days=range(first_day, first_day + max_days), after_day=after_day)
    except _Decided:
        pass
    finally:
        service.close()
    champion = registry.champion()
    story.champion_after = str(champion.version) if champion is not None else None
    return story


def latency_line(run: Any) -> str | None:
    """The latency gate's verdict of a training run in one line (None when it did not run)."""
    latency = run.check_metadata.get("model/registered_version:latency_gate") or {}
    if not latency:
        return None
    p99 = f"p99 {latency['challenger_p99_ms']:.1f} ms" if "challenger_p99_ms" in latency else ""
    if "champion_p99_ms" in latency:
        p99 += f" vs champion {latency['champion_p99_ms']:.1f} ms"
    return (f"latency gate: {latency.get('decision')}" + (f", {p99}" if p99 else "")
            + f" ({(latency.get('reasons') or [''])[0]})")


def _retraining_lines(run: Any, summary: dict[str, Any]) -> list[str]:
    """The gates' verdicts of a training run, one line each."""
    lines = []
    gate = run.check_metadata.get("model/registered_version:promotion_gate") or {}
    if gate:
        lines.append("offline gate: " + ("passed" if run.checks.get("model/registered_version:promotion_gate")
                                         else "refused") + f" ({(gate.get('reasons') or [''])[0]})")
    if (latency := latency_line(run)) is not None:
        lines.append(latency)
    if "model/champion" in run.materialized:
        lines.append("promoted straight to champion (online experiments off)")
    elif registry_note := (run.materialized.get("model/registered_version") or {}).get("version"):
        if run.checks.get("model/registered_version:promotion_gate") and run.checks.get(
                "model/registered_version:latency_gate") is not False:
            lines.append(f"version {registry_note} passed both gates: alias `experiment`, live traffic from the next day")
    if summary.get("error"):
        lines.append(f"run failed: {summary['error']}")
    return lines
