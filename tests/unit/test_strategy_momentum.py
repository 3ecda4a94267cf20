"""Momentum: entries on N-tick moves with stop/target, reversal exits, quick first order."""

from __future__ import annotations

import random
from decimal import Decimal

from libs.common.instruments import MasterData
from libs.common.messages import Tick
from services.strategy.momentum import Momentum
from tests.kit import fill, strategy_context, tick

MASTER = MasterData.load()
SYMBOLS = ["RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "SBIN-EQ"]
S = 1_000_000_000
T0 = 1_704_167_100 * S


def _strategy(**params: object) -> Momentum:
    strat = Momentum(strategy_context("mom1", SYMBOLS), params)
    strat.dispatch_start()
    return strat


def _tick(symbol: str, ltp: float) -> Tick:
    return tick(symbol, ltp, symbol=symbol, ts_ns=T0)


def test_rise_enters_long_with_market_intent_stop_and_target() -> None:
    strat = _strategy(lookback=5, entry_pct=0.2)
    orders = []
    for i in range(10):
        orders += strat.dispatch_tick(_tick("INFY-EQ", 1500.0 * (1 + 0.001 * i)))
    assert len(orders) == 1
    req = orders[0]
    assert (req.side, req.price, req.quantity, req.purpose) == ("BUY", None, 1, "ENTRY")
    assert req.stop_loss is not None and req.target is not None
    assert req.stop_loss < Decimal("1507.5") < req.target


def test_fall_enters_short_only_when_allowed() -> None:
    falling = [2000.0 * (1 - 0.001 * i) for i in range(10)]
    strat = _strategy(lookback=5, entry_pct=0.2)
    orders = [o for p in falling for o in strat.dispatch_tick(_tick("TCS-EQ", p))]
    assert [o.side for o in orders] == ["SELL"]
    assert orders[0].stop_loss is not None and orders[0].target is not None
    assert orders[0].target < orders[0].stop_loss
    strat = _strategy(lookback=5, entry_pct=0.2, allow_short=False)
    assert [o for p in falling for o in strat.dispatch_tick(_tick("TCS-EQ", p))] == []


def test_reversal_exits_then_cooldown() -> None:
    strat = _strategy(lookback=5, entry_pct=0.2, exit_pct=0.1, cooldown_ticks=3)
    prices = [1000.0 * (1 + 0.001 * i) for i in range(7)]
    orders = [o for p in prices for o in strat.dispatch_tick(_tick("SBIN-EQ", p))]
    assert [o.side for o in orders] == ["BUY"]
    strat.dispatch_fill(
        fill("SBIN-EQ", "BUY", 1, "1006.0", strategy="mom1", order_id="o1", fill_id="f1")
    )
    down = [1006.0 * (1 - 0.0005 * i) for i in range(1, 8)]
    orders = [o for p in down for o in strat.dispatch_tick(_tick("SBIN-EQ", p))]
    assert [(o.side, o.purpose, o.reduce_only) for o in orders] == [("SELL", "EXIT", True)]


def test_without_bracket_the_strategy_watches_its_own_target() -> None:
    strat = _strategy(lookback=3, entry_pct=0.2, bracket=False, target_pct=0.5, exit_pct=5.0)
    orders = [o for i in range(5) for o in strat.dispatch_tick(_tick("INFY-EQ", 1500.0 * (1 + 0.001 * i)))]
    (entry,) = orders
    assert entry.stop_loss is None and entry.target is None
    strat.dispatch_fill(
        fill("INFY-EQ", "BUY", 1, "1504.5", strategy="mom1", order_id="o1", fill_id="f1")
    )
    assert strat.dispatch_tick(_tick("INFY-EQ", 1506.0)) == ()
    (ex,) = strat.dispatch_tick(_tick("INFY-EQ", 1513.0))
    assert ex.purpose == "EXIT"


def test_first_order_within_ten_seconds_on_the_default_sim_walk() -> None:
    # The default sim feed: 5 instruments, 20 ticks/s each, ±0.08 % steps.
    rng = random.Random(42)
    strat = _strategy()
    prices = {s: MASTER.resolve(s).ref_price or 1000.0 for s in SYMBOLS}
    first = None
    for n in range(200):  # 10 s of ticks
        for s in SYMBOLS:
            prices[s] *= 1 + rng.uniform(-0.0008, 0.0008)
            if strat.dispatch_tick(_tick(s, prices[s])):
                first = n
                break
        if first is not None:
            break
    assert first is not None and first < 200
