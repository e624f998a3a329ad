"""Online experiments and the served-traffic monitor (`recloop.online`) as daily steps: whether online
experiments are on, the daily look at the running experiment, the served-traffic check of a day."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recloop.lifecycle.alerts import Alert, jsonable

if TYPE_CHECKING:
    from recloop.lake import Lake
    from recloop.registry import Registry

# With online experiments on, a gate-passing candidate gets live traffic against the champion (alias
# `experiment`) instead of being promoted (`promote_candidate`); off by default.
ONLINE_EXPERIMENTS_ENV = "RECLOOP_ONLINE_EXPERIMENTS"


EXPERIMENT_ASSET = "online/experiment"
SERVED_TRAFFIC_ASSET = "online/served_traffic"


def online_experiments_enabled() -> bool:
    """Whether a gate-passing candidate goes to an online experiment ($RECLOOP_ONLINE_EXPERIMENTS = on /
    off, default off). Raises ValueError on another value."""
    raw = (os.environ.get(ONLINE_EXPERIMENTS_ENV) or "off").strip().lower()
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{ONLINE_EXPERIMENTS_ENV} must be on or off, got {raw!r}")


@dataclass(frozen=True)
class ExperimentOutcome:
    """A daily look at the running online experiment (`recloop.online.experiment.conclude`) and the alert
    of a final outcome: `model.promoted` (the challenger became champion) or `model.refused` (stopped)."""

    result: Any  # recloop.online.experiment.ExperimentResult
    alert: Alert | None

    @property
    def outcome(self) -> str:
        return self.result.outcome

    def summary(self) -> dict[str, Any]:
        return jsonable(self.result.summary())


def online_experiment_step(lake: Lake, registry: Registry, *, as_of: str | None = None, mode: str | None = None,
                           config: Any = None, run_id: str) -> ExperimentOutcome:
    """The daily look at the online experiment: per-arm metrics, the sequential decision, the MLflow run in
    `recloop-online-experiments`, and on a final outcome the registry changed (promote: champion := the
    experiment's version; stop: alias removed) with its alert. No experiment running: nothing, said so."""
    from recloop.online.experiment import conclude

    result = conclude(lake, registry, as_of=as_of, config=config, mode=mode)
    d = result.decision
    if d is None or not result.applied:
        return ExperimentOutcome(result, None)
    numbers = {k: v for k, v in d.metrics().items() if isinstance(v, (int, float))}
    fields = {"asset": EXPERIMENT_ASSET, "partition": d.as_of, "model_version": result.version, "numbers": numbers,
              "details": {"experiment_id": result.experiment_id, "outcome": d.outcome, "mode": d.mode,
                          "metric": d.metric, "reasons": d.reasons, "mlflow_run_id": result.mlflow_run_id,
                          "champion_version": result.champion_version, "run_id": run_id}}
    if d.promote:
        alert = Alert("model.promoted", key=f"{result.experiment_id}/promote",
                      text=(f":white_check_mark: recloop: version {result.version} is the new champion after online "
                            f"experiment {result.experiment_id}: {d.reasons[0]}"), fields=fields)
    else:
        alert = Alert("model.refused", key=f"{result.experiment_id}/{d.outcome}",
                      text=(f":no_entry: recloop: online experiment {result.experiment_id} stopped, champion "
                            f"v{result.champion_version} stays: {d.reasons[0]}"), fields=fields)
    return ExperimentOutcome(result, alert)


@dataclass(frozen=True)
class TrafficOutcome:
    """One day's served-traffic report (`recloop.online.traffic.monitor`) and its `drift.detected` alert
    when a threshold is breached."""

    report: Any  # recloop.online.traffic.TrafficReport; None on a day without impression outcomes
    alert: Alert | None
    status: str = ""

    @property
    def breached(self) -> bool:
        return bool(self.report is not None and self.report.breached)

    def summary(self) -> dict[str, Any]:
        if self.report is None:
            return {"breached": False, "judged": False, "status": self.status}
        return jsonable({**self.report.record(), "numbers": self.report.summary()})


def served_traffic_step(lake: Lake, partition: str, *, thresholds: Any = None) -> TrafficOutcome:
    """The served-traffic monitor of day `partition` against its reference window; a breach comes with a
    `drift.detected` alert on asset online/served_traffic (keyed by the day: a re-run sends it once). A day
    without impression outcomes is reported as such, not failed."""
    from recloop.online.traffic import monitor

    try:
        report = monitor(lake, partition, thresholds=thresholds)
    except FileNotFoundError as err:
        return TrafficOutcome(None, None, str(err))
    if not report.breached:
        return TrafficOutcome(report, None, report.status)
    failed = [r for r in report.reasons if r.startswith("FAIL")]
    alert = Alert("drift.detected", key=f"served-traffic/{partition}",
                  text=f":warning: recloop: {report.status}: " + "; ".join(failed[:3]),
                  fields={"asset": SERVED_TRAFFIC_ASSET, "partition": partition, "numbers": report.summary(),
                          "details": {"kind": "served_traffic", "reasons": report.reasons,
                                      "reference_days": report.reference_days,
                                      "category_share": report.stats.category_share}})
    return TrafficOutcome(report, alert, report.status)
