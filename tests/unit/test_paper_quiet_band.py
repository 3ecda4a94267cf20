"""PaperBroker's quiet band: a tick it lets pass without looking at the book could not have
triggered or crossed any resting order, and every change to the book (a place, a fill, a
cancel, a modify, a stop's trigger) moves the band at once."""

from __future__ import annotations

import math
import random
from decimal import Decimal

from libs.common.clock import ManualClock
from libs.common.instruments import MasterData
from libs.common.messages import Tick
from services.execution.brokers.base import BrokerOrder, BrokerTrade
from services.execution.brokers.paper import PaperBroker, PaperOrder, _quiet_band

MASTER = MasterData.load()
REL = MASTER.resolve("RELIANCE-EQ")
DAY_NS = 1_763_700_000_000_000_000


def _tick(ltp: float, bid: float = 0.0, ask: float = 0.0) -> Tick:
    return Tick(segment=REL.segment, token=REL.token, ltp=ltp, bid=bid, ask=ask)


def _order(side: str, price: str, order_type: str = "LIMIT", trigger: str | None = None) -> BrokerOrder:
    return BrokerOrder(client_tag=f"np{random.randrange(10**10):010d}", segment=REL.segment,
                       token=REL.token, symbol=REL.symbol, side=side, quantity=1, price=Decimal(price),
                       order_type=order_type,
                       trigger_price=Decimal(trigger) if trigger else None)  # fmt: skip


def _hits(o: PaperOrder, ltp: float, buy_touch: float, sell_touch: float) -> bool:
    """What ``PaperBroker.on_tick`` sends on to matching, written out as the rule reads."""
    if o.order_type == "SL" and not o.triggered:
        return (o.side == "BUY" and ltp >= o.ftrigger) or (o.side == "SELL" and ltp <= o.ftrigger)
    if o.side == "BUY":
        return 0 < buy_touch <= o.fprice
    return sell_touch > 0 and sell_touch >= o.fprice


def test_a_tick_inside_the_band_triggers_and_crosses_nothing() -> None:
    rng = random.Random(16)
    for _ in range(3000):
        book = []
        for n in range(rng.randint(1, 5)):
            price = round(rng.uniform(95, 105), 2)
            stop = rng.random() < 0.5
            book.append(PaperOrder(
                oid=str(n), tag="", segment="s", token="t", symbol="X", side=rng.choice(["BUY", "SELL"]),
                quantity=1, price=Decimal(str(price)), order_type="SL" if stop else "LIMIT",
                trigger=Decimal(str(price)) if stop else None, product="MIS", day="", ts_ns=0, fprice=price,
                ftrigger=price if stop else 0.0, triggered=stop and rng.random() < 0.3,
            ))  # fmt: skip
        band = _quiet_band(book)
        for _ in range(20):
            ltp = round(rng.uniform(94, 106), 2)
            bid = ltp - 0.05 if rng.random() < 0.5 else 0.0
            ask = ltp + 0.05 if rng.random() < 0.5 else 0.0
            buy_touch, sell_touch = (ask if ask > 0 else ltp), (bid if bid > 0 else ltp)
            quiet = band[0] > ltp > band[1] and buy_touch > band[2] and sell_touch < band[3]
            if quiet:
                assert not any(_hits(o, ltp, buy_touch, sell_touch) for o in book)


def test_a_price_that_is_not_a_number_leaves_no_quiet_band() -> None:
    o = PaperOrder(oid="1", tag="", segment="s", token="t", symbol="X", side="BUY", quantity=1,
                   price=Decimal(100), order_type="LIMIT", trigger=None, product="MIS", day="", ts_ns=0,
                   fprice=math.nan)  # fmt: skip
    band = _quiet_band([o])
    assert not (band[0] > 100.0 > band[1] and band[2] < 100.0 and band[3] > 100.0)


def test_the_band_follows_places_modifies_triggers_fills_and_cancels() -> None:
    b = PaperBroker(MASTER, ManualClock(DAY_NS), slippage_bps=0)
    b.on_tick(_tick(100.0))
    target = b.place(_order("SELL", "102.00")).broker_order_id
    b.place(_order("SELL", "97.90", "SL", "98.00"))
    b.drain_events()
    for ltp in (101.95, 99.0, 100.5):  # inside the band: nothing
        b.on_tick(_tick(ltp))
    assert b.drain_events() == []
    b.modify(target, price=Decimal("101.00"))
    b.drain_events()
    b.on_tick(_tick(101.0))  # crosses the target as modified
    assert [e.price for e in b.drain_events() if isinstance(e, BrokerTrade)] == [Decimal("101.00")]
    b.on_tick(_tick(98.0, bid=97.5, ask=98.1))  # triggers the stop: a SELL limit at 97.90 the bid misses
    assert [e for e in b.drain_events() if isinstance(e, BrokerTrade)] == []
    b.on_tick(_tick(99.0))  # above the old trigger, and through the limit it has become
    assert [e.price for e in b.drain_events() if isinstance(e, BrokerTrade)] == [Decimal("97.90")]
    assert b.resting == {}
    buy = b.place(_order("BUY", "95.00")).broker_order_id
    b.on_tick(_tick(96.0))
    b.cancel(buy)
    b.drain_events()
    b.on_tick(_tick(94.0))  # below the cancelled BUY: nothing rests, nothing fills
    assert b.drain_events() == []
