"""Alert webhooks: monitoring events POSTed to configured receivers, signed the Standard Webhooks way.

Why the pieces are what they are:

* An event's id is derived from a key the caller gives (`make_event`): a re-run Dagster step that sends
  "drift detected on 2025-01-08 against champion 3" again produces the same id, and the delivery log makes
  the second send a no-op. That id is the `webhook-id` of every attempt, the one Standard Webhooks
  receivers deduplicate on.
* Each attempt is signed afresh with `standardwebhooks` (`webhook-timestamp` is the time of the attempt:
  receivers reject signatures more than five minutes off, and a retry can come later than that).
* Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried with capped exponential
  backoff and full jitter, honouring `Retry-After`; any other answer is final. What still fails is kept as
  a dead letter, and `resend_dead_letters()` tries it again later.
* The delivery log (`DeliveryStore`, SQLAlchemy: SQLite embedded, Postgres in production) has one row per
  (event id, endpoint), and a sender must *claim* that row before posting. A claim is one INSERT (the
  primary key lets one of concurrent inserters win) or one conditional UPDATE, so of two processes sending
  the same event at once exactly one posts. A claim has a lease, so a sender that died mid-delivery does
  not hold the event forever.
* A receiver being down never raises into the caller's pipeline step: `send()` returns one
  `DeliveryResult` per endpoint and logs. Configuration errors raise `AlertConfigError`; an unreachable
  delivery log raises SQLAlchemy's error (without it nothing can be delivered at most once).

Configuration: `monitoring/alerts.yaml` (another file with `RECLOOP_ALERTS_CONFIG`), or the quick path
`RECLOOP_ALERT_WEBHOOK_URL` + `RECLOOP_ALERT_WEBHOOK_SECRET` (one endpoint receiving everything). The log
lives at `RECLOOP_ALERTS_DB_URL`, by default `sqlite:///<RECLOOP_HOME>/alerts.db`.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
import sqlalchemy as sa
import yaml
from sqlalchemy.exc import IntegrityError, ProgrammingError
from standardwebhooks import Webhook, WebhookVerificationError

from recloop.config import REPO_ROOT, Settings

__all__ = [
    "EVENT_TYPES",
    "AlertConfigError",
    "AlertDispatcher",
    "AlertEvent",
    "DeliveryRecord",
    "DeliveryResult",
    "DeliveryStatus",
    "DeliveryStore",
    "Endpoint",
    "EventType",
    "Outcome",
    "WebhookReceiver",
    "WebhookVerificationError",
    "make_event",
    "new_secret",
    "verify",
]

log = logging.getLogger(__name__)

EventType = Literal[
    "drift.detected", "validation.failed", "model.promoted", "model.refused", "retraining.failed", "model.corrupt"
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)

DEFAULT_CONFIG_PATH = REPO_ROOT / "monitoring" / "alerts.yaml"
CONFIG_PATH_ENV = "RECLOOP_ALERTS_CONFIG"
DB_URL_ENV = "RECLOOP_ALERTS_DB_URL"
QUICK_URL_ENV = "RECLOOP_ALERT_WEBHOOK_URL"
QUICK_SECRET_ENV = "RECLOOP_ALERT_WEBHOOK_SECRET"
QUICK_ENDPOINT_NAME = "env"
DEFAULT_TIMEOUT_S = 10.0

_SECRET_PREFIX = "whsec_"
_USER_AGENT = "recloop-alerts"
# 408 (the receiver timed out reading) and 429 (rate limited) are transient; so is every 5xx.
_RETRYABLE_STATUS = frozenset({408, 429})
# How much of a refusing receiver's answer is kept as the reason: enough for an error message.
_REASON_CHARS = 300


class AlertConfigError(ValueError):
    """The alert configuration cannot be used as written (unknown event type, missing secret, bad URL...)."""


# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AlertEvent:
    """One monitoring event. Build it with `make_event`, which derives `id` from the caller's key."""

    id: str
    type: EventType
    occurred_at: datetime
    text: str
    asset: str | None = None
    partition: str | None = None
    model_version: str | None = None
    numbers: Mapping[str, float | int | None] = field(default_factory=dict)
    report_url: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown alert event type {self.type!r}; expected one of {EVENT_TYPES}")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        # Fail where the event is built, not later inside send(), on details JSON cannot carry (NaN).
        self.body()

    def payload(self) -> dict[str, Any]:
        """The JSON document receivers get.

        Standard Webhooks' envelope (`type`, `timestamp`, `data`), plus `text` at the top level: the one
        field Slack- and Mattermost-style incoming webhooks display.
        """
        return {
            "type": self.type,
            "timestamp": self.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "text": self.text,
            "data": {
                "asset": self.asset,
                "partition": self.partition,
                "model_version": self.model_version,
                "numbers": dict(self.numbers),
                "report_url": self.report_url,
                "details": dict(self.details),
            },
        }

    def body(self) -> str:
        """The exact text that is signed and sent: ASCII-only JSON, so no receiver re-encodes it before
        checking the signature; strict JSON (no NaN), which every parser accepts."""
        return json.dumps(self.payload(), sort_keys=True, allow_nan=False, default=str)


def make_event(
    type: EventType,
    *,
    key: str,
    text: str,
    asset: str | None = None,
    partition: str | None = None,
    model_version: str | int | None = None,
    numbers: Mapping[str, float | int | None] | None = None,
    report_url: str | None = None,
    details: Mapping[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> AlertEvent:
    """An event whose id is a function of (type, key).

    Args:
        type: one of `EVENT_TYPES`.
        key: what makes this event one occurrence, e.g. f"{partition}/champion-{version}" for a drift
            alert. The same type and key give the same id, delivered at most once to each endpoint.
        text: the human line chat tools show; the report link is appended on its own line when given.
        numbers: the key figures (drift share, metric values...); NaN and infinities become null, which
            JSON can carry.
        occurred_at: when it happened (default: now, UTC).
    """
    if not key:
        raise ValueError("an alert event needs a non-empty key: its id is derived from it")
    digest = hashlib.sha256(f"{type}\n{key}".encode()).hexdigest()[:32]
    if report_url and report_url not in text:
        text = f"{text}\n{report_url}"
    return AlertEvent(
        id=f"evt_{digest}",
        type=type,
        occurred_at=occurred_at or datetime.now(UTC),
        text=text,
        asset=asset,
        partition=partition,
        model_version=None if model_version is None else str(model_version),
        numbers={name: _json_number(value) for name, value in (numbers or {}).items()},
        report_url=report_url,
        details=dict(details or {}),
    )


def _json_number(value: float | int | None) -> float | int | None:
    if value is None or isinstance(value, int):
        return value
    number = float(value)  # numpy scalars too
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------------------------------
# Endpoints and signatures
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A receiver. `events=None` subscribes it to every event type."""

    name: str
    # Incoming-webhook URLs (Slack's, Mattermost's) are credentials themselves: kept out of reprs and logs.
    url: str = field(repr=False)
    secret: str = field(repr=False)
    events: frozenset[str] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.name:
            raise AlertConfigError("an alert endpoint needs a name")
        try:
            scheme = httpx.URL(self.url).scheme
        except httpx.InvalidURL as err:
            raise AlertConfigError(f"alert endpoint {self.name!r}: invalid url ({err})") from err
        if scheme not in ("http", "https"):
            raise AlertConfigError(f"alert endpoint {self.name!r}: url must be http(s)://..., got {scheme!r}")
        unknown = sorted(str(name) for name in set(self.events or ()) - set(EVENT_TYPES))
        if unknown:
            raise AlertConfigError(
                f"alert endpoint {self.name!r}: unknown event types {unknown}; expected any of {EVENT_TYPES}"
            )
        if not self.timeout_s > 0:
            raise AlertConfigError(f"alert endpoint {self.name!r}: timeout_s must be positive")
        _check_secret(self.name, self.secret)

    def accepts(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


def _check_secret(endpoint: str, secret: str) -> None:
    """A Standard Webhooks secret is `whsec_` + the base64 of the key.

    `standardwebhooks` decodes leniently: a pasted password would become some other key, and the receiver
    would reject every delivery. Checked here, where the mistake can be named.
    """
    raw = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise AlertConfigError(
            f"alert endpoint {endpoint!r}: the secret is not a Standard Webhooks secret "
            f"({_SECRET_PREFIX}<base64 of 24-64 random bytes>)"
        )


def _signed_headers(endpoint: Endpoint, event_id: str, body: str) -> dict[str, str]:
    # The library signs whole seconds; the header must carry the same second.
    sent_at = datetime.now(UTC).replace(microsecond=0)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(endpoint.secret).sign(event_id, sent_at, body),
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
    """Check a delivery as a receiver does and return its payload.

    Raises `WebhookVerificationError` on a wrong signature, a missing header or a timestamp more than five
    minutes off, and also on a malformed signature header, which the library lets escape as ValueError.
    """
    webhook = Webhook(secret)
    try:
        webhook.verify(body, dict(headers), json_parse=False)
    except ValueError as err:
        raise WebhookVerificationError(f"malformed webhook headers: {err}") from err
    return json.loads(body)


# --------------------------------------------------------------------------------------------------
# The delivery log and dead-letter store
# --------------------------------------------------------------------------------------------------


class DeliveryStatus(StrEnum):
    SENDING = "sending"  # claimed by a sender; re-claimable once its lease has run out
    DELIVERED = "delivered"  # a 2xx was received: never sent again
    DEAD = "dead"  # retries exhausted or refused: a dead letter


_metadata = sa.MetaData()

_events = sa.Table(
    "alert_events",
    _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

_deliveries = sa.Table(
    "alert_deliveries",
    _metadata,
    sa.Column("event_id", sa.String(64), sa.ForeignKey("alert_events.id"), primary_key=True),
    sa.Column("endpoint", sa.String(200), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("claim_token", sa.String(32)),
    sa.Column("claim_expires_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
)


@dataclass(frozen=True)
class DeliveryRecord:
    """One (event, endpoint) row of the delivery log. `attempts` counts every HTTP attempt ever made."""

    event_id: str
    event_type: str
    endpoint: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    updated_at: datetime
    delivered_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class DeliveryStore:
    """The durable delivery log, keyed by (event id, endpoint name), and the dead letters it holds.

    The same code runs on SQLite (embedded) and Postgres (production); the tables are created on first use.
    Claim expiry compares times taken on the senders' clocks, so they should be NTP-synchronised.
    """

    def __init__(self, url: str) -> None:
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = sa.create_engine(parsed)
        try:
            _metadata.create_all(self._engine)
        except (IntegrityError, ProgrammingError):
            # Two processes creating the tables at once on Postgres: the second fails on the catalog's
            # unique index or "already exists". The tables exist now; checking again confirms it.
            _metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def record(self, event: AlertEvent) -> str:
        """Keep `event` and return the body to send under its id.

        The first body recorded for an id wins: a later send of the same id (a re-run step, whose
        `occurred_at` or numbers may differ) re-sends that body, as one webhook id must be one message.
        """
        body = event.body()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    sa.insert(_events).values(id=event.id, type=event.type, body=body, created_at=_now())
                )
        except IntegrityError:
            return self.event_body(event.id)
        return body

    def event_body(self, event_id: str) -> str:
        with self._engine.connect() as conn:
            body = conn.execute(
                sa.select(_events.c.body).where(_events.c.id == event_id)
            ).scalar_one_or_none()
        if body is None:
            raise KeyError(f"alert event {event_id} is not recorded")
        return body

    def claim(self, event_id: str, endpoint: str, *, lease: timedelta) -> str | None:
        """Take the right to deliver a recorded event to `endpoint` for `lease`.

        Returns a claim token, or None when the event is delivered there already or another sender holds
        an unexpired claim. A new pair is claimed by inserting its row; an existing one by one conditional
        UPDATE (from dead, or from sending whose lease ran out): check and take are a single statement, so
        concurrent senders cannot both win on any database.
        """
        token = uuid.uuid4().hex
        now = _now()
        claimed = {
            "status": DeliveryStatus.SENDING.value,
            "claim_token": token,
            "claim_expires_at": now + lease,
            "updated_at": now,
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    sa.insert(_deliveries).values(event_id=event_id, endpoint=endpoint, attempts=0, **claimed)
                )
            return token
        except IntegrityError:
            pass
        with self._engine.begin() as conn:
            taken = conn.execute(
                sa.update(_deliveries).where(_pair(event_id, endpoint), _resendable(now)).values(**claimed)
            ).rowcount
        return token if taken else None

    def mark_delivered(
        self, event_id: str, endpoint: str, token: str, *, attempts: int, status_code: int
    ) -> bool:
        """Record a 2xx. False when `token` no longer holds the claim (see `_finish`)."""
        return self._finish(
            event_id,
            endpoint,
            token,
            attempts=attempts,
            status=DeliveryStatus.DELIVERED.value,
            last_status_code=status_code,
            last_error=None,
            delivered_at=_now(),
        )

    def mark_dead(
        self, event_id: str, endpoint: str, token: str, *, attempts: int, status_code: int | None, error: str
    ) -> bool:
        """Make the delivery a dead letter with its reason. False when `token` no longer holds the claim."""
        return self._finish(
            event_id,
            endpoint,
            token,
            attempts=attempts,
            status=DeliveryStatus.DEAD.value,
            last_status_code=status_code,
            last_error=error,
        )

    def _finish(self, event_id: str, endpoint: str, token: str, *, attempts: int, **outcome: Any) -> bool:
        """Write an outcome and release the claim, only while `token` still holds it: a sender whose lease
        ran out must not overwrite the outcome of the sender that took over."""
        with self._engine.begin() as conn:
            updated = conn.execute(
                sa.update(_deliveries)
                .where(_pair(event_id, endpoint), _deliveries.c.claim_token == token)
                .values(
                    attempts=_deliveries.c.attempts + attempts,
                    claim_token=None,
                    claim_expires_at=None,
                    updated_at=_now(),
                    **outcome,
                )
            ).rowcount
        return updated == 1

    def dead_letters(self, endpoint: str | None = None) -> list[DeliveryRecord]:
        """Deliveries to try again, oldest first: dead letters, and claims whose sender died mid-delivery."""
        condition = _resendable(_now())
        if endpoint is not None:
            condition = sa.and_(condition, _deliveries.c.endpoint == endpoint)
        return self._records(condition)

    def deliveries(self, event_id: str) -> list[DeliveryRecord]:
        """The delivery log of one event, one record per endpoint."""
        return self._records(_deliveries.c.event_id == event_id)

    def _records(self, condition: sa.ColumnElement[bool]) -> list[DeliveryRecord]:
        d = _deliveries.c
        query = (
            sa.select(_deliveries, _events.c.type)
            .join(_events, _events.c.id == d.event_id)
            .where(condition)
            .order_by(d.updated_at, d.event_id, d.endpoint)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            DeliveryRecord(
                event_id=row.event_id,
                event_type=row.type,
                endpoint=row.endpoint,
                status=DeliveryStatus(row.status),
                attempts=row.attempts,
                last_status_code=row.last_status_code,
                last_error=row.last_error,
                updated_at=_utc(row.updated_at),
                delivered_at=_utc(row.delivered_at) if row.delivered_at else None,
            )
            for row in rows
        ]


def _pair(event_id: str, endpoint: str) -> sa.ColumnElement[bool]:
    return sa.and_(_deliveries.c.event_id == event_id, _deliveries.c.endpoint == endpoint)


def _resendable(now: datetime) -> sa.ColumnElement[bool]:
    d = _deliveries.c
    return sa.or_(
        d.status == DeliveryStatus.DEAD.value,
        sa.and_(d.status == DeliveryStatus.SENDING.value, d.claim_expires_at < now),
    )


# --------------------------------------------------------------------------------------------------
# Dispatching
# --------------------------------------------------------------------------------------------------


class Outcome(StrEnum):
    DELIVERED = "delivered"  # this call got a 2xx
    DEAD_LETTERED = "dead_lettered"  # this call gave up; the delivery is in the dead-letter store
    ALREADY_DELIVERED = "already_delivered"  # an earlier send delivered it: nothing sent
    IN_FLIGHT = "in_flight"  # another sender holds the claim: nothing sent


@dataclass(frozen=True)
class DeliveryResult:
    """What one `send()` or `resend_dead_letters()` did for one endpoint. `attempts` counts this call's."""

    endpoint: str
    event_id: str
    outcome: Outcome
    attempts: int = 0
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Accepted:
    status_code: int


@dataclass(frozen=True)
class _Failed:
    status_code: int | None  # None: no answer (connection error, timeout)
    error: str
    retryable: bool
    retry_after_s: float | None = None


class AlertDispatcher:
    """Sends events to the endpoints subscribed to them, at most once per (event, endpoint).

    Args:
        endpoints: the receivers; names must be unique (they key the delivery log).
        store: the delivery log.
        max_attempts: HTTP attempts per delivery before it becomes a dead letter.
        base_delay_s, max_delay_s: backoff before retry n is uniform in [0, min(max, base * 2**(n-1))].
        sleep: how to wait between attempts (tests pass a recorder).
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        store: DeliveryStore,
        *,
        max_attempts: int = 5,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        names = [endpoint.name for endpoint in endpoints]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise AlertConfigError(f"alert endpoint names must be unique; repeated: {duplicates}")
        if max_attempts < 1 or base_delay_s < 0 or max_delay_s < base_delay_s:
            raise AlertConfigError(
                "alert retries need max_attempts >= 1 and 0 <= base_delay_s <= max_delay_s, got "
                f"{max_attempts}, {base_delay_s}, {max_delay_s}"
            )
        self.endpoints = tuple(endpoints)
        self.store = store
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, config_path: str | Path | None = None
    ) -> AlertDispatcher:
        """The dispatcher the environment configures.

        Endpoints and retry policy from `config_path`, else `RECLOOP_ALERTS_CONFIG`, else
        `monitoring/alerts.yaml` (absent is fine for that default only), plus the quick-path endpoint of
        `RECLOOP_ALERT_WEBHOOK_URL` + `RECLOOP_ALERT_WEBHOOK_SECRET`. Delivery log at
        `RECLOOP_ALERTS_DB_URL`, by default `sqlite:///<RECLOOP_HOME>/alerts.db`.

        Raises:
            AlertConfigError: the file is invalid, a `${VAR}` or a secret's variable is unset, ...
        """
        settings = settings or Settings.from_env()
        explicit = config_path or os.environ.get(CONFIG_PATH_ENV)
        path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
        if explicit and not path.is_file():
            raise AlertConfigError(f"alert configuration {path} does not exist")
        endpoints, retry = _read_config(path) if path.is_file() else ([], {})
        quick = _quick_endpoint()
        if quick is not None:
            endpoints.append(quick)
        url = os.environ.get(DB_URL_ENV) or f"sqlite:///{settings.home / 'alerts.db'}"
        return cls(endpoints, DeliveryStore(url), **retry)

    def send(self, event: AlertEvent) -> list[DeliveryResult]:
        """Deliver `event` to every endpoint subscribed to its type; one result per such endpoint."""
        targets = [endpoint for endpoint in self.endpoints if endpoint.accepts(event.type)]
        if not targets:
            log.debug("alert %s (%s): no endpoint subscribed", event.id, event.type)
            return []
        body = self.store.record(event)
        with httpx.Client(headers={"user-agent": _USER_AGENT}) as client:
            return [self._deliver(client, endpoint, event.id, body) for endpoint in targets]

    def resend_dead_letters(self, endpoint: str | None = None) -> list[DeliveryResult]:
        """Try the dead letters again (of one endpoint, or all), each with a full retry budget.

        Dead letters of endpoints no longer configured stay in the store, with a warning.
        """
        by_name = {configured.name: configured for configured in self.endpoints}
        if endpoint is not None and endpoint not in by_name:
            raise AlertConfigError(f"no alert endpoint named {endpoint!r}; configured: {sorted(by_name)}")
        results = []
        with httpx.Client(headers={"user-agent": _USER_AGENT}) as client:
            for letter in self.store.dead_letters(endpoint):
                target = by_name.get(letter.endpoint)
                if target is None:
                    log.warning(
                        "dead letter %s for unknown endpoint %r left in store",
                        letter.event_id,
                        letter.endpoint,
                    )
                    continue
                body = self.store.event_body(letter.event_id)
                results.append(self._deliver(client, target, letter.event_id, body))
        return results

    def _deliver(self, client: httpx.Client, endpoint: Endpoint, event_id: str, body: str) -> DeliveryResult:
        token = self.store.claim(event_id, endpoint.name, lease=self._lease(endpoint))
        if token is None:
            return self._not_claimed(endpoint.name, event_id)
        attempts, last = self._post_with_retries(client, endpoint, event_id, body)
        if isinstance(last, _Accepted):
            kept = self.store.mark_delivered(
                event_id, endpoint.name, token, attempts=attempts, status_code=last.status_code
            )
            log.info("alert %s delivered to %s (attempt %d)", event_id, endpoint.name, attempts)
            outcome, error = Outcome.DELIVERED, None
        else:
            kept = self.store.mark_dead(
                event_id,
                endpoint.name,
                token,
                attempts=attempts,
                status_code=last.status_code,
                error=last.error,
            )
            log.error(
                "alert %s to %s dead-lettered after %d attempt(s): %s",
                event_id,
                endpoint.name,
                attempts,
                last.error,
            )
            outcome, error = Outcome.DEAD_LETTERED, last.error
        if not kept:
            log.warning(
                "alert %s to %s: the claim expired during delivery; another sender may have taken it over",
                event_id,
                endpoint.name,
            )
        return DeliveryResult(endpoint.name, event_id, outcome, attempts, last.status_code, error)

    def _not_claimed(self, endpoint: str, event_id: str) -> DeliveryResult:
        record = next((r for r in self.store.deliveries(event_id) if r.endpoint == endpoint), None)
        delivered = record is not None and record.status is DeliveryStatus.DELIVERED
        outcome = Outcome.ALREADY_DELIVERED if delivered else Outcome.IN_FLIGHT
        log.info("alert %s to %s not sent: %s", event_id, endpoint, outcome.value)
        return DeliveryResult(endpoint, event_id, outcome)

    def _lease(self, endpoint: Endpoint) -> timedelta:
        """How long a claim protects a delivery in progress: twice the longest retry loop (httpx applies
        the timeout to connect, write and read separately; every backoff at its cap), so that only a
        sender that died loses its claim."""
        longest_s = self.max_attempts * (3 * endpoint.timeout_s + self.max_delay_s)
        return timedelta(seconds=2 * longest_s)

    def _post_with_retries(
        self, client: httpx.Client, endpoint: Endpoint, event_id: str, body: str
    ) -> tuple[int, _Accepted | _Failed]:
        """Attempts until a 2xx, a final answer, or the budget is spent. Every attempt carries the same
        `webhook-id` (the receiver's idempotency key) and a fresh timestamp and signature."""
        attempt = 1
        while True:
            result = _post(client, endpoint, event_id, body)
            if isinstance(result, _Accepted) or not result.retryable or attempt == self.max_attempts:
                return attempt, result
            delay = self._backoff_s(attempt, result.retry_after_s)
            if delay is None:
                limit = f"Retry-After {result.retry_after_s:.0f}s > max_delay_s {self.max_delay_s:g}s"
                return attempt, replace(result, error=f"{result.error} ({limit})")
            log.warning(
                "alert %s to %s: attempt %d/%d failed (%s); retrying in %.2fs",
                event_id,
                endpoint.name,
                attempt,
                self.max_attempts,
                result.error,
                delay,
            )
            self._sleep(delay)
            attempt += 1

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float | None:
        """Full jitter, so senders that failed in the same outage do not come back together. A
        `Retry-After` is a floor; one beyond `max_delay_s` ends the retries (dead letter, re-sent later)
        rather than knocking early on a receiver that said when to come back. None: stop."""
        if retry_after_s is not None and retry_after_s > self.max_delay_s:
            return None
        delay = random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))
        return max(delay, retry_after_s or 0.0)


def _post(client: httpx.Client, endpoint: Endpoint, event_id: str, body: str) -> _Accepted | _Failed:
    try:
        response = client.post(
            endpoint.url,
            content=body.encode(),
            headers=_signed_headers(endpoint, event_id, body),
            timeout=endpoint.timeout_s,
        )
    except httpx.TransportError as err:  # connection refused/reset, timeouts, protocol errors
        return _Failed(status_code=None, error=f"{err.__class__.__name__}: {err}", retryable=True)
    code = response.status_code
    if response.is_success:
        return _Accepted(status_code=code)
    answer = response.text[:_REASON_CHARS].strip()
    return _Failed(
        status_code=code,
        error=f"HTTP {code}" + (f": {answer}" if answer else ""),
        retryable=code in _RETRYABLE_STATUS or code >= 500,
        retry_after_s=_retry_after_s(response.headers.get("retry-after")),
    )


def _retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - _now()).total_seconds())


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = {"retry", "endpoints"}
_RETRY_KEYS: dict[str, Callable[[Any], float | int]] = {
    "max_attempts": int,
    "base_delay_s": float,
    "max_delay_s": float,
}
_ENDPOINT_KEYS = {"name", "url", "secret_env", "events", "timeout_s"}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _read_config(path: Path) -> tuple[list[Endpoint], dict[str, Any]]:
    """Endpoints and retry settings of an alerts.yaml (see monitoring/alerts.yaml for the format)."""
    raw = yaml.safe_load(path.read_text()) or {}
    _require_mapping(raw, str(path), _TOP_KEYS)
    retry_raw = raw.get("retry") or {}
    _require_mapping(retry_raw, f"{path}: retry", set(_RETRY_KEYS))
    try:
        retry = {key: _RETRY_KEYS[key](value) for key, value in retry_raw.items()}
    except (TypeError, ValueError) as err:
        raise AlertConfigError(f"{path}: retry: {err}") from err
    entries = raw.get("endpoints") or []
    if not isinstance(entries, list):
        raise AlertConfigError(f"{path}: endpoints must be a list")
    return [_endpoint_from_entry(entry, f"{path}: endpoints[{i}]") for i, entry in enumerate(entries)], retry


def _endpoint_from_entry(entry: Any, where: str) -> Endpoint:
    if isinstance(entry, dict) and "secret" in entry:
        raise AlertConfigError(
            f"{where}: secrets are not read from files; put it in an environment variable and name that "
            "variable in `secret_env`"
        )
    _require_mapping(entry, where, _ENDPOINT_KEYS)
    missing = sorted({"name", "url", "secret_env"} - entry.keys())
    if missing:
        raise AlertConfigError(f"{where}: missing {missing}")
    where = f"{where} ({entry['name']})"
    events = entry.get("events", "*")
    if events != "*" and not isinstance(events, list):
        raise AlertConfigError(f"{where}: events must be '*' or a list of event types")
    try:
        timeout_s = float(entry.get("timeout_s", DEFAULT_TIMEOUT_S))
    except (TypeError, ValueError) as err:
        raise AlertConfigError(f"{where}: timeout_s: {err}") from err
    return Endpoint(
        name=str(entry["name"]),
        url=_ENV_REFERENCE.sub(lambda match: _env_value(match.group(1), f"{where}: url"), str(entry["url"])),
        secret=_env_value(str(entry["secret_env"]), f"{where}: secret_env"),
        events=None if events == "*" else frozenset(events),
        timeout_s=timeout_s,
    )


def _quick_endpoint() -> Endpoint | None:
    """The endpoint of `RECLOOP_ALERT_WEBHOOK_URL` + `RECLOOP_ALERT_WEBHOOK_SECRET`, receiving everything."""
    url = os.environ.get(QUICK_URL_ENV)
    if not url and not os.environ.get(QUICK_SECRET_ENV):
        return None
    if not url:
        raise AlertConfigError(f"{QUICK_SECRET_ENV} is set but {QUICK_URL_ENV} is not")
    return Endpoint(
        name=QUICK_ENDPOINT_NAME, url=url, secret=_env_value(QUICK_SECRET_ENV, f"{QUICK_URL_ENV} is set")
    )


def _env_value(name: str, where: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise AlertConfigError(f"{where}: environment variable {name} is not set")
    return value


def _require_mapping(value: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(value, dict):
        raise AlertConfigError(f"{where}: expected a mapping, got {value.__class__.__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise AlertConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


# --------------------------------------------------------------------------------------------------
# A receiver for trying a configuration out
# --------------------------------------------------------------------------------------------------


class WebhookReceiver:
    """A Standard Webhooks receiver on loopback (`recloop alerts listen`, the demo, end-to-end tests):
    answers 204 to a delivery whose signature verifies with `secret` and 401 otherwise, records verified
    payloads once per `webhook-id` (a receiver's own deduplication), and calls `on_event` for each new one.
    A malformed request (missing, non-numeric or negative Content-Length, a body over `max_body` bytes, a
    body that is not a JSON object, a body that stops short of its Content-Length or does not arrive within
    `timeout` seconds) gets 400 with the reason as its text, never a crash.

    Use as a context manager; `url` is where endpoints should point.
    """

    MAX_BODY = 1 << 20  # 1 MiB: recloop's alerts are a few KB

    def __init__(
        self,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        max_body: int = MAX_BODY,
        timeout: float = 10.0,
    ) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Lock, Thread

        _check_secret("receiver", secret)
        self.events: list[dict[str, Any]] = []
        self.rejected = 0
        self.malformed = 0
        self._seen: set[str] = set()
        self._lock = Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                self.timeout = timeout  # applied to the socket by StreamRequestHandler.setup
                super().setup()

            def _answer(self, status: int, text: str = "") -> None:
                body = text.encode()
                self.send_response(status)
                if body:
                    self.send_header("content-type", "text/plain; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _malformed(self, reason: str) -> None:
                with receiver._lock:
                    receiver.malformed += 1
                self.close_connection = True  # the unread rest of the body must not be taken as a request
                self._answer(400, reason + "\n")

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = (self.headers.get("content-length") or "").strip()
                if not length.isdigit():
                    self._malformed("a Content-Length header with the body's size in bytes is required")
                    return
                if int(length) > max_body:
                    self._malformed(f"the body is larger than {max_body} bytes")
                    return
                try:
                    body = self.rfile.read(int(length))
                except TimeoutError:
                    self._malformed(f"the body did not arrive within {timeout:g} s")
                    return
                if len(body) < int(length):
                    self._malformed("the body is shorter than its Content-Length")
                    return
                try:
                    payload = verify(secret, {k.lower(): v for k, v in self.headers.items()}, body)
                except WebhookVerificationError:
                    with receiver._lock:
                        receiver.rejected += 1
                    self._answer(401)
                    return
                except (ValueError, UnicodeDecodeError):  # signed, but not JSON
                    self._malformed("the body is not JSON")
                    return
                if not isinstance(payload, dict):
                    self._malformed("the body is not a JSON object")
                    return
                event_id = self.headers["webhook-id"]
                with receiver._lock:
                    new = event_id not in receiver._seen
                    if new:
                        receiver._seen.add(event_id)
                        receiver.events.append({"id": event_id, **payload})
                if new and on_event is not None:
                    on_event({"id": event_id, **payload})
                self._answer(204)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that vanished or stalled: one log line, not a traceback on the receiver's console.
                import sys

                log.warning("webhook receiver: request from %s dropped: %s", client_address[0], sys.exc_info()[1])

        self._server = Server((host, port), Handler)
        self._thread = Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/webhooks/recloop"

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == event_type]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_secret() -> str:
    """A fresh Standard Webhooks secret (`whsec_` + base64 of 32 random bytes)."""
    return _SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()
