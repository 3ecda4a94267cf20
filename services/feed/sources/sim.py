"""Simulated market: a seeded random walk per instrument, for paper trading and tests.

Each instrument walks in whole ticks from the sample master's reference price
(``dRefPrice``), so every price is on the tick. The walk for an instrument depends only on
``feed.sim_seed`` and the instrument's key: the same seed gives the same prices, whatever
else is subscribed and whenever it was added. Reactor timers pace it at ``feed.sim_rate``
ticks per second per instrument; when the process falls behind, time slips rather than
bursts, and the sequence of ticks stays the same.
"""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from libs.common.instruments import Instrument
from libs.common.messages import Tick
from services.feed.sources import LIVE, FeedSink, Source

DEFAULT_START = 100.0
MAX_ROUNDS_PER_PUMP = 200  # a pump never emits more than this many rounds (keeps the loop responsive)


def _decimals(tick: Decimal) -> int:
    exp = tick.normalize().as_tuple().exponent
    return max(0, -exp) if isinstance(exp, int) else 2


class Walk:
    """One instrument's random walk, in integer ticks. Pure: no clock, no sockets."""

    __slots__ = (
        "ask_qty_max",
        "close",
        "decimals",
        "high",
        "inst",
        "lot",
        "low",
        "open",
        "rng",
        "segment",
        "step_sd",
        "symbol",
        "tick",
        "token",
        "units",
        "volume",
    )

    def __init__(self, inst: Instrument, seed: int, volatility: float) -> None:
        self.inst = inst
        self.segment, self.token, self.symbol = inst.segment, inst.token, inst.symbol
        tick_size = inst.tick_size if inst.tick_size > 0 else Decimal("0.05")
        self.tick = float(tick_size)
        self.decimals = _decimals(tick_size)
        self.rng = random.Random(f"{seed}|{inst.key}")
        start = inst.ref_price if inst.ref_price > 0 else DEFAULT_START
        self.units = max(1, round(start / self.tick))
        self.close = round(self.units * self.tick, self.decimals)
        self.open = self.high = self.low = 0.0
        # one standard deviation of a step, in ticks (at least one tick so prices move)
        self.step_sd = max(1.0, volatility * start / self.tick)
        self.lot = max(1, inst.lot_size)
        self.volume = 0
        self.ask_qty_max = 50

    def step(self, ts_ns: int) -> Tick:
        rng = self.rng
        self.units = max(1, self.units + round(rng.gauss(0.0, self.step_sd)))
        tick, dec = self.tick, self.decimals
        ltp = round(self.units * tick, dec)
        if not self.open:
            self.open = self.high = self.low = ltp
        elif ltp > self.high:
            self.high = ltp
        elif ltp < self.low:
            self.low = ltp
        qty = self.lot * rng.randint(1, 10)
        self.volume += qty
        spread_b = rng.randint(1, 2)
        spread_a = rng.randint(1, 2)
        bid_units = max(1, self.units - spread_b)
        return Tick(
            segment=self.segment, token=self.token, symbol=self.symbol, ltp=ltp,
            volume=self.volume, last_qty=qty,
            bid=round(bid_units * tick, dec), ask=round((self.units + spread_a) * tick, dec),
            bid_qty=self.lot * rng.randint(1, self.ask_qty_max),
            ask_qty=self.lot * rng.randint(1, self.ask_qty_max),
            open=self.open, high=self.high, low=self.low, close=self.close,
            exch_ts_ns=ts_ns, ts_ns=ts_ns,
        )


class SimSource(Source):
    """Drives one ``Walk`` per subscribed instrument from reactor timers."""

    name = "sim"

    def __init__(self, sink: FeedSink) -> None:
        super().__init__(sink)
        feed = sink.cfg.feed
        self.seed = feed.sim_seed
        self.rate = feed.sim_rate
        self.volatility = feed.sim_volatility
        self.walks: list[Walk] = []
        self._keys: set[str] = set()
        self._timer: int | None = None
        self._t0 = 0.0
        self._rounds = 0
        self.slipped = 0

    def start(self, instruments: list[Instrument]) -> None:
        self.add_instruments(instruments)
        self._t0 = self.sink.clock.monotonic()
        interval = max(1.0 / self.rate, 0.002)
        self._timer = self.sink.reactor.call_every(interval, self.pump)
        self.sink.set_state(LIVE, f"simulated market, seed {self.seed}, {self.rate:g} ticks/s per instrument")

    def add_instruments(self, instruments: list[Instrument]) -> None:
        for inst in instruments:
            if inst.key not in self._keys:
                self._keys.add(inst.key)
                self.walks.append(Walk(inst, self.seed, self.volatility))

    def pump(self) -> None:
        due = int((self.sink.clock.monotonic() - self._t0) * self.rate) - self._rounds
        if due <= 0 or not self.walks:
            return
        if due > MAX_ROUNDS_PER_PUMP:
            self.slipped += due - MAX_ROUNDS_PER_PUMP
            self._rounds += due - MAX_ROUNDS_PER_PUMP
            due = MAX_ROUNDS_PER_PUMP
        self._rounds += due
        now = self.sink.clock.now_ns()
        walks = self.walks
        ticks = [w.step(now) for _ in range(due) for w in walks]
        self.sink.publish_ticks(ticks)

    def stop(self) -> None:
        if self._timer is not None:
            self.sink.reactor.cancel(self._timer)
            self._timer = None

    def stats(self) -> dict[str, Any]:
        return {"instruments": len(self.walks), "rounds": self._rounds, "slipped_rounds": self.slipped}
