"""Baskets in the pure execution engine, driven by hand (the ``HandBroker`` harness of
``test_engine_faults``): the test answers every intent, in whatever order a broker might.

The basket is a hedged pair: BUY 10 INFY-EQ (the protective long) and SELL 5 TCS-EQ (the
short). Equities stand in for option legs; the engine's rules do not look at the type.
"""

from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal
from typing import Any

import msgspec

from libs.common.chain import chain
from libs.common.clock import IST
from libs.common.config import load_config
from libs.common.messages import (
    CANCELLED,
    COMPLETE,
    OPEN,
    PENDING_BROKER,
    REJECTED,
    BasketState,
    ExecuteBasket,
    Flatten,
    Tick,
    basket_leg_id,
)
from services.backtest.runner import run_backtest
from services.execution.brokers.base import BrokerRejected, BrokerTemporary, BrokerTrade
from services.execution.engine import BooksIntent, ExecutionEngine, PlaceIntent, PositionsIntent
from services.execution.model import FLATTEN_P, OrderRow
from services.execution.store import MemoryOrderStore
from services.strategy.base import Strategy
from tests.kit import execute_order
from tests.unit.test_engine_faults import MASTER, Hand, HandBroker, cancels, places

INFY = MASTER.resolve("INFY-EQ")
TCS = MASTER.resolve("TCS-EQ")
_ids = itertools.count(1)


def basket(*legs: tuple[Any, str, int, str], rid: str = "", **kw: Any) -> ExecuteBasket:
    rid = rid or f"bk{next(_ids)}"
    return ExecuteBasket(
        request_id=rid, strategy_id="s1",
        legs=[execute_order(inst, side, qty, price, rid=basket_leg_id(rid, n), order_type="LIMIT", **kw)
              for n, (inst, side, qty, price) in enumerate(legs, 1)],
    )  # fmt: skip


def pair(rid: str = "", **kw: Any) -> ExecuteBasket:
    return basket((INFY, "BUY", 10, "1510.00"), (TCS, "SELL", 5, "3120.00"), rid=rid, **kw)


def hedged_pair(rid: str) -> ExecuteBasket:
    """``pair`` whose long leg (the hedge) carries its own stop at 1490."""
    return ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order(INFY, "BUY", 10, "1510.00", rid=basket_leg_id(rid, 1), order_type="LIMIT",
                      stop_loss=Decimal("1490.00")),
        execute_order(TCS, "SELL", 5, "3120.00", rid=basket_leg_id(rid, 2), order_type="LIMIT"),
    ])  # fmt: skip


def symbol_of(h: Hand, p: PlaceIntent) -> str:
    return h.order(p.order_id).symbol


def stored_state(h: Hand) -> str:
    [k] = h.store.baskets.values()
    return k.state


def leg(h: Hand, rid: str, n: int) -> OrderRow:
    return h.order(h.engine.by_request[basket_leg_id(rid, n)])


# ------------------------------------------------------------------ long legs first


def test_every_leg_is_in_the_ledger_before_the_broker_sees_any_and_only_the_long_goes_first() -> None:
    h = Hand()

    res = h.engine.submit_basket(pair("b1"))
    sent = places(h.take())

    assert res.ok and res.state == BasketState.PLACING_LONGS
    assert [symbol_of(h, p) for p in sent] == ["INFY-EQ"]
    stored = {o.request_id: o.status for o in h.store.orders.values()}
    assert stored == {"b1:leg1": PENDING_BROKER, "b1:leg2": PENDING_BROKER}
    assert stored_state(h) == BasketState.PLACING_LONGS


def test_the_short_leg_goes_once_the_long_is_filled_in_full_and_the_basket_says_placed_first() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())

    h.ack(long_place)
    after_ack = places(h.take())
    h.trade(h.order(long_place.order_id), 4, "1510.00")
    after_part = places(h.take())
    h.trade(h.order(long_place.order_id), 6, "1510.00")
    sent = places(h.take())

    assert after_ack == [] and after_part == []  # acked or partly filled, the long may still rest
    assert [symbol_of(h, p) for p in sent] == ["TCS-EQ"]
    assert stored_state(h) == BasketState.PLACED


def test_a_fill_before_the_ack_also_releases_the_short_leg() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    long_leg = h.order(long_place.order_id)
    long_leg.broker_order_id = "B9"
    h.engine.by_broker_id["B9"] = long_leg.order_id

    h.trade(long_leg, 10, "1510.00")

    assert [symbol_of(h, p) for p in places(h.take())] == ["TCS-EQ"]


def test_a_basket_with_no_long_leg_goes_out_whole() -> None:
    h = Hand()

    h.engine.submit_basket(basket((INFY, "SELL", 10, "1510.00"), (TCS, "SELL", 5, "3120.00")))

    assert sorted(symbol_of(h, p) for p in places(h.take())) == ["INFY-EQ", "TCS-EQ"]


def test_reconciliation_never_closes_a_held_short_leg() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    places(h.take())  # the long is in flight, the short held

    h.books([], [])
    h.clock.advance(2.0)
    h.books([], [])

    assert leg(h, "b1", 2).status == PENDING_BROKER


# ------------------------------------------------------------------ a leg fails


def test_a_rejected_long_leg_means_the_short_is_never_placed() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())

    h.answer(long_place, BrokerRejected("RMS: margin exceeds"))

    assert places(h.take()) == []
    assert leg(h, "b1", 2).status == CANCELLED
    assert stored_state(h) == BasketState.FAILED
    assert h.codes() == ["basket_failed"]
    assert "leg 1 BUY 10 INFY-EQ rejected (RMS: margin exceeds)" in h.alerts[0].text
    assert h.alerts[0].level == "WARNING"  # nothing was filled or left working


def test_a_leg_not_placed_for_a_passing_reason_fails_the_basket_too() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())

    h.answer(long_place, BrokerTemporary("429 too many requests"))

    assert places(h.take()) == []
    assert stored_state(h) == BasketState.FAILED


def test_a_rejected_short_leg_closes_the_filled_long_and_raises_a_critical_alert() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())

    h.answer(short_place, BrokerRejected("scrip is in ban period"))
    [close] = places(h.take())

    row = h.order(close.order_id)
    assert (row.side, row.quantity, row.symbol, row.purpose) == ("SELL", 10, "INFY-EQ", FLATTEN_P)
    assert row.request_id == "b1:undo1"
    assert row.price == Decimal("1494.90")  # 1510 less the 1 % protection band, on tick
    assert stored_state(h) == BasketState.FAILED
    assert h.codes() == ["basket_failed", "basket_rolled_back"]
    assert h.alerts[0].level == "CRITICAL"
    assert "leg 2 SELL 5 TCS-EQ rejected (scrip is in ban period)" in h.alerts[0].text
    h.ack(close)
    h.trade(row, 10, "1509.00")
    assert h.position(key=INFY.key) == 0


def test_a_rejection_after_the_ack_still_rolls_back() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())
    h.ack(short_place)

    h.status(h.order(short_place.order_id), REJECTED)

    [close] = places(h.take())
    assert h.order(close.order_id).side == "SELL"
    assert stored_state(h) == BasketState.FAILED


def test_rollback_waits_for_the_broker_to_confirm_a_working_leg_ended_then_closes_what_it_filled() -> None:
    h = Hand()
    h.engine.submit_basket(basket((INFY, "BUY", 10, "1510.00"), (TCS, "BUY", 5, "3120.00"),
                                  (TCS, "SELL", 5, "3150.00"), rid="b1"))  # fmt: skip
    infy, tcs = places(h.take())
    h.ack(infy)
    h.trade(h.order(infy.order_id), 4, "1510.00")  # partly filled, still working
    h.answer(tcs, BrokerRejected("no margin"))

    [cancel] = cancels(h.take())
    assert cancel.order_id == infy.order_id
    assert places(h.take()) == []  # nothing is closed while a fill may still come
    h.trade(h.order(infy.order_id), 2, "1510.00")
    h.status(h.order(infy.order_id), CANCELLED, filled=6)

    [close] = places(h.take())
    assert (h.order(close.order_id).side, h.order(close.order_id).quantity) == ("SELL", 6)
    assert leg(h, "b1", 3).status == CANCELLED  # the held short never went out


def test_with_rollback_off_the_basket_only_stops_placing() -> None:
    h = Hand()
    h.engine.basket_rollback = False
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())

    h.answer(short_place, BrokerRejected("no margin"))

    assert h.take() == []
    assert h.position(key=INFY.key) == 10
    assert h.codes() == ["basket_failed"]
    assert "basket_rollback is off" in h.alerts[0].text


def test_a_leg_execution_refuses_itself_means_no_leg_is_placed() -> None:
    h = Hand()

    res = h.engine.submit_basket(basket((INFY, "BUY", 10, "1510.00"), (TCS, "SELL", 5, "3120.05")))

    assert not res.ok
    assert places(h.take()) == []
    assert [x.status for x in res.legs] == [REJECTED, REJECTED]
    assert "tick" in res.reason


# ------------------------------------------------------------------ repeats, kill switch, flatten


def test_a_repeat_of_the_basket_is_answered_from_the_ledger_and_places_nothing() -> None:
    h = Hand()
    first = h.engine.submit_basket(pair("b1"))
    places(h.take())

    again = h.engine.submit_basket(pair("b1"))

    assert again.ok and again.basket_id == first.basket_id
    assert [x.order_id for x in again.legs] == [x.order_id for x in first.legs]
    assert h.take() == []
    assert len(h.store.orders) == 2


def test_the_kill_switch_during_a_basket_places_no_new_leg_and_cancels_the_working_one() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)  # working, unfilled: b1's short is held
    b1_short = leg(h, "b1", 2)
    h.engine.submit_basket(pair("b2"))
    [long2] = places(h.take())
    h.ack(long2)
    h.trade(h.order(long2.order_id), 10, "1510.00")  # releases b2's short into this flush
    b2_short = leg(h, "b2", 2)

    ids = h.engine.cancel_entries("kill switch")
    intents = h.take()

    assert [h.order(p.order_id).purpose for p in places(intents)] == [FLATTEN_P]  # b2's long, rolled back
    assert b1_short.status == CANCELLED and b2_short.status == CANCELLED  # never sent: withdrawn
    assert {c.order_id for c in cancels(intents)} == {long_place.order_id}
    assert set(ids) == {long_place.order_id, b1_short.order_id, b2_short.order_id}
    for c in cancels(intents):
        h.status(h.order(c.order_id), CANCELLED)
    states = {k.request_id: k.state for k in h.store.baskets.values()}
    assert states == {"b1": BasketState.FAILED, "b2": BasketState.FAILED}
    assert places(h.take()) == []  # b1 filled nothing: nothing more to close


def test_flatten_during_a_basket_takes_it_over_and_closes_once() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short1] = places(h.take())
    h.ack(short1)
    h.tick(1510.0, "INFY-EQ")
    h.engine.submit_basket(pair("b2"))
    [long2] = places(h.take())
    h.ack(long2)  # b2's short is released but not yet sent when the flatten comes
    reports: list[dict[str, Any]] = []

    h.engine.flatten(Flatten(request_id="f1"), reports.append)
    intents = h.take()
    for c in cancels(intents):
        h.status(h.order(c.order_id), CANCELLED)
    closes = [p for p in places(intents + h.take()) if h.order(p.order_id).purpose == FLATTEN_P]

    states = {k.request_id: k.state for k in h.store.baskets.values()}
    assert states == {"b1": BasketState.FAILED, "b2": BasketState.FAILED}
    assert leg(h, "b2", 2).status == CANCELLED
    assert [h.order(p.order_id).request_id.startswith("flatten:") for p in closes] == [True]
    assert not any(o.request_id.endswith(":undo1") for o in h.engine.orders.values())


# ------------------------------------------------------------------ restart in the middle


def restarted(h: Hand) -> Hand:
    return Hand(store=h.store, clock=h.clock)


def test_a_restart_before_the_long_was_acked_holds_the_short_until_the_books_show_the_long_filled() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())  # sent, then kill -9 before the answer was written
    long_row = h.order(long_place.order_id)

    h2 = restarted(h)
    assert places(h2.pending) == []  # nothing is placed again blindly
    h2.books([h2.row(long_row)], [])
    while_open = places(h2.take())
    done = msgspec.structs.replace(h2.row(long_row), status=COMPLETE, filled_qty=10)
    h2.books([done], [BrokerTrade(trade_id="T1", broker_order_id="", client_tag=long_row.client_tag,
                                  side="BUY", quantity=10, price=Decimal("1510.00"))])  # fmt: skip

    sent = places(h2.take())
    assert while_open == []  # in the book but not filled: the short still waits
    assert [symbol_of(h2, p) for p in sent] == ["TCS-EQ"]
    assert stored_state(h2) == BasketState.PLACED


def test_a_restart_after_a_long_that_never_reached_the_broker_rolls_back_and_never_places_the_short() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    places(h.take())  # the crash came before the call

    h2 = restarted(h)
    h2.books([], [])
    h2.clock.advance(2.0)
    h2.books([], [])

    assert places(h2.take()) == []
    assert leg(h2, "b1", 1).status == REJECTED
    assert leg(h2, "b1", 2).status == CANCELLED
    assert stored_state(h2) == BasketState.FAILED


def test_a_restart_after_the_shorts_were_released_places_nothing_twice() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())  # sent, then kill -9
    long_row, short_row = h.order(long_place.order_id), h.order(short_place.order_id)
    short_row.broker_order_id = "B77"

    h2 = restarted(h)
    long_done = msgspec.structs.replace(h2.row(long_row), status=COMPLETE, filled_qty=10)
    h2.books([long_done, h2.row(short_row)], [])

    assert places(h2.take()) == []
    assert leg(h2, "b1", 2).status == OPEN
    assert stored_state(h2) == BasketState.PLACED


def test_a_restart_during_the_rollback_closes_once() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())
    h.answer(short_place, BrokerRejected("no margin"))
    [close] = places(h.take())

    h2 = restarted(h)
    closes = [o for o in h2.store.orders.values() if o.request_id == "b1:undo1"]

    assert places(h2.pending) == [] and len(closes) == 1
    assert isinstance(h2.store, MemoryOrderStore) and close.order_id == closes[0].order_id


# ------------------------------------------------------------------ the backtest pipeline


class SpreadOnce(Strategy):
    """Opens one bear call spread as a basket: BUY the far call (the hedge), SELL the near one."""

    name = "spread-once"

    def on_tick(self, tick: Tick) -> None:
        master = self.ctx.master
        assert master is not None
        near, far = sorted((master.resolve(x) for x in self.ctx.instruments), key=lambda i: i.strike or 0)
        if not getattr(self, "sent", False) and self.last.get(near.key) and self.last.get(far.key):
            self.sent = True
            self.basket([self.leg("BUY", far, 65, price=self.last[far.key].ltp + 1),
                         self.leg("SELL", near, 65, price=self.last[near.key].ltp - 1)])  # fmt: skip


def test_a_backtest_trades_a_two_leg_basket_and_its_report_shows_each_leg() -> None:
    today = dt.datetime.now(IST).date()
    weekly = chain(MASTER, "NIFTY", "weekly", today=today)
    atm = weekly.strikes[len(weekly.strikes) // 2]
    near, far = weekly.call(atm), weekly.call(atm + weekly.step)
    t0 = int(dt.datetime.combine(today, dt.time(9, 30), IST).timestamp() * 1e9)
    ticks = []
    for i in range(40):
        ts = t0 + i * 10**9
        ticks.append(Tick(segment=near.segment, token=near.token, ltp=120.0 - i * 0.1, exch_ts_ns=ts))
        ticks.append(Tick(segment=far.segment, token=far.token, ltp=90.0 - i * 0.1, exch_ts_ns=ts + 1))

    report = run_backtest(ticks, "tests.unit.test_baskets_engine:SpreadOnce", {}, cfg=load_config(env={}),
                          master=MASTER, instruments=[near.symbol, far.symbol]).report  # fmt: skip

    legs = {t["symbol"]: t for t in report["trade_list"]}
    assert set(legs) == {near.symbol, far.symbol}
    assert report["orders"] == {"requested": 2, "approved": 2, "rejected": 0}
    assert (legs[far.symbol]["direction"], legs[far.symbol]["quantity"]) == ("LONG", 65)
    assert (legs[near.symbol]["direction"], legs[near.symbol]["quantity"]) == ("SHORT", 65)


def test_a_held_short_goes_out_even_when_the_longs_fill_comes_after_the_deadline() -> None:
    h = Hand()
    deadline = h.clock.now_ns() + 1_000_000_000  # the legs and the basket carry risk's deadline
    h.engine.submit_basket(msgspec.structs.replace(pair("b1", expires_ns=deadline), expires_ns=deadline))
    [long_place] = places(h.take())

    h.clock.advance(5.0)  # the long's fill is slow; risk was answered long ago
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())

    assert short_place.expires_ns == 0 and h.order(short_place.order_id).symbol == "TCS-EQ"


def test_a_basket_committed_after_its_deadline_places_nothing() -> None:
    h = Hand()
    cmd = msgspec.structs.replace(pair("b1"), expires_ns=h.clock.now_ns() - 1)

    res = h.engine.submit_basket(cmd)

    assert not res.ok and places(h.take()) == []
    assert "not placed" in leg(h, "b1", 1).reason


def test_each_leg_gets_its_own_bracket_and_a_rollback_cancels_it_before_closing_the_leg() -> None:
    h2 = Hand()
    rid = "b2"
    cmd = ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order(INFY, "BUY", 10, "1510.00", rid=basket_leg_id(rid, 1), order_type="LIMIT",
                      stop_loss=Decimal("1490.00"), target=Decimal("1540.00")),
        execute_order(TCS, "SELL", 5, "3120.00", rid=basket_leg_id(rid, 2), order_type="LIMIT"),
    ])  # fmt: skip
    h2.engine.submit_basket(cmd)
    [long_place] = places(h2.take())
    h2.ack(long_place)
    h2.trade(h2.order(long_place.order_id), 10, "1510.00")
    intents = places(h2.take())
    by_purpose = {h2.order(p.order_id).purpose: p for p in intents}
    assert set(by_purpose) == {"ENTRY", "STOP", "TARGET"}  # the short, and the long leg's own bracket
    for p in intents:
        h2.ack(p)

    h2.status(h2.order(by_purpose["ENTRY"].order_id), REJECTED)  # the short leg
    legs_cancelled = {c.order_id for c in cancels(h2.take())}

    assert legs_cancelled == {by_purpose["STOP"].order_id, by_purpose["TARGET"].order_id}
    assert places(h2.take()) == []  # no close while the stop could still sell
    for oid in legs_cancelled:
        h2.status(h2.order(oid), CANCELLED)
    [close] = places(h2.take())
    assert (h2.order(close.order_id).side, h2.order(close.order_id).quantity) == ("SELL", 10)


# ------------------------------------------------------------------ sliced legs, resting longs, own exits


def _options() -> tuple[Any, Any]:
    weekly = chain(MASTER, "NIFTY", "weekly")
    return weekly.call(weekly.strikes[20]), weekly.call(weekly.strikes[22])


def test_one_rejected_slice_of_a_long_leg_fails_the_basket_at_once_and_no_short_goes_out() -> None:
    near, far = _options()
    assert near.freeze_qty and near.freeze_qty < 3250  # two slices
    h = Hand()
    h.engine.submit_basket(basket((near, "BUY", 3250, "100.00"), (far, "SELL", 3250, "80.00"), rid="k1"))
    s1, s2 = places(h.take())

    h.answer(s1, BrokerRejected("RMS: margin exceeds"))
    h.ack(s2)
    intents = h.take()

    assert places(intents) == []  # neither short slice is ever released
    assert [c.order_id for c in cancels(intents)] == [s2.order_id]  # the surviving slice is cancelled
    assert all(h.order(x).status == CANCELLED for x in h.engine.children[leg(h, "k1", 2).order_id])
    assert stored_state(h) == BasketState.ROLLING_BACK
    assert h.codes() == ["basket_failed"]
    assert f"leg 1 BUY 3250 {near.symbol} (slice " in h.alerts[0].text
    assert "rejected (RMS: margin exceeds)" in h.alerts[0].text


def test_a_long_leg_resting_past_basket_fill_timeout_fails_the_basket_and_closes_what_it_filled() -> None:
    h = Hand()
    assert h.engine.basket_fill_timeout_s == 30.0
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 4, "1510.00")  # partly filled; the rest rests below the market

    h.clock.advance(29.0)
    h.engine.reconcile_if_due()
    before = h.take()
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    [cancel] = cancels(h.take())
    h.status(h.order(long_place.order_id), CANCELLED, filled=4)
    [close] = places(h.take())

    assert before == []
    assert cancel.order_id == long_place.order_id
    assert leg(h, "b1", 2).status == CANCELLED  # the short never went out
    row = h.order(close.order_id)
    assert (row.side, row.quantity, row.request_id) == ("SELL", 4, "b1:undo1")
    assert stored_state(h) == BasketState.FAILED
    assert "leg 1 BUY 10 INFY-EQ filled 4 of 10 within 30 s (execution.basket_fill_timeout_s)" in (
        h.alerts[0].text)


def test_a_rollback_never_closes_what_the_legs_own_stop_already_closed() -> None:
    h = Hand()
    h.engine.submit([execute_order(INFY, "BUY", 10, "1500.00", rid="pre1", order_type="LIMIT")])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(p.order_id), 10, "1500.00")  # the strategy already holds 10 INFY of its own
    h.engine.submit_basket(hedged_pair("b9"))
    [lp] = places(h.take())
    h.ack(lp)
    h.trade(h.order(lp.order_id), 10, "1510.00")
    intents = places(h.take())
    by_purpose = {h.order(x.order_id).purpose: x for x in intents}
    for x in intents:
        h.ack(x)
    stop = h.order(by_purpose["STOP"].order_id)
    h.trade(stop, 10, "1490.00")  # the leg's own stop closed the leg
    h.status(stop, COMPLETE, filled=10)

    h.status(h.order(by_purpose["ENTRY"].order_id), REJECTED)  # then the short leg fails

    assert places(h.take()) == []  # the 10 INFY held now are the strategy's earlier ones
    assert h.position(key=INFY.key) == 10
    assert stored_state(h) == BasketState.FAILED


def _rolled_back(h: Hand) -> PlaceIntent:
    """b1 with its long filled and its short rejected: the rollback's one close, placed."""
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    h.trade(h.order(long_place.order_id), 10, "1510.00")
    [short_place] = places(h.take())
    h.answer(short_place, BrokerRejected("no margin"))
    [close] = places(h.take())
    h.ack(close)
    return close


def test_a_rollback_close_the_market_gapped_past_is_re_priced_then_raises_critical() -> None:
    h = Hand()
    close = _rolled_back(h)  # SELL 10 INFY @ 1494.90; the market falls through it
    h.tick(1400.0, "INFY-EQ")

    h.clock.advance(9.0)
    h.engine.reconcile_if_due()
    early = h.take()
    h.clock.advance(1.0)
    h.engine.reconcile_if_due()
    [cancel] = cancels(h.take())
    h.status(h.order(close.order_id), CANCELLED)
    [again] = places(h.take())

    assert early == [] and cancel.order_id == close.order_id
    row = h.order(again.order_id)
    assert (row.side, row.quantity, row.request_id) == ("SELL", 10, "b1:undo1:r1")
    assert row.price == Decimal("1386.00")  # 1 % through the new last price
    assert "rollback close re-priced: SELL 10 INFY-EQ @ 1386" in h.alerts[-1].text
    h.ack(again)
    for n in (2, 3):  # the market keeps running away
        h.clock.advance(10.0)
        h.engine.reconcile_if_due()
        [c] = cancels(h.take())
        h.status(h.order(c.order_id), CANCELLED)
        [p] = places(h.take())
        assert h.order(p.order_id).request_id == f"b1:undo1:r{n}"
        h.ack(p)
    h.clock.advance(10.0)
    h.engine.reconcile_if_due()
    assert h.take() == []  # three re-prices at most
    assert h.alerts[-1].level == "CRITICAL" and h.alerts[-1].code == "basket_close_failed"
    assert "still open after 3 re-price(s); close it by hand" in h.alerts[-1].text


def test_a_rollback_close_that_fills_is_not_chased() -> None:
    h = Hand()
    close = _rolled_back(h)
    h.trade(h.order(close.order_id), 10, "1500.00")

    h.clock.advance(30.0)
    h.engine.reconcile_if_due()

    assert h.take() == [] and h.position(key=INFY.key) == 0
    assert h.codes() == ["basket_failed", "basket_rolled_back"]


def test_a_basket_left_open_on_an_earlier_day_ends_at_start_with_a_warning() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)  # resting at the close; its short held

    h.clock.advance(86_400.0)
    h2 = restarted(h)
    h2.take()

    assert stored_state(h2) == BasketState.FAILED
    assert "expired" in next(iter(h2.store.baskets.values())).reason
    warning = [a for a in h2.alerts if a.code == "basket_failed"]
    assert len(warning) == 1 and warning[0].level == "WARNING"
    assert "basket b1 of " in warning[0].text and "left PLACING_LONGS" in warning[0].text
    assert h2.engine.basket_list() == []


def test_a_repeat_of_the_basket_id_with_different_legs_is_refused_and_places_nothing() -> None:
    h = Hand()
    first = h.engine.submit_basket(pair("b1"))
    places(h.take())
    changed = basket((INFY, "BUY", 20, "1510.00"), (TCS, "SELL", 5, "3120.00"), rid="b1")

    again = h.engine.submit_basket(changed)

    assert not again.ok and again.code == "refused"
    assert again.reason.startswith("basket id reused with different legs: leg 1 is BUY 20 INFY-EQ @ 1510.00")
    assert h.take() == [] and len(h.store.orders) == 2
    assert h.engine.submit_basket(pair("b1")).basket_id == first.basket_id  # the true repeat still answered


def test_after_a_restart_the_fill_deadline_waits_for_the_books_before_failing_a_basket() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [long_place] = places(h.take())
    h.ack(long_place)
    long_row = h.order(long_place.order_id)
    h.clock.advance(60.0)  # down past the deadline; the long filled meanwhile

    h2 = Hand.__new__(Hand)  # Hand's own start, but the first books are the test's
    h2.cfg, h2.clock, h2.store = h.cfg, h.clock, h.store
    h2.engine = ExecutionEngine(h2.store, HandBroker(), MASTER, h2.clock, h2.cfg.execution)
    h2.engine.start()
    h2.boids, h2.tids, h2.alerts, h2.pending = itertools.count(1), itertools.count(1), [], []
    before = stored_state(h2)
    done = msgspec.structs.replace(h2.row(long_row), status=COMPLETE, filled_qty=10)
    trade = BrokerTrade(trade_id="T1", broker_order_id=long_row.broker_order_id,
                        client_tag=long_row.client_tag, side="BUY", quantity=10, price=Decimal("1510.00"))
    for i in h2.take():
        if isinstance(i, PositionsIntent):
            h2.answer(i, [])
        elif isinstance(i, BooksIntent):
            h2.answer(i, ([done], [trade]))

    assert before == BasketState.PLACING_LONGS  # nothing failed before the books were read
    assert [symbol_of(h2, p) for p in places(h2.take())] == ["TCS-EQ"]
    assert stored_state(h2) == BasketState.PLACED


# ------------------------------------------------------------------ after review (session 4)


def _placed_pair(h: Hand) -> tuple[OrderRow, OrderRow]:
    """The pair basket PLACED: its long INFY filled, its short TCS acknowledged and working."""
    h.engine.submit_basket(pair("b1"))
    [lp] = places(h.take())
    h.ack(lp)
    h.trade(h.order(lp.order_id), 10, "1510.00")
    [sp] = places(h.take())
    h.ack(sp)
    return h.order(lp.order_id), h.order(sp.order_id)


def test_a_flatten_of_the_hedge_alone_cancels_the_baskets_working_short_and_says_what_stays() -> None:
    h = Hand()
    _long, short = _placed_pair(h)
    h.tick(1510.0, "INFY-EQ")

    h.engine.flatten(Flatten(request_id="f1", symbol="INFY-EQ"), lambda _r: None)

    assert short.order_id in [c.order_id for c in cancels(h.take())]  # it cannot fill unhedged
    assert stored_state(h) == BasketState.FAILED
    [alert] = [a for a in h.alerts if a.code == "basket_failed"]
    assert alert.level == "CRITICAL" and "leg 2 SELL 5 TCS-EQ" in alert.text and "filled 0" in alert.text


def test_a_restart_during_a_rollback_keeps_chasing_its_close() -> None:
    h = Hand()
    h.engine.submit_basket(pair("b1"))
    [lp] = places(h.take())
    h.ack(lp)
    h.trade(h.order(lp.order_id), 10, "1510.00")
    [sp] = places(h.take())
    h.answer(sp, BrokerRejected("RMS: margin exceeds"))
    [close] = places(h.take())
    h.ack(close)
    h.tick(1400.0, "INFY-EQ")  # the market gaps away from the resting close

    h2 = restarted(h)
    h2.take()
    h2.books([h2.row(h2.order(close.order_id))], [])
    h2.take()
    h2.clock.advance(11.0)  # past the chase time
    h2.engine.reconcile_if_due()
    [c] = cancels(h2.take())  # re-priced: cancelled first...
    assert c.order_id == close.order_id
    h2.status(h2.order(close.order_id), CANCELLED)
    [again] = places(h2.take())  # ...then placed again at the new price
    row = h2.order(again.order_id)
    assert row.request_id == "b1:undo1:r1" and row.side == "SELL" and row.quantity == 10


def test_a_repeat_of_a_finished_basket_after_a_restart_and_a_day_of_settling_is_answered_placed() -> None:
    h = Hand()
    long, short = _placed_pair(h)
    h.status(long, COMPLETE, filled=10)
    h.trade(short, 5, "3120.00")
    h.status(short, COMPLETE, filled=5)
    assert stored_state(h) == BasketState.COMPLETE

    h2 = restarted(h)
    h2.take()
    book = [h2.row(h2.order(x.order_id)) for x in (long, short)]
    for _ in range(3):
        h2.clock.advance(400.0)
        h2.books(book, [])
        h2.engine.flush()
        h2.engine.evict_settled()

    again = h2.engine.submit_basket(pair("b1"))
    assert again.ok, again.reason


def test_a_rejected_stop_on_a_baskets_long_hedge_is_not_closed_while_it_hedges_a_short() -> None:
    h = Hand()
    h.engine.submit_basket(hedged_pair("b1"))
    [lp] = places(h.take())
    h.ack(lp)
    h.tick(1510.0, "INFY-EQ")
    h.trade(h.order(lp.order_id), 10, "1510.00")
    sent = {h.order(p.order_id).purpose: p for p in places(h.take())}
    for p in sent.values():
        h.ack(p)
    h.trade(h.order(sent["ENTRY"].order_id), 5, "3120.00")  # the short fills: hedged

    h.status(h.order(sent["STOP"].order_id), REJECTED)

    assert not places(h.take())  # the hedge is kept: selling it would leave the short naked
    [alert] = [a for a in h.alerts if a.code == "unprotected_kept"]
    assert alert.level == "CRITICAL" and "leg 2 SELL 5 TCS-EQ" in alert.text
    assert h.position(key=INFY.key) == 10 and h.position(key=TCS.key) == -5
