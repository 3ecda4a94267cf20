"""The backtest book: round trips, reversals, open trades, exposure and the equity curve."""

from __future__ import annotations

from decimal import Decimal

from libs.common.messages import Fill
from services.backtest.report import Book, to_json
from tests.kit import fill

S = 1_000_000_000
T0 = 1_704_167_100 * S
KEY = "nse_cm|1594"


def _fill(side: str, qty: int, price: str, n: int) -> Fill:
    return fill("INFY-EQ", side, qty, price, strategy="bt", order_id=f"o{n}", fill_id=f"f{n}")


def test_round_trip_reversal_and_open_trade() -> None:
    book = Book()
    book.mark(KEY, "INFY-EQ", 100.0)
    book.on_tick(KEY, T0, 100.0)
    book.on_fill(_fill("BUY", 2, "100.00", 1), T0)
    book.on_tick(KEY, T0 + 10 * S, 105.0)
    book.on_fill(_fill("SELL", 5, "105.00", 2), T0 + 10 * S)  # closes 2 long, opens 3 short
    book.on_tick(KEY, T0 + 20 * S, 103.0)
    book.finish()
    long, short = book.trades
    assert (long.direction, long.quantity, long.pnl, long.open) == ("LONG", 2, Decimal("10.00"), False)
    assert (short.direction, short.quantity, short.open) == ("SHORT", 3, True)
    assert short.pnl == Decimal("6.00")  # 3 x (105 - 103) marked at the last price
    assert book.gross == Decimal("16.00")
    assert book.turnover == Decimal("725.00")
    assert book.net == Decimal("16.00") - Decimal("725.00") * Decimal("0.00035")
    assert book.exposure_ns == 20 * S
    curve = book.equity_curve()
    assert curve[0] == (T0, 0.0) and curve[-1] == (T0 + 20 * S, float(book.net))
    s = book.summary()
    assert (s["trades"], s["closed_trades"], s["open_trades"], s["wins"]) == (2, 1, 1, 1)
    assert s["exposure_pct"] == 100.0


def test_drawdown_follows_the_marked_equity() -> None:
    book = Book(cost_rate=Decimal(0))
    book.mark(KEY, "INFY-EQ", 100.0)
    book.on_tick(KEY, T0, 100.0)
    book.on_fill(_fill("BUY", 10, "100.00", 1), T0)
    for i, p in enumerate([102.0, 104.0, 99.0, 101.0], 1):
        book.on_tick(KEY, T0 + i * S, p)
    book.on_fill(_fill("SELL", 10, "101.00", 2), T0 + 5 * S)
    book.finish()
    s = book.summary()
    assert s["max_drawdown"] == 50.0  # peak +40 at 104, trough -10 at 99
    assert s["net_pnl"] == 10.0 and s["win_rate"] == 1.0


def test_json_is_stable() -> None:
    assert to_json({"b": 1, "a": [1.5, None]}) == to_json({"a": [1.5, None], "b": 1})
