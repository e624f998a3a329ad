"""Running the code location's jobs from Python (the `recloop` CLI, benchmarks, tests) against the same
Dagster instance the UI reads, so every run shows up in `dagster dev` afterwards.

Runs started here execute in this process (as `execute_in_process` does) with the `multiprocess` and
`in_process` executors (`RECLOOP_DAGSTER_EXECUTOR`): those apply to runs the webserver, schedules and
sensors launch through the daemon. With `celery` the run's steps go to the Celery workers here too (the
job executed as a reconstructable job with its own executor, so a worker can load it): a user who chose
workers sees the CLI's runs on them, and is told at once when no worker listens. In production the
instance is deploy/dagster.yaml (PostgreSQL), so runs started here are recorded where the deployment's UI
reads them.

Each run is created with the origin of the code location the UI loads (`job_origin`: the location
`recloop` of pyproject.toml's [tool.dagster], which `make ui` and the compose stack's workspace both load),
as a run the webserver launched would be: it is listed under its job, its schedule or sensor, and on the
Overview timeline (which leaves out runs without an origin), and can be re-executed from the UI."""

import os
import uuid
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from recloop.config import REPO_ROOT, Settings

DAGSTER_YAML = """\
# Written by recloop for the embedded default: runs, events and schedules in SQLite under this folder.
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 2
    tag_concurrency_limits:
      - key: recloop/stage
        value: history
        limit: 1
"""


# The production instance (dagster-postgres; its URL from RECLOOP_DAGSTER_PG_URL).
PRODUCTION_DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"


def dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME if set, else `<RECLOOP_HOME>/dagster`, created with a dagster.yaml when it has none:
    the embedded default's (SQLite under that folder) locally, deploy/dagster.yaml (PostgreSQL) in
    production. An existing dagster.yaml is the deployment's own and is left as it is."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.home / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(PRODUCTION_DAGSTER_YAML.read_text() if settings.is_production else DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


# The code location as the UI loads it: pyproject.toml's [tool.dagster] (`make ui` runs `dagster dev`
# on it), and deploy/workspace.yaml's location name (tests/integration/test_compose.py checks they agree).
MODULE = "pipelines.definitions"
LOCATION = "recloop"


def job_origin(job_name: str) -> Any:
    """The `RemoteJobOrigin` of `job_name` in the code location the UI loads: what Dagster gives a run
    the webserver launches, and what the UI groups runs by (repository `__repository__@recloop`)."""
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=MODULE,
                                  working_directory=str(REPO_ROOT))
    location = ManagedGrpcPythonEnvCodeLocationOrigin(loadable_target_origin=target, location_name=LOCATION)
    # A `Definitions` object's repository is `__repository__` (dagster's SINGLETON_REPOSITORY_NAME).
    return RemoteJobOrigin(repository_origin=RemoteRepositoryOrigin(location, "__repository__"), job_name=job_name)


def _execute(job: dg.JobDefinition, *, inst: dg.DagsterInstance, partition_key: str | None, tags: dict[str, str] | None,
             run_config: dict[str, Any], run_id: str | None = None, on_workers: bool = False) -> Any:
    """`job.execute_in_process(...)` (in-process executor, in-memory IO), the run created with the code
    location's origin (`job_origin`). With `on_workers`, the run of `job` with the job's own executor
    instead (the Celery executor: each step a task the workers load the job for, through
    `reconstructable_job`), which needs the persistent instance the workers share (DAGSTER_HOME).
    Raises `dg.DagsterUnknownPartitionError` for a day that is not one of the job's partitions, as
    `execute_in_process` does."""
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.execution.api import create_execution_plan, execute_run
    from dagster._core.execution.execute_in_process import merge_run_tags

    if on_workers:
        if not inst.is_persistent:
            from recloop.scaleout import CeleryUnavailable

            raise CeleryUnavailable("RECLOOP_DAGSTER_EXECUTOR=celery needs a persistent Dagster instance shared "
                                    "with the workers: set DAGSTER_HOME")
        job_def, runnable = job, reconstructable_job(job.name)
    else:
        job_def = job.as_ephemeral_job(resource_defs={}, input_values={})
        runnable = InMemoryJob(job_def=job_def)
    if partition_key and job_def.partitions_def:
        with partition_loading_context(dynamic_partitions_store=inst) as ctx:
            job_def.validate_partition_key(partition_key=partition_key, selected_asset_keys=set(), context=ctx)
    run_tags = merge_run_tags(job_def=job, partition_key=partition_key, tags=tags, asset_selection=[],
                              instance=inst, run_config=run_config)
    instance_ref = inst.get_ref() if inst.is_persistent else None
    if on_workers:
        plan = create_execution_plan(runnable, run_config=run_config, instance_ref=instance_ref, tags=run_tags)
        code_origin = {"job_code_origin": runnable.get_python_origin()}
    else:
        plan = create_execution_plan(runnable, run_config=run_config, instance_ref=instance_ref)
        code_origin = {}
    run = inst.create_run_for_job(job_def=job_def, run_config=run_config, tags={**job_def.run_tags, **run_tags},
                                  execution_plan=plan, remote_job_origin=job_origin(job.name), run_id=run_id,
                                  **code_origin)
    return execute_run(runnable, run, inst)


def reconstructable_job(job_name: str) -> Any:
    """`job_name` of the code location as a `ReconstructableJob`: a pointer (module `pipelines.definitions`,
    its `defs`) that another process, a Celery worker, loads the job from."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repository = ReconstructableRepository.for_module(MODULE, "defs", working_directory=str(REPO_ROOT))
    return repository.get_reconstructable_job(job_name)


_WORKERS_SEEN: set[tuple[str, str]] = set()


def _check_workers(settings: Settings) -> None:
    """With RECLOOP_DAGSTER_EXECUTOR=celery: a worker listens on the queue (asked once per process), else
    `recloop.scaleout.CeleryUnavailable` (one sentence naming the broker or queue) before any run starts."""
    from recloop.scaleout import listening_workers

    key = (settings.celery_broker_url or "", settings.celery_queue)
    if key not in _WORKERS_SEEN:
        listening_workers(settings)
        _WORKERS_SEEN.add(key)


def instance(settings: Settings) -> dg.DagsterInstance:
    """The Dagster instance of this deployment (the one the UI and the daemon read)."""
    dagster_home(settings)
    return dg.DagsterInstance.get()


DEBUG_ENV = "RECLOOP_DEBUG"


def debugging() -> bool:
    """Whether RECLOOP_DEBUG (or `recloop --debug`) asks for Dagster's own log and tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def console_log_level(level: str | None = None) -> str:
    """The console log level of runs started here: `level` when given, INFO when debugging, else CRITICAL.
    Quiet by default: the caller summarises the run (with the reason of a failure), and Dagster's console
    log would repeat each failure as a stack trace (the Dagster UI keeps the full log either way)."""
    if level:
        return level
    return "INFO" if debugging() else "CRITICAL"


@dataclass
class PartitionRun:
    partition: str
    run_id: str
    success: bool
    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    check_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_descriptions: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None


def metadata_values(metadata: Any) -> dict[str, Any]:
    """Dagster metadata (name → MetadataValue) as plain values."""
    return {k: getattr(v, "value", v) for k, v in (metadata or {}).items()}


def root_cause(error: Any) -> str:
    """The innermost message of a Dagster SerializableErrorInfo chain: the user's exception, not
    Dagster's "Error occurred while executing op" wrapper."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return error.message.strip()


def _failed_check_reasons(run: "PartitionRun", stopping: set[str]) -> list[str]:
    """One phrase per blocking check that failed with ERROR severity (the ones that stop a run), with its
    reason: the check's description (the GX failures: missing column X, unreadable file F, ...)."""
    return [f"{name} failed: {run.check_descriptions.get(name) or 'see the run in the Dagster UI'}"
            for name, ok in run.checks.items() if not ok and name in stopping]


def _forward_events(inst: dg.DagsterInstance | None, run_id: str, label: str) -> None:
    """The run's events to `recloop.progress.run_event` as Dagster stores them, when a reporter listens
    (the `recloop` command's progress display: the step running, the steps done)."""
    from recloop import progress

    if inst is None or not progress.listening():
        return

    def forward(entry: Any) -> None:
        event = entry.dagster_event
        if event is not None:
            progress.run_event(label, event.event_type_value, event.step_key)

    inst.add_event_listener(run_id, forward)


def run_job(
    job_name: str,
    *,
    partition: str | None = None,
    inst: dg.DagsterInstance | None = None,
    log_level: str | None = None,
    run_config_ops: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    run_config_resources: dict[str, Any] | None = None,
) -> PartitionRun:
    """Executes `job_name` (for `partition`) in process (with RECLOOP_DAGSTER_EXECUTOR=celery: its steps on
    the Celery workers, after checking one listens), recorded in `inst` as a run of the code location the
    UI loads (`job_origin`), and collects what it materialized and checked.
    A partition outside the deployment's daily partitions raises `recloop.partition_range.OutsideRange`
    (one sentence) before anything runs. A failed run's `error` names the cause: the reasons of the checks
    that stopped it (a GX schema failure says which column is missing or which file is unreadable), else
    the failing step's own exception. The console log is quiet unless asked (`console_log_level`)."""
    from pipelines.definitions import defs

    job = defs().resolve_job_def(job_name)
    settings = Settings.from_env()
    on_workers = inst is not None and settings.dagster_executor == "celery"
    if on_workers:
        _check_workers(settings)
    rng = None
    if partition is not None and job.partitions_def is not None:
        from recloop import partition_range

        rng = partition_range.resolve()
        rng.check(partition, what="partition")
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": console_log_level(log_level)}}},
                                  "ops": run_config_ops or {}}
    if run_config_resources:
        run_config["resources"] = run_config_resources
    run_id = str(uuid.uuid4())
    _forward_events(inst, run_id, f"{job_name} {partition}" if partition else job_name)
    try:
        if inst is None:  # no instance to record in: an ephemeral one, as Dagster's own default
            result = job.execute_in_process(partition_key=partition, tags=tags, raise_on_error=False,
                                            run_config=run_config, run_id=run_id)
        else:
            result = _execute(job, inst=inst, partition_key=partition, tags=tags, run_config=run_config,
                              run_id=run_id, on_workers=on_workers)
    except dg.DagsterUnknownPartitionError:
        # The range changed between the check and the load (data landed or removed meanwhile).
        from recloop.partition_range import OutsideRange

        raise OutsideRange(f"partition {partition} is not one of the job's daily partitions"
                           + (f" ({rng.describe()})" if rng else "") + "; give a day in that range") from None
    out = PartitionRun(partition=partition or "", run_id=result.run_id, success=result.success)
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        out.materialized[mat.asset_key.to_user_string()] = metadata_values(mat.metadata)
    stopping: set[str] = set()
    for evaluation in result.get_asset_check_evaluations():
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        out.checks[name] = evaluation.passed
        out.check_metadata[name] = metadata_values(evaluation.metadata)
        out.check_descriptions[name] = evaluation.description or ""
        if evaluation.blocking and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            stopping.add(name)
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        skipped = [e.step_key for e in result.all_events if e.is_step_skipped]
        out.skipped = sorted(k for k in skipped if k)
        checks_failed = _failed_check_reasons(out, stopping)
        errors = [(e.step_key, e.step_failure_data.error) for e in failures
                  if e.step_failure_data and e.step_failure_data.error]
        # Dagster's "N blocking asset checks failed" names the checks, not why: their descriptions do.
        own = [f"{step}: {root_cause(err)}" for step, err in errors if err.cls_name != "DagsterAssetCheckFailedError"]
        out.error = "; ".join(checks_failed + own[:1]) or (
            f"{failures[0].step_key}: failed" if failures else "run failed")
    return out


def run_history(first: str | None = None, last: str | None = None, *, settings: Settings | None = None,
                inst: dg.DagsterInstance | None = None, log_level: str | None = None) -> PartitionRun:
    """The history job over `[first, last]` (default: every day the landing zone holds events for) in ONE
    run: ingest → GX → silver/quarantine → features → `feast apply` → the newest snapshot online."""
    settings = settings or Settings.from_env()
    config = {k: v for k, v in (("first", first), ("last", last)) if v}
    tags = {"recloop/history_first": first or "", "recloop/history_last": last or ""}
    return run_job("history_job", inst=inst or instance(settings), log_level=log_level,
                   run_config_resources={"history_range": {"config": config}} if config else None,
                   tags={k: v for k, v in tags.items() if v})


def run_data_plane(partitions: list[str], *, settings: Settings | None = None) -> list[PartitionRun]:
    """`feast apply`, then the data plane job for each partition in order (each run replaces its day)."""
    settings = settings or Settings.from_env()
    inst = instance(settings)
    runs = [run_job("feast_apply_job", inst=inst)]
    for p in partitions:
        runs.append(run_job("data_plane_job", partition=p, inst=inst))
    return runs


@dataclass
class SensorTick:
    cursor: str | None
    runs: list[PartitionRun] = field(default_factory=list)
    skip_reason: str | None = None
    duplicate_run_keys: list[str] = field(default_factory=list)


def tick_sensor(
    sensor_name: str,
    *,
    inst: dg.DagsterInstance,
    cursor: str | None = None,
    run_config_ops: dict[str, Any] | None = None,
    log_level: str | None = None,
) -> SensorTick:
    """One evaluation of a sensor, the way the Dagster daemon does it, with its run requests executed in
    process: a request whose run key already has a run of this sensor is dropped (the daemon's rule that
    makes a re-evaluated tick harmless), the others run with the daemon's `dagster/sensor_name` and
    `dagster/run_key` tags. For the demo, benchmarks and tests; in a deployment the daemon ticks."""
    from pipelines.definitions import defs

    resolved = defs()
    sensor = resolved.resolve_sensor_def(sensor_name)
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=inst, cursor=cursor, definitions=resolved))
    tick = SensorTick(cursor=data.cursor, skip_reason=data.skip_message)
    for request in data.run_requests or []:
        key_tags = {"dagster/sensor_name": sensor_name, "dagster/run_key": request.run_key}
        if request.run_key and inst.get_runs(filters=dg.RunsFilter(tags=key_tags), limit=1):
            tick.duplicate_run_keys.append(request.run_key)
            continue
        job_name = request.job_name or sensor.job_name
        tick.runs.append(run_job(job_name, inst=inst, log_level=log_level, run_config_ops=run_config_ops,
                                 tags={**request.tags, **key_tags}))
    return tick
