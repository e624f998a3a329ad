"""What logging impressions costs a recommendation request: prints JSON.

Two measurements, in this process (no HTTP: the client and server would share the same cores and
bury a sub-millisecond cost in their own noise):

1. `writer`: `ImpressionWriter.log` alone, the work the request path does for the impressions log
   (encode the answer as one JSON line, `write`, and with fsync on, `fsync`), for an answer of `--k`
   items, `--requests` times from one thread and from `--threads` threads at once (the spool's lock and
   the fsyncs serialize them), with `fsync` off (the default: the line is in the kernel before the
   answer is returned, which survives kill -9 of the process; fsynced in the background every second)
   and on (`RECLOOP_SERVING_IMPRESSIONS_FSYNC=true`: an fsync per answer, which survives power
   loss). The background flush runs as in the server (every 10 s or 20,000 impressions), so its Parquet writes share the cores.
2. `service`: `RecommendationService.recommend` end to end on a small simulated lake without a
   champion (the popularity fallback, the cheapest answer, so the logging share is the largest), with
   the impressions log on and off (`log` replaced by a no-op): p50/p99 of each and their difference,
   with fsync off (the default) and on.

    python bench/impression_logging.py [--requests 3000] [--threads 4] [--k 20]

Figures depend on the disk (an fsync on a virtual disk with a write-back cache costs ~0.1 ms, on a
spinning disk ~10 ms) and on what else runs on the cores: run it on a quiet-ish machine and read the
`loadavg` it prints next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recloop.config import Settings  # noqa: E402
from recloop.data.simulator import SimConfig, simulate_validated  # noqa: E402
from recloop.lake import LocalLake  # noqa: E402
from recloop.serving.config import ServingConfig  # noqa: E402
from recloop.serving.impressions import ImpressionWriter, new_request_id  # noqa: E402
from recloop.serving.service import Item, Recommendation, RecommendationService  # noqa: E402


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "max_ms": round(float(ms.max()), 4), "n": len(ms)}


def answer(k: int) -> Recommendation:
    items = [Item(f"v{i:07d}", 1.0 / (i + 1), "two_tower", i, model_version="7") for i in range(k)]
    return Recommendation("u0000123", items, "7", False, None, False, {"country": "US"}, {}, new_request_id(),
                          "exp-v7-v8", "champion")


def bench_writer(root: Path, requests: int, threads: int, k: int, fsync: bool) -> dict[str, dict]:
    out = {}
    for n_threads in (1, threads):
        writer = ImpressionWriter(LocalLake(root / f"landing-{fsync}-{n_threads}"), root / f"spool-{fsync}-{n_threads}",
                                  flush_seconds=10.0, max_batch=20_000, fsync=fsync)
        writer.start()
        times: list[float] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            mine = []
            for _ in range(n):
                rec = answer(k)
                t = time.perf_counter()
                writer.log(rec, "home")
                mine.append(time.perf_counter() - t)
            with lock:
                times.extend(mine)

        workers = [threading.Thread(target=work, args=(requests // n_threads,)) for _ in range(n_threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        writer.stop()
        out[f"threads_{n_threads}"] = percentiles(times)
    return out


def bench_service(root: Path, requests: int, k: int, fsync: bool) -> dict[str, object]:
    settings = Settings(home=root / "home", landing_uri=str(root / "svc-landing"), lake_uri=str(root / "lake"))
    if not (root / "lake").exists():
        simulate_validated(SimConfig(seed=3, days=2, initial_users=300, initial_videos=300, events_per_day=2_000,
                                     n_creators=60), LocalLake(settings.lake_uri))

    class NoChampion:
        model_name = "none"

        def champion(self):
            return None

        def experiment(self):
            return None

    safety = root / "safety.yaml"
    safety.write_text("blocked_videos: []\nblocked_tags: []\n")
    svc = RecommendationService(settings, ServingConfig(poll_seconds=3600.0, safety_file=safety,
                                                        impressions_spool_dir=root / f"svc-spool-{fsync}",
                                                        impressions_fsync=fsync),
                                registry=NoChampion())
    svc.refresh()
    svc.impressions.start()  # the background flush and fsync, as in the server
    real_log = svc.impressions.log
    results: dict[str, object] = {}
    try:
        for _ in range(200):  # warm-up
            svc.recommend(f"u{_}", k)
        runs: dict[str, list[float]] = {"with_logging": [], "without_logging": []}
        # Alternate in blocks, so that both see the same background load.
        for block in range(10):
            for mode in ("with_logging", "without_logging"):
                svc.impressions.log = real_log if mode == "with_logging" else (lambda *a, **kw: None)
                for i in range(requests // 10):
                    t = time.perf_counter()
                    svc.recommend(f"u{block}-{i}", k)
                    runs[mode].append(time.perf_counter() - t)
        results = {mode: percentiles(ts) for mode, ts in runs.items()}
        results["difference_ms"] = {
            q: round(results["with_logging"][q] - results["without_logging"][q], 4) for q in ("p50_ms", "p99_ms")}
    finally:
        svc.impressions.log = real_log
        svc.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recloop-bench-impressions-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        report = {
            "k": args.k, "requests": args.requests, "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "spool_filesystem": root.as_posix(),
            "writer_fsync": bench_writer(root, args.requests, args.threads, args.k, fsync=True),
            "writer_no_fsync": bench_writer(root, args.requests, args.threads, args.k, fsync=False),
            "service_no_fsync": bench_service(root, args.requests, args.k, fsync=False),
            "service_fsync": bench_service(root, args.requests, args.k, fsync=True),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "caveat": "2 shared cores; other jobs were running: compare with the loadavg, not across machines",
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
