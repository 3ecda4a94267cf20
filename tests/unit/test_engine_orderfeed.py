"""The engine with order updates from a push channel (Kotak's order feed) racing the REST
answers and books: a status before the place's ack, COMPLETE before the trade, a state resent
after a reconnect. Driven by hand (tests/unit/test_engine_faults.py ``Hand``)."""

from __future__ import annotations

from libs.common.messages import COMPLETE, OPEN
from services.execution.brokers.base import BrokerAck, BrokerOrderStatus
from tests.unit.test_engine_faults import Hand, execute, places


def _status(boid: str, tag: str, status: str, filled: int = 0, qty: int = 10) -> BrokerOrderStatus:
    return BrokerOrderStatus(broker_order_id=boid, client_tag=tag, status=status, quantity=qty,
                             filled_qty=filled)  # fmt: skip


def test_a_feed_status_and_trade_before_the_place_ack_fill_once_and_the_ack_changes_nothing() -> None:
    # Arrange: an order sent, its place reply not back yet.
    h = Hand()
    [res] = h.engine.submit([execute(qty=10)])
    [p] = places(h.take())
    o = h.order(res.order_id)

    # Act: the feed says OPEN (with Kotak's order number, matched by tag), then the trade book has
    # the fill, and only then does the place reply arrive.
    h.engine.on_broker_event(_status("B9", o.client_tag, OPEN))
    h.engine.flush()
    assert h.order(res.order_id).broker_order_id == "B9"
    h.trade(h.order(res.order_id), 10, "1290.00", tid="T1")
    h.answer(p, BrokerAck(broker_order_id="B9"))
    h.trade(h.order(res.order_id), 10, "1290.00", tid="T1")  # the next book read brings it again

    # Assert
    row = h.order(res.order_id)
    assert (row.status, row.filled_qty, h.position()) == (COMPLETE, 10, 10)
    assert "orphan_order" not in h.codes()


def test_complete_from_the_feed_before_the_trade_book_counts_the_fill_once_when_the_trade_comes() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(qty=10)])
    [p] = places(h.take())
    h.ack(p)
    o = h.order(res.order_id)

    h.status(o, COMPLETE, filled=10)  # the feed: complete, fldQty 10, no trade yet
    h.trade(o, 10, "1290.00", tid="T7")  # the trade book read it triggered
    h.trade(o, 10, "1290.00", tid="T7")  # and the slow reconcile's read, later

    row = h.order(res.order_id)
    assert (row.status, row.filled_qty, h.position()) == (COMPLETE, 10, 10)


def test_a_resent_open_after_complete_does_not_reopen_the_order() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(qty=10)])
    [p] = places(h.take())
    h.ack(p)
    o = h.order(res.order_id)
    h.trade(o, 10, "1290.00", tid="T1")
    h.status(o, COMPLETE, filled=10)

    h.status(o, OPEN, filled=0)  # a reconnect resends an old row

    row = h.order(res.order_id)
    assert (row.status, row.filled_qty, h.position()) == (COMPLETE, 10, 10)
