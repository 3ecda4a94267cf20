"""Option chains over a master built in the test: expiry specs, ATM and strike offsets,
call/put lookups and their errors. Every date is injected; nothing reads the system clock."""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal

import pytest

from libs.common.chain import ChainError, chain, expiries, find_option, resolve_expiry, spot_instrument
from libs.common.clock import IST, ManualClock
from libs.common.instruments import Instrument, MasterData, UnknownInstrument
from libs.common.messages import Tick
from services.strategy.base import Strategy, StrategyContext, StrategyParams

D = dt.date
WED = D(2026, 12, 2)  # a Wednesday: the week's NIFTY expiry (Tuesday) is behind us
NIFTY_EXPIRIES = [
    D(2026, 12, 1),  # this week's, already expired on WED
    D(2026, 12, 8),
    D(2026, 12, 15),
    D(2026, 12, 22),
    D(2026, 12, 29),  # last Tuesday: the monthly
    D(2027, 1, 5),
    D(2027, 1, 25),  # the monthly, moved from Tuesday 26 January (Republic Day) to Monday
]
BANKNIFTY_EXPIRIES = [D(2026, 12, 29), D(2027, 1, 25)]  # monthly only
STRIKES = [23800, 23850, 23900, 23950, 24000, 24050, 24100, 24150, 24200]

_tokens = iter(range(50_000, 10_000_000))


def option(
    underlying: str, expiry: dt.date, strike: int | str, kind: str, segment: str = "nse_fo"
) -> Instrument:
    return Instrument(
        segment=segment,
        token=str(next(_tokens)),
        symbol=f"{underlying}{expiry:%y%b%d}{strike}{kind}".upper(),
        name=underlying,
        inst_type="OPTIDX",
        lot_size=65,
        tick_size=Decimal("0.05"),
        expiry=expiry,
        strike=Decimal(str(strike)),
        option_type=kind,
        underlying=underlying,
    )


def contracts(underlying: str, days: list[dt.date], strikes: list[int]) -> list[Instrument]:
    return [option(underlying, day, k, kind) for day in days for k in strikes for kind in ("CE", "PE")]


@pytest.fixture
def master() -> MasterData:
    return MasterData(
        [
            Instrument(
                segment="nse_cm",
                token="Nifty 50",
                symbol="Nifty 50",
                name="NIFTY",
                inst_type="INDEX",
                ref_price=24010.0,
            ),
            Instrument(segment="nse_cm", token="2885", symbol="RELIANCE-EQ", name="RELIANCE", inst_type="EQ"),
            Instrument(
                segment="nse_fo",
                token="35011",
                symbol="NIFTY26DECFUT",
                name="NIFTY",
                inst_type="FUTIDX",
                expiry=D(2026, 12, 29),
                underlying="NIFTY",
            ),
            *contracts("NIFTY", NIFTY_EXPIRIES, STRIKES),
            *contracts("BANKNIFTY", BANKNIFTY_EXPIRIES, [54000, 54100, 54200]),
            option("RELIANCE", D(2026, 12, 29), 1300, "CE"),
        ]
    )


# ---------------------------------------------------------------------- expiry specs
@pytest.mark.parametrize(
    ("spec", "today", "expected"),
    [
        ("weekly", WED, D(2026, 12, 8)),
        ("next-weekly", WED, D(2026, 12, 15)),
        ("monthly", WED, D(2026, 12, 29)),
        ("weekly", D(2026, 12, 8), D(2026, 12, 8)),  # expiry day: today's contract is still the weekly
        ("next-weekly", D(2026, 12, 8), D(2026, 12, 15)),
        ("weekly", D(2026, 12, 23), D(2026, 12, 29)),  # the monthly is also the nearest expiry
        ("monthly", D(2026, 12, 30), D(2027, 1, 25)),  # holiday-shifted monthly is still its month's last
        ("WEEKLY", WED, D(2026, 12, 8)),
    ],
)
def test_expiry_specs_pick_the_listed_expiry_for_the_injected_day(
    master: MasterData, spec: str, today: dt.date, expected: dt.date
) -> None:
    assert resolve_expiry(master, "NIFTY", spec, today) == expected


def test_an_underlying_with_monthly_options_only_has_its_monthly_as_weekly(master: MasterData) -> None:
    assert resolve_expiry(master, "BANKNIFTY", "weekly", WED) == D(2026, 12, 29)
    assert resolve_expiry(master, "BANKNIFTY", "next-weekly", WED) == D(2027, 1, 25)
    assert resolve_expiry(master, "banknifty", "monthly", WED) == D(2026, 12, 29)


def test_an_explicit_listed_date_or_iso_string_is_that_expiry(master: MasterData) -> None:
    assert resolve_expiry(master, "NIFTY", D(2026, 12, 22), WED) == D(2026, 12, 22)
    assert resolve_expiry(master, "NIFTY", "2027-01-05", WED) == D(2027, 1, 5)


def test_an_unlisted_date_is_refused_naming_the_listed_expiries(master: MasterData) -> None:
    with pytest.raises(ChainError) as err:
        resolve_expiry(master, "NIFTY", D(2026, 12, 10), WED)
    assert str(err.value) == (
        "no NIFTY options expire on 2026-12-10 (listed from 2026-12-02: "
        "2026-12-08, 2026-12-15, 2026-12-22, 2026-12-29, 2027-01-05, 2027-01-25)"
    )


def test_no_expiry_left_says_the_master_may_be_stale(master: MasterData) -> None:
    with pytest.raises(ChainError) as err:
        resolve_expiry(master, "NIFTY", "weekly", D(2027, 2, 1))
    assert str(err.value) == (
        "no weekly NIFTY expiry on or after 2027-02-01 in the instrument master "
        "(its last NIFTY option expiry is 2027-01-25; is the master stale?)"
    )
    with pytest.raises(ChainError, match="no next-weekly NIFTY expiry on or after 2027-01-06"):
        resolve_expiry(master, "NIFTY", "next-weekly", D(2027, 1, 6))


def test_an_unknown_spec_names_the_accepted_ones(master: MasterData) -> None:
    with pytest.raises(
        ChainError, match="unknown expiry 'fortnightly': use weekly, next-weekly, monthly or a date"
    ):
        resolve_expiry(master, "NIFTY", "fortnightly", WED)


def test_an_underlying_without_options_is_refused_naming_those_with_options(master: MasterData) -> None:
    with pytest.raises(UnknownInstrument) as err:  # a ChainError is an UnknownInstrument
        chain(master, "FINNIFTY", "weekly", WED)
    assert str(err.value) == (
        "no options on 'FINNIFTY' in the instrument master (options are listed on BANKNIFTY, NIFTY, RELIANCE)"
    )
    with pytest.raises(ChainError, match="lists no options at all"):
        chain(MasterData(), "NIFTY", "weekly", WED)


def test_expiries_lists_those_on_or_after_today(master: MasterData) -> None:
    assert expiries(master, "BANKNIFTY") == BANKNIFTY_EXPIRIES
    assert expiries(master, "NIFTY", D(2026, 12, 29)) == [D(2026, 12, 29), D(2027, 1, 5), D(2027, 1, 25)]


# ---------------------------------------------------------------------- strikes
def test_the_chain_lists_its_strikes_step_and_expiry(master: MasterData) -> None:
    ch = chain(master, "nifty", "weekly", WED)

    assert (ch.underlying, ch.expiry) == ("NIFTY", D(2026, 12, 8))
    assert ch.strikes == tuple(Decimal(k) for k in STRIKES)
    assert ch.step == Decimal(50)


@pytest.mark.parametrize(
    ("spot", "atm"),
    [
        (24012.0, 24000),
        (24025.0, 24000),  # a tie goes to the lower strike
        (Decimal("24025.05"), 24050),
        (24026, 24050),
        (23975, 23950),  # tie
        (21000.0, 23800),  # below the listed strikes: the lowest
        (30000.0, 24200),  # above: the highest
        (24000, 24000),
    ],
)
def test_atm_is_the_listed_strike_nearest_spot(master: MasterData, spot: float | Decimal, atm: int) -> None:
    assert chain(master, "NIFTY", "weekly", WED).atm(spot) == Decimal(atm)


@pytest.mark.parametrize("spot", [0, 0.0, -5, float("inf"), float("-inf"), float("nan"), Decimal("NaN"),
                                  Decimal("sNaN"), Decimal("-24000")])  # fmt: skip
def test_a_spot_that_is_not_a_positive_finite_price_is_refused_not_read_as_an_edge_strike(
    master: MasterData, spot: float | Decimal
) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    with pytest.raises(ChainError, match="is not a positive finite price"):
        ch.atm(spot)
    with pytest.raises(ChainError):
        ch.strike(1, spot)


def test_strike_offsets_step_through_the_listed_strikes_from_atm(master: MasterData) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    assert ch.strike(0, 24012) == Decimal(24000)
    assert ch.strike(2, 24012) == Decimal(24100)
    assert ch.strike(-3, 24012) == Decimal(23850)
    assert ch.strike(4, 24012) == Decimal(24200)
    assert ch.near(24012, 2) == [Decimal(k) for k in (23900, 23950, 24000, 24050, 24100)]
    assert ch.near(23800, 2) == [Decimal(k) for k in (23800, 23850, 23900)]


def test_an_offset_beyond_the_listed_strikes_is_refused(master: MasterData) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    with pytest.raises(ChainError) as err:
        ch.strike(5, 24012)
    assert str(err.value) == (
        "NIFTY 2026-12-08: +5 strikes from ATM 24000 is beyond the listed strikes 23800..24200"
    )
    with pytest.raises(ChainError, match="-5 strikes from ATM 24000"):
        ch.strike(-5, 24012)


def test_a_grid_that_widens_away_from_the_money_keeps_the_common_step_and_listed_offsets() -> None:
    listed = [23500, 23700, 23900, 23950, 24000, 24050, 24100, 24300]
    ch = chain(MasterData(contracts("NIFTY", [D(2026, 12, 8)], listed)), "NIFTY", "weekly", WED)

    assert ch.step == Decimal(50)
    assert ch.strike(3, 24000) == Decimal(24300)
    assert ch.strike(-3, 24000) == Decimal(23700)


# ---------------------------------------------------------------------- contracts
def test_call_and_put_return_the_listed_contract(master: MasterData) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    ce, pe = ch.call(24000), ch.put(ch.strike(1, 24012))
    assert (ce.underlying, ce.expiry, ce.strike, ce.option_type) == (
        "NIFTY",
        D(2026, 12, 8),
        Decimal(24000),
        "CE",
    )
    assert (pe.strike, pe.option_type) == (Decimal(24050), "PE")
    assert ch.call("24000") is ce
    assert ch.call(24000.0) is ce
    assert ch.call(Decimal("24000.00")) is ce


def test_an_unlisted_contract_is_refused_naming_underlying_strike_type_and_expiry(master: MasterData) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    with pytest.raises(ChainError) as err:
        ch.call(24010)
    assert str(err.value) == (
        "no NIFTY 24010 CE expiring 2026-12-08 in the instrument master "
        "(listed strikes 23800..24200, step 50)"
    )
    with pytest.raises(ChainError, match="no NIFTY 30000 PE expiring 2026-12-08"):
        ch.put(30000)
    with pytest.raises(ChainError, match="option type must be CE or PE, got 'XX'"):
        ch.option(24000, "XX")


def test_a_strike_listed_for_calls_only_has_no_put() -> None:
    ch = chain(MasterData([option("RELIANCE", D(2026, 12, 29), 1300, "CE")]), "RELIANCE", "monthly", WED)

    assert ch.call(1300).symbol.endswith("1300CE")
    with pytest.raises(ChainError, match="no RELIANCE 1300 PE expiring 2026-12-29"):
        ch.put(1300)


def test_find_option_resolves_expiry_spec_strike_and_type(master: MasterData) -> None:
    inst = find_option(master, "NIFTY", 24100, "pe", "next-weekly", WED)

    assert (inst.expiry, inst.strike, inst.option_type) == (D(2026, 12, 15), Decimal(24100), "PE")
    with pytest.raises(UnknownInstrument, match="no NIFTY 24125 CE expiring 2026-12-29"):
        find_option(master, "NIFTY", 24125, "CE", "monthly", WED)


def test_instruments_lists_each_strike_call_then_put(master: MasterData) -> None:
    ch = chain(master, "NIFTY", "weekly", WED)

    every = ch.instruments()
    some = ch.instruments(ch.near(24000, 1))
    assert len(every) == 2 * len(STRIKES)
    assert [(i.strike, i.option_type) for i in some] == [
        (Decimal(k), t) for k in (23950, 24000, 24050) for t in ("CE", "PE")
    ]


def test_spot_instrument_is_the_index_row_or_the_stock(master: MasterData) -> None:
    assert spot_instrument(master, "NIFTY").symbol == "Nifty 50"  # type: ignore[union-attr]
    assert spot_instrument(master, "reliance").symbol == "RELIANCE-EQ"  # type: ignore[union-attr]
    assert spot_instrument(master, "BANKNIFTY") is None
    kotak_style = MasterData([Instrument(segment="bse_cm", token="1", symbol="SENSEX", inst_type="INDEX")])
    assert spot_instrument(kotak_style, "SENSEX").segment == "bse_cm"  # type: ignore[union-attr]


# ---------------------------------------------------------------------- the index
def test_instruments_added_to_the_master_show_in_the_next_chain(master: MasterData) -> None:
    assert chain(master, "NIFTY", "weekly", D(2026, 12, 2)).expiry == D(2026, 12, 8)
    master.add(contracts("NIFTY", [D(2026, 12, 3)], [24000]))

    assert chain(master, "NIFTY", "weekly", D(2026, 12, 2)).expiry == D(2026, 12, 3)


def test_chains_over_a_100k_instrument_master_index_it_once() -> None:
    days = [D(2026, 12, 8) + dt.timedelta(days=7 * w) for w in range(25)]
    strikes = list(range(20_000, 30_000, 50))  # 200 strikes x 2 types x 25 expiries x 10 underlyings
    names = [
        "NIFTY",
        "BANKNIFTY",
        "FINNIFTY",
        "MIDCPNIFTY",
        "SENSEX",
        "BANKEX",
        "RELIANCE",
        "INFY",
        "TCS",
        "SBIN",
    ]
    big = MasterData(option(n, d, k, t) for n in names for d in days for k in strikes for t in ("CE", "PE"))
    assert len(big) == 100_000

    t0 = time.perf_counter()
    first = chain(big, "NIFTY", "weekly", WED)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(1_000):
        ch = chain(big, "SENSEX", "next-weekly", WED)
        ch.call(ch.atm(24_987.0))
    per_call = (time.perf_counter() - t0) / 1_000

    assert len(first.strikes) == 200
    assert built < 1.0, f"indexing 100k instruments took {built:.3f} s"
    assert per_call < 0.002, f"a chain on an indexed master took {per_call * 1e3:.2f} ms"


# ---------------------------------------------------------------------- the Strategy API
def _at(day: dt.date, hour: int = 10, minute: int = 0) -> int:
    at = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=IST)
    return int(at.timestamp()) * 1_000_000_000


class ShortStrangle(Strategy):
    """Sells the call and the put two strikes out of the money on the first index tick."""

    name = "strangle-test"

    class Params(StrategyParams, frozen=True):
        strikes: int = 2
        quantity: int = 65

    def on_start(self) -> None:
        self.nifty = self.chain("NIFTY", "weekly", strikes=self.params.strikes)

    def on_tick(self, tick: Tick) -> None:
        nifty = self.chain("NIFTY", "weekly", strikes=self.params.strikes)
        if self.key_of(tick) != self.spot_key(nifty):
            return
        call, put = nifty.call(nifty.strike(2, tick.ltp)), nifty.put(nifty.strike(-2, tick.ltp))
        if self.is_flat(call) and self.is_flat(put):
            self.sell(call, self.params.quantity)
            self.sell(put, self.params.quantity)


def _strategy(master: MasterData, day: dt.date = WED, **params: int) -> ShortStrangle:
    ctx = StrategyContext(
        "opt", clock=ManualClock(_at(day)), master=master, request_ids=StrategyContext.sequential_ids("opt")
    )
    return ShortStrangle(ctx, params)


def _wanted(strat: Strategy) -> list[str]:
    added, strat.new_subscriptions = strat.new_subscriptions, []
    return [f"{i.strike:f}{i.option_type}" if i.strike is not None else i.symbol for i in added]


def _index_tick(ltp: float) -> Tick:
    return Tick(segment="nse_cm", token="Nifty 50", ltp=ltp)


def test_a_chain_used_in_on_start_subscribes_the_index_and_strikes_around_its_reference_price(
    master: MasterData,
) -> None:
    strat = _strategy(master)

    strat.dispatch_start()

    assert strat.nifty.expiry == D(2026, 12, 8)  # the clock's day, 2 December: next Tuesday's weekly
    assert _wanted(strat) == ["Nifty 50"] + [
        f"{k}{t}" for k in (23900, 23950, 24000, 24050, 24100) for t in ("CE", "PE")
    ]


def test_the_strike_window_follows_the_index_and_adds_only_new_strikes(master: MasterData) -> None:
    strat = _strategy(master)
    strat.dispatch_start()
    _wanted(strat)

    strat.dispatch_tick(_index_tick(24020.0))  # ATM still 24000
    same = _wanted(strat)
    strat.dispatch_tick(_index_tick(24080.0))  # ATM 24100: the window 24000..24200
    up = _wanted(strat)
    strat.dispatch_tick(_index_tick(24075.0))  # a tie between 24050 and 24100: ATM 24050, all subscribed
    tie = _wanted(strat)

    assert same == []
    assert up == ["24150CE", "24150PE", "24200CE", "24200PE"]
    assert tie == []


def test_without_a_price_for_the_index_only_the_index_is_subscribed_until_its_first_tick() -> None:
    master = MasterData(
        [
            Instrument(
                segment="nse_cm", token="Nifty 50", symbol="Nifty 50", name="NIFTY", inst_type="INDEX"
            ),
            *contracts("NIFTY", [D(2026, 12, 8)], STRIKES),
        ]
    )
    strat = _strategy(master, strikes=1)

    strat.dispatch_start()
    before = _wanted(strat)
    strat.dispatch_tick(_index_tick(24190.0))

    assert before == ["Nifty 50"]
    assert _wanted(strat) == ["24150CE", "24150PE", "24200CE", "24200PE"]


def test_orders_built_from_a_chain_carry_the_option_contract(master: MasterData) -> None:
    strat = _strategy(master)
    strat.dispatch_start()

    orders = strat.dispatch_tick(_index_tick(24010.0))

    assert [(o.side, o.symbol, o.segment, o.quantity) for o in orders] == [
        ("SELL", strat.nifty.call(24100).symbol, "nse_fo", 65),
        ("SELL", strat.nifty.put(23900).symbol, "nse_fo", 65),
    ]
    assert strat.dispatch_tick(_index_tick(24011.0)) == ()  # already in flight: no double entry


def test_a_wider_window_and_subscribe_add_to_the_subscriptions(master: MasterData) -> None:
    strat = _strategy(master, strikes=0)
    strat.dispatch_start()
    assert _wanted(strat) == ["Nifty 50", "24000CE", "24000PE"]

    strat.chain("NIFTY", "weekly", strikes=1)
    strat.subscribe("NIFTY26DECFUT", "Nifty 50")

    assert _wanted(strat) == ["23950CE", "23950PE", "24050CE", "24050PE", "NIFTY26DECFUT"]


def test_a_chain_the_master_lacks_stops_the_strategy_at_start_with_the_reason(master: MasterData) -> None:
    strat = _strategy(master, day=D(2027, 3, 1))

    strat.dispatch_start()

    assert "no weekly NIFTY expiry on or after 2027-03-01" in strat.halted


def test_the_weekly_chain_rolls_to_the_next_expiry_when_the_clock_passes_midnight(master: MasterData) -> None:
    clock = ManualClock(_at(D(2026, 12, 8), hour=15))
    strat = ShortStrangle(StrategyContext("opt", clock=clock, master=master), {"strikes": 0})
    strat.dispatch_start()
    on_expiry_day = strat.chain("NIFTY", "weekly", strikes=0)
    _wanted(strat)

    clock.set_ns(_at(D(2026, 12, 9), hour=0))
    next_day = strat.chain("NIFTY", "weekly", strikes=0)

    assert (on_expiry_day.expiry, next_day.expiry) == (D(2026, 12, 8), D(2026, 12, 15))
    assert [i.expiry for i in strat.new_subscriptions] == [D(2026, 12, 15)] * 2


def test_the_weekly_chain_rolls_to_the_next_expiry_at_the_close_of_its_expiry_day(master: MasterData) -> None:
    clock = ManualClock(_at(D(2026, 12, 8), hour=15, minute=29))
    strat = ShortStrangle(StrategyContext("opt", clock=clock, master=master), {"strikes": 0})
    strat.dispatch_start()
    before_close = strat.chain("NIFTY", "weekly", strikes=0)

    clock.set_ns(_at(D(2026, 12, 8), hour=15, minute=30))  # the expiring contracts stop trading
    at_close = strat.chain("NIFTY", "weekly", strikes=0)

    assert (before_close.expiry, at_close.expiry) == (D(2026, 12, 8), D(2026, 12, 15))


def test_a_chain_without_an_index_row_is_centred_on_its_middle_strike() -> None:
    strat = _strategy(MasterData(contracts("NIFTY", [D(2026, 12, 8)], STRIKES)), strikes=1)

    strat.dispatch_start()
    centred = _wanted(strat)
    strat.chain("NIFTY", "weekly", strikes=2)

    assert centred == ["23950CE", "23950PE", "24000CE", "24000PE", "24050CE", "24050PE"]
    assert _wanted(strat) == ["23900CE", "23900PE", "24100CE", "24100PE"]
    assert strat.spot_key(strat.nifty) == ""


# ---------------------------------------------------------------------- `neopulse chain` rows
def test_chain_rows_mark_atm_and_tell_an_unlisted_contract_from_one_without_a_tick() -> None:
    from services.admin.cmd_chain import build_rows

    day = D(2026, 12, 8)
    ch = chain(
        MasterData([*contracts("NIFTY", [day], [23950, 24000]), option("NIFTY", day, 24050, "CE")]),
        "NIFTY",
        "weekly",
        WED,
    )
    ce = ch.call(24000)
    ticks = {
        ce.key: Tick(segment=ce.segment, token=ce.token, ltp=101.5, bid=101.0, ask=102.0, close=100.0, oi=9)
    }

    rows = build_rows(ch, list(ch.strikes), ch.atm(24010), ticks)

    assert [(r["strike"], r["atm"]) for r in rows] == [("23950", False), ("24000", True), ("24050", False)]
    assert rows[1]["CE"] == {
        "symbol": ce.symbol,
        "key": ce.key,
        "ltp": 101.5,
        "change": 1.5,
        "change_pct": 1.5,
        "oi": 9,
        "bid": 101.0,
        "ask": 102.0,
        "volume": 0,
    }
    assert rows[1]["PE"]["ltp"] is None  # listed, no tick yet
    assert rows[2]["PE"] is None  # not listed
