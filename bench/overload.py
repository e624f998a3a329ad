"""Overload and fault benchmark of one serving process: capacity, 2x capacity with admission control, and
the fallback latency while the online store (Redis) is black-holed.

Reuses `bench/serving.py`'s catalog build (simulator -> lake -> Feast -> multi-stage recommender ->
MLflow `champion`), its server start (`recloop.serving.app.serve` in a subprocess, as `recloop serve`)
and its open-loop load generator (latency counted from each request's scheduled send time). Defaults to
a 20k-video catalog so that a run takes a few minutes; the build is reused from `--workdir`.

1. capacity: admission control off (`RECLOOP_SERVING_MAX_IN_FLIGHT=0`), open-loop levels rising by
   `--step` requests/s; capacity = the highest level with p99 <= 50 ms and no error. One more level at
   2x capacity shows what the process does without a ceiling.
2. overload: the server restarted with admission control on (the `ServingConfig` defaults, or
   `--max-in-flight` ...), offered 2x capacity: admitted p99 (must stay <= 50 ms), shed share (503 +
   Retry-After), admitted throughput.
3. faults: the day's features materialized into the real Redis, the server reading them through a
   loopback TCP proxy (`python -m recloop.serving.faultproxy`, a separate process) at half capacity;
   the proxy black-holes Redis for `--cut-seconds`, then forwards again: latency of the fallback answers
   once the breaker is open, time until the breaker opened (first refused answer) and until the model
   ranks again after the resume.

Prints one JSON object (also written to `--out`).

    nice python bench/overload.py                          # build if needed (20k videos), then all three
    nice python bench/overload.py --skip-faults --step 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as base  # noqa: E402 - bench/serving.py, beside this file

BUDGET_MS = 50.0


def percentiles(values: list[float]) -> dict[str, float]:
    return base.percentiles(values)


async def open_loop(url: str, users: list[str], rate: float, seconds: float, seed: int,
                    events: dict[float, str] | None = None, proxy: "Proxy | None" = None,
                    grace: float = 10.0) -> list[dict]:
    """Requests at a fixed `rate` for `seconds` (90 % known users, 10 % new); one record per request:
    scheduled time (s from start), latency (ms from the scheduled time), status, fallback reason.
    `events` maps times (s from start) to proxy commands sent at those times."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    picks = [users[i] if rng.random() < 0.9 else f"bench-new-{seed}-{j}"
             for j, i in enumerate(rng.integers(0, len(users), n))]
    host, port = url.removeprefix("http://").split(":")
    http = base.LoopbackClient(host, int(port), max_connections=2048)
    records: list[dict] = []
    start = time.perf_counter() + 0.2

    async def one(at: float, user: str) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        record = {"t": at, "status": None, "ms": None, "reason": None, "server_ms": None}
        records.append(record)
        try:
            status, payload = await http.request("POST", "/v1/recommendations", json.dumps({"user_id": user}).encode())
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            record["status"] = type(err).__name__
            return
        record["ms"] = (time.perf_counter() - start - at) * 1000
        record["status"] = status
        if status == 200:
            body = json.loads(payload)
            record["reason"] = body["fallback_reason"] or "model"
            record["server_ms"] = body["stage_ms"].get("total")

    async def fire(at: float, command: str) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        assert proxy is not None
        proxy.send(command)

    tasks = [asyncio.create_task(one(i / rate, u)) for i, u in enumerate(picks)]
    tasks += [asyncio.create_task(fire(at, cmd)) for at, cmd in (events or {}).items()]
    _, pending = await asyncio.wait(tasks, timeout=seconds + grace)
    for task in pending:
        task.cancel()
    for record in records:
        if record["status"] is None:
            record["status"] = "unanswered"
    http.close()
    return records


def _kinds(records: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        kinds[str(r["status"])] = kinds.get(str(r["status"]), 0) + 1
    return kinds


def summarize(records: list[dict], rate: float, seconds: float) -> dict:
    ok = [r["ms"] for r in records if r["status"] == 200]
    shed = [r for r in records if r["status"] == 503]
    errors = [r for r in records if r["status"] not in (200, 503)]
    return {
        "offered_qps": rate,
        "requests": len(records),
        "admitted_ok": len(ok),
        "admitted_qps": round(len(ok) / seconds, 1),
        "shed": len(shed),
        "shed_share": round(len(shed) / max(len(records), 1), 3),
        "errors": len(errors),
        "errors_by_kind": _kinds(errors),
        "admitted_latency_ms": percentiles(ok),
        "shed_latency_ms": percentiles([r["ms"] for r in shed]),
        # the service's own time (`stage_ms.total`): the rest of the latency is HTTP, queueing, the loop
        "admitted_server_ms": percentiles([r["server_ms"] for r in records if r["server_ms"] is not None]),
        "fallbacks": sum(1 for r in records if r["reason"] not in (None, "model")),
        "load_average_before": round(os.getloadavg()[0], 2),
    }


class Proxy:
    """`python -m recloop.serving.faultproxy` in its own process (not sharing the generator's GIL)."""

    def __init__(self, target: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recloop.serving.faultproxy", target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.port = int(self.proc.stdout.readline())

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != f"ok {command}":
            raise RuntimeError(f"fault proxy: {answer!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("close")
            self.proc.wait(timeout=10)


def scrape(url: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """The samples of /metrics whose names start with one of `prefixes`."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if name.startswith(prefixes)}


def server(workdir: Path, extra_env: dict[str, str]):  # noqa: ANN201
    """`bench/serving.py`'s server with extra `RECLOOP_*` variables; returns (url, process)."""
    with mock.patch.dict(os.environ, extra_env):
        port = base.free_port()
        proc = base.start_server(workdir, port)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(base.wait_ready(url, proc, timeout=600))
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def materialize_redis(workdir: Path, redis_url: str) -> None:
    """The newest day's features into Redis (in a child process: this one stays a light generator)."""
    code = (
        "import sys; from recloop.config import Settings; from recloop.features import materialize_partition;"
        "from recloop.serving import lakeview; from recloop.lake import open_lake;"
        "s = Settings.from_env(); day = lakeview.newest_partition(open_lake(s.lake_uri), 'features/user_activity');"
        f"print(materialize_partition(s, day, online='redis', redis_url={redis_url!r})['seconds'])"
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **base.environment(workdir)}, check=True,
                   stdout=subprocess.DEVNULL)


def drop_redis_keys(redis_url: str, project: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=b"*" + project.encode(), count=1000))
        for i in range(0, len(keys), 10_000):
            client.delete(*keys[i : i + 10_000])
        return len(keys)
    finally:
        client.close()


def capacity_phase(workdir: Path, users: list[str], args) -> dict:  # noqa: ANN001
    url, proc = server(workdir, {"RECLOOP_SERVING_MAX_IN_FLIGHT": "0"})
    levels = []
    try:
        base.run_async(open_loop(url, users, rate=50, seconds=args.warmup / 50, seed=0))
        capacity = 0.0
        rate = args.step
        while rate <= args.max_rate:
            level = summarize(base.run_async(open_loop(url, users, rate, args.seconds, seed=len(levels) + 1)),
                              rate, args.seconds)
            levels.append(level)
            if level["errors"] or level["admitted_latency_ms"].get("p99", 1e9) > BUDGET_MS:
                break
            capacity = rate
            time.sleep(2)
            rate += args.step
        no_ceiling = None
        if capacity:
            time.sleep(2)
            no_ceiling = summarize(base.run_async(open_loop(url, users, 2 * capacity, args.seconds, seed=99)),
                                   2 * capacity, args.seconds)
    finally:
        stop(proc)
    return {"capacity_qps": capacity, "levels": levels, "at_2x_without_admission": no_ceiling}


def overload_phase(workdir: Path, users: list[str], capacity: float, args) -> dict:  # noqa: ANN001
    env = {k: str(v) for k, v in (("RECLOOP_SERVING_MAX_IN_FLIGHT", args.max_in_flight),
                                   ("RECLOOP_SERVING_ADMISSION_MAX_WAIT_SECONDS", args.max_wait),
                                   ("RECLOOP_SERVING_ADMISSION_TARGET_SECONDS", args.target)) if v is not None}
    url, proc = server(workdir, env)
    try:
        base.run_async(open_loop(url, users, rate=50, seconds=args.warmup / 50, seed=0))
        at_capacity = summarize(base.run_async(open_loop(url, users, capacity, args.seconds, seed=201)),
                                capacity, args.seconds)
        time.sleep(2)
        at_2x = summarize(base.run_async(open_loop(url, users, 2 * capacity, args.overload_seconds, seed=202)),
                          2 * capacity, args.overload_seconds)
        at_2x["server_metrics"] = scrape(url, ("recloop_serving_admission_limit", "recloop_serving_shed_requests_total",
                                               "recloop_serving_admission_wait_seconds_sum",
                                               "recloop_serving_admission_wait_seconds_count"))
    finally:
        stop(proc)
    return {"admission": env or "ServingConfig defaults", "at_capacity": at_capacity, "at_2x_capacity": at_2x}


def fault_phase(workdir: Path, users: list[str], rate: float, args) -> dict:  # noqa: ANN001
    from urllib.parse import urlparse

    target = urlparse(args.redis_url)
    project = base.environment(workdir)["RECLOOP_FEAST_PROJECT"]
    t0 = time.perf_counter()
    materialize_redis(workdir, args.redis_url)
    materialize_s = time.perf_counter() - t0
    proxy = Proxy(f"{target.hostname or '127.0.0.1'}:{target.port or 6379}")
    through = f"redis://127.0.0.1:{proxy.port}{target.path or '/0'}"
    try:
        url, proc = server(workdir, {"RECLOOP_SERVING_ONLINE_STORE": "redis", "RECLOOP_REDIS_URL": through})
        try:
            base.run_async(open_loop(url, users, rate=50, seconds=args.warmup / 50, seed=0))
            before, cut = args.cut_at, args.cut_seconds
            total = before + cut + args.after_seconds
            records = base.run_async(open_loop(url, users, rate, total, seed=301, proxy=proxy,
                                               events={before: "cut", before + cut: "resume"}))
        finally:
            stop(proc)
    finally:
        proxy.close()
        dropped = drop_redis_keys(args.redis_url, project)
    cut_at, resume_at = args.cut_at, args.cut_at + args.cut_seconds
    normal = [r for r in records if r["t"] < cut_at]
    during = [r for r in records if cut_at <= r["t"] < resume_at]
    refused = [r for r in during if r["reason"] == "feature_store_unavailable"]
    opened = next((r["t"] for r in during if r["reason"] == "feature_store_unavailable"
                   and r["ms"] is not None and r["ms"] < BUDGET_MS), None)
    # Once the breaker is open: every answer (fallback for users not cached, model for cached ones).
    after_open = [r for r in during if opened is not None and r["t"] >= opened]
    after = [r for r in records if r["t"] >= resume_at]
    back = next((r["t"] for r in after if r["reason"] == "model" and r["t"] > resume_at), None)
    last_fallback = max((r["t"] for r in after if r["reason"] == "feature_store_unavailable"), default=None)
    return {
        "offered_qps": rate,
        "redis_materialize_s": round(materialize_s, 1),
        "redis_keys_dropped": dropped,
        "cut_seconds": cut,
        "before_cut_latency_ms": percentiles([r["ms"] for r in normal if r["status"] == 200]),
        "during_cut": {
            "requests": len(during),
            "errors_by_kind": _kinds([r for r in during if r["status"] != 200]),
            "fallback_share": round(len(refused) / max(len(during), 1), 3),
            "breaker_opened_after_s": round(opened - cut_at, 3) if opened is not None else None,
            "latency_before_open_ms": percentiles([r["ms"] for r in during if opened is None or r["t"] < opened
                                                   if r["ms"] is not None]),
            "fallback_latency_after_open_ms": percentiles([r["ms"] for r in after_open
                                                           if r["reason"] == "feature_store_unavailable"]),
            "all_latency_after_open_ms": percentiles([r["ms"] for r in after_open if r["ms"] is not None]),
        },
        "after_resume": {
            "model_ranks_again_after_s": round(back - resume_at, 3) if back is not None else None,
            "last_fallback_after_s": round(last_fallback - resume_at, 3) if last_fallback is not None else None,
            "errors_by_kind": _kinds([r for r in after if r["status"] != 200]),
            "latency_ms": percentiles([r["ms"] for r in after if r["ms"] is not None]),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".recloop/bench-overload"))
    parser.add_argument("--videos", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--events-per-day", type=int, default=30_000)
    parser.add_argument("--step", type=float, default=50.0, help="capacity search: requests/s per level")
    parser.add_argument("--max-rate", type=float, default=1500.0)
    parser.add_argument("--capacity", type=float, help="skip the search, use this capacity (requests/s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of a capacity level")
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="length of the 2x level")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-in-flight", type=int, help="admission limit (default: ServingConfig's)")
    parser.add_argument("--target", type=float, help="admission latency target, seconds (default: ServingConfig's)")
    parser.add_argument("--max-wait", type=float, help="admission queue wait, seconds (default: ServingConfig's)")
    parser.add_argument("--redis-url", default=os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--fault-rate", type=float, help="requests/s of the fault phase (default: capacity / 2)")
    parser.add_argument("--cut-at", type=float, default=8.0)
    parser.add_argument("--cut-seconds", type=float, default=10.0)
    parser.add_argument("--after-seconds", type=float, default=8.0)
    parser.add_argument("--skip-overload", action="store_true")
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON result (default <workdir>/overload.json)")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    out = args.out or workdir / "overload.json"
    if not (workdir / "built.json").exists():
        sizes = ["--videos", str(args.videos), "--users", str(args.users), "--days", str(args.days),
                 "--events-per-day", str(args.events_per_day)]
        subprocess.run([sys.executable, base.__file__, "--build-only", "--workdir", str(workdir), *sizes], check=True)
    catalog = json.loads((workdir / "built.json").read_text())
    import pyarrow.parquet as pq

    lake_users = workdir / "home" / "lake" / "silver" / "users"
    users = sorted({u for f in lake_users.rglob("*.parquet")
                    for u in pq.read_table(f, columns=["user_id"])["user_id"].to_pylist()})
    result: dict = {"benchmark": "overload", "run": uuid.uuid4().hex[:8], "cpus": os.cpu_count(),
                    "catalog": {k: catalog[k] for k in ("videos_in_index", "users_known", "events")},
                    "budget_p99_ms": BUDGET_MS}
    if args.capacity:
        capacity = args.capacity
        result["capacity"] = {"capacity_qps": capacity, "given": True}
    else:
        result["capacity"] = capacity_phase(workdir, users, args)
        capacity = result["capacity"]["capacity_qps"]
    if not capacity:
        print(json.dumps(result, indent=2))
        raise SystemExit("no level met the budget: capacity not found (a busy machine? see load_average_before)")
    if not args.skip_overload:
        result["overload"] = overload_phase(workdir, users, capacity, args)
        at_2x = result["overload"]["at_2x_capacity"]
        result["overload"]["met"] = (at_2x["errors"] == 0
                                     and at_2x["admitted_latency_ms"].get("p99", 1e9) <= BUDGET_MS)
    if not args.skip_faults:
        result["faults"] = fault_phase(workdir, users, args.fault_rate or capacity / 2, args)
        after = result["faults"]["during_cut"]["fallback_latency_after_open_ms"]
        result["faults"]["met"] = bool(after) and after.get("p99", 1e9) <= BUDGET_MS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
