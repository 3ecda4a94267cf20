"""Kotak's ``historical_data()``: the call budget, and a reader for its replies.

The SDK returns whatever JSON arrived and never raises on a 429 or a 5xx (docs/kotak-rest.md
§historical candles), and its replies are not in the ``stat``/``stCode`` shapes
``kotak_protocol.classify`` reads (a 429 there would be "unreadable"), so this module reads
them itself. Plain logic: no SDK, no threads; ``KotakBroker.historical_candles`` wires it.

* ``read_reply(reply, first_day, last_day)`` → the candles (``[ts_ns, open, high, low, close,
  volume, oi]``, ascending, one per start time, only those whose IST day is in the range) or
  raises ``HistoryRateLimited`` (Kotak's 429: back off, never log in again),
  ``HistoryRefused`` (bad symbol, range or interval: not worth repeating) or
  ``HistoryUnavailable`` (5xx, unreadable: may be repeated later).
* ``CallBudget``: at most ``per_min`` calls in any 60 s, and nothing until a 429's
  ``Retry-After`` has passed. It never sleeps: ``take()`` says how long to wait, and the
  caller (the CLI, through execution's reply) waits.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import deque
from typing import Any

from services.execution.brokers.base import BrokerError

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
# the wire spelling of each interval the CLI offers, and Kotak's longest range per request (days)
WIRE_INTERVAL = {"1m": "1min", "5m": "5min", "15m": "15min", "1h": "60min", "1d": "D"}
MAX_DAYS = {"1min": 30, "3min": 30, "5min": 30, "10min": 60, "15min": 60, "30min": 90, "60min": 90,
            "D": 180, "W": 180}  # fmt: skip
RETRY_AFTER_DEFAULT_S = 60.0  # a 429 without Retry-After: Kotak's limit can last hours (kotak-neo-python #35)
RETRY_AFTER_MAX_S = 3600.0
MAX_QTY = 10**15  # a volume or open interest beyond this is not a count (and would not fit int64)
MAX_CANDLES = 12_000  # per reply: 30 days of 1-minute candles is ~8,300; more is not a candle list


class HistoryError(BrokerError):
    """A history call that produced no candles."""


class HistoryRateLimited(HistoryError):
    """Kotak (or our own budget) says: not now. Wait ``retry_after_s``."""

    def __init__(self, reason: str, retry_after_s: float, raw: Any = None) -> None:
        super().__init__(reason, raw)
        self.retry_after_s = retry_after_s


class HistoryRefused(HistoryError):
    """Kotak refused the request itself (symbol, range, interval): repeating it cannot help."""


class HistoryUnavailable(HistoryError):
    """A 5xx, a network error or an unreadable reply: the same request may work later."""


def retry_after_s(value: Any) -> float:
    """Seconds a ``Retry-After`` value asks for (a number; an HTTP date or junk → the default)."""
    try:
        secs = float(str(value).strip())
    except ValueError:
        return RETRY_AFTER_DEFAULT_S
    if not math.isfinite(secs) or secs < 0:
        return RETRY_AFTER_DEFAULT_S
    return min(max(secs, 1.0), RETRY_AFTER_MAX_S)


def _text(reply: dict[str, Any]) -> str:
    for key in ("message", "errMsg", "error", "emsg", "Error"):
        value = reply.get(key)
        if isinstance(value, str) and value:
            return value[:200]
    fault = reply.get("fault")
    if isinstance(fault, dict) and isinstance(fault.get("message"), str):
        return str(fault["message"])[:200]
    return "no reason given"


def _status(reply: dict[str, Any]) -> int | None:
    for key in ("code", "StatusCode", "stCode"):
        value = reply.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    fault = reply.get("fault")
    if isinstance(fault, dict) and isinstance(fault.get("code"), int):
        return int(fault["code"])
    return None


def read_reply(reply: Any, first_day: dt.date, last_day: dt.date) -> list[list[Any]]:
    """The candles of a ``historical_data()`` reply whose IST day is in ``[first_day, last_day]``,
    or the ``HistoryError`` that says why there are none."""
    if not isinstance(reply, dict):
        raise HistoryUnavailable(f"unreadable reply ({type(reply).__name__})")
    status = _status(reply)
    text = _text(reply)
    raw_limits = reply.get("rateLimit")
    limits: dict[str, Any] = raw_limits if isinstance(raw_limits, dict) else {}
    if status == 429 or "too many request" in text.lower() or "rate limit" in text.lower():
        wait = retry_after_s(limits.get("Retry-After")) if "Retry-After" in limits else RETRY_AFTER_DEFAULT_S
        raise HistoryRateLimited(f"Kotak: rate limited ({text})", wait)
    data = reply.get("data")
    candles = data.get("candles") if isinstance(data, dict) else None
    if str(reply.get("status", "")).lower() == "success" and isinstance(candles, list):
        return _candles(candles, first_day, last_day)
    if status is not None and status >= 500:
        raise HistoryUnavailable(f"Kotak: server error {status} ({text})")
    if status in (401, 403) or "session" in text.lower() or "credential" in text.lower():
        raise HistoryUnavailable(f"Kotak: not authorised ({text})")
    if str(reply.get("status", "")).upper() == "ERROR" or "fault" in reply or status == 400:
        raise HistoryRefused(f"Kotak refused: {text}")
    raise HistoryUnavailable(f"Kotak: unexpected reply ({text})")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _candles(rows: list[Any], first_day: dt.date, last_day: dt.date) -> list[list[Any]]:
    if len(rows) > MAX_CANDLES:
        raise HistoryUnavailable(f"Kotak sent {len(rows)} candles for one request (at most {MAX_CANDLES})")
    lo = int(dt.datetime.combine(first_day, dt.time(), IST).timestamp()) * 10**9
    hi = int(dt.datetime.combine(last_day + dt.timedelta(days=1), dt.time(), IST).timestamp()) * 10**9
    out: dict[int, list[Any]] = {}
    for i, row in enumerate(rows):
        candle = _candle(row)
        if candle is None:
            raise HistoryUnavailable(f"Kotak sent an unreadable candle (row {i}: {str(row)[:120]})")
        if lo <= candle[0] < hi:
            out[candle[0]] = candle  # a repeated start time: the later row wins
    return [out[ts] for ts in sorted(out)]


def _candle(row: Any) -> list[Any] | None:
    """``[ts, o, h, l, c, v(, oi)]`` → ``[ts_ns, o, h, l, c, v, oi]``, or None when unreadable."""
    if not isinstance(row, (list, tuple)) or len(row) not in (6, 7) or not isinstance(row[0], str):
        return None
    try:
        when = dt.datetime.fromisoformat(row[0])
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=IST)  # Kotak's times are IST
    o, h, lo, c = (_number(x) for x in row[1:5])
    vol = _number(row[5])
    oi = _number(row[6]) if len(row) == 7 and row[6] is not None else 0.0
    if o is None or h is None or lo is None or c is None or vol is None or oi is None:
        return None
    if min(o, h, lo, c) <= 0 or h < max(o, c, lo) or lo > min(o, c):
        return None
    if not (0 <= vol <= MAX_QTY and 0 <= oi <= MAX_QTY):
        return None
    ts_ns = int(when.timestamp()) * 10**9 + when.microsecond * 1000
    return [ts_ns, o, h, lo, c, int(vol), int(oi)]


class CallBudget:
    """At most ``per_min`` history calls in any 60 s, and none before a 429's wait is over.
    Thread-safe; ``take`` never blocks."""

    def __init__(self, per_min: int, clock: Any = time.monotonic) -> None:
        self.per_min = max(1, per_min)
        self._clock: Any = clock
        self._calls: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 and the call is counted; else the seconds to wait before asking again."""
        with self._lock:
            now = float(self._clock())
            while self._calls and now - self._calls[0] >= 60.0:
                self._calls.popleft()
            if now < self._blocked_until:
                return self._blocked_until - now
            if len(self._calls) >= self.per_min:
                return max(0.001, 60.0 - (now - self._calls[0]))
            self._calls.append(now)
            return 0.0

    def back_off(self, seconds: float) -> None:
        """Kotak answered 429: no call for ``seconds``."""
        with self._lock:
            self._blocked_until = max(self._blocked_until, float(self._clock()) + seconds)


def request_range(first_day: dt.date, last_day: dt.date, interval: str) -> tuple[str, str]:
    """``fromdate``/``todate`` for candles of ``[first_day, last_day]``. Whether Kotak's
    ``todate`` is inclusive is not documented: ask one day more (within the range limit) and
    keep only the days asked for."""
    days = (last_day - first_day).days + 1
    if days < 1 or days > MAX_DAYS[interval]:
        most = MAX_DAYS[interval]
        raise HistoryRefused(f"{days} day(s) of {interval} candles in one request (1 to {most})")
    end = last_day + dt.timedelta(days=1) if days < MAX_DAYS[interval] else last_day
    return first_day.isoformat(), end.isoformat()
