"""Injectable clocks: business logic asks a ``Clock`` for time, never the OS directly."""

from __future__ import annotations

import time
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

IST = ZoneInfo("Asia/Kolkata")


class Clock:
    """Wall clock. ``now_ns`` for timestamps, ``monotonic`` for intervals."""

    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self, tz: tzinfo = IST) -> datetime:
        return datetime.fromtimestamp(self.now_ns() / 1e9, tz)


class ManualClock(Clock):
    """A clock that only moves when told: for tests, replay and backtests."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._ns = start_ns

    def now_ns(self) -> int:
        return self._ns

    def monotonic(self) -> float:
        return self._ns / 1e9

    def advance(self, seconds: float) -> None:
        self._ns += int(seconds * 1e9)

    def set_ns(self, ns: int) -> None:
        self._ns = ns


def trading_day(clock: Clock, tz: tzinfo = IST) -> str:
    """The exchange date (IST) as ``YYYY-MM-DD``."""
    return clock.now(tz).strftime("%Y-%m-%d")


def in_hours(clock: Clock, start_min: int, end_min: int, tz: tzinfo = IST) -> bool:
    """True when the clock is inside ``[start, end)`` minutes after midnight, on a weekday."""
    now = clock.now(tz)
    if now.weekday() >= 5:
        return False
    minute = now.hour * 60 + now.minute
    return start_min <= minute < end_min
