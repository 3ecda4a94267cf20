"""Risk and contract expiry: an expired contract is refused; after the expiry-day cutoff only
orders that close a position pass in a contract expiring today."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from libs.common.clock import IST, ManualClock
from libs.common.config import ConfigError, RiskConfig, load_config
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Fill, OrderRequest, VerdictCode
from services.risk.sentinel import RiskSentinel

NOV_FUT = Instrument(segment="nse_fo", token="35001", symbol="NIFTY26NOVFUT", name="NIFTY",
                     inst_type="FUTIDX", lot_size=65, tick_size=Decimal("0.10"), freeze_qty=1800,
                     expiry=dt.date(2026, 11, 24), underlying="NIFTY")  # fmt: skip
WEEKLY_CE = Instrument(segment="nse_fo", token="53101", symbol="NIFTY26D0824000CE", name="NIFTY",
                       inst_type="OPTIDX", lot_size=65, tick_size=Decimal("0.05"), freeze_qty=1800,
                       expiry=dt.date(2026, 12, 8), strike=Decimal(24000), option_type="CE",
                       underlying="NIFTY")  # fmt: skip
STOCK = Instrument(segment="nse_cm", token="2885", symbol="RELIANCE-EQ", tick_size=Decimal("0.10"))
MASTER = MasterData([NOV_FUT, WEEKLY_CE, STOCK])
_n = iter(range(1, 10_000))


def at(day: dt.date, hh: int = 10, mm: int = 0) -> ManualClock:
    return ManualClock(int(dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST).timestamp()) * 10**9)


def sentinel(clock: ManualClock, **risk: object) -> RiskSentinel:
    risk.setdefault("no_new_entries_after", "")  # these tests are about expiry, late in the day
    return RiskSentinel(RiskConfig(**risk), MASTER, clock)  # type: ignore[arg-type]


def order(inst: Instrument, side: str = "BUY", qty: int = 65, price: str = "120.00",
          **kw: object) -> OrderRequest:
    return OrderRequest(request_id=f"r{next(_n)}", strategy_id="s1", side=side, quantity=qty,
                        segment=inst.segment, token=inst.token, price=Decimal(price), product="NRML",
                        **kw)  # type: ignore[arg-type]  # fmt: skip


def hold(s: RiskSentinel, inst: Instrument, qty: int, price: str = "120.00") -> None:
    s.on_fill(Fill(fill_id=f"f{next(_n)}", order_id=f"o{next(_n)}", strategy_id="s1", symbol=inst.symbol,
                   segment=inst.segment, token=inst.token, side="BUY", quantity=qty,
                   price=Decimal(price)))  # fmt: skip


def test_an_order_in_an_expired_contract_is_refused_naming_the_expiry() -> None:
    s = sentinel(at(dt.date(2026, 12, 2)))

    v = s.check(order(NOV_FUT, price="25950.00"))

    assert not v.approved
    assert (v.code, v.reason) == (VerdictCode.CONTRACT_EXPIRED, "NIFTY26NOVFUT expired on 2026-11-24")


def test_an_exit_in_an_expired_contract_is_refused_too() -> None:
    s = sentinel(at(dt.date(2026, 11, 24)))
    hold(s, NOV_FUT, 65, "25950.00")
    s.clock.advance(86_400)  # type: ignore[attr-defined]

    v = s.check(order(NOV_FUT, side="SELL", price="25950.00", purpose="EXIT"))

    assert v.code == VerdictCode.CONTRACT_EXPIRED


def test_on_its_expiry_day_a_contract_still_trades() -> None:
    s = sentinel(at(dt.date(2026, 11, 24), 15, 20), max_notional=5_000_000.0)

    assert s.check(order(NOV_FUT, price="25950.00")).approved


def test_the_expiry_date_is_read_in_ist_not_utc() -> None:
    # 00:30 IST on the 25th is still the 24th in UTC: the contract has expired in India
    s = sentinel(at(dt.date(2026, 11, 25), 0, 30))

    assert s.check(order(NOV_FUT, price="25950.00")).code == VerdictCode.CONTRACT_EXPIRED


def test_without_a_cutoff_entries_pass_all_expiry_day() -> None:
    s = sentinel(at(dt.date(2026, 12, 8), 15, 25))

    assert s.check(order(WEEKLY_CE)).approved


def test_after_the_cutoff_a_new_entry_expiring_today_is_refused() -> None:
    s = sentinel(at(dt.date(2026, 12, 8), 15, 0), expiry_day_cutoff="15:00")

    v = s.check(order(WEEKLY_CE))

    assert not v.approved and v.code == VerdictCode.EXPIRY_CUTOFF
    assert v.reason == ("NIFTY26D0824000CE expires today: new entries are refused from 15:00 "
                        "(risk.expiry_day_cutoff); orders that close a position still pass")


def test_before_the_cutoff_an_entry_passes() -> None:
    s = sentinel(at(dt.date(2026, 12, 8), 14, 59), expiry_day_cutoff="15:00")

    assert s.check(order(WEEKLY_CE)).approved


def test_after_the_cutoff_closing_a_position_still_passes() -> None:
    s = sentinel(at(dt.date(2026, 12, 8), 9, 30), expiry_day_cutoff="15:00")
    hold(s, WEEKLY_CE, 130)
    s.clock.advance(5 * 3600 + 40 * 60)  # type: ignore[attr-defined]  # 15:10: past the cutoff, before the close

    assert s.check(order(WEEKLY_CE, side="SELL", qty=130, purpose="EXIT")).approved
    assert s.check(order(WEEKLY_CE, side="BUY")).code == VerdictCode.EXPIRY_CUTOFF


def test_the_cutoff_leaves_contracts_expiring_later_and_cash_alone() -> None:
    s = sentinel(at(dt.date(2026, 12, 7), 15, 10), expiry_day_cutoff="15:00")

    assert s.check(order(WEEKLY_CE)).approved
    assert s.check(order(STOCK, qty=1, price="1290.50")).approved


@pytest.mark.parametrize("value", ["3pm", "25:00", "15:5", "15-00"])
def test_a_malformed_cutoff_is_a_config_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOPULSE_RISK__EXPIRY_DAY_CUTOFF", value)
    with pytest.raises(ConfigError, match=r"risk\.expiry_day_cutoff"):
        load_config()


def test_a_cutoff_time_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOPULSE_RISK__EXPIRY_DAY_CUTOFF", "15:00")
    assert load_config().risk.expiry_day_cutoff == "15:00"
