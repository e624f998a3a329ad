"""One day's drift decision against the champion's training window (`drift_report`): drift episodes,
the decision record in the lake, the `drift.detected` alert, and the links to the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from recloop.lifecycle.alerts import Alert
from recloop.lifecycle.model import corrupt_model_alert

if TYPE_CHECKING:
    from recloop.drift import DriftResult
    from recloop.lake import Lake
    from recloop.registry import Registry

DRIFT_ASSET = "monitoring/drift"
DRIFT_RECORD = "decision.json"


def drift_record_key(partition: str) -> str:
    """The lake key of `partition`'s drift decision (next to its HTML report)."""
    from recloop.drift import REPORT_DATASET
    from recloop.lake import partition_key

    return f"{partition_key(REPORT_DATASET, partition)}/{DRIFT_RECORD}"


def read_drift_record(lake: Lake, partition: str) -> dict[str, Any] | None:
    """The latest drift decision of `partition` (`DriftOutcome.record()`), or None."""
    key = drift_record_key(partition)
    if not lake.exists(key):
        return None
    return json.loads(lake.read_bytes(key))


def episode_start(lake: Lake, partition: str, champion_version: str) -> str:
    """The first day of the drift episode `partition` belongs to: the previous day's episode when that
    day drifted against the same champion, else `partition` itself. Drift comes in episodes: the first
    day alerts and asks for retraining, the days after it are reported only."""
    previous = (datetime.fromisoformat(partition) - timedelta(days=1)).date().isoformat()
    before = read_drift_record(lake, previous)
    if before and before.get("drifted") and str(before.get("champion_version")) == str(champion_version):
        return str(before.get("drift_episode") or previous)
    return partition


@dataclass(frozen=True)
class DriftOutcome:
    """One day's drift decision against the champion's training window, and its alert (the first day of
    a drift episode only)."""

    partition: str
    drifted: bool
    champion_version: str | None
    drift_episode: str | None
    reasons: list[str]
    summary: dict[str, float]
    reference_partitions: list[str]
    report_uri: str | None
    mlflow_run_id: str | None
    status: str
    alert: Alert | None = None
    report_summary_uri: str | None = None

    @property
    def new_episode(self) -> bool:
        """The first drifted day of an episode: the one that alerts and asks for retraining."""
        return self.drifted and self.drift_episode == self.partition

    @property
    def explanation(self) -> str:
        return "; ".join(self.reasons) or self.status

    @property
    def compared(self) -> bool:
        """Whether the day was compared with the champion's training window at all: a champion, validated
        events on the day, enough rows on both sides for a decision, at least one column or signal tested.
        A day that was not says nothing about drift (no `no_drift` verdict)."""
        s = self.summary
        tested = s.get("columns.tested", 0.0) + sum(1 for k in s if k.startswith("signal.") and k.count(".") == 1)
        return self.champion_version is not None and s.get("decided", 0.0) >= 1.0 and tested > 0

    @property
    def nothing_compared(self) -> str:
        """Why nothing was compared ("" when something was)."""
        if self.compared:
            return ""
        return f"nothing compared: {self.explanation}"

    def record(self) -> dict[str, Any]:
        """The decision as plain values: what `read_drift_record` returns, what Airflow passes on."""
        return {
            "partition": self.partition,
            "drifted": self.drifted,
            "drift_episode": self.drift_episode or "",
            "new_episode": self.new_episode,
            "champion_version": self.champion_version,
            "reasons": list(self.reasons),
            "reference_partitions": list(self.reference_partitions),
            "report": self.report_uri or "",
            "report_summary": self.report_summary_uri or "",
            "mlflow_run_id": self.mlflow_run_id,
            "status": self.status,
            "summary": dict(self.summary),
        }


def drift_report(lake: Lake, registry: Registry, partition: str, *, config_path: str | None = None) -> DriftOutcome:
    """Day `partition` against the champion's training window (`recloop.drift.detect_drift`, Evidently):
    the HTML report in the lake, the run in MLflow's `recloop-monitoring` experiment, the decision with
    its drift episode in the lake (`read_drift_record`), and the `drift.detected` alert when the day opens
    a new episode. Without a champion there is nothing to compare with: not drifted, said so; with a
    corrupt one neither, with its `model.corrupt` alert (the same event serving and training send)."""
    from recloop import drift
    from recloop.model_plane.bundle import CorruptModelError, load_bundle, verify_bundle

    champion = registry.champion()
    if champion is None:
        outcome = DriftOutcome(partition, False, None, None, [], {}, [], None, None,
                               "no champion yet: no training window to compare with (the retraining "
                               "schedule trains the first)")
        _write_record(lake, outcome)
        return outcome
    if not lake.has_partition("silver/events", partition):
        outcome = DriftOutcome(partition, False, str(champion.version), None, [], {}, [], None, None,
                               f"no validated events on {partition}: nothing to compare (a day without data)")
        _write_record(lake, outcome)
        return outcome
    version = str(champion.version)
    bundle = registry.bundle_path(version)
    try:
        verify_bundle(bundle)
    except CorruptModelError as err:  # the day's data is fine: no report, and the model.corrupt alert
        outcome = DriftOutcome(partition, False, None, None, [], {}, [], None, None,
                               f"champion v{version} is corrupt ({err.summary}): no drift report until it is "
                               "rolled back (recloop rollback) or replaced",
                               corrupt_model_alert(version, err.problems, seen_by="drift"))
        _write_record(lake, outcome)
        return outcome
    reference = drift.champion_reference(bundle)
    result = drift.detect_drift(lake, partition, reference, config=drift.DriftConfig.load(config_path),
                                champion=load_bundle(bundle), champion_version=version)
    episode = episode_start(lake, partition, version) if result.drifted else None
    html = lake.read_bytes(drift.report_key(partition)).decode() if result.report_uri else None
    run_id = registry.log_drift_report(partition=partition, model_version=version, drifted=result.drifted,
                                       summary=result.summary, report_uri=result.report_uri, report_html=html,
                                       reasons=result.reasons)
    outcome = _drift_outcome(partition, version, episode, reference, result, run_id)
    _write_record(lake, outcome)
    return outcome


def _drift_outcome(partition: str, version: str, episode: str | None, reference: list[str], result: DriftResult,
                   run_id: str) -> DriftOutcome:
    status = ("drifted" if result.drifted else "no drift") if result.decided else "no decision"
    if result.drifted and episode != partition:
        status = f"drift continues the episode that started on {episode}: no new alert or retraining"
    alert = None
    if result.drifted and episode == partition:
        alert = Alert("drift.detected", key=f"{partition}/champion-{version}",
                      text=(f":warning: recloop: drift on {partition} against champion v{version}'s training "
                            "window: " + "; ".join(result.reasons[:3])),
                      fields={"asset": DRIFT_ASSET, "partition": partition, "model_version": version,
                              "numbers": result.summary, "report_url": result.report_uri,
                              "details": {"reasons": result.reasons, "reference_partitions": reference,
                                          "mlflow_run_id": run_id}})
    return DriftOutcome(partition, bool(result.drifted), version, episode, list(result.reasons), dict(result.summary),
                        list(reference), result.report_uri, run_id, status, alert, result.summary_uri)


REPORT_ARTIFACT = "drift_report.html"


def drift_links(registry: Registry, outcome: DriftOutcome) -> dict[str, str]:
    """Where a browser opens the day's drift report: `report_url`, the report in the MLflow UI (the drift
    run's `drift_report.html` artifact; the lake copy as a file:// or s3:// URL when the run is unknown),
    and `mlflow_run_url`, the drift run."""
    from recloop import links

    out = {}
    run_id = outcome.mlflow_run_id
    experiment_id = registry.run_experiment(run_id)  # None: no run, or one the tracking store does not know
    if experiment_id:
        out["mlflow_run_url"] = links.mlflow_run_url(experiment_id, run_id)
    if outcome.report_uri:  # the run carries the HTML only when a report was written
        out["report_url"] = (links.mlflow_run_url(experiment_id, run_id, artifact=REPORT_ARTIFACT) if experiment_id
                             else links.location_url(outcome.report_uri))
    return out


def _write_record(lake: Lake, outcome: DriftOutcome) -> None:
    record = {**outcome.record(), "decided_at": datetime.now(UTC).isoformat()}
    lake.write_bytes(drift_record_key(outcome.partition), json.dumps(record, indent=1, default=str).encode())
