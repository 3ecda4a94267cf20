"""Momentum: enter when the N-tick return passes a threshold, exit on reversal, stop or target.

Long when the price has risen more than ``entry_pct`` % over the last ``lookback`` ticks,
short (if ``allow_short``) when it has fallen as much. The entry is market intent with a
stop and a target ``stop_pct``/``target_pct`` % away. With ``bracket`` on (default) they go
to execution as an OCO bracket; with it off the strategy watches them itself. An open
position is also closed when the N-tick return turns against it by ``exit_pct`` %. After
an exit the instrument rests for ``cooldown_ticks`` ticks.

With the default simulated feed (20 ticks/s, ±0.08 % steps) the first order goes out
within a few seconds of start.
"""

from __future__ import annotations

from collections import deque
from decimal import Decimal
from typing import Annotated

from msgspec import Meta

from libs.common.instruments import instrument_key
from libs.common.messages import Fill, Sizing, Tick
from services.strategy.base import Strategy, StrategyParams


class MomentumParams(StrategyParams, frozen=True):
    """Parameters of ``momentum`` (``[[strategy]] params`` or ``--param k=v``)."""

    lookback: Annotated[int, Meta(ge=1)] = 20  # ticks
    entry_pct: Annotated[float, Meta(gt=0)] = 0.25  # N-tick return that triggers an entry, %
    exit_pct: Annotated[float, Meta(gt=0)] = 0.15  # N-tick return against the position that exits, %
    quantity: Annotated[int, Meta(ge=0)] = 1  # shares per entry (0 with risk_pct > 0: risk sizes it)
    stop_pct: Annotated[float, Meta(ge=0)] = 0.5  # stop-loss distance from entry, % (0 = none)
    target_pct: Annotated[float, Meta(ge=0)] = 1.0  # target distance from entry, % (0 = none)
    bracket: bool = True  # send stop/target with the entry (OCO at execution)
    allow_short: bool = True
    cooldown_ticks: Annotated[int, Meta(ge=0)] = 20
    risk_pct: Annotated[float, Meta(ge=0)] = 0.0  # > 0: size to risk this % of capital per trade
    capital: Annotated[float, Meta(gt=0)] = 100_000.0


class _State:
    __slots__ = ("cooldown", "prices", "stop", "target")

    def __init__(self, lookback: int) -> None:
        self.prices: deque[float] = deque(maxlen=lookback + 1)
        self.cooldown = 0
        self.stop = 0.0
        self.target = 0.0


class Momentum(Strategy):
    """N-tick momentum with market-intent entries, stop/target and reversal exits."""

    name = "momentum"
    Params = MomentumParams
    params: MomentumParams

    def on_start(self) -> None:
        """Per-instrument price windows."""
        self.state: dict[str, _State] = {}

    def on_tick(self, tick: Tick) -> None:
        """Enter on a strong N-tick move; exit on reversal (and on stop/target without bracket)."""
        p = self.params
        key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = _State(p.lookback)
        price = tick.ltp
        prices = st.prices
        prices.append(price)
        if st.cooldown:
            st.cooldown -= 1
        if len(prices) <= p.lookback or price <= 0:
            return
        ret = (price / prices[0] - 1.0) * 100.0
        held = self.positions.get(key)
        pos = held.quantity if held is not None else 0
        if pos:
            long = pos > 0
            against = -ret if long else ret
            hit = False
            if not p.bracket:
                hit = (price <= st.stop if long else price >= st.stop) if st.stop else False
                if st.target:
                    hit = hit or (price >= st.target if long else price <= st.target)
            if against >= p.exit_pct or hit:
                self.exit(key)
            return
        if st.cooldown or -p.entry_pct < ret < p.entry_pct or self.has_orders(key):
            return
        if ret > 0:
            self._enter(tick, key, st, "BUY")
        elif p.allow_short:
            self._enter(tick, key, st, "SELL")

    def on_fill(self, fill: Fill) -> None:
        """Start the cooldown when a position has been closed."""
        key = instrument_key(fill.segment, fill.token)
        st = self.state.get(key)
        if st is not None and self.position(key) == 0:
            st.cooldown = self.params.cooldown_ticks
            st.stop = st.target = 0.0

    def _enter(self, tick: Tick, key: str, st: _State, side: str) -> None:
        p = self.params
        sign = 1.0 if side == "BUY" else -1.0
        price = tick.ltp
        stop = (
            self.price_offset(key, price, -sign * p.stop_pct, "down" if sign > 0 else "up")
            if p.stop_pct
            else None
        )
        target = (
            self.price_offset(key, price, sign * p.target_pct, "up" if sign > 0 else "down")
            if p.target_pct
            else None
        )
        sizing = None
        quantity: int | None = p.quantity
        if p.risk_pct > 0 and stop is not None:
            sizing = Sizing(capital=Decimal(str(p.capital)), risk_pct=Decimal(str(p.risk_pct)))
            quantity = 0
        st.stop = float(stop) if stop is not None else 0.0
        st.target = float(target) if target is not None else 0.0
        if not p.bracket:
            stop = target = None
        order = self.buy if side == "BUY" else self.sell
        order(key, quantity if quantity else None, stop_loss=stop, target=target, sizing=sizing)
