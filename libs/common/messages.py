"""Every message that crosses the NeoPulse bus.

All wire types are frozen ``msgspec.Struct`` classes in one tagged union (``kind`` names
the class). New fields must get defaults so that older readers keep working. Each message
carries ``ts_ns``, its creation time in nanoseconds since the epoch.

Money that reaches an order, the broker or the ledger is ``Decimal``; ticks carry floats
for speed. Quantities are ints in shares (not lots). Sides are ``BUY``/``SELL``.

The requests that change state (``OrderRequest``, ``ExecuteOrder``, ``KillSwitch``,
``Flatten``, ``CancelEntries``, ``RecordRiskEvent``) are checked where they enter: the
decoder refuses, with a ``msgspec.ValidationError`` naming the field, a side, order type,
product, purpose or risk event outside its closed set (the vocabularies below); an id
that is not short printable ASCII (``STRATEGY_ID_PATTERN`` for strategy ids, which also
name bus topics and files); a quantity outside 0..``MAX_QTY``; a price that is not
finite, above 0 and at most ``MAX_PRICE``; free text longer than ``MAX_TEXT`` or holding a
control character (NUL breaks PostgreSQL ``jsonb``). A message built in-process is not
checked (msgspec checks on decode only): risk repeats the checks that matter and gives its
reason.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import Meta

# --------------------------------------------------------------------------- vocabularies
# Every closed set of words in NeoPulse, defined once. A member IS its text: it compares and
# hashes equal to the plain string, and msgpack, JSON, ``to_builtins``, SQL, f-strings and
# ``repr`` (so log lines) all show the text. Code that holds a plain ``str`` keeps working.


class Vocabulary(StrEnum):
    """Base of the closed sets below: a ``StrEnum`` whose ``repr`` is its text's."""

    def __repr__(self) -> str:
        return repr(self.value)


class Side(Vocabulary):
    BUY = "BUY"
    SELL = "SELL"


class OrderType(Vocabulary):
    LIMIT = "LIMIT"
    MARKET = "MARKET"
    SL = "SL"  # stop-limit
    SL_M = "SL-M"  # stop-market


class Product(Vocabulary):
    MIS = "MIS"  # intraday
    CNC = "CNC"  # delivery
    NRML = "NRML"  # carry-forward derivatives


class Purpose(Vocabulary):
    """What an order is for. ENTRY/EXIT/FLATTEN/MANUAL come from requests; STOP and TARGET
    are the legs execution places for an OCO bracket."""

    ENTRY = "ENTRY"
    EXIT = "EXIT"
    FLATTEN = "FLATTEN"
    MANUAL = "MANUAL"
    STOP = "STOP"
    TARGET = "TARGET"


REQUEST_PURPOSES: frozenset[str] = frozenset({Purpose.ENTRY, Purpose.EXIT, Purpose.FLATTEN, Purpose.MANUAL})
LEG_PURPOSES: frozenset[str] = frozenset({Purpose.STOP, Purpose.TARGET})


class OrderStatus(Vocabulary):
    """Order states, in lifecycle order; ``TERMINAL_STATES`` are final."""

    PENDING_BROKER = "PENDING_BROKER"
    ACK = "ACK"
    OPEN = "OPEN"
    PARTIAL = "PARTIAL"
    COMPLETE = "COMPLETE"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"


class BracketState(Vocabulary):
    PENDING_ENTRY = "PENDING_ENTRY"  # waiting for the entry to fill
    ACTIVE = "ACTIVE"  # position open, legs protecting it
    CLOSED = "CLOSED"  # position closed by a leg (or nothing left to protect)
    CANCELLED = "CANCELLED"  # entry ended without a fill
    FLATTENED = "FLATTENED"  # flatten took over: legs cancelled, position closed by flatten


class BasketState(Vocabulary):
    """A basket's progress at execution: protective long legs first, then the short legs;
    a leg that fails turns it into a rollback."""

    PLACING_LONGS = "PLACING_LONGS"  # long (BUY) legs sent; short legs held until every long is acked
    PLACED = "PLACED"  # every leg released to the broker; open until every leg has ended
    COMPLETE = "COMPLETE"  # every leg ended without a rejection
    ROLLING_BACK = "ROLLING_BACK"  # a leg failed: working legs cancelled, filled legs being closed
    FAILED = "FAILED"  # a leg failed and the rollback is done (or rollback is off)


BASKET_OPEN: frozenset[str] = frozenset(
    {BasketState.PLACING_LONGS, BasketState.PLACED, BasketState.ROLLING_BACK})
BASKET_MIN_LEGS = 2
BASKET_MAX_LEGS = 4


class FlattenPhase(Vocabulary):
    """A flatten job's progress: cancel → close → ready → done."""

    CANCEL = "cancel"  # cancelling open orders
    CLOSE = "close"  # closing orders placed, some still in flight
    READY = "ready"  # every close placed: waiting for them to end
    DONE = "done"


class RiskEvent(Vocabulary):
    """The kinds of ``risk_events`` row risk (or the CLI) asks execution to write."""

    KILL_SWITCH_ON = "kill_switch_on"
    KILL_SWITCH_OFF = "kill_switch_off"
    LOSS_BREACHED = "loss_breached"
    SQUARE_OFF = "square_off"  # execution squared off a strategy's intraday position at square_off_at
    STRATEGY_STOPPED = "strategy_stopped"  # a strategy's MTM crossed its max_loss or target_profit


class FeedSource(Vocabulary):
    """``feed.source``: where ticks come from."""

    SIM = "sim"
    REPLAY = "replay"
    KOTAK = "kotak"


class BrokerName(Vocabulary):
    """``execution.broker``: where orders go."""

    PAPER = "paper"
    KOTAK = "kotak"


def choices(closed: Iterable[str]) -> str:
    """``"sim, replay or kotak"``: the words of a closed set, for an error message."""
    words = list(closed)
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


def _one_of(closed: Iterable[str]) -> str:
    """The pattern of a ``str`` field the decoder accepts only from ``closed`` (in order).

    The fields stay typed ``str``, not the enum: a decoded value stays a plain ``str``, a
    caller holding a ``str`` needs no cast, and ``omit_defaults`` (which compares by
    identity) drops exactly the same fields as before, so the wire and ``to_builtins`` do not
    change. The refusal names the allowed words (``Expected `str` matching regex
    '^(?:BUY|SELL)\\Z' - at `$.side```)."""
    return "^(?:" + "|".join(re.escape(v) for v in closed) + r")\Z"


SideField = Annotated[str, Meta(pattern=_one_of(Side))]
OrderTypeField = Annotated[str, Meta(pattern=_one_of(OrderType))]
ProductField = Annotated[str, Meta(pattern=_one_of(Product))]
OptionalProductField = Annotated[str, Meta(pattern=_one_of(["", *Product]))]
PurposeField = Annotated[str, Meta(pattern=_one_of(p for p in Purpose if p in REQUEST_PURPOSES))]
RiskEventField = Annotated[str, Meta(pattern=_one_of(RiskEvent))]

# Wire limits (decode-time constraints of the requests that change state).
MAX_QTY = 10_000_000  # shares in one request
MAX_PRICE = Decimal(10_000_000)  # rupees; also the cap for trigger, stop loss and target
MAX_CAPITAL = Decimal(10) ** 12  # sizing capital
MAX_TEXT = 500  # characters of a reason
STRATEGY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z"  # also libs.common.config's rule
_ID = r"[A-Za-z0-9][A-Za-z0-9_.:#-]{0,63}"
# a basket's id leaves room for the ``:legN`` suffix of its legs' ids
BasketId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:#-]{0,58}\Z")]
# ``\Z``, not ``$``: ``$`` also matches before a trailing newline.
RequestId = Annotated[str, Meta(pattern=rf"^{_ID}\Z")]
OptionalRequestId = Annotated[str, Meta(pattern=rf"^(?:{_ID})?\Z")]
StrategyId = Annotated[str, Meta(pattern=STRATEGY_ID_PATTERN)]
OptionalStrategyId = Annotated[str, Meta(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,31})?\Z")]
# Symbols and tokens may hold spaces and ``&`` ("Nifty 50", "M&M-EQ"): printable ASCII.
Name = Annotated[str, Meta(max_length=64, pattern=r"^[\x20-\x7e]*\Z")]
Segment = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{0,16}\Z")]
Source = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{0,32}\Z")]
Text = Annotated[str, Meta(max_length=MAX_TEXT, pattern=r"^[^\x00-\x1f\x7f-\x9f]*\Z")]
Quantity = Annotated[int, Meta(ge=0, le=MAX_QTY)]  # 0 is allowed: risk sizes the order
PositiveQuantity = Annotated[int, Meta(gt=0, le=MAX_QTY)]

# Order states by the names importers use (typed ``str``, as they were, so code that mixes
# them with plain strings needs no change), and the one definition of "terminal".
PENDING_BROKER: str = OrderStatus.PENDING_BROKER
ACK: str = OrderStatus.ACK
OPEN: str = OrderStatus.OPEN
PARTIAL: str = OrderStatus.PARTIAL
COMPLETE: str = OrderStatus.COMPLETE
REJECTED: str = OrderStatus.REJECTED
CANCELLED: str = OrderStatus.CANCELLED
UNKNOWN: str = OrderStatus.UNKNOWN
TERMINAL_STATES: frozenset[str] = frozenset({COMPLETE, REJECTED, CANCELLED})

# Risk states: ACTIVE trades, REDUCING only reduces, HALTED (kill switch) nothing.
ACTIVE = "ACTIVE"
REDUCING = "REDUCING"
HALTED = "HALTED"


def _now() -> int:
    return time.time_ns()


class _Msg(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True, omit_defaults=True):
    """Base of every wire type: frozen, tagged by class name, keyword-only."""


# --------------------------------------------------------------------------- market data


class Tick(_Msg, frozen=True, tag=True):
    """One market-data update for an instrument (``segment|token``)."""

    segment: str
    token: str
    ltp: float
    volume: int = 0
    last_qty: int = 0
    bid: float = 0.0
    ask: float = 0.0
    bid_qty: int = 0
    ask_qty: int = 0
    open: float = 0.0
    high: float = 0.0
    low: float = 0.0
    close: float = 0.0  # previous close, for change %
    oi: int = 0
    exch_ts_ns: int = 0
    symbol: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class FeedStatus(_Msg, frozen=True, tag=True):
    """The feed's connection state: CONNECTING, LIVE, STALE, RECONNECTING, DOWN."""

    state: str
    source: str = ""
    detail: str = ""
    reconnects: int = 0
    subscribed: int = 0
    ts_ns: int = msgspec.field(default_factory=_now)


class Heartbeat(_Msg, frozen=True, tag=True):
    """Published every second by every service."""

    service: str
    pid: int
    started_ns: int = 0
    state: str = "ok"  # "ok", or "degraded" (running but unable to do its job; ``reason`` says why)
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    reason: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


# --------------------------------------------------------------------------- orders


class Sizing(msgspec.Struct, frozen=True, kw_only=True):
    """Ask risk to size the order: risk ``risk_pct`` % of ``capital`` between entry and stop."""

    capital: Decimal  # above 0, at most MAX_CAPITAL (checked on decode)
    risk_pct: Decimal  # above 0, at most 100


class OrderRequest(_Msg, frozen=True, tag=True):
    """A strategy's (or the CLI's) wish to trade; risk answers with a ``RiskVerdict``.

    ``price`` None means market intent: execution turns it into a protected LIMIT.
    ``symbol`` or ``segment``+``token`` names the instrument.
    """

    request_id: RequestId
    strategy_id: StrategyId
    side: SideField
    quantity: Quantity = 0
    symbol: Name = ""
    segment: Segment = ""
    token: Name = ""
    price: Decimal | None = None
    order_type: OrderTypeField = "LIMIT"
    trigger_price: Decimal | None = None
    stop_loss: Decimal | None = None
    target: Decimal | None = None
    # a trailing stop: the stop leg follows the best price since entry at this distance, in
    # rupees or in percent of that price (one of the two, with ``stop_loss`` to start from)
    trail_points: Decimal | None = None
    trail_pct: Decimal | None = None
    # the stop as a percent of the entry's average fill price (below it for a BUY, above it
    # for a SELL) instead of ``stop_loss``: risk judges it from the last price and sends that
    # estimate as ``stop_loss``; execution sets the real stop when the entry fills
    stop_loss_pct: Decimal | None = None
    product: ProductField = "MIS"
    sizing: Sizing | None = None
    reduce_only: bool = False
    purpose: PurposeField = "ENTRY"  # ENTRY | EXIT | FLATTEN | MANUAL
    ts_ns: int = msgspec.field(default_factory=_now)


class VerdictCode(Vocabulary):
    """Why risk refused an order (``RiskVerdict.code``): code that reacts to a refusal (the
    CLI, the notifier, tests) matches on this, never on the wording of ``reason``. The
    checks run in the order documented in ``services.risk.sentinel``."""

    NONE = ""  # approved
    STARTING = "starting"  # risk has not loaded the day from execution yet
    DUPLICATE = "duplicate"  # the request_id was already approved for another order
    HALTED = "halted"  # the kill switch is on
    FIELDS = "fields"  # side, product or order type not allowed (or SL without a trigger)
    INSTRUMENT = "instrument"  # none named, unknown, an index, or not tradable
    PRICE = "price"  # a price, trigger, stop loss or target not positive, finite and capped
    TICK = "tick"  # a price not on the instrument's tick size
    LAST_PRICE = "last_price"  # market intent, but no last traded price yet
    BRACKET = "bracket"  # stop loss or target on the wrong side of the entry, or a bad trail
    SIZING = "sizing"  # the order could not be sized to the risk budget
    QUANTITY = "quantity"  # quantity not above 0, or above max_qty
    LOT = "lot"  # quantity not a whole number of lots
    REDUCING = "reducing"  # daily loss limit breached: only reducing orders pass
    REDUCE_ONLY = "reduce_only"  # a reduce-only order that would open or add
    NOTIONAL = "notional"  # quantity x price above max_notional
    BASKET = "basket"  # a basket that is not 2 to 4 legs of one strategy, or a leg refused
    POSITIONS = "positions"  # a new instrument beyond max_open_positions
    THROTTLE = "throttle"  # max_orders_per_sec approvals already in the last second
    CONTRACT_EXPIRED = "contract_expired"  # the contract's expiry day is past: it no longer trades
    EXPIRY_CUTOFF = "expiry_cutoff"  # a new entry in a contract expiring today, after risk.expiry_day_cutoff
    LATE_ENTRY = "late_entry"  # a new entry at or after risk.no_new_entries_after
    MAX_ENTRIES = "max_entries"  # risk.max_entries_per_day entries already today (strategy, instrument)
    STRATEGY_STOPPED = "strategy_stopped"  # the strategy crossed its max_loss or target_profit today
    EXPIRED = "expired"  # execution did not answer in time: the order expires unplaced
    EXECUTION = "execution"  # execution refused the order or answered oddly: nothing placed
    UNAUTHORISED = "unauthorised"  # execution refused risk's credentials: nothing placed
    REFUSED = "refused"  # risk refused the request itself (unreadable or unsupported)


VerdictCodeField = Annotated[str, Meta(pattern=_one_of(VerdictCode))]


class RiskVerdict(_Msg, frozen=True, tag=True):
    """Risk's answer to an ``OrderRequest``. A denial carries the reason in trader's words
    and its ``code`` (``VerdictCode``; empty for an approval)."""

    request_id: str
    approved: bool
    reason: str = ""
    code: VerdictCodeField = ""  # a VerdictCode
    order_id: str = ""
    quantity: int = 0
    state: str = ACTIVE
    ts_ns: int = msgspec.field(default_factory=_now)


class ExecuteOrder(_Msg, frozen=True, tag=True):
    """An order that risk approved, sent to execution. Idempotent on ``request_id``.

    ``expires_ns`` (epoch ns; 0 = no deadline): execution refuses to place an order whose
    deadline passed before its ``PENDING_BROKER`` row was committed. Risk sets it to the
    send time plus the time it waits for execution, less a margin, so an order execution
    accepted is always answered before risk gives up and tells the strategy it expired
    unplaced.
    """

    request_id: RequestId
    order: OrderRequest
    quantity: PositiveQuantity
    segment: Segment
    token: Name
    symbol: Name
    expires_ns: Annotated[int, Meta(ge=0)] = 0
    ts_ns: int = msgspec.field(default_factory=_now)


def basket_leg_id(request_id: str, n: int) -> str:
    """The request id of leg ``n`` (1-based) of basket ``request_id``: derived, so stable
    across retries of the basket (execution is idempotent on it)."""
    return f"{request_id}:leg{n}"


def basket_of_leg(request_id: str) -> str:
    """The basket request id a leg's request id (``basket_leg_id``) names, or ""."""
    basket, sep, n = request_id.rpartition(":leg")
    return basket if sep and n.isdigit() else ""


class BasketRequest(_Msg, frozen=True, tag=True):
    """A strategy's (or the CLI's) multi-leg order: 2 to 4 legs judged and placed as one.
    Each leg is an ``OrderRequest`` of its own (its ``stop_loss``/``target`` become that
    leg's bracket); risk gives leg ``n`` the request id ``basket_leg_id(request_id, n)``
    and the basket's strategy id, whatever the leg carried."""

    request_id: BasketId
    strategy_id: StrategyId
    legs: Annotated[list[OrderRequest], Meta(max_length=BASKET_MAX_LEGS)]  # risk refuses fewer than 2
    # when one leg's stop loss fills, every other leg's stop moves to that leg's entry price
    move_sl_to_cost: bool = False
    ts_ns: int = msgspec.field(default_factory=_now)


class BasketVerdict(_Msg, frozen=True, tag=True):
    """Risk's answer to a ``BasketRequest``: approved only if every leg passed. ``legs`` has
    one ``RiskVerdict`` per leg (in the request's order, each with its reason and, once
    execution accepted the basket, its ``order_id``); ``reason`` names every failing leg."""

    request_id: str
    approved: bool
    reason: str = ""
    code: VerdictCodeField = ""
    legs: list[RiskVerdict] = msgspec.field(default_factory=list)
    basket_id: str = ""
    state: str = ACTIVE
    ts_ns: int = msgspec.field(default_factory=_now)


class ExecuteBasket(_Msg, frozen=True, tag=True):
    """Risk → execution: an approved basket. Every leg's row is committed before the broker
    sees any of them; long legs go first, short legs once every long is acked."""

    request_id: BasketId
    strategy_id: StrategyId
    legs: Annotated[list[ExecuteOrder], Meta(max_length=BASKET_MAX_LEGS)]  # leg ids checked by execution
    expires_ns: Annotated[int, Meta(ge=0)] = 0
    move_sl_to_cost: bool = False
    ts_ns: int = msgspec.field(default_factory=_now)


class OrderUpdate(_Msg, frozen=True, tag=True):
    """A ledger row changed state."""

    order_id: str
    request_id: str
    strategy_id: str
    client_tag: str
    symbol: str
    segment: str
    token: str
    side: str
    quantity: int
    status: str
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    order_type: str = "LIMIT"
    filled_qty: int = 0
    avg_price: Decimal | None = None
    broker_order_id: str = ""
    reason: str = ""
    parent_id: str = ""
    purpose: str = "ENTRY"
    ts_ns: int = msgspec.field(default_factory=_now)


class Fill(_Msg, frozen=True, tag=True):
    """A trade at the broker (one row of the trade book)."""

    fill_id: str
    order_id: str
    strategy_id: str
    symbol: str
    segment: str
    token: str
    side: str
    quantity: int
    price: Decimal
    ts_ns: int = msgspec.field(default_factory=_now)


class Position(_Msg, frozen=True, tag=True):
    """Net position of one strategy in one instrument (quantity signed: + long, - short)."""

    strategy_id: str
    symbol: str
    segment: str
    token: str
    quantity: int
    avg_price: Decimal
    realised_pnl: Decimal = Decimal(0)
    buy_qty: int = 0
    sell_qty: int = 0
    buy_value: Decimal = Decimal(0)
    sell_value: Decimal = Decimal(0)
    last_price: float = 0.0
    ts_ns: int = msgspec.field(default_factory=_now)


class EntryCount(_Msg, frozen=True):
    """How many entry orders a strategy sent in one instrument today (the ledger's count)."""

    strategy_id: str
    segment: str
    token: str
    count: int


class DayState(_Msg, frozen=True, tag=True):
    """Everything risk needs to rebuild its day after a restart."""

    trading_day: str
    positions: list[Position] = msgspec.field(default_factory=list)
    turnover: Decimal = Decimal(0)
    realised_pnl: Decimal = Decimal(0)
    fills: int = 0
    kill_switch: bool = False
    kill_reason: str = ""
    risk_state: str = ACTIVE
    loss_breached: bool = False
    entries: list[EntryCount] = msgspec.field(default_factory=list)
    stopped: dict[str, str] = msgspec.field(default_factory=dict)  # strategy id → why, today
    # Why the broker takes no orders from execution right now (Kotak refuses this IP, or no
    # login worked): risk is HALTED with it until it is "" again. Live, never recorded.
    broker_halt: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class RiskState(_Msg, frozen=True, tag=True):
    """Risk's view of the day: state, PnL after costs, kill switch."""

    state: str
    gross_pnl: float = 0.0
    realised_pnl: float = 0.0
    unrealised_pnl: float = 0.0
    cost: float = 0.0
    net_pnl: float = 0.0
    turnover: float = 0.0
    max_daily_loss: float = 0.0
    kill_switch: bool = False
    reason: str = ""
    open_positions: int = 0
    ts_ns: int = msgspec.field(default_factory=_now)


class Alert(_Msg, frozen=True, tag=True):
    """Something a human should hear about."""

    level: str  # INFO | WARNING | CRITICAL
    source: str
    text: str
    code: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


# --------------------------------------------------------------------------- admin requests


class KillSwitch(_Msg, frozen=True, tag=True):
    """Turn the kill switch on (HALTED) or off; ``query`` only asks for its state."""

    on: bool = False
    query: bool = False
    reason: Text = ""
    source: Source = "cli"
    request_id: OptionalRequestId = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class Flatten(_Msg, frozen=True, tag=True):
    """Cancel open orders and close every position, or the one named; with ``product``
    (``MIS``) only what is in that product (the intraday square-off)."""

    request_id: RequestId
    symbol: Name = ""
    strategy_id: OptionalStrategyId = ""
    product: OptionalProductField = ""
    source: Source = "cli"
    ts_ns: int = msgspec.field(default_factory=_now)


class CancelEntries(_Msg, frozen=True, tag=True):
    """Kill-switch hook: execution cancels every open entry order."""

    request_id: RequestId
    reason: Text = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class GetStatus(_Msg, frozen=True, tag=True):
    ts_ns: int = msgspec.field(default_factory=_now)


class GetOrders(_Msg, frozen=True, tag=True):
    status: str = ""
    symbol: str = ""
    strategy_id: str = ""
    limit: int = 200
    ts_ns: int = msgspec.field(default_factory=_now)


class GetPositions(_Msg, frozen=True, tag=True):
    strategy_id: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class GetDayState(_Msg, frozen=True, tag=True):
    ts_ns: int = msgspec.field(default_factory=_now)


class GetRiskState(_Msg, frozen=True, tag=True):
    ts_ns: int = msgspec.field(default_factory=_now)


class Subscribe(_Msg, frozen=True, tag=True):
    """Ask the feed for instruments, by trading symbol or as ``segment|token``."""

    instruments: list[str]
    requester: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class GetLastTicks(_Msg, frozen=True, tag=True):
    instruments: list[str] = msgspec.field(default_factory=list)
    ts_ns: int = msgspec.field(default_factory=_now)


class SyncMaster(_Msg, frozen=True, tag=True):
    request_id: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


HistoryInterval = Annotated[str, Meta(pattern=r"^(?:1min|5min|15min|60min|D)\Z")]
HistoryDate = Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}\Z")]


class FetchHistory(_Msg, frozen=True, tag=True):
    """The CLI asks execution for one chunk of Kotak candles (``historical_data()``): the IST
    days ``from_date..to_date`` (within Kotak's range limit) of ``instrument``
    (``segment|token``). The reply's ``data`` is ``{"candles": [[ts_ns, o, h, l, c, v, oi],
    ...]}``; ``code="rate_limited"`` carries ``{"retry_after_s": s}``."""

    request_id: RequestId
    instrument: Name
    interval: HistoryInterval
    from_date: HistoryDate
    to_date: HistoryDate
    ts_ns: int = msgspec.field(default_factory=_now)


class GetFeedSession(_Msg, frozen=True, tag=True):
    requester: str = "feed"
    ts_ns: int = msgspec.field(default_factory=_now)


class RecordRiskEvent(_Msg, frozen=True, tag=True):
    """Risk asks execution to write a ``risk_events`` row. ``data`` holds JSON values only
    (no NaN, no NUL, at most ``_MAX_DATA_ITEMS`` values), as the row stores it in ``jsonb``."""

    event: RiskEventField  # a RiskEvent
    reason: Text
    source: Source = "risk"
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    request_id: OptionalRequestId = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class Reply(_Msg, frozen=True, tag=True):
    """Generic answer to a request. ``data`` holds the result (msgpack-native values)."""

    ok: bool
    error: str = ""
    code: str = ""
    data: Any = None
    ts_ns: int = msgspec.field(default_factory=_now)


Message = (
    Tick
    | FeedStatus
    | Heartbeat
    | OrderRequest
    | RiskVerdict
    | ExecuteOrder
    | BasketRequest
    | BasketVerdict
    | ExecuteBasket
    | OrderUpdate
    | Fill
    | Position
    | DayState
    | RiskState
    | Alert
    | KillSwitch
    | Flatten
    | CancelEntries
    | GetStatus
    | GetOrders
    | GetPositions
    | GetDayState
    | GetRiskState
    | Subscribe
    | GetLastTicks
    | SyncMaster
    | FetchHistory
    | GetFeedSession
    | RecordRiskEvent
    | Reply
)

ALL_TYPES: tuple[type[_Msg], ...] = (
    Tick, FeedStatus, Heartbeat, OrderRequest, RiskVerdict, ExecuteOrder, OrderUpdate, Fill,
    Position, DayState, RiskState, Alert, KillSwitch, Flatten, CancelEntries, GetStatus,
    GetOrders, GetPositions, GetDayState, GetRiskState, Subscribe, GetLastTicks, SyncMaster,
    GetFeedSession, RecordRiskEvent, Reply, BasketRequest, BasketVerdict, ExecuteBasket,
    FetchHistory,
)


# --------------------------------------------------------------------------- decode-time checks
# msgspec cannot put bounds on a Decimal, nor look inside ``Any``: these run after decoding,
# only for the request types below (a tick pays one dict lookup), and raise the same
# ``msgspec.ValidationError`` as the declared constraints.

_MAX_DATA_ITEMS = 64
_MAX_DATA_DEPTH = 4
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


MAX_TRAIL_PCT = Decimal(50)  # a trail wider than half the price protects nothing
MAX_STOP_PCT = Decimal(500)  # a short option's stop at 6x its premium is about the widest anyone sets


def _check_money(label: str, value: Decimal | None, cap: Decimal) -> None:
    if value is None:
        return
    if not (value.is_finite() and 0 < value <= cap):
        raise msgspec.ValidationError(
            f"{label} must be a finite number above 0 and at most {cap}, got {value} - at `$.{label}`")


def _check_order_request(msg: Any, at: str = "") -> None:
    for name in ("price", "trigger_price", "stop_loss", "target", "trail_points"):
        _check_money(at + name, getattr(msg, name), MAX_PRICE)
    _check_money(at + "trail_pct", msg.trail_pct, MAX_TRAIL_PCT)
    _check_money(at + "stop_loss_pct", msg.stop_loss_pct, MAX_STOP_PCT)
    if msg.sizing is not None:
        _check_money(at + "sizing.capital", msg.sizing.capital, MAX_CAPITAL)
        _check_money(at + "sizing.risk_pct", msg.sizing.risk_pct, Decimal(100))


def _check_execute_order(msg: Any) -> None:
    _check_order_request(msg.order, "order.")
    if msg.order.request_id != msg.request_id:
        raise msgspec.ValidationError(
            f"order.request_id {msg.order.request_id} differs from request_id {msg.request_id}"
            " - at `$.order.request_id`")


def _check_basket_request(msg: Any) -> None:
    for n, leg in enumerate(msg.legs, 1):
        _check_order_request(leg, f"legs[{n - 1}].")


def _check_execute_basket(msg: Any) -> None:
    for leg in msg.legs:
        _check_execute_order(leg)


def _check_json(value: Any, at: str, budget: list[int], depth: int = 0) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DATA_DEPTH:
        raise msgspec.ValidationError(
            f"data is too large (at most {_MAX_DATA_ITEMS} values, {_MAX_DATA_DEPTH} levels) - at `{at}`")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise msgspec.ValidationError(f"data numbers must be finite, got {value} - at `{at}`")
    elif isinstance(value, str):
        if len(value) > MAX_TEXT or _CONTROL.search(value):
            raise msgspec.ValidationError(
                f"data text must be at most {MAX_TEXT} characters without control characters - at `{at}`")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{at}[{i}]", budget, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise msgspec.ValidationError(f"data keys must be text - at `{at}`")
            _check_json(key, f"{at}.{key[:32]}", budget, depth + 1)
            budget[0] += 1  # a key is not a value
            _check_json(item, f"{at}.{key[:32]}", budget, depth + 1)
    else:
        raise msgspec.ValidationError(f"data holds a {type(value).__name__}, not a JSON value - at `{at}`")


def _check_risk_event(msg: Any) -> None:
    _check_json(msg.data, "$.data", [_MAX_DATA_ITEMS + 1])


_DECODE_CHECKS: dict[type, Callable[[Any], None]] = {
    OrderRequest: _check_order_request,
    ExecuteOrder: _check_execute_order,
    BasketRequest: _check_basket_request,
    ExecuteBasket: _check_execute_basket,
    RecordRiskEvent: _check_risk_event,
}


class Codec:
    """msgpack encoder/decoder pair for the whole union. Build one per socket and reuse it.

    ``decode`` raises ``msgspec.ValidationError`` for a request that breaks the wire limits
    (see the module docstring); the bus server answers it with ``Reply(code="malformed")``.
    """

    __slots__ = ("decode", "encode")

    def __init__(self) -> None:
        enc = msgspec.msgpack.Encoder(decimal_format="string")
        dec: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
        raw = dec.decode
        checks = _DECODE_CHECKS.get

        def decode(buf: bytes | bytearray | memoryview) -> Message:
            msg = raw(buf)
            check = checks(msg.__class__)
            if check is not None:
                check(msg)
            return msg

        self.encode = enc.encode
        self.decode = decode


def to_builtins(msg: Any) -> Any:
    """Plain JSON-friendly values (Decimals as strings) for printing and ``--json``."""
    return msgspec.to_builtins(msg)  # Decimal → str is msgspec's default
