"""Bar aggregation from ticks by exchange time.

Bars are aligned to the exchange day (IST midnight), so 1-minute bars start at
``09:15:00``, 5-minute bars at ``09:15``, ``09:20``… and 15-minute bars at ``09:15``.
A bar closes when the first tick of a later bucket arrives, or when ``flush(now_ns)`` is
called after its end (the live service does this on a timer so a quiet instrument still
gets its bar).

- **First partial bar.** A bar whose bucket began before the aggregator started watching
  (``start_ns``; by default the first tick's time) lacks the ticks before that moment.
  It is marked ``partial=True`` and, by default, not emitted: an indicator fed a
  half-minute of prices as a full bar would be wrong.
- **Gaps.** A bucket with no tick produces no bar by default (nothing traded). With
  ``fill_gaps=True`` such buckets become flat bars at the previous close with zero volume
  and ``ticks=0``, so bar-count based indicators keep wall-clock spacing.
- **Late ticks** (exchange time before the current bar) are counted in ``late`` and
  dropped; they cannot change a bar that was already handed out.
"""

from __future__ import annotations

import msgspec

from libs.common.messages import Tick

IST_OFFSET_NS = 19_800 * 1_000_000_000  # +05:30


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    """One OHLCV bar of ``key`` (``segment|token``) covering ``[start_ns, end_ns)``."""

    key: str
    start_ns: int
    end_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: int = 0
    ticks: int = 0
    partial: bool = False


class BarAggregator:
    """Aggregates one instrument's ticks into bars of ``interval_s`` seconds."""

    __slots__ = (
        "_close",
        "_emitted_until",
        "_high",
        "_last_cum_vol",
        "_low",
        "_n",
        "_open",
        "_partial",
        "_start",
        "_vol",
        "emit_partial",
        "fill_gaps",
        "interval_ns",
        "key",
        "late",
        "start_ns",
    )

    def __init__(
        self,
        key: str = "",
        interval_s: float = 60.0,
        *,
        start_ns: int | None = None,
        emit_partial: bool = False,
        fill_gaps: bool = False,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("bar interval must be positive")
        self.key = key
        self.interval_ns = int(interval_s * 1_000_000_000)
        self.start_ns = start_ns
        self.emit_partial = emit_partial
        self.fill_gaps = fill_gaps
        self.late = 0
        self._start: int | None = None
        self._open = self._high = self._low = self._close = 0.0
        self._vol = 0
        self._n = 0
        self._partial = False
        self._emitted_until: int | None = None
        self._last_cum_vol = -1

    def bucket(self, ts_ns: int) -> int:
        """Start of the bar that contains ``ts_ns``."""
        return ts_ns - (ts_ns + IST_OFFSET_NS) % self.interval_ns

    def update_tick(self, tick: Tick) -> list[Bar] | None:
        """Feed one tick (exchange time, falling back to receive time); see ``update``."""
        cum = tick.volume
        last = self._last_cum_vol
        if cum > 0:
            qty = cum - last if 0 <= last <= cum else tick.last_qty
            self._last_cum_vol = cum
        else:
            qty = tick.last_qty
        return self.update(tick.exch_ts_ns or tick.ts_ns, tick.ltp, qty)

    def update(self, ts_ns: int, price: float, qty: int = 0) -> list[Bar] | None:
        """Add a trade at ``price``; returns the bars this tick completed, or ``None``."""
        start = self._start
        if start is not None:
            if ts_ns < start + self.interval_ns:
                if ts_ns < start:
                    self.late += 1
                    return None
                if price > self._high:
                    self._high = price
                elif price < self._low:
                    self._low = price
                self._close = price
                self._vol += qty
                self._n += 1
                return None
            out = self._close_current()
        else:
            out = []
            if self._emitted_until is not None and ts_ns < self._emitted_until:
                self.late += 1
                return None
        b = self.bucket(ts_ns)
        if self.fill_gaps:
            self._gap_bars(b, out)
        if self.start_ns is None:
            self.start_ns = ts_ns
        self._partial = self._emitted_until is None and self.start_ns > b
        self._start = b
        self._open = self._high = self._low = self._close = price
        self._vol = qty
        self._n = 1
        return out or None

    def flush(self, now_ns: int) -> list[Bar] | None:
        """Close the current bar if ``now_ns`` is past its end (and, with ``fill_gaps``, emit
        flat bars for buckets that ended since). Returns the completed bars or ``None``."""
        out: list[Bar] = []
        if self._start is not None and now_ns >= self._start + self.interval_ns:
            out = self._close_current()
        if self.fill_gaps and self._emitted_until is not None:
            self._gap_bars(self.bucket(now_ns), out)
        return out or None

    @property
    def current(self) -> Bar | None:
        """The bar being built (not yet complete), for inspection."""
        if self._start is None:
            return None
        return self._make(
            self._start, self._open, self._high, self._low, self._close, self._vol, self._n, self._partial
        )

    # ------------------------------------------------------------------ internals
    def _make(  # noqa: PLR0917 - the fields of a bar
        self, start: int, o: float, h: float, lo: float, c: float, vol: int, n: int, partial: bool
    ) -> Bar:
        return Bar(
            key=self.key,
            start_ns=start,
            end_ns=start + self.interval_ns,
            open=o,
            high=h,
            low=lo,
            close=c,
            volume=vol,
            ticks=n,
            partial=partial,
        )

    def _close_current(self) -> list[Bar]:
        start = self._start
        assert start is not None
        out: list[Bar] = []
        if not self._partial or self.emit_partial:
            out.append(
                self._make(
                    start, self._open, self._high, self._low, self._close, self._vol, self._n, self._partial
                )
            )
        self._emitted_until = start + self.interval_ns
        self._start = None
        return out

    def _gap_bars(self, until_start: int, out: list[Bar]) -> None:
        t = self._emitted_until
        if t is None:
            return
        c = self._close
        step = self.interval_ns
        while t < until_start:
            out.append(self._make(t, c, c, c, c, 0, 0, False))
            t += step
        self._emitted_until = t
