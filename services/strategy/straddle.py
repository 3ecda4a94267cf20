"""Straddle: the timed short straddle on weekly index options, as Indian retail traders run it.

At ``entry_at`` (IST, default 09:20) it sells the at-the-money call and put of the nearest
weekly expiry of ``underlying`` (default NIFTY) as one basket, ``lots`` lots each, at market
intent. Each leg carries its own stop loss ``leg_sl_pct`` % (default 25 %) above the premium
it was sold at (its average fill price: execution sets the stop when the leg fills), which
execution rests at the broker as a stop-limit BUY; with ``trail_pct`` the stop trails the
premium down. When one leg is stopped out, ``move_sl_to_cost`` (default on) has execution
move the other leg's stop to its entry price. At ``exit_at`` (default 15:15) whatever is still held is closed.

It enters at most once a day: the basket's request id names the day, so a restart, even
after both legs were stopped out, never sells the straddle again (execution never places a
known id twice). The entry is tried from ``entry_at`` for ``entry_window_min`` minutes, at the
first tick with prices for the index and both legs; a strategy started later that day does
not enter.

    [[strategy]]
    name = "straddle"
    id = "nifty-straddle"
    max_loss = 3000          # rupees of the strategy's net MTM: squared off and stopped for the day
    params = { underlying = "NIFTY", lots = 1, leg_sl_pct = 25, trail_pct = 0 }
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated

from msgspec import Meta

from libs.common.clock import IST
from libs.common.messages import OrderRequest, Tick
from services.strategy.base import ParamsError, Strategy, StrategyParams

NS = 1_000_000_000
ENTRY_TRIES = 3  # baskets sent in the entry window when risk refuses one
ENTRY_RETRY_S = 5  # seconds between them


def _seconds_of_day(text: str, name: str) -> int:
    try:
        at = dt.time.fromisoformat(text)
    except ValueError:
        raise ParamsError(f"strategy straddle: params: {name} {text!r} is not a time of day HH:MM") from None
    return at.hour * 3600 + at.minute * 60 + at.second


def _day_and_second(ts_ns: int) -> tuple[str, int]:
    """(the IST trading day, ISO; the second of that day) of an epoch-ns time."""
    when = dt.datetime.fromtimestamp(ts_ns / NS, IST)
    return when.date().isoformat(), when.hour * 3600 + when.minute * 60 + when.second


class StraddleParams(StrategyParams, frozen=True):
    """Parameters of ``straddle`` (``[[strategy]] params`` or ``--param k=v``)."""

    underlying: str = "NIFTY"  # NIFTY, BANKNIFTY, FINNIFTY, SENSEX, ...
    expiry: str = "weekly"  # weekly (the nearest listed expiry), next-weekly or monthly
    entry_at: str = "09:20"  # IST
    entry_window_min: Annotated[int, Meta(ge=1, le=375)] = 30  # the entry is tried this long after entry_at
    exit_at: str = "15:15"  # IST: what is still held is closed
    lots: Annotated[int, Meta(ge=1, le=100)] = 1  # lots per leg
    leg_sl_pct: Annotated[float, Meta(gt=0, le=500)] = 25.0  # each leg's stop, % above its premium
    trail_pct: Annotated[float, Meta(ge=0, le=50)] = 0.0  # > 0: each stop trails the premium by this %
    move_sl_to_cost: bool = True  # one leg stopped out: the other leg's stop moves to its entry price
    product: str = "MIS"  # MIS (intraday) or NRML


class Straddle(Strategy):
    """Timed short straddle: sell the weekly ATM call and put, a stop on each, square off."""

    name = "straddle"
    Params = StraddleParams
    params: StraddleParams
    reject_backoff_s = 0.0  # a refused basket is not retried on every tick: see ``_entered``

    def on_start(self) -> None:
        p = self.params
        self.entry_s = _seconds_of_day(p.entry_at, "entry_at")
        self.exit_s = _seconds_of_day(p.exit_at, "exit_at")
        if not self.entry_s < self.exit_s:
            raise ParamsError(f"strategy straddle: params: entry_at {p.entry_at} must come before "
                              f"exit_at {p.exit_at}")  # fmt: skip
        if 0 < p.trail_pct < 0.01:
            raise ParamsError(f"strategy straddle: params: trail_pct {p.trail_pct} is below 0.01 "
                              "(0 turns the trail off)")  # fmt: skip
        if p.product not in ("MIS", "NRML"):
            raise ParamsError(f"strategy straddle: params: product {p.product!r} must be MIS or NRML")
        self.entry_until_s = min(self.entry_s + p.entry_window_min * 60, self.exit_s)
        self._entered = ""  # the trading day the basket went out (at most once a day)
        self._legs: list[str] = []  # the legs' instrument keys
        self._tries = 0  # baskets sent today (a refused one is sent again, up to ENTRY_TRIES)
        self._retry_at_s = 0  # second of the day before which a refused basket is not sent again
        self.chain(p.underlying, p.expiry, strikes=2)  # subscribes the index and the strikes near ATM

    def on_tick(self, tick: Tick) -> None:
        day, second = _day_and_second(tick.exch_ts_ns or self.ctx.clock.now_ns())
        if second >= self.exit_s:
            for key in self._held():
                self.exit(key, product=self.params.product)
            return
        due = self.entry_s <= second < self.entry_until_s and second >= self._retry_at_s
        if due and self._entered != day:
            self._enter(day)

    def on_reject(self, request: OrderRequest, reason: str) -> None:
        """Risk refused the day's basket (each leg hears it; the first one counts). A refusal
        can pass (risk has no price for a leg yet, the throttle, a restart of execution): the
        same basket, under the same id, goes again ENTRY_RETRY_S later, up to ENTRY_TRIES
        baskets in the entry window. Execution never places an id twice, so a basket it did
        see is never doubled by this."""
        day = self._entered
        if not day or not request.request_id.startswith(self._basket_id(day) + ":"):
            return
        retry = self._tries < ENTRY_TRIES
        self.log.warning("straddle_refused", strategy_id=self.id, reason=reason, tries=self._tries,
                         retry_in_s=ENTRY_RETRY_S if retry else None)  # fmt: skip
        if retry:
            self._retry_at_s = _day_and_second(self.ctx.clock.now_ns())[1] + ENTRY_RETRY_S
            self._entered = ""

    def _basket_id(self, day: str) -> str:
        """The day's basket id: the same after a restart, different for every instance."""
        ymd = day.replace("-", "")
        rid = f"{self.id}-sd{ymd}"
        if len(rid) > 59:  # the longest basket id there is
            rid = f"sd{hashlib.sha1(self.id.encode()).hexdigest()[:20]}-{ymd}"  # noqa: S324 - a name, not security
        return rid

    def _held(self) -> list[str]:
        return [k for k, pos in self.positions.items() if pos.quantity]

    def _enter(self, day: str) -> None:
        p = self.params
        chain = self.chain(p.underlying, p.expiry, strikes=2)
        spot = self.last.get(self.spot_key(chain))
        if spot is None:
            return
        atm = chain.atm(spot.ltp)
        call, put = chain.call(atm), chain.put(atm)
        ce, pe = self.last.get(call.key), self.last.get(put.key)
        if ce is None or pe is None or not (ce.ltp > 0 and pe.ltp > 0):
            return  # the legs' first ticks are on their way: tried again at the next tick
        if self._held():
            self._entered = day  # a restart with the straddle still on: nothing to sell
            return
        trail = p.trail_pct or None
        qty = p.lots * call.lot_size
        # each stop leg_sl_pct above the premium the leg is actually sold at (execution sets it
        # from the fill; risk judges it from the last price)
        legs = [self.leg("SELL", inst, qty, stop_loss_pct=p.leg_sl_pct, trail_pct=trail, product=p.product)
                for inst in (call, put)]  # fmt: skip
        self.basket(legs, move_sl_to_cost=p.move_sl_to_cost, request_id=self._basket_id(day))
        self._entered = day
        self._tries += 1
        self._legs = [call.key, put.key]
        self.log.info("straddle_sent", strategy_id=self.id, underlying=p.underlying, strike=str(atm),
                      expiry=chain.expiry.isoformat(), call=call.symbol, put=put.symbol,
                      call_premium=ce.ltp, put_premium=pe.ltp, quantity=qty)  # fmt: skip
