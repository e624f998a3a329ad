"""Alert webhooks against a real HTTP receiver on 127.0.0.1: signatures, retries, dead letters, at-most-once
delivery under re-sends and concurrent senders, and the configuration."""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from standardwebhooks import Webhook, WebhookVerificationError

from recloop.alerts import (
    AlertConfigError,
    AlertDispatcher,
    DeliveryStatus,
    DeliveryStore,
    Endpoint,
    Outcome,
    make_event,
    verify,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
ALERT_ENV = (
    "RECLOOP_ALERTS_CONFIG",
    "RECLOOP_ALERTS_DB_URL",
    "RECLOOP_ALERT_WEBHOOK_URL",
    "RECLOOP_ALERT_WEBHOOK_SECRET",
)


# --------------------------------------------------------------------------------------------------
# A real receiver
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered


class Receiver:
    """An HTTP server on 127.0.0.1 that answers POSTs from a script (then `default`) and records each one."""

    def __init__(self, answers: list[Answer], default: Answer, port: int) -> None:
        self.answers = list(answers)
        self.default = default
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver._lock:
                    answer = receiver.answers.pop(0) if receiver.answers else receiver.default
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    receiver.requests.append(Received(headers, body, answer.status))
                time.sleep(answer.delay_s)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender timed out and hung up, as the timeout test wants

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        # A short poll interval: shutdown() waits for the serving loop to notice (0.5 s by default).
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hooks/recloop"

    def statuses(self) -> list[int]:
        return [request.status for request in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def serve() -> Iterator[Callable[..., Receiver]]:
    """Starts receivers: `serve(Answer(500), Answer(500), default=Answer(200), port=0)`."""
    started: list[Receiver] = []

    def start(*answers: Answer, default: Answer = Answer(200), port: int = 0) -> Receiver:
        started.append(Receiver(list(answers), default, port))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def _closed_port() -> int:
    """A port nobody listens on (connection refused), free for a receiver to come back on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_alert_env(monkeypatch):
    for name in ALERT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'alerts.db'}"


@pytest.fixture()
def store(db_url) -> Iterator[DeliveryStore]:
    store = DeliveryStore(db_url)
    yield store
    store.close()


@pytest.fixture()
def sleeps() -> list[float]:
    """The backoff delays a dispatcher asked for; recorded instead of slept."""
    return []


def endpoint(url: str, name: str = "ops", **options) -> Endpoint:
    return Endpoint(name=name, url=url, secret=SECRET, timeout_s=options.pop("timeout_s", 2.0), **options)


def dispatcher(store: DeliveryStore, sleeps: list[float], *endpoints: Endpoint, **retry) -> AlertDispatcher:
    policy = {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05} | retry
    return AlertDispatcher(endpoints, store, sleep=sleeps.append, **policy)


def drift_event(key: str = "2025-01-08/champion-3", **fields):
    defaults = {
        "text": "Drift on events 2025-01-08: 42% of columns drifted",
        "asset": "silver/events",
        "partition": "2025-01-08",
        "model_version": 3,
        "numbers": {"drift_share": 0.42, "drifted_columns": 5, "threshold": float("nan")},
        "report_url": "http://127.0.0.1:3000/reports/drift-2025-01-08.html",
    }
    return make_event("drift.detected", key=key, **(defaults | fields))


# --------------------------------------------------------------------------------------------------
# Signature and payload
# --------------------------------------------------------------------------------------------------


def test_delivery_is_signed_the_standard_webhooks_way(serve, store, sleeps):
    receiver = serve()
    event = drift_event()

    [result] = dispatcher(store, sleeps, endpoint(receiver.url)).send(event)

    assert result.outcome is Outcome.DELIVERED
    [request] = receiver.requests
    headers = request.headers
    assert headers["webhook-id"] == event.id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(request.body, headers)["type"] == "drift.detected"
    assert verify(SECRET, headers, request.body) == json.loads(request.body)

    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(request.body, headers)
    tampered = request.body.replace(b"0.42", b"0.02")
    assert tampered != request.body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers | {"webhook-signature": "garbage"}, request.body)


def test_payload_says_what_where_the_numbers_and_the_report(serve, store, sleeps):
    receiver = serve()
    event = drift_event()

    dispatcher(store, sleeps, endpoint(receiver.url)).send(event)

    payload = json.loads(receiver.requests[0].body)
    assert payload["type"] == "drift.detected"
    assert payload["timestamp"].endswith("Z")
    assert payload["data"]["asset"] == "silver/events"
    assert payload["data"]["partition"] == "2025-01-08"
    assert payload["data"]["model_version"] == "3"
    assert payload["data"]["numbers"] == {"drift_share": 0.42, "drifted_columns": 5, "threshold": None}
    assert payload["data"]["report_url"] == "http://127.0.0.1:3000/reports/drift-2025-01-08.html"
    # Chat tools show only `text`: it carries the line and the link.
    assert payload["text"] == (
        "Drift on events 2025-01-08: 42% of columns drifted\nhttp://127.0.0.1:3000/reports/drift-2025-01-08.html"
    )


def test_event_id_is_a_function_of_type_and_key_and_the_first_body_wins(store):
    first = drift_event(occurred_at=datetime(2025, 1, 9, 1, 15, tzinfo=UTC))
    rerun = drift_event(numbers={"drift_share": 0.5})

    assert rerun.id == first.id
    assert drift_event(key="2025-01-09/champion-3").id != first.id
    assert make_event("model.refused", key="2025-01-08/champion-3", text="refused").id != first.id
    assert store.record(first) == first.body()
    assert store.record(rerun) == first.body()  # one webhook id, one message


# --------------------------------------------------------------------------------------------------
# Retries, dead letters, re-sending
# --------------------------------------------------------------------------------------------------


def test_transient_failures_are_retried_under_one_id_and_delivered_once(serve, store, sleeps):
    receiver = serve(Answer(500), Answer(503))
    alerts = dispatcher(store, sleeps, endpoint(receiver.url))
    event = drift_event()

    [result] = alerts.send(event)

    assert (result.outcome, result.attempts, result.status_code) == (Outcome.DELIVERED, 3, 200)
    assert receiver.statuses() == [500, 503, 200]
    assert {request.headers["webhook-id"] for request in receiver.requests} == {event.id}
    for request in receiver.requests:  # each attempt re-signed, and valid
        assert Webhook(SECRET).verify(request.body, request.headers)
    assert len(sleeps) == 2

    [again] = alerts.send(drift_event(numbers={"drift_share": 0.9}))
    assert again.outcome is Outcome.ALREADY_DELIVERED
    assert alerts.resend_dead_letters() == []
    assert len(receiver.requests) == 3
    [record] = store.deliveries(event.id)
    assert (record.status, record.attempts, record.last_status_code) == (DeliveryStatus.DELIVERED, 3, 200)
    assert record.delivered_at is not None


def test_a_timed_out_attempt_is_retried_with_the_same_id(serve, store, sleeps):
    receiver = serve(Answer(200, delay_s=0.6))
    event = drift_event()

    [result] = dispatcher(store, sleeps, endpoint(receiver.url, timeout_s=0.2)).send(event)

    assert (result.outcome, result.attempts) == (Outcome.DELIVERED, 2)
    assert [request.headers["webhook-id"] for request in receiver.requests] == [event.id, event.id]


@pytest.fixture(params=["closed_port", "always_500"])
def dead_receiver(request, serve) -> tuple[str, str, Callable[[], Receiver]]:
    """(url of a receiver that is down, the error it causes, a function that brings it back)."""
    if request.param == "closed_port":
        port = _closed_port()
        return f"http://127.0.0.1:{port}/hooks", "ConnectError", lambda: serve(port=port)
    receiver = serve(default=Answer(500, body=b"database unavailable"))

    def back() -> Receiver:
        receiver.answers.append(Answer(200))
        return receiver

    return receiver.url, "HTTP 500: database unavailable", back


def test_dead_receiver_goes_to_the_dead_letters_and_is_resent_exactly_once(dead_receiver, store, sleeps):
    url, error, come_back = dead_receiver
    alerts = dispatcher(store, sleeps, endpoint(url))
    event = drift_event()

    [result] = alerts.send(event)

    assert (result.outcome, result.attempts) == (Outcome.DEAD_LETTERED, 3)
    [letter] = store.dead_letters()
    assert (letter.event_id, letter.endpoint, letter.status) == (event.id, "ops", DeliveryStatus.DEAD)
    assert letter.attempts == 3
    assert error in letter.last_error

    receiver = come_back()
    [resent] = alerts.resend_dead_letters()
    assert (resent.outcome, resent.attempts) == (Outcome.DELIVERED, 1)
    assert receiver.statuses().count(200) == 1
    assert (
        Webhook(SECRET).verify(receiver.requests[-1].body, receiver.requests[-1].headers)["type"]
        == event.type
    )

    assert alerts.resend_dead_letters() == []
    assert alerts.send(event)[0].outcome is Outcome.ALREADY_DELIVERED
    assert receiver.statuses().count(200) == 1
    assert store.dead_letters() == []
    assert store.deliveries(event.id)[0].attempts == 4


def test_client_error_is_dead_lettered_at_once_with_the_reason(serve, store, sleeps, caplog):
    receiver = serve(default=Answer(400, body=b"unknown field 'numbers'"))

    with caplog.at_level(logging.ERROR, logger="recloop.alerts"):
        [result] = dispatcher(store, sleeps, endpoint(receiver.url)).send(drift_event())

    assert (result.outcome, result.attempts, result.status_code) == (Outcome.DEAD_LETTERED, 1, 400)
    assert len(receiver.requests) == 1 and sleeps == []
    [letter] = store.dead_letters("ops")
    assert (letter.last_status_code, letter.last_error) == (400, "HTTP 400: unknown field 'numbers'")
    assert "dead-lettered" in caplog.text


def test_retry_after_is_a_floor_for_the_backoff(serve, store, sleeps):
    receiver = serve(Answer(429, headers={"Retry-After": "2"}))

    [result] = dispatcher(store, sleeps, endpoint(receiver.url), max_delay_s=5).send(drift_event())

    assert (result.outcome, receiver.statuses()) == (Outcome.DELIVERED, [429, 200])
    assert sleeps[0] >= 2


def test_retry_after_beyond_max_delay_ends_the_retries(serve, store, sleeps):
    receiver = serve(default=Answer(429, headers={"Retry-After": "120"}))

    [result] = dispatcher(store, sleeps, endpoint(receiver.url), max_delay_s=5).send(drift_event())

    assert (result.outcome, result.attempts, sleeps) == (Outcome.DEAD_LETTERED, 1, [])
    assert "Retry-After 120s" in result.error
    assert len(receiver.requests) == 1


def test_backoff_is_exponential_capped_and_jittered(serve, store, sleeps, monkeypatch):
    receiver = serve(default=Answer(503))
    alerts = dispatcher(
        store, sleeps, endpoint(receiver.url), max_attempts=6, base_delay_s=0.01, max_delay_s=0.05
    )
    caps = [0.01, 0.02, 0.04, 0.05, 0.05]

    alerts.send(drift_event(key="jittered"))
    assert len(sleeps) == 5
    assert all(0 <= delay < cap for delay, cap in zip(sleeps, caps, strict=True))

    sleeps.clear()
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the top of each jitter range
    alerts.send(drift_event(key="at-the-top"))
    assert sleeps == pytest.approx(caps)
    assert len(receiver.requests) == 12


# --------------------------------------------------------------------------------------------------
# Concurrent and crashed senders
# --------------------------------------------------------------------------------------------------


def test_concurrent_senders_of_one_event_deliver_it_once(serve, db_url):
    """Four senders, each with its own connection pool (as separate processes would), start together."""
    receiver = serve(default=Answer(200, delay_s=0.3))
    event = drift_event()
    stores = [DeliveryStore(db_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    results = []

    def sender(store: DeliveryStore) -> None:
        alerts = AlertDispatcher([endpoint(receiver.url)], store)
        start.wait()
        results.extend(alerts.send(event))

    threads = [threading.Thread(target=sender, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()

    assert len(receiver.requests) == 1
    outcomes = sorted(result.outcome for result in results)
    assert outcomes.count(Outcome.DELIVERED) == 1
    assert set(outcomes) - {Outcome.DELIVERED} <= {Outcome.IN_FLIGHT, Outcome.ALREADY_DELIVERED}
    assert len(outcomes) == 4


def test_a_claim_blocks_other_senders_until_its_lease_runs_out(serve, store, sleeps):
    receiver = serve()
    alerts = dispatcher(store, sleeps, endpoint(receiver.url))
    event = drift_event()
    store.record(event)
    crashed = store.claim(event.id, "ops", lease=timedelta(seconds=0.3))  # a sender that then died

    assert alerts.send(event)[0].outcome is Outcome.IN_FLIGHT
    assert alerts.resend_dead_letters() == []
    time.sleep(0.35)
    [abandoned] = store.dead_letters()
    assert abandoned.status is DeliveryStatus.SENDING
    [taken_over] = alerts.resend_dead_letters()

    assert taken_over.outcome is Outcome.DELIVERED
    assert len(receiver.requests) == 1
    # The dead sender's late outcome does not overwrite its successor's.
    assert not store.mark_dead(event.id, "ops", crashed, attempts=1, status_code=None, error="late")
    assert store.deliveries(event.id)[0].status is DeliveryStatus.DELIVERED


def test_endpoints_get_only_the_event_types_they_subscribe_to(serve, store, sleeps):
    everything, promotions = serve(), serve()
    alerts = dispatcher(
        store,
        sleeps,
        endpoint(everything.url, "ops"),
        endpoint(promotions.url, "registry", events=frozenset({"model.promoted", "model.refused"})),
    )

    drift = alerts.send(drift_event())
    promoted = alerts.send(make_event("model.promoted", key="v4", text="v4 is champion", model_version=4))

    assert [result.endpoint for result in drift] == ["ops"]
    assert [result.endpoint for result in promoted] == ["ops", "registry"]
    assert (len(everything.requests), len(promotions.requests)) == (2, 1)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _config(tmp_path, text: str, name: str = "alerts.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file_expands_the_url_and_reads_the_secret_from_the_environment(
    serve, tmp_path, monkeypatch, recloop_env
):
    receiver = serve()
    monkeypatch.setenv("TEST_ALERT_URL", receiver.url)
    monkeypatch.setenv("TEST_ALERT_SECRET", SECRET)
    path = _config(
        tmp_path,
        """
retry: {max_attempts: 2, base_delay_s: 0.01, max_delay_s: 0.02}
endpoints:
  - name: ops-chat
    url: ${TEST_ALERT_URL}
    secret_env: TEST_ALERT_SECRET
    events: [drift.detected, validation.failed]
    timeout_s: 3
""",
    )

    alerts = AlertDispatcher.from_settings(recloop_env, config_path=path)
    [ops] = alerts.endpoints
    results = alerts.send(drift_event())
    alerts.store.close()

    assert (ops.name, ops.url, ops.secret, ops.timeout_s) == ("ops-chat", receiver.url, SECRET, 3.0)
    assert ops.events == {"drift.detected", "validation.failed"}
    assert (alerts.max_attempts, alerts.base_delay_s, alerts.max_delay_s) == (2, 0.01, 0.02)
    assert results[0].outcome is Outcome.DELIVERED
    assert Webhook(SECRET).verify(receiver.requests[0].body, receiver.requests[0].headers)
    assert (recloop_env.home / "alerts.db").is_file()
    assert SECRET not in repr(ops) and receiver.url not in repr(ops)


VALID_ENTRY = {"name": "ops", "url": "http://127.0.0.1/hook", "secret_env": "TEST_ALERT_SECRET"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"secret_env": "TEST_MISSING_SECRET"},
            "environment variable TEST_MISSING_SECRET is not set",
            id="secret-env-unset",
        ),
        pytest.param(
            {"url": "${TEST_MISSING_URL}/hook"},
            "environment variable TEST_MISSING_URL is not set",
            id="url-env-unset",
        ),
        pytest.param({"secret": SECRET}, "secrets are not read from files", id="secret-in-file"),
        pytest.param({"events": ["drift"]}, "unknown event types ['drift']", id="unknown-event-type"),
        pytest.param(
            {"secret_env": "TEST_BAD_SECRET"}, "not a Standard Webhooks secret", id="secret-not-base64"
        ),
        pytest.param({"url": "ftp://127.0.0.1/hook"}, "url must be http(s)", id="not-http"),
        pytest.param({"timeout_s": 0}, "timeout_s must be positive", id="zero-timeout"),
    ],
)
def test_config_errors_name_what_is_wrong(tmp_path, monkeypatch, recloop_env, change, message):
    monkeypatch.setenv("TEST_ALERT_SECRET", SECRET)
    monkeypatch.setenv("TEST_BAD_SECRET", "my password!")
    monkeypatch.delenv("TEST_MISSING_SECRET", raising=False)
    monkeypatch.delenv("TEST_MISSING_URL", raising=False)
    valid = _config(tmp_path, yaml.safe_dump({"endpoints": [VALID_ENTRY]}), "valid.yaml")
    AlertDispatcher.from_settings(recloop_env, config_path=valid).store.close()  # the change alone breaks it

    changed = _config(tmp_path, yaml.safe_dump({"endpoints": [VALID_ENTRY | change]}), "changed.yaml")
    with pytest.raises(AlertConfigError, match=re.escape(message)):
        AlertDispatcher.from_settings(recloop_env, config_path=changed)


def test_shipped_config_enables_nothing_and_the_quick_path_adds_one_endpoint(monkeypatch, recloop_env):
    alerts = AlertDispatcher.from_settings(recloop_env)
    assert alerts.endpoints == ()
    assert alerts.send(drift_event()) == []
    assert alerts.max_attempts == 5
    alerts.store.close()

    monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_URL", "https://hooks.example.org/recloop")
    with pytest.raises(AlertConfigError, match="RECLOOP_ALERT_WEBHOOK_SECRET is not set"):
        AlertDispatcher.from_settings(recloop_env)

    monkeypatch.setenv("RECLOOP_ALERT_WEBHOOK_SECRET", SECRET)
    alerts = AlertDispatcher.from_settings(recloop_env)
    alerts.store.close()
    [quick] = alerts.endpoints
    assert (quick.name, quick.url, quick.events) == ("env", "https://hooks.example.org/recloop", None)
    assert all(quick.accepts(kind) for kind in ("drift.detected", "model.refused", "retraining.failed"))


def test_environment_chooses_the_config_file_and_the_store(tmp_path, monkeypatch, recloop_env):
    monkeypatch.setenv("TEST_ALERT_SECRET", SECRET)
    monkeypatch.setenv(
        "RECLOOP_ALERTS_CONFIG", str(_config(tmp_path, yaml.safe_dump({"endpoints": [VALID_ENTRY]})))
    )
    monkeypatch.setenv("RECLOOP_ALERTS_DB_URL", f"sqlite:///{tmp_path / 'elsewhere' / 'log.db'}")

    alerts = AlertDispatcher.from_settings(recloop_env)
    alerts.store.close()

    assert [configured.name for configured in alerts.endpoints] == ["ops"]
    assert (tmp_path / "elsewhere" / "log.db").is_file()
    assert not (recloop_env.home / "alerts.db").exists()
    monkeypatch.setenv("RECLOOP_ALERTS_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(AlertConfigError, match=r"missing\.yaml does not exist"):
        AlertDispatcher.from_settings(recloop_env)
