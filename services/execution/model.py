"""Rows of the execution ledger, as the engine and the stores see them (pure, no I/O).

Ids are strings (UUIDs as text); money is ``Decimal``; times are nanoseconds since the epoch
(the stores convert to ``timestamptz``); ``trading_day`` is the exchange date ``YYYY-MM-DD``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.common import messages
from libs.common.messages import (
    ACK,
    CANCELLED,
    COMPLETE,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    TERMINAL_STATES,
    UNKNOWN,
    BracketState,
    Purpose,
)

TERMINAL = TERMINAL_STATES  # defined once, in libs.common.messages

# Lifecycle order: a status never moves to a lower rank (terminal states are final).
RANK: dict[str, int] = {
    PENDING_BROKER: 0, UNKNOWN: 1, ACK: 2, OPEN: 3, PARTIAL: 4, COMPLETE: 5, REJECTED: 5, CANCELLED: 5,
}


def next_status(current: str, reported: str) -> str | None:
    """The status an order at ``current`` moves to when ``reported`` arrives, or None for no
    move: the same status, anything after a terminal state, or a lower rank (a late
    ``OPEN`` after ``PARTIAL``). Equal ranks other than terminal ones do not occur."""
    if current == reported or current in TERMINAL_STATES:
        return None
    if RANK[reported] < RANK[current]:
        return None
    return reported


# Purposes (``libs.common.messages.Purpose``): what an order is for. The aliases are typed
# ``str``, as they were, so code that mixes them with plain strings needs no change.
ENTRY: str = Purpose.ENTRY
EXIT: str = Purpose.EXIT
FLATTEN_P: str = Purpose.FLATTEN
MANUAL: str = Purpose.MANUAL
STOP: str = Purpose.STOP
TARGET: str = Purpose.TARGET
REQUEST_PURPOSES = messages.REQUEST_PURPOSES  # what a request may ask for
LEG_PURPOSES = messages.LEG_PURPOSES  # the legs execution places for an OCO bracket

# Bracket states (``libs.common.messages.BracketState``).
B_PENDING: str = BracketState.PENDING_ENTRY
B_ACTIVE: str = BracketState.ACTIVE
B_CLOSED: str = BracketState.CLOSED
B_CANCELLED: str = BracketState.CANCELLED
B_FLATTENED: str = BracketState.FLATTENED
BRACKET_OPEN: frozenset[str] = frozenset({B_PENDING, B_ACTIVE})

_B32 = "abcdefghijklmnopqrstuvwxyz234567"


# base32 of 10-bit values, low 5 bits first: two characters of a tag per lookup
_B32_PAIRS = tuple(_B32[v & 31] + _B32[v >> 5] for v in range(1024))


def new_id() -> str:
    """A random (version 4) UUID as text, like ``str(uuid.uuid4())`` but without the
    ``UUID`` object (ids are made several times per order)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_client_tag() -> str:
    """``np`` + 10 base32 characters (50 random bits): short enough for Kotak's ``tag``."""
    raw = int.from_bytes(os.urandom(7), "big") >> 6  # 50 bits
    pairs = _B32_PAIRS
    return (
        "np" + pairs[raw & 1023] + pairs[(raw >> 10) & 1023] + pairs[(raw >> 20) & 1023]
        + pairs[(raw >> 30) & 1023] + pairs[(raw >> 40) & 1023]
    )


def tag_key(tag: str) -> str:
    """Brokers may echo the tag in another case; match on this. A tag already in that form
    is returned as it is (the same object: the indexes keep no second copy of it)."""
    stripped = tag.strip()
    low = stripped.lower()
    return stripped if low == stripped else low


@dataclass(slots=True)
class OrderRow:
    """One row of ``order_ledger``. Parents of sliced orders have ``sliced=True`` and never
    reach the broker; their children carry ``parent_id``. Bracket legs carry ``bracket_id``."""

    order_id: str
    request_id: str
    client_tag: str
    strategy_id: str
    segment: str
    token: str
    symbol: str
    side: str
    order_type: str  # LIMIT | SL (stop-limit), as sent to the broker
    product: str
    quantity: int
    price: Decimal | None
    status: str
    trading_day: str
    created_ns: int
    updated_ns: int
    trigger_price: Decimal | None = None
    filled_qty: int = 0
    avg_price: Decimal | None = None
    broker_order_id: str = ""
    parent_id: str = ""
    bracket_id: str = ""
    purpose: str = ENTRY
    broker: str = "paper"
    sliced: bool = False
    cancel_requested: bool = False
    reason: str = ""
    raw: Any = None
    # in memory only
    filled_value: Decimal = field(default=Decimal(0))
    # the broker called the order COMPLETE/CANCELLED while its trades were still missing: the
    # row stays working ("awaiting fills") until trades reach ``broker_filled``
    broker_final: str = ""
    broker_filled: int = 0
    awaiting_since_ns: int = 0
    # reconciliation: consecutive order-book snapshots that did not show the order
    missing: int = 0
    missing_since_ns: int = 0
    # an owed cancel: failures so far and when to send it again
    cancel_failures: int = 0
    cancel_due_ns: int = 0
    expires_ns: int = 0  # the request's deadline: never sent after it (0: none)

    @property
    def key(self) -> str:
        return f"{self.segment}|{self.token}"  # instrument_key, inlined: hot path

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def remaining(self) -> int:
        return max(0, self.quantity - self.filled_qty)

    @property
    def open_qty(self) -> int:
        """What can still trade at the broker: nothing once the broker called the order done,
        even while its trades are still on their way ("awaiting fills")."""
        return 0 if self.broker_final else max(0, self.quantity - self.filled_qty)

    @property
    def unsettled_qty(self) -> int:
        """What may still move the position: the rest of a working order, or the trades a
        final broker status announced that have not arrived yet."""
        if self.broker_final:
            return max(0, self.broker_filled - self.filled_qty)
        return max(0, self.quantity - self.filled_qty)

    @property
    def exited_qty(self) -> int:
        """Filled as far as order management goes: the trades, or what the broker's final
        status announced when that is more (positions still count only trades)."""
        return max(self.filled_qty, self.broker_filled) if self.broker_final else self.filled_qty

    def as_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "request_id": self.request_id,
            "client_tag": self.client_tag,
            "broker_order_id": self.broker_order_id,
            "strategy_id": self.strategy_id,
            "symbol": self.symbol,
            "segment": self.segment,
            "token": self.token,
            "side": self.side,
            "order_type": self.order_type,
            "product": self.product,
            "quantity": self.quantity,
            "price": _s(self.price),
            "trigger_price": _s(self.trigger_price),
            "status": self.status,
            "filled_qty": self.filled_qty,
            "avg_price": _s(self.avg_price),
            "parent_id": self.parent_id,
            "bracket_id": self.bracket_id,
            "purpose": self.purpose,
            "broker": self.broker,
            "sliced": self.sliced,
            "reason": self.reason,
            "trading_day": self.trading_day,
            "created_ns": self.created_ns,
            "updated_ns": self.updated_ns,
        }


@dataclass(slots=True)
class FillRow:
    """One row of ``fills``: a trade at the broker. Unique on (broker, trading_day, segment,
    trade_id): exchange trade numbers are per exchange segment and restart every day."""

    trade_id: str
    order_id: str
    broker_order_id: str
    strategy_id: str
    segment: str
    token: str
    symbol: str
    side: str
    quantity: int
    price: Decimal
    ts_ns: int
    trading_day: str
    broker: str = "paper"
    raw: Any = None

    @property
    def key(self) -> str:
        return f"{self.segment}|{self.token}"  # instrument_key, inlined: hot path

    def as_dict(self) -> dict[str, Any]:
        return {
            "fill_id": self.trade_id,
            "order_id": self.order_id,
            "broker_order_id": self.broker_order_id,
            "side": self.side,
            "quantity": self.quantity,
            "price": str(self.price),
            "ts_ns": self.ts_ns,
        }


@dataclass(slots=True)
class CarriedNet:
    """A strategy's NRML/CNC net in one instrument from the ledger's fills of earlier days."""

    strategy_id: str
    segment: str
    token: str
    symbol: str
    product: str
    quantity: int
    avg_price: Decimal


@dataclass(slots=True)
class BracketRow:
    """One OCO group: an entry and its protective stop-limit and target legs."""

    bracket_id: str
    entry_id: str
    strategy_id: str
    segment: str
    token: str
    symbol: str
    side: str  # the entry's side
    product: str
    stop_loss: Decimal | None
    target: Decimal | None
    state: str
    trading_day: str
    created_ns: int
    updated_ns: int
    stop_limit: Decimal | None = None
    entry_filled: int = 0
    exit_filled: int = 0
    reason: str = ""
    # a trailing stop: the distance (rupees or percent of the best price, one of them), and the
    # best price seen since the entry filled; ``stop_loss`` is the stop as trailed so far
    trail_points: Decimal | None = None
    trail_pct: Decimal | None = None
    trail_best: Decimal | None = None
    # a basket leg's: when another leg of the basket is stopped out, this stop moves to the
    # entry price (``move_sl_to_cost``)
    to_cost: bool = False
    # a stop given as a percent of the entry's fill price (``stop_loss_pct``): until the entry
    # fills, ``stop_loss`` is risk's estimate from the last price; at the first fill it becomes
    # this percent from the average fill price and this goes back to None
    stop_pct: Decimal | None = None

    @property
    def trails(self) -> bool:
        return self.trail_points is not None or self.trail_pct is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "bracket_id": self.bracket_id,
            "entry_id": self.entry_id,
            "strategy_id": self.strategy_id,
            "symbol": self.symbol,
            "side": self.side,
            "stop_loss": _s(self.stop_loss),
            "stop_limit": _s(self.stop_limit),
            "target": _s(self.target),
            "trail_points": _s(self.trail_points),
            "trail_pct": _s(self.trail_pct),
            "trail_best": _s(self.trail_best),
            "to_cost": self.to_cost,
            "stop_pct": _s(self.stop_pct),
            "state": self.state,
            "entry_filled": self.entry_filled,
            "exit_filled": self.exit_filled,
            "reason": self.reason,
        }


@dataclass(slots=True)
class BasketRow:
    """One row of ``baskets``: a multi-leg order and how far execution got with it. ``legs``
    are the legs' order ids in the request's order; ``closes`` the rollback's closing
    orders. ``state`` is a ``BasketState``; what it says is durable before any intent it
    allows is released (short legs go out only after the row says PLACED)."""

    basket_id: str
    request_id: str
    strategy_id: str
    legs: list[str]
    state: str
    trading_day: str
    created_ns: int
    updated_ns: int
    rollback: bool = True
    reason: str = ""
    closes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "basket_id": self.basket_id,
            "request_id": self.request_id,
            "strategy_id": self.strategy_id,
            "legs": list(self.legs),
            "state": self.state,
            "reason": self.reason,
            "closes": list(self.closes),
        }


@dataclass(slots=True)
class EventRow:
    """One row of ``order_events`` (append-only): a transition and its raw payload."""

    order_id: str
    kind: str
    from_status: str
    to_status: str
    ts_ns: int
    payload: Any = None


@dataclass(slots=True)
class RiskEventRow:
    event: str
    reason: str
    source: str
    ts_ns: int
    trading_day: str
    data: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""  # idempotency: a retried event is stored once


@dataclass(slots=True)
class Changes:
    """Everything one ledger transaction writes. New orders are inserted first and are
    idempotent on ``request_id``: a conflicting row is not written (nor its events, children
    or bracket) and the store returns the existing row instead."""

    new_orders: list[OrderRow] = field(default_factory=list)
    updated: dict[str, OrderRow] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    fills: list[FillRow] = field(default_factory=list)
    brackets: dict[str, BracketRow] = field(default_factory=dict)
    risk_events: list[RiskEventRow] = field(default_factory=list)
    baskets: dict[str, BasketRow] = field(default_factory=dict)  # upserts, after the orders

    def __bool__(self) -> bool:
        return bool(
            self.new_orders or self.updated or self.events or self.fills or self.brackets or self.risk_events
            or self.baskets
        )


@dataclass(slots=True)
class OrderQuery:
    status: str = ""
    symbol: str = ""
    strategy_id: str = ""
    limit: int = 200
    trading_day: str = ""


def _s(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
