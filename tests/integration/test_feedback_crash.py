"""kill -9 of the serving process in the middle of a feedback burst: nothing acknowledged is lost and
nothing is doubled.

`recloop serve` runs for real (uvicorn, its own process group) with API keys, a short flush interval
and small flush batches, so that the kill lands while requests are being spooled and segments flushed.
Four clients send keyed feedback with their own event ids; the process is killed twice with SIGKILL
mid-burst and restarted (each start flushes what the dead one left), then stopped cleanly. Every event
id the API acknowledged (202) must be in the landing zone exactly once; no id may be there twice; no
id may be there that was never sent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT

KEY = "crash-test-key-" + "k" * 24
CLIENTS = 4
EVENTS_PER_REQUEST = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "AWS_"))}
    env.update({
        "RECLOOP_HOME": str(home), "RECLOOP_API_KEYS": KEY, "PYTHONPATH": str(REPO_ROOT),
        "RECLOOP_SERVING_FEEDBACK_FLUSH_SECONDS": "0.2", "RECLOOP_SERVING_FEEDBACK_MAX_BATCH": "100",
        "RECLOOP_SERVING_POLL_SECONDS": "3600", "RECLOOP_SERVING_RATE_LIMIT_PER_SECOND": "0",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "recloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        env=env, cwd=home.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the server did not start: {log.read_text()[-3000:]}")


def burst(port: int, round_: int, sent: set[str], acked: set[str], seconds: float) -> None:
    """`CLIENTS` threads posting feedback until the server goes away or `seconds` pass."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=10) as http:
            n = 0
            while time.monotonic() < stop:
                ids = [f"r{round_}-c{c}-n{n}-{i}" for i in range(EVENTS_PER_REQUEST)]
                now = datetime.now(timezone.utc).isoformat()
                body = {"events": [{"event_id": e, "user_id": f"u{c}", "video_id": f"v{i}", "watched_s": 1.0,
                                    "event_time": now} for i, e in enumerate(ids)]}
                with lock:
                    sent.update(f"fb-{e}" for e in ids)
                try:
                    response = http.post("/v1/feedback", json=body)
                except httpx.HTTPError:
                    return  # the server was killed
                if response.status_code == 503 and response.json().get("reason") == "overloaded":
                    time.sleep(float(response.headers.get("Retry-After", "1")))  # what a client is told to do
                    continue
                assert response.status_code == 202, response.text
                with lock:
                    acked.update(response.json()["event_ids"])
                n += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def landed_ids(landing: Path) -> list[str]:
    return [r["event_id"] for path in sorted(landing.rglob("*.parquet"))
            for r in pq.read_table(path, columns=["event_id"]).to_pylist()]


@pytest.mark.slow
def test_kill_9_during_a_feedback_burst_loses_and_doubles_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    landing = home / "landing"
    log = tmp_path / "serve.log"
    port = free_port()
    sent: set[str] = set()
    acked: set[str] = set()
    for round_ in range(2):
        proc = start_server(home, port, log)
        killer = threading.Timer(1.5, lambda p=proc: os.killpg(p.pid, signal.SIGKILL))
        killer.start()
        burst(port, round_, sent, acked, seconds=30)
        killer.join()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert acked, "no request was acknowledged before the kill"
    proc = start_server(home, port, log)  # flushes what the killed processes left in the spool
    os.killpg(proc.pid, signal.SIGTERM)
    # uvicorn shuts down gracefully (the lifespan flushes the spool), then re-raises the signal
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]

    ids = landed_ids(landing)
    doubled = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not doubled, f"{len(doubled)} event ids landed more than once, e.g. {list(doubled)[:5]}"
    assert acked <= set(ids), f"{len(acked - set(ids))} acknowledged events lost, e.g. {sorted(acked - set(ids))[:5]}"
    assert set(ids) <= sent
    assert not list((home / "serving" / "feedback-spool").glob("segment-*"))  # everything flushed
    assert "Traceback" not in log.read_text()
