"""MACD crossover strategy on bars (pure, no pipeline)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from libs.common.clock import ManualClock
from libs.common.instruments import MasterData
from libs.common.messages import OrderRequest, Tick
from services.strategy.base import ParamsError, StrategyContext
from services.strategy.macd import MacdCrossover
from tests.kit import fill_of, order_update, strategy_context, tick

MASTER = MasterData.load()
INST = MASTER.resolve("INFY-EQ")
S = 1_000_000_000
T0 = 1_704_167_100 * S


def _strategy(**params: object) -> MacdCrossover:
    strat = MacdCrossover(strategy_context("m1", ["INFY-EQ"]), {"fast": 3, "slow": 6, "signal": 3, **params})
    strat.dispatch_start()
    return strat


def _tick(ltp: float, ts: int) -> Tick:
    return tick(INST, ltp, ts)


def _fill_all(strat: MacdCrossover, orders: object, price: float, log: list[OrderRequest]) -> None:
    """Fill each order at ``price`` at once (execution's COMPLETE update, then the fill)."""
    for req in list(orders):  # type: ignore[call-overload]
        log.append(req)
        oid = f"o{len(log)}"
        px = Decimal(str(round(price, 1)))
        strat.dispatch_order(order_update(req, "COMPLETE", req.quantity, str(px), oid))
        more = strat.dispatch_fill(fill_of(req, req.quantity, px, f"f{len(log)}", oid))
        _fill_all(strat, more, price, log)


def test_long_on_cross_up_exit_on_cross_down_with_atr_bracket() -> None:
    strat = _strategy(atr_period=3, atr_stop=2.0, atr_target=3.0)
    sent: list[OrderRequest] = []
    for i in range(400):  # one tick per 10 s: six per bar, a sine wave of period ~21 bars
        price = 1500 + 30 * math.sin(i / 20)
        _fill_all(strat, strat.dispatch_tick(_tick(price, T0 + i * 10 * S)), price, sent)
    sides = [(r.side, r.purpose) for r in sent]
    for req in sent:
        if req.purpose == "ENTRY":
            assert req.stop_loss is not None and req.target is not None and req.stop_loss < req.target
    assert sides[0] == ("BUY", "ENTRY")
    assert all(s == ("BUY", "ENTRY") for s in sides[0::2])
    assert all(s == ("SELL", "EXIT") for s in sides[1::2])
    assert len(sides) >= 4


def test_allow_short_reverses_through_flat() -> None:
    strat = _strategy(allow_short=True)
    sent: list[OrderRequest] = []
    for i in range(400):
        price = 1500 + 30 * math.sin(i / 20)
        _fill_all(strat, strat.dispatch_tick(_tick(price, T0 + i * 10 * S)), price, sent)
    sides = [(r.side, r.purpose) for r in sent]
    assert ("SELL", "ENTRY") in sides and ("BUY", "ENTRY") in sides
    assert ("SELL", "EXIT") in sides or ("BUY", "EXIT") in sides


def test_fast_must_be_shorter_than_slow() -> None:
    ctx = StrategyContext("m1", clock=ManualClock(T0), master=MASTER, instruments=["INFY-EQ"])
    strat = MacdCrossover(ctx, {"fast": 10, "slow": 5})
    strat.dispatch_start()
    assert strat.halted.startswith("strategy m1 stopped: on_start raised ValueError")
    with pytest.raises(ParamsError):
        MacdCrossover(ctx, {"fast": 0})
