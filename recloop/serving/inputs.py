"""What the serving API accepts as input, beyond the request models' own fields: strict JSON, readable
422s, and the limits of a feedback request.

* **Strict JSON** (`StrictJSONRoute`): Python's `json` module reads `NaN`, `Infinity`, `1e999` (an
  infinite float) and lone UTF-16 surrogates (`"\\ud800"`), none of which is valid JSON text or valid
  Unicode. Left in, they reach places that cannot take them (a JSON answer, a Parquet file) and end in
  a 500. The API's routes parse bodies strictly instead: such a body is a 422 `json_invalid` naming the
  problem, before any model validation.
* **Readable 422s** (`validation_error_handler`): FastAPI echoes the offending input in each error; an
  input that JSON cannot carry (a non-finite number, a surrogate) is written as text instead of making
  the error answer itself fail.
* **Feedback limits** (`check_feedback`): every `event_time` within `[now - feedback_max_age_hours,
  now + feedback_max_future_seconds]`, at most `feedback_max_days` distinct UTC days and
  `feedback_max_events` events per request; a 422 names each offending event (the first 20).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic_core import PydanticCustomError

from recloop.serving.config import ServingConfig

# A \uD800-\uDFFF escape or the UTF-8 encoding of a surrogate (ED A0..BF ..): only then is a parsed body
# walked for lone surrogates (a valid pair is decoded into one character by `json.loads`).
_SURROGATE_HINT = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")
MAX_REPORTED = 20


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (send a finite number, or leave the field out)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number (it would be infinite)")
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The first string in `value` (keys included) that is not valid Unicode, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def strict_json_loads(body: bytes) -> Any:
    """`json.loads` for request bodies: NaN, ±Infinity, infinite floats and lone surrogates raise
    `json.JSONDecodeError` (FastAPI answers it with a 422 `json_invalid`)."""
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as err:  # NaN/Infinity, huge numbers, too deep a nesting
        raise json.JSONDecodeError(str(err) or type(err).__name__, "", 0) from None
    if _SURROGATE_HINT.search(body):
        bad = _lone_surrogate(value)
        if bad is not None:
            shown = bad.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:80]
            raise json.JSONDecodeError(
                f"string {shown!r} holds a lone UTF-16 surrogate: not valid Unicode (send UTF-8 text)", "", 0)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An `APIRoute` whose JSON bodies are parsed by `strict_json_loads` (FastAPI's custom request
    class pattern); `app.router.route_class = StrictJSONRoute` before the routes are declared."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (`{"detail": [errors]}`), with inputs JSON cannot carry written as text."""
    return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})


def _error(loc: tuple[Any, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": loc, "msg": msg, "input": value}


def check_feedback(events: Sequence[Any], config: ServingConfig, now: datetime) -> None:
    """Raises `RequestValidationError` (a 422) when a feedback request breaks the limits of `config`
    (see the module docstring). `events` have `event_time` as a UTC datetime or None (now)."""
    errors: list[dict[str, Any]] = []
    if len(events) > config.feedback_max_events:
        errors.append(_error(("body", "events"), f"{len(events)} events in one request; at most "
                             f"{config.feedback_max_events} (RECLOOP_SERVING_FEEDBACK_MAX_EVENTS): split it", len(events)))
        raise RequestValidationError(errors)
    earliest = now - timedelta(hours=config.feedback_max_age_hours)
    latest = now + timedelta(seconds=config.feedback_max_future_seconds)
    outside = 0
    days: set[str] = set()
    for i, event in enumerate(events):
        t = event.event_time or now
        if earliest <= t <= latest:
            days.add(t.date().isoformat())
            continue
        outside += 1
        if outside <= MAX_REPORTED:
            errors.append(_error(
                ("body", "events", i, "event_time"),
                f"event_time {t.isoformat()} is outside the accepted window {earliest.isoformat(timespec='seconds')} "
                f"to {latest.isoformat(timespec='seconds')} (now - {config.feedback_max_age_hours:g} h to now + "
                f"{config.feedback_max_future_seconds:g} s: RECLOOP_SERVING_FEEDBACK_MAX_AGE_HOURS, "
                "RECLOOP_SERVING_FEEDBACK_MAX_FUTURE_SECONDS); older events belong in a batch delivery of their day",
                t.isoformat(),
            ))
    if outside > MAX_REPORTED:
        errors.append(_error(("body", "events"), f"{outside} events in all have an event_time outside the window "
                             f"(the first {MAX_REPORTED} are listed)", outside))
    seen: set[str] = set()
    repeated = sorted({e.event_id for e in events if e.event_id and (e.event_id in seen or seen.add(e.event_id))})
    if repeated:
        errors.append(_error(("body", "events"), f"event_id repeated within the request: {', '.join(repeated[:10])} "
                             "(an event_id names one event)", repeated[:10]))
    if len(days) > config.feedback_max_days:
        errors.append(_error(("body", "events"), f"events of {len(days)} distinct UTC days in one request; at most "
                             f"{config.feedback_max_days} (RECLOOP_SERVING_FEEDBACK_MAX_DAYS)", sorted(days)[:10]))
    if errors:
        raise RequestValidationError(errors)


def to_utc(value: datetime | None) -> datetime | None:
    """`value` in UTC (naive: taken as UTC). Raises a pydantic error (a 422 in a request) when UTC cannot express it (year 1 or 9999
    with an offset crossing the range of `datetime`)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_range", "event_time {value} is out of range: in UTC it falls outside the years 1-9999",
            {"value": value.isoformat()},
        ) from None
