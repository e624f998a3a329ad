"""Model-plane benchmark: two-tower training, ANN index build + recall, and the whole multi-stage fit, on
1M events.

Simulates 10 days x 100k impressions in memory (recloop.data.simulator), trains the two-tower model on
all of them, builds the ANN index over the catalog's video embeddings and measures its recall@100 against
exact search (queries: the users' embeddings), then runs the model plane's training loop
(`recloop.model_plane.fit.fit_recommender`: EASE and the two-tower on time folds, the LambdaRank ranker on
their candidate lists with the feature snapshots of a temporary local lake). Prints one JSON object:
samples/s and wall time of each part, index build time and recall, the fit's time per step, peak memory,
and a single-thread matmul speed of this machine for comparing runs across machines.

    python bench/training.py                          # 1M events, torch threads = os.cpu_count()
    python bench/training.py --events-per-day 20000 --two-tower-epochs 1

Target on 2 cores: >= 100k two-tower training samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

from _util import PeakRSS  # noqa: E402 - bench/ is on sys.path when run as a script


def matmul_gflops() -> float:
    """Single-thread float32 GFLOP/s of a 512x512x512 matmul: how fast this machine is."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        for _ in range(3):
            a @ b
        n, t0 = 20, time.perf_counter()
        for _ in range(n):
            a @ b
        return round(2 * 512**3 * n / (time.perf_counter() - t0) / 1e9, 1)
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--events-per-day", type=int, default=100_000)
    parser.add_argument("--initial-users", type=int, default=20_000)
    parser.add_argument("--initial-videos", type=int, default=10_000)
    parser.add_argument("--two-tower-epochs", type=int, help="default: TwoTowerConfig's")
    parser.add_argument("--ranker-rounds", type=int, help="most LambdaRank boosting rounds (default: RankerConfig's)")
    parser.add_argument("--index", choices=("hnsw", "ivf", "flat"), default="hnsw")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-ranker", action="store_true", help="skip the multi-stage fit")
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch

    from recloop.data.simulator import SimConfig, Simulator
    from recloop.features import compute_features
    from recloop.index import AnnIndex, recall_at_k
    from recloop.lake import LocalLake
    from recloop.model_plane import fit_config
    from recloop.model_plane.fit import fit_recommender
    from recloop.model_plane.history import History
    from recloop.model_plane.ranker import RankerConfig
    from recloop.model_plane.store import LakeSnapshots
    from recloop.training import TwoTowerConfig, Window, train_two_tower, user_embeddings, video_embeddings

    torch.set_num_threads(args.threads)
    gflops = matmul_gflops()
    config = SimConfig(
        seed=7,
        days=args.days,
        events_per_day=args.events_per_day,
        initial_users=args.initial_users,
        initial_videos=args.initial_videos,
        new_users_per_day=max(100, args.initial_users // 100),
        new_videos_per_day=max(60, args.initial_videos // 100),
    )
    out: dict = {"benchmark": "training", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    out["machine"] = {"matmul_gflops_1_thread": gflops}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        sim = Simulator(config)
        days = [sim.day(i) for i in range(config.days)]
        tables = {k: pa.concat_tables([d[k] for d in days]) for k in ("users", "videos", "events")}
        window = Window.from_tables(tables["events"], tables["videos"], tables["users"])
        out.update(
            events=len(window.events), days=config.days, users=len(window.users), videos=len(window.videos),
            simulate_seconds=round(time.perf_counter() - t0, 2),
        )

        # --- two-tower ------------------------------------------------------------------------------
        tt_config = TwoTowerConfig(**({"epochs": args.two_tower_epochs} if args.two_tower_epochs else {}))
        t0 = time.perf_counter()
        tt = train_two_tower(window, tt_config)
        wall = time.perf_counter() - t0
        out["two_tower"] = {
            "examples": tt.n_examples,
            "epochs": tt_config.epochs,
            "batch_size": tt_config.batch_size,
            "dims": {"id": tt_config.id_dim, "hidden": tt_config.hidden_dim, "out": tt_config.out_dim},
            "samples_per_s": round(tt.samples_per_s),
            "train_seconds": round(tt.train_seconds, 2),
            "wall_seconds": round(wall, 2),
            "epoch_losses": [round(x, 4) for x in tt.epoch_losses],
        }
        # The same training for one epoch on one thread: how much the second core adds here.
        one = train_two_tower(window, TwoTowerConfig(**{**vars(tt_config), "epochs": 1, "num_threads": 1}))
        out["two_tower"]["samples_per_s_1_thread"] = round(one.samples_per_s)
        del one

        # --- ANN index ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        ids, vectors = video_embeddings(tt)
        embed_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        users = window.users["user_id"].to_numpy()
        queries = user_embeddings(tt, rng.choice(users, size=min(2000, len(users)), replace=False))
        index_out = {"videos": len(ids), "embed_seconds": round(embed_s, 2)}
        for kind in dict.fromkeys([args.index, "ivf"]):
            t0 = time.perf_counter()
            index = AnnIndex.build(ids, vectors, kind=kind)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            recall = recall_at_k(index, queries, k=100)
            index_out[kind] = {
                "build_seconds": round(build_s, 3),
                "recall_at_100": round(recall, 4),
                "params": index.params,
                "recall_seconds_2000_queries": round(time.perf_counter() - t0, 3),
            }
        out["index"] = index_out

        # --- the multi-stage fit --------------------------------------------------------------------
        if not args.skip_ranker:
            lake_dir = tempfile.mkdtemp(prefix="recloop-bench-training-")
            try:
                lake = LocalLake(lake_dir)
                t0 = time.perf_counter()
                for i, d in enumerate(days):
                    p = config.date_of(i).isoformat()
                    for k in ("users", "videos", "events"):
                        lake.write_partition(f"silver/{k}", p, d[k])
                for i in range(config.days):
                    compute_features(lake, config.date_of(i).isoformat())
                features_s = time.perf_counter() - t0
                ranker = RankerConfig(**({"max_rounds": args.ranker_rounds} if args.ranker_rounds else {}))
                t0 = time.perf_counter()
                fitted = fit_recommender(History.from_window(window), store=LakeSnapshots(lake),
                                         config=fit_config(two_tower=tt_config, ranker=ranker))
                report = fitted.report.to_dict()
            finally:
                shutil.rmtree(lake_dir, ignore_errors=True)
            out["fit"] = {
                "wall_seconds": round(time.perf_counter() - t0, 2),
                "feature_snapshots_seconds": round(features_s, 2),
                "seconds": report["seconds"],
                "folds": [{k: f[k] for k in ("name", "events", "users", "rows", "seconds")} for f in report["folds"]],
                "ranker_rows": report["ranker"]["train_rows"],
                "ranker_best_iteration": report["ranker"]["best_iteration"],
                "valid_ndcg_at_10": round(max(report["ranker"]["curves"].get("valid_ndcg@10") or [float("nan")]), 4),
                "source_recall": {k: round(v, 4) for k, v in report["source_recall"].items()},
            }
    out["peak_rss_mb"] = round(rss.peak / 2**20)
    out["max_rss_mb_kernel"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["target"] = {"two_tower_samples_per_s": 100_000}
    out["meets_target"] = out["two_tower"]["samples_per_s"] >= 100_000
    print(json.dumps(out, indent=2, default=str))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
