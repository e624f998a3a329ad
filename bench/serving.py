"""Serving load benchmark: the recommendation API on a 100k-video catalog, driven open-loop on loopback.

1. Builds (once; reused from `--workdir` afterwards) a catalog of `--videos` (100k) videos with the
   project's own simulator and schema: validated days in a local lake, feature snapshots, Feast apply +
   materialize into the SQLite online store, the multi-stage recommender (EASE + two-tower with a FAISS
   HNSW index over every video + popular + fresh, LambdaRank ranker) fitted on those days by the model
   plane's own training loop, registered in MLflow (SQLite) as the `champion`.
2. Starts the API in a subprocess exactly as `recloop serve` runs it (`recloop.serving.app.serve`,
   uvicorn, one process, settings from `RECLOOP_*` variables) and waits for /readyz.
3. For each rate in `--rates` (default 50, 100, 200, 300 requests/s) sends requests at that fixed rate
   for `--seconds` (open loop: a request is sent at its scheduled time whether or not earlier ones
   returned; latency counts from the scheduled time, so a stalled server is not hidden by a slowed-down
   client), from a minimal keep-alive HTTP/1.1 client on asyncio/uvloop (the generator shares the two
   cores with the server), for known users (90 %, drawn uniformly: most are not in the server's
   feature cache yet) and cold-start users (10 %).
4. Prints one JSON object: p50/p95/p99/max latency, achieved QPS, errors per rate (requests still
   unanswered 10 s after the level's last send count as errors, so an overloaded level ends), the
   server-side per-stage split (from the `stage_ms` of every response; /metrics has the same
   histograms), the ranking batch sizes, the feature cache's hit rate; writes it to `--out` and a PNG plot beside it.

    python bench/serving.py                                  # build if needed, then 50/100/200/300 QPS
    python bench/serving.py --rates 200 --seconds 60         # one longer level
    python bench/serving.py --videos 20000 --workdir /tmp/s  # a smaller catalog

Target on 2 cores: p99 <= 25 ms at 200 QPS with zero errors. The load generator shares the cores with
the server: on a machine shared with other work the figures are noisy (the JSON records the load
average before each level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TELEMETRY = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "FEAST_USAGE": "False",
}
MODEL_NAME = "recloop-bench-serving"
STAGES = ("candidates", "batch_wait", "features", "ranking", "rerank", "total")


def environment(workdir: Path) -> dict[str, str]:
    """The `RECLOOP_*` variables of the benchmark's deployment (what the server reads)."""
    home = workdir / "home"
    return {
        **TELEMETRY,
        "RECLOOP_HOME": str(home),
        "RECLOOP_LAKE_URI": str(home / "lake"),
        "RECLOOP_LANDING_URI": str(home / "landing"),
        "RECLOOP_FEAST_DATA_DIR": str(home / "feast"),
        "RECLOOP_FEAST_PROJECT": "bench_serving",
        "RECLOOP_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "RECLOOP_MODEL_NAME": MODEL_NAME,
        "RECLOOP_SERVING_FEEDBACK_SPOOL_DIR": str(home / "spool"),
    }


def build(workdir: Path, videos: int, users: int, days: int, events_per_day: int) -> dict:
    """Simulate, validate-free write to silver, features, Feast, train, index, register. Returns timings."""
    os.environ.update(environment(workdir))
    import torch

    from recloop.config import Settings
    from recloop.data.simulator import SimConfig, simulate_validated
    from recloop.features import apply_repo, materialize_partition
    from recloop.lake import LocalLake
    from recloop.model_plane import fit_config
    from recloop.model_plane.bundle import save_bundle
    from recloop.model_plane.fit import fit_recommender
    from recloop.model_plane.history import History
    from recloop.model_plane.store import RANKING_FEATURES, LakeSnapshots
    from recloop.registry import CHAMPION, open_registry
    from recloop.training import TwoTowerConfig, load_window

    torch.set_num_threads(os.cpu_count() or 1)
    settings = Settings.from_env()
    lake = LocalLake(settings.lake_uri)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = SimConfig(
        seed=3, days=days, initial_users=users, initial_videos=videos, events_per_day=events_per_day,
        new_users_per_day=users // 100, new_videos_per_day=videos // 200, n_creators=max(300, videos // 50),
    )
    partitions = simulate_validated(config, lake)
    timings["simulate_and_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    apply_repo(settings)
    materialize_partition(settings, partitions[-1])
    timings["feast_apply_and_materialize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    window = load_window(lake, partitions)
    fitted = fit_recommender(History.from_window(window), config=fit_config(two_tower=TwoTowerConfig(epochs=2)),
                             store=LakeSnapshots(lake))
    bundle = save_bundle(workdir / "bundle", fitted.recommender)
    index, ranker = fitted.recommender.two_tower.index, fitted.report.ranker
    timings["train_and_index_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    registry = open_registry(settings)
    run_id = registry.log_training_run(
        experiment="bench-serving", params={}, metrics={}, data={"partitions": partitions},
        features=list(RANKING_FEATURES), bundle_dir=bundle, tags={}, example_user_ids=["u0000001"],
    )
    registry.client.set_registered_model_alias(MODEL_NAME, CHAMPION, registry.register(run_id))
    timings["register_s"] = time.perf_counter() - t0
    shutil.rmtree(workdir / "bundle")
    info = {
        "videos_in_index": len(index), "users_known": len(fitted.recommender.history.users),
        "events": len(window.events), "days": days, "ranker_best_iteration": ranker["best_iteration"],
        "ranker_valid_ndcg_at_10": round(max(ranker["curves"].get("valid_ndcg@10") or [float("nan")]), 4),
        **{k: round(v, 1) for k, v in timings.items()},
    }
    (workdir / "built.json").write_text(json.dumps(info, indent=2))
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    code = f"from recloop.serving.app import serve; serve(host='127.0.0.1', port={port}, log_level='warning')"
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    return subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **environment(workdir)}, stdout=log, stderr=log,
        start_new_session=True,
    )


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see server.log")
            try:
                r = await http.get("/readyz")
                if r.status_code == 200 and r.json().get("model_version"):
                    return r.json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not ready with a model within {timeout:.0f} s")


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
        "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


class _StaleConnection(Exception):
    """The connection was closed before the answer began."""


class LoopbackClient:
    """A minimal HTTP/1.1 keep-alive client for the load generator (asyncio streams, on uvloop when present).

    The generator shares the two cores with the server it measures: httpx spends several times more CPU
    per request than the few dozen lines below need for JSON POSTs to one loopback server. Connections
    are pooled; a request takes an idle one or opens a new one (`max_connections` at most in flight)."""

    def __init__(self, host: str, port: int, max_connections: int = 512) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        async with self._slots:
            while self._idle:
                # A pooled connection the server closed while it was idle (uvicorn's keep-alive timeout)
                # fails before any byte of the answer: the request goes again on the next connection,
                # as any HTTP client does.
                try:
                    return await self._exchange(self._idle.pop(), method, path, body)
                except _StaleConnection:
                    continue
            try:
                return await self._exchange(await asyncio.open_connection(self.host, self.port), method, path, body)
            except _StaleConnection as err:
                raise ConnectionResetError(f"{method} {path}: the server closed the connection") from err

    async def _exchange(self, conn, method: str, path: str, body: bytes) -> tuple[int, bytes]:  # noqa: ANN001
        reader, writer = conn
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError) as err:
                if isinstance(err, asyncio.IncompleteReadError) and err.partial:
                    raise
                raise _StaleConnection from err
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" not in headers:
                raise ValueError(f"no Content-Length in the answer to {method} {path}")
            payload = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(conn)
        return status, payload

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def run_level(url: str, users: list[str], rate: float, seconds: float, seed: int, grace: float = 10.0) -> dict:
    """Open-loop load at a fixed `rate` for `seconds`; latency from each request's scheduled time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    picks = [users[i] if rng.random() < 0.9 else f"bench-new-{seed}-{j}" for j, i in enumerate(rng.integers(0, len(users), n))]
    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    errors: dict[str, int] = {}
    fallbacks = 0
    host, port = url.removeprefix("http://").split(":")
    http = LoopbackClient(host, int(port))

    async def one(when: float, user: str) -> None:
        nonlocal fallbacks
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        try:
            status, payload = await http.request("POST", "/v1/recommendations", json.dumps({"user_id": user}).encode())
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            return
        done = time.perf_counter()
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
            return
        latencies.append((done - when) * 1000)
        body = json.loads(payload)
        fallbacks += bool(body["fallback"])
        for s, v in body["stage_ms"].items():
            stages.setdefault(s, []).append(v)

    start = time.perf_counter() + 0.2
    tasks = [asyncio.create_task(one(start + i / rate, u)) for i, u in enumerate(picks)]
    # An overloaded server would stretch the level far past its length: requests still unanswered
    # `grace` seconds after the last scheduled send are cancelled and counted as errors.
    _, pending = await asyncio.wait(tasks, timeout=seconds + grace)
    for task in pending:
        task.cancel()
    if pending:
        errors["unanswered"] = len(pending)
    elapsed = time.perf_counter() - start
    metrics = (await http.request("GET", "/metrics"))[1].decode()
    http.close()
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    batch = [float(samples.get(f"recloop_serving_ranking_batch_size_{s}", 0.0)) for s in ("sum", "count")]
    cache = {o: float(samples.get(f'recloop_serving_feature_cache_total{{outcome="{o}"}}', 0.0)) for o in ("hit", "miss")}
    return {
        "offered_qps": rate,
        "achieved_qps": round(len(latencies) / elapsed, 1),
        "requests": n,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "fallbacks": fallbacks,
        "latency_ms": percentiles(latencies),
        "server_stage_ms": {s: percentiles(v) for s, v in stages.items() if v},
        "load_average_before": round(os.getloadavg()[0], 2),
        "_batch_totals": batch,
        "_cache_totals": cache,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    rates = [lv["offered_qps"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for q, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax1.plot(rates, [lv["latency_ms"].get(q, float("nan")) for lv in levels], style, label=q)
    ax1.axhline(25, color="grey", linestyle="--", linewidth=1, label="p99 target 25 ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("offered load (requests/s)")
    ax1.set_ylabel("latency (ms, from scheduled send)")
    ax1.set_title(f"POST /v1/recommendations, {result['catalog']['videos_in_index']:,} videos")
    ax1.legend()
    ax1.grid(alpha=0.3)
    bottom = [0.0] * len(levels)
    for stage in ("candidates", "batch_wait", "features", "ranking", "rerank"):
        means = [lv["server_stage_ms"].get(stage, {}).get("mean", 0.0) for lv in levels]
        ax2.bar([str(r) for r in rates], means, bottom=bottom, label=stage)
        bottom = [b + m for b, m in zip(bottom, means)]
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("mean server time per request (ms)")
    ax2.set_title("server-side split by stage")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def drive(url: str, users: list[str], rates: list[float], seconds: float, warmup: int) -> list[dict]:
    await run_level(url, users, rate=50, seconds=warmup / 50, seed=0)  # warm caches, JIT paths, pools
    levels = []
    previous = (0.0, 0.0)
    cache_before = {"hit": 0.0, "miss": 0.0}
    for i, rate in enumerate(rates):
        level = await run_level(url, users, rate, seconds, seed=i + 1)
        total, count = level.pop("_batch_totals") or (0.0, 0.0)
        if count > previous[1]:
            level["mean_ranking_batch_size"] = round((total - previous[0]) / (count - previous[1]), 2)
        previous = (total, count)
        cache = level.pop("_cache_totals")
        hits, misses = (cache[o] - cache_before[o] for o in ("hit", "miss"))
        level["feature_cache_hit_rate"] = round(hits / (hits + misses), 3) if hits + misses else None
        cache_before = cache
        levels.append(level)
        await asyncio.sleep(2)  # let the queue drain between levels
    return levels


def run_async(coro):  # noqa: ANN001, ANN201
    """asyncio.run on uvloop when it is installed (uvicorn[standard] brings it): a lighter generator."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".recloop/bench-serving"))
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--events-per-day", type=int, default=100_000)
    parser.add_argument("--rebuild", action="store_true", help="build the catalog again even if present")
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 300])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=300, help="requests before the first level")
    parser.add_argument("--out", type=Path, help="JSON result (default <workdir>/serving.json; PNG beside it)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    args.out = args.out or workdir / "serving.json"
    if args.build_only:
        workdir.mkdir(parents=True, exist_ok=True)
        build(workdir, args.videos, args.users, args.days, args.events_per_day)
        return 0
    if args.rebuild and workdir.exists():
        shutil.rmtree(workdir)
    if not (workdir / "built.json").exists():
        # Built in a child process: this one stays a light load generator (no torch, no Feast loaded).
        sizes = ["--videos", str(args.videos), "--users", str(args.users), "--days", str(args.days),
                 "--events-per-day", str(args.events_per_day)]
        subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(workdir), *sizes], check=True)
    catalog = json.loads((workdir / "built.json").read_text())

    import pyarrow.parquet as pq

    lake_users = workdir / "home" / "lake" / "silver" / "users"
    users = sorted({u for f in lake_users.rglob("*.parquet") for u in pq.read_table(f, columns=["user_id"])["user_id"].to_pylist()})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(workdir, port)
    try:
        t0 = time.perf_counter()
        status = asyncio.run(wait_ready(url, proc, timeout=600))
        ready_s = time.perf_counter() - t0
        levels = run_async(drive(url, users, args.rates, args.seconds, args.warmup))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    result = {
        "benchmark": "serving",
        "cpus": os.cpu_count(),
        "catalog": catalog,
        "server": {"startup_to_ready_s": round(ready_s, 1), "model_version": status["model_version"],
                   "catalog_size": status["catalog_size"]},
        "load": {"seconds_per_level": args.seconds, "mix": "90% known users, 10% cold-start", "k": 20},
        "levels": levels,
        "target": {"qps": 200, "p99_ms": 25, "errors": 0},
    }
    at_target = [lv for lv in levels if lv["offered_qps"] == 200]
    if at_target:
        lv = at_target[0]
        result["target"]["met"] = lv["errors"] == 0 and lv["latency_ms"].get("p99", 1e9) <= 25
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
