"""EMA cross, long only: buy when the fast EMA crosses above the slow one, exit when it
crosses back below.

On each closed bar (``bar_seconds``, default 60 s, exchange time) both EMAs (``fast`` and
``slow`` bars, SMA-seeded as in ``indicators.EMA``) take the bar's close. A cross is a change
of sign of ``fast - slow`` from ≤ 0 to > 0 (up: go long ``quantity``) or from ≥ 0 to < 0
(down: close the long). It never goes short. A cross that comes while an order in that
instrument is still working is acted on once that order's fill arrives, as in ``macd``.

    neopulse backtest --ticks var/ticks --strategy ema_cross --param fast=5 --param slow=20 \\
        --param bar_seconds=5
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from libs.common.instruments import instrument_key
from libs.common.messages import Fill
from services.strategy.bars import Bar
from services.strategy.base import Strategy, StrategyParams
from services.strategy.indicators import EMA


class EmaCrossParams(StrategyParams, frozen=True):
    """Parameters of ``ema_cross``."""

    fast: Annotated[int, Meta(ge=1)] = 9  # bars
    slow: Annotated[int, Meta(ge=2)] = 21  # bars
    bar_seconds: Annotated[float, Meta(gt=0)] = 60.0
    quantity: Annotated[int, Meta(ge=1)] = 1


class _State:
    __slots__ = ("diff", "fast", "slow", "want")

    def __init__(self, p: EmaCrossParams) -> None:
        self.fast = EMA(p.fast)
        self.slow = EMA(p.slow)
        self.diff: float | None = None
        self.want = 0  # 1 long, 0 flat: what the last cross asked for


class EmaCross(Strategy):
    """Long-only fast/slow EMA crossover on bars."""

    name = "ema_cross"
    Params = EmaCrossParams
    params: EmaCrossParams

    def on_start(self) -> None:
        """Per-instrument EMAs."""
        if self.params.fast >= self.params.slow:
            raise ValueError("ema_cross: fast must be shorter than slow")
        self.state: dict[str, _State] = {}

    def on_bar(self, bar: Bar) -> None:
        """Update both EMAs with the closed bar; act on a cross."""
        st = self.state.get(bar.key)
        if st is None:
            st = self.state[bar.key] = _State(self.params)
        fast = st.fast.update(bar.close)
        slow = st.slow.update(bar.close)
        if fast is None or slow is None:
            return
        diff = fast - slow
        prev, st.diff = st.diff, diff
        if prev is None:
            return
        if prev <= 0 < diff:
            st.want = 1
        elif prev >= 0 > diff:
            st.want = 0
        else:
            return
        self._reconcile(bar.key, st)

    def on_fill(self, fill: Fill) -> None:
        """A cross seen while an order was working: act on it now that the order has filled."""
        key = instrument_key(fill.segment, fill.token)
        st = self.state.get(key)
        if st is not None and not self.has_orders(key):
            self._reconcile(key, st)

    def _reconcile(self, key: str, st: _State) -> None:
        pos = self.position(key)
        if pos > 0 and not st.want:
            self.exit(key)
        elif pos == 0 and st.want and not self.has_orders(key):
            self.buy(key, self.params.quantity)
