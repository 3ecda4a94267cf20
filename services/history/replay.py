"""Stored candles as ticks, for ``neopulse backtest --history``.

Each candle becomes four trades inside its own interval, so the strategy's ``BarAggregator``
rebuilds the candle exactly (same open, high, low, close) and the paper broker fills resting
orders and stops against its range: the open at the candle's start, then the low and the high
(high first on a falling candle: the usual "open, nearer extreme, farther extreme, close"
path), then the close just before the interval ends. A daily candle's four trades are spread
over six hours from its start so they stay on its day. ``volume`` is the day's running total,
as the live feed sends it, and ``last_qty`` the candle's volume since its previous trade.
Ticks of several instruments are merged in time order.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Iterable, Iterator
from typing import Any

from libs.common.messages import Tick

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
MAX_SPAN_NS = 6 * 3600 * 10**9


def candle_ticks(key: str, symbol: str, candles: Iterable[tuple[Any, ...]],
                 interval_s: int) -> Iterator[Tick]:  # fmt: skip
    seg, _, tok = key.partition("|")
    span = min(interval_s * 10**9, MAX_SPAN_NS)
    day = None
    cum = 0
    prev_close = 0.0
    for ts, o, h, lo, c, v, oi in candles:
        today = dt.datetime.fromtimestamp(ts / 1e9, IST).date()
        if today != day:
            day, cum = today, 0
        first, second = (lo, h) if c >= o else (h, lo)
        steps = ((0, o, 0), (span // 4, first, v // 3), (span // 2, second, 2 * v // 3), (span - 10**6, c, v))
        before = 0
        for offset, price, vol in steps:
            t = ts + offset
            qty, before = vol - before, vol
            yield Tick(segment=seg, token=tok, symbol=symbol, ltp=float(price), volume=cum + vol,
                       last_qty=qty, open=float(o), high=float(h), low=float(lo), close=prev_close,
                       oi=int(oi or 0), exch_ts_ns=t, ts_ns=t)  # fmt: skip
        cum += v
        prev_close = float(c)


def merged(streams: list[Iterator[Tick]]) -> Iterator[Tick]:
    """Several instruments' ticks in exchange-time order (ties: the order of ``streams``)."""
    return heapq.merge(*streams, key=lambda t: t.exch_ts_ns)
