"""The alert delivery log on PostgreSQL, the production store: its tables created by concurrent first users,
one claim among concurrent senders (separate connection pools, as separate processes have), lease takeover,
dead letters with their attempts, and timezone-aware times.

The HTTP side is the same on every database and is tested in tests/unit/test_alerts.py.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from recloop.alerts import (
    AlertDispatcher,
    DeliveryStatus,
    DeliveryStore,
    Endpoint,
    Outcome,
    make_event,
)

pytestmark = pytest.mark.postgres

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
LEASE = timedelta(minutes=5)
T = TypeVar("T")


@pytest.fixture()
def alerts_db_url(pg_database) -> str:
    """The test database as a SQLAlchemy URL on psycopg 3, the driver recloop installs."""
    return pg_database.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture()
def store(alerts_db_url) -> Iterator[DeliveryStore]:
    store = DeliveryStore(alerts_db_url)
    yield store
    store.close()


def together(count: int, work: Callable[[int], T]) -> list[T]:
    """Runs work(0..count-1) in threads released at the same instant; returns their results."""
    start = threading.Barrier(count)
    results: list[T] = []

    def run(index: int) -> None:
        start.wait()
        results.append(work(index))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == count, "a worker thread failed"
    return results


def drift_event():
    return make_event(
        "drift.detected",
        key="2025-01-08/champion-3",
        text="Drift on events 2025-01-08",
        partition="2025-01-08",
        model_version=3,
        numbers={"drift_share": 0.42},
    )


def test_concurrent_first_users_create_the_tables_and_one_sender_wins_the_claim(alerts_db_url):
    stores = together(4, lambda _: DeliveryStore(alerts_db_url))
    event = drift_event()
    try:
        bodies = together(4, lambda i: stores[i].record(event))
        tokens = together(4, lambda i: stores[i].claim(event.id, "ops", lease=LEASE))
    finally:
        for store in stores:
            store.close()

    assert bodies == [event.body()] * 4
    assert sum(token is not None for token in tokens) == 1


def test_delivered_is_final_and_dead_letters_are_reclaimed_once(store):
    event = drift_event()
    store.record(event)

    token = store.claim(event.id, "ops", lease=LEASE)
    assert store.claim(event.id, "ops", lease=LEASE) is None  # in flight
    assert store.mark_dead(event.id, "ops", token, attempts=3, status_code=503, error="HTTP 503")

    [letter] = store.dead_letters()
    assert (letter.status, letter.attempts, letter.last_status_code, letter.last_error) == (
        DeliveryStatus.DEAD,
        3,
        503,
        "HTTP 503",
    )
    assert store.dead_letters("other") == []

    again = together(3, lambda _: store.claim(event.id, "ops", lease=LEASE))
    [winner] = [token for token in again if token is not None]
    assert store.mark_delivered(event.id, "ops", winner, attempts=1, status_code=200)
    assert store.claim(event.id, "ops", lease=LEASE) is None
    assert store.dead_letters() == []

    [record] = store.deliveries(event.id)
    assert (record.status, record.attempts, record.last_error) == (DeliveryStatus.DELIVERED, 4, None)
    assert record.updated_at.tzinfo is not None
    assert abs(record.delivered_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_an_expired_claim_is_taken_over_and_its_late_outcome_ignored(store):
    event = drift_event()
    store.record(event)
    died = store.claim(event.id, "ops", lease=timedelta(seconds=-1))  # already expired: its sender died

    [abandoned] = store.dead_letters()
    assert abandoned.status is DeliveryStatus.SENDING
    successor = store.claim(event.id, "ops", lease=LEASE)
    assert successor is not None

    assert not store.mark_delivered(event.id, "ops", died, attempts=1, status_code=200)
    assert store.mark_dead(event.id, "ops", successor, attempts=2, status_code=None, error="ConnectError")
    assert store.deliveries(event.id)[0].last_error == "ConnectError"


def test_dispatcher_dead_letters_on_postgres_and_counts_attempts_across_resends(store):
    with socket.socket() as bound:  # bound, never listening: connection refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/hooks"
        alerts = AlertDispatcher(
            [Endpoint("ops", url, SECRET, timeout_s=1)], store, max_attempts=2, sleep=lambda _: None
        )
        event = drift_event()

        [first] = alerts.send(event)
        [resent] = alerts.resend_dead_letters()

    assert (first.outcome, first.attempts) == (Outcome.DEAD_LETTERED, 2)
    assert (resent.outcome, resent.attempts) == (Outcome.DEAD_LETTERED, 2)
    [letter] = store.dead_letters("ops")
    assert letter.attempts == 4
    assert "ConnectError" in letter.last_error
