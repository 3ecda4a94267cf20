"""The execution engine around a broker IP block (Kotak's static-IP rule), driven by hand with
the ``Hand`` harness of test_engine_faults.py: what happens to brackets and flatten while the
broker refuses order calls, and after a restart or the fix."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from libs.common.messages import CANCELLED, Flatten
from services.execution.brokers.base import BrokerIpBlocked
from services.execution.intents import ModifyIntent
from services.execution.model import B_FLATTENED, STOP, TARGET
from tests.unit.test_engine_faults import Hand, bracketed_entry, cancels, execute, places

IP_FIX = "whitelist this machine's public IP in Kotak Neo's API dashboard"


def ip_refused() -> BrokerIpBlocked:
    return BrokerIpBlocked("broker refuses orders from this machine's IP (Kotak 100008)", code=100008,
                           fix=IP_FIX)  # fmt: skip


def test_a_flatten_cut_short_by_a_restart_is_resumed_and_closes_the_position_it_left_held() -> None:
    # Arrange: a protected position; flatten asked while the IP is refused, so its cancels fail
    # and it answers "unconfirmed" with the position still held; then execution restarts (the
    # flatten job lived only in memory).
    h = Hand()
    eid = bracketed_entry(h)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.tick(1290.0)
    h.engine.flatten(Flatten(request_id="f9"), lambda r: None)
    for c in cancels(h.take()):
        h.answer(c, ip_refused())
    h.clock.advance(11.0)
    h.engine.reconcile_if_due()
    h.engine.finish_jobs()
    assert h.engine.brackets[stop.bracket_id].state == B_FLATTENED and h.position() == 10

    # Act: the new process starts (the IP fixed meanwhile), reads the books: both legs still work.
    h2 = Hand(store=h.store, clock=h.clock)
    h2.tick(1290.0)
    h2.books([h2.row(h2.order(stop.order_id)), h2.row(h2.order(target.order_id))], [])

    # Assert: a CRITICAL alert names the position, and the flatten goes on the normal path:
    # the legs are cancelled first, then (once the broker confirms) the position is closed.
    [alert] = [a for a in h2.alerts if a.code == "flatten_resumed"]
    assert alert.level == "CRITICAL" and "RELIANCE-EQ" in alert.text and "+10" in alert.text
    intents = h2.take()
    assert places(intents) == []  # never a close beside a working stop
    assert {c.order_id for c in cancels(intents)} == {stop.order_id, target.order_id}
    h2.status(h2.order(stop.order_id), CANCELLED)
    h2.status(h2.order(target.order_id), CANCELLED)
    [close] = places(h2.take())
    assert (close.order.side, close.order.quantity) == ("SELL", 10)
    assert [a.code for a in h2.alerts].count("flatten_resumed") == 1


def test_a_flatten_still_running_in_this_process_is_not_resumed_twice() -> None:
    h = Hand()
    bracketed_entry(h)
    h.tick(1290.0)
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f10"), reports.append)
    for c in cancels(h.take()):
        h.answer(c, ip_refused())

    h.books([], [])

    assert "flatten_resumed" not in h.codes()


def test_a_stop_left_larger_than_the_position_by_a_refused_resize_is_critical_once_and_retried_soon() -> None:
    # Arrange: BUY 100 protected; the target fills 60, so the stop must shrink to 40.
    h = Hand()
    eid = bracketed_entry(h, qty=100)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    h.trade(target, 60, "1300.00")
    [modify] = [i for i in h.take() if isinstance(i, ModifyIntent)]
    assert (modify.order_id, modify.quantity) == (stop.order_id, 40)

    # Act: Kotak refuses the modify for the IP (twice: the retry meets the same block).
    h.answer(modify, ip_refused())
    due_s = (h.engine.reconcile_due_ns - h.clock.now_ns()) / 1e9
    h.clock.advance(max(due_s, 0.0) + 0.01)
    h.engine.reconcile_if_due()
    h.books([h.row(h.order(stop.order_id)), h.row(h.order(target.order_id))], [])
    [again] = [i for i in h.take() if isinstance(i, ModifyIntent)]
    h.answer(again, ip_refused())

    # Assert: one CRITICAL naming the order, the size it must have and what to do; the resize
    # was tried again within seconds, not at the next periodic reconciliation.
    [alert] = [a for a in h.alerts if a.code == "leg_oversized"]
    assert alert.level == "CRITICAL"
    assert stop.client_tag in alert.text and "60 larger" in alert.text
    assert f"reduce stop {stop.client_tag} to 40 at Kotak" in alert.text
    assert 0 < due_s <= 5.0 and again.quantity == 40
    assert h.order(stop.order_id).quantity == 100  # what is really at the broker


def test_when_the_broker_accepts_orders_again_a_waiting_stop_is_placed_at_once() -> None:
    # Arrange: an entry fills while the IP is refused; its stop cannot be placed and backs off.
    h = Hand()
    [res] = h.engine.submit([execute(stop_loss=Decimal("1280.00"))])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(res.order_id), 10, "1290.00")
    for _ in range(4):
        [leg] = places(h.take())
        h.answer(leg, ip_refused())
        _n, due = h.engine.leg_retry[(h.order(res.order_id).bracket_id, STOP)]
        h.clock.advance((due - h.clock.now_ns()) / 1e9 + 0.01)
        h.engine.reconcile_if_due()
    [leg] = places(h.take())
    h.answer(leg, ip_refused())
    assert places(h.take()) == []  # backing off (4 s now, up to 30 s)

    # Act: the block ends.
    h.engine.broker_accepts_again()

    # Assert: the stop goes now, not after its backoff.
    [now] = places(h.take())
    assert h.order(now.order_id).purpose == STOP and now.order.quantity == 10
