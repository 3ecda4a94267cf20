"""The Strategy API: one class runs live, on paper and in backtests.

Write a strategy by subclassing ``Strategy`` and overriding the hooks you need::

    class Breakout(Strategy):
        name = "breakout"

        class Params(StrategyParams, frozen=True):
            lookback: int = 100
            quantity: int = 1

        def on_start(self) -> None:
            self.highs: dict[str, float] = {}

        def on_tick(self, tick: Tick) -> None:
            key = self.key_of(tick)
            high = self.highs.get(key, tick.ltp)
            if tick.ltp > high and self.is_flat(tick):
                self.buy(tick, self.params.quantity, stop_loss=tick.ltp * 0.995)
            self.highs[key] = max(high, tick.ltp)

A strategy is pure: it imports no sockets. Its helpers (``buy``, ``sell``, ``exit``)
build complete ``OrderRequest``s and queue them; the host (``service.py`` live,
``services.backtest`` offline) sends them to risk once the hook has returned. If a hook
raises, everything it queued is discarded, the error is logged with the strategy id, and
the instance continues or stops per ``[[strategy]] on_error``. Risk and execution never
see a half-built order.

The strategy keeps its own positions and open orders from execution's events
(``OrderUpdate``, ``Fill``), so ``buy``/``sell`` refuse to enter twice: they return ``None``
while a position or an order in that instrument is open or still in flight.

Options: ``self.chain("NIFTY", expiry="weekly")`` returns the option chain for the clock's
trading day (``libs.common.chain``) and subscribes the instance to it — the underlying's index
and the calls and puts of ``strikes`` listed strikes either side of ATM, re-centred as the index
moves — so its ticks reach ``on_tick`` with no further call::

    def on_tick(self, tick: Tick) -> None:
        nifty = self.chain("NIFTY", expiry="weekly", strikes=5)
        if self.key_of(tick) == self.spot_key(nifty):  # a tick of the index itself
            call = nifty.call(nifty.strike(2, tick.ltp))  # two strikes above ATM
            if self.is_flat(call):
                self.sell(call, 65)

The helpers take the ``Instrument`` a chain returns wherever they take a symbol.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, ClassVar

import msgspec

from libs.common import chain as chains
from libs.common.chain import Chain
from libs.common.clock import IST, Clock
from libs.common.instruments import Instrument, MasterData, instrument_key, split_key
from libs.common.messages import (
    TERMINAL_STATES,
    BasketRequest,
    BasketVerdict,
    Fill,
    OrderRequest,
    OrderUpdate,
    Position,
    RiskVerdict,
    Sizing,
    Tick,
    basket_leg_id,
)
from libs.common.money import snap, to_decimal
from libs.common.positions import FloatPositionState
from services.strategy.bars import Bar, BarAggregator

__all__ = [
    "Bar",
    "Chain",
    "FloatPositionState",
    "InstrumentRef",
    "NoParams",
    "ParamsError",
    "Sizing",
    "Strategy",
    "StrategyContext",
    "StrategyParams",
    "Tick",
]

_EMPTY: tuple[OrderRequest, ...] = ()
UNCONFIRMED_TTL_S = 15.0  # how long an order whose risk reply timed out blocks re-entry
BAR_FLUSH_GRACE_NS = 2_000_000_000  # a quiet bar closes this long after its end (clock skew)
ERROR_REPEAT_S = 5.0  # a hook that keeps raising logs one counter line at most this often
CHAIN_STRIKES = 10  # strikes either side of ATM that ``chain()`` subscribes by default
NS = 1_000_000_000
# an expiry day's last trade, as nanoseconds after IST midnight
_EXPIRY_CLOSE_NS = (chains.EXPIRY_CLOSE.hour * 3600 + chains.EXPIRY_CLOSE.minute * 60) * NS

#: What the helpers accept as an instrument: a tick, a bar, ``segment|token``, a symbol or an
#: ``Instrument`` (what ``chain().call()``/``put()`` return).
InstrumentRef = str | Tick | Bar | Instrument


class ParamsError(ValueError):
    """Strategy parameters that do not fit the strategy's ``Params`` Struct."""


class _FollowedChain:
    """A chain the strategy uses: the strike window it wants, centred on the underlying."""

    __slots__ = ("chain", "high", "low", "ref_price", "spot_key", "strikes")

    def __init__(self, chain: Chain, strikes: int | None, spot: Instrument | None) -> None:
        self.chain = chain
        self.strikes = strikes  # None: every listed strike
        self.spot_key = spot.key if spot is not None else ""
        self.ref_price = spot.ref_price if spot is not None else 0.0
        # The window stays as it is while low < spot <= high (ATM unchanged); 0, 0: not placed yet.
        self.low = self.high = 0.0


class StrategyParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for a strategy's typed parameters (``[[strategy]] params`` in config, or
    ``--param k=v`` on the command line). Unknown keys are rejected; values are converted
    (``"5"`` → ``5``) and validated against the annotations (``Annotated[int, Meta(gt=0)]``)."""


class NoParams(StrategyParams, frozen=True):
    """For strategies without parameters."""


class StrategyContext:
    """What a strategy may use from its host: its id, a clock, the instrument master, a
    logger, its instruments and a request-id factory. Built by the host, never by the
    strategy."""

    def __init__(
        self,
        strategy_id: str,
        *,
        clock: Clock | None = None,
        master: MasterData | None = None,
        log: Any = None,
        instruments: Iterable[str] = (),
        on_error: str = "continue",
        request_ids: Callable[[], str] | None = None,
    ) -> None:
        if on_error not in ("continue", "stop"):
            raise ParamsError(
                f"strategy {strategy_id}: on_error must be `continue` or `stop`, got {on_error!r}"
            )
        self.strategy_id = strategy_id
        self.clock = clock or Clock()
        self.master = master
        if log is None:
            import structlog

            log = structlog.get_logger("strategy")
        self.log = log
        self.instruments = list(instruments)
        self.on_error = on_error
        self.new_request_id = request_ids or self._uuid_ids

    def _uuid_ids(self) -> str:
        return f"{self.strategy_id}-{uuid.uuid4().hex[:16]}"

    @staticmethod
    def sequential_ids(strategy_id: str) -> Callable[[], str]:
        """Deterministic ids ``<id>-000001``… for backtests (byte-identical reports)."""
        counter = itertools.count(1)
        return lambda: f"{strategy_id}-{next(counter):06d}"


class Strategy:
    """Base class of every strategy. Override the hooks; call the helpers.

    Class attributes:
        name: the registry name (``momentum``, ``macd``).
        Params: a ``StrategyParams`` Struct; an instance is ``self.params``.
        bar_interval_s: bar length for ``on_bar`` (a ``bar_seconds`` parameter overrides it).
        bar_fill_gaps: emit flat bars for minutes without ticks (see ``bars.py``).
        reject_backoff_s: after risk refuses an entry, ``buy``/``sell`` in that instrument
            return ``None`` for this long, doubling on each further refusal up to 60 s and
            reset by an approval, so a strategy never hammers risk with refused orders
            (for example while the daily loss limit allows only exits). 0 disables it.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = NoParams
    bar_interval_s: ClassVar[float] = 60.0
    bar_fill_gaps: ClassVar[bool] = False
    reject_backoff_s: ClassVar[float] = 1.0

    def __init__(self, ctx: StrategyContext, params: StrategyParams | dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.id = ctx.strategy_id
        self.log = ctx.log
        self.params: Any = self.parse_params(params)
        self.positions: dict[str, FloatPositionState] = {}  # key → this strategy's own fills, booked
        self.pending: dict[str, OrderRequest] = {}  # request_id → sent, execution not heard from yet
        self.unconfirmed: dict[str, int] = {}  # request_id → deadline (risk reply timed out)
        self.open_orders: dict[str, OrderUpdate] = {}  # order_id → last non-terminal update
        self.last: dict[str, Tick] = {}  # key → last tick
        self.errors = 0
        self._error_kinds: set[tuple[str, str]] = set()  # (hook, exception type) logged in full
        self._error_logged_at = 0.0  # clock.monotonic() of the last hook-failure line
        self._errors_unlogged = 0  # failures since that line
        self.halted = ""  # set when on_error=stop and a hook raised: the reason
        self.instruments: list[Instrument] = []
        self._outbox: list[OrderRequest] = []
        self._exit_ids: set[str] = set()
        self._busy: set[str] = set()  # keys with an order in flight or open
        self._busy_stale = False  # pending/open_orders changed since ``_busy`` was built
        self._backoff: dict[str, tuple[int, float]] = {}  # key → (entries allowed again at, delay)
        self._fill_ids: set[str] = set()
        self._fill_qty: dict[str, int] = {}  # order_id → quantity seen in Fill messages
        self._known_qty: dict[str, int] = {}  # order_id → filled_qty seen in OrderUpdates
        self._applied_qty: dict[str, int] = {}  # order_id → quantity booked into positions
        self._bars: dict[str, BarAggregator] = {}
        self._wants_bars = type(self).on_bar is not Strategy.on_bar
        self._bar_interval = float(getattr(self.params, "bar_seconds", self.bar_interval_s))
        self._bar_start_ns: int | None = None
        # option chains and extra subscriptions (``chain``/``subscribe``)
        self._chains: dict[tuple[str, str | dt.date, dt.date], Chain] = {}
        self._followed: dict[tuple[str, dt.date], _FollowedChain] = {}
        self._spot_chains: dict[str, list[_FollowedChain]] = {}  # spot key → chains centred on it
        self._subscribed: dict[str, Instrument] = {}  # key → instrument wanted beyond self.instruments
        self._day: tuple[dt.date, int, int] | None = None  # trading day (IST), its [start, end) in ns
        #: Host API: instruments this instance wants since the host last looked; the host
        #: subscribes them (feed and SUB socket) and clears the list.
        self.new_subscriptions: list[Instrument] = []
        #: Host API: baskets queued by hooks that returned normally; the host sends each to
        #: risk and hands the ``BasketVerdict`` to ``dispatch_basket_verdict``, then clears it.
        self.new_baskets: list[BasketRequest] = []
        self._basket_legs: dict[str, BasketRequest] = {}  # leg request id → its basket (this hook)

    # ================================================================== hooks
    def on_start(self) -> None:
        """Called once before the first tick. Set up indicators and state here;
        ``self.instruments`` holds the resolved instruments of this instance."""

    def on_tick(self, tick: Tick) -> None:
        """Called for every tick of this instance's instruments (hot path: keep it cheap —
        no logging, no Decimal, no I/O per tick)."""

    def on_bar(self, bar: Bar) -> None:
        """Called when a bar of ``bar_interval_s`` closes (exchange time). Only strategies
        that override it pay for bar aggregation. Called before ``on_tick`` of the tick
        that closed the bar."""

    def on_fill(self, fill: Fill) -> None:
        """Called after each of this strategy's fills; ``self.positions`` already includes it."""

    def on_order(self, update: OrderUpdate) -> None:
        """Called when one of this strategy's orders changes state (ACK, OPEN, COMPLETE,
        REJECTED, CANCELLED…); ``self.open_orders`` is already updated."""

    def on_reject(self, request: OrderRequest, reason: str) -> None:
        """Called when risk refuses an order; ``reason`` is risk's message."""

    def on_stop(self) -> None:
        """Called once when the instance stops (signal, error with on_error=stop, end of
        a backtest). Orders queued here are still sent when the host can."""

    # ================================================================== helpers
    def buy(
        self,
        instrument: InstrumentRef,
        quantity: int | None = None,
        *,
        price: float | Decimal | None = None,
        stop_loss: float | Decimal | None = None,
        target: float | Decimal | None = None,
        sizing: Sizing | None = None,
        product: str = "MIS",
        trail_points: float | Decimal | None = None,
        trail_pct: float | Decimal | None = None,
    ) -> OrderRequest | None:
        """Open a long position from flat.

        ``price`` None means market intent (execution makes it a protected LIMIT).
        ``stop_loss``/``target`` make it a bracket: execution places the exits after the
        entry fills and cancels one when the other fills. ``trail_points`` (rupees) or
        ``trail_pct`` (percent of the price) make the stop trail: execution moves it up as the
        price rises, keeping that distance from the best price since entry, never down. Give
        ``sizing`` (and no ``quantity``) to let risk size the order from capital and risk %.
        Returns the queued request, or ``None`` when a position or an order in this
        instrument is already open or in flight (no double entry).
        """
        return self._entry("BUY", instrument, quantity, price, stop_loss, target, sizing, product,
                           trail=(trail_points, trail_pct))

    def sell(
        self,
        instrument: InstrumentRef,
        quantity: int | None = None,
        *,
        price: float | Decimal | None = None,
        stop_loss: float | Decimal | None = None,
        target: float | Decimal | None = None,
        sizing: Sizing | None = None,
        product: str = "MIS",
        trail_points: float | Decimal | None = None,
        trail_pct: float | Decimal | None = None,
    ) -> OrderRequest | None:
        """Open a short position from flat; arguments as for ``buy`` (stop above, target below;
        a trailing stop follows the lowest price since entry)."""
        return self._entry("SELL", instrument, quantity, price, stop_loss, target, sizing, product,
                           trail=(trail_points, trail_pct))

    def exit(
        self, instrument: InstrumentRef, *, price: float | Decimal | None = None, product: str = "MIS"
    ) -> OrderRequest | None:
        """Close the whole position in ``instrument`` (reduce-only, market intent unless
        ``price``). Returns ``None`` when flat or when an exit is already in flight."""
        key = self.key_of(instrument)
        pos = self.positions.get(key)
        if pos is None or pos.quantity == 0:
            return None
        for req in self._outbox:
            if req.purpose == "EXIT" and _req_key(req) == key:
                return None
        for rid in self._exit_ids:
            sent = self.pending.get(rid)
            if sent is not None and _req_key(sent) == key:
                return None
        for upd in self.open_orders.values():
            if upd.request_id in self._exit_ids and instrument_key(upd.segment, upd.token) == key:
                return None
        side = "SELL" if pos.quantity > 0 else "BUY"
        req = self._build(
            side, key, abs(pos.quantity), price, None, None, None, product, reduce_only=True, purpose="EXIT"
        )
        self._exit_ids.add(req.request_id)
        return req

    def leg(
        self,
        side: str,
        instrument: InstrumentRef,
        quantity: int,
        *,
        price: float | Decimal | None = None,
        stop_loss: float | Decimal | None = None,
        target: float | Decimal | None = None,
        product: str = "MIS",
        trail_points: float | Decimal | None = None,
        trail_pct: float | Decimal | None = None,
        stop_loss_pct: float | Decimal | None = None,
    ) -> OrderRequest:
        """One leg for ``basket``: ``self.leg("SELL", nifty.call(atm), 65, price=120)``. Not
        queued on its own; ``stop_loss``/``target`` (and a trail, as for ``buy``) become that
        leg's own bracket. ``stop_loss_pct`` instead of ``stop_loss``: the stop is that percent
        from the leg's average fill price (above it for a SELL), set by execution when the leg
        fills, so a premium that moved between this tick and the fill does not shift it."""
        key = self.key_of(instrument)
        segment, token = split_key(key)
        tick_size = _tick_size_of(self.ctx.master, key)
        buy = side == "BUY"
        return OrderRequest(
            request_id="leg", strategy_id=self.id, side=side, quantity=quantity,
            symbol=_symbol_of(self.ctx.master, self.last.get(key), key), segment=segment, token=token,
            price=_request_price(price, tick_size, "nearest"),
            stop_loss=_request_price(stop_loss, tick_size, "down" if buy else "up"),
            target=_request_price(target, tick_size, "up" if buy else "down"),
            trail_points=_distance(trail_points), trail_pct=_distance(trail_pct),
            stop_loss_pct=_distance(stop_loss_pct), product=product, ts_ns=self.ctx.clock.now_ns(),
        )  # fmt: skip

    def basket(self, legs: list[OrderRequest], *, move_sl_to_cost: bool = False,
               request_id: str = "") -> BasketRequest:  # fmt: skip
        """Send 2 to 4 legs (``self.leg(...)``) as one basket: risk judges them together (one
        failing leg refuses all), execution places the long legs first and the short legs once
        every long is accepted, and rolls back the filled legs if one fails. Each leg is
        tracked like an order (``pending``, ``on_order``, ``on_reject``) under the id
        ``<basket id>:leg<n>``. With ``move_sl_to_cost``, when one leg's stop loss fills,
        execution moves every other leg's stop to that leg's entry price. ``request_id`` (a
        fresh one by default) makes a basket at most once: execution places a repeated id
        never again, across restarts too (``f"{self.id}-entry-{day}"``: once a day). Returns the
        queued request."""
        rid = request_id or self.ctx.new_request_id()
        legs = [msgspec.structs.replace(x, request_id=basket_leg_id(rid, n), strategy_id=self.id)
                for n, x in enumerate(legs, 1)]  # fmt: skip
        req = BasketRequest(request_id=rid, strategy_id=self.id, legs=legs, move_sl_to_cost=move_sl_to_cost,
                            ts_ns=self.ctx.clock.now_ns())  # fmt: skip
        for x in legs:
            self._basket_legs[x.request_id] = req
        self._outbox.extend(legs)  # tracked and discarded with the hook's other orders
        return req

    def dispatch_basket_verdict(
        self, request: BasketRequest, verdict: BasketVerdict | Exception
    ) -> list[OrderRequest]:
        """Risk's answer for a basket: each leg gets its own verdict (``dispatch_verdict``)."""
        out: list[OrderRequest] = []
        by_id = {v.request_id: v for v in verdict.legs} if isinstance(verdict, BasketVerdict) else {}
        for x in request.legs:
            leg_verdict: RiskVerdict | Exception
            if isinstance(verdict, Exception):
                leg_verdict = verdict
            else:
                leg_verdict = by_id.get(x.request_id) or RiskVerdict(
                    request_id=x.request_id, approved=verdict.approved, reason=verdict.reason,
                    code=verdict.code, state=verdict.state)  # fmt: skip
                if leg_verdict.approved and not verdict.approved:  # refused as a whole
                    leg_verdict = msgspec.structs.replace(leg_verdict, approved=False, reason=verdict.reason,
                                                          code=verdict.code)  # fmt: skip
            out.extend(self.dispatch_verdict(x, leg_verdict))
        return out

    def position(self, instrument: InstrumentRef) -> int:
        """Signed quantity held in ``instrument`` (+ long, - short, 0 flat)."""
        pos = self.positions.get(self.key_of(instrument))
        return pos.quantity if pos is not None else 0

    def is_flat(self, instrument: InstrumentRef) -> bool:
        """True when there is no position and no order open or in flight in ``instrument``."""
        key = self.key_of(instrument)
        return self.position(key) == 0 and not self.has_orders(key)

    def has_orders(self, instrument: InstrumentRef) -> bool:
        """True when an order in ``instrument`` is in flight or open at the broker."""
        key = self.key_of(instrument)
        if self._busy_stale:
            self._rebuild_busy()
        if key in self._busy:
            return True
        return any(_req_key(req) == key for req in self._outbox)

    def key_of(self, instrument: InstrumentRef) -> str:
        """``segment|token`` of a tick, a bar, a ``segment|token`` string or a trading symbol."""
        if type(instrument) is str and "|" in instrument:
            return instrument
        if isinstance(instrument, Tick):
            return f"{instrument.segment}|{instrument.token}"  # instrument_key, inlined: hot path
        if isinstance(instrument, Bar | Instrument):
            return instrument.key
        master = self.ctx.master
        if master is None:
            raise ValueError(f"cannot resolve symbol {instrument!r} without an instrument master")
        return master.resolve(instrument).key

    def chain(
        self, underlying: str, expiry: str | dt.date = "weekly", *, strikes: int | None = CHAIN_STRIKES
    ) -> Chain:
        """The option chain of ``underlying`` (``NIFTY``, ``BANKNIFTY``, ``SENSEX``, a stock) for
        the clock's trading day. ``expiry``: ``"weekly"`` (the nearest listed expiry, of any kind),
        ``"next-weekly"``, ``"monthly"`` or a ``date``. On the chain: ``atm(spot)``,
        ``strike(n, spot)`` (n listed strikes from ATM), ``call(strike)``, ``put(strike)``.

        Using a chain subscribes this instance to the underlying's index (or stock) and to the
        CE and PE of ``strikes`` listed strikes either side of ATM (``None``: every strike); the
        window follows the index as it moves (strikes are added, never dropped). Before the
        index has a price (its first tick, or the master's reference price) only the index is
        subscribed. Cheap to call on every tick. The feed serves at most
        ``feed.max_subscriptions`` instruments in all; a refusal is logged with the counts.
        Raises ``ChainError`` (an ``UnknownInstrument``) when the master lists no such chain."""
        master = self.ctx.master
        if master is None:
            raise ValueError(f"cannot build a {underlying} option chain without an instrument master")
        today = self._live_day()
        cache_key = (underlying, expiry, today)
        found = self._chains.get(cache_key)
        if found is None:
            found = self._chains[cache_key] = chains.chain(master, underlying, expiry, today)
        followed = self._followed.get((found.underlying, found.expiry))
        if followed is None:
            self._follow_chain(master, found, strikes)
        elif followed.strikes is not None and (strikes is None or strikes > followed.strikes):
            followed.strikes = strikes
            followed.low = followed.high = 0.0  # widen at the next placement
            self._place_window(followed)
        return found

    def spot_key(self, chain: Chain) -> str:
        """``segment|token`` of the chain's underlying in the cash market (``nse_cm|Nifty 50``),
        "" when the master has no such row."""
        followed = self._followed.get((chain.underlying, chain.expiry))
        if followed is not None:
            return followed.spot_key
        master = self.ctx.master
        spot = chains.spot_instrument(master, chain.underlying) if master is not None else None
        return spot.key if spot is not None else ""

    def subscribe(self, *instruments: InstrumentRef) -> None:
        """Add instruments (symbols, keys, ticks or ``Instrument``s) to this instance's feed
        subscriptions; their ticks then reach ``on_tick``."""
        for ref in instruments:
            inst = ref if isinstance(ref, Instrument) else self._instrument(self.key_of(ref))
            if inst is not None:
                self._want(inst)

    def price_offset(
        self, instrument: InstrumentRef, base: float, pct: float, mode: str = "nearest"
    ) -> Decimal:
        """``base x (1 + pct/100)`` snapped to the instrument's tick size (``mode``:
        nearest, up, down). Handy for stops and targets in percent."""
        return snap(base * (1.0 + pct / 100.0), _tick_size_of(self.ctx.master, self.key_of(instrument)), mode)

    # ================================================================== host API
    # The host (live service, backtest) calls these; strategies do not.
    @classmethod
    def parse_params(cls, raw: StrategyParams | dict[str, Any] | None) -> StrategyParams:
        """Validate ``raw`` into ``cls.Params``; ``ParamsError`` names the bad key."""
        if isinstance(raw, cls.Params):
            return raw
        try:
            return msgspec.convert(raw or {}, cls.Params, strict=False)
        except msgspec.ValidationError as exc:
            raise ParamsError(f"strategy {cls.name or cls.__name__}: params: {exc}") from None

    def dispatch_start(self) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """Resolve instruments and run ``on_start``. A failure here always stops the instance."""
        master = self.ctx.master
        if master is not None:
            self.instruments = [master.resolve(name) for name in self.ctx.instruments]
        self._bar_start_ns = self.ctx.clock.now_ns()
        try:
            self.on_start()
        except Exception as exc:  # noqa: BLE001 - a strategy bug must never kill its host
            self._outbox.clear()
            self._failed("on_start", exc, force_stop=True)
            return _EMPTY
        return self._commit()

    def dispatch_tick(
        self, tick: Tick, key: str | None = None
    ) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """Book the tick, build bars, run ``on_bar``/``on_tick``; return the orders to send.
        ``key`` (``segment|token``) may be passed when the host already has it."""
        if self.halted:
            return _EMPTY
        if key is None:
            key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
        self.last[key] = tick
        if self._spot_chains and key in self._spot_chains:
            self._recentre(key, tick.ltp)
        pos = self.positions.get(key)
        if pos is not None:
            pos.last_price = tick.ltp
        try:
            if self._wants_bars:
                agg = self._bars.get(key)
                if agg is None:
                    agg = self._bars[key] = BarAggregator(
                        key, self._bar_interval, start_ns=self._bar_start_ns, fill_gaps=self.bar_fill_gaps
                    )
                bars = agg.update_tick(tick)
                if bars:
                    for bar in bars:
                        self.on_bar(bar)
            self.on_tick(tick)
        except Exception as exc:  # noqa: BLE001 - a strategy bug must never kill its host
            self._outbox.clear()
            self._failed("on_tick", exc)
            return _EMPTY
        if self._outbox:
            return self._commit()
        return _EMPTY

    def dispatch_timer(self, now_ns: int) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """Periodic housekeeping: close bars whose time has passed, release orders whose risk
        reply never came (after ``UNCONFIRMED_TTL_S``)."""
        if self.unconfirmed:
            for rid, deadline in list(self.unconfirmed.items()):
                if now_ns >= deadline:
                    del self.unconfirmed[rid]
                    self._exit_ids.discard(rid)
                    if self.pending.pop(rid, None) is not None:
                        self._refresh_busy()
                        self.log.warning("order_unconfirmed_released", strategy_id=self.id, request_id=rid)
        if self.halted or not self._wants_bars:
            return _EMPTY
        return self._guarded("on_bar", lambda: self._flush_bars(now_ns - BAR_FLUSH_GRACE_NS))

    def dispatch_verdict(
        self, request: OrderRequest, verdict: RiskVerdict | Exception
    ) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """Risk's answer (or the transport error) for ``request``."""
        rid = request.request_id
        if isinstance(verdict, Exception):
            if rid in self.pending:
                # The order may or may not have reached execution: keep blocking re-entry until
                # execution reports it or the TTL passes.
                self.unconfirmed[rid] = self.ctx.clock.now_ns() + int(UNCONFIRMED_TTL_S * 1e9)
            self.log.warning("order_request_failed", strategy_id=self.id, request_id=rid, error=str(verdict))
            return _EMPTY
        key = _req_key(request)
        if verdict.approved:
            if self._backoff:
                self._backoff.pop(key, None)
            return _EMPTY
        if request.purpose == "ENTRY" and self.reject_backoff_s > 0:
            delay = min(self._backoff[key][1] * 2, 60.0) if key in self._backoff else self.reject_backoff_s
            self._backoff[key] = (self.ctx.clock.now_ns() + int(delay * 1e9), delay)
        self.pending.pop(rid, None)
        self.unconfirmed.pop(rid, None)
        self._exit_ids.discard(rid)
        self._refresh_busy()
        return self._guarded("on_reject", lambda: self.on_reject(request, verdict.reason))

    def dispatch_order(self, update: OrderUpdate) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """An ``OrderUpdate`` for this strategy: track open orders and reconcile fills."""
        self.pending.pop(update.request_id, None)
        self.unconfirmed.pop(update.request_id, None)
        oid = update.order_id
        if update.status in TERMINAL_STATES:
            self.open_orders.pop(oid, None)
            self._exit_ids.discard(update.request_id)
        else:
            self.open_orders[oid] = update
        self._refresh_busy()
        if update.filled_qty > self._known_qty.get(oid, 0):
            self._known_qty[oid] = update.filled_qty
            price = float(update.avg_price) if update.avg_price is not None else 0.0
            self._book(oid, instrument_key(update.segment, update.token), update.symbol, update.side, price)
        return self._guarded("on_order", lambda: self.on_order(update))

    def has_fill(self, fill_id: str) -> bool:
        """True when this fill was booked already (``dispatch_fill`` ignores a repeat)."""
        return fill_id in self._fill_ids

    def dispatch_fill(self, fill: Fill) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """A ``Fill`` for this strategy: book it into the position, then ``on_fill``."""
        if fill.fill_id in self._fill_ids:
            return _EMPTY
        self._fill_ids.add(fill.fill_id)
        oid = fill.order_id
        self._fill_qty[oid] = self._fill_qty.get(oid, 0) + fill.quantity
        self._book(oid, instrument_key(fill.segment, fill.token), fill.symbol, fill.side, float(fill.price))
        return self._guarded("on_fill", lambda: self.on_fill(fill))

    def dispatch_stop(self) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        """Run ``on_stop`` (isolated)."""
        try:
            self.on_stop()
        except Exception as exc:  # noqa: BLE001 - a strategy bug must never kill its host
            self._outbox.clear()
            self._failed("on_stop", exc)
            return _EMPTY
        return self._commit()

    def restore(self, positions: Iterable[Position]) -> None:
        """Adopt positions reported by execution (after a restart) so the instance never
        re-enters what it already holds."""
        for p in positions:
            if p.strategy_id and p.strategy_id != self.id:
                continue
            key = instrument_key(p.segment, p.token)
            pos = self.positions.get(key) or FloatPositionState(self.id, p.segment, p.token, p.symbol)
            pos.quantity = p.quantity
            pos.avg_price = float(p.avg_price)
            pos.realised = float(p.realised_pnl)
            self.positions[key] = pos

    def status(self) -> dict[str, Any]:
        """Small summary for heartbeats and reports."""
        return {
            "strategy_id": self.id,
            "strategy": self.name,
            "errors": self.errors,
            "halted": self.halted,
            "pending": len(self.pending),
            "open_orders": len(self.open_orders),
            "positions": {k: p.quantity for k, p in self.positions.items() if p.quantity},
        }

    # ================================================================== internals
    def _live_day(self) -> dt.date:
        """The first day whose expiries still trade: the clock's IST date, or the next day from
        15:30 IST (an expiry day's contracts stop trading at the close, so ``"weekly"`` is then
        the next expiry)."""
        today = self._trading_day()
        assert self._day is not None
        if self.ctx.clock.now_ns() - self._day[1] >= _EXPIRY_CLOSE_NS:
            return today + dt.timedelta(days=1)
        return today

    def _trading_day(self) -> dt.date:
        """The clock's date in IST, recomputed only when the clock leaves the cached day."""
        now = self.ctx.clock.now_ns()
        day = self._day
        if day is None or not day[1] <= now < day[2]:
            today = dt.datetime.fromtimestamp(now // NS, IST).date()
            start = int(dt.datetime(today.year, today.month, today.day, tzinfo=IST).timestamp()) * NS
            day = self._day = (today, start, start + 86_400 * NS)
        return day[0]

    def _instrument(self, key: str) -> Instrument | None:
        master = self.ctx.master
        return master.by_key.get(key) if master is not None else None

    def _want(self, inst: Instrument) -> None:
        key = inst.key
        if key in self._subscribed or any(i.key == key for i in self.instruments):
            return
        self._subscribed[key] = inst
        self.new_subscriptions.append(inst)

    def _follow_chain(self, master: MasterData, chain: Chain, strikes: int | None) -> None:
        spot = chains.spot_instrument(master, chain.underlying)
        followed = _FollowedChain(chain, strikes, spot)
        self._followed[(chain.underlying, chain.expiry)] = followed
        if spot is None:
            # No index row to centre on: the middle of the listed strikes, for good.
            followed.ref_price = float(chain.strikes[len(chain.strikes) // 2])
            self._place_window(followed)
            return
        self._want(spot)
        self._spot_chains.setdefault(spot.key, []).append(followed)
        self._place_window(followed)

    def _recentre(self, spot_key: str, ltp: float) -> None:
        for followed in self._spot_chains[spot_key]:
            if not followed.low < ltp <= followed.high:
                self._place_window(followed, ltp)

    def _place_window(self, followed: _FollowedChain, spot: float | None = None) -> None:
        """Subscribe the chain's strikes around ``spot`` (default: the index's last price, else
        the master's reference price; none yet: wait for the first tick) and note the band of
        spot prices over which ATM, and so the window, stays the same."""
        chain = followed.chain
        if followed.strikes is None:
            followed.low, followed.high = float("-inf"), float("inf")
            for inst in chain.instruments():
                self._want(inst)
            return
        if spot is None:
            last = self.last.get(followed.spot_key)
            spot = last.ltp if last is not None else followed.ref_price
            if spot <= 0:
                return
        atm = chain.atm(spot)
        i = chain.strikes.index(atm)
        # ATM(spot) = atm for (below + atm) / 2 < spot <= (atm + above) / 2 (a tie goes lower).
        followed.low = float((chain.strikes[i - 1] + atm) / 2) if i > 0 else float("-inf")
        last_i = len(chain.strikes) - 1
        followed.high = float((atm + chain.strikes[i + 1]) / 2) if i < last_i else float("inf")
        for inst in chain.instruments(chain.near(atm, followed.strikes)):
            self._want(inst)

    def _book(self, oid: str, key: str, symbol: str, side: str, price: float) -> None:
        """Book whatever part of ``oid``'s fills is not in the position yet. Fills and order
        updates may arrive in either order; the position follows the larger of the two."""
        target = max(self._fill_qty.get(oid, 0), self._known_qty.get(oid, 0))
        delta = target - self._applied_qty.get(oid, 0)
        if delta <= 0 or price <= 0:
            return
        self._applied_qty[oid] = target
        pos = self.positions.get(key)
        if pos is None:
            segment, token = split_key(key)
            pos = self.positions[key] = FloatPositionState(self.id, segment, token, symbol)
            last = self.last.get(key)
            pos.last_price = last.ltp if last is not None else price
        pos.apply(side, delta, price)

    def _entry(  # noqa: PLR0917 - the helpers' arguments, passed through
        self,
        side: str,
        instrument: InstrumentRef,
        quantity: int | None,
        price: float | Decimal | None,
        stop_loss: float | Decimal | None,
        target: float | Decimal | None,
        sizing: Sizing | None,
        product: str,
        *,
        trail: tuple[float | Decimal | None, float | Decimal | None] = (None, None),
    ) -> OrderRequest | None:
        key = self.key_of(instrument)
        if self.position(key) != 0 or self.has_orders(key):
            return None
        if self._backoff:
            backoff = self._backoff.get(key)
            if backoff is not None and self.ctx.clock.now_ns() < backoff[0]:
                return None
        if quantity is None:
            quantity = 0 if sizing is not None else int(getattr(self.params, "quantity", 0))
        if quantity < 0 or (quantity == 0 and sizing is None):
            raise ValueError(f"{side.lower()} needs a positive quantity or sizing, got {quantity}")
        return self._build(
            side, key, quantity, price, stop_loss, target, sizing, product, reduce_only=False,
            purpose="ENTRY", trail=trail,
        )

    def _build(  # noqa: PLR0917 - every field of the request
        self,
        side: str,
        key: str,
        quantity: int,
        price: float | Decimal | None,
        stop_loss: float | Decimal | None,
        target: float | Decimal | None,
        sizing: Sizing | None,
        product: str,
        *,
        reduce_only: bool,
        purpose: str,
        trail: tuple[float | Decimal | None, float | Decimal | None] = (None, None),
    ) -> OrderRequest:
        segment, token = split_key(key)
        tick_size = _tick_size_of(self.ctx.master, key)
        buy = side == "BUY"
        req = OrderRequest(
            request_id=self.ctx.new_request_id(),
            strategy_id=self.id,
            side=side,
            quantity=quantity,
            symbol=_symbol_of(self.ctx.master, self.last.get(key), key),
            segment=segment,
            token=token,
            price=_request_price(price, tick_size, "nearest"),
            stop_loss=_request_price(stop_loss, tick_size, "down" if buy else "up"),
            target=_request_price(target, tick_size, "up" if buy else "down"),
            product=product,
            sizing=sizing,
            reduce_only=reduce_only,
            purpose=purpose,
            trail_points=_distance(trail[0]),
            trail_pct=_distance(trail[1]),
            ts_ns=self.ctx.clock.now_ns(),
        )
        # Queue only a complete request: nothing half-built can leave the strategy.
        self._outbox.append(req)
        return req

    def _commit(self) -> list[OrderRequest]:
        out = self._outbox
        self._outbox = []
        for req in out:
            self.pending[req.request_id] = req
        self._refresh_busy()
        if self._basket_legs:  # basket legs leave as their basket, not as orders
            legs, self._basket_legs = self._basket_legs, {}
            for b in {legs[r.request_id].request_id: legs[r.request_id] for r in out
                      if r.request_id in legs}.values():  # fmt: skip
                self.new_baskets.append(b)
            out = [r for r in out if r.request_id not in legs]
        return out

    def _refresh_busy(self) -> None:
        """The orders in flight or open changed: ``has_orders`` rebuilds the busy set when it
        is next asked (an order event costs nothing until then)."""
        self._busy_stale = True

    def _rebuild_busy(self) -> None:
        busy = {f"{r.segment}|{r.token}" for r in self.pending.values()}  # instrument_key, inlined
        busy.update(f"{u.segment}|{u.token}" for u in self.open_orders.values())
        self._busy = busy
        self._busy_stale = False

    def _guarded(self, hook: str, fn: Callable[[], Any]) -> list[OrderRequest] | tuple[OrderRequest, ...]:
        if self.halted:
            return _EMPTY
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a strategy bug must never kill its host
            self._outbox.clear()
            self._failed(hook, exc)
            return _EMPTY
        return self._commit() if self._outbox else _EMPTY

    def _flush_bars(self, now_ns: int) -> None:
        for agg in self._bars.values():
            bars = agg.flush(now_ns)
            if bars:
                for bar in bars:
                    self.on_bar(bar)

    def _failed(self, hook: str, exc: Exception, force_stop: bool = False) -> None:
        """Count a hook failure and log it: the first of each hook and exception type with
        its traceback, repeats as one line with the running count at most every
        ``ERROR_REPEAT_S`` (a hook raising on every tick must not flood the console)."""
        self.errors += 1
        n = self.errors
        stop = force_stop or self.ctx.on_error == "stop"
        if stop:
            self.halted = f"strategy {self.id} stopped: {hook} raised {type(exc).__name__}: {exc}"
        kind = (hook, type(exc).__name__)
        first = kind not in self._error_kinds
        now = self.ctx.clock.monotonic()
        if not (stop or first or now - self._error_logged_at >= ERROR_REPEAT_S):
            self._errors_unlogged += 1
            return
        self._error_kinds.add(kind)
        self._error_logged_at = now
        repeated, self._errors_unlogged = self._errors_unlogged, 0
        self.log.error(
            "strategy_hook_failed",
            strategy_id=self.id,
            hook=hook,
            errors=n,
            error=f"{type(exc).__name__}: {exc}",
            action="stop" if stop else "continue",
            **({"exc_info": exc} if first else {"repeated": repeated}),
        )


# ------------------------------------------------------------------ request building helpers


def _request_price(value: float | Decimal | None, tick_size: Decimal, mode: str) -> Decimal | None:
    """A strategy's float price on the tick (``mode`` rounds toward safety); a Decimal as given."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    if tick_size > 0:
        return snap(value, tick_size, mode)
    return to_decimal(round(value, 2))


def _distance(value: float | Decimal | None) -> Decimal | None:
    """A trail distance (rupees or percent) as a Decimal, to the paisa."""
    if value is None or isinstance(value, Decimal):
        return value
    return to_decimal(round(value, 2))


def _tick_size_of(master: MasterData | None, key: str) -> Decimal:
    inst = master.by_key.get(key) if master is not None else None
    return inst.tick_size if inst is not None else Decimal("0.05")


def _symbol_of(master: MasterData | None, last: Tick | None, key: str) -> str:
    inst = master.by_key.get(key) if master is not None else None
    if inst is not None:
        return inst.symbol
    return last.symbol if last is not None else ""


def _req_key(req: OrderRequest) -> str:
    return f"{req.segment}|{req.token}"  # instrument_key, inlined: hot path
