"""Injectable clocks: business logic asks a ``Clock`` for time, never the OS directly.

``NEOPULSE_CLOCK_OFFSET_S`` (tests only, ignored unless set): seconds added to the wall
time of every ``Clock()`` built in the process, so a paper stack can be started "on the
next trading day" without touching the OS clock. It moves ``now_ns``/``now`` (and so the
trading day) but never ``monotonic``; a malformed value is a config error at startup, and
it is refused with a real broker or a live feed (``check_clock_offset``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

from libs.common.config import Config, ConfigError

IST = ZoneInfo("Asia/Kolkata")
OFFSET_ENV = "NEOPULSE_CLOCK_OFFSET_S"
MAX_OFFSET_S = 400 * 86_400  # beyond a year is a unit mistake (ms or ns for seconds), not a test


def clock_offset_ns(environ: Mapping[str, str] | None = None) -> int:
    """The test-only wall-clock offset from ``NEOPULSE_CLOCK_OFFSET_S``; 0 when unset or empty."""
    raw = (os.environ if environ is None else environ).get(OFFSET_ENV, "").strip()
    if not raw:
        return 0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or abs(seconds) > MAX_OFFSET_S:
        raise ConfigError(
            f"config error: {OFFSET_ENV} must be a number of seconds within ±{MAX_OFFSET_S} "
            f"(tests only), got {raw!r}"
        )
    return round(seconds * 1e9)


def check_clock_offset(cfg: Config, environ: Mapping[str, str] | None = None) -> int:
    """The offset for a service about to start (ns), or ``ConfigError``: malformed, or set
    with a real broker or a live feed, where a moved clock would misdate real orders."""
    offset = clock_offset_ns(environ)
    if offset and (cfg.execution.broker != "paper" or cfg.feed.source == "kotak"):
        raise ConfigError(
            f"config error: {OFFSET_ENV} is for paper tests only; unset it to run with "
            f"execution.broker={cfg.execution.broker} and feed.source={cfg.feed.source}"
        )
    return offset


class Clock:
    """Wall clock. ``now_ns`` for timestamps, ``monotonic`` for intervals."""

    def __init__(self) -> None:
        self.offset_ns = clock_offset_ns()

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self, tz: tzinfo = IST) -> datetime:
        return datetime.fromtimestamp(self.now_ns() / 1e9, tz)


class ManualClock(Clock):
    """A clock that only moves when told: for tests, replay and backtests."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self.offset_ns = 0
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
