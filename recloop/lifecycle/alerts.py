"""The alerts a step returns (`Alert`), `send_alert` for an orchestrator that sends them itself
(Airflow; Dagster sends them through its `AlertsResource`), and `jsonable`, a step's result as plain JSON."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The package's logger (`recloop.lifecycle`), as before the split into parts.
log = logging.getLogger(__package__)


@dataclass(frozen=True)
class Alert:
    """One alert a step wants sent: the arguments of `recloop.alerts.make_event`."""

    type: str
    key: str
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)


def send_alert(alert: Alert | None, *, logger: Any = None, config_path: str | None = None) -> list[Any]:
    """Sends `alert` to the configured endpoints (`recloop.alerts.AlertDispatcher.from_settings`) and logs
    each endpoint's outcome; returns the `DeliveryResult`s. A receiver that is down never raises: its
    delivery ends in the dead-letter store. A broken configuration does raise."""
    if alert is None:
        return []
    from recloop.alerts import AlertDispatcher, make_event

    event = make_event(alert.type, key=alert.key, text=alert.text, **alert.fields)
    dispatcher = AlertDispatcher.from_settings(config_path=config_path)
    try:
        results = dispatcher.send(event)
    finally:
        dispatcher.store.close()
    for result in results:
        detail = f"HTTP {result.status_code}" if result.status_code else (result.error or "")
        (logger or log).info(f"alert {event.type} {event.id} → {result.endpoint}: {result.outcome} after "
                             f"{result.attempts} attempt(s) {detail}".rstrip())
    return results


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (numpy scalars, paths and dates become numbers and strings; NaN and
    infinities, which strict JSON such as Airflow's XCom refuses, become null)."""
    return _finite(json.loads(json.dumps(value, default=_json_default)))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
