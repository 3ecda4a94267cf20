"""Trailing stops on brackets (issue 14, part 4): the engine on scripted price paths.

The hand-driven engine (``tests.unit.test_engine_faults.Hand``) shows the modifies it asks of
the broker and what it does with each answer, in any order; the paper harness
(``tests.unit.test_engine.Harness``) shows the stop exiting at the trailed level.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from libs.common.messages import CANCELLED, COMPLETE, OPEN, ExecuteBasket, basket_leg_id
from services.execution.brokers.base import BrokerRejected, BrokerTemporary
from services.execution.engine import ModifyIntent
from services.execution.model import STOP, TARGET, OrderRow
from services.execution.store import MemoryOrderStore
from services.execution.trail import trailed_stop
from tests.kit import execute_order
from tests.unit.test_engine import Harness
from tests.unit.test_engine import execute as paper_execute
from tests.unit.test_engine_faults import MASTER, Hand, cancels, execute, places

INFY = MASTER.resolve("INFY-EQ")
TCS = MASTER.resolve("TCS-EQ")

D = Decimal


def modifies(intents: list) -> list[ModifyIntent]:  # type: ignore[type-arg]
    return [i for i in intents if isinstance(i, ModifyIntent)]


def trailing_entry(h: Hand, side: str = "BUY", **trail: Decimal) -> str:
    """A bracketed entry at 1290 with a trail (10 points unless told), filled, legs acknowledged."""
    trail = trail or {"trail_points": D("10")}
    sl, tgt = (D("1280.00"), D("1400.00")) if side == "BUY" else (D("1300.00"), D("1200.00"))
    [res] = h.engine.submit([execute(side=side, stop_loss=sl, target=tgt, **trail)])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(res.order_id), 10, "1290.00")
    for leg in places(h.take()):
        h.ack(leg)
    return res.order_id


def stop_of(h: Hand, eid: str) -> tuple[Decimal | None, Decimal | None]:
    """(the bracket's trailed stop, the stop the broker has confirmed on the leg)."""
    [leg] = h.legs(eid, STOP)
    return h.engine.brackets[h.order(eid).bracket_id].stop_loss, leg.trigger_price


def test_the_stop_rises_with_the_price_and_never_falls_on_a_scripted_path() -> None:
    h = Hand()
    eid = trailing_entry(h)
    seen = []
    for ltp in (1291.0, 1295.0, 1293.0, 1300.0, 1288.5, 1304.35, 1299.0):
        h.clock.advance(2.0)  # past the modify interval: each move goes out at once
        h.tick(ltp)
        for m in modifies(h.take()):
            h.answer(m, None)
        seen.append(stop_of(h, eid)[1])
    # 1291 → 1281; 1295 → 1285; a dip keeps it; 1300 → 1290; 1304.35 → 1294.30 (tick 0.10)
    assert seen == [D("1281.00"), D("1285.00"), D("1285.00"), D("1290.00"), D("1290.00"), D("1294.30"),
                    D("1294.30")]  # fmt: skip
    assert all(b is not None and a is not None and b >= a for a, b in itertools.pairwise(seen))
    [leg] = h.legs(eid, STOP)
    assert leg.price is not None and leg.price < leg.trigger_price  # the stop-limit moved with it
    assert h.legs(eid, TARGET)[0].price == D("1400.00")  # the target never moves


def test_a_move_smaller_than_a_tick_sends_nothing_and_a_loosening_move_is_never_sent() -> None:
    h = Hand()
    eid = trailing_entry(h)
    h.tick(1285.0)  # best 1285 → 1275: looser than the 1280 it has
    assert modifies(h.take()) == []
    h.tick(1290.0)  # → 1280.00: the same stop
    assert modifies(h.take()) == []
    h.tick(1290.04)  # → 1280.04, snapped down to the tick: 1280.00 still
    assert modifies(h.take()) == []
    assert stop_of(h, eid) == (D("1280.00"), D("1280.00"))


def test_moves_inside_the_interval_are_coalesced_into_one_modify_of_the_latest_stop() -> None:
    h = Hand()
    eid = trailing_entry(h)
    h.tick(1295.0)
    [first] = modifies(h.take())
    assert first.trigger_price == D("1285.00") and first.trail
    h.tick(1297.0)
    h.tick(1299.0)
    assert modifies(h.take()) == []  # one modify at a time per leg
    h.answer(first, None)
    h.engine.reconcile_if_due()
    assert modifies(h.take()) == []  # and at most one per execution.trail_modify_every_s
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    [second] = modifies(h.take())
    assert second.trigger_price == D("1289.00")  # the latest, not each step
    h.answer(second, None)
    assert stop_of(h, eid) == (D("1289.00"), D("1289.00"))


def test_a_refused_trail_keeps_the_old_stop_alerts_once_and_is_sent_again_after_a_backoff() -> None:
    h = Hand()
    eid = trailing_entry(h)
    h.tick(1295.0)
    [m] = modifies(h.take())
    h.answer(m, BrokerTemporary("timed out"))
    assert stop_of(h, eid) == (D("1285.00"), D("1280.00"))  # the leg keeps a stop, the old one
    assert h.codes().count("trail_failed") == 1
    h.clock.advance(1.5)
    h.engine.reconcile_if_due()
    [again] = modifies(h.take())
    assert again.trigger_price == D("1285.00")
    h.answer(again, BrokerRejected("RMS: try later"))
    assert h.codes().count("trail_failed") == 1  # one alert, not one per retry
    h.clock.advance(5.0)
    h.engine.reconcile_if_due()
    [third] = modifies(h.take())
    h.answer(third, None)
    assert stop_of(h, eid) == (D("1285.00"), D("1285.00"))


def test_a_short_position_trails_by_percent_below_the_lowest_price() -> None:
    h = Hand()
    eid = trailing_entry(h, side="SELL", trail_pct=D("1"))  # a sold option's stop: a BUY above
    h.tick(1280.0)  # lowest 1280 → 1280 * 1.01 = 1292.80
    [m] = modifies(h.take())
    assert (h.legs(eid, STOP)[0].side, m.trigger_price) == ("BUY", D("1292.80"))
    h.answer(m, None)
    h.clock.advance(2.0)
    h.tick(1290.0)  # against the short: nothing
    assert modifies(h.take()) == []
    h.tick(1270.15)  # → 1282.8515, up to the tick: 1282.90
    [m] = modifies(h.take())
    assert m.trigger_price == D("1282.90") and m.price is not None and m.price > m.trigger_price


def test_the_trail_resumes_after_a_restart_and_a_modify_lost_in_the_crash_is_sent_again() -> None:
    store = MemoryOrderStore()
    h = Hand(store=store)
    eid = trailing_entry(h)
    h.tick(1300.0)
    [m] = modifies(h.take())  # sent; the process dies before the broker's answer is recorded
    assert m.trigger_price == D("1290.00")
    [leg] = h.legs(eid, STOP)
    # Act: a new engine on the same ledger; the broker's book shows the leg working.
    again = Hand(store=store, clock=h.clock)
    target = h.legs(eid, TARGET)[0]
    again.books([again.row(again.order(leg.order_id)), again.row(again.order(target.order_id))], [])
    again.engine.reconcile_if_due()
    # Assert: the ledger had the trailed stop; the leg's is still unconfirmed, so it goes again.
    [resent] = modifies(again.take())
    assert (resent.order_id, resent.trigger_price) == (leg.order_id, D("1290.00"))
    again.answer(resent, None)
    again.clock.advance(2.0)
    again.tick(1295.0)  # below the best before the restart: the stop stays
    assert modifies(again.take()) == []
    again.tick(1301.0)
    [up] = modifies(again.take())
    assert up.trigger_price == D("1291.00")


def test_a_trail_needs_a_stop_loss_and_only_one_distance() -> None:
    h = Hand()
    [no_stop, both] = h.engine.submit([
        execute(target=D("1400.00"), trail_points=D("10")),
        execute(stop_loss=D("1280.00"), trail_points=D("10"), trail_pct=D("1"), rid="r-both"),
    ])  # fmt: skip
    assert "needs a stop_loss" in h.order(no_stop.order_id).reason
    assert "not both" in h.order(both.order_id).reason


def test_trailed_stop_arithmetic_snaps_away_from_the_price() -> None:
    tick = D("0.05")
    assert trailed_stop("BUY", D("100.07"), D("1"), None, tick) == D("99.05")
    assert trailed_stop("SELL", D("100.02"), None, D("25"), tick) == D("125.05")
    assert trailed_stop("BUY", D("5"), D("10"), None, tick) is None  # no such price


def test_on_paper_the_trailed_stop_exits_at_the_trailed_level_not_the_first_one() -> None:
    h = Harness()
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.0)
    [res] = h.submit(paper_execute(price="1290.00", stop_loss=D("1280.00"), target=D("1400.00"),
                                   trail_points=D("10")))  # fmt: skip
    h.tick("RELIANCE-EQ", 1289.0, bid=1288.9, ask=1289.0)  # the entry fills
    assert h.order(res.order_id).status == COMPLETE and h.position() == 10
    for ltp in (1295.0, 1302.0, 1310.0):  # up: the stop follows to 1300
        h.clock.advance(1.1)
        h.tick("RELIANCE-EQ", ltp, bid=ltp - 0.1, ask=ltp)
    b = h.engine.brackets[h.order(res.order_id).bracket_id]
    stop = next(h.order(x) for x in h.engine.legs[b.bracket_id] if h.order(x).purpose == STOP)
    assert (b.stop_loss, stop.trigger_price, stop.status) == (D("1300.00"), D("1300.00"), OPEN)
    h.tick("RELIANCE-EQ", 1305.0, bid=1304.9, ask=1305.0)
    assert h.position() == 10  # above the stop: held
    h.tick("RELIANCE-EQ", 1299.5, bid=1299.4, ask=1299.5)  # through 1300: the stop sells
    assert stop.status == COMPLETE and h.position() == 0
    assert stop.avg_price is not None and stop.avg_price >= stop.price  # a stop-limit: not below its limit
    assert D("1290") < stop.avg_price <= D("1300")  # out near 1300, not at the first stop 1280


# ------------------------------------------------------------------ move_sl_to_cost


def short_pair(h: Hand, rid: str = "sp1", **kw: Any) -> tuple[OrderRow, OrderRow]:
    """A basket of two shorts (INFY at 1510, TCS at 3120), each with a stop 25% above, filled,
    legs acknowledged: the straddle's shape, with equities standing in for the CE and PE."""
    cmd = ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order(INFY, "SELL", 10, "1510.00", rid=basket_leg_id(rid, 1), order_type="LIMIT",
                      stop_loss=D("1887.50"), **kw),
        execute_order(TCS, "SELL", 5, "3120.00", rid=basket_leg_id(rid, 2), order_type="LIMIT",
                      stop_loss=D("3900.00"), **kw),
    ], move_sl_to_cost=True)  # fmt: skip
    assert h.engine.submit_basket(cmd).ok
    for p in places(h.take()):
        h.ack(p)
    a, b = (h.order(h.engine.by_request[basket_leg_id(rid, n)]) for n in (1, 2))
    h.trade(a, 10, "1510.00")
    h.trade(b, 5, "3120.00")
    for p in places(h.take()):
        h.ack(p)
    return a, b


def test_when_one_leg_is_stopped_out_the_other_legs_stop_moves_to_its_entry_price() -> None:
    h = Hand()
    infy, tcs = short_pair(h)
    [infy_stop], [tcs_stop] = h.legs(infy.order_id, STOP), h.legs(tcs.order_id, STOP)
    h.tick(1700.0, "INFY-EQ")
    h.tick(3100.0, "TCS-EQ")

    h.trade(infy_stop, 10, "1887.50")  # INFY's stop fills: that leg is out

    [m] = modifies(h.take())
    assert (m.order_id, m.trigger_price) == (tcs_stop.order_id, D("3120.00"))  # TCS: stop at cost
    assert m.price is not None and m.price > m.trigger_price  # a BUY stop-limit: limit above
    h.answer(m, None)
    assert tcs_stop.trigger_price == D("3120.00")
    assert "stop_to_cost" in h.codes()
    h.clock.advance(2.0)
    h.engine.reconcile_if_due()  # nothing more happens: the stop is where it should be
    assert modifies(h.take()) == []


def test_a_leg_already_past_its_cost_when_the_other_is_stopped_out_is_closed_at_once() -> None:
    h = Hand()
    infy, _tcs = short_pair(h)
    [infy_stop] = h.legs(infy.order_id, STOP)
    h.tick(3150.0, "TCS-EQ")  # TCS is above its 3120 entry: a stop at cost would trigger now

    h.trade(infy_stop, 10, "1887.50")

    # Assert: TCS is flattened: its stop is cancelled first, then a BUY closes the short.
    sent = h.take()
    assert modifies(sent) == []
    [c] = cancels(sent)
    tcs_stop = h.order(c.order_id)
    assert (tcs_stop.symbol, tcs_stop.purpose) == ("TCS-EQ", STOP)
    h.answer(c, None)
    h.status(tcs_stop, CANCELLED)
    [close] = places(h.take())
    assert (close.order.symbol, close.order.side, close.order.quantity) == ("TCS-EQ", "BUY", 5)


def test_without_move_sl_to_cost_a_stopped_leg_leaves_the_other_stop_alone() -> None:
    h = Hand()
    rid = "sp2"
    cmd = ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order(INFY, "SELL", 10, "1510.00", rid=basket_leg_id(rid, 1), order_type="LIMIT",
                      stop_loss=D("1887.50")),
        execute_order(TCS, "SELL", 5, "3120.00", rid=basket_leg_id(rid, 2), order_type="LIMIT",
                      stop_loss=D("3900.00")),
    ])  # fmt: skip
    h.engine.submit_basket(cmd)
    for p in places(h.take()):
        h.ack(p)
    a, b = (h.order(h.engine.by_request[basket_leg_id(rid, n)]) for n in (1, 2))
    h.trade(a, 10, "1510.00")
    h.trade(b, 5, "3120.00")
    for p in places(h.take()):
        h.ack(p)
    [a_stop] = h.legs(a.order_id, STOP)
    h.trade(a_stop, 10, "1887.50")
    assert modifies(h.take()) == []
    assert h.legs(b.order_id, STOP)[0].trigger_price == D("3900.00")


def test_a_stop_moved_to_cost_whose_modify_was_lost_in_a_crash_is_sent_after_the_restart() -> None:
    store = MemoryOrderStore()
    h = Hand(store=store)
    infy, tcs = short_pair(h)
    [infy_stop], [tcs_stop] = h.legs(infy.order_id, STOP), h.legs(tcs.order_id, STOP)
    h.tick(3100.0, "TCS-EQ")
    h.trade(infy_stop, 10, "1887.50")
    [lost] = modifies(h.take())  # the process dies before the broker answers

    again = Hand(store=store, clock=h.clock)
    again.books([again.row(again.order(tcs_stop.order_id))], [])
    again.engine.reconcile_if_due()

    [resent] = modifies(again.take())
    assert (resent.order_id, resent.trigger_price) == (lost.order_id, D("3120.00"))
