"""Per-strategy MTM limits in risk's book across restarts and odd inputs: a stop the ledger
never heard of is sent again under the same ids, a strategy that crossed its limit while risk
was down is stopped at the restore (or at a resync), a stop belongs to its day, and NaN
prices, duplicate and reordered fills neither stop nor double anything."""

from __future__ import annotations

import math
from decimal import Decimal

from libs.common.messages import (
    Alert,
    DayState,
    Fill,
    Flatten,
    Position,
    RecordRiskEvent,
    Tick,
    VerdictCode,
)
from services.risk.sentinel import RiskSentinel
from tests.unit.test_risk_expiry import STOCK, order
from tests.unit.test_risk_intraday import DAY, late

TODAY = DAY.isoformat()
STOP = [("RecordRiskEvent", f"risk-stop-{TODAY}-s1"), ("Flatten", f"risk-stop-{TODAY}-s1-flatten")]
WHY = "net MTM -2100.00 reached its max_loss"


def limited(hh: int = 10, mm: int = 0, max_loss: float = 2_000.0, target: float = 0.0) -> RiskSentinel:
    s = late(hh, mm, max_daily_loss=1_000_000.0)
    s.set_strategy_limits({"s1": (max_loss, target), "s2": (0.0, 0.0)})
    return s


def fill(sid: str, side: str, qty: int, price: str, fid: str) -> Fill:
    return Fill(fill_id=fid, order_id=f"o-{fid}", strategy_id=sid, symbol=STOCK.symbol, segment=STOCK.segment,
                token=STOCK.token, side=side, quantity=qty, price=Decimal(price))  # fmt: skip


def tick(ltp: float) -> Tick:
    return Tick(segment=STOCK.segment, token=STOCK.token, ltp=ltp)


def held(sid: str, qty: int, avg: str, last: float) -> Position:
    return Position(strategy_id=sid, symbol=STOCK.symbol, segment=STOCK.segment, token=STOCK.token,
                    quantity=qty, avg_price=Decimal(avg), buy_qty=qty, buy_value=Decimal(avg) * qty,
                    last_price=last)  # fmt: skip


def sent(events: object) -> list[tuple[str, str]]:
    return [(type(e).__name__, e.request_id) for e in events  # type: ignore[attr-defined]
            if isinstance(e, RecordRiskEvent | Flatten)]  # fmt: skip


def test_a_stop_the_ledger_never_recorded_is_sent_again_at_the_restore_under_the_same_ids() -> None:
    s = limited()
    s.on_fill(fill("s1", "BUY", 100, "1300.00", "a"))
    first = sent(s.on_tick(tick(1279.0)))  # stopped; then risk dies before delivering
    assert first == STOP
    again = limited(10, 1)
    again.restore_backstop(s.backstop(TODAY), TODAY)

    events = again.restore(DayState(trading_day=TODAY, positions=[held("s1", 100, "1300.00", 1279.0)]))

    assert sent(events) == first  # execution is idempotent on both ids: nothing doubles
    [alert] = [e for e in events if isinstance(e, Alert)]
    assert alert.code == "strategy_stop_resent"
    assert "strategy s1 was stopped before risk restarted" in alert.text
    assert again.check(order(STOCK, price="1279.00")).code == VerdictCode.STRATEGY_STOPPED


def test_a_stop_the_ledger_has_is_not_sent_again() -> None:
    s = limited()
    s.restore_backstop({"trading_day": TODAY, "stopped": {"s1": WHY}}, TODAY)

    events = s.restore(DayState(trading_day=TODAY, stopped={"s1": WHY}))

    assert sent(events) == [] and s.stopped == {"s1": WHY}


def test_a_strategy_that_crossed_its_max_loss_while_risk_was_down_is_stopped_at_the_restore() -> None:
    s = limited()

    both = [held("s1", 100, "1300.00", 1279.0), held("s2", 100, "1300.00", 1279.0)]

    events = s.restore(DayState(trading_day=TODAY, positions=both))

    assert sent(events) == STOP
    assert set(s.stopped) == {"s1"}  # s2 has no limit


def test_a_crossing_only_a_resync_reveals_stops_the_strategy() -> None:
    s = limited()
    s.restore(DayState(trading_day=TODAY))
    s.on_tick(tick(1279.0))  # marked, but the fill was lost on the bus

    events, drifted = s.resync(DayState(trading_day=TODAY, positions=[held("s1", 100, "1300.00", 1279.0)]))

    assert drifted and sent(events)[0] == ("RecordRiskEvent", f"risk-stop-{TODAY}-s1")


def test_a_stop_from_an_earlier_day_does_not_carry_over() -> None:
    s = limited()
    yesterday = "2026-12-01"
    s.restore_backstop({"trading_day": yesterday, "stopped": {"s1": WHY}}, TODAY)

    events = s.restore(DayState(trading_day=TODAY))

    assert s.stopped == {} and sent(events) == []
    assert s.check(order(STOCK, price="1300.00")).approved


def test_nan_and_infinite_prices_neither_stop_a_strategy_nor_move_its_mtm() -> None:
    s = limited(max_loss=2_000.0, target=500.0)
    s.on_fill(fill("s1", "BUY", 100, "1300.00", "a"))
    net = s.strategy_net("s1")

    for bad in (math.nan, math.inf, -math.inf, -1.0, 0.0):
        assert list(s.on_tick(tick(bad))) == []
    assert list(s.on_fill(fill("s1", "SELL", 100, "NaN", "b"))) == []

    assert s.strategy_net("s1") == net and s.stopped == {}


def test_duplicate_and_reordered_fills_count_once_and_stop_once() -> None:
    s = limited()
    buy, sell = fill("s1", "BUY", 100, "1300.00", "a"), fill("s1", "SELL", 100, "1278.00", "b")

    events = [*s.on_fill(sell), *s.on_fill(buy), *s.on_fill(sell), *s.on_fill(buy)]  # reordered, repeated

    assert sent(events) == STOP
    assert round(s.strategy_net("s1"), 2) == round(-2200 - 0.00035 * (130_000 + 127_800), 2)
