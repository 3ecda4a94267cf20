"""Black-Scholes: textbook values, put-call parity, delta, the smile and time to expiry."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime

import pytest

from libs.common.option_pricing import (
    MIN_YEARS,
    SECONDS_PER_YEAR,
    bs_delta,
    bs_price,
    expiry_ns,
    smile_vol,
    years_to_expiry,
)


def test_prices_match_the_textbook_example() -> None:
    # Hull, Options, Futures and Other Derivatives: S=42, K=40, r=10 %, sigma=20 %, T=0.5
    assert bs_price(42, 40, 0.5, 0.2, rate=0.1) == pytest.approx(4.7594, abs=1e-4)
    assert bs_price(42, 40, 0.5, 0.2, rate=0.1, call=False) == pytest.approx(0.8086, abs=1e-4)
    assert bs_delta(42, 40, 0.5, 0.2, rate=0.1) == pytest.approx(0.7791, abs=1e-4)


@pytest.mark.parametrize(("spot", "strike", "years", "vol", "rate"), [
    (24_000, 24_000, 2 / 365, 0.12, 0.065),
    (24_000, 25_000, 30 / 365, 0.18, 0.065),
    (58_500, 57_000, 0.25, 0.15, 0.0),
    (1_290.5, 1_200, 1.0, 0.3, 0.07),
])
def test_call_minus_put_is_spot_minus_discounted_strike(
        spot: float, strike: float, years: float, vol: float, rate: float) -> None:
    call = bs_price(spot, strike, years, vol, rate=rate)
    put = bs_price(spot, strike, years, vol, rate=rate, call=False)
    assert call - put == pytest.approx(spot - strike * math.exp(-rate * years), abs=1e-6)
    delta_gap = bs_delta(spot, strike, years, vol, rate=rate) - bs_delta(spot, strike, years, vol, rate=rate,
                                                                        call=False)
    assert delta_gap == pytest.approx(1.0)


def test_without_time_or_volatility_an_option_is_worth_its_intrinsic_value() -> None:
    assert bs_price(24_100, 24_000, 0, 0.12) == pytest.approx(100)
    assert bs_price(24_100, 24_000, 0, 0.12, call=False) == 0
    assert bs_price(23_900, 24_000, 0.1, 0, call=False) == pytest.approx(100)
    assert bs_delta(24_100, 24_000, 0, 0.12) == 1.0
    assert bs_delta(24_100, 24_000, 0, 0.12, call=False) == 0.0


def test_premiums_grow_with_time_and_volatility() -> None:
    short, long = bs_price(24_000, 24_000, 1 / 365, 0.12), bs_price(24_000, 24_000, 7 / 365, 0.12)
    assert 0 < short < long
    assert bs_price(24_000, 24_500, 7 / 365, 0.12) < bs_price(24_000, 24_500, 7 / 365, 0.2)


def test_a_bad_spot_or_strike_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        bs_price(0, 24_000, 0.1, 0.12)


def test_the_smile_adds_volatility_away_from_the_money_on_both_sides() -> None:
    assert smile_vol(0.12, 0.8, 24_000, 24_000) == pytest.approx(0.12)
    up, down = smile_vol(0.12, 0.8, 24_000, 26_000), smile_vol(0.12, 0.8, 26_000, 24_000)
    assert up == pytest.approx(down)
    assert up == pytest.approx(0.12 + 0.8 * math.log(26_000 / 24_000))


def test_a_contract_expires_at_1530_ist_on_its_expiry_date() -> None:
    assert expiry_ns(date(2026, 12, 8)) == int(datetime(2026, 12, 8, 10, 0, tzinfo=UTC).timestamp()) * 10**9


def test_time_to_expiry_counts_calendar_time_and_never_reaches_zero() -> None:
    at = expiry_ns(date(2026, 12, 8))
    day_before = at - 86_400 * 10**9
    assert years_to_expiry(day_before, at) == pytest.approx(86_400 / SECONDS_PER_YEAR)
    assert years_to_expiry(at - 10**9, at) == MIN_YEARS
    assert years_to_expiry(at + 3600 * 10**9, at) == MIN_YEARS
