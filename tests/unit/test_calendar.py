"""The exchange calendar: holidays, trading days, and index-derivative expiry dates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from libs.common.calendar import (
    CalendarError,
    TradingCalendar,
    default_calendar,
    expiries,
    load_contract_specs,
)
from libs.common.clock import IST, ManualClock
from services.feed.watchdog import MarketHours

D = dt.date
CAL = default_calendar()


def test_weekends_and_listed_holidays_are_not_trading_days() -> None:
    assert CAL.is_trading_day("NSE", D(2026, 12, 2))  # a Wednesday
    assert not CAL.is_trading_day("NSE", D(2026, 12, 5))  # Saturday
    assert not CAL.is_trading_day("NSE", D(2026, 1, 26))  # Republic Day
    assert not CAL.is_trading_day("BSE", D(2026, 12, 25))  # Christmas
    assert CAL.holiday("NSE", D(2026, 11, 24)) == "Prakash Gurpurb Sri Guru Nanak Dev"
    assert CAL.covers(D(2026, 6, 1))


def test_previous_trading_day_skips_weekends_and_holidays() -> None:
    assert CAL.previous_trading_day("NSE", D(2026, 1, 27)) == D(2026, 1, 23)  # Mon 26th is a holiday
    assert CAL.previous_trading_day("NSE", D(2026, 12, 7)) == D(2026, 12, 4)
    assert CAL.trading_day_on_or_before("NSE", D(2026, 12, 2)) == D(2026, 12, 2)
    assert CAL.next_trading_day("NSE", D(2026, 12, 24)) == D(2026, 12, 28)


def test_nifty_weekly_expiries_are_tuesdays() -> None:
    tuesdays = [D(2026, 12, 8), D(2026, 12, 15), D(2026, 12, 22)]
    assert expiries("NIFTY", "weekly", D(2026, 12, 2), 3) == tuesdays


def test_an_expiry_day_is_its_own_first_expiry() -> None:
    assert expiries("NIFTY", "weekly", D(2026, 12, 8), 1) == [D(2026, 12, 8)]
    assert expiries("NIFTY", "weekly", D(2026, 12, 9), 1) == [D(2026, 12, 15)]


def test_nifty_monthly_expiry_is_the_last_tuesday() -> None:
    assert expiries("NIFTY", "monthly", D(2026, 12, 2), 2) == [D(2026, 12, 29), D(2027, 1, 25)]
    assert expiries("BANKNIFTY", "monthly", D(2026, 6, 1), 1) == [D(2026, 6, 30)]


def test_a_holiday_expiry_moves_to_the_previous_trading_day() -> None:
    # Tuesday 24 November 2026 is Guru Nanak Jayanti: the weekly and the monthly move to Monday
    assert expiries("NIFTY", "monthly", D(2026, 11, 1), 1) == [D(2026, 11, 23)]
    assert expiries("NIFTY", "weekly", D(2026, 11, 18), 2) == [D(2026, 11, 23), D(2026, 12, 1)]
    # Tuesday 3 March 2026 is Holi: Monday 2 March
    assert expiries("NIFTY", "weekly", D(2026, 3, 1), 1) == [D(2026, 3, 2)]
    # Tuesday 31 March (Mahavir Jayanti) is the last Tuesday: monthly on Monday 30 March
    assert expiries("FINNIFTY", "monthly", D(2026, 3, 1), 1) == [D(2026, 3, 30)]


def test_the_shifted_day_after_a_holiday_expiry_is_already_past() -> None:
    # on the holiday itself the November contract has gone (it expired on the 23rd)
    assert expiries("NIFTY", "monthly", D(2026, 11, 24), 1) == [D(2026, 12, 29)]


def test_sensex_weekly_thursdays_and_monthly_last_thursday() -> None:
    thursdays = [D(2026, 12, 3), D(2026, 12, 10), D(2026, 12, 17)]
    assert expiries("SENSEX", "weekly", D(2026, 12, 2), 3) == thursdays
    assert expiries("SENSEX", "monthly", D(2026, 12, 2), 1) == [D(2026, 12, 31)]
    # Thursday 26 March 2026 is Ram Navami: that week's SENSEX weekly (and monthly) is Wednesday
    assert expiries("SENSEX", "weekly", D(2026, 3, 23), 1) == [D(2026, 3, 25)]
    assert expiries("SENSEX", "monthly", D(2026, 3, 1), 1) == [D(2026, 3, 25)]


def test_monthly_only_underlyings_have_no_weekly_expiries() -> None:
    with pytest.raises(CalendarError, match="BANKNIFTY has no weekly expiries"):
        expiries("BANKNIFTY", "weekly", D(2026, 12, 2), 1)
    with pytest.raises(CalendarError, match="no contract spec"):
        expiries("NOSUCH", "monthly", D(2026, 12, 2), 1)


def test_contract_specs_carry_the_current_lots_and_freezes() -> None:
    specs = load_contract_specs()
    lots = {u: (s.lot_size, s.freeze_qty, int(s.strike_step)) for u, s in specs.items()}
    assert lots == {
        "NIFTY": (65, 1800, 50), "BANKNIFTY": (30, 600, 100), "FINNIFTY": (60, 1800, 50),
        "MIDCPNIFTY": (120, 2800, 25), "SENSEX": (20, 1000, 100),
    }  # fmt: skip
    assert specs["SENSEX"].exchange == "BSE" and specs["SENSEX"].segment == "bse_fo"


def test_an_edited_holiday_file_is_what_the_calendar_uses(tmp_path: Path) -> None:
    path = tmp_path / "holidays.csv"
    path.write_text("# a comment\nexchange,date,description\nNSE,2026-12-08,Test holiday\n")
    cal = TradingCalendar.load(path)

    assert not cal.is_trading_day("NSE", D(2026, 12, 8))
    assert cal.is_trading_day("BSE", D(2026, 12, 8))
    assert expiries("NIFTY", "weekly", D(2026, 12, 2), 1, calendar=cal) == [D(2026, 12, 7)]


def test_a_malformed_holiday_row_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "holidays.csv"
    path.write_text("exchange,date,description\nNSE,08/12/2026,Test\n")
    with pytest.raises(CalendarError, match="row 2"):
        TradingCalendar.load(path)


def _at(day: dt.date, hh: int, mm: int) -> ManualClock:
    return ManualClock(int(dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST).timestamp() * 1e9))


def test_feed_market_hours_are_closed_on_exchange_holidays() -> None:
    hours = MarketHours("09:15-15:30", calendar=CAL)

    assert hours.is_open(_at(D(2026, 12, 24), 10, 0))
    assert not hours.is_open(_at(D(2026, 12, 25), 10, 0))  # Christmas, a Friday
    assert not hours.is_open(_at(D(2026, 12, 26), 10, 0))  # Saturday
    assert MarketHours("09:15-15:30").is_open(_at(D(2026, 12, 25), 10, 0))  # no calendar: weekdays only
