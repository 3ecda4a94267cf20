"""SDK SFeed messages → our Ticks (pure conversion; the SDK's own pydantic models)."""

from __future__ import annotations

import os

os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")

from neo_api_client.websocket.feed.models import (
    DepthLevel,
    SFeedCasChange,
    SFeedIndex,
    SFeedMarketStatus,
    SFeedScrip,
    SFeedScripLite,
)

from libs.common.instruments import MasterData
from services.feed.sources.kotak import TickRouter

MASTER = MasterData.load()
T = 1_767_000_000


def _router(*names: str) -> TickRouter:
    r = TickRouter()
    for n in names:
        r.add(MASTER.resolve(n))
    return r


def _scrip(token: str = "2885", ltp: float = 2950.45, **kw: object) -> SFeedScrip:
    fields: dict[str, object] = dict(
        exchange_segment="nse_cm", instrument_token=token, level=4, last_traded_price=ltp,
        open_price=2910.0, high_price=2961.95, low_price=2899.05, close_price=2901.1,
        average_trade_price=2930.0, last_trade_time=T - 2, last_update_time=T, last_trade_qty=37,
        total_buy_quantity=1, total_sell_quantity=1, volume_traded_today=1_234_567, open_interest=0,
        net_change=0.0, net_change_percent=0.0, upper_circuit_limit=0.0, lower_circuit_limit=0.0,
        yearly_high=0.0, yearly_low=0.0, total_traded_value=0.0, market_lot=1, precision=2, multiplier=1,
        buy=[DepthLevel(quantity=120, price=2950.40, orders=3)],
        sell=[DepthLevel(quantity=80, price=2950.55, orders=2)],
    )
    fields.update(kw)
    return SFeedScrip(**fields)  # type: ignore[arg-type]


def test_touch_line_becomes_a_tick_with_every_field() -> None:
    tick = _router("RELIANCE-EQ").to_tick(_scrip())
    assert tick is not None
    assert (tick.segment, tick.token, tick.symbol) == ("nse_cm", "2885", "RELIANCE-EQ")
    assert (tick.ltp, tick.bid, tick.bid_qty, tick.ask, tick.ask_qty) == (2950.45, 2950.40, 120, 2950.55, 80)
    assert (tick.open, tick.high, tick.low, tick.close) == (2910.0, 2961.95, 2899.05, 2901.1)
    assert (tick.volume, tick.last_qty) == (1_234_567, 37)
    assert tick.exch_ts_ns == T * 1_000_000_000  # the later of trade and update time


def test_an_empty_book_side_is_zero() -> None:
    tick = _router("RELIANCE-EQ").to_tick(_scrip(buy=[], sell=[DepthLevel(quantity=0, price=0.0, orders=0)]))
    assert tick is not None and (tick.bid, tick.bid_qty, tick.ask, tick.ask_qty) == (0.0, 0, 0.0, 0)


def test_mini_touch_line() -> None:
    lite = SFeedScripLite(exchange_segment="nse_cm", instrument_token="1594", last_traded_price=1510.35,
                          last_trade_time=T, last_trade_qty=4, close_price=1500.0, net_change=10.35,
                          net_change_percent=0.69, market_lot=1, precision=2, multiplier=1)
    tick = _router("INFY-EQ").to_tick(lite)
    assert tick is not None
    assert (tick.ltp, tick.last_qty, tick.close, tick.symbol) == (1510.35, 4, 1500.0, "INFY-EQ")


def test_index_is_routed_by_name_not_by_its_streamed_token() -> None:
    index = SFeedIndex(exchange_segment="nse_cm", instrument_token="26000", name="Nifty 50",
                       last_traded_price=25912.35, open_price=25900.0, high_price=25950.0, low_price=25850.0,
                       close_price=25880.1, change=32.25, net_change_percent=0.12, yearly_high=0.0,
                       yearly_low=0.0, last_trade_time=T, precision=2, multiplier=0.01)
    tick = _router("Nifty 50").to_tick(index)
    assert tick is not None and (tick.token, tick.ltp, tick.close) == ("Nifty 50", 25912.35, 25880.1)


def test_unsubscribed_tokens_and_empty_prices_are_dropped_and_counted() -> None:
    r = _router("RELIANCE-EQ")
    assert r.to_tick(_scrip(token="0", ltp=0.0)) is None  # the SDK's well-framed nonsense
    assert r.to_tick(_scrip(token="11536")) is None
    assert r.to_tick(_scrip(ltp=0.0)) is None
    assert r.dropped == 3


def test_status_and_auction_messages_are_not_ticks() -> None:
    r = _router("RELIANCE-EQ")
    status = SFeedMarketStatus(exchange_segment="nse_cm", status_code=2, status="Market closed")
    assert r.to_tick(status) is None
    cas = SFeedCasChange(exchange_segment="nse_cm", instrument_token="2885", ref_price=2950.0,
                         imbalance_qty=10, imbalance_qty_at_market=0)
    assert r.to_tick(cas) is None and r.dropped == 0
