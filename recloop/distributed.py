"""Data-parallel training of the two-tower: PyTorch DistributedDataParallel in N processes started by
`torchrun`.

`recloop.training.train_two_tower` comes here when `TwoTowerConfig.processes` (default: the setting
`RECLOOP_TRAIN_PROCESSES`) is above 1. The launching process has already turned the window into training
examples (`training._prepare`: deterministic, done once); `train` writes them and the config to a
temporary job folder and runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m recloop.distributed <job folder>

(torchrun: the rendezvous, one worker per rank, and the whole group stopped as soon as one worker
fails). Every rank loads the examples (memory-mapped: the ranks share the page cache), builds the same
model from the same seed, wraps it in `DistributedDataParallel` (backend gloo on CPU; nccl on CUDA, one
process per GPU) and runs `training.train_epochs` with its rank: every optimizer step's batch is split
across the ranks by whole softmax groups and DDP averages the gradients, so each step is the
single-process step up to the order of float sums. Rank 0 writes the weights, the losses and the timing;
each rank writes what it did; the launching process loads the weights into the usual `TwoTowerResult`.

A rank that fails writes its error to the job folder, torchrun stops the others, and `train` raises a
`DistributedTrainingError` with the failing rank's message. `PROCESS_GROUP_TIMEOUT` bounds the
process group's set-up and every collective (a rank stuck in an all-reduce whose peer hangs fails after
it). Intra-op threads: the config's `num_threads` (default: the cores this process may use) shared
among the ranks, at least one each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
# How long a stopped launch may take to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 30.0
JOB_FILE = "job.json"
INPUTS_FILE = "inputs.pt"
STATE_FILE = "state_dict.pt"
RESULT_FILE = "result.json"
LOG_FILE = "torchrun.log"


class DistributedTrainingError(RuntimeError):
    """Distributed training failed: the message names the failing rank and its error."""


@dataclass
class DistributedRun:
    """What a distributed training hands back: rank 0's weights and epoch statistics, and `info` (world
    size, backend, the torchrun command, and each rank's pid, threads and examples)."""

    state_dict: dict[str, torch.Tensor]
    stats: Any  # recloop.training.EpochStats
    info: dict[str, Any] = field(default_factory=dict)


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_processes(processes: int, device: torch.device, *, sparse_ids: bool = False) -> None:
    """Raise a ValueError saying why `processes` ranks cannot train on `device` here."""
    if processes < 1:
        raise ValueError(f"training processes must be >= 1, got {processes}")
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if processes > gpus:
            raise ValueError(
                f"RECLOOP_TRAIN_PROCESSES={processes} asks for {processes} training processes on CUDA, one per GPU, "
                f"but {gpus} GPU(s) are visible: set it to at most {gpus}"
            )
        if sparse_ids and processes > 1:
            raise ValueError(
                "sparse_ids=True cannot train in several CUDA processes: NCCL does not all-reduce sparse "
                "gradients. Use sparse_ids=False (dense id tables) or train on CPU (gloo)"
            )
    elif device.type == "cpu":
        cpus = available_cpus()
        if processes > cpus:
            raise ValueError(
                f"RECLOOP_TRAIN_PROCESSES={processes} asks for {processes} training processes but this machine "
                f"gives this process {cpus} core(s): set it to at most {cpus} (more processes than cores only "
                "slows training down)"
            )
    elif processes > 1:
        raise ValueError(f"distributed training runs on CPU (gloo) or CUDA (nccl), not on {device.type!r}")


def threads_per_rank(num_threads: int | None, processes: int) -> int:
    """Intra-op threads of each rank: `num_threads` (default: the available cores) shared, at least 1."""
    total = int(num_threads) if num_threads else available_cpus()
    return max(1, total // processes)


def write_job(directory: Path, prep: Any, config: Any, device: torch.device) -> None:
    """The job folder the ranks read: `job.json` (config, model args, device, threads, timeout) and
    `inputs.pt` (the examples and the dense normalisation; tensors only)."""
    tensors = {f"ex.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in prep.examples.items()}
    tensors.update({f"stat.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in prep.stats.items()})
    torch.save(tensors, directory / INPUTS_FILE)
    job = {
        "config": asdict(config),
        "args": asdict(prep.args),
        "device": device.type,
        "threads": threads_per_rank(config.num_threads, int(config.processes)),
        "timeout_s": PROCESS_GROUP_TIMEOUT.total_seconds(),
        "launcher_pid": os.getpid(),
    }
    (directory / JOB_FILE).write_text(json.dumps(job, indent=2))


def command(directory: Path, processes: int) -> list[str]:
    """The torchrun command that trains the job in `directory` with `processes` ranks on this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "--max-restarts", "0", "-m", "recloop.distributed", str(directory),
    ]


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # The ranks import this copy of recloop, wherever the launching process found it.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["OMP_NUM_THREADS"] = str(threads)  # torchrun would set 1 and warn
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _failure(directory: Path, returncode: int, processes: int) -> DistributedTrainingError:
    errors = []
    for path in sorted(directory.glob("error-rank*.json")):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    # The first rank to fail is the cause; the others usually fail because it went away.
    errors.sort(key=lambda e: e.get("time", 0.0))
    if errors:
        first = errors[0]
        where = first.get("where")
        return DistributedTrainingError(
            f"distributed two-tower training failed on rank {first['rank']} of {processes}: "
            f"{first['type']}: {first['message']}" + (f" (at {where})" if where else "")
        )
    log = directory / LOG_FILE
    text = log.read_text(errors="replace") if log.exists() else ""
    if "SignalException" in text:
        why = "torchrun was stopped by a signal"
    else:
        why = f"torchrun exited with code {returncode} and no rank reported an error (killed, out of memory?)"
    tail = text.strip().splitlines()[-15:]
    return DistributedTrainingError(
        f"distributed two-tower training failed: {why}; its last output:\n" + "\n".join(tail)
    )


def launch(directory: Path, processes: int, threads: int) -> dict[str, Any]:
    """Run the job in `directory` under torchrun and wait; raises `DistributedTrainingError` if it fails.
    Returns what the launch did (command, wall seconds)."""
    cmd = command(directory, processes)
    t0 = time.perf_counter()
    with open(directory / LOG_FILE, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads),
                                start_new_session=True)
        try:
            returncode = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, a run terminated): stop torchrun, which stops its workers.
            _stop(proc)
            raise
    if returncode != 0:
        raise _failure(directory, returncode, processes)
    shown = ["python", *cmd[1:-1], "<job folder>"]  # the folder is temporary
    return {"command": " ".join(shown), "launch_seconds": round(time.perf_counter() - t0, 3)}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def train(prep: Any, config: Any, device: torch.device) -> DistributedRun:
    """Train `prep` (`training._Prepared`) with `config.processes` DDP ranks under torchrun."""
    from recloop.training import EpochStats

    processes = int(config.processes)
    check_processes(processes, device, sparse_ids=bool(config.sparse_ids))
    with tempfile.TemporaryDirectory(prefix="recloop-ddp-") as tmp:
        directory = Path(tmp)
        write_job(directory, prep, config, device)
        launched = launch(directory, processes, threads_per_rank(config.num_threads, processes))
        result = json.loads((directory / RESULT_FILE).read_text())
        ranks = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(processes)]
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    # CPU time of the loop: all ranks together.
    stats = EpochStats(losses=result["losses"], seen=result["seen"], own=result["own"], seconds=result["seconds"],
                       cpu_seconds=sum(float(r["cpu_seconds"]) for r in ranks))
    info = {"processes": processes, "world_size": result["world_size"], "backend": result["backend"],
            **launched, "ranks": ranks}
    return DistributedRun(state_dict=state, stats=stats, info=info)


# --- the worker: one per rank, started by torchrun ------------------------------------------------------


def _exit_with_launcher(pid: int, every_s: float = 1.0) -> None:
    """Ends this rank when the process that launched the training is gone (killed without the chance
    to stop torchrun): a background thread polls it."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # alive, another user's
                continue

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _run_rank(directory: Path, rank: int, world: int, local_rank: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from recloop.models.two_tower import TwoTowerArgs
    from recloop.training import TwoTowerConfig, _deterministic, new_model, optimizers, train_epochs

    job = json.loads((directory / JOB_FILE).read_text())
    if job.get("launcher_pid"):
        _exit_with_launcher(int(job["launcher_pid"]))
    config = TwoTowerConfig(**job["config"])
    args = TwoTowerArgs(**job["args"])
    torch.set_num_threads(int(job["threads"]))
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=float(job["timeout_s"])),
                            device_id=device if cuda else None)
    try:
        if dist.get_world_size() != world:
            raise RuntimeError(f"process group of {dist.get_world_size()} ranks, torchrun said {world}")
        data = torch.load(directory / INPUTS_FILE, mmap=True, weights_only=True)
        ex = {k[3:]: t.to(device) for k, t in data.items() if k.startswith("ex.")}
        stats = {k[5:]: t.numpy() for k, t in data.items() if k.startswith("stat.")}
        with _deterministic(device):
            model = new_model(args, stats, config.seed).to(device).train()
            ddp = DistributedDataParallel(
                model, device_ids=[local_rank] if cuda else None, gradient_as_bucket_view=True,
                forward_sync_buffers=False,  # the buffers (dense normalisation) never change
            )
            out = train_epochs(ddp, optimizers(model, config, device), ex, config, device, rank=rank, world=world)
        (directory / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "local_rank": local_rank, "pid": os.getpid(), "world_size": dist.get_world_size(),
            "backend": dist.get_backend(), "threads": torch.get_num_threads(), "own_examples": out.own,
            "seconds": round(out.seconds, 3), "cpu_seconds": round(out.cpu_seconds, 3),
        }))
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / STATE_FILE)
            (directory / RESULT_FILE).write_text(json.dumps({
                "losses": out.losses, "seen": out.seen, "own": out.own, "seconds": out.seconds,
                "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            }))
        dist.barrier()  # nobody leaves (and tears the group down) before every rank has written
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """A rank's entry point (`python -m recloop.distributed <job folder>` under torchrun). A failure is
    written to `error-rank<r>.json` in the job folder before the worker exits non-zero."""
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m recloop.distributed <job folder>", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))

    @record  # torchrun's own failure summary shows the traceback too
    def run() -> None:
        try:
            _run_rank(directory, rank, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))
        except BaseException as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None
            (directory / f"error-rank{rank}.json").write_text(json.dumps({
                "rank": rank, "type": type(err).__name__, "message": str(err), "where": where, "time": time.time(),
                "traceback": traceback.format_exc(),
            }))
            raise

    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
