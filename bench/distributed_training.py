"""Distributed two-tower training: samples/s with 1 and 2 processes (PyTorch DDP under torchrun, gloo).

Simulates `--days` days x `--events-per-day` impressions (default 10 x 100k = 1M events) plus one more
day held out, then trains the same two-tower config (TwoTowerConfig's defaults unless told) three ways:

* 1 process, 1 torch thread;
* 1 process, all the threads (`--threads`, default the available cores): today's path;
* `--processes` processes (default 2) under torchrun, the threads shared (1 each on 2 cores).

For each: training samples/s (examples of all ranks / wall time of the training loop), the wall time of
the call (for DDP: preparing the examples once, writing them for the ranks, starting torchrun and its
workers, training, loading the weights back), the epoch losses, and the quality of the model: Recall@k of
exact retrieval over the catalog for the held-out day's positive (user, video) pairs; and the CPU time
of the training loop (all threads, all ranks) with samples per CPU-second. Prints one JSON object. The
machine may be shared with other work: wall-clock speed-ups then depend on the cores the run was given;
samples per CPU-second (how much work the split adds) does much less.

    python bench/distributed_training.py
    python bench/distributed_training.py --events-per-day 20000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--events-per-day", type=int, default=100_000)
    parser.add_argument("--initial-users", type=int, default=20_000)
    parser.add_argument("--initial-videos", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, help="default: TwoTowerConfig's")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads of the single process (default: the cores)")
    parser.add_argument("--k", type=int, default=100, help="Recall@k of the held-out day")
    parser.add_argument("--sparse-ids", action="store_true",
                        help="sparse id-table gradients (SparseAdam; gloo all-reduces them as sparse tensors)")
    parser.add_argument("--skip-one-thread", action="store_true", help="skip the 1-process 1-thread run")
    parser.add_argument("--skip-threads", action="store_true",
                        help="skip the 1-process all-threads run (slow when other work holds the cores)")
    args = parser.parse_args()

    import pyarrow as pa
    import torch

    from recloop.data.simulator import SimConfig, Simulator
    from recloop.distributed import available_cpus
    from recloop.training import TwoTowerConfig, Window, retrieval_recall_at_k, train_two_tower

    threads = args.threads or available_cpus()
    sim_config = SimConfig(
        seed=7, days=args.days + 1, events_per_day=args.events_per_day, initial_users=args.initial_users,
        initial_videos=args.initial_videos, new_users_per_day=max(100, args.initial_users // 100),
        new_videos_per_day=max(60, args.initial_videos // 100),
    )
    out: dict = {"benchmark": "distributed_training", "cpus": os.cpu_count(), "available_cpus": available_cpus(),
                 "torch": torch.__version__, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    sim = Simulator(sim_config)
    days = [sim.day(i) for i in range(sim_config.days)]
    tables = {k: pa.concat_tables([d[k] for d in days[:-1]]) for k in ("users", "videos", "events")}
    window = Window.from_tables(tables["events"], tables["videos"], tables["users"])
    held_out = days[-1]["events"].to_pandas()
    out.update(events=len(window.events), held_out_events=len(held_out), videos=len(window.videos),
               simulate_seconds=round(time.perf_counter() - t0, 2))

    base = TwoTowerConfig(**({"epochs": args.epochs} if args.epochs else {}), sparse_ids=args.sparse_ids)
    runs = {}
    plan = [("1_process_1_thread", 1, 1)] if not args.skip_one_thread else []
    if threads > 1 and not args.skip_threads:
        plan.append((f"1_process_{threads}_threads", 1, threads))
    if not plan:
        plan.append(("1_process_1_thread", 1, 1))
    plan.append((f"{args.processes}_processes", args.processes, threads))
    for name, processes, n_threads in plan:
        config = TwoTowerConfig(**{**vars(base), "processes": processes, "num_threads": n_threads})
        t0 = time.perf_counter()
        tt = train_two_tower(window, config)
        wall = time.perf_counter() - t0
        recall = retrieval_recall_at_k(tt, held_out, args.k)
        run = {
            "processes": processes,
            "threads": n_threads,
            "examples": tt.n_examples,
            "samples_per_s": round(tt.samples_per_s),
            "train_seconds": round(tt.train_seconds, 2),
            # CPU time of the loop (all threads, all ranks): on a shared machine, samples per CPU-second
            # says whether the work divides without waste, whatever share of the cores the run got.
            "train_cpu_seconds": round(tt.train_cpu_seconds, 2),
            "samples_per_cpu_s": round(tt.samples_per_s * tt.train_seconds / tt.train_cpu_seconds)
            if tt.train_cpu_seconds > 0 else None,
            "wall_seconds": round(wall, 2),
            "epoch_losses": [round(x, 4) for x in tt.epoch_losses],
            f"held_out_recall_at_{args.k}": round(recall["recall"], 4),
            "held_out_pairs": recall["pairs"],
        }
        if tt.distributed:
            info = tt.distributed
            run["distributed"] = {"backend": info["backend"], "world_size": info["world_size"],
                                  "launch_seconds": info["launch_seconds"],
                                  "threads_per_rank": [r["threads"] for r in info["ranks"]],
                                  "cpu_seconds_per_rank": [r["cpu_seconds"] for r in info["ranks"]],
                                  "examples_per_rank": [r["own_examples"] for r in info["ranks"]]}
        runs[name] = run
        print(f"{name}: {run['samples_per_s']} samples/s, recall@{args.k} {run[f'held_out_recall_at_{args.k}']}",
              file=sys.stderr)
    out["config"] = {k: getattr(base, k) for k in ("epochs", "batch_size", "softmax_group", "id_dim", "hidden_dim",
                                                    "out_dim", "sparse_ids")}
    out["runs"] = runs
    multi = runs[f"{args.processes}_processes"]
    # samples/s of the DDP run over each single-process run's; wall: the whole call, launch included.
    out["speedup"] = {
        name: {"samples_per_s": round(multi["samples_per_s"] / run["samples_per_s"], 3),
               "wall": round(run["wall_seconds"] / multi["wall_seconds"], 3)}
        for name, run in runs.items() if run is not multi
    }
    single = runs[plan[-2][0]]  # the last single-process run
    out[f"recall_at_{args.k}_difference"] = round(multi[f"held_out_recall_at_{args.k}"] - single[f"held_out_recall_at_{args.k}"], 4)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
