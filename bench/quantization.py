"""The two-tower's user tower in float32 vs int8 (dynamic quantization of its Linear layers,
`recloop.model_plane.quantization`), side by side: latency and quality.

Simulates a window in memory (recloop.data.simulator), trains the two-tower on it, builds its FAISS index,
then for each tower:

* latency of the user tower as serving runs it (`tower_forward`, one thread): one user per call (a request
  whose user has activity since the cutoff: p50/p99 over `--calls`), and a batch of 1,000 users (the
  per-swap precomputation), per user;
* latency of the online retrieval step: tower + ANN top-100 for one user (p50/p99);
* quality: recall@100 of the ANN candidates on the newest day's positives (the rule the bundle option
  applies, with its 1 % relative tolerance) and the overlap of the two towers' top-100 lists;
* the tower's size in bytes (state_dict serialized).

Prints one JSON object. End-to-end ranking is not included: the tower is ~a tenth of a millisecond of a
request whose ranking takes milliseconds (bench/serving.py), so the end-to-end difference is within the
noise of that benchmark.

    python bench/quantization.py
    python bench/quantization.py --events-per-day 20000 --initial-users 5000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--events-per-day", type=int, default=50_000)
    parser.add_argument("--initial-users", type=int, default=10_000)
    parser.add_argument("--initial-videos", type=int, default=5_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2_000, help="single-user calls timed per tower")
    args = parser.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch

    from recloop.data.simulator import SimConfig, Simulator
    from recloop.model_plane import quantization
    from recloop.model_plane.history import History
    from recloop.model_plane.sources import TwoTowerSource
    from recloop.training import TwoTowerConfig, Window, tower_forward, user_tower_inputs

    torch.set_num_threads(1)
    config = SimConfig(seed=7, days=args.days, events_per_day=args.events_per_day,
                       initial_users=args.initial_users, initial_videos=args.initial_videos,
                       new_users_per_day=max(100, args.initial_users // 100),
                       new_videos_per_day=max(60, args.initial_videos // 100))
    sim = Simulator(config)
    days = [sim.day(i) for i in range(config.days)]
    tables = {k: pa.concat_tables([d[k] for d in days]) for k in ("users", "videos", "events")}
    window = Window.from_tables(tables["events"], tables["videos"], tables["users"])
    history = History.from_window(window)
    t0 = time.perf_counter()
    source = TwoTowerSource.fit(history, TwoTowerConfig(epochs=args.epochs))
    out: dict = {"benchmark": "quantization", "cpus": os.cpu_count(), "torch_threads": 1,
                 "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
                 "events": len(window.events), "users": len(window.users), "videos": len(window.videos),
                 "train_seconds": round(time.perf_counter() - t0, 1)}
    tt = source.model
    towers = {"float32": tt.model.user_tower, "int8": quantization.quantized_user_tower(tt.model.user_tower)}

    rng = np.random.default_rng(0)
    ids = tt.users["user_id"].astype(str).to_numpy(dtype=object)
    batch_ids = rng.choice(ids, size=min(1_000, len(ids)), replace=False)
    batch = user_tower_inputs(tt, batch_ids, np.full(len(batch_ids), int(history.cutoff_us), np.int64))
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(min(200, len(batch_ids)))]
    lists = {}
    for name, tower in towers.items():
        buf = io.BytesIO()
        torch.save(tower.state_dict(), buf)
        for x in singles[:50]:  # warm-up
            tower_forward(tower, x, tt.args.out_dim)
        one, retrieval = [], []
        for i in range(args.calls):
            x = singles[i % len(singles)]
            s = time.perf_counter()
            v = tower_forward(tower, x, tt.args.out_dim)
            m = time.perf_counter()
            source.top(v, 100)
            e = time.perf_counter()
            one.append(m - s)
            retrieval.append(e - s)
        s = time.perf_counter()
        vectors = tower_forward(tower, batch, tt.args.out_dim)
        batch_s = time.perf_counter() - s
        lists[name] = source.top(vectors.astype(np.float32), 100)[0]
        quality = quantization.ann_recall(source, history, tower)
        ms = lambda xs, q: round(float(np.percentile(np.asarray(xs) * 1000, q)), 4)  # noqa: E731
        out[name] = {
            "user_tower_1_user_p50_ms": ms(one, 50), "user_tower_1_user_p99_ms": ms(one, 99),
            "tower_plus_ann_top100_p50_ms": ms(retrieval, 50),
            "tower_plus_ann_top100_p99_ms": ms(retrieval, 99),
            "user_tower_batch_1000_us_per_user": round(batch_s / len(batch_ids) * 1e6, 2),
            "recall_at_100": round(quality["recall"], 4), "recall_users": quality["users"],
            "state_dict_bytes": buf.getbuffer().nbytes,
        }
    overlap = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(len(set(a[a >= 0])), 1)
                       for a, b in zip(lists["float32"], lists["int8"])])
    out["top100_overlap_int8_vs_float32"] = round(float(overlap), 4)
    out["decision"] = quantization.decide(source, history, mode="int8")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
