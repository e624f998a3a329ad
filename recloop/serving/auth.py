"""API keys and per-key rate limits of the serving API.

Every state-changing endpoint (`POST /v1/feedback` today, any admin endpoint later) needs a key;
`POST /v1/recommendations` needs one only when `ServingConfig.recommendations_auth` is `"key"`.

* **Keys** come from the environment only: `RECLOOP_API_KEYS`, comma-separated, several at once so
  that a key can be rotated (add the new one, move the clients, remove the old one). A key is at least
  `MIN_KEY_LENGTH` characters; `python -c "import secrets; print(secrets.token_urlsafe(32))"` makes one.
  The process keeps only SHA-256 digests of the keys, and compares the digest of what a caller sent
  with every one of them with `hmac.compare_digest` (constant time, equal-length inputs, no early exit
  on the first match), so neither timing nor a memory dump gives a key away.
* **Callers** send `Authorization: Bearer <key>` or `X-API-Key: <key>`. No key: 401 with
  `WWW-Authenticate: Bearer`; a key that is not one of them: 403. Both bodies say what to send.
* **Rate limit**: a token bucket per key and endpoint (`rate_limit_per_second` refilled,
  `rate_limit_burst` deep); an empty bucket answers 429 with `Retry-After` (whole seconds).
* **Environments**: `RECLOOP_ENV=production` refuses to start without keys (`SettingsError`, which
  `recloop serve` prints as one sentence). Locally, without keys, the API is open (the embedded
  default: `make demo`, the tests) and the start logs a loud warning; with keys set, they are enforced
  locally too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from recloop.config import Settings, SettingsError

log = logging.getLogger(__name__)

KEYS_VARIABLE = "RECLOOP_API_KEYS"
MIN_KEY_LENGTH = 16
GENERATE_HINT = "python -c \"import secrets; print(secrets.token_urlsafe(32))\""
# Values .env.example ships in place of a key: refused, so a copied example never runs with a known key.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "replace-me", "placeholder")

# FastAPI's security schemes: they read the headers and put both ways into the OpenAPI description.
bearer_scheme = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`: a key of RECLOOP_API_KEYS")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="A key of RECLOOP_API_KEYS")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_id(key: str) -> str:
    """A name for a key safe to log and to use as a metric label: `key-` + 8 hex digits of its hash."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def parse_keys(raw: str | None) -> list[str]:
    """The keys of a `RECLOOP_API_KEYS` value; raises `ValueError` naming what is wrong (never the key)."""
    keys = [k.strip() for k in (raw or "").split(",") if k.strip()]
    for i, key in enumerate(keys, 1):
        if any(marker in key.lower() for marker in PLACEHOLDER_MARKERS):
            raise ValueError(f"key {i} is the placeholder of .env.example, not a key; generate one with {GENERATE_HINT}")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"key {i} has {len(key)} characters, fewer than {MIN_KEY_LENGTH}; generate one with "
                             f"{GENERATE_HINT}")
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(f"key {i} contains spaces or control characters")
    return keys


@dataclass(frozen=True, repr=False)
class ApiKeys:
    """The accepted keys, as SHA-256 digests (see the module docstring); empty: authentication is off."""

    digests: tuple[tuple[str, bytes], ...] = ()  # (key id, digest)

    @classmethod
    def of(cls, keys: Iterable[str]) -> "ApiKeys":
        return cls(tuple((key_id(k), _digest(k)) for k in dict.fromkeys(keys)))

    @classmethod
    def from_env(cls, settings: Settings) -> "ApiKeys":
        """The keys of `RECLOOP_API_KEYS`. Raises `SettingsError` when a key is malformed, and in production
        when there is none."""
        raw = os.environ.get(KEYS_VARIABLE)
        try:
            keys = parse_keys(raw)
        except ValueError as err:
            raise SettingsError(settings.env, [f"{KEYS_VARIABLE}: {err}"]) from None
        if not keys and settings.is_production:
            raise SettingsError(settings.env, [
                f"{KEYS_VARIABLE}: missing (the serving API does not start in production without API keys for "
                f"its write endpoints; comma-separated, at least {MIN_KEY_LENGTH} characters each; generate one "
                f"with {GENERATE_HINT})"
            ])
        return cls.of(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def match(self, given: str) -> str | None:
        """The id of the key `given` is, or None. Compares against every key, in constant time each."""
        candidate = _digest(given)
        found = None
        for kid, digest in self.digests:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = kid
        return found

    def __repr__(self) -> str:
        return f"ApiKeys({', '.join(k for k, _ in self.digests) or 'none'})"


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` returns 0 when a token was taken, otherwise the
    seconds until one will be there."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per (key, endpoint); `rate <= 0` turns limiting off. Thread-safe. Keys are the
    configured ones, so the number of buckets is bounded by keys x endpoints."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def wait_seconds(self, key: str, endpoint: str) -> float:
        """0 when the request may go on, otherwise how long the caller should wait."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            bucket = self._buckets.get((key, endpoint))
            if bucket is None:
                bucket = self._buckets[(key, endpoint)] = TokenBucket(self.rate, self.burst)
            return bucket.take()


MISSING = (
    "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' with a key of the server's "
    f"{KEYS_VARIABLE} (docs/serving.md, 'Authentication')"
)
INVALID = f"invalid API key: the key sent is not one of the server's {KEYS_VARIABLE}"

_ERROR_BODY = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
# The answers of a keyed route, for the OpenAPI description.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No API key sent (`WWW-Authenticate: Bearer`)", "content": _ERROR_BODY},
    403: {"description": "The API key sent is not accepted", "content": _ERROR_BODY},
    429: {"description": "This key's rate limit is exceeded; retry after `Retry-After` seconds", "content": _ERROR_BODY},
}
HIDDEN = "hidden: send an API key to see error details"


def redact_errors(status: Any) -> Any:
    """`status` with the value of every key naming an error (`last_error`, ...) hidden when set."""
    if isinstance(status, dict):
        return {k: (HIDDEN if "error" in str(k).lower() and v not in (None, "", [], {}) else redact_errors(v))
                for k, v in status.items()}
    if isinstance(status, list):
        return [redact_errors(v) for v in status]
    return status


class Authenticator(Collector):
    """What the routes depend on: `check(endpoint, ...)` (401/403/429, else the caller's key id) and
    `trusted(...)` (whether the caller may see internal details). A Prometheus collector too:

        recloop_serving_auth_failures_total{reason}   missing, invalid, rate_limited
    """

    REASONS = ("missing", "invalid", "rate_limited")

    def __init__(self, keys: ApiKeys, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter
        self._failures = dict.fromkeys(self.REASONS, 0)
        self._lock = threading.Lock()

    def on_failure(self, reason: str) -> None:
        with self._lock:
            self._failures[reason] += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("recloop_serving_auth_failures", "Requests refused by authentication or "
                                     "the per-key rate limit", labels=["reason"])
        with self._lock:
            for reason, n in self._failures.items():
                family.add_metric([reason], n)
        yield family

    @staticmethod
    def _sent(bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
        if header:
            return header
        if bearer is not None and bearer.credentials:
            return bearer.credentials
        return None

    def identify(self, bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
        """The key id of the key sent (None: none sent); raises 403 for a key that is not accepted."""
        sent = self._sent(bearer, header)
        if sent is None:
            return None
        kid = self.keys.match(sent)
        if kid is None:
            self.on_failure("invalid")
            raise HTTPException(403, INVALID)
        return kid

    def check(self, endpoint: str, bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
        """The caller's key id after authentication and rate limiting (None when authentication is off)."""
        if not self.keys.enabled:
            return None
        kid = self.identify(bearer, header)
        if kid is None:
            self.on_failure("missing")
            raise HTTPException(401, MISSING, headers={"WWW-Authenticate": "Bearer"})
        wait = self.limiter.wait_seconds(kid, endpoint)
        if wait > 0:
            self.on_failure("rate_limited")
            retry = max(1, math.ceil(wait))
            raise HTTPException(
                429, f"rate limit of this API key exceeded ({self.limiter.rate:g} requests/s, bursts of "
                     f"{self.limiter.burst}): retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        return kid

    def trusted_request(self, request: Request) -> bool:
        """Whether the caller may see internal details: authentication is off, or a valid key was sent
        (read from the headers directly: an open route that declares no security scheme)."""
        if not self.keys.enabled:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) \
            if scheme.lower() == "bearer" and token.strip() else None
        return self.identify(bearer, request.headers.get("x-api-key")) is not None


def warn_if_open(keys: ApiKeys, recommendations_keyed: bool) -> None:
    if keys.enabled:
        log.info("serving API: %d API key(s) accepted (%s); recommendations %s", len(keys.digests),
                 ", ".join(k for k, _ in keys.digests), "need a key" if recommendations_keyed else "are open")
        return
    log.warning(
        "\n%s\nSERVING API WITHOUT AUTHENTICATION: %s is not set, so anyone who reaches this port can write "
        "feedback (training data). Fine on your laptop (the embedded default); set %s (generate a key with "
        "%s) before anyone else can reach it. RECLOOP_ENV=production refuses to start without keys.\n%s",
        "!" * 100, KEYS_VARIABLE, KEYS_VARIABLE, GENERATE_HINT, "!" * 100,
    )
