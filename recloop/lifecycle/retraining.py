"""When to retrain: the cooldown and the schedule (from the environment), whether the automation starts
on, which drift reports ask for a retraining (`plan_retraining`), and the `retraining.failed` alert."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from recloop.lifecycle.alerts import Alert

# Retraining settings come from the environment: a deployment changes them without a code change, and an
# orchestrator reads them when it loads its definitions (a Dagster sensor, an Airflow DAG file).
COOLDOWN_ENV = "RECLOOP_RETRAIN_COOLDOWN_HOURS"
CRON_ENV = "RECLOOP_RETRAIN_CRON"
TIMEZONE_ENV = "RECLOOP_RETRAIN_TIMEZONE"


def retrain_cooldown() -> timedelta:
    """Minimum time between two drift-triggered retrainings ($RECLOOP_RETRAIN_COOLDOWN_HOURS, default 24)."""
    return timedelta(hours=float(os.environ.get(COOLDOWN_ENV) or "24"))


def retrain_schedule() -> tuple[str, str]:
    """(cron, timezone) of the retraining cadence ($RECLOOP_RETRAIN_CRON, default daily 03:00, in
    $RECLOOP_RETRAIN_TIMEZONE, default UTC): the floor under drift-triggered retraining."""
    return os.environ.get(CRON_ENV) or "0 3 * * *", os.environ.get(TIMEZONE_ENV) or "UTC"


AUTOMATION_ENV = "RECLOOP_DAGSTER_AUTOMATION"


def automation_enabled() -> bool:
    """Whether the code location's automation starts on by itself ($RECLOOP_DAGSTER_AUTOMATION = on /
    off, default off): the retraining schedule, the drift sensor and the failure alerts. Off, a UI left
    running on the demo's home trains nothing by itself: turn each on in the UI (Automation), or set it on
    (the production stack does). Raises ValueError on another value."""
    raw = (os.environ.get(AUTOMATION_ENV) or "off").strip().lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{AUTOMATION_ENV} must be on or off, got {raw!r}")


def retraining_key(partition: str, champion_version: str | int) -> str:
    """One retraining per drift episode and champion: the first drifted day + the champion's version."""
    return f"drift-{partition}-champion-{champion_version}"


@dataclass(frozen=True)
class RetrainingRequest:
    key: str
    partition: str
    champion_version: str


@dataclass
class RetrainingPlan:
    requests: list[RetrainingRequest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def skip_reason(self) -> str:
        return "; ".join(self.skipped) or "no new drift episode"


def plan_retraining(
    reports: Iterable[Mapping[str, Any]],
    *,
    recent_retraining: Callable[[], str | None],
    already_requested: Collection[str] = (),
    cooldown: timedelta | None = None,
) -> RetrainingPlan:
    """Which drift reports ask for a retraining: the first day of each new drift episode, one retraining
    for all of them (the newest data covers every episode), none when a drift-triggered retraining
    started within the cooldown (`recent_retraining()` names it, or returns None), none twice for the
    same episode and champion (`already_requested` holds their `retraining_key`s).

    `reports` are drift decisions in order (`DriftOutcome.record()` or the same fields from metadata:
    `partition`, `drifted`, `drift_episode`, `champion_version`)."""
    cooldown = retrain_cooldown() if cooldown is None else cooldown
    plan = RetrainingPlan()
    for report in reports:
        partition = report.get("partition")
        if not report.get("drifted") or not partition or report.get("drift_episode") != partition:
            continue
        version = str(report.get("champion_version"))
        key = retraining_key(partition, version)
        if key in already_requested:
            plan.skipped.append(f"{partition}: retraining for this drift episode was requested already ({key})")
            continue
        if plan.requests:
            plan.skipped.append(f"{partition}: covered by the retraining requested for {plan.requests[0].partition}")
            continue
        recent = recent_retraining()
        if recent is not None:
            plan.skipped.append(f"{partition}: a drift-triggered run ({recent}) started within the cooldown of {cooldown}")
            continue
        plan.requests.append(RetrainingRequest(key, partition, version))
    return plan


def retraining_failed_alert(*, job: str, run_id: str, trigger: str, failure: str, steps_failed: Sequence[str],
                            partition: str | None = None, model_version: str | None = None,
                            run_label: str | None = None) -> Alert:
    """The `retraining.failed` alert of a failed training run (a refusal by the gate is not a failure)."""
    return Alert("retraining.failed", key=f"run-{run_id}",
                 text=f":x: recloop: retraining run {run_label or run_id[:8]} ({trigger}) failed: {failure}",
                 fields={"asset": job, "partition": partition, "model_version": model_version,
                         "details": {"run_id": run_id, "trigger": trigger, "steps_failed": list(steps_failed)}})
