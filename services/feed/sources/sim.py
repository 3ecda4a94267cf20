"""Simulated market: a seeded random walk per instrument, for paper trading and tests.

Each cash instrument and index walks in whole ticks from the sample master's reference price
(``dRefPrice``), so every price is on the tick. The walk for an instrument depends only on
``feed.sim_seed`` and the instrument's key: the same seed gives the same prices, whatever
else is subscribed and whenever it was added. Reactor timers pace it at ``feed.sim_rate``
ticks per second per instrument; when the process falls behind, time slips rather than
bursts, and the sequence of ticks stays the same.

Derivatives do not walk on their own: they follow the walk of their underlying (found in
the master by ``Instrument.underlying``; walked unpublished when it is not subscribed). A
future is spot plus carry at ``feed.sim_interest_rate`` to its expiry; an option is priced
with Black-Scholes (``libs.common.option_pricing``) from spot, the underlying's
``feed.sim_iv`` plus ``feed.sim_smile``, and the time from the feed's clock to 15:30 IST on
its expiry date, so premiums follow the underlying and decay as the clock moves. Each round
steps the underlyings first, so a derivative's tick is priced from the same round's spot.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

from libs.common.config import SIM_IV_DEFAULTS, FeedConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Tick
from libs.common.option_pricing import (
    MIN_YEARS,
    SECONDS_PER_YEAR,
    bs_price,
    expiry_ns,
    smile_vol,
    years_to_expiry,
)
from services.feed.sources import LIVE, FeedSink, Source

DEFAULT_START = 100.0
MAX_ROUNDS_PER_PUMP = 200  # a pump never emits more than this many rounds (keeps the loop responsive)
DEFAULT_IV = 0.25  # an underlying without a feed.sim_iv entry (stocks)
FUTURES = frozenset({"FUTIDX", "FUTSTK"})
# Kotak's trading symbols of the index rows, for underlyings whose index row has another name.
INDEX_SYMBOLS = {"NIFTY": "NIFTY 50", "BANKNIFTY": "NIFTY BANK", "FINNIFTY": "NIFTY FIN SERVICE",
                 "MIDCPNIFTY": "NIFTY MID SELECT", "SENSEX": "SENSEX", "BANKEX": "BANKEX"}


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


def is_option(inst: Instrument) -> bool:
    return inst.option_type in ("CE", "PE") and inst.strike is not None and inst.expiry is not None


def is_future(inst: Instrument) -> bool:
    return inst.inst_type in FUTURES and inst.expiry is not None


class _Derivative:
    """What futures and options share: the contract's tick, its own seeded quantities and
    OI, the session's open/high/low. The price comes from ``under``, the underlying's walk."""

    __slots__ = (
        "close", "decimals", "expiry_at", "high", "inst", "lot", "low", "oi", "open", "rate", "rng",
        "segment", "symbol", "tick", "token", "under", "volume",
    )

    def __init__(self, inst: Instrument, under: Walk, seed: int, rate: float) -> None:
        assert inst.expiry is not None
        self.inst, self.under, self.rate = inst, under, rate
        self.segment, self.token, self.symbol = inst.segment, inst.token, inst.symbol
        tick_size = inst.tick_size if inst.tick_size > 0 else Decimal("0.05")
        self.tick = float(tick_size)
        self.decimals = _decimals(tick_size)
        self.expiry_at = expiry_ns(inst.expiry)
        self.rng = random.Random(f"{seed}|{inst.key}")
        self.lot = max(1, inst.lot_size)
        self.volume = 0
        self.oi = self.lot * self.rng.randint(2_000, 20_000)
        self.open = self.high = self.low = self.close = 0.0

    def units_at(self, spot: float, now_ns: int) -> int:
        """The contract's price in whole ticks (at least one) for this spot and moment."""
        raise NotImplementedError

    def _half_spread(self, units: int) -> int:
        return 1

    def step(self, ts_ns: int) -> Tick:
        under = self.under
        units = self.units_at(under.units * under.tick, ts_ns)
        tick, dec, rand, lot = self.tick, self.decimals, self.rng.random, self.lot
        ltp = round(units * tick, dec)
        if not self.open:
            # previous close: the underlying's close one day further from expiry
            self.close = round(self.units_at(under.close, ts_ns - 86_400_000_000_000) * tick, dec)
            self.open = self.high = self.low = ltp
        elif ltp > self.high:
            self.high = ltp
        elif ltp < self.low:
            self.low = ltp
        # random() and int() rather than randint(): a quarter of the cost, the same spread of values
        qty = lot * (1 + int(rand() * 10))
        self.volume += qty
        self.oi = max(0, self.oi + lot * (int(rand() * 8) - 3))
        half = self._half_spread(units)
        return Tick(
            segment=self.segment, token=self.token, symbol=self.symbol, ltp=ltp,
            volume=self.volume, last_qty=qty,
            bid=round(max(1, units - half) * tick, dec), ask=round((units + half) * tick, dec),
            bid_qty=lot * (1 + int(rand() * 50)), ask_qty=lot * (1 + int(rand() * 50)),
            open=self.open, high=self.high, low=self.low, close=self.close, oi=self.oi,
            exch_ts_ns=ts_ns, ts_ns=ts_ns,
        )


class FutureWalk(_Derivative):
    """A future: spot carried at the interest rate to expiry, on the future's tick."""

    __slots__ = ()

    def units_at(self, spot: float, now_ns: int) -> int:
        years = (self.expiry_at - now_ns) / 1e9 / SECONDS_PER_YEAR
        return max(1, round(spot * math.exp(self.rate * max(years, 0.0)) / self.tick))


class OptionWalk(_Derivative):
    """An option: its Black-Scholes premium from spot, on its tick, never below one tick."""

    __slots__ = ("base_iv", "call", "half_spread", "smile", "strike")

    def __init__(self, inst: Instrument, under: Walk, seed: int, rate: float, *, iv: float,
                 smile: float, spread_pct: float) -> None:
        super().__init__(inst, under, seed, rate)
        assert inst.strike is not None
        self.strike = float(inst.strike)
        self.call = inst.option_type == "CE"
        self.base_iv, self.smile = iv, smile
        self.half_spread = spread_pct / 200.0  # each side, as a fraction of the premium

    def premium(self, spot: float, now_ns: int) -> float:
        """The model premium (not snapped) for this spot and moment."""
        strike = self.strike
        return bs_price(spot, strike, years_to_expiry(now_ns, self.expiry_at, MIN_YEARS),
                        smile_vol(self.base_iv, self.smile, spot, strike), rate=self.rate, call=self.call)

    def units_at(self, spot: float, now_ns: int) -> int:
        return max(1, round(self.premium(spot, now_ns) / self.tick))

    def _half_spread(self, units: int) -> int:
        return max(1, round(units * self.half_spread))


def _exchange(segment: str) -> str:
    return segment.partition("_")[0]  # nse_fo -> nse


def underlying_index(master: MasterData) -> dict[tuple[str, str], Instrument]:
    """``(exchange, NAME)`` → the cash row a derivative's ``underlying`` names: an index row
    (``Nifty 50``, name ``NIFTY``) before an equity (``RELIANCE-EQ``) before other series."""
    rank: dict[tuple[str, str], tuple[int, Instrument]] = {}
    for inst in master:
        exchange, _, kind = inst.segment.partition("_")
        if kind != "cm":
            continue
        symbol = inst.symbol.upper()
        order = 0 if inst.inst_type == "INDEX" else 1 if symbol.endswith("-EQ") else 2
        for name in {inst.name.upper(), symbol, symbol.removesuffix("-EQ")} - {""}:
            have = rank.get((exchange, name))
            if have is None or order < have[0]:
                rank[(exchange, name)] = (order, inst)
    return {k: inst for k, (_, inst) in rank.items()}


class SimSource(Source):
    """Drives one ``Walk`` per subscribed cash instrument or index and one priced walk per
    subscribed derivative from reactor timers."""

    name = "sim"

    def __init__(self, sink: FeedSink) -> None:
        super().__init__(sink)
        feed = sink.cfg.feed
        self.seed = feed.sim_seed
        self.rate = feed.sim_rate
        self.volatility = feed.sim_volatility
        self.walks: list[Walk] = []  # published cash walks
        self.derivatives: list[_Derivative] = []
        self._hidden: list[Walk] = []  # underlyings walked for derivatives, not subscribed
        self._cash: dict[str, Walk] = {}  # key -> walk, published or hidden
        self._keys: set[str] = set()
        self._index: dict[tuple[str, str], Instrument] = {}
        self._index_of: MasterData | None = None
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
            if inst.key in self._keys:
                continue
            self._keys.add(inst.key)
            if is_option(inst) or is_future(inst):
                self.derivatives.append(self._derivative(inst))
                continue
            walk = self._cash.get(inst.key)
            if walk is None:
                walk = self._cash[inst.key] = Walk(inst, self.seed, self.volatility)
            else:
                self._hidden.remove(walk)  # walked for a derivative so far: now published too
            self.walks.append(walk)

    def _derivative(self, inst: Instrument) -> _Derivative:
        feed: FeedConfig = self.sink.cfg.feed
        under = self._underlying_walk(inst)
        if is_future(inst):
            return FutureWalk(inst, under, self.seed, feed.sim_interest_rate)
        name = (inst.underlying or inst.name).upper()
        ivs = {**SIM_IV_DEFAULTS, **{k.upper(): v for k, v in feed.sim_iv.items()}}
        return OptionWalk(inst, under, self.seed, feed.sim_interest_rate, iv=ivs.get(name, DEFAULT_IV),
                          smile=feed.sim_smile, spread_pct=feed.sim_spread_pct)

    def _underlying_walk(self, inst: Instrument) -> Walk:
        """The walk of the derivative's underlying; started (unpublished) when not subscribed."""
        master = self.sink.master
        if self._index_of is not master:
            self._index, self._index_of = underlying_index(master), master
        name = (inst.underlying or inst.name).upper()
        exchange = _exchange(inst.segment)
        under = None
        for ex in (exchange, "bse" if exchange == "nse" else "nse"):
            under = self._index.get((ex, name)) or self._index.get((ex, INDEX_SYMBOLS.get(name, "")))
            if under is not None:
                break
        if under is None:
            stand_in = self._cash.get(f"sim|{name}")  # instrument_key of the stand-in below
            if stand_in is not None:
                return stand_in
            under = self._stand_in(inst, name, master)
        walk = self._cash.get(under.key)
        if walk is None:
            walk = self._cash[under.key] = Walk(under, self.seed, self.volatility)
            self._hidden.append(walk)
        return walk

    def _stand_in(self, inst: Instrument, name: str, master: MasterData) -> Instrument:
        """An underlying the master lacks: walked from a future's reference price (else the
        strike), under a key of its own so every derivative of that name shares it."""
        refs = [i.ref_price for i in master if i.underlying == name and is_future(i) and i.ref_price > 0]
        if not refs:
            refs = [inst.ref_price if is_future(inst) and inst.ref_price > 0 else float(inst.strike or 0)]
        ref = refs[0]
        if self.sink.log is not None:
            self.sink.log.warning("sim_underlying_missing", underlying=name, instrument=inst.symbol,
                                  start=ref)
        return Instrument(segment="sim", token=name, symbol=name, name=name, inst_type="INDEX", ref_price=ref)

    def pump(self) -> None:
        due = int((self.sink.clock.monotonic() - self._t0) * self.rate) - self._rounds
        if due <= 0 or not (self.walks or self.derivatives):
            return
        if due > MAX_ROUNDS_PER_PUMP:
            self.slipped += due - MAX_ROUNDS_PER_PUMP
            self._rounds += due - MAX_ROUNDS_PER_PUMP
            due = MAX_ROUNDS_PER_PUMP
        self._rounds += due
        now = self.sink.clock.now_ns()
        walks = self.walks
        if not self.derivatives:
            ticks = [w.step(now) for _ in range(due) for w in walks]
        else:
            hidden, derivatives = self._hidden, self.derivatives
            ticks = []
            for _ in range(due):
                for h in hidden:
                    h.step(now)  # same draws as a published walk: its prices do not depend on who listens
                ticks.extend([w.step(now) for w in walks])
                ticks.extend([d.step(now) for d in derivatives])
        self.sink.publish_ticks(ticks)

    def stop(self) -> None:
        if self._timer is not None:
            self.sink.reactor.cancel(self._timer)
            self._timer = None

    def stats(self) -> dict[str, Any]:
        return {"instruments": len(self.walks) + len(self.derivatives), "derivatives": len(self.derivatives),
                "unpublished_underlyings": len(self._hidden), "rounds": self._rounds,
                "slipped_rounds": self.slipped}
