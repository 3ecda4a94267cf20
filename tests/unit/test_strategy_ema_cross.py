"""EMA cross, long only, on bars (pure, no pipeline; and once through a short backtest)."""

from __future__ import annotations

import math
from decimal import Decimal

from libs.common.clock import ManualClock
from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import OrderRequest, Tick
from services.backtest.runner import run_backtest
from services.strategy import registry
from services.strategy.base import StrategyContext
from services.strategy.ema_cross import EmaCross
from tests.kit import fill_of, order_update, strategy_context, tick

MASTER = MasterData.load()
INST = MASTER.resolve("INFY-EQ")
S = 1_000_000_000
T0 = 1_704_167_100 * S


def _strategy(**params: object) -> EmaCross:
    strat = EmaCross(strategy_context("e1", ["INFY-EQ"]), {"fast": 3, "slow": 8, "bar_seconds": 10, **params})
    strat.dispatch_start()
    return strat


def _fill_all(strat: EmaCross, orders: object, price: float, log: list[OrderRequest]) -> None:
    """Fill each order at ``price`` at once (execution's COMPLETE update, then the fill)."""
    for req in list(orders):  # type: ignore[call-overload]
        log.append(req)
        oid = f"o{len(log)}"
        px = Decimal(str(round(price, 1)))
        strat.dispatch_order(order_update(req, "COMPLETE", req.quantity, str(px), oid))
        more = strat.dispatch_fill(fill_of(req, req.quantity, px, f"f{len(log)}", oid))
        _fill_all(strat, more, price, log)


def _sine(strat: EmaCross, sent: list[OrderRequest], n: int = 600) -> int:
    """One tick every 5 s, a sine wave of period ~314 s; returns the tick of the first order."""
    first = -1
    for i in range(n):
        price = 1500 + 30 * math.sin(i / 10)
        _fill_all(strat, strat.dispatch_tick(tick(INST, price, T0 + i * 5 * S)), price, sent)
        if sent and first < 0:
            first = i
    return first


def test_buys_on_the_cross_up_sells_on_the_cross_down_and_never_goes_short() -> None:
    strat = _strategy(quantity=2)
    sent: list[OrderRequest] = []
    _sine(strat, sent)
    sides = [(r.side, r.purpose, r.quantity) for r in sent]
    assert len(sides) >= 4
    assert all(s == ("BUY", "ENTRY", 2) for s in sides[0::2])
    assert all(s[:2] == ("SELL", "EXIT") for s in sides[1::2])
    assert strat.position(INST.key) in (0, 2)


def test_the_bars_follow_bar_seconds() -> None:
    first = {}
    for seconds in (10, 30):
        sent: list[OrderRequest] = []
        first[seconds] = _sine(_strategy(bar_seconds=seconds), sent)
        assert sent
    assert 0 < first[10] < first[30]  # the slow EMA of 8 bars is ready three times later


def test_fast_must_be_shorter_than_slow_and_the_name_is_registered() -> None:
    ctx = StrategyContext("e1", clock=ManualClock(T0), master=MASTER, instruments=["INFY-EQ"])
    strat = EmaCross(ctx, {"fast": 10, "slow": 5})
    strat.dispatch_start()
    assert strat.halted.startswith("strategy e1 stopped: on_start raised ValueError")
    assert registry.load("ema_cross") is EmaCross
    assert "ema_cross" in registry.names()


def test_a_backtest_trades_it_long_only_and_repeats_byte_for_byte() -> None:
    ticks = [Tick(segment=INST.segment, token=INST.token, ltp=round(1500 + 30 * math.sin(i / 40), 2),
                  exch_ts_ns=T0 + i * S // 4) for i in range(4000)]  # fmt: skip
    cfg = load_config(env={})
    runs = [run_backtest(ticks, "ema_cross", {"bar_seconds": 5}, cfg=cfg, master=MASTER) for _ in range(2)]
    report = runs[0].report
    assert report == runs[1].report
    assert report["summary"]["trades"] >= 2
    assert {t["direction"] for t in report["trade_list"]} == {"LONG"}
