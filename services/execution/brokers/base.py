"""The broker contract execution talks to: paper and Kotak implement the same calls.

All calls are synchronous. Execution runs the Kotak ones in a thread pool, never on the
event loop. Errors decide control flow:

- ``BrokerRejected``  the broker refused the order (record it, notify); never retried.
- ``BrokerTemporary`` a call that may be retried with backoff (not ``place``).
- ``BrokerUnknown``   the outcome of ``place`` is unknown (timeout, unreadable reply): the
                      row becomes ``UNKNOWN`` and reconciliation finds it by ``client_tag``.
                      ``place`` is never re-sent blindly.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Protocol

import msgspec


class BrokerError(Exception):
    def __init__(self, reason: str, raw: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class BrokerRejected(BrokerError):
    """The broker said no. The reason is the broker's own words."""


class BrokerTemporary(BrokerError):
    """Rate limited, session expired, network blip: safe to retry (except ``place``)."""


class BrokerUnknown(BrokerError):
    """We cannot tell whether the order reached the broker."""


class BrokerOrder(msgspec.Struct, frozen=True, kw_only=True):
    """One order as the broker receives it. ``order_type`` is ``LIMIT`` or ``SL`` (stop-limit):
    market intent has already been turned into a protected limit by execution."""

    client_tag: str
    segment: str
    token: str
    symbol: str
    side: str
    quantity: int
    price: Decimal
    order_type: str = "LIMIT"
    trigger_price: Decimal | None = None
    product: str = "MIS"
    validity: str = "DAY"


class BrokerAck(msgspec.Struct, frozen=True, kw_only=True):
    broker_order_id: str
    raw: Any = None


class BrokerOrderStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the broker's order book, mapped to our states."""

    broker_order_id: str
    client_tag: str
    status: str  # OPEN | PARTIAL | COMPLETE | REJECTED | CANCELLED | ACK
    quantity: int = 0
    filled_qty: int = 0
    avg_price: Decimal | None = None
    reason: str = ""
    raw: Any = None


class BrokerTrade(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the broker's trade book. ``trade_id`` is unique per broker."""

    trade_id: str
    broker_order_id: str
    client_tag: str
    side: str
    quantity: int
    price: Decimal
    ts_ns: int = 0
    raw: Any = None


class BrokerPosition(msgspec.Struct, frozen=True, kw_only=True):
    """A position the broker carries from an earlier day (NRML / CNC): signed quantity."""

    segment: str
    token: str
    symbol: str
    product: str
    quantity: int
    avg_price: Decimal = Decimal(0)
    raw: Any = None


class Broker(Protocol):
    name: str

    def place(self, order: BrokerOrder) -> BrokerAck: ...

    def cancel(self, broker_order_id: str) -> None: ...

    def modify(self, broker_order_id: str, *, quantity: int | None = None, price: Decimal | None = None,
               trigger_price: Decimal | None = None) -> None: ...

    def order_book(self) -> list[BrokerOrderStatus]: ...

    def trade_book(self) -> list[BrokerTrade]: ...

    def close(self) -> None: ...
