"""Closes that race stops, and stops that must never be put back looser (the review of issue 14).

The hand-driven engine answers in the order each test chooses:
- a strategy's EXIT working while the stop leg fills (the straddle's exit at 15:15 in a spike)
  is cut back, so it never opens the reverse position -- also when the broker's order book
  announces the stop's fill before its trade, and an exit asked for then is refused; if its
  fill wins the race anyway (or the stop's does), the reverse position is closed at once, with
  a CRITICAL alert;
- a resize of a stop leg whose trailed stop timed out (and may have landed) carries the
  trailed stop, not the looser one last confirmed;
- one bad print does not move a trailing stop, and a trailed stop the price has already come
  back through is not sent: the position is closed.
"""

from __future__ import annotations

from decimal import Decimal

from services.execution.brokers.base import BrokerRejected, BrokerTemporary, BrokerTrade
from services.execution.intents import CancelIntent
from services.execution.model import STOP
from tests.unit.test_engine_faults import Hand, cancels, execute, places
from tests.unit.test_trailing_stop import modifies, trailing_entry

D = Decimal


def _short_with_stop(h: Hand, qty: int = 10) -> str:
    [res] = h.engine.submit([execute(side="SELL", qty=qty, price="100.00", stop_loss=D("125.00"))])
    h.ack(places(h.take())[0])
    h.trade(h.order(res.order_id), qty, "100.00")
    h.ack(places(h.take())[0])
    assert h.position() == -qty
    return res.order_id


def _exit(h: Hand, qty: int = 10) -> str:
    h.tick(124.0)
    [ex] = h.engine.submit([execute(side="BUY", qty=qty, price="126.00", purpose="EXIT", reduce_only=True)])
    h.ack(places(h.take())[0])
    return ex.order_id


def test_a_stop_fill_while_the_exit_works_cancels_the_exit() -> None:
    h = Hand()
    eid = _short_with_stop(h)
    xid = _exit(h)
    [stop] = h.legs(eid, STOP)
    h.trade(stop, 10, "125.00")  # the stop wins the race at the broker
    sent = h.take()
    assert [c.order_id for c in cancels(sent)] == [xid]  # the exit would buy 10 more than held
    h.answer(next(c for c in sent if isinstance(c, CancelIntent)), None)
    assert h.position() == 0
    assert "exit_trimmed" in h.codes() and "exit_overclosed" not in h.codes()


def test_a_partial_stop_fill_resizes_the_exit_to_what_is_left() -> None:
    h = Hand()
    eid = _short_with_stop(h)
    xid = _exit(h)
    [stop] = h.legs(eid, STOP)
    h.trade(stop, 4, "125.00")
    resize = [m for m in modifies(h.take()) if m.order_id == xid]
    assert [m.quantity for m in resize] == [6]


def _closes(h: Hand, side: str, qty: int) -> None:
    """The flatten that closes a reverse position: one protected close of ``qty``, which fills."""
    [close] = places(h.take())
    assert (close.order.side, close.order.quantity) == (side, qty)
    h.ack(close)
    # an id of its own: a restarted Hand counts its trade ids from T1 again
    h.trade(h.order(close.order_id), qty, "125.00", tid=f"X-{close.order_id}")
    assert h.position() == 0


def test_an_exit_fill_that_beats_the_cancel_closes_the_reverse_position() -> None:
    h = Hand()
    eid = _short_with_stop(h)
    xid = _exit(h)
    h.trade(h.legs(eid, STOP)[0], 10, "125.00")
    h.take()
    h.trade(h.order(xid), 10, "125.50")  # filled before the cancel arrived
    assert h.position() == 10
    [alert] = [a for a in h.alerts if a.code == "exit_overclosed"]
    assert alert.level == "CRITICAL" and "held +10" in alert.text and "closing it now" in alert.text
    _closes(h, "SELL", 10)


def test_a_stop_whose_trade_comes_after_the_exit_filled_closes_the_reverse_position() -> None:
    # The exit fills; the stop's cancel goes out, but the stop had triggered already.
    h = Hand()
    eid = _short_with_stop(h)
    xid = _exit(h)
    [stop] = h.legs(eid, STOP)
    h.trade(h.order(xid), 10, "124.00")
    assert [c.order_id for c in cancels(h.take())] == [stop.order_id]
    h.trade(stop, 10, "125.00")
    assert h.position() == 10
    assert "exit_overclosed" in h.codes()
    _closes(h, "SELL", 10)


def _overclose(h: Hand) -> None:
    """Short 10 with its stop; the exit and the stop both fill: long 10, made by closes."""
    eid = _short_with_stop(h)
    xid = _exit(h)
    h.trade(h.legs(eid, STOP)[0], 10, "125.00")
    h.take()
    h.engine.on_broker_event(BrokerTrade(trade_id="TX", broker_order_id=h.order(xid).broker_order_id,
                                         client_tag=h.order(xid).client_tag, side="BUY", quantity=10,
                                         price=D("125.50"), ts_ns=h.clock.now_ns()))  # fmt: skip
    assert h.position() == 10


def test_a_restart_before_the_reverse_position_is_closed_closes_it() -> None:
    h = Hand()
    _overclose(h)
    h.engine.flush()  # the fill is durable; the flatten it started lived only in memory
    h.take()  # execution is killed before anything is sent
    h2 = Hand(store=h.store, clock=h.clock)
    h2.tick(125.0)  # the first tick after the restart: the close can be priced
    for _ in range(2):  # its close, written but never sent, is not at the broker
        h2.clock.advance(1.0)
        h2.books([], [])
    h2.engine.flush()
    _closes(h2, "SELL", 10)


def test_a_close_of_the_reverse_position_that_never_reached_the_broker_is_sent_again() -> None:
    h = Hand()
    _overclose(h)
    h.engine.flush()
    [close] = places(h.take())
    h.answer(close, BrokerRejected("RMS: margin"))  # refused: nothing was placed
    h.engine.finish_jobs()  # the flatten is answered: its close was refused
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    h.engine.flush()
    assert not places(h.take())  # not at once: a round that left it unchanged waits a moment
    h.clock.advance(5.0)
    h.engine.flush()
    _closes(h, "SELL", 10)


def test_a_reverse_part_beside_a_position_the_strategy_meant_is_only_alerted() -> None:
    h = Hand()
    eid = _short_with_stop(h)  # short 10, its stop resting
    [stop] = h.legs(eid, STOP)
    [rev] = h.engine.submit([execute(side="BUY", qty=20, price="100.00")])  # the strategy turns long
    h.ack(places(h.take())[0])
    h.trade(h.order(rev.order_id), 20, "100.00")
    h.take()
    assert h.position() == 10
    h.trade(stop, 10, "125.00")  # the stop, cancelled too late, buys 10 more
    assert h.position() == 20
    [alert] = [a for a in h.alerts if a.code == "exit_overclosed"]
    assert "+10 of it made by closes" in alert.text
    assert not [p for p in places(h.take()) if p.order.side == "SELL"]


def test_a_stop_the_book_calls_complete_before_its_trade_cancels_the_working_exit() -> None:
    # Kotak's order book says COMPLETE a poll or two before the trade book has the trade.
    h = Hand()
    eid = _short_with_stop(h)
    xid = _exit(h)
    [stop] = h.legs(eid, STOP)
    h.status(stop, "COMPLETE", 10)  # no trade yet: the position still reads -10
    assert h.position() == -10
    assert [c.order_id for c in cancels(h.take())] == [xid]
    assert "exit_trimmed" in h.codes()


def test_an_exit_asked_for_after_the_stop_was_announced_filled_is_refused() -> None:
    h = Hand()
    eid = _short_with_stop(h)
    [stop] = h.legs(eid, STOP)
    h.status(stop, "COMPLETE", 10)  # the trade is on its way
    h.take()
    h.tick(124.0)
    [ex] = h.engine.submit([execute(side="BUY", qty=10, price="126.00", purpose="EXIT", reduce_only=True)])
    assert ex.status == "REJECTED" and "nothing to exit" in ex.reason
    assert "less fills the broker has announced" in ex.reason
    assert not places(h.take())
    h.trade(stop, 10, "125.00")  # the trade arrives: flat, and nothing else was sent
    assert h.position() == 0


def test_an_exit_on_the_wrong_side_is_refused_without_blaming_announced_fills() -> None:
    h = Hand()
    _short_with_stop(h)  # short 10: a SELL exit has nothing to close
    h.tick(100.0)
    [ex] = h.engine.submit([execute(side="SELL", qty=10, price="99.00", purpose="EXIT", reduce_only=True)])
    assert ex.status == "REJECTED" and "nothing to exit: s1 holds -10" in ex.reason
    assert "announced" not in ex.reason


def test_a_resize_after_a_timed_out_trail_carries_the_trailed_stop() -> None:
    h = Hand()
    eid = trailing_entry(h)  # long 10 at 1290, stop 1280, trail 10 points
    h.tick(1300.0)
    [m] = modifies(h.take())
    assert m.trigger_price == D("1290.00")
    h.answer(m, BrokerTemporary("timed out"))  # it may have landed: the broker's stop may be 1290
    [ex] = h.engine.submit([execute(side="SELL", qty=4, price="1300.00", purpose="EXIT")])
    h.ack(places(h.take())[0])
    h.trade(h.order(ex.order_id), 4, "1300.00")
    [resize] = [x for x in modifies(h.take()) if not x.trail and x.trigger_price is not None]  # the stop's
    assert (resize.quantity, resize.trigger_price) == (6, D("1290.00"))  # never the looser 1280
    h.answer(resize, None)
    [leg] = h.legs(eid, STOP)
    assert leg.trigger_price == D("1290.00") and leg.quantity == 6  # confirmed: the trail is paid


def test_one_bad_print_does_not_move_a_trailing_stop() -> None:
    h = Hand()
    eid = trailing_entry(h, side="SELL", trail_pct=D("10"))  # short 10 at 1290, stop 1300
    h.tick(1289.0)
    h.take()
    h.clock.advance(2.0)
    h.tick(12.90)  # a fat finger or a mis-scaled print
    assert modifies(h.take()) == []
    h.clock.advance(2.0)
    h.tick(1289.0)
    assert modifies(h.take()) == []
    assert h.engine.brackets[h.order(eid).bracket_id].stop_loss == D("1300.00")


def test_a_trailed_stop_the_price_came_back_through_closes_the_position() -> None:
    h = Hand()
    eid = trailing_entry(h)  # long 10 at 1290, stop 1280, trail 10 points
    h.tick(1300.0)
    [m] = modifies(h.take())
    h.answer(m, BrokerTemporary("timed out"))  # the trail to 1290 is owed, retried after a backoff
    for ltp in (1295.0, 1291.0, 1288.0):  # back down through 1290 before the retry
        h.tick(ltp)
    h.clock.advance(5.0)
    h.engine.reconcile_if_due()  # the service's periodic call: the owed trail is due again
    h.engine.flush()
    sent = h.take()
    assert not [x for x in modifies(sent) if x.trail]  # no stop sent below the market
    [leg] = h.legs(eid, STOP)
    assert [c.order_id for c in cancels(sent)] == [leg.order_id] or leg.cancel_requested  # closing it
