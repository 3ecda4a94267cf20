"""Zombie-connection watchdog: market hours, silence detection and reconnect backoff.

Pure logic with an injectable ``Clock``; the Kotak source wires it to the reactor.

A broker websocket can stay open at the TCP level and simply stop sending. During market
hours that is indistinguishable from a dead feed, so after ``feed.watchdog_s`` without a
packet the feed closes the socket and reconnects. Outside market hours silence is normal
(nothing trades) and is left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tenacity import wait_exponential_jitter

from libs.common.calendar import TradingCalendar, default_calendar
from libs.common.clock import Clock
from libs.common.config import ConfigError, FeedConfig


class MarketHours:
    """``[start, end)`` minutes after midnight on the given weekdays, in one timezone, except
    the exchange's holidays when a ``calendar`` is given (``from_config`` gives the bundled
    one: NSE's holidays, since the feed's canary and most instruments trade there)."""

    def __init__(self, spec: str, tz: str | tzinfo = "Asia/Kolkata", days: Iterable[int] = range(5),
                 calendar: TradingCalendar | None = None, exchange: str = "NSE") -> None:
        try:
            start, end = spec.split("-")
            h1, m1 = (int(x) for x in start.split(":"))
            h2, m2 = (int(x) for x in end.split(":"))
        except ValueError:
            raise ConfigError(
                f"config error: `feed.market_hours` must look like 09:15-15:30, got {spec!r}") from None
        self.start_min = h1 * 60 + m1
        self.end_min = h2 * 60 + m2
        if isinstance(tz, str):
            try:
                tz = ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"config error: `feed.timezone` is not a known timezone: {tz!r}") from None
        self.tz = tz
        self.days = frozenset(days)
        if not self.days <= set(range(7)):
            raise ConfigError("config error: `feed.market_days` must hold weekday numbers 0 (Mon) .. 6 (Sun)")
        self.calendar = calendar
        self.exchange = exchange

    @classmethod
    def from_config(cls, feed: FeedConfig) -> MarketHours:
        return cls(feed.market_hours, feed.timezone, feed.market_days, calendar=default_calendar())

    def is_open(self, clock: Clock) -> bool:
        now = clock.now(self.tz)
        if now.weekday() not in self.days:
            return False
        if self.calendar is not None and self.calendar.is_holiday(self.exchange, now.date()):
            return False  # an exchange holiday: silence is normal
        minute = now.hour * 60 + now.minute
        return self.start_min <= minute < self.end_min


class Watchdog:
    """Tracks the last packet and says when the connection has gone silent.

    ``packet()`` may be called from another thread (the SDK's): it only stores a float.
    Silence is measured on ``monotonic`` time, market hours on the (injectable) clock.
    """

    def __init__(self, timeout_s: float, hours: MarketHours, clock: Clock,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.hours = hours
        self.clock = clock
        self._monotonic = monotonic
        self.last_packet = monotonic()
        self.fired = 0

    def packet(self) -> None:
        self.last_packet = self._monotonic()

    def reset(self) -> None:
        """A fresh connection gets a full ``timeout_s`` of grace."""
        self.last_packet = self._monotonic()

    def silence_s(self) -> float:
        return self._monotonic() - self.last_packet

    def is_stale(self) -> bool:
        """True when silent for ``timeout_s`` or more while the market is open."""
        if self.silence_s() < self.timeout_s:
            return False
        if not self.hours.is_open(self.clock):
            return False
        self.fired += 1
        return True


class Backoff:
    """Exponential backoff with jitter (tenacity's wait function), capped at ``max_s``.

    ``next_delay()`` grows with each failed attempt; ``reset()`` after a healthy connection.
    """

    def __init__(self, min_s: float, max_s: float) -> None:
        try:
            self._wait = wait_exponential_jitter(multiplier=min_s, max=max_s, exp_base=2, jitter=min_s)
        except TypeError:  # tenacity < 9.1 names the first delay ``initial``
            self._wait = wait_exponential_jitter(initial=min_s, max=max_s, exp_base=2, jitter=min_s)
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return float(self._wait(_Attempt(self.attempt)))  # type: ignore[arg-type]

    def reset(self) -> None:
        self.attempt = 0


class _Attempt:
    """The one field of tenacity's ``RetryCallState`` its wait functions read."""

    __slots__ = ("attempt_number",)

    def __init__(self, n: int) -> None:
        self.attempt_number = n
