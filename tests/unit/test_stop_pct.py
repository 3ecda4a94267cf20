"""A stop loss as a percent of the entry's fill price (``stop_loss_pct``; the straddle's
``leg_sl_pct``). Risk judges it from the last price and sends that estimate as ``stop_loss``;
execution moves the stop to the percent of the average fill price when the entry first fills,
before any stop leg goes out, so a premium that moved between the signal and the fill cannot
leave the stop a few paise from the entry (or on the wrong side of it)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common.messages import Codec, ExecuteOrder, OrderRequest, Tick, VerdictCode
from libs.common.money import pct_stop
from services.execution.brokers.base import BrokerOrderStatus, BrokerTrade
from services.execution.model import COMPLETE, OPEN, STOP
from tests.unit.test_engine_faults import Hand, execute, places
from tests.unit.test_risk_baskets import CE, PE, basket, leg, make

D = Decimal


def _sell_with_pct(h: Hand, estimate: str = "1612.50", pct: str = "25") -> str:
    [res] = h.engine.submit([execute(side="SELL", stop_loss=D(estimate), stop_loss_pct=D(pct))])
    [p] = places(h.take())
    h.ack(p)
    return res.order_id


def test_the_stop_is_set_from_the_first_fill_not_from_risks_estimate() -> None:
    h = Hand()
    eid = _sell_with_pct(h)  # risk saw 1290: estimate 1612.50
    h.trade(h.order(eid), 10, "1300.00")  # the market moved before the fill
    [stop] = places(h.take())
    assert stop.order.trigger_price == D("1625.00")  # 25 % above 1300, not above 1290
    b = h.engine.brackets[h.order(eid).bracket_id]
    assert b.stop_loss == D("1625.00") and b.stop_pct is None  # anchored once, for good
    assert stop.order.price is not None and stop.order.price > stop.order.trigger_price  # a BUY stop-limit


def test_a_partial_first_fill_anchors_the_stop_and_later_fills_do_not_move_it() -> None:
    h = Hand()
    eid = _sell_with_pct(h)
    h.trade(h.order(eid), 4, "1296.00")
    [first] = places(h.take())
    assert first.order.trigger_price == D("1620.00") and first.order.quantity == 4
    h.ack(first)
    h.trade(h.order(eid), 6, "1310.00")
    more = places(h.take())
    assert [p.order.trigger_price for p in more] == [D("1620.00")] and more[0].order.quantity == 6


def test_a_buy_stop_is_below_the_fill() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(side="BUY", stop_loss=D("1161.00"), stop_loss_pct=D("10"))])
    h.ack(places(h.take())[0])
    h.trade(h.order(res.order_id), 10, "1282.35")
    [stop] = places(h.take())
    assert stop.order.trigger_price == D("1154.10")  # 1282.35 x 0.9 = 1154.115, down to the tick
    assert h.legs(res.order_id, STOP)[0].trigger_price == D("1154.10")


def test_execution_refuses_a_percent_without_risks_estimate() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(side="SELL", stop_loss_pct=D("25"))])
    assert not res.ok and "stop_loss_pct needs risk's stop_loss estimate" in res.reason
    assert places(h.take()) == []


@pytest.mark.parametrize(
    ("side", "price", "pct", "stop"),
    [("SELL", "100.00", "25", "125.00"), ("SELL", "101.03", "25", "126.30"), ("BUY", "100.00", "25", "75.00"),
     ("BUY", "0.05", "99", "0.00")],
)  # fmt: skip
def test_pct_stop_rounds_away_from_the_entry(side: str, price: str, pct: str, stop: str) -> None:
    assert pct_stop(side, D(price), D(pct), D("0.05")) == D(stop)


# ---------------------------------------------------------------------------------- risk


def _marked(**risk: Any) -> Any:
    s, clock = make(**risk)
    for inst, ltp in ((CE, 120.0), (PE, 98.55)):
        s.on_tick(Tick(segment=inst.segment, token=inst.token, ltp=ltp, exch_ts_ns=clock.now_ns()))
    return s


def test_risk_turns_a_percent_into_an_estimate_and_passes_the_percent_on() -> None:
    s = _marked()
    legs = [msgspec.structs.replace(leg("SELL", inst, 65, "1"), price=None, stop_loss_pct=D("25"))
            for inst in (CE, PE)]  # fmt: skip
    verdict, execute_basket = s.evaluate_basket(basket(*legs))
    assert verdict.approved, verdict.reason
    assert execute_basket is not None
    orders = [x.order for x in execute_basket.legs]
    assert [o.stop_loss for o in orders] == [D("150.00"), D("123.20")]  # 98.55 x 1.25 = 123.1875, up
    assert all(o.stop_loss_pct == D("25") for o in orders)


@pytest.mark.parametrize(
    ("side", "extra", "words"),
    [("SELL", {"stop_loss": D("150.00")}, "give stop_loss or stop_loss_pct, not both"),
     ("BUY", {"stop_loss_pct": D("100")}, "BUY stop_loss_pct 100 must be below 100")],
)  # fmt: skip
def test_risk_refuses_a_percent_it_cannot_use(side: str, extra: dict[str, Any], words: str) -> None:
    s = _marked()
    extra.setdefault("stop_loss_pct", D("25"))
    req = OrderRequest(request_id="r1", strategy_id="s1", side=side, symbol=CE.symbol, quantity=65,
                       product="NRML", **extra)  # fmt: skip
    verdict, execute_order = s.evaluate(req)
    assert not verdict.approved and verdict.code == VerdictCode.BRACKET and words in verdict.reason
    assert execute_order is None


@pytest.mark.parametrize("bad", ["NaN", "0", "-5", "501", "1E+26", "Infinity"])
def test_a_percent_out_of_range_never_decodes(bad: str) -> None:
    codec = Codec()
    req = OrderRequest(request_id="r1", strategy_id="s1", side="SELL", quantity=65, symbol="X",
                       stop_loss_pct=D(bad))  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="stop_loss_pct"):
        codec.decode(codec.encode(req))
    execute_order = ExecuteOrder(request_id="r1", order=req, quantity=65, segment="nse_cm", token="1",
                                 symbol="X")  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match=r"order\.stop_loss_pct"):
        codec.decode(codec.encode(execute_order))


# ----------------------------------------------------------- kill -9 around the anchoring


def _trade_row(o: Any, qty: int, price: str) -> BrokerTrade:
    return BrokerTrade(trade_id="T1", broker_order_id=o.broker_order_id, client_tag=o.client_tag,
                       side=o.side, quantity=qty, price=D(price))  # fmt: skip


def _complete(o: Any) -> BrokerOrderStatus:
    return BrokerOrderStatus(broker_order_id=o.broker_order_id, client_tag=o.client_tag, status=COMPLETE,
                             quantity=o.quantity, filled_qty=o.quantity)  # fmt: skip


def test_a_kill_after_the_fill_anchored_the_stop_in_memory_anchors_it_again_from_the_books() -> None:
    h = Hand()
    eid = _sell_with_pct(h)
    entry = h.order(eid)
    # the trade arrives and the stop is anchored in memory; kill -9 before anything is written
    h.engine.on_broker_event(_trade_row(entry, 10, "1300.00"))
    assert h.engine.brackets[entry.bracket_id].stop_loss == D("1625.00")  # anchored in memory
    assert h.store.brackets[entry.bracket_id].stop_pct == D("25")  # the ledger still has the percent

    h2 = Hand(store=h.store, clock=h.clock)
    h2.books([_complete(entry)], [_trade_row(entry, 10, "1300.00")])

    [stop] = places(h2.take())
    assert stop.order.trigger_price == D("1625.00") and stop.order.quantity == 10  # from the fill, once
    b = h2.store.brackets[entry.bracket_id]
    assert b.stop_loss == D("1625.00") and b.stop_pct is None
    h2.ack(stop)
    h2.books([_complete(entry)], [_trade_row(entry, 10, "1300.00")])
    assert places(h2.take()) == []  # the books again: no second stop


def test_a_kill_after_the_anchored_stop_was_sent_keeps_it_and_never_sends_another() -> None:
    h = Hand()
    eid = _sell_with_pct(h)
    entry = h.order(eid)
    h.trade(entry, 10, "1300.00")
    [stop] = places(h.take())  # the stop's row committed and sent: kill -9 before the answer
    stop_row = h.order(stop.order_id)
    assert h.store.brackets[entry.bracket_id].stop_loss == D("1625.00")

    h2 = Hand(store=h.store, clock=h.clock)
    at_broker = BrokerOrderStatus(broker_order_id="B9", client_tag=stop_row.client_tag, status=OPEN,
                                  quantity=10)  # fmt: skip
    h2.books([_complete(entry), at_broker], [_trade_row(entry, 10, "1300.00")])

    assert places(h2.take()) == []
    [leg_row] = h2.legs(eid, STOP)
    assert leg_row.order_id == stop_row.order_id and leg_row.broker_order_id == "B9"
    assert leg_row.trigger_price == D("1625.00")
    assert h2.store.brackets[entry.bracket_id].stop_pct is None
