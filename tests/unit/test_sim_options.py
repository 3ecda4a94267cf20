"""Option and futures prices on the sim: they follow the simulated underlying, decay with the
clock, stay on tick with bid <= ltp <= ask, and round-trip through the recorder."""

from __future__ import annotations

import itertools
import math
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import topic
from libs.common.clock import IST, ManualClock
from libs.common.config import load_config
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Codec, Tick
from libs.common.option_pricing import SECONDS_PER_YEAR, expiry_ns
from services.feed.recorder import TickRecorder, read_tick_file
from services.feed.sources.replay import iter_ticks
from services.feed.sources.sim import OptionWalk, SimSource, Walk

EXPIRY = date(2026, 12, 8)  # a Tuesday: a NIFTY weekly
EVE = int(datetime(2026, 12, 7, 9, 20, tzinfo=IST).timestamp() * 1e9)  # the day before, 09:20 IST

NIFTY = Instrument(segment="nse_cm", token="Nifty 50", symbol="Nifty 50", name="NIFTY", inst_type="INDEX",
                   tick_size=Decimal("0.05"), ref_price=24_000.0)
SENSEX = Instrument(segment="bse_cm", token="SENSEX", symbol="SENSEX", name="SENSEX", inst_type="INDEX",
                    tick_size=Decimal("0.05"), ref_price=85_000.0)


def option(strike: int, kind: str, underlying: str = "NIFTY", segment: str = "nse_fo",
           expiry: date = EXPIRY) -> Instrument:
    return Instrument(segment=segment, token=f"{underlying}{strike}{kind}",
                      symbol=f"{underlying}26D08{strike}{kind}", name=underlying, inst_type="OPTIDX",
                      lot_size=65, tick_size=Decimal("0.05"), freeze_qty=1800, expiry=expiry,
                      strike=Decimal(strike), option_type=kind, underlying=underlying)


FUT = Instrument(segment="nse_fo", token="NIFTYFUT", symbol="NIFTY26DECFUT", name="NIFTY", inst_type="FUTIDX",
                 lot_size=65, tick_size=Decimal("0.10"), freeze_qty=1800, expiry=date(2026, 12, 29),
                 underlying="NIFTY", ref_price=24_100.0)
CE, PE = option(24_000, "CE"), option(24_000, "PE")
MASTER = MasterData([NIFTY, SENSEX, CE, PE, FUT, option(24_500, "CE"), option(23_500, "PE"),
                     option(26_000, "CE"), option(85_000, "CE", "SENSEX", "bse_fo")])


class FakeReactor:
    def call_every(self, interval: float, fn: Any) -> int:
        return 1

    def cancel(self, tid: int) -> None:
        pass


class FakeSink:
    """The feed as the sim sees it: a manual clock, and the ticks it published."""

    def __init__(self, master: MasterData = MASTER, start_ns: int = EVE, **feed: str) -> None:
        self.cfg = load_config(env={f"NEOPULSE_FEED__{k.upper()}": v for k, v in feed.items()})
        self.reactor = FakeReactor()
        self.clock = ManualClock(start_ns)
        self.master = master
        self.log = None
        self.ticks: list[Tick] = []

    def publish_ticks(self, ticks: list[Tick]) -> None:
        self.ticks.extend(ticks)

    def set_state(self, state: str, detail: str = "") -> None:
        pass


def run_sim(instruments: list[Instrument], rounds: int, sink: FakeSink | None = None,
            later: list[Instrument] | None = None) -> tuple[FakeSink, list[dict[str, Tick]]]:
    """Start a sim on ``instruments`` and pump ``rounds`` rounds one at a time (``later`` are
    subscribed after half of them); returns each round's ticks by symbol."""
    sink = sink or FakeSink()
    src = SimSource(sink)
    src.start(instruments)
    sink.clock.advance(0.5 / src.rate)  # half a round off the timer's beat: float noise cannot skip one
    out = []
    for i in range(rounds):
        if later and i == rounds // 2:
            src.add_instruments(later)
        sink.clock.advance(1 / src.rate)
        before = len(sink.ticks)
        src.pump()
        out.append({t.symbol: t for t in sink.ticks[before:]})
    return sink, out


def on_tick(price: float, tick: Decimal) -> bool:
    return Decimal(repr(price)) % tick == 0


# ------------------------------------------------------------------ the model, at a fixed spot


def walk_for(inst: Instrument) -> OptionWalk:
    return OptionWalk(inst, Walk(NIFTY, 42, 0.0008), 42, 0.065, iv=0.12, smile=0.8, spread_pct=0.2)


def test_a_call_gains_and_a_put_loses_when_the_underlying_rises() -> None:
    ce, pe = walk_for(CE), walk_for(PE)
    assert ce.premium(24_100, EVE) > ce.premium(24_000, EVE) > ce.premium(23_900, EVE)
    assert pe.premium(24_100, EVE) < pe.premium(24_000, EVE) < pe.premium(23_900, EVE)


def test_moving_the_clock_forward_lowers_both_premiums_at_the_same_spot() -> None:
    ce, pe = walk_for(CE), walk_for(PE)
    later = EVE + 4 * 3600 * 10**9
    assert ce.premium(24_000, later) < ce.premium(24_000, EVE)
    assert pe.premium(24_000, later) < pe.premium(24_000, EVE)
    at_close = expiry_ns(EXPIRY) - 10**9  # a second before the last trade: about intrinsic, still > 0
    assert 0 < ce.premium(24_010, at_close) - 10 < 0.5


# ------------------------------------------------------------------ the sim source


def test_options_move_with_their_underlying_tick_by_tick() -> None:
    _, rounds = run_sim([NIFTY, CE, PE], 300)

    ups = downs = 0
    for prev, cur in itertools.pairwise(rounds):
        move = cur["Nifty 50"].ltp - prev["Nifty 50"].ltp
        ce_move, pe_move = cur[CE.symbol].ltp - prev[CE.symbol].ltp, cur[PE.symbol].ltp - prev[PE.symbol].ltp
        assert ce_move * move >= 0 and pe_move * move <= 0, (move, ce_move, pe_move)
        ups += move > 0 and ce_move > 0
        downs += move < 0 and pe_move > 0
    assert ups > 50 and downs > 50


def test_hours_later_both_premiums_are_lower() -> None:
    sink = FakeSink(sim_volatility="0")  # the index steps one tick at a time: close to unchanged
    src = SimSource(sink)
    src.start([NIFTY, CE, PE])
    sink.clock.advance(1.5 / src.rate)
    src.pump()
    first = {t.symbol: t for t in sink.ticks}
    sink.clock.advance(5 * 3600)
    src.pump()
    last = {t.symbol: t for t in sink.ticks[-3:]}

    assert abs(last["Nifty 50"].ltp - first["Nifty 50"].ltp) < 5
    assert last[CE.symbol].ltp < first[CE.symbol].ltp - 3
    assert last[PE.symbol].ltp < first[PE.symbol].ltp - 3


def test_futures_follow_spot_plus_carry_on_their_tick() -> None:
    _, rounds = run_sim([NIFTY, FUT], 200)

    years = (expiry_ns(FUT.expiry) - EVE) / 1e9 / SECONDS_PER_YEAR  # type: ignore[arg-type]
    for r in rounds:
        spot, fut = r["Nifty 50"].ltp, r[FUT.symbol]
        assert fut.ltp == pytest.approx(spot * math.exp(0.065 * years), abs=0.1)
        assert on_tick(fut.ltp, FUT.tick_size) and fut.bid < fut.ltp < fut.ask
    assert rounds[-1]["Nifty 50"].ltp != rounds[0]["Nifty 50"].ltp


def test_ticks_are_on_tick_with_bid_below_ltp_below_ask_except_at_the_floor() -> None:
    far = option(26_000, "CE")  # deep out of the money the day before expiry: one tick
    _, rounds = run_sim([NIFTY, CE, PE, option(24_500, "CE"), option(23_500, "PE"), far], 200)

    for r in rounds:
        for t in r.values():
            assert all(on_tick(p, Decimal("0.05")) for p in (t.ltp, t.bid, t.ask, t.open, t.high, t.low)), t
            assert t.bid < t.ltp < t.ask or t.ltp == t.bid == 0.05 < t.ask, t
            assert t.low <= t.ltp <= t.high
        assert r[far.symbol].ltp == 0.05
        assert r[CE.symbol].oi > 0 and r[CE.symbol].last_qty % 65 == 0 and r[CE.symbol].close > 0


def test_the_same_seed_and_clock_give_the_same_prices() -> None:
    subs = [NIFTY, CE, PE, FUT]
    _, a = run_sim(subs, 100)
    _, b = run_sim(subs, 100)
    _, c = run_sim(subs, 100, FakeSink(sim_seed="7"))
    assert a == b
    assert [r[CE.symbol].ltp for r in a] != [r[CE.symbol].ltp for r in c]


def test_an_unsubscribed_underlying_is_walked_but_not_published() -> None:
    _, alone = run_sim([CE, PE], 100)
    _, with_index = run_sim([NIFTY, CE, PE], 100)

    assert all(set(r) == {CE.symbol, PE.symbol} for r in alone)
    assert [r[CE.symbol] for r in alone] == [r[CE.symbol] for r in with_index]


def test_subscribing_the_underlying_later_continues_its_walk() -> None:
    _, from_start = run_sim([NIFTY, CE], 100)
    _, later = run_sim([CE], 100, later=[NIFTY])

    assert "Nifty 50" not in later[49] and "Nifty 50" in later[50]
    assert [r["Nifty 50"] for r in later[50:]] == [r["Nifty 50"] for r in from_start[50:]]
    assert [r[CE.symbol] for r in later] == [r[CE.symbol] for r in from_start]


def test_the_underlying_is_found_by_name_on_the_contracts_exchange() -> None:
    sensex_ce = option(85_000, "CE", "SENSEX", "bse_fo")
    src = SimSource(FakeSink())
    src.start([CE, sensex_ce, FUT])

    assert [d.under.inst.symbol for d in src.derivatives] == ["Nifty 50", "SENSEX", "Nifty 50"]
    assert src.stats()["unpublished_underlyings"] == 2


def test_the_bundled_master_index_rows_are_found() -> None:
    master = MasterData.load()
    src = SimSource(FakeSink(master))
    src.start([option(24_000, "CE"), option(13_500, "PE", "MIDCPNIFTY")])

    assert [d.under.inst.inst_type for d in src.derivatives] == ["INDEX", "INDEX"]
    assert [d.under.inst.name for d in src.derivatives] == ["NIFTY", "MIDCPNIFTY"]


def test_an_option_whose_underlying_is_missing_walks_from_its_strike() -> None:
    lone = option(1_300, "CE", "NOSUCH")
    sink, rounds = run_sim([lone], 20, FakeSink(MasterData([lone])))

    assert set(rounds[-1]) == {lone.symbol}
    src = SimSource(sink)
    src.start([lone])
    assert src.derivatives[0].under.inst.ref_price == 1_300


def test_iv_comes_from_the_config_per_underlying() -> None:
    low = run_sim([CE], 1, FakeSink(sim_iv='{"nifty": 0.08}'))[1][0][CE.symbol].ltp
    default = run_sim([CE], 1)[1][0][CE.symbol].ltp
    assert low < default


def test_option_ticks_round_trip_through_the_recorder(tmp_path: Path) -> None:
    sink, _ = run_sim([NIFTY, CE, PE, FUT], 50)
    rec = TickRecorder(tmp_path, ManualClock(EVE))
    enc = Codec().encode
    for t in sink.ticks:
        rec.append(enc(t), topic("tick", t.segment, t.token))
    rec.close()
    assert rec.path is not None

    assert list(read_tick_file(rec.path)) == sink.ticks
    back = list(iter_ticks(rec.path))
    assert back == sink.ticks and any(t.oi for t in back)
