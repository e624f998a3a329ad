"""Admission control: one serving process takes only the work it can finish within its latency budget.

Without a bound, requests offered faster than the process serves them queue in the event loop and the
thread pool, and every request waits behind the backlog (at 500 requests/s offered to a process that
serves ~300/s: p99 2.5 s). `AdmissionControl` is a plain ASGI middleware in front of the app:

* at most `limit` requests are handled at once (a slot per request, from the moment the middleware
  admits it until its answer is sent);
* a request that finds every slot taken waits, first come first served, in a queue of at most
  `max_queue` requests, for at most `max_wait_s`;
* a request that finds the queue full, or that waited `max_wait_s` without a slot, is shed: answered at
  once with `503 Service Unavailable`, `Retry-After: <retry_after_s>` and a JSON body saying so. Its
  body is never read and nothing of the app runs for it, so shedding stays cheap when the offered
  load is a multiple of the capacity. Shed requests are counted in
  `recloop_serving_shed_requests_total{reason}` (queue_full, queue_timeout).

The `limit` adapts to what the machine delivers now (AIMD, as TCP congestion control and the
concurrency limiters of service meshes do): every `window_s` (and at least 10 requests) the 95th
percentile of the admitted requests' time in the app is compared with `target_s`; above it the limit
shrinks by the ratio target / p95 (by 10 % to 50 %, at least by one slot, never below `min_in_flight`:
a few concurrent clients, or a slow spell such as a model swap, are not shed); below it, and
if requests waited for a slot in the window, it grows by one, never above `max_in_flight`. A fixed
number of slots would be right for one machine only: on a slower or busier one the same number lets
every admitted request wait behind the others (Little's law: time in the app is slots in use /
throughput). `target_s = 0` keeps the limit fixed at `max_in_flight`.

Shedding with 503 rather than answering with the popularity fallback is deliberate: a fallback answer
still costs the thread pool, JSON encoding and the response, which is exactly the capacity that is
missing; a 503 with `Retry-After` tells a client or a load balancer to go elsewhere or come back.

The operational endpoints (`/healthz`, `/readyz`, `/metrics`) and the landing page `/` (a few hundred
bytes saying which model is served) are never shed nor counted against the limit: an overloaded process
must still be seen alive, scraped and identified. The limit applies to every other path: recommendations
and feedback, and the documentation (`/docs`, `/redoc`, `/openapi.json` and their JavaScript and CSS,
megabytes that can wait for a retry).

Everything runs on the event loop (no lock needed): the counter of slots in use and a deque of waiting
futures. A finishing request hands its slot directly to the oldest waiter (unless the limit has just
shrunk below the slots in use).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recloop.serving.metrics import ServingMetrics

NEVER_SHED = frozenset({"/healthz", "/readyz", "/metrics", "/"})
MIN_WINDOW = 10  # requests finished before a window's percentile counts (a few slow ones at low load do not)


@dataclass(frozen=True)
class AdmissionLimits:
    """At most `max_in_flight` requests at once (0: no admission control), adapted down (not below
    `min_in_flight`) to keep the p95 time in the app under `target_s` (0: fixed) over windows of `window_s`; a queue of `max_queue`
    waiting at most `max_wait_s` seconds; the `Retry-After` seconds of a shed answer."""

    max_in_flight: int = 24
    max_queue: int = 64
    max_wait_s: float = 0.01
    retry_after_s: int = 1
    target_s: float = 0.02
    window_s: float = 0.25
    min_in_flight: int = 2

    def __post_init__(self) -> None:
        if (self.max_in_flight < 0 or self.max_queue < 0 or not self.max_wait_s >= 0 or self.retry_after_s < 1
                or not self.target_s >= 0 or not self.window_s > 0 or self.min_in_flight < 1):
            raise ValueError(f"invalid admission limits: {self}")

    @classmethod
    def of(cls, config: object) -> "AdmissionLimits":
        """The limits of a `ServingConfig`."""
        return cls(
            max_in_flight=config.max_in_flight,  # type: ignore[attr-defined]
            max_queue=config.admission_queue,  # type: ignore[attr-defined]
            max_wait_s=config.admission_max_wait_seconds,  # type: ignore[attr-defined]
            retry_after_s=config.retry_after_seconds,  # type: ignore[attr-defined]
            target_s=config.admission_target_seconds,  # type: ignore[attr-defined]
            min_in_flight=config.admission_min_in_flight,  # type: ignore[attr-defined]
        )


class AdmissionControl:
    """The ASGI middleware described in the module docstring.

    Args:
        app: the ASGI app behind it.
        limits: the bounds (`AdmissionLimits`; `max_in_flight=0` passes everything through).
        metrics: where shed requests, requests in flight and queue waits are counted.
        never_shed: paths always passed through (default: /healthz, /readyz, /metrics, /).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: AdmissionLimits,
        metrics: ServingMetrics,
        never_shed: Iterable[str] = NEVER_SHED,
    ) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics
        self.never_shed = frozenset(never_shed)
        self.in_flight = 0
        self.limit = limits.max_in_flight
        self._waiting: deque[asyncio.Future[bool]] = deque()
        self._window: list[float] = []  # seconds in the app of the requests finished in this window
        self._window_end = 0.0
        self._contended = False  # a request waited or was shed in this window
        metrics.admission_limit.set(self.limit)
        retry_after = str(int(math.ceil(limits.retry_after_s)))
        body = json.dumps({
            "detail": f"the server is at capacity; retry after {retry_after} s",
            "reason": "overloaded",
        }).encode()
        self._shed_start: Message = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", retry_after.encode()),
            ],
        }
        self._shed_body: Message = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limits.max_in_flight <= 0 or scope["path"] in self.never_shed:
            await self.app(scope, receive, send)
            return
        reason = await self._acquire()
        if reason is not None:
            self.metrics.shed.labels(reason).inc()
            await send(self._shed_start)
            await send(self._shed_body)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()
            self._observe(time.perf_counter() - started)

    def _observe(self, seconds: float) -> None:
        """AIMD on `limit` (module docstring), once per window."""
        limits = self.limits
        if limits.target_s <= 0:
            return
        self._window.append(seconds)
        now = time.perf_counter()
        if now < self._window_end or len(self._window) < MIN_WINDOW:
            return
        window, self._window = sorted(self._window), []
        contended, self._contended = self._contended, False
        self._window_end = now + limits.window_s
        p95 = window[min(len(window) - 1, int(0.95 * len(window)))]
        if p95 > limits.target_s:  # the further over the target, the harder the cut (at most by half)
            cut = max(0.5, min(0.9, limits.target_s / p95))
            self.set_limit(min(self.limit - 1, int(self.limit * cut)))
        elif contended and self.limit < limits.max_in_flight:
            self.set_limit(self.limit + 1)

    def set_limit(self, limit: int) -> None:
        """Requests let in at once from now on (clipped to min_in_flight..max_in_flight); slots it frees
        go to the waiters at once; requests over a lowered limit finish and are not replaced."""
        limits = self.limits
        self.limit = max(min(limits.min_in_flight, limits.max_in_flight), min(limits.max_in_flight, int(limit)))
        self.metrics.admission_limit.set(self.limit)
        self._dispatch()

    async def _acquire(self) -> str | None:
        """Takes a slot (None) or says why the request is shed ("queue_full", "queue_timeout")."""
        limits = self.limits
        if self.in_flight < self.limit and not self._waiting:
            self._admitted(0.0)
            return None
        self._contended = True
        if len(self._waiting) >= limits.max_queue or limits.max_wait_s <= 0:
            return "queue_full"
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[bool] = loop.create_future()
        self._waiting.append(granted)
        self._dispatch()  # a slot may be free behind waiters that have just given up
        timer = loop.call_later(limits.max_wait_s, _expire, granted)
        started = time.perf_counter()
        try:
            ok = await granted
        except asyncio.CancelledError:  # the client went away while waiting
            timer.cancel()
            if granted.done() and not granted.cancelled() and granted.result():
                self._release()  # a slot was handed over just before: pass it on
            else:
                self._forget(granted)
            raise
        timer.cancel()
        if not ok:
            self._forget(granted)
            return "queue_timeout"
        self.metrics.admission_wait.observe(time.perf_counter() - started)
        return None

    def _admitted(self, waited: float) -> None:
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.admission_wait.observe(waited)

    def _release(self) -> None:
        """A request finished: its slot goes back, to the oldest waiter still waiting if any."""
        self.in_flight -= 1
        self._dispatch()
        self.metrics.in_flight.set(self.in_flight)

    def _dispatch(self) -> None:
        """Free slots (under the current limit) to the oldest waiters still waiting."""
        while self._waiting and self.in_flight < self.limit:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)
                self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        try:
            self._waiting.remove(waiter)
        except ValueError:
            pass


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
