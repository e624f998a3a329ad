"""Memory of one serving process under sustained feedback: prints JSON.

Starts `recloop serve` on an empty embedded home (as `recloop serve` runs it: uvicorn, one process, API
keys on), posts `--requests` requests of `--events` feedback events each (distinct users: every event
is a new user for the in-memory history, the worst case), and samples the server's resident memory
(RSS, psutil) after every request and once the spool has been flushed. The issue's probe saw 40
requests of 10,000 events grow a server by 365 MB that was never released: the watch history kept
every feedback event. With its bounds (`RECLOOP_SERVING_HISTORY_MAX_*`, recloop.serving.history) the
growth stops once the history is full.

    python bench/feedback_memory.py                         # default bounds, 80 x 10,000 events
    python bench/feedback_memory.py --unbounded             # bounds lifted: the behaviour before them

Output: per configuration, RSS at start, after each tenth of the load, the peak and at the end (MB),
the growth over the second half of the load (flat: about 0), the history's size and evictions from
/metrics, the events that reached the landing zone, and the request latency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-feedback-key-" + "b" * 24
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path, port: int, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "AWS_"))}
    env.update({"RECLOOP_HOME": str(home), "RECLOOP_API_KEYS": KEY, "PYTHONPATH": str(REPO),
                "RECLOOP_SERVING_POLL_SECONDS": "3600", "RECLOOP_SERVING_RATE_LIMIT_PER_SECOND": "0",
                "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
                "DAGSTER_DISABLE_TELEMETRY": "true", "FEAST_USAGE": "False", **extra_env})
    proc = subprocess.Popen(
        [sys.executable, "-m", "recloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        env=env, cwd=home.parent, stdout=subprocess.DEVNULL, stderr=(home.parent / "serve.log").open("ab"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(home.parent / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(label: str, requests: int, events: int, extra_env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="recloop-bench-feedback-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        port = free_port()
        proc = start(home, port, extra_env)
        server = psutil.Process(proc.pid)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=120) as http:
                http.post("/v1/recommendations", json={"user_id": "warmup"})
                rss_start = server.memory_info().rss
                samples, latencies = [], []
                for r in range(requests):
                    now = datetime.now(timezone.utc).isoformat()
                    body = {"events": [{"user_id": f"user-{r:03d}-{i:05d}", "video_id": f"v{i % 5000:05d}",
                                        "watched_s": float(i % 90), "completed": i % 7 == 0, "liked": i % 11 == 0,
                                        "surface": "home", "position": i % 20, "event_time": now}
                                       for i in range(events)]}
                    t0 = time.perf_counter()
                    response = http.post("/v1/feedback", json=body)
                    latencies.append(time.perf_counter() - t0)
                    response.raise_for_status()
                    samples.append(server.memory_info().rss)
                time.sleep(12)  # one flush interval (10 s): the spool is written to the landing zone
                rss_end = server.memory_info().rss
                metrics = http.get("/metrics").text
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        landed = sum(pq.read_metadata(p).num_rows for p in (home / "landing").rglob("*.parquet"))
    half = samples[len(samples) // 2 - 1]
    tenth = max(1, requests // 10)
    latencies.sort()
    return {
        "config": label,
        "requests": requests,
        "events_per_request": events,
        "rss_start_mb": round(rss_start / MB, 1),
        "rss_mb_every_tenth": [round(samples[i] / MB, 1) for i in range(tenth - 1, requests, tenth)],
        "rss_peak_mb": round(max(samples) / MB, 1),
        "rss_end_mb": round(rss_end / MB, 1),
        "growth_mb": round((rss_end - rss_start) / MB, 1),
        "growth_second_half_mb": round((samples[-1] - half) / MB, 1),
        "history_feedback_events": metric(metrics, 'recloop_serving_history_events{source="feedback"}'),
        "history_feedback_users": metric(metrics, 'recloop_serving_history_users{source="feedback"}'),
        "history_evicted_users": metric(metrics, "recloop_serving_history_evicted_users_total"),
        "landed_events": landed,
        "request_ms_p50": round(latencies[len(latencies) // 2] * 1000, 1),
        "request_ms_max": round(latencies[-1] * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--unbounded", action="store_true", help="also run with the history bounds lifted")
    args = parser.parse_args()
    results = [run("default bounds", args.requests, args.events, {})]
    if args.unbounded:
        lifted = str(args.requests * args.events + 1)
        results.append(run("bounds lifted", args.requests, args.events, {
            "RECLOOP_SERVING_HISTORY_MAX_USERS": lifted, "RECLOOP_SERVING_HISTORY_MAX_EVENTS": lifted}))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
