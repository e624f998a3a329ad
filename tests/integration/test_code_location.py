"""The code location loads in Dagster's own tools: `dagster definitions validate`, and the webserver
(what `make ui` serves) lists the assets, checks, jobs and schedule over its GraphQL API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from recloop.config import REPO_ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _env(recloop_env) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def test_dagster_definitions_validate(recloop_env):
    proc = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "pipelines.definitions"],
        cwd=REPO_ROOT, env=_env(recloop_env), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All code locations passed validation" in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_serves_the_asset_graph(recloop_env):
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "pipelines.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=_env(recloop_env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    query = """{ assetNodes { assetKey { path } groupName partitionDefinition { description }
                 assetChecksOrError { ... on AssetChecks { checks { name blocking } } } }
                 repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } schedules { name cronSchedule } } } } }"""
    try:
        deadline = time.monotonic() + 120
        data = None
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10)
                if r.status_code == 200 and r.json().get("data", {}).get("assetNodes"):
                    data = r.json()["data"]
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "dagster-webserver exited early"
            time.sleep(1)
        assert data is not None, "webserver did not serve the asset graph within 120 s"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert {"bronze/events", "silver/events", "features/user_activity", "feast/registry", "feast/online_features"} <= set(nodes)
    assert nodes["silver/events"]["groupName"] == "validation"
    assert nodes["bronze/events"]["partitionDefinition"] is not None
    checks = {c["name"]: c["blocking"] for c in nodes["bronze/events"]["assetChecksOrError"]["checks"]}
    assert checks == {"gx_schema": True}
    repo = data["repositoriesOrError"]["nodes"][0]
    assert {"data_plane_job", "feast_apply_job"} <= {j["name"] for j in repo["jobs"]}
    assert [s["cronSchedule"] for s in repo["schedules"] if s["name"] == "daily_data_plane_schedule"] == ["15 1 * * *"]
