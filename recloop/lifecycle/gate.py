"""Whether the registered candidate becomes champion: the offline promotion gate (`gate_config`,
`check_gate`), the latency gate (`check_latency`, replayed in a separate process), and the promotion
(`promote_candidate`, or an online experiment when those are on)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import Settings
from recloop.lifecycle.alerts import Alert, jsonable
from recloop.lifecycle.model import GATE_FIGURES, candidate_version
from recloop.lifecycle.online import online_experiments_enabled

if TYPE_CHECKING:
    from recloop.registry import GateConfig, GateDecision, Registry

# The package's logger (`recloop.lifecycle`), as before the split into parts.
log = logging.getLogger(__package__)


# The gate's alerts name the asset the decision is about, whichever orchestrator ran it.
REGISTERED_ASSET = "model/registered_version"


NONINFERIORITY_ENV = "RECLOOP_GATE_NONINFERIORITY_MARGIN"
DEFAULT_NONINFERIORITY_MARGIN = 0.05


def noninferiority_margin() -> float | None:
    """The offline gate's non-inferiority margin against the champion when online experiments are on
    ($RECLOOP_GATE_NONINFERIORITY_MARGIN, default 0.05; `GateConfig.noninferiority_margin`), None when
    they are off (the gate then asks for superiority). Raises ValueError on a value outside [0, 1)."""
    if not online_experiments_enabled():
        return None
    raw = (os.environ.get(NONINFERIORITY_ENV) or "").strip()
    try:
        margin = float(raw) if raw else DEFAULT_NONINFERIORITY_MARGIN
    except ValueError:
        raise ValueError(f"{NONINFERIORITY_ENV} must be a number in [0, 1), got {raw!r}") from None
    if not 0 <= margin < 1:
        raise ValueError(f"{NONINFERIORITY_ENV} must be a number in [0, 1), got {raw!r}")
    return margin


def gate_config(*, min_improvement: float | None = None, max_identical_list_share: float | None = None) -> GateConfig:
    """The promotion gate's rules, the two an operator tunes per run overridden when given; with online
    experiments on, the primary metric against a champion is a non-inferiority check
    (`noninferiority_margin`)."""
    from recloop.registry import GateConfig

    default = GateConfig()
    return GateConfig(
        min_improvement=default.min_improvement if min_improvement is None else float(min_improvement),
        max_identical_list_share=(default.max_identical_list_share if max_identical_list_share is None
                                  else float(max_identical_list_share)),
        noninferiority_margin=noninferiority_margin(),
    )


def _decision_alert(type: str, version: str, decision: GateDecision, text: str, run_id: str) -> Alert:
    return Alert(type, key=f"version-{version}", text=text,
                 fields={"asset": REGISTERED_ASSET, "model_version": version,
                         "numbers": {k: v for k, v in decision.metrics.items() if isinstance(v, (int, float))},
                         "details": {"compared_to": decision.compared_to, "reasons": decision.reasons,
                                     "run_id": run_id}})


@dataclass(frozen=True)
class GateOutcome:
    """The promotion gate's decision for the registered candidate; a refusal is already recorded in the
    registry and comes with its `model.refused` alert."""

    version: str
    decision: GateDecision
    alert: Alert | None

    @property
    def passed(self) -> bool:
        return bool(self.decision.promote)

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {"version": self.version, "promote": bool(d.promote), "compared_to": d.compared_to,
                "reasons": list(d.reasons), "checks": dict(d.checks), "metrics": dict(d.metrics)}

    def figures(self) -> dict[str, float]:
        """The decision's numbers the gate weighs, flat and plottable: `<role>_<metric>` for the challenger,
        the champion (or popularity, the first model's bar) and the metrics of `GATE_FIGURES`, and
        `sanity_*` (identical list share, distinct items)."""
        out = {}
        for key, value in self.decision.metrics.items():
            role, _, metric = key.partition(".")
            if (metric in GATE_FIGURES or role == "sanity") and isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{role}_{metric}"] = float(value)
        return out


def check_gate(registry: Registry, workdir: Path, *, config: GateConfig | None = None, run_id: str) -> GateOutcome:
    """Decides whether the registered candidate may become champion (`recloop.registry.decide` on its
    evaluation): beat popularity (first model) or the champion by the margin, within the guardrails.
    A refusal is recorded (`Registry.refuse`) and alerted; a pass changes nothing yet (see
    `promote_candidate`)."""
    from recloop import model_plane

    version = candidate_version(workdir)
    decision = model_plane.gate_decision(Path(workdir), config=config or gate_config())
    if decision.promote:
        return GateOutcome(version, decision, None)
    registry.refuse(version, decision)
    return GateOutcome(version, decision, _decision_alert(
        "model.refused", version, decision,
        f":no_entry: recloop: version {version} refused by the promotion gate: {decision.reasons[0]}", run_id))


class GateRefused(RuntimeError):
    """Promotion was asked for a version the gate refuses."""


# --------------------------------------------------------------------------------------------------
# The latency gate (recloop.latency): replayed in a separate process, recorded beside the candidate
# --------------------------------------------------------------------------------------------------

LATENCY_FILE = "latency_gate.json"
LATENCY_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class LatencyOutcome:
    """The latency gate's result for the registered candidate: `status` is `passed`, `refused` or
    `skipped` (the offline gate refused it already: nothing to measure). A refusal is already recorded in
    the registry and comes with its `model.refused` alert."""

    version: str
    status: str
    reasons: list[str]
    figures: dict[str, Any]
    decision: Any = None  # recloop.latency.LatencyDecision (None when skipped)
    alert: Alert | None = None

    @property
    def passed(self) -> bool:
        return self.status != "refused"

    def summary(self) -> dict[str, Any]:
        d = self.decision
        return {"version": self.version, "status": self.status, "reasons": list(self.reasons),
                "compared_to": d.compared_to if d is not None else None,
                "checks": dict(d.checks) if d is not None else {},
                "metrics": dict(d.metrics) if d is not None else {}, "figures": dict(self.figures)}


def _replay_env(settings: Settings) -> dict[str, str]:
    """This process's environment with `settings` spelled out: the replay reads the same stores."""
    from recloop.config import ENV_VARS

    env = dict(os.environ)
    for name, var in ENV_VARS.items():
        value = getattr(settings, name, None)
        if value is not None and value != "":
            env[var] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


def replay_latency(settings: Settings, challenger: str, champion: str | None, *, sample: int, warmup: int,
                   registry: Registry | None = None, timeout: float = LATENCY_TIMEOUT_S) -> dict[str, Any]:
    """Runs `python -m recloop.latency.replay` in a separate process (a fresh heap, no training state
    around, as a serving process) and returns what it printed; versions are downloaded from `registry`
    (default: the settings' registry). Raises RuntimeError with the replay's error line."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "recloop.latency.replay", "--challenger", str(challenger),
           "--sample", str(int(sample)), "--warmup", str(int(warmup))]
    if champion:
        cmd += ["--champion", str(champion)]
    env = _replay_env(settings)
    if registry is not None:
        env.update(RECLOOP_MLFLOW_TRACKING_URI=registry.tracking_uri, RECLOOP_MODEL_NAME=registry.model_name)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"the latency replay of version {challenger} failed: {error}")
    return json.loads(lines[-1])


def _latency_gate_decision(version: str, decision: Any) -> GateDecision:
    """The latency refusal as the registry records decisions (tags on the version, a run in the log)."""
    from recloop.registry import GateDecision

    return GateDecision(promote=False, reasons=["latency gate: " + r for r in decision.reasons],
                        checks={f"latency.{k}": v for k, v in decision.checks.items()},
                        compared_to=decision.compared_to, primary_metric="p99_ms",
                        metrics={f"latency.{k}" if "." not in k else k: v for k, v in decision.metrics.items()})


def check_latency(registry: Registry, workdir: Path, *, settings: Settings | None = None, config: Any = None,
                  gate: GateConfig | None = None, run_id: str) -> LatencyOutcome:
    """The latency gate of the registered candidate (`recloop.latency`): a sample of real requests
    replayed against its bundle and the champion's in a separate process, then the rule of
    `recloop.latency.gate.decide_latency`. The outcome is written beside the candidate (`latency_refusal`
    reads it: `promote_candidate` refuses what this refused); a refusal is recorded in the registry with
    the figures (`Registry.refuse`) and alerted. A candidate the offline gate refuses (its evaluation in
    `workdir` says so) is not measured."""
    from recloop import model_plane
    from recloop.latency.gate import LatencyConfig, decide_latency

    version = candidate_version(workdir)
    config = config or LatencyConfig.from_env()
    path = Path(workdir) / LATENCY_FILE
    path.unlink(missing_ok=True)
    evaluated = (Path(workdir) / model_plane.steps.EVALUATION).is_file()
    offline = model_plane.gate_decision(Path(workdir), config=gate or gate_config()) if evaluated else None
    if offline is not None and not offline.promote:
        return LatencyOutcome(version, "skipped", [f"not measured: the promotion gate refused version {version}"], {})
    current = registry.champion()
    champion = str(current.version) if current is not None and str(current.version) != version else None
    figures = replay_latency(settings or Settings.from_env(), version, champion, sample=config.sample,
                             warmup=config.warmup, registry=registry)
    decision = decide_latency(figures["challenger"], figures.get("champion"), config,
                              champion_version=(figures.get("champion") or {}).get("version"))
    status = "passed" if decision.passed else "refused"
    reasons = list(decision.reasons) + ([f"champion not replayed: {figures['champion_error']}"]
                                        if figures.get("champion_error") else [])
    path.write_text(json.dumps(jsonable({"version": version, "status": status, "reasons": reasons,
                                         "decision": decision.to_dict(), "figures": figures}), indent=1))
    if decision.passed:
        return LatencyOutcome(version, status, reasons, figures, decision)
    recorded = _latency_gate_decision(version, decision)
    registry.refuse(version, recorded)
    return LatencyOutcome(version, status, reasons, figures, decision, _decision_alert(
        "model.refused", version, recorded,
        f":no_entry: recloop: version {version} refused by the latency gate: {decision.reasons[0]}", run_id))


def latency_refusal(workdir: Path) -> str | None:
    """Why the latency gate refused the candidate in `workdir`, or None (passed, skipped or not run)."""
    path = Path(workdir) / LATENCY_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "refused" or str(record.get("version")) != candidate_version(workdir):
        return None
    return f"version {record['version']} did not pass the latency gate: {record['reasons'][0]}"


@dataclass(frozen=True)
class Promotion:
    """The candidate is champion; the decision recorded, the `model.promoted` alert to send. With online
    experiments on (`online_experiments_enabled`) and a champion present, the candidate is put under the
    `experiment` alias instead: `experiment` holds the experiment id, `version` stays the candidate's,
    the champion does not change and there is no alert (the experiment's conclusion alerts)."""

    version: str
    decision: GateDecision
    lineage: list[str]
    alert: Alert | None
    experiment: str | None = None
    note: str = ""

    def summary(self) -> dict[str, Any]:
        out = {"champion": self.lineage[-1] if self.experiment and self.lineage else self.version,
               "compared_to": self.decision.compared_to, "lineage": list(self.lineage),
               "reasons": list(self.decision.reasons)}
        if self.experiment or self.note:
            out.update({"experiment": self.experiment or "", "candidate": self.version, "note": self.note})
        return out


def promote_candidate(registry: Registry, workdir: Path, *, config: GateConfig | None = None, run_id: str) -> Promotion:
    """Moves `champion` to the registered candidate after the gate passed it, records the decision (when,
    why, the metrics). Raises `GateRefused` when the gate does not pass it. A retried promotion that
    finds the candidate champion already does not promote it twice."""
    if (latency := latency_refusal(workdir)) is not None:  # the latency gate refused it (check_latency)
        raise GateRefused(latency)
    from recloop import model_plane

    version = candidate_version(workdir)
    decision = model_plane.gate_decision(Path(workdir), config=config or gate_config())
    if not decision.promote:
        raise GateRefused(f"version {version} did not pass the promotion gate: {decision.reasons[0]}")
    current = registry.champion()
    if current is not None and str(current.version) != version and online_experiments_enabled():
        # A champion to experiment against: live traffic decides (recloop.online), not this step.
        return _start_experiment(registry, version, decision)
    if current is None or str(current.version) != version:
        skipped = model_plane.load_evaluation(Path(workdir)).extras.get("champions_skipped", [])
        registry.promote(version, decision, unloadable=[s["version"] for s in skipped])
    return Promotion(version, decision, registry.lineage(), _decision_alert(
        "model.promoted", version, decision,
        f":white_check_mark: recloop: version {version} is the new champion: {decision.reasons[0]}", run_id))


def _start_experiment(registry: Registry, version: str, decision: GateDecision) -> Promotion:
    """The gate-passing candidate under the `experiment` alias (`Registry.start_experiment`); while
    another version's experiment runs the candidate waits, said in `note` (a retried step that finds its
    own experiment running changes nothing)."""
    from recloop.registry import RegistryError

    try:
        experiment = registry.start_experiment(version, decision)
    except RegistryError as err:
        log.info("%s", err)
        return Promotion(version, decision, registry.lineage(), None, None, str(err))
    return Promotion(version, decision, registry.lineage(), None, experiment,
                     f"version {version} passed the gate and is under online experiment {experiment} against "
                     f"champion v{registry.lineage()[-1] if registry.lineage() else '?'}")
