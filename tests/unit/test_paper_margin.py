"""The paper broker's RMS check (``paper.capital``): an order needing more margin than is
free is rejected at placement with the figures, what only reduces a position needs
nothing, fills and cancels give reserved margin back, and a restart rebuilds the same
blocked margin from the journal (the margin model is in ``paper_margin``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from libs.common.clock import ManualClock
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Tick
from services.execution.brokers.base import BrokerOrder, BrokerRejected
from services.execution.brokers.paper import PaperBroker
from services.execution.brokers.paper_margin import SHORT_OPTION_RATE, unit_margin

DAY_NS = 1_763_700_000_000_000_000  # 2025-11-21 04:40 UTC, a Friday in market hours
PE = Instrument(segment="nse_fo", token="90001", symbol="NIFTY25NOV24000PE", inst_type="OPTIDX",
                lot_size=65, freeze_qty=1800, expiry=dt.date(2025, 11, 25), strike=Decimal("24000"),
                option_type="PE", underlying="NIFTY")  # fmt: skip
CE = Instrument(segment="nse_fo", token="90002", symbol="NIFTY25NOV24000CE", inst_type="OPTIDX",
                lot_size=65, freeze_qty=1800, expiry=dt.date(2025, 11, 25), strike=Decimal("24000"),
                option_type="CE", underlying="NIFTY")  # fmt: skip
MASTER = MasterData.load()
MASTER.add([PE, CE])
REL = MASTER.resolve("RELIANCE-EQ")


def order(inst: Instrument, side: str, qty: int, price: str, tag: str, product: str = "MIS") -> BrokerOrder:
    return BrokerOrder(client_tag=tag, segment=inst.segment, token=inst.token, symbol=inst.symbol, side=side,
                       quantity=qty, price=Decimal(price), order_type="LIMIT", product=product)  # fmt: skip


def quote(inst: Instrument, ltp: float) -> Tick:
    return Tick(segment=inst.segment, token=inst.token, ltp=ltp, bid=ltp - 0.05, ask=ltp + 0.05,
                bid_qty=10_000, ask_qty=10_000)  # fmt: skip


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(DAY_NS)


def test_the_unit_margins() -> None:
    assert unit_margin(CE, True, 120.0, "NRML") == 120.0  # a bought option: its premium
    assert unit_margin(PE, False, 120.0, "NRML") == SHORT_OPTION_RATE * 24000  # sold: 12% of the strike
    assert unit_margin(REL, True, 1300.0, "MIS") == pytest.approx(260.0)  # MIS equity: 20%
    assert unit_margin(REL, True, 1300.0, "CNC") == 1300.0  # delivery: all of it


def test_a_short_straddle_beyond_the_funds_is_rejected_with_the_figures(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=500_000.0)
    b.place(order(PE, "SELL", 130, "100.00", "np01"))  # 2 lots: 130 x 2,880 = 374,400 blocked

    with pytest.raises(BrokerRejected) as err:
        b.place(order(CE, "SELL", 65, "100.00", "np02"))  # 1 more lot: 187,200 > 125,600 free
    assert str(err.value) == ("RMS: insufficient funds: the order needs margin of 187,200.00 and "
                              "125,600.00 is free (paper.capital 500,000.00)")  # fmt: skip
    assert [o.tag for o in b.orders.values()] == ["np01"]  # the rejected one never reached the book


def test_an_order_that_only_reduces_a_position_needs_no_margin(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=400_000.0)
    b.on_tick(quote(PE, 100.0))
    b.place(order(PE, "SELL", 130, "99.00", "np01"))  # fills: the position blocks 374,400
    assert b.margin is not None and b.margin.reserved == 0.0
    assert b.margin.positions == pytest.approx(374_400.0)
    with pytest.raises(BrokerRejected):
        b.place(order(PE, "SELL", 65, "99.00", "np02"))  # adds to the short: no room

    b.place(order(PE, "BUY", 130, "101.00", "np03"))  # closes it: needs nothing, and fills

    assert b.margin.positions == 0.0 and b.margin.free == 400_000.0
    b.place(order(PE, "SELL", 65, "99.00", "np04"))  # room again


def test_reserved_margin_comes_back_on_cancel_and_moves_to_the_position_on_fill(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=1_000_000.0)
    b.on_tick(quote(CE, 150.0))
    ack = b.place(order(CE, "BUY", 650, "140.00", "np01"))  # rests below the market
    assert b.margin is not None and b.margin.reserved == pytest.approx(91_000.0)
    b.cancel(ack.broker_order_id)
    assert b.margin.reserved == 0.0 and b.margin.free == 1_000_000.0

    b.place(order(CE, "BUY", 650, "140.00", "np02"))
    b.on_tick(quote(CE, 139.0))  # crosses it: fills at its own price
    assert b.margin.reserved == 0.0 and b.margin.positions == pytest.approx(91_000.0)


def test_a_modify_that_needs_more_than_is_free_is_rejected_and_keeps_the_order(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=400_000.0)
    ack = b.place(order(PE, "SELL", 65, "150.00", "np01"))  # rests: 187,200 reserved
    with pytest.raises(BrokerRejected, match="RMS: insufficient funds"):
        b.modify(ack.broker_order_id, quantity=195)  # 561,600
    assert b.orders[ack.broker_order_id].quantity == 65
    assert b.margin is not None and b.margin.reserved == pytest.approx(187_200.0)
    b.modify(ack.broker_order_id, quantity=130)
    assert b.margin.reserved == pytest.approx(374_400.0)


def test_a_restart_rebuilds_the_blocked_margin_from_the_journal(tmp_path: Path, clock: ManualClock) -> None:
    journal = tmp_path / "paper-book.jsonl"
    b = PaperBroker(MASTER, clock, capital=1_000_000.0, journal=journal)
    b.on_tick(quote(PE, 100.0))
    b.place(order(PE, "SELL", 130, "99.00", "np01"))  # filled
    b.place(order(REL, "BUY", 100, "1000.00", "np02"))  # rests (no tick for it)
    ack = b.place(order(CE, "SELL", 65, "150.00", "np03"))
    b.cancel(ack.broker_order_id)
    assert b.margin is not None
    before = (b.margin.positions, b.margin.reserved)
    b.close()

    again = PaperBroker(MASTER, clock, capital=1_000_000.0, journal=journal)

    assert again.margin is not None
    assert (again.margin.positions, again.margin.reserved) == pytest.approx(before)
    assert before == pytest.approx((374_400.0, 20_000.0))


def test_without_capital_nothing_is_checked(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock)
    b.place(order(PE, "SELL", 1800, "100.00", "np01"))  # 5.2 crore of margin: no check asked for
    assert b.margin is None


def test_an_order_that_needs_no_margin_passes_even_when_funds_are_short(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=400_000.0)
    b.on_tick(quote(PE, 100.0))
    b.place(order(PE, "SELL", 130, "99.00", "np01"))  # filled: 374,400 blocked
    assert b.margin is not None
    b.margin.capital = 100_000.0  # less than is blocked (e.g. paper.capital lowered overnight)

    b.place(order(PE, "BUY", 130, "101.00", "np02"))  # the close needs nothing: it goes

    assert b.margin.positions == 0.0


def test_a_short_option_held_past_its_expiry_is_settled_and_frees_its_margin(
    tmp_path: Path, clock: ManualClock
) -> None:
    journal = tmp_path / "paper-book.jsonl"
    b = PaperBroker(MASTER, clock, capital=400_000.0, journal=journal)  # Fri 2025-11-21
    b.on_tick(quote(PE, 100.0))
    b.place(order(PE, "SELL", 130, "99.00", "np01", product="NRML"))  # carried overnight
    b.close()
    clock.advance(7 * 86_400.0)  # Fri 2025-11-28: it expired on Tuesday

    again = PaperBroker(MASTER, clock, capital=400_000.0, journal=journal)

    assert again.carried_positions() == [] and again.margin is not None and again.margin.positions == 0.0
    again.place(order(PE, "SELL", 65, "99.00", "np02", product="NRML"))  # room again


def test_a_touch_far_from_the_last_price_is_no_touch(clock: ManualClock) -> None:
    b = PaperBroker(MASTER, clock, capital=1_000_000.0)
    b.on_tick(Tick(segment=REL.segment, token=REL.token, ltp=1290.0, bid=1e9, ask=1290.05,
                   bid_qty=100, ask_qty=100))  # fmt: skip

    b.place(order(REL, "SELL", 10, "1280.00", "np01"))

    [tr] = b.trades.values()
    assert tr.price == Decimal("1289.70")  # off the last price less 2 bps, down to tick: never 1e9
