"""What the engine asks of a broker: intents, and ``run_intent`` that carries one out.

The engine never calls the broker itself: it emits these, whoever runs it executes them
(inline for paper, in a thread pool for a real broker) and hands the result back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from libs.common.clock import Clock
from services.execution.brokers.base import (
    Broker,
    BrokerOrder,
    BrokerTemporary,
)


@dataclass(slots=True)
class PlaceIntent:
    order_id: str
    order: BrokerOrder
    expires_ns: int = 0  # the request's deadline: not sent once it has passed (0: none)


@dataclass(slots=True)
class CancelIntent:
    order_id: str
    broker_order_id: str


@dataclass(slots=True)
class ModifyIntent:
    """Change a working order at the broker: its quantity (a leg resized to what it protects)
    or, with ``trail``, a stop leg's limit and trigger (a trailing stop). Every field is sent
    as the absolute value it should have, so sending one again is harmless."""

    order_id: str
    broker_order_id: str
    quantity: int
    old_quantity: int
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    trail: bool = False


@dataclass(slots=True)
class BooksIntent:
    """Fetch the broker's order book and trade book (reconciliation)."""

    started_ns: int
    reason: str = "periodic"


@dataclass(slots=True)
class PositionsIntent:
    """Fetch the positions the broker carries from earlier days (NRML/CNC), once at start."""

    started_ns: int


Intent = PlaceIntent | CancelIntent | ModifyIntent | BooksIntent | PositionsIntent


def run_intent(broker: Broker, intent: Intent, clock: Clock | None = None,
               place_timer: Callable[[int, int], None] | None = None) -> Any:
    """Execute one intent against a broker (on the loop for paper, in a worker thread otherwise).
    A place whose deadline passed while it waited for a worker is not sent: risk has told the
    strategy by then that the order expires unplaced. ``place_timer(start_ns, end_ns)`` is
    told how long each broker place call took, answered or failed (the latency hop)."""
    if isinstance(intent, PlaceIntent):
        if intent.expires_ns and clock is not None and clock.now_ns() > intent.expires_ns:
            late_ms = (clock.now_ns() - intent.expires_ns) / 1e6
            raise BrokerTemporary(f"deadline passed {late_ms:.0f} ms before it could be sent")
        if place_timer is None:
            return broker.place(intent.order)
        start_ns = time.time_ns()
        try:
            return broker.place(intent.order)
        finally:
            place_timer(start_ns, time.time_ns())
    if isinstance(intent, CancelIntent):
        return broker.cancel(intent.broker_order_id)
    if isinstance(intent, ModifyIntent):
        return broker.modify(intent.broker_order_id, quantity=intent.quantity, price=intent.price,
                             trigger_price=intent.trigger_price)
    if isinstance(intent, PositionsIntent):
        return broker.carried_positions()
    return (broker.order_book(), broker.trade_book())
