"""RECLOOP_DAGSTER_EXECUTOR=celery: the data plane and the training job with every step on Celery workers.

Two workers are started here with the documented command (`dagster-celery worker start -A
dagster_celery.app -y deploy/celery.yaml -q <queue>`) on the RabbitMQ of this machine, on a queue of
their own (no stale message of another run can reach them). The `recloop` CLI then runs, with celery
chosen, the history job (days 1-2), the data-plane job (day 3) and the training job; meanwhile a
subprocess runs the same commands in process (the default path) on a copy of the same simulated landing
zone. In the middle of the day-3 run, the worker running `silver/events` is SIGKILLed (its whole process
group, as a lost machine): the broker hands the unacknowledged task to the other worker, which runs the
step again, and the run succeeds.

Checked from Dagster's own event log: every step started in a worker process (the pid of its STEP_START,
the worker named by dagster-celery's engine event), never in the launching one; the killed step started
on both workers and succeeded once, on the survivor. Every Parquet file of the lake equals the in-process
run's row for row (the only difference allowed: Feast's `created_timestamp`, the time of writing), so no
partition was lost or doubled; the model's figures equal the in-process run's.
"""

from __future__ import annotations

import _thread
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from recloop.config import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

warnings.filterwarnings("ignore", category=UserWarning, module="dagster")

SIM = dict(seed=11, days=3, initial_users=400, initial_videos=200, events_per_day=2_000, new_users_per_day=20,
           new_videos_per_day=10)
KILLED_STEP = "silver__events"
# The whole test may take this long before the launching process is interrupted (a lost task would make
# a celery run wait for ever).
DEADLINE_S = 900

# The same lifecycle, one `recloop` process: the reference in process, on its own home.
DRIVER = """\
import json, sys
from recloop import cli
for args in json.loads(sys.argv[1]):
    code = cli.main(args)
    if code:
        sys.exit(code)
"""


def _commands(days: list[str]) -> list[list[str]]:
    return [["run", "--start", days[0], "--end", days[1], "--json"],
            ["run", "--partition", days[2], "--json"],
            ["train", "--train-days", "2", "--test-days", "1", "--json"]]


def _group_pids(proc: subprocess.Popen) -> set[int]:
    import psutil

    root = psutil.Process(proc.pid)
    return {proc.pid, *(p.pid for p in root.children(recursive=True))}


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _worker_events(inst, run_id: str) -> list[tuple[str, str, int | None, str | None]]:
    """(step, event type, pid, celery worker) of a run's step starts/successes and dagster-celery's
    "Executing steps ... in celery worker" engine events."""
    import dagster as dg

    out = []
    for entry in inst.all_logs(run_id, of_type={dg.DagsterEventType.ENGINE_EVENT, dg.DagsterEventType.STEP_START,
                                                dg.DagsterEventType.STEP_SUCCESS}):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        host = None
        if event.event_type == dg.DagsterEventType.ENGINE_EVENT:
            meta = event.engine_event_data.metadata if event.engine_event_data else {}
            if "Celery worker" not in meta:
                continue
            host = str(meta["Celery worker"].value)
        out.append((event.step_key, event.event_type_value, event.pid, host))
    return out


class Killer(threading.Thread):
    """Watches the instance for `step` of a `job` run to start on a worker, then SIGKILLs that worker's
    process group (the dagster-celery CLI, Celery's main process and its pool)."""

    def __init__(self, dagster_home: Path, job: str, step: str, workers: dict[str, subprocess.Popen]):
        super().__init__(daemon=True)
        self.dagster_home, self.job, self.step, self.workers = dagster_home, job, step, workers
        self.killed: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import dagster as dg

        with dg.DagsterInstance.from_config(str(self.dagster_home)) as inst:
            while not self.stop.is_set() and self.killed is None:
                for run in inst.get_runs(filters=dg.RunsFilter(job_name=self.job)):
                    host = None
                    for step, kind, _pid, worker in _worker_events(inst, run.run_id):
                        if step != self.step:
                            continue
                        if worker:
                            host = worker
                        elif kind == "STEP_START" and host:
                            name = host.split("@")[0]
                            _kill_group(self.workers[name])
                            self.killed = name
                            return
                self.stop.wait(0.05)


def _lake_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}


def _model_figures(dagster_home: Path) -> dict[str, dict]:
    """The numbers the training run recorded on each model asset (timings left out)."""
    import dagster as dg

    from pipelines.defs.models import ANN_INDEX, EVALUATION, RANKER, REGISTERED, TRAINING_SET, TWO_TOWER

    out = {}
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        for key in (TRAINING_SET, TWO_TOWER, ANN_INDEX, RANKER, EVALUATION, REGISTERED):
            event = inst.get_latest_materialization_event(key)
            assert event is not None, key
            meta = event.asset_materialization.metadata
            out[key.to_user_string()] = {
                k: v.value for k, v in meta.items()
                if isinstance(v.value, (int, float)) and "seconds" not in k and not k.endswith("_per_s")}
    return out


def test_data_plane_and_training_on_celery_workers_survive_a_killed_worker(tmp_path, monkeypatch, isolated_home,
                                                                           rabbitmq_url, capsys):
    import dagster as dg
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.run import dagster_home
    from recloop import cli
    from recloop.data.simulator import SimConfig, simulate
    from recloop.lake import open_lake
    from recloop.scaleout import CeleryUnavailable, listening_workers, worker_command

    t0 = time.monotonic()
    queue = f"recloop-test-{uuid.uuid4().hex[:12]}"
    settings = isolated_home(tmp_path / "celery", monkeypatch)
    for var, value in {"RECLOOP_DAGSTER_EXECUTOR": "celery", "RECLOOP_CELERY_BROKER_URL": rabbitmq_url,
                       "RECLOOP_CELERY_BACKEND_URL": "rpc://", "RECLOOP_CELERY_QUEUE": queue}.items():
        monkeypatch.setenv(var, value)
    from recloop.config import Settings

    settings = Settings.from_env()
    home = dagster_home(settings)
    with dg.DagsterInstance.from_config(str(home)) as inst:  # its SQLite storages, before two workers open them
        inst.get_runs(limit=1)
        inst.event_log_storage.get_asset_records()
        inst.schedule_storage.all_instigator_state()
    config = SimConfig(**SIM)
    simulate(config, open_lake(settings.landing_uri))
    days = [config.date_of(i).isoformat() for i in range(config.days)]

    # The in-process reference: the same landing zone in its own home, the default executor, its own process.
    ref = tmp_path / "in_process"
    shutil.copytree(settings.landing_uri, ref / "landing")
    (ref / "dagster").mkdir()
    ref_env = {k: v for k, v in os.environ.items() if not k.startswith("RECLOOP_CELERY_")
               and k != "RECLOOP_DAGSTER_EXECUTOR"}
    ref_env.update(RECLOOP_HOME=str(ref), DAGSTER_HOME=str(ref / "dagster"), PYTHONPATH=str(REPO_ROOT),
                   RECLOOP_FEAST_PROJECT=f"t{uuid.uuid4().hex[:10]}")
    (tmp_path / "driver.py").write_text(DRIVER)

    worker_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    names = {f"wa-{queue[-6:]}", f"wb-{queue[-6:]}"}
    workers: dict[str, subprocess.Popen] = {}
    logs = {}
    reference = None
    watchdog = threading.Timer(DEADLINE_S, _thread.interrupt_main)
    watchdog.daemon = True
    try:
        for name in sorted(names):
            logs[name] = open(tmp_path / f"{name}.log", "w")
            # The documented command; `--` passes Celery's own options: one step at a time per worker.
            workers[name] = subprocess.Popen(
                [*worker_command(settings), "-n", name, "--", "--concurrency=1"], cwd=REPO_ROOT, env=worker_env,
                stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)
        reference = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py"), json.dumps(_commands(days))], cwd=tmp_path, env=ref_env,
            stdout=open(tmp_path / "reference.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)

        # Workers up: both listen on the queue (asked through the broker, as `recloop` does before a run).
        deadline = time.monotonic() + 120
        listening: set[str] = set()
        while time.monotonic() < deadline:
            for name, proc in workers.items():
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            try:
                listening = {w.split("@")[0] for w in listening_workers(settings, timeout=1)}
            except CeleryUnavailable:
                listening = set()
            if listening == names:
                break
            time.sleep(1)
        assert listening == names, f"workers not ready: {listening}"
        pids = {name: _group_pids(proc) for name, proc in workers.items()}
        print(f"workers ready after {time.monotonic() - t0:.0f}s", file=sys.__stderr__)

        watchdog.start()
        killer = Killer(home, "data_plane_job", KILLED_STEP, workers)
        killer.start()
        outputs = []
        for args in _commands(days):
            code = cli.main(args)
            out, err = capsys.readouterr()
            assert code == 0, f"recloop {' '.join(args)} failed: {err[-3000:]}"
            outputs.append(json.loads(out))
        killer.stop.set()
        killer.join(5)
        print(f"celery runs done after {time.monotonic() - t0:.0f}s", file=sys.__stderr__)
        assert outputs[2]["success"] and outputs[2]["promoted"] is True, outputs[2]
        assert reference.wait(timeout=max(60.0, DEADLINE_S - (time.monotonic() - t0))) == 0, \
            (tmp_path / "reference.log").read_text()[-3000:]
        print(f"reference done after {time.monotonic() - t0:.0f}s", file=sys.__stderr__)
    finally:
        watchdog.cancel()
        for proc in workers.values():
            _kill_group(proc)
        for proc in workers.values():
            proc.wait(timeout=30)
        if reference is not None and reference.poll() is None:
            _kill_group(reference)
            reference.wait(timeout=30)
        for log in logs.values():
            log.close()
        from kombu import Connection

        with Connection(rabbitmq_url) as conn:  # the test's queue, with whatever is left in it
            conn.default_channel.queue_delete(queue)

    # Every step of every run (history, feast apply, data plane, training) ran in a worker process.
    launching = os.getpid()
    worker_pids = set().union(*pids.values())
    hosts_seen: set[str] = set()
    with dg.DagsterInstance.from_config(str(home)) as inst:
        runs = inst.get_runs()
        assert {r.job_name for r in runs} == {"history_job", "feast_apply_job", "data_plane_job", "training_job"}
        for run in runs:
            assert run.status == dg.DagsterRunStatus.SUCCESS, run.job_name
            events = _worker_events(inst, run.run_id)
            starts = [(step, pid) for step, kind, pid, _ in events if kind == "STEP_START"]
            assert starts, run.job_name
            for step, pid in starts:
                assert pid != launching and pid in worker_pids, (run.job_name, step, pid)
            on = {step: host.split("@")[0] for step, _, _, host in events if host}
            assert {step for step, _ in starts} <= set(on), run.job_name
            hosts_seen |= set(on.values())
            if run.job_name == "data_plane_job":
                killed_run = run.run_id
        assert hosts_seen == names, "both workers took steps"

        # The killed worker's step started there, was handed to the other worker, and succeeded once, there.
        assert killer.killed in names
        survivor = (names - {killer.killed}).pop()
        assert workers[killer.killed].returncode == -signal.SIGKILL
        target = [(kind, pid, host) for step, kind, pid, host in _worker_events(inst, killed_run) if step == KILLED_STEP]
        hosts = [host.split("@")[0] for _, _, host in target if host]
        assert hosts == [killer.killed, survivor], target
        started = [pid for kind, pid, _ in target if kind == "STEP_START"]
        assert len(started) == 2 and started[0] in pids[killer.killed] and started[1] in pids[survivor], target
        succeeded = [pid for kind, pid, _ in target if kind == "STEP_SUCCESS"]
        assert len(succeeded) == 1 and succeeded[0] in pids[survivor], target

    # The lake equals the in-process run's, file for file and row for row: nothing lost, nothing doubled.
    ours, theirs = _lake_files(Path(settings.lake_uri)), _lake_files(ref / "lake")
    assert set(ours) == set(theirs) and any(f"date={days[2]}" in k for k in ours)
    assert any(k.startswith(f"silver/events/date={days[2]}") for k in ours)
    for name in ours:
        a, b = pq.read_table(ours[name]), pq.read_table(theirs[name])
        assert a.num_rows == b.num_rows and a.column_names == b.column_names, name
        for column in a.column_names:
            if column == "created_timestamp":  # Feast's write time
                continue
            x, y = a.column(column), b.column(column)
            if pa.types.is_floating(x.type):  # DuckDB's parallel sums: the last bits depend on the threads
                assert x.null_count == y.null_count and np.allclose(
                    x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), rtol=1e-9, atol=1e-9,
                    equal_nan=True), (name, column)
            else:
                assert x.equals(y), (name, column)

    # The model trained on the workers is the one trained in process (same data, same seeds).
    assert _model_figures(home) == _model_figures(ref / "dagster")
    print(f"test took {time.monotonic() - t0:.0f}s", file=sys.__stderr__)
