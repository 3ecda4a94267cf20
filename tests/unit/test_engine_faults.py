"""The execution engine under ordinary broker faults (issue 10), driven by hand.

A ``HandBroker`` stands in for the broker at the protocol level: the test takes the engine's
intents and answers them, and pushes order-status and trade events, in whatever order a real
broker might (status before trade, a cancel that fails, an empty book, a late fill). Each test
is named after the behaviour it proves and failed on the engine before the fix.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common.clock import ManualClock
from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    CANCELLED,
    COMPLETE,
    HALTED,
    OPEN,
    REJECTED,
    UNKNOWN,
    Alert,
    ExecuteOrder,
    Flatten,
    OrderRequest,
    RecordRiskEvent,
    Tick,
)
from services.execution.brokers.base import (
    BrokerAck,
    BrokerOrderStatus,
    BrokerPosition,
    BrokerTemporary,
    BrokerTrade,
    BrokerUnknown,
)
from services.execution.engine import (
    BooksIntent,
    CancelIntent,
    ExecutionEngine,
    Intent,
    PlaceIntent,
    PositionsIntent,
)
from services.execution.model import B_ACTIVE, B_CLOSED, STOP, TARGET, OrderRow
from services.execution.store import LedgerError, MemoryOrderStore
from tests.kit import execute_order
from tests.kit.builders import front_future

MASTER = MasterData.load()
REL = MASTER.resolve("RELIANCE-EQ")
DAY0_NS = 1_763_700_000_000_000_000  # Friday 2025-11-21, 10:10 IST


@dataclass
class HandBroker:
    """A broker whose every call is answered by the test (it is never called itself)."""

    name: str = "hand"
    inline: bool = False
    book_lag_s: float = 0.0

    def drain_events(self) -> list[Any]:
        return []


class Hand:
    """Engine + in-memory ledger; intents are taken and answered by the test."""

    def __init__(self, store: MemoryOrderStore | None = None, clock: ManualClock | None = None,
                 carried: list[BrokerPosition] | None = None, book_lag_s: float = 0.0) -> None:  # fmt: skip
        self.cfg = load_config(env={})
        self.clock = clock or ManualClock(DAY0_NS)
        self.store = store if store is not None else MemoryOrderStore()
        self.engine = ExecutionEngine(self.store, HandBroker(book_lag_s=book_lag_s), MASTER, self.clock,
                                      self.cfg.execution)  # fmt: skip
        self.engine.start()
        self.boids = itertools.count(1)
        self.tids = itertools.count(1)
        self.alerts: list[Alert] = []
        self.pending: list[Intent] = []
        for i in self.take():  # startup: carried positions and the books
            if isinstance(i, PositionsIntent):
                self.answer(i, carried or [])
            elif isinstance(i, BooksIntent):
                self.answer(i, ([], []))
            else:
                self.pending.append(i)

    # -- driving
    def take(self) -> list[Intent]:
        self.engine.flush()
        out = self.pending + self.engine.take_intents()
        self.pending = []
        self._collect()
        return out

    def _collect(self) -> None:
        self.alerts.extend(m for _, m in self.engine.take_messages() if isinstance(m, Alert))

    def answer(self, intent: Intent, result: Any) -> None:
        self.engine.on_result(intent, result)
        self.engine.flush()
        self._collect()

    def ack(self, intent: PlaceIntent) -> str:
        boid = f"B{next(self.boids)}"
        self.answer(intent, BrokerAck(broker_order_id=boid))
        return boid

    def status(self, o: OrderRow, status: str, filled: int = 0) -> None:
        self.engine.on_broker_event(BrokerOrderStatus(
            broker_order_id=o.broker_order_id, client_tag=o.client_tag, status=status,
            quantity=o.quantity, filled_qty=filled))  # fmt: skip
        self.engine.flush()
        self._collect()

    def trade(self, o: OrderRow, qty: int, price: str, tid: str = "") -> BrokerTrade:
        tr = BrokerTrade(trade_id=tid or f"T{next(self.tids)}", broker_order_id=o.broker_order_id,
                         client_tag=o.client_tag, side=o.side, quantity=qty, price=Decimal(price),
                         ts_ns=self.clock.now_ns())  # fmt: skip
        self.engine.on_broker_event(tr)
        self.engine.flush()
        self._collect()
        return tr

    def books(self, orders: list[BrokerOrderStatus], trades: list[BrokerTrade]) -> None:
        self.engine.request_reconcile("test")
        for i in self.take():
            if isinstance(i, BooksIntent):
                self.answer(i, (orders, trades))
            else:
                self.pending.append(i)

    def row(self, o: OrderRow) -> BrokerOrderStatus:
        return BrokerOrderStatus(broker_order_id=o.broker_order_id, client_tag=o.client_tag, status=OPEN,
                                 quantity=o.quantity)  # fmt: skip

    def tick(self, ltp: float, symbol: str = "RELIANCE-EQ") -> None:
        inst = MASTER.resolve(symbol)
        self.engine.on_tick(Tick(segment=inst.segment, token=inst.token, ltp=ltp))

    # -- reading
    def order(self, order_id: str) -> OrderRow:
        return self.engine.orders[order_id]

    def legs(self, order_id: str, kind: str, live: bool = True) -> list[OrderRow]:
        e = self.order(order_id)
        return [self.order(x) for x in self.engine.legs.get(e.bracket_id, [])
                if self.order(x).purpose == kind and (not live or not self.order(x).terminal)]  # fmt: skip

    def position(self, strategy: str = "s1", key: str = REL.key) -> int:
        p = self.engine.positions.get((strategy, key))
        return p.quantity if p else 0

    def codes(self) -> list[str]:
        return [a.code for a in self.alerts]


def execute(side: str = "BUY", qty: int = 10, price: str | None = "1290.00", **kw: Any) -> ExecuteOrder:
    """The kit's ``execute_order`` for RELIANCE-EQ (LIMIT, as OrderRequest's default, even unpriced)."""
    kw.setdefault("order_type", "LIMIT")
    return execute_order(REL, side, qty, price, **kw)


def places(intents: list[Intent]) -> list[PlaceIntent]:
    return [i for i in intents if isinstance(i, PlaceIntent)]


def cancels(intents: list[Intent]) -> list[CancelIntent]:
    return [i for i in intents if isinstance(i, CancelIntent)]


def bracketed_entry(h: Hand, qty: int = 10) -> str:
    """A BUY 10 with stop 1280 and target 1300, acknowledged and filled: its legs are placed
    and acknowledged. Returns the entry's order id."""
    [res] = h.engine.submit([execute(qty=qty, stop_loss=Decimal("1280.00"), target=Decimal("1300.00"))])
    [p] = places(h.take())
    h.ack(p)
    e = h.order(res.order_id)
    h.trade(e, qty, "1290.00")
    legs = places(h.take())
    assert sorted(h.order(i.order_id).purpose for i in legs) == [STOP, TARGET]
    for leg in legs:
        h.ack(leg)
    return res.order_id


# ------------------------------------------------------------------ 1. status before trade


def test_entry_reported_complete_before_its_trade_still_gets_its_stop_and_target() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(stop_loss=Decimal("1280.00"), target=Decimal("1300.00"))])
    [p] = places(h.take())
    h.ack(p)
    entry = h.order(res.order_id)

    h.status(entry, COMPLETE, filled=10)  # the order book is ahead of the trade book

    assert entry.status == OPEN and not entry.terminal  # awaiting fills, not closed
    assert h.engine.brackets[entry.bracket_id].state == "PENDING_ENTRY"
    assert places(h.take()) == []
    h.trade(entry, 10, "1290.00")
    assert entry.status == COMPLETE
    legs = places(h.take())
    assert sorted(h.order(i.order_id).purpose for i in legs) == [STOP, TARGET]
    assert all(i.order.quantity == 10 for i in legs)


def test_stop_leg_reported_complete_before_its_trade_places_no_second_stop() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)

    h.status(stop, COMPLETE, filled=10)  # stop triggered; its trade is not in yet

    intents = h.take()
    assert places(intents) == []  # no second stop
    assert [c.order_id for c in cancels(intents)] == [target.order_id]  # OCO at once, not at the trade
    assert not stop.terminal and h.position() == 10  # the position still counts only trades
    h.trade(stop, 10, "1279.00")
    assert stop.status == COMPLETE and h.position() == 0
    assert cancels(h.take()) == []  # the stop itself is never cancelled
    assert len(h.legs(eid, STOP, live=False)) == 1


def test_a_fill_after_the_entry_was_closed_reopens_its_bracket() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(stop_loss=Decimal("1280.00"), target=Decimal("1300.00"))])
    [p] = places(h.take())
    h.ack(p)
    entry = h.order(res.order_id)
    h.status(entry, CANCELLED, filled=0)  # the broker's book says cancelled, nothing traded
    assert entry.status == CANCELLED

    h.trade(entry, 10, "1290.00")  # ...and then a trade turns up after all

    assert h.engine.brackets[entry.bracket_id].state == B_ACTIVE
    legs = places(h.take())
    assert sorted(h.order(i.order_id).purpose for i in legs) == [STOP, TARGET]
    assert "bracket_reopened" in h.codes()


# ------------------------------------------------------------------ 2. owed cancels


def test_a_cancel_that_fails_once_is_sent_again_until_the_broker_confirms() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.trade(target, 10, "1300.00")  # the target fills: the stop must go
    [c1] = cancels(h.take())
    assert c1.order_id == stop.order_id

    h.answer(c1, BrokerTemporary("HTTP 503"))  # the cancel fails once
    assert cancels(h.take()) == []  # backoff first
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    again = cancels(h.take())
    assert [c.order_id for c in again] == [stop.order_id]

    h.answer(again[0], None)  # accepted, but the book still shows the stop working later on
    h.clock.advance(6.0)
    h.engine.reconcile_if_due()
    third = cancels(h.take())
    assert [c.order_id for c in third] == [stop.order_id]
    h.answer(third[0], None)
    h.status(stop, CANCELLED)
    h.clock.advance(60.0)
    h.engine.reconcile_if_due()
    assert cancels(h.take()) == [] and stop.terminal


def test_repeated_cancel_failures_raise_a_critical_alert_and_keep_retrying() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.trade(target, 10, "1300.00")
    for _ in range(6):
        [c] = cancels(h.take())
        h.answer(c, BrokerTemporary("timeout"))
        h.clock.advance(31.0)
        h.engine.reconcile_if_due()
    assert "cancel_failing" in h.codes()
    assert [c.order_id for c in cancels(h.take())] == [stop.order_id]


def test_an_owed_cancel_of_a_closed_brackets_stop_survives_a_restart() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.trade(target, 10, "1300.00")
    [c] = cancels(h.take())
    h.answer(c, BrokerUnknown("read timeout"))
    assert h.engine.brackets[stop.bracket_id].state == B_CLOSED

    h2 = Hand(store=h.store, clock=h.clock)  # execution restarts; the stop still works at the broker
    h2.books([h2.row(h2.order(stop.order_id))], [])

    assert [c.order_id for c in cancels(h2.take())] == [stop.order_id]


def test_a_cancel_asked_while_the_place_is_unknown_is_sent_once_the_broker_id_is_known() -> None:
    h = Hand()
    [res] = h.engine.submit([execute()])
    [p] = places(h.take())
    h.answer(p, BrokerUnknown("read timeout"))
    o = h.order(res.order_id)
    assert o.status == UNKNOWN
    assert h.engine.cancel_entries("kill switch") == [o.order_id]
    assert cancels(h.take()) == []  # no broker id to cancel yet

    found = BrokerOrderStatus(broker_order_id="B77", client_tag=o.client_tag, status=OPEN, quantity=10)
    h.books([found], [])

    assert [(c.order_id, c.broker_order_id) for c in cancels(h.take())] == [(o.order_id, "B77")]


def test_a_stop_leg_not_placed_for_a_passing_reason_is_placed_again() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(stop_loss=Decimal("1280.00"))])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(res.order_id), 10, "1290.00")
    [leg] = places(h.take())
    h.answer(leg, BrokerTemporary("HTTP 429 too many requests"))
    assert places(h.take()) == []
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    [again] = places(h.take())
    assert h.order(again.order_id).purpose == STOP and again.order.quantity == 10


# ------------------------------------------------------------------ 3. a bad row never wedges


def test_a_trade_with_zero_quantity_or_price_is_set_aside_and_the_ledger_keeps_writing() -> None:
    h = Hand()
    [res] = h.engine.submit([execute()])
    [p] = places(h.take())
    h.ack(p)
    o = h.order(res.order_id)

    h.trade(o, 0, "1290.00")
    h.trade(o, 5, "0")

    assert o.filled_qty == 0 and h.position() == 0
    assert h.codes().count("trade_quarantined") == 2
    assert not h.engine.pending_writes()  # nothing stuck in the unit of work
    [ok] = h.engine.submit([execute()])
    assert ok.ok, ok.reason
    h.trade(o, 10, "1290.00")
    assert h.position() == 10 and h.store.load_fills(h.engine.day)[0].quantity == 10


# ------------------------------------------------------------------ 4. flatten


def test_flatten_waits_for_a_leg_fill_on_its_way_and_does_not_reverse_the_position() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    h.tick(1281.0)
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f1"), reports.append)
    cs = cancels(h.take())
    assert len(cs) == 2
    for c in cs:
        h.answer(c, None)  # both cancel replies arrive...
    assert places(h.take()) == []  # ...but the broker has not confirmed: no close yet

    h.trade(stop, 10, "1280.00")  # the stop had triggered: its fill was on its way
    h.status(stop, COMPLETE, filled=10)
    target = next(x for x in h.legs(eid, TARGET, live=False))
    h.status(target, CANCELLED)

    assert places(h.take()) == []  # the position is flat: nothing to close
    h.engine.finish_jobs()
    assert reports and reports[0]["closing"] == [] and h.position() == 0


def test_flatten_waits_for_an_unknown_entry_before_closing() -> None:
    h = Hand()
    [a] = h.engine.submit([execute(price="1290.00")])
    [pa] = places(h.take())
    h.ack(pa)
    h.trade(h.order(a.order_id), 10, "1290.00")
    [b] = h.engine.submit([execute(price="1291.00")])
    [pb] = places(h.take())
    h.answer(pb, BrokerUnknown("timeout"))
    h.tick(1291.0)
    h.engine.flatten(Flatten(request_id="f2"), lambda r: None)
    assert places(h.take()) == []  # the UNKNOWN order may have filled: wait

    ub = h.order(b.order_id)
    found = BrokerOrderStatus(broker_order_id="B99", client_tag=ub.client_tag, status=COMPLETE,
                              quantity=10, filled_qty=10)  # fmt: skip
    trade = BrokerTrade(trade_id="T99", broker_order_id="B99", client_tag=ub.client_tag, side="BUY",
                        quantity=10, price=Decimal("1291.00"), ts_ns=h.clock.now_ns())  # fmt: skip
    h.books([found], [trade])

    [close] = places(h.take())
    assert close.order.side == "SELL" and close.order.quantity == 20


def test_flatten_closes_each_product_in_its_own_product() -> None:
    h = Hand()
    for product in ("MIS", "NRML"):
        [r] = h.engine.submit([execute(product=product)])
        [p] = places(h.take())
        h.ack(p)
        h.trade(h.order(r.order_id), 10, "1290.00")
    h.tick(1290.0)
    h.engine.flatten(Flatten(request_id="f3"), lambda r: None)
    closes = places(h.take())
    assert sorted((c.order.product, c.order.side, c.order.quantity) for c in closes) == [
        ("MIS", "SELL", 10),
        ("NRML", "SELL", 10),
    ]


def test_flatten_without_confirmations_never_sells_what_a_working_stop_may_sell() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.tick(1290.0)
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f4"), reports.append)
    for c in cancels(h.take()):
        h.answer(c, BrokerTemporary("HTTP 502"))
    h.clock.advance(11.0)

    h.engine.reconcile_if_due()  # the wait runs out with both legs still working

    assert places(h.take()) == []  # the stop may still sell these 10: no close beside it
    h.engine.finish_jobs()
    [report] = reports
    assert len(report["unconfirmed"]) == 2 and "flatten_unconfirmed" in h.codes()
    assert report["open_positions"] == [{"strategy_id": "s1", "symbol": REL.symbol, "quantity": 10}]

    h.status(stop, CANCELLED)  # the cancels get through at last
    h.status(target, CANCELLED)
    [close] = places(h.take())  # and the follow-up close goes out
    assert (close.order.side, close.order.quantity) == ("SELL", 10)


def test_flatten_without_confirmations_closes_nothing_more_when_the_stop_fills() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    h.tick(1290.0)
    h.engine.flatten(Flatten(request_id="f7"), lambda r: None)
    for c in cancels(h.take()):
        h.answer(c, BrokerTemporary("HTTP 502"))
    h.clock.advance(11.0)
    h.engine.reconcile_if_due()
    h.engine.finish_jobs()

    h.trade(stop, 10, "1280.00")  # the stop was working and fills
    h.status(stop, COMPLETE, filled=10)

    assert [i for i in places(h.take())] == [] and h.position() == 0


# ------------------------------------------------------------------ 5. deadlines


class StallingStore(MemoryOrderStore):
    """A ledger whose commit takes ``stall_s`` (an fsync stall), on the test's clock."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.stall_s = 0.0

    def write(self, changes: Any) -> Any:
        self.clock.advance(self.stall_s)
        return super().write(changes)


def test_an_order_that_reaches_execution_after_its_deadline_is_never_sent() -> None:
    h = Hand()
    late = execute(expires_ns=h.clock.now_ns() - 1)
    [res] = h.engine.submit([late])
    assert not res.ok and "deadline" in res.reason
    assert places(h.take()) == []
    [again] = h.engine.submit([late])  # risk's retry gets the same answer
    assert not again.ok and again.order_id == res.order_id


def test_an_order_whose_deadline_passes_during_a_stalled_commit_is_never_sent() -> None:
    clock = ManualClock(DAY0_NS)
    store = StallingStore(clock)
    h = Hand(store=store, clock=clock)
    store.stall_s = 2.0
    [res] = h.engine.submit([execute(expires_ns=clock.now_ns() + 1_000_000_000)])
    assert not res.ok and "not placed" in res.reason
    assert places(h.take()) == []
    assert h.order(res.order_id).status == REJECTED


# ------------------------------------------------------------------ 6. one snapshot is not the truth


def test_one_empty_order_book_closes_nothing_and_places_no_second_legs() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    entry = h.order(eid)
    h.clock.advance(1.0)

    h.books([], [])  # "No Data"

    assert not stop.terminal and not target.terminal
    assert places(h.take()) == []
    h.clock.advance(1.0)
    trades = [BrokerTrade(trade_id="T1", broker_order_id=entry.broker_order_id, client_tag=entry.client_tag,
                          side="BUY", quantity=10, price=Decimal("1290.00"))]  # fmt: skip
    h.books([h.row(stop), h.row(target)], trades)  # back again
    assert stop.missing == 0 and places(h.take()) == []


def test_an_acknowledged_order_missing_from_the_books_is_never_closed_and_raises_an_alert() -> None:
    # Kotak's day book keeps every order it acknowledged today: a book without one is not
    # whole, however many times in a row (a stretch of "No Data")
    h = Hand()
    [res] = h.engine.submit([execute()])
    [p] = places(h.take())
    h.ack(p)
    o = h.order(res.order_id)
    for _ in range(5):
        h.clock.advance(20.0)
        h.books([], [])
    assert not o.terminal
    assert h.codes().count("book_incomplete") == 1
    h.clock.advance(1.0)
    h.books([h.row(o)], [])  # a whole book again
    assert not o.terminal and h.engine.recon.incomplete_since_ns == 0


def test_an_order_of_an_earlier_day_missing_from_two_books_is_closed_as_expired() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(product="NRML")])
    [p] = places(h.take())
    h.ack(p)
    h.clock.advance(3 * 86_400)  # Monday: the day order expired at the broker overnight
    h2 = Hand(store=h.store, clock=h.clock)
    o = h2.order(res.order_id)
    assert not o.terminal  # one book proves nothing
    h2.clock.advance(1.0)
    h2.books([], [])
    assert o.status == CANCELLED and "no longer in the broker's order book" in o.reason


def test_a_row_the_ledger_closed_but_the_broker_shows_working_is_adopted_with_an_alert() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    h.clock.advance(1.0)
    h.status(stop, CANCELLED)  # the order feed says the exchange cancelled the stop...
    fresh = places(h.take())  # ...so a new stop went out
    assert [h.order(i.order_id).purpose for i in fresh] == [STOP]
    h.ack(fresh[0])
    new_stop = h.order(fresh[0].order_id)
    target = h.legs(eid, TARGET)[0]
    h.clock.advance(1.0)

    h.books([h.row(stop), h.row(new_stop), h.row(target)], [])  # but the old stop is working

    assert stop.status == OPEN and "order_adopted" in h.codes()
    [c] = cancels(h.take())  # two stops for one position: the newer one goes
    assert c.order_id == new_stop.order_id
    h.answer(c, None)
    h.status(new_stop, CANCELLED)
    assert sum(x.remaining for x in h.legs(eid, STOP)) == 10


def test_a_book_behind_the_order_feed_does_not_bring_back_a_cancelled_stop_over_its_replacement() -> None:
    # Arrange: a broker whose books may lag its order feed by 4 s (Kotak's replicas).
    h = Hand(book_lag_s=4.0)
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    h.clock.advance(1.0)
    h.status(stop, CANCELLED)  # the order feed: the exchange cancelled the stop
    [fresh] = places(h.take())
    h.ack(fresh)
    new_stop, target = h.order(fresh.order_id), h.legs(eid, TARGET)[0]
    entry = h.order(eid)
    whole = [BrokerOrderStatus(broker_order_id=entry.broker_order_id, client_tag=entry.client_tag,
                               status=COMPLETE, quantity=10, filled_qty=10)]  # fmt: skip
    trades = [BrokerTrade(trade_id="T1", broker_order_id=entry.broker_order_id, client_tag=entry.client_tag,
                          side="BUY", quantity=10, price=Decimal("1290.00"))]  # fmt: skip

    # Act 1: a book asked for 1 s after the cancel still shows the old stop working.
    h.clock.advance(1.0)
    h.books([*whole, h.row(stop), h.row(new_stop), h.row(target)], trades)

    # Assert 1: nothing adopted, nothing cancelled: the replacement protects the position.
    assert stop.status == CANCELLED and "order_adopted" not in h.codes()
    assert not cancels(h.take()) and not new_stop.terminal
    assert h.engine.reconcile_due_ns and h.engine.reconcile_due_ns <= stop.updated_ns + int(4e9) + 1

    # Act 2 / Assert 2: a book asked for past the lag that still shows it is believed.
    h.clock.advance(4.0)
    h.books([*whole, h.row(stop), h.row(new_stop), h.row(target)], trades)
    assert stop.status == OPEN and "order_adopted" in h.codes()


# ------------------------------------------------------------------ 7. the kill switch


def test_kill_switch_cancels_a_resting_manual_order_but_keeps_the_legs() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [m] = h.engine.submit([execute(price="1250.00", purpose="MANUAL")])
    [p] = places(h.take())
    h.ack(p)

    ids = h.engine.cancel_entries("kill switch")

    assert ids == [m.order_id]
    assert h.legs(eid, STOP) and h.legs(eid, TARGET)


def test_an_order_with_an_unknown_purpose_is_refused() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(purpose="HEDGE")])
    assert not res.ok and "purpose" in res.reason
    assert places(h.take()) == []


# ------------------------------------------------------------------ 8. the switch across midnight


def test_kill_switch_stays_on_in_day_state_on_the_next_trading_day() -> None:
    h = Hand()
    h.engine.record_risk_event(RecordRiskEvent(event="kill_switch_on", reason="too many losses",
                                               data={"kill_switch": True, "risk_state": HALTED}))  # fmt: skip
    h.engine.flush()
    h.clock.advance(3 * 86_400)  # Monday
    h2 = Hand(store=h.store, clock=h.clock)

    st = h2.engine.day_state()

    assert st.trading_day != h.engine.day
    assert st.kill_switch and st.risk_state == HALTED and st.kill_reason == "too many losses"


# ------------------------------------------------------------------ 10. carried positions


def test_positions_the_broker_carries_from_earlier_days_are_loaded_and_flattened() -> None:
    carried = [BrokerPosition(segment=REL.segment, token=REL.token, symbol=REL.symbol, product="NRML",
                              quantity=-20, avg_price=Decimal("1300.00"))]  # fmt: skip
    h = Hand(carried=carried)
    assert h.position("carried") == -20
    assert [p.quantity for p in h.engine.day_state().positions] == [-20]
    h.tick(1290.0)
    h.engine.flatten(Flatten(request_id="f5"), lambda r: None)
    [close] = places(h.take())
    assert (close.order.side, close.order.quantity, close.order.product) == ("BUY", 20, "NRML")


# ------------------------------------------------------------------ 11. odd values


@pytest.mark.parametrize(("side", "stop"), [("BUY", "1E+28"), ("SELL", "1E+26"), ("SELL", "NaN")])
def test_an_absurd_stop_loss_is_refused_whole_and_a_retry_is_not_told_accepted(side: str, stop: str) -> None:
    h = Hand()
    h.tick(1290.0)
    cmd = execute(side=side, stop_loss=Decimal(stop))
    [res] = h.engine.submit([cmd])
    assert not res.ok
    assert places(h.take()) == [] and h.engine.open_count() == 0
    [again] = h.engine.submit([cmd])
    assert not again.ok and again.order_id == res.order_id
    [fine] = h.engine.submit([execute()])
    assert fine.ok


def test_a_non_ascii_strategy_id_is_refused_and_later_reconciles_work() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(strategy="straddle\u200b")])
    assert not res.ok and "strategy id" in res.reason
    h.books([], [])
    [fine] = h.engine.submit([execute()])
    assert fine.ok


# ------------------------------------------------------------------ 12. fills per segment


def test_the_same_trade_number_in_two_segments_is_two_fills() -> None:
    h = Hand()
    nifty = front_future("NIFTY", MASTER)
    [a] = h.engine.submit([execute()])
    req = OrderRequest(request_id="fut1", strategy_id="s1", side="BUY", quantity=nifty.lot_size,
                       symbol=nifty.symbol, segment=nifty.segment, token=nifty.token,
                       price=Decimal("26000.00"))  # fmt: skip
    fut = ExecuteOrder(request_id="fut1", order=req, quantity=nifty.lot_size, segment=nifty.segment,
                       token=nifty.token, symbol=nifty.symbol)  # fmt: skip
    [b] = h.engine.submit([fut])
    for p in places(h.take()):
        h.ack(p)

    h.trade(h.order(a.order_id), 10, "1290.00", tid="1001")
    h.trade(h.order(b.order_id), nifty.lot_size, "26000.00", tid="1001")

    assert h.position() == 10 and h.position(key=nifty.key) == nifty.lot_size
    assert len(h.store.load_fills(h.engine.day)) == 2


def test_paper_broker_carries_nrml_positions_across_days_in_its_journal(tmp_path: Any) -> None:
    from services.execution.brokers.paper import PaperBroker

    journal = tmp_path / "paper-book.jsonl"
    clock = ManualClock(DAY0_NS)
    cfg = load_config(env={})
    store = MemoryOrderStore()
    broker = PaperBroker(MASTER, clock, journal=journal)
    engine = ExecutionEngine(store, broker, MASTER, clock, cfg.execution)
    engine.start()
    t = Tick(segment=REL.segment, token=REL.token, ltp=1290.0, bid=1289.9, ask=1290.1)
    engine.on_tick(t)
    broker.on_tick(t)
    for product, side in (("NRML", "BUY"), ("MIS", "BUY"), ("NRML", "SELL")):
        qty = 30 if side == "BUY" else 10
        engine.submit([execute(side=side, qty=qty, price=None, order_type="MARKET", product=product)])
        engine.pump()
    broker.close()
    clock.advance(3 * 86_400)  # Monday: MIS was squared off by the exchange day's end; NRML carries

    broker2 = PaperBroker(MASTER, clock, journal=journal)
    engine2 = ExecutionEngine(store, broker2, MASTER, clock, cfg.execution)
    engine2.start()
    engine2.pump()

    [pos] = broker2.carried_positions()
    assert (pos.product, pos.quantity) == ("NRML", 20)
    # the ledger says whose it is: s1 still holds its 20 NRML, nothing is left unexplained
    assert engine2.positions[("s1", REL.key)].quantity == 20
    assert engine2.positions[("s1", REL.key)].by_product == {"NRML": 20}
    assert engine2.positions[("carried", REL.key)].quantity == 0
    broker2.close()
    assert [p.quantity for p in PaperBroker(MASTER, clock, journal=journal).carried_positions()] == [20]


def test_a_restart_after_closing_a_carried_position_does_not_count_the_carry_twice() -> None:
    carried = [BrokerPosition(segment=REL.segment, token=REL.token, symbol=REL.symbol, product="NRML",
                              quantity=-20, avg_price=Decimal("1300.00"))]  # fmt: skip
    h = Hand(carried=carried)
    h.tick(1290.0)
    h.engine.flatten(Flatten(request_id="f6"), lambda r: None)
    [close] = places(h.take())
    h.ack(close)
    h.trade(h.order(close.order_id), 20, "1290.00")
    assert h.position("carried") == 0

    h2 = Hand(store=h.store, clock=h.clock, carried=carried)  # Kotak still reports cfSellQty 20

    assert h2.position("carried") == 0
    assert h2.engine.positions[("carried", REL.key)].by_product == {}


def test_a_running_paper_stack_carries_nrml_into_the_next_day(tmp_path: Any) -> None:
    from services.execution.brokers.paper import PaperBroker

    clock = ManualClock(DAY0_NS)
    broker = PaperBroker(MASTER, clock, journal=tmp_path / "paper-book.jsonl")
    engine = ExecutionEngine(MemoryOrderStore(), broker, MASTER, clock, load_config(env={}).execution)
    engine.start()
    t = Tick(segment=REL.segment, token=REL.token, ltp=1290.0, bid=1289.9, ask=1290.1)
    engine.on_tick(t)
    broker.on_tick(t)
    engine.submit([execute(qty=15, price=None, order_type="MARKET", product="NRML")])
    engine.pump()
    clock.advance(3 * 86_400)

    assert engine.check_day()
    engine.pump()

    assert engine.positions[("s1", REL.key)].quantity == 15  # the strategy keeps its NRML overnight
    assert engine.positions[("carried", REL.key)].quantity == 0
    assert broker.order_book() == []  # yesterday's book expired


def test_a_place_that_waited_past_its_deadline_for_a_broker_worker_is_not_sent() -> None:
    from services.execution.engine import run_intent

    @dataclass
    class CountingBroker:
        places: int = 0

        def place(self, order: Any) -> BrokerAck:
            self.places += 1
            return BrokerAck(broker_order_id="B1")

    h = Hand()
    [res] = h.engine.submit([execute(expires_ns=h.clock.now_ns() + 500_000_000)])
    assert res.ok
    [p] = places(h.take())
    broker = CountingBroker()
    h.clock.advance(1.0)  # the worker pool was busy (a slow broker): the deadline passed meanwhile
    try:
        result: Any = run_intent(broker, p, h.clock)
    except BrokerTemporary as exc:
        result = exc
    h.answer(p, result)
    assert broker.places == 0
    assert h.order(res.order_id).status == REJECTED and "deadline passed" in h.order(res.order_id).reason


def test_a_strategys_nrml_bracket_is_protected_again_on_the_next_day() -> None:
    h = Hand()
    bracket = {"stop_loss": Decimal("1280.00"), "target": Decimal("1300.00")}
    [res] = h.engine.submit([execute(product="NRML", **bracket)])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(res.order_id), 10, "1290.00")
    for leg in places(h.take()):
        h.ack(leg)
    h.clock.advance(3 * 86_400)  # Monday: yesterday's DAY legs expired at the broker overnight

    assert h.engine.check_day()
    [pi] = [i for i in h.take() if isinstance(i, PositionsIntent)]
    h.answer(pi, [BrokerPosition(segment=REL.segment, token=REL.token, symbol=REL.symbol, product="NRML",
                                 quantity=10, avg_price=Decimal("1290.00"))])  # fmt: skip
    assert h.position() == 10 and h.position("carried") == 0
    for _ in range(2):  # today's books: the legs are not there
        h.clock.advance(1.0)
        h.books([], [])

    fresh = places(h.take())
    assert sorted((h.order(i.order_id).purpose, i.order.quantity, i.order.product) for i in fresh) == [
        (STOP, 10, "NRML"),
        (TARGET, 10, "NRML"),
    ]


def test_yesterdays_trade_shown_again_after_midnight_does_not_fill_its_order_twice() -> None:
    # A chaos run that crossed midnight IST: the trade book still listed the day's trades, and
    # an entry still in memory (its bracket open) took its own trade a second time.
    h = Hand()
    bracket = {"stop_loss": Decimal("1280.00"), "target": Decimal("1300.00")}
    [res] = h.engine.submit([execute(product="NRML", **bracket)])
    h.ack(places(h.take())[0])
    tr = h.trade(h.order(res.order_id), 10, "1290.00")
    h.take()
    h.clock.advance(86_400)
    assert h.engine.check_day()
    h.engine.on_broker_event(tr)  # the same trade, with yesterday's time
    h.engine.flush()
    entry = h.order(res.order_id)
    assert entry.filled_qty == 10 and entry.avg_price == Decimal("1290.00")


def test_yesterdays_trade_shown_again_after_a_restart_past_midnight_is_known() -> None:
    h = Hand()
    bracket = {"stop_loss": Decimal("1280.00"), "target": Decimal("1300.00")}
    [res] = h.engine.submit([execute(product="NRML", **bracket)])
    h.ack(places(h.take())[0])
    tr = h.trade(h.order(res.order_id), 10, "1290.00")
    h.take()
    h.clock.advance(86_400)
    h2 = Hand(store=h.store, clock=h.clock)  # execution restarts the next day
    h2.engine.on_broker_event(tr)
    h2.engine.flush()
    assert h2.order(res.order_id).filled_qty == 10


def test_a_carry_the_ledger_cannot_explain_is_held_as_carried_and_a_smaller_one_is_offset() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(product="NRML")])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(res.order_id), 10, "1290.00")
    h.clock.advance(3 * 86_400)
    more = [BrokerPosition(segment=REL.segment, token=REL.token, symbol=REL.symbol, product="NRML",
                           quantity=25, avg_price=Decimal("1285.00"))]  # fmt: skip
    h2 = Hand(store=h.store, clock=h.clock, carried=more)
    assert (h2.position(), h2.position("carried")) == (10, 15)

    less = [BrokerPosition(segment=REL.segment, token=REL.token, symbol=REL.symbol, product="NRML",
                           quantity=4, avg_price=Decimal("1285.00"))]  # fmt: skip
    h3 = Hand(store=h.store, clock=h.clock, carried=less)  # 6 sold outside NeoPulse, or an early read
    # one reading never takes the strategy's carry (and its legs) away: the account nets to the
    # broker's +4 with -6 held as "carried", a CRITICAL alert, and the positions read again
    assert (h3.position(), h3.position("carried")) == (10, -6)
    assert "carried_mismatch" in h3.codes() and h3.engine.recon.carried_retry


def test_flatten_counts_a_stops_announced_fill_and_does_not_reverse_the_position() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.status(stop, COMPLETE, filled=10)  # the stop sold 10; its trade is slow to arrive
    [c] = cancels(h.take())
    h.answer(c, None)
    h.status(target, CANCELLED)
    h.tick(1281.0)
    h.engine.flatten(Flatten(request_id="f8"), lambda r: None)
    h.clock.advance(11.0)
    h.engine.reconcile_if_due()  # the wait runs out with the stop still awaiting its trade

    assert places(h.take()) == []  # the stop's 10 are on their way: nothing to sell beside them
    h.trade(stop, 10, "1280.00")
    assert h.position() == 0 and places(h.take()) == []


def test_an_order_gone_from_a_working_book_for_minutes_is_closed_with_an_alert() -> None:
    h = Hand()
    [a] = h.engine.submit([execute()])
    [b] = h.engine.submit([execute(price="1289.00")])
    for p in places(h.take()):
        h.ack(p)
    kept, gone = h.order(a.order_id), h.order(b.order_id)
    for _ in range(4):
        h.clock.advance(100.0)
        h.books([h.row(kept)], [])  # the book works (it shows the other order) but not this one

    assert gone.status == CANCELLED and "order_vanished" in h.codes()
    assert not kept.terminal


# ------------------------------------------------------------------ 7. ledger outage


class DownStore(MemoryOrderStore):
    """A ledger that can be taken away (``down``): every write then fails as a lost connection does."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def write(self, changes: Any) -> Any:
        if self.down:
            raise LedgerError("ledger connection lost: server closed the connection unexpectedly")
        return super().write(changes)


class Lines:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, _level: str) -> Any:
        return lambda event, **_kw: self.events.append(event)


def test_a_ledger_outage_refuses_orders_logs_one_line_per_10s_and_flushes_what_was_held_on_return() -> None:
    # Arrange: a filled-order ack is held when the ledger goes away.
    store = DownStore()
    h = Hand(store=store)
    h.engine.log = log = Lines()
    [res] = h.engine.submit([execute()])
    [place] = places(h.take())
    store.down = True
    h.answer(place, BrokerAck(broker_order_id="B1"))

    # Act: 1,000 flushes and a new order while it is down, 5 s apart in two halves; then it returns.
    for _ in range(500):
        h.engine.flush()
    h.clock.advance(5.0)
    [refused] = h.engine.submit([execute()])
    for _ in range(500):
        h.engine.flush()
    h.clock.advance(6.0)
    h.engine.flush()
    store.down = False
    assert h.engine.flush()

    # Assert: refused "ledger unavailable", two error lines not 1,000, and the held ack is durable.
    assert not refused.ok and refused.reason == "ledger unavailable" and refused.code == "ledger"
    assert log.events.count("ledger_write_failed") == 2
    assert log.events.count("ledger_write_recovered") == 1
    assert store.orders[res.order_id].broker_order_id == "B1"


@pytest.mark.parametrize("ltp", [math.nan, math.inf, -1.0, 1e308])
def test_a_tick_with_an_impossible_price_is_ignored_and_flatten_still_answers(ltp: float) -> None:
    # found by the bus fuzzer: a NaN tick became the last price, flatten priced its close from
    # it, raised inside the request handler and never answered
    h = Hand()
    [r] = h.engine.submit([execute()])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(r.order_id), 10, "1290.00")
    h.tick(1290.0)

    h.tick(ltp)
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id=f"f-{ltp}"), reports.append)
    closes = places(h.take())
    for c in closes:
        h.ack(c)
    h.engine.finish_jobs()

    assert reports, "flatten never answered"
    assert [(c.order.side, c.order.quantity) for c in closes] == [("SELL", 10)]
    assert Decimal("1200") < closes[0].order.price < Decimal("1300")  # priced from the last good tick


# ------------------------------------------------------------------ a stop the broker rejects


def test_a_position_whose_stop_the_broker_rejects_is_closed_target_cancelled_first() -> None:
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.tick(1285.0)  # (a close is priced from the last price, as a flatten's is)

    h.status(stop, REJECTED)  # e.g. RMS after the ack: the position has no stop from here on

    assert "leg_rejected" in h.codes()
    assert "the position is closed, as it has no stop" in h.alerts[-1].text
    [c] = cancels(h.take())  # the flatten cancels the target first...
    assert c.order_id == target.order_id and not places(h.take())
    h.answer(c, None)
    h.status(target, CANCELLED)
    [close] = places(h.take())  # ...then closes what is held
    row = h.order(close.order_id)
    assert (row.side, row.quantity, row.purpose) == ("SELL", 10, "FLATTEN")
    h.ack(close)
    h.trade(row, 10, "1285.00")
    assert h.position() == 0 and not places(h.take())


def test_with_close_unprotected_off_a_rejected_stop_only_alerts() -> None:
    h = Hand()
    h.engine.cfg = msgspec.structs.replace(h.engine.cfg, close_unprotected=False)
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)

    h.status(stop, REJECTED)

    assert "the position is not protected by it" in h.alerts[-1].text
    assert not places(h.take()) and not cancels(h.take()) and h.position() == 10


def test_a_rejected_stop_with_no_price_yet_keeps_its_target_and_is_closed_at_the_first_tick() -> None:
    h = Hand()
    eid = bracketed_entry(h)  # no tick seen for it yet (e.g. just after a restart)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)

    h.status(stop, REJECTED)

    assert "unprotected_unpriced" in h.codes() and not cancels(h.take())  # the target keeps working
    h.engine.flush()
    assert h.codes().count("unprotected_unpriced") == 1  # said once
    h.tick(1284.0)
    [c] = cancels(h.take())  # now the close can be priced: target first, then the close
    assert c.order_id == target.order_id
    h.answer(c, None)
    h.status(target, CANCELLED)
    [close] = places(h.take())
    assert (h.order(close.order_id).side, h.order(close.order_id).quantity) == ("SELL", 10)


# ------------------------------------------------------------------ tags Kotak rewrites


def test_a_trade_for_another_order_number_carrying_an_acknowledged_orders_tag_is_an_orphan() -> None:
    # Arrange: a protected position; the stop is acknowledged as B2 (Kotak's order number).
    h = Hand()
    entry = bracketed_entry(h)
    [stop] = h.legs(entry, STOP)
    assert stop.broker_order_id

    # Act: the books show another order number with the stop's tag (Kotak hands tags out again
    # after rewriting them on modify and cancel), filled.
    other = BrokerOrderStatus(broker_order_id="B99", client_tag=stop.client_tag, status="COMPLETE",
                              quantity=stop.quantity, filled_qty=stop.quantity)  # fmt: skip
    trade = BrokerTrade(trade_id="T99", broker_order_id="B99", client_tag=stop.client_tag, side=stop.side,
                        quantity=stop.quantity, price=Decimal("1280.00"), ts_ns=h.clock.now_ns())  # fmt: skip
    h.books([h.row(stop), other], [trade])

    # Assert: the stop keeps its own number and is untouched; the stranger is an orphan.
    assert stop.broker_order_id != "B99" and stop.filled_qty == 0 and not stop.terminal
    assert h.position() == 10
    assert "orphan_order" in h.codes()
