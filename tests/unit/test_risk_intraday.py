"""Intraday rules in risk: from ``risk.no_new_entries_after`` (default 15:00 IST) orders that
open or add are refused with that reason, while orders that close a position still pass."""

from __future__ import annotations

import datetime as dt

import pytest

from libs.common.config import ConfigError, RiskConfig, load_config
from libs.common.messages import VerdictCode
from services.risk.sentinel import RiskSentinel
from tests.unit.test_risk_expiry import MASTER, STOCK, WEEKLY_CE, at, hold, order

DAY = dt.date(2026, 12, 2)


def late(hh: int, mm: int, **risk: object) -> RiskSentinel:
    return RiskSentinel(RiskConfig(**risk), MASTER, at(DAY, hh, mm))  # type: ignore[arg-type]


def test_the_default_cutoff_is_15_00() -> None:
    assert load_config(env={}).risk.no_new_entries_after == "15:00"


def test_an_entry_before_the_cutoff_passes_and_from_it_is_refused_with_the_reason() -> None:
    assert late(14, 59).check(order(STOCK, price="1300.00")).approved

    v = late(15, 0).check(order(STOCK, price="1300.00"))

    assert not v.approved and v.code == VerdictCode.LATE_ENTRY
    assert v.reason == ("new entries are refused from 15:00 (risk.no_new_entries_after): RELIANCE-EQ would "
                        "open or add; orders that close a position still pass")  # fmt: skip


def test_after_the_cutoff_an_order_that_closes_a_position_passes_and_one_that_adds_does_not() -> None:
    s = late(15, 10)
    hold(s, WEEKLY_CE, 65)

    assert s.check(order(WEEKLY_CE, side="SELL", qty=65)).approved
    assert s.check(order(WEEKLY_CE, side="BUY", qty=65)).code == VerdictCode.LATE_ENTRY


def test_an_empty_cutoff_allows_entries_all_day() -> None:
    assert late(15, 25, no_new_entries_after="").check(order(STOCK, price="1300.00")).approved


def test_a_cutoff_that_is_not_a_time_of_day_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"risk\.no_new_entries_after"):
        load_config(env={"NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER": "3pm"})


def test_max_entries_per_day_refuses_the_next_entry_with_the_reason_and_exits_still_pass() -> None:
    s = late(10, 0, max_entries_per_day=2)
    for _ in range(2):
        assert s.check(order(STOCK, price="1300.00")).approved

    v = s.check(order(STOCK, price="1300.00"))

    assert v.code == VerdictCode.MAX_ENTRIES
    assert v.reason == ("max_entries_per_day 2 reached: s1 has entered RELIANCE-EQ 2 time(s) today; "
                        "orders that close a position still pass")  # fmt: skip
    assert s.check(order(WEEKLY_CE, price="120.00")).approved  # per instrument
    hold(s, STOCK, 65)
    assert s.check(order(STOCK, side="SELL", qty=65, price="1300.00")).approved  # an exit


def test_an_entry_execution_refused_does_not_count() -> None:
    s = late(10, 0, max_entries_per_day=1)
    first = order(STOCK, price="1300.00")
    assert s.check(first).approved

    s.execution_failed(first.request_id, "ledger unavailable")

    assert s.check(order(STOCK, price="1300.00")).approved


def test_after_a_restart_the_ledgers_count_of_the_days_entries_is_kept() -> None:
    from libs.common.messages import DayState, EntryCount

    s = late(10, 0, max_entries_per_day=3)
    s.restore(DayState(trading_day="2026-12-02", entries=[
        EntryCount(strategy_id="s1", segment=STOCK.segment, token=STOCK.token, count=3)]))  # fmt: skip

    assert s.check(order(STOCK, price="1300.00")).code == VerdictCode.MAX_ENTRIES
    s.restore(DayState(trading_day="2026-12-03"))  # the next day starts afresh
    assert s.check(order(STOCK, price="1300.00")).approved


# ---------------------------------------------------------------------- strategy MTM limits


def _fill(s: RiskSentinel, sid: str, side: str, qty: int, price: str) -> list[object]:
    from decimal import Decimal

    from libs.common.messages import Fill

    n = next(_fills)
    return list(s.on_fill(Fill(fill_id=f"mf{n}", order_id=f"mo{n}", strategy_id=sid, symbol=STOCK.symbol,
                               segment=STOCK.segment, token=STOCK.token, side=side, quantity=qty,
                               price=Decimal(price))))  # fmt: skip


_fills = iter(range(1, 1_000_000))


def _tick(s: RiskSentinel, ltp: float) -> list[object]:
    from libs.common.messages import Tick

    return list(s.on_tick(Tick(segment=STOCK.segment, token=STOCK.token, ltp=ltp)))


def test_a_strategy_past_its_max_loss_is_squared_off_and_stopped_while_another_trades_on() -> None:
    from libs.common.messages import Alert, Flatten, RecordRiskEvent

    s = late(10, 0, max_daily_loss=1_000_000.0)
    s.set_strategy_limits({"s1": (2_000.0, 0.0), "s2": (0.0, 0.0)})
    _fill(s, "s1", "BUY", 100, "1300.00")
    _fill(s, "s2", "BUY", 100, "1300.00")
    assert _tick(s, 1290.0) == []  # s1 down 1,000 + 45.50 of costs: inside its limit

    events = _tick(s, 1279.0)  # s1 down 2,100 + costs

    alert, record, flatten = events
    assert isinstance(alert, Alert) and alert.code == "strategy_stopped"
    assert "strategy s1 stopped" in alert.text
    assert isinstance(record, RecordRiskEvent) and record.event == "strategy_stopped"
    assert record.data["strategy_id"] == "s1"
    assert isinstance(flatten, Flatten) and flatten.strategy_id == "s1" and not flatten.symbol
    refused = s.check(order(STOCK, price="1280.00"))  # s1's new entry
    assert refused.code == VerdictCode.STRATEGY_STOPPED
    assert "net MTM -2145.50 reached its max_loss -2000.00" in refused.reason
    other = order(STOCK, price="1280.00")
    assert s.check(msgspec_replace(other, strategy_id="s2")).approved  # s2 trades on
    assert s.check(order(STOCK, side="SELL", qty=100, price="1280.00")).approved  # s1's exit passes
    assert _tick(s, 1270.0) == []  # stopped once


def test_a_strategy_reaching_its_target_profit_is_stopped_too_and_a_restart_keeps_it_stopped() -> None:
    from libs.common.messages import DayState

    s = late(10, 0)
    s.set_strategy_limits({"s1": (0.0, 500.0)})
    _fill(s, "s1", "BUY", 100, "1300.00")

    assert _tick(s, 1306.0)  # up 600 less 45.50 of costs
    again = late(10, 5)
    again.set_strategy_limits({"s1": (0.0, 500.0)})
    again.restore(DayState(trading_day="2026-12-02", stopped=dict(s.stopped)))

    assert again.check(order(STOCK, price="1306.00")).code == VerdictCode.STRATEGY_STOPPED


def msgspec_replace(o: object, **kw: object) -> object:
    import msgspec

    return msgspec.structs.replace(o, **kw)  # type: ignore[type-var]


def test_a_manual_order_is_not_an_entry_of_the_limit() -> None:
    s = late(10, 0, max_entries_per_day=1)
    assert s.check(order(STOCK, price="1300.00", purpose="MANUAL")).approved

    assert s.check(order(STOCK, price="1300.00")).approved  # the strategy's one entry


def test_a_stop_survives_a_risk_restart_through_the_local_backstop() -> None:
    s = late(10, 0)
    s.set_strategy_limits({"s1": (0.0, 500.0)})
    _fill(s, "s1", "BUY", 100, "1300.00")
    _tick(s, 1306.0)
    saved = s.backstop("2026-12-02")

    again = late(10, 1)
    again.restore_backstop(saved, "2026-12-02")
    from libs.common.messages import DayState

    again.restore(DayState(trading_day="2026-12-02"))  # the ledger had not recorded it yet

    assert again.check(order(STOCK, price="1306.00")).code == VerdictCode.STRATEGY_STOPPED
