"""The paper master's generated index derivatives: live contracts only, stable tokens."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import Decimal

from libs.common.contracts import (
    TOKEN_BASE,
    atm_strike,
    future_symbol,
    option_symbol,
    paper_derivatives,
    paper_token,
)
from libs.common.instruments import Instrument, MasterData

D = dt.date
PRICES = {"NIFTY": 25_912.0, "BANKNIFTY": 58_450.0, "FINNIFTY": 27_500.0, "MIDCPNIFTY": 13_510.0,
          "SENSEX": 85_040.0}


def _by_symbol(day: dt.date, strikes: int = 20) -> dict[str, Instrument]:
    return {i.symbol: i for i in paper_derivatives(day, index_prices=PRICES, strikes=strikes)}


def _expiries(contracts: dict[str, Instrument], underlying: str, inst_type: str) -> list[dt.date]:
    return sorted({i.expiry for i in contracts.values()
                   if i.underlying == underlying and i.inst_type == inst_type and i.expiry})


def test_symbols_follow_the_exchange_style() -> None:
    assert option_symbol("NIFTY", D(2026, 12, 29), Decimal(24000), "CE", monthly=True) == "NIFTY26DEC24000CE"
    assert option_symbol("NIFTY", D(2026, 12, 8), Decimal(24000), "PE", monthly=False) == "NIFTY26D0824000PE"
    assert option_symbol("NIFTY", D(2027, 3, 2), Decimal(24000), "CE", monthly=False) == "NIFTY2730224000CE"
    half = option_symbol("NIFTY", D(2026, 10, 6), Decimal("24012.5"), "CE", monthly=False)
    assert half == "NIFTY26O0624012.5CE"
    assert future_symbol("BANKNIFTY", D(2027, 1, 25)) == "BANKNIFTY27JANFUT"


def test_nifty_lists_two_weeklies_two_monthlies_and_two_futures() -> None:
    contracts = _by_symbol(D(2026, 12, 2))

    assert _expiries(contracts, "NIFTY", "OPTIDX") == [D(2026, 12, 8), D(2026, 12, 15), D(2026, 12, 29),
                                                      D(2027, 1, 25)]
    assert _expiries(contracts, "NIFTY", "FUTIDX") == [D(2026, 12, 29), D(2027, 1, 25)]
    fut = contracts["NIFTY26DECFUT"]
    assert (fut.lot_size, fut.freeze_qty, fut.tick_size) == (65, 1800, Decimal("0.10"))
    assert fut.ref_price == 25_912.0  # futures track spot
    weekly = contracts["NIFTY26D0825900CE"]
    assert weekly.strike == Decimal(25900) and weekly.option_type == "CE" and weekly.expiry == D(2026, 12, 8)
    assert weekly.inst_type == "OPTIDX" and weekly.underlying == "NIFTY" and weekly.segment == "nse_fo"
    assert weekly.tick_size == Decimal("0.05") and weekly.lot_size == 65 and weekly.freeze_qty == 1800
    assert "NIFTY26DEC25900PE" in contracts and "NIFTY27JAN25900PE" in contracts


def test_the_weekly_in_the_monthly_week_is_the_monthly_contract() -> None:
    contracts = _by_symbol(D(2026, 12, 23))  # next Tuesdays: the 29th (monthly), then 5 January

    assert _expiries(contracts, "NIFTY", "OPTIDX") == [D(2026, 12, 29), D(2027, 1, 5), D(2027, 1, 25)]
    assert "NIFTY26DEC25900CE" in contracts and "NIFTY2710525900CE" in contracts
    assert "NIFTY26D2925900CE" not in contracts


def test_monthly_only_indices_and_sensex() -> None:
    contracts = _by_symbol(D(2026, 12, 2))

    for underlying in ("BANKNIFTY", "FINNIFTY", "MIDCPNIFTY"):
        assert _expiries(contracts, underlying, "OPTIDX") == [D(2026, 12, 29), D(2027, 1, 25)]
        assert _expiries(contracts, underlying, "FUTIDX") == [D(2026, 12, 29), D(2027, 1, 25)]
    assert _expiries(contracts, "SENSEX", "OPTIDX") == [D(2026, 12, 3), D(2026, 12, 10), D(2026, 12, 31),
                                                       D(2027, 1, 28)]
    sensex = contracts["SENSEX26D0385000CE"]
    assert (sensex.segment, sensex.lot_size, sensex.freeze_qty) == ("bse_fo", 20, 1000)
    assert contracts["BANKNIFTY26DEC58500PE"].lot_size == 30
    assert contracts["BANKNIFTY26DEC58500PE"].freeze_qty == 600
    assert contracts["MIDCPNIFTY26DEC13500CE"].lot_size == 120


def test_strikes_sit_around_the_reference_price_at_the_strike_step() -> None:
    contracts = _by_symbol(D(2026, 12, 2), strikes=5)
    strikes = sorted({i.strike for i in contracts.values()
                      if i.underlying == "NIFTY" and i.expiry == D(2026, 12, 8) and i.strike is not None})

    assert strikes == [Decimal(25650 + 50 * k) for k in range(11)]  # ATM 25900 ± 5 steps of 50
    assert atm_strike(25_925.0, Decimal(50)) == Decimal(25950)  # halves round up
    assert atm_strike(13_512.4, Decimal(25)) == Decimal(13500)


def test_an_expiry_day_still_lists_the_contract_and_the_day_after_does_not() -> None:
    on_expiry = _by_symbol(D(2026, 12, 8))
    day_after = _by_symbol(D(2026, 12, 9))

    assert "NIFTY26D0825900CE" in on_expiry
    assert "NIFTY26D0825900CE" not in day_after
    assert all(i.expiry is not None and i.expiry >= D(2026, 12, 9) for i in day_after.values())


def test_tokens_are_stable_distinct_and_beyond_any_kotak_token() -> None:
    today = paper_derivatives(D(2026, 12, 2), index_prices=PRICES)
    tomorrow = {i.symbol: i.token for i in paper_derivatives(D(2026, 12, 3), index_prices=PRICES)}

    assert len({i.key for i in today}) == len(today)
    assert all(int(i.token) >= TOKEN_BASE for i in today)
    assert all(tomorrow[i.symbol] == i.token for i in today if i.symbol in tomorrow)
    assert paper_token("nse_fo", "NIFTY26DECFUT") == paper_token("nse_fo", "NIFTY26DECFUT")


def test_a_taken_token_is_never_handed_out_again() -> None:
    first = paper_derivatives(D(2026, 12, 2), index_prices=PRICES)[0]

    [again] = [i for i in paper_derivatives(D(2026, 12, 2), index_prices=PRICES, taken_tokens={first.key})
               if i.symbol == first.symbol]

    assert again.token != first.token


def test_the_paper_master_carries_a_few_hundred_contracts_per_index() -> None:
    master = MasterData.load(today=D(2026, 12, 2))
    per_index = Counter(i.underlying for i in master if i.underlying)

    assert per_index["NIFTY"] == 4 * 41 * 2 + 2
    assert per_index["BANKNIFTY"] == 2 * 41 * 2 + 2
    assert per_index["SENSEX"] == 4 * 41 * 2
    # strikes follow the index rows' reference prices in the sample master
    assert master.resolve("NIFTY26D0825900CE").strike == Decimal(25900)
    assert master.resolve("SENSEX26D0385000PE").strike == Decimal(85000)
