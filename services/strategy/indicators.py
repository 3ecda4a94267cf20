"""Incremental indicators: O(1) work and memory per update, floats for speed.

Each indicator has ``update(...)`` returning the new value (``None`` while warming up),
``value`` (last value or ``None``) and ``ready``. Definitions follow the common
(TA-Lib / Wilder) conventions so results match charting platforms:

- ``SMA(n)``: mean of the last ``n`` inputs.
- ``EMA(n)``: seeded with the SMA of the first ``n`` inputs, then
  ``ema += alpha * (x - ema)`` with ``alpha = 2 / (n + 1)``.
- ``MACD(fast, slow, signal)``: ``macd = EMA_fast - EMA_slow`` (from the ``slow``-th input),
  ``signal = EMA_signal(macd)``, ``histogram = macd - signal``.
- ``RSI(n)``: Wilder's — first average gain/loss is the mean of the first ``n`` changes,
  then ``avg = (avg * (n - 1) + x) / n``.
- ``ATR(n)``: Wilder's average of the true range; the first bar's TR is ``high - low``.

The batch versions these are tested against live in the unit tests.
"""

from __future__ import annotations

from collections import deque


class SMA:
    """Simple moving average over the last ``period`` inputs."""

    __slots__ = ("_buf", "_sum", "_updates", "period", "value")

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.period = period
        self._buf: deque[float] = deque()
        self._sum = 0.0
        self._updates = 0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: float) -> float | None:
        buf = self._buf
        buf.append(x)
        self._sum += x
        if len(buf) > self.period:
            self._sum -= buf.popleft()
        self._updates += 1
        if self._updates % 4096 == 0:  # bound float drift of the running sum
            self._sum = sum(buf)
        if len(buf) == self.period:
            self.value = self._sum / self.period
        return self.value


class EMA:
    """Exponential moving average, SMA-seeded (ready after ``period`` inputs)."""

    __slots__ = ("_count", "_seed", "alpha", "period", "value")

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.period = period
        self.alpha = 2.0 / (period + 1)
        self._count = 0
        self._seed = 0.0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: float) -> float | None:
        v = self.value
        if v is not None:
            v += self.alpha * (x - v)
            self.value = v
            return v
        self._count += 1
        self._seed += x
        if self._count == self.period:
            self.value = self._seed / self.period
        return self.value


class MACD:
    """MACD line, signal line and histogram. ``update`` returns the MACD line value."""

    __slots__ = ("_fast", "_signal", "_slow", "histogram", "macd", "signal")

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9) -> None:
        if not 0 < fast < slow:
            raise ValueError("MACD needs 0 < fast < slow")
        self._fast = EMA(fast)
        self._slow = EMA(slow)
        self._signal = EMA(signal)
        self.macd: float | None = None
        self.signal: float | None = None
        self.histogram: float | None = None

    @property
    def value(self) -> float | None:
        return self.macd

    @property
    def ready(self) -> bool:
        """True once the signal line exists (``slow + signal - 1`` inputs)."""
        return self.signal is not None

    def update(self, x: float) -> float | None:
        f = self._fast.update(x)
        s = self._slow.update(x)
        if f is None or s is None:
            return None
        m = f - s
        self.macd = m
        sig = self._signal.update(m)
        if sig is not None:
            self.signal = sig
            self.histogram = m - sig
        return m


class RSI:
    """Wilder's relative strength index, 0..100 (ready after ``period + 1`` inputs)."""

    __slots__ = ("_avg_gain", "_avg_loss", "_count", "_prev", "period", "value")

    def __init__(self, period: int = 14) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.period = period
        self._prev: float | None = None
        self._count = 0
        self._avg_gain = 0.0
        self._avg_loss = 0.0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: float) -> float | None:
        prev = self._prev
        self._prev = x
        if prev is None:
            return None
        change = x - prev
        gain = change if change > 0 else 0.0
        loss = -change if change < 0 else 0.0
        n = self.period
        if self._count < n:
            self._count += 1
            self._avg_gain += gain / n
            self._avg_loss += loss / n
            if self._count < n:
                return None
        else:
            self._avg_gain = (self._avg_gain * (n - 1) + gain) / n
            self._avg_loss = (self._avg_loss * (n - 1) + loss) / n
        if self._avg_loss == 0.0:
            self.value = 100.0 if self._avg_gain > 0 else 50.0
        else:
            rs = self._avg_gain / self._avg_loss
            self.value = 100.0 - 100.0 / (1.0 + rs)
        return self.value


class ATR:
    """Wilder's average true range over bars (ready after ``period`` bars)."""

    __slots__ = ("_count", "_prev_close", "_sum", "period", "value")

    def __init__(self, period: int = 14) -> None:
        if period < 1:
            raise ValueError("period must be >= 1")
        self.period = period
        self._prev_close: float | None = None
        self._count = 0
        self._sum = 0.0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, high: float, low: float, close: float) -> float | None:
        pc = self._prev_close
        tr = high - low if pc is None else max(high - low, abs(high - pc), abs(low - pc))
        self._prev_close = close
        n = self.period
        v = self.value
        if v is not None:
            v = (v * (n - 1) + tr) / n
            self.value = v
            return v
        self._count += 1
        self._sum += tr
        if self._count == n:
            self.value = self._sum / n
        return self.value
