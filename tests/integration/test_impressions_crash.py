"""kill -9 of the serving process in the middle of a burst of recommendations: every answer a client
received is in the landing zone's impressions exactly once.

`recloop serve` runs for real (uvicorn, its own process group) on a home whose lake holds a few simulated
validated days and no champion, so every answer is the popularity fallback (which is logged like any
other answer); the impressions spool is flushed every 0.2 s or 100 impressions, so that the kill lands
while answers are being spooled and segments flushed. Four clients ask for recommendations; the process
is killed twice with SIGKILL mid-burst and restarted (each start flushes what the dead one left), then
stopped cleanly. Every request id a client received (200) must be in the landing zone with exactly the
answer's items, in order; no impression id may be there twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from recloop.config import REPO_ROOT
from recloop.data.schemas import IMPRESSIONS
from recloop.data.simulator import SimConfig, simulate_validated
from recloop.lake import LocalLake

CLIENTS = 4
SIM = SimConfig(seed=5, days=2, initial_users=200, initial_videos=150, new_users_per_day=5, new_videos_per_day=5,
                events_per_day=800, n_creators=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "AWS_"))}
    env.update({
        "RECLOOP_HOME": str(home), "PYTHONPATH": str(REPO_ROOT),
        "RECLOOP_SERVING_IMPRESSIONS_FLUSH_SECONDS": "0.2", "RECLOOP_SERVING_IMPRESSIONS_MAX_BATCH": "100",
        "RECLOOP_SERVING_POLL_SECONDS": "3600", "RECLOOP_SERVING_RATE_LIMIT_PER_SECOND": "0",
        "RECLOOP_SERVING_MAX_IN_FLIGHT": "0",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "recloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        env=env, cwd=home.parent, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:  # ready: the popularity fallback is loaded from the lake
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the server did not start: {log.read_text()[-3000:]}")


def burst(port: int, round_: int, answered: dict[str, list[str]], seconds: float) -> None:
    """`CLIENTS` threads asking for recommendations until the server goes away or `seconds` pass."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            n = 0
            while time.monotonic() < stop:
                try:
                    response = http.post("/v1/recommendations",
                                         json={"user_id": f"r{round_}-c{c}-u{n}", "k": 10, "surface": "home"})
                except httpx.HTTPError:
                    return  # the server was killed
                assert response.status_code == 200, response.text
                body = response.json()
                with lock:
                    answered[body["request_id"]] = [i["video_id"] for i in body["items"]]
                n += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.slow
def test_kill_9_during_recommendations_loses_and_doubles_no_impression(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    simulate_validated(SIM, LocalLake(home / "lake"))
    log = tmp_path / "serve.log"
    port = free_port()
    answered: dict[str, list[str]] = {}
    for round_ in range(2):
        proc = start_server(home, port, log)
        before = len(answered)
        killer = threading.Timer(1.5, lambda p=proc: os.killpg(p.pid, signal.SIGKILL))
        killer.start()
        burst(port, round_, answered, seconds=30)
        killer.join()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert len(answered) > before, "no request was answered before the kill"
    assert all(answered.values()), "answers without items: the test would check nothing"
    proc = start_server(home, port, log)  # flushes what the killed processes left in the spool
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]

    rows = []
    for path in sorted((home / "landing" / "impressions").rglob("*.parquet")):
        table = pq.read_table(path)
        assert table.schema == IMPRESSIONS.schema
        rows += table.select(["impression_id", "request_id", "video_id", "position"]).to_pylist()
    doubled = {i: n for i, n in Counter(r["impression_id"] for r in rows).items() if n > 1}
    assert not doubled, f"{len(doubled)} impressions landed more than once, e.g. {list(doubled)[:5]}"
    landed: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        landed.setdefault(r["request_id"], []).append((r["position"], r["video_id"]))
    lost = [rid for rid in answered if rid not in landed]
    assert not lost, f"{len(lost)} of {len(answered)} answered requests lost, e.g. {lost[:5]}"
    for rid, videos in answered.items():
        assert [v for _, v in sorted(landed[rid])] == videos, rid
    assert not list((home / "serving" / "impressions-spool").glob("segment-*"))  # everything flushed
    assert "Traceback" not in log.read_text()
