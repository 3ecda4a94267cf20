"""Every message that crosses the NeoPulse bus.

All wire types are frozen ``msgspec.Struct`` classes in one tagged union (``kind`` names
the class). New fields must get defaults so that older readers keep working. Each message
carries ``ts_ns``, its creation time in nanoseconds since the epoch.

Money that reaches an order, the broker or the ledger is ``Decimal``; ticks carry floats
for speed. Quantities are ints in shares (not lots). Sides are ``BUY``/``SELL``.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, Literal

import msgspec

Side = Literal["BUY", "SELL"]
OrderType = Literal["LIMIT", "MARKET", "SL", "SL-M"]
Product = Literal["MIS", "CNC", "NRML"]

# Order states, in lifecycle order (DESIGN §6).
PENDING_BROKER = "PENDING_BROKER"
ACK = "ACK"
OPEN = "OPEN"
PARTIAL = "PARTIAL"
COMPLETE = "COMPLETE"
REJECTED = "REJECTED"
CANCELLED = "CANCELLED"
UNKNOWN = "UNKNOWN"
TERMINAL_STATES = frozenset({COMPLETE, REJECTED, CANCELLED})

# Risk states (DESIGN §7).
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
    state: str = "ok"
    info: dict[str, Any] = msgspec.field(default_factory=dict)
    ts_ns: int = msgspec.field(default_factory=_now)


# --------------------------------------------------------------------------- orders


class Sizing(msgspec.Struct, frozen=True, kw_only=True):
    """Ask risk to size the order: risk ``risk_pct`` % of ``capital`` between entry and stop."""

    capital: Decimal
    risk_pct: Decimal


class OrderRequest(_Msg, frozen=True, tag=True):
    """A strategy's (or the CLI's) wish to trade; risk answers with a ``RiskVerdict``.

    ``price`` None means market intent: execution turns it into a protected LIMIT.
    ``symbol`` or ``segment``+``token`` names the instrument.
    """

    request_id: str
    strategy_id: str
    side: str
    quantity: int = 0
    symbol: str = ""
    segment: str = ""
    token: str = ""
    price: Decimal | None = None
    order_type: str = "LIMIT"
    trigger_price: Decimal | None = None
    stop_loss: Decimal | None = None
    target: Decimal | None = None
    product: str = "MIS"
    sizing: Sizing | None = None
    reduce_only: bool = False
    purpose: str = "ENTRY"  # ENTRY | EXIT | FLATTEN | MANUAL
    ts_ns: int = msgspec.field(default_factory=_now)


class RiskVerdict(_Msg, frozen=True, tag=True):
    """Risk's answer to an ``OrderRequest``. A denial carries the reason in trader's words."""

    request_id: str
    approved: bool
    reason: str = ""
    order_id: str = ""
    quantity: int = 0
    state: str = ACTIVE
    ts_ns: int = msgspec.field(default_factory=_now)


class ExecuteOrder(_Msg, frozen=True, tag=True):
    """An order that risk approved, sent to execution. Idempotent on ``request_id``."""

    request_id: str
    order: OrderRequest
    quantity: int
    segment: str
    token: str
    symbol: str
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
    reason: str = ""
    source: str = "cli"
    request_id: str = ""
    ts_ns: int = msgspec.field(default_factory=_now)


class Flatten(_Msg, frozen=True, tag=True):
    """Cancel open orders and close every position, or the one named."""

    request_id: str
    symbol: str = ""
    strategy_id: str = ""
    source: str = "cli"
    ts_ns: int = msgspec.field(default_factory=_now)


class CancelEntries(_Msg, frozen=True, tag=True):
    """Kill-switch hook: execution cancels every open entry order."""

    request_id: str
    reason: str = ""
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


class GetFeedSession(_Msg, frozen=True, tag=True):
    requester: str = "feed"
    ts_ns: int = msgspec.field(default_factory=_now)


class RecordRiskEvent(_Msg, frozen=True, tag=True):
    """Risk asks execution to write a ``risk_events`` row."""

    event: str
    reason: str
    source: str = "risk"
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    request_id: str = ""
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
    | GetFeedSession
    | RecordRiskEvent
    | Reply
)

ALL_TYPES: tuple[type[_Msg], ...] = (
    Tick, FeedStatus, Heartbeat, OrderRequest, RiskVerdict, ExecuteOrder, OrderUpdate, Fill,
    Position, DayState, RiskState, Alert, KillSwitch, Flatten, CancelEntries, GetStatus,
    GetOrders, GetPositions, GetDayState, GetRiskState, Subscribe, GetLastTicks, SyncMaster,
    GetFeedSession, RecordRiskEvent, Reply,
)


class Codec:
    """msgpack encoder/decoder pair for the whole union. Build one per socket and reuse it."""

    __slots__ = ("decode", "encode")

    def __init__(self) -> None:
        enc = msgspec.msgpack.Encoder(decimal_format="string")
        dec: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
        self.encode = enc.encode
        self.decode = dec.decode


def to_builtins(msg: Any) -> Any:
    """Plain JSON-friendly values (Decimals as strings) for printing and ``--json``."""
    return msgspec.to_builtins(msg)  # Decimal → str is msgspec's default
