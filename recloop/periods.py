"""Training windows as periods of calendar time: `90d`, `2w`, `6m`, `1y`, or `all` (the whole history).

A period is calendar time ending at a day, not a count of days with data: on a sparse history (days
without events in between) "14d" is the 14 calendar days ending at the newest day with data, however
many of them hold events. `recloop.model_plane.plan_window` uses them for the held-out period (the newest
period of the data) and the training period (the period before it, or `all`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta

ALL = "all"
_PATTERN = re.compile(r"^\s*(\d+)\s*([dwmy])\s*$", re.IGNORECASE)
_UNITS = {"d": "day", "w": "week", "m": "month", "y": "year"}


class BadPeriod(ValueError):
    """A period that cannot be read; the message says how to write one."""


@dataclass(frozen=True)
class Period:
    """`n` units (`d`, `w`, `m` calendar months, `y` calendar years), or the whole history (`n` = 0)."""

    n: int
    unit: str

    @property
    def is_all(self) -> bool:
        return self.unit == ALL

    def __str__(self) -> str:
        return ALL if self.is_all else f"{self.n}{self.unit}"

    def start(self, end: date) -> date:
        """The first day of the period that ends with day `end` (inclusive): `14d` ending 2018-09-24 starts
        2018-09-11; `1m` ending 2018-09-24 starts 2018-08-25; `all` starts at date.min."""
        if self.is_all:
            return date.min
        if self.unit == "d":
            return end - timedelta(days=self.n - 1)
        if self.unit == "w":
            return end - timedelta(days=7 * self.n - 1)
        months = self.n * (12 if self.unit == "y" else 1)
        return _minus_months(end, months) + timedelta(days=1)


def _minus_months(day: date, months: int) -> date:
    index = day.year * 12 + (day.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    for d in (day.day, 30, 29, 28):  # the same day of the month, or the month's last
        try:
            return date(year, month, d)
        except ValueError:
            continue
    raise AssertionError(day)


def parse_period(text: str, *, allow_all: bool = True, what: str = "period") -> Period:
    """`90d`, `2w`, `6m`, `1y` (or `all` when `allow_all`) as a `Period`; `BadPeriod` otherwise."""
    raw = str(text).strip().lower()
    if raw == ALL:
        if not allow_all:
            raise BadPeriod(f"{what} cannot be 'all': the held-out period must leave days to train on; "
                            "give a duration such as 14d, 2w or 1m")
        return Period(0, ALL)
    m = _PATTERN.match(raw)
    if not m or int(m.group(1)) < 1:
        raise BadPeriod(f"{what} {text!r} is not a period: write a number and a unit, d (days), w (weeks), "
                        "m (months) or y (years), e.g. 14d, 6m, 1y" + (", or 'all'" if allow_all else ""))
    return Period(int(m.group(1)), m.group(2).lower())
