"""What a person sees, in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium, never a
downloaded build) through the Dagster UI, the MLflow UI and the serving API's /docs of a small deployment.

One deployment for the module: four simulated days whose device mix shifts on the last, the data plane
on the first three, a champion trained on them, the drifted day, and one tick of the drift sensor that
starts a retraining run (all in process, `pipelines.run`). Meanwhile the UIs start as a user starts them:
`dagster dev` on that DAGSTER_HOME and the code location of pyproject.toml's [tool.dagster] (`make ui`),
`mlflow ui` on the home's SQLite store (`make mlflow`; RECLOOP_MLFLOW_UI_URL points the links at it
before any run), and `recloop serve`, each on a free loopback port, each stopped with its process group.

The checks: the lineage graph draws the asset groups; a partitioned asset shows its days materialized and
none missing (the partitions end at the data: `recloop.partition_range`); the drift sensor's page lists
the retraining run it started; the drift asset's `report` link opens the report in MLflow, whose header
is the drift summary; the registered version's `mlflow_run` link opens the training run in MLflow; the
API's /docs lists its operations. A screenshot of each screen goes to test-artifacts/screenshots/ (and
FAILED-<test>-<tab>.png where a test stopped), the servers' output to test-artifacts/logs/; the README's
three (docs/img/lineage.png, drift_report.png, mlflow_run.png) are rewritten from them with
RECLOOP_UPDATE_SCREENSHOTS=1. About two minutes on two busy cores, most of it building the deployment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from recloop.config import REPO_ROOT
from recloop.data.simulator import SimConfig, simulate
from recloop.lake import open_lake

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Tiny but complete: >= 1,000 impressions a day (the drift report's minimum sample), two days to train on
# and one to evaluate, and a fourth on which the device mix shifts.
SIM = SimConfig(seed=13, days=4, initial_users=300, initial_videos=150, events_per_day=1_500,
                new_users_per_day=10, new_videos_per_day=5, scenario="device_shift", drift_day=3)
DAYS = [SIM.date_of(i).isoformat() for i in range(SIM.days)]
TRAINING = {"model__training_set": {"config": {"TrainDays": 2, "TestDays": 1}}}
SENSOR = "drift_retraining_sensor"
GROUPS = ("ingestion", "validation", "features", "online", "models", "monitoring", "history")

# Playwright's waits: the UIs render after their own API calls, on a machine shared with other work.
WAIT_MS = 60_000
SERVER_START_S = 180

ARTIFACTS = REPO_ROOT / "test-artifacts" / "screenshots"
README_IMAGES = REPO_ROOT / "docs" / "img"
UPDATE_ENV = "RECLOOP_UPDATE_SCREENSHOTS"
VIEWPORT = {"width": 1280, "height": 800}


# --- servers -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A UI server started as a user starts it, in its own process group (its children with it)."""

    name: str
    url: str
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, path: str, ready=lambda response: response.status_code == 200, *, post: dict | None = None,
             timeout: float = SERVER_START_S) -> Any:
        """Polls `path` (GET, or POST of the JSON `post`) until `ready(response)`; fails with the server's log
        when it exits or times out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}", pytrace=False)
            try:
                response = (httpx.post(self.url + path, json=post, timeout=10) if post is not None
                            else httpx.get(self.url + path, timeout=10))
                if ready(response):
                    return response
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as err:
                last = repr(err)
            time.sleep(0.5)
        pytest.fail(f"{self.name} not ready at {self.url}{path} after {timeout:.0f} s ({last}):\n{self.log_tail()}",
                    pytrace=False)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left of it after `grace` seconds (`dagster
        dev` 1.13 takes more than 30 s to wind its webserver, daemon and code servers down)."""
        if self.proc is None:
            return
        group = self.proc.pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(group):
            try:
                self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


WORKSPACE = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def location_loaded(response: httpx.Response) -> bool:
    """Whether the webserver answers with the code location `recloop` loaded; fails on a load error."""
    if response.status_code != 200:
        return False
    entries = (response.json().get("data") or {}).get("workspaceOrError", {}).get("locationEntries") or []
    for entry in entries:
        error = entry.get("locationOrLoadError") or {}
        if error.get("__typename") == "PythonError":
            pytest.fail(f"the code location {entry['name']} failed to load: {error.get('message')}", pytrace=False)
    return any(e["name"] == "recloop" and e["loadStatus"] == "LOADED" and e.get("locationOrLoadError")
               for e in entries)


@dataclass
class Deployment:
    dagster: str
    mlflow: str
    serving: str
    registered: dict[str, Any]  # model/registered_version's metadata of the retraining run
    drift: dict[str, Any]  # monitoring/drift's metadata of the drifted day
    retraining_run_id: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, isolated_home, chromium) -> Iterator[Deployment]:
    from pipelines.run import instance, run_data_plane, run_job, tick_sensor
    from recloop import partition_range
    from recloop.registry import open_registry

    root = tmp_path_factory.mktemp("ui-browser")
    logs = ARTIFACTS.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("dagster", "mlflow", "serving")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    servers: list[Server] = []
    with pytest.MonkeyPatch.context() as mp:
        settings = isolated_home(root / "recloop", mp)
        # The links recorded by the runs below point at the UIs started here.
        mp.setenv("RECLOOP_MLFLOW_UI_URL", urls["mlflow"])
        mp.setenv("RECLOOP_DAGSTER_URL", urls["dagster"])
        mp.delenv("RECLOOP_API_KEYS", raising=False)
        for var in ("RECLOOP_PARTITION_START", "RECLOOP_PARTITION_END", "RECLOOP_DAGSTER_AUTOMATION"):
            mp.delenv(var, raising=False)
        # Their temporary files (dagster dev's sockets) under the test's folder, whatever a kill leaves behind.
        (root / "tmp").mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(root / "tmp")}
        try:
            simulate(SIM, open_lake(settings.landing_uri))
            partition_range.pin_end(settings, "data", set_by="tests/integration/test_ui_browser.py")  # as the demo does
            inst = instance(settings)  # writes DAGSTER_HOME/dagster.yaml before `dagster dev` reads it
            open_registry(settings).client.search_experiments()  # the MLflow store exists before its UI opens it
            store = f"sqlite:///{settings.home / 'mlflow' / 'mlflow.db'}"
            servers += [
                Server("dagster dev", urls["dagster"], [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1",
                                                        "-p", str(ports["dagster"])], logs / "dagster.log"),
                Server("mlflow ui", urls["mlflow"], [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
                                                     "-h", "127.0.0.1", "-p", str(ports["mlflow"]), "--workers", "1"],
                       logs / "mlflow.log"),
            ]
            for server in servers:
                server.start(env)

            data = run_data_plane(DAYS[:-1], settings=settings)
            assert all(r.success for r in data), [r.error for r in data if not r.success]
            first = run_job("training_job", inst=inst, run_config_ops=TRAINING)
            assert first.success, first.error
            drifted = run_job("data_plane_job", partition=DAYS[-1], inst=inst)
            assert drifted.success, drifted.error
            drift = drifted.materialized["monitoring/drift"]
            assert drift["drifted"] is True, drift.get("status")
            tick = tick_sensor(SENSOR, inst=inst)
            assert len(tick.runs) == 1 and tick.runs[0].success, [r.error for r in tick.runs]
            retraining = tick.runs[0]

            serving = Server("recloop serve", urls["serving"], [sys.executable, "-m", "recloop.cli", "serve", "--port",
                                                                 str(ports["serving"])], logs / "serving.log")
            servers.append(serving)
            serving.start(env)
            servers[0].wait("/graphql", ready=location_loaded, post={"query": WORKSPACE})
            servers[1].wait("/health")
            serving.wait("/healthz")
            yield Deployment(dagster=urls["dagster"], mlflow=urls["mlflow"], serving=urls["serving"],
                             registered=retraining.materialized["model/registered_version"], drift=drift,
                             retraining_run_id=retraining.run_id)
        finally:
            for server in reversed(servers):
                server.stop()


# --- the browser ---------------------------------------------------------------------------------------

# MLflow 3.17's UI opens its assistant panel on the first visit; a user closes it once (kept in storage).
CLOSE_MLFLOW_ASSISTANT = """
try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (e) {}
"""


@pytest.fixture(scope="module")
def browser_context(deployment, chromium):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        context.add_init_script(CLOSE_MLFLOW_ASSISTANT)
        try:
            yield context
        finally:
            context.close()
            browser.close()


@pytest.fixture()
def page(browser_context, request):
    """A fresh tab; Dagster's one-time "Join the Dagster community" dialog is skipped whenever it shows.
    A failed test leaves a screenshot of where it stopped (test-artifacts/screenshots/FAILED-<test>.png)."""
    tab = browser_context.new_page()
    tab.add_locator_handler(tab.get_by_text("Join the Dagster community"),
                            lambda: tab.get_by_role("button", name="Skip").click())
    failed_before = request.session.testsfailed
    yield tab
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for i, opened in enumerate(browser_context.pages):
            opened.screenshot(path=ARTIFACTS / f"FAILED-{request.node.name}-{i}.png")
    for opened in browser_context.pages:
        opened.close()


def shoot(tab, name: str, *, readme: bool = False) -> Path:
    """The screen as test-artifacts/screenshots/<name>.png; a README image (docs/img/<name>.png, a
    256-colour PNG to stay small) too when RECLOOP_UPDATE_SCREENSHOTS=1."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    tab.screenshot(path=path)
    if readme and os.environ.get(UPDATE_ENV) == "1":
        from PIL import Image

        README_IMAGES.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
            small.save(README_IMAGES / f"{name}.png", optimize=True)
    return path


def metadata_link(tab, name: str):
    """The link of URL metadata entry `name` in the asset page's metadata table."""
    row = tab.get_by_role("row").filter(has=tab.get_by_text(name, exact=True))
    return row.get_by_role("link").first


# --- what the user sees --------------------------------------------------------------------------------

def test_the_lineage_graph_draws_the_asset_groups(deployment, page):
    from playwright.sync_api import expect

    # The navigation folded away (Dagster keeps that), the model and monitoring groups opened up.
    page.goto(deployment.dagster + "/asset-groups")
    page.get_by_text("Hide navigation").click()
    expanded = ",".join(f"global@global:{group}" for group in ("models", "monitoring"))
    page.goto(deployment.dagster + "/asset-groups?expanded=" + quote(expanded))
    graph = page.locator("[data-svg-viewport]")
    for group in GROUPS:
        expect(graph.get_by_text(group, exact=True).first).to_be_visible()
    for asset in ("training_set", "registered_version", "champion", "drift"):
        node = graph.get_by_text(asset, exact=True).first
        expect(node).to_be_visible()
        # Drawn as materialized (green) once the graph's live data arrived.
        expect(node.locator("xpath=..")).to_have_attribute("style", re.compile(r"--minimal-bg:\s*var\(--color-background-green\)"))
    shoot(page, "lineage", readme=True)


def test_a_partitioned_asset_shows_its_days_done_and_none_missing(deployment, page):
    from playwright.sync_api import expect

    page.goto(deployment.dagster + "/assets/monitoring/drift?view=partitions")
    n = len(DAYS)
    expect(page.get_by_text(f"{n} Partitions Selected")).to_be_visible()
    expect(page.get_by_text(f"Materialized ({n})")).to_be_visible()
    expect(page.get_by_text("Missing (0)")).to_be_visible()
    expect(page.get_by_text("Failed (0)")).to_be_visible()
    # The range is the data's: from its first simulated day to its last, not to today.
    for day in DAYS:
        expect(page.get_by_text(day, exact=True).first).to_be_visible()
    shoot(page, "partitions")


def test_the_sensor_page_lists_the_retraining_run_it_started(deployment, page):
    from playwright.sync_api import expect

    page.goto(deployment.dagster + f"/locations/recloop/sensors/{SENSOR}")
    expect(page.get_by_text(re.compile(rf"/\s*{SENSOR}$")).first).to_be_visible()
    page.get_by_role("button", name="Runs", exact=True).click()
    run = page.locator(f'a[href="/runs/{deployment.retraining_run_id}"]').first
    expect(run).to_have_text(deployment.retraining_run_id[:8])
    # The run's row of the table (drawn with divs: the nearest ancestor that also shows a status).
    row = run.locator("xpath=ancestor::*[.//*[contains(text(), 'Success')]][1]")
    expect(row).to_contain_text("training_job")
    expect(row).to_contain_text("Success")
    expect(row).to_contain_text("recloop/trigger: drift")
    shoot(page, "sensor_runs")


def test_the_drift_report_link_opens_the_report_in_mlflow(deployment, page):
    from playwright.sync_api import expect

    day = DAYS[-1]
    page.goto(deployment.dagster + "/assets/monitoring/drift")
    link = metadata_link(page, "report")
    expect(link).to_have_attribute("href", deployment.drift["report"])
    assert deployment.drift["report"].startswith(deployment.mlflow + "/#/experiments/")
    shoot(page, "drift_asset")
    with page.context.expect_page() as opened:
        link.click()
    report = opened.value
    expect(report.get_by_text("drift_report.html").first).to_be_visible()
    # MLflow renders the HTML artifact in a frame: its header is the drift summary.
    summary = report.frame_locator("iframe").first
    expect(summary.get_by_text(f"Drift report of {day}: DRIFTED")).to_be_visible()
    expect(summary.get_by_text("What drifted, and why")).to_be_visible()
    shoot(report, "drift_report", readme=True)


def test_the_registered_versions_run_link_opens_the_training_run_in_mlflow(deployment, page):
    from playwright.sync_api import expect

    registered = deployment.registered
    page.goto(deployment.dagster + "/assets/model/registered_version")
    link = metadata_link(page, "mlflow_run")
    expect(link).to_have_attribute("href", registered["mlflow_run"])
    with page.context.expect_page() as opened:
        link.click()
    run = opened.value
    expect(run.get_by_text(re.compile(rf"^train \S+ v{registered['version']}$")).first).to_be_visible()
    expect(run.get_by_text(registered["mlflow_run_id"]).first).to_be_visible()
    expect(run.get_by_role("link", name="recloop-recommender").first).to_be_visible()
    shoot(run, "mlflow_run", readme=True)


def test_the_api_docs_list_the_operations(deployment, page):
    from playwright.sync_api import expect

    page.goto(deployment.serving + "/docs")
    for operation in ("/v1/recommendations", "/v1/feedback", "/healthz"):
        expect(page.get_by_text(operation, exact=True).first).to_be_visible()
    expect(page.get_by_text("recloop serving").first).to_be_visible()
    shoot(page, "api_docs")
