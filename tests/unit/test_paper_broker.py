"""PaperBroker: fill rules at the touch with slippage capped by the limit, resting limits at
their own price, stop-limits on trigger, partial fills by shown size, unique ids, and a
journal that rebuilds the same books after a crash."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from libs.common.clock import ManualClock
from libs.common.instruments import MasterData
from libs.common.messages import Tick
from services.execution.brokers.base import BrokerOrder, BrokerRejected, BrokerTrade
from services.execution.brokers.paper import PaperBroker

MASTER = MasterData.load()
REL = MASTER.resolve("RELIANCE-EQ")
DAY_NS = 1_763_700_000_000_000_000


def tick(ltp: float, bid: float = 0.0, ask: float = 0.0, **kw: float) -> Tick:
    return Tick(segment=REL.segment, token=REL.token, ltp=ltp, bid=bid, ask=ask, **kw)  # type: ignore[arg-type]


def order(
    side: str = "BUY",
    qty: int = 10,
    price: str = "1290.00",
    tag: str = "np0000000001",
    order_type: str = "LIMIT",
    trigger: str | None = None,
) -> BrokerOrder:
    return BrokerOrder(
        client_tag=tag,
        segment=REL.segment,
        token=REL.token,
        symbol=REL.symbol,
        side=side,
        quantity=qty,
        price=Decimal(price),
        order_type=order_type,
        trigger_price=Decimal(trigger) if trigger else None,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(DAY_NS)


def trades(b: PaperBroker) -> list[BrokerTrade]:
    return [e for e in b.drain_events() if isinstance(e, BrokerTrade)]


def test_marketable_buy_fills_at_the_ask_plus_slippage_never_beyond_the_limit(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, slippage_bps=10)
    b.on_tick(tick(1290.0, bid=1289.9, ask=1290.1))
    b.place(order(price="1302.90"))
    [t] = trades(b)
    assert t.price == Decimal("1291.40")  # 1290.1 x 1.001 = 1291.39 → up to the tick
    b.place(order(price="1290.20", tag="np0000000002"))  # the cap: never beyond the limit
    [t2] = trades(b)
    assert t2.price == Decimal("1290.20")


def test_marketable_sell_fills_at_the_bid_minus_slippage(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, slippage_bps=10)
    b.on_tick(tick(1290.0, bid=1289.9, ask=1290.1))
    b.place(order(side="SELL", price="1277.10"))
    [t] = trades(b)
    assert t.price == Decimal("1288.60")  # 1289.9 x 0.999 = 1288.61 → down to the tick


def test_resting_limit_fills_at_its_own_price_when_crossed(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock)
    b.on_tick(tick(1295.0, bid=1294.9, ask=1295.1))
    ack = b.place(order(price="1290.00"))
    assert trades(b) == []
    b.on_tick(tick(1291.0, bid=1290.9, ask=1291.1))
    assert trades(b) == []
    b.on_tick(tick(1285.0, bid=1284.9, ask=1285.1))  # gaps through
    [t] = trades(b)
    assert (t.price, t.quantity, t.broker_order_id) == (Decimal("1290.00"), 10, ack.broker_order_id)
    [status] = [s for s in b.order_book() if s.broker_order_id == ack.broker_order_id]
    assert (status.status, status.filled_qty) == ("COMPLETE", 10)


def test_stop_limit_waits_for_its_trigger(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, slippage_bps=0)
    b.on_tick(tick(1290.0, bid=1289.9, ask=1290.1))
    b.place(order(side="SELL", price="1267.20", order_type="SL", trigger="1280.00"))
    b.on_tick(tick(1281.0, bid=1280.9, ask=1281.1))
    assert trades(b) == []
    b.on_tick(tick(1279.5, bid=1279.4, ask=1279.6))
    [t] = trades(b)
    assert t.price == Decimal("1279.40")


def test_partial_fills_take_the_shown_size_across_orders(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, partial_fills=True)
    b.on_tick(tick(1295.0, bid=1294.9, ask=1295.1))
    b.place(order(qty=6, price="1290.00", tag="npa"))
    b.place(order(qty=6, price="1290.00", tag="npb"))
    b.on_tick(tick(1289.0, bid=1288.9, ask=1289.0, ask_qty=8))
    assert sorted(t.quantity for t in trades(b)) == [2, 6]


def test_refusals(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock)
    with pytest.raises(BrokerRejected, match="tick size"):
        b.place(order(price="1290.05"))
    with pytest.raises(BrokerRejected, match="LIMIT or SL"):
        b.place(order(order_type="MARKET"))
    with pytest.raises(BrokerRejected, match="trigger price must not be below"):
        b.place(order(side="SELL", price="1281.00", order_type="SL", trigger="1280.00"))
    ack = b.place(order(price="1200.00"))
    b.cancel(ack.broker_order_id)
    with pytest.raises(BrokerRejected, match="already CANCELLED"):
        b.cancel(ack.broker_order_id)
    with pytest.raises(BrokerRejected, match="not found"):
        b.modify("nope", quantity=1)


def test_the_journal_rebuilds_the_books_after_a_crash(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "paper.jsonl"
    b = PaperBroker(MASTER, clock, journal=path)
    b.on_tick(tick(1290.0, bid=1289.9, ask=1290.1))
    filled = b.place(order(price="1302.90", tag="npfilled"))
    resting = b.place(order(price="1200.00", tag="npresting"))
    cancelled = b.place(order(price="1100.00", tag="npcancel"))
    b.cancel(cancelled.broker_order_id)
    b.modify(resting.broker_order_id, quantity=4)
    with path.open("a") as fh:
        fh.write('{"op": "place", "id": "torn')  # a write cut short by kill -9
    # no close(): the process "died"
    b2 = PaperBroker(MASTER, clock, journal=path)
    book = {s.client_tag: s for s in b2.order_book()}
    assert (book["npfilled"].status, book["npfilled"].filled_qty) == ("COMPLETE", 10)
    assert (book["npresting"].status, book["npresting"].quantity) == ("OPEN", 4)
    assert book["npcancel"].status == "CANCELLED"
    assert [t.broker_order_id for t in b2.trade_book()] == [filled.broker_order_id]
    b2.on_tick(tick(1199.0, bid=1198.9, ask=1199.0))  # the resting order still fills after the restart
    [t] = trades(b2)
    assert t.broker_order_id == resting.broker_order_id
    ids = {filled.broker_order_id, resting.broker_order_id, cancelled.broker_order_id}
    new = b2.place(order(price="1000.00", tag="npnew"))
    assert new.broker_order_id not in ids
    assert len({tr.trade_id for tr in b2.trade_book()}) == 2


def test_a_new_day_starts_with_empty_books(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "paper.jsonl"
    b = PaperBroker(MASTER, clock, journal=path)
    b.on_tick(tick(1290.0, bid=1289.9, ask=1290.1))
    b.place(order(price="1302.90"))
    b.place(order(price="1200.00", tag="npold"))
    b.close()
    clock.advance(86_400)
    b2 = PaperBroker(MASTER, clock, journal=path)
    assert b2.order_book() == [] and b2.trade_book() == [] and b2.resting == {}
