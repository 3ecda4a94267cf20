"""MACD crossover on bars, with optional ATR-based stop and target.

On each closed bar (``bar_seconds``, default 60 s, exchange time) the MACD line and its
signal line are updated. When MACD crosses above the signal the strategy goes long
(closing a short first); when it crosses below it closes a long and, with
``allow_short``, goes short. A cross is a change of sign of the histogram
(``macd - signal``) from ≤ 0 to > 0 (up) or from ≥ 0 to < 0 (down).

With ``atr_stop``/``atr_target`` > 0 the entry carries a stop and a target that many ATRs
(Wilder, ``atr_period`` bars) from the bar close, as an OCO bracket at execution.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from libs.common.instruments import instrument_key
from libs.common.messages import Fill
from services.strategy.bars import Bar
from services.strategy.base import Strategy, StrategyParams
from services.strategy.indicators import ATR, MACD


class MacdParams(StrategyParams, frozen=True):
    """Parameters of ``macd``."""

    fast: Annotated[int, Meta(ge=1)] = 12
    slow: Annotated[int, Meta(ge=2)] = 26
    signal: Annotated[int, Meta(ge=1)] = 9
    bar_seconds: Annotated[float, Meta(gt=0)] = 60.0
    quantity: Annotated[int, Meta(ge=1)] = 1
    allow_short: bool = False
    atr_period: Annotated[int, Meta(ge=1)] = 14
    atr_stop: Annotated[float, Meta(ge=0)] = 0.0  # stop distance in ATRs (0 = no stop)
    atr_target: Annotated[float, Meta(ge=0)] = 0.0  # target distance in ATRs (0 = no target)


class _State:
    __slots__ = ("atr", "hist", "macd", "want")

    def __init__(self, p: MacdParams) -> None:
        self.macd = MACD(p.fast, p.slow, p.signal)
        self.atr = ATR(p.atr_period)
        self.hist: float | None = None
        self.want = 0  # +1 long, -1 short, 0 flat: what the last cross asked for


class MacdCrossover(Strategy):
    """Trade MACD/signal crossovers on bars."""

    name = "macd"
    Params = MacdParams
    params: MacdParams

    def on_start(self) -> None:
        """Per-instrument indicators."""
        if self.params.fast >= self.params.slow:
            raise ValueError("macd: fast must be shorter than slow")
        self.state: dict[str, _State] = {}

    def on_bar(self, bar: Bar) -> None:
        """Update MACD and ATR with the closed bar; act on a crossover."""
        st = self.state.get(bar.key)
        if st is None:
            st = self.state[bar.key] = _State(self.params)
        st.atr.update(bar.high, bar.low, bar.close)
        st.macd.update(bar.close)
        hist = st.macd.histogram
        if hist is None:
            return
        prev, st.hist = st.hist, hist
        if prev is None:
            return
        if prev <= 0 < hist:
            st.want = 1
        elif prev >= 0 > hist:
            st.want = -1 if self.params.allow_short else 0
        else:
            return
        self._reconcile(bar.key, st, bar.close)

    def on_fill(self, fill: Fill) -> None:
        """After a reversal's exit fills, open the other side."""
        key = instrument_key(fill.segment, fill.token)
        st = self.state.get(key)
        if st is not None and st.want and self.position(key) == 0:
            self._reconcile(key, st, float(fill.price))

    def _reconcile(self, key: str, st: _State, price: float) -> None:
        pos = self.position(key)
        want = st.want
        if pos and (want == 0 or (pos > 0) != (want > 0)):
            self.exit(key)
            return
        if pos or not want or self.has_orders(key):
            return
        p = self.params
        atr = st.atr.value
        sign = 1.0 if want > 0 else -1.0
        stop = target = None
        if atr and p.atr_stop > 0:
            stop = price - sign * p.atr_stop * atr
        if atr and p.atr_target > 0:
            target = price + sign * p.atr_target * atr
        if want > 0:
            self.buy(key, p.quantity, stop_loss=stop, target=target)
        else:
            self.sell(key, p.quantity, stop_loss=stop, target=target)
        st.want = 0  # done: a later stop-out must not re-enter on the same cross
