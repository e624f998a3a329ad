"""What people see of the serving API: `/docs` (Swagger UI) and `/redoc` (ReDoc) load their JavaScript and
CSS from the server itself (package fastapi-offline), never from a CDN, so they work without internet; the
landing page `/` names the service and the model and links the rest; both stay open when API keys are
set (as the probes are) and `/` is never shed by admission control; `recloop serve` logs what it serves.

A real `RecommendationService` on an empty embedded home (MLflow registry in SQLite, no model yet),
served in-process by FastAPI's TestClient; the last test starts `recloop serve` for real. The pages with
a loaded model and an online experiment are tested in tests/unit/test_serving_online.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from recloop.config import REPO_ROOT, Settings
from recloop.registry import open_registry
from recloop.serving import auth

KEY = "test-docs-key-" + "d" * 24
# Every URL an HTML page makes the browser load: attributes and Swagger UI's / ReDoc's spec URL.
LOADED = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")
ABSOLUTE = re.compile(r"(?i)\b(?:https?:)?//")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    home = tmp_path_factory.mktemp("serving-docs")
    return Settings(home=home / "home", landing_uri=str(home / "landing"), lake_uri=str(home / "lake"),
                    feast_data_dir=home / "feast", feast_project=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture()
def make_client(settings, serving_client):
    """`make_client(keys=..., **config)`: a started app around a fresh service (API keys set by default)."""
    registry = open_registry(settings)
    return lambda keys=KEY, **overrides: serving_client(settings, registry, keys, **overrides)


def loaded_urls(page: str) -> list[str]:
    return [a or b for a, b in LOADED.findall(page)]


@pytest.mark.parametrize("page, scripts, marker", [
    ("/docs", 1, b"SwaggerUIBundle"),
    ("/redoc", 1, b"Redoc"),
])
def test_docs_pages_load_only_local_assets_and_the_assets_are_served(make_client, page, scripts, marker):
    client, _ = make_client()
    response = client.get(page)  # no API key: the documentation is as open as the probes
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not ABSOLUTE.search(html), f"{page} names an absolute URL: {ABSOLUTE.search(html)}"
    urls = loaded_urls(html)
    assert "/openapi.json" in urls
    js = [u for u in urls if u.endswith(".js")]
    css = [u for u in urls if u.endswith(".css")]
    assert len(js) == scripts and (page != "/docs" or len(css) == 1)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        kind = asset.headers["content-type"]
        if url.endswith(".js"):
            assert kind.split(";")[0] in ("text/javascript", "application/javascript"), (url, kind)
            assert len(asset.content) > 500_000 and marker in asset.content, url
        elif url.endswith(".css"):
            assert kind.startswith("text/css") and len(asset.content) > 50_000, (url, kind)
        elif url.endswith(".png"):
            assert kind == "image/png" and asset.content[:8] == b"\x89PNG\r\n\x1a\n"
        elif url == "/openapi.json":
            assert asset.json()["info"]["title"] == "recloop serving"


def test_the_openapi_description_lists_the_operations_and_not_the_pages(make_client):
    client, _ = make_client()
    paths = client.get("/openapi.json").json()["paths"]
    operations = {(path, method) for path, ops in paths.items() for method in ops}
    assert operations == {("/v1/recommendations", "post"), ("/v1/feedback", "post"), ("/healthz", "get"),
                          ("/readyz", "get"), ("/metrics", "get")}


def test_the_landing_page_names_the_service_and_links_the_docs_and_probes(make_client):
    client, service = make_client()
    response = client.get("/")  # no API key, as the probes
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<title>recloop serving</title>" in page
    for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/healthz", "/readyz"):
        assert f'href="{path}"' in page, path
        assert client.get(path).status_code in (200, 503), path  # /readyz: 503 without model or popularity
    assert service.model is None and "none loaded yet" in page and "not_ready" in page
    assert "/v1/feedback</code>: impressions and watches (needs an API key)" in page
    assert not ABSOLUTE.search(page)
    # Behind a proxy that mounts the API under a prefix, the links keep the prefix.
    prefixed = TestClient(client.app, root_path="/recs").get("/")
    assert 'href="/recs/docs"' in prefixed.text and 'href="/recs/readyz"' in prefixed.text
    # The write endpoints still need the key the pages do not.
    feedback = {"events": [{"user_id": "u", "video_id": "v"}]}
    assert client.post("/v1/feedback", json=feedback).status_code == 401


def test_without_keys_the_landing_page_says_the_api_is_open(make_client):
    client, _ = make_client(keys=None)
    assert "open: no API keys are set on this server" in client.get("/").text


def test_at_capacity_the_landing_page_and_probes_answer_and_the_docs_are_shed(make_client, slot_held):
    client, service = make_client(keys=None, max_in_flight=1, admission_queue=0)
    first: list[int] = []
    runner = threading.Thread(
        target=lambda: first.append(client.post("/v1/recommendations", json={"user_id": "u1"}).status_code))
    with slot_held(service) as (entered, release):
        runner.start()
        try:
            assert entered.wait(10)
            landing, health, docs = client.get("/"), client.get("/healthz"), client.get("/docs")
            asset = client.get("/static/docs/swagger-ui.css")
        finally:
            release.set()
            runner.join(timeout=30)
    assert landing.status_code == 200 and "recloop serving" in landing.text
    assert health.status_code == 200
    assert docs.status_code == 503 and asset.status_code == 503 and docs.headers["retry-after"]
    assert client.get("/docs").status_code == 200  # the slot is free again


def test_recloop_serve_logs_what_it_serves_and_serves_the_docs_offline(recloop_env, monkeypatch):
    """`recloop serve` for real: its log shows recloop's INFO line about the model (here: none yet) next
    to uvicorn's, and /docs with its assets answer over HTTP."""
    monkeypatch.delenv(auth.KEYS_VARIABLE, raising=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recloop.cli", "serve", "--port", "0"], cwd=REPO_ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            text = "".join(lines)
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text)
            if found and "recloop.serving.service: serving no model yet" in text:
                url = found.group(1)
                break
            time.sleep(0.2)
        assert url, "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as http:
            docs = http.get("/docs")
            assert docs.status_code == 200 and not ABSOLUTE.search(docs.text)
            for asset in loaded_urls(docs.text):
                assert http.get(asset).status_code == 200, asset
            assert "recloop serving" in http.get("/").text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = "".join(lines)
    line = next(ln for ln in log.splitlines() if "serving no model yet" in ln)
    assert line.startswith("INFO:") and "no champion alias on recloop-recommender" in line, line
