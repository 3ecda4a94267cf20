"""A backtest with options: a short paper session on an earlier day is recorded the way the feed
records (the sim source in-process, every published tick appended to the recorder), then
replayed through a short straddle that finds its legs with ``self.chain()``. The backtest is
asked for the NIFTY index only: the chain's option ticks reach the strategy because the runner
follows what it subscribes to, and the option tokens resolve because the backtest loads that
day's master (its weekly has expired since). The report shows each leg and the day's net."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from libs.common.bus import topic
from libs.common.calendar import default_calendar, expiries
from libs.common.chain import chain, spot_instrument
from libs.common.clock import IST, ManualClock
from libs.common.config import Config, load_config
from libs.common.instruments import Instrument, MasterData, paper_today
from libs.common.messages import Codec, Tick
from services.admin import cli
from services.backtest.report import render_text
from services.backtest.runner import master_for_recording, recording_day, run_backtest
from services.feed.recorder import TickRecorder
from services.feed.sources.replay import iter_ticks
from services.feed.sources.sim import SimSource
from services.strategy.base import Strategy

S = 1_000_000_000
ENTRY_AFTER_S, EXIT_AFTER_S, SESSION_S = 30, 120, 180
STRAT = "tests.unit.test_backtest_options:ShortStraddle"


def session_day() -> tuple[dt.date, dt.date]:
    """(a trading day about three weeks back, the NIFTY weekly expiry after it): that weekly has
    expired by now, so today's paper master no longer lists it."""
    expiry = expiries("NIFTY", "weekly", paper_today() - dt.timedelta(days=21), 1)[0]
    return default_calendar().previous_trading_day("NSE", expiry), expiry


class ShortStraddle(Strategy):
    """At the first tick ``ENTRY_AFTER_S`` after the first, SELL the weekly ATM CE and PE as a
    basket (market intent); at the first tick ``EXIT_AFTER_S`` after the first, exit both."""

    name = "short-straddle"

    def on_start(self) -> None:
        self.t0 = 0
        self.legs: list[Instrument] = []
        self.exited = False

    def on_tick(self, tick: Tick) -> None:
        weekly = self.chain("NIFTY", "weekly", strikes=2)
        now = tick.exch_ts_ns or tick.ts_ns
        self.t0 = self.t0 or now
        spot = self.last.get(self.spot_key(weekly))
        if not self.legs and spot is not None and now >= self.t0 + ENTRY_AFTER_S * S:
            atm = weekly.atm(spot.ltp)
            ce, pe = weekly.call(atm), weekly.put(atm)
            if ce.key in self.last and pe.key in self.last:
                lot = ce.lot_size
                self.legs = [ce, pe]
                self.basket([self.leg("SELL", ce, lot), self.leg("SELL", pe, lot)])
        if self.legs and not self.exited and now >= self.t0 + EXIT_AFTER_S * S:
            self.exited = True
            for leg in self.legs:
                self.exit(leg)


class _Reactor:
    def call_every(self, interval: float, fn: Any) -> int:
        return 1

    def cancel(self, tid: int) -> None:
        pass


class RecordingFeed:
    """The feed as the sim source sees it, with ``feed.record`` on: each published tick is
    encoded once and appended, with its topic, to the recorder, flushed every 0.25 s."""

    def __init__(self, cfg: Config, master: MasterData, clock: ManualClock, ticks_dir: Path) -> None:
        self.cfg, self.master, self.clock, self.log = cfg, master, clock, None
        self.reactor = _Reactor()
        self.recorder = TickRecorder(ticks_dir, clock)
        self._encode = Codec().encode
        self.published = 0

    def publish_ticks(self, ticks: list[Tick]) -> None:
        append, enc = self.recorder.buf.append, self._encode
        for t in ticks:
            append((topic("tick", t.segment, t.token), enc(t)))
        self.published += len(ticks)

    def set_state(self, state: str, detail: str = "") -> None:
        pass


def record_session(home: Path, day: dt.date, expiry: dt.date) -> tuple[Path, list[Instrument]]:
    """``SESSION_S`` seconds of the sim from 09:20 IST on ``day``: the NIFTY index and the CE and
    PE of the weekly's five strikes around the index. Returns the file and the options."""
    master = MasterData.load(today=day)
    cfg = load_config(env={"NEOPULSE_FEED__SIM_RATE": "2"})
    clock = ManualClock(int(dt.datetime.combine(day, dt.time(9, 20), IST).timestamp()) * S)
    feed = RecordingFeed(cfg, master, clock, home / "ticks")
    index = spot_instrument(master, "NIFTY")
    assert index is not None
    weekly = chain(master, "NIFTY", "weekly", today=day)
    assert weekly.expiry == expiry
    options = weekly.instruments(weekly.near(index.ref_price, 2))
    src = SimSource(feed)
    src.start([index, *options])
    clock.advance(0.5 / src.rate)
    for i in range(int(SESSION_S * src.rate)):
        clock.advance(1 / src.rate)
        src.pump()
        if i % max(1, int(src.rate / 4)) == 0:
            feed.recorder.flush()
    feed.recorder.close()
    assert feed.recorder.path is not None and feed.recorder.ticks == feed.published > 0
    return feed.recorder.path, options


@pytest.fixture
def session(tmp_path: Path) -> tuple[Path, list[Instrument], dt.date]:
    day, expiry = session_day()
    path, options = record_session(tmp_path / "home", day, expiry)
    return path, options, day


def test_a_short_straddle_replayed_from_a_recorded_option_session_reports_each_leg_and_the_net(
    session: tuple[Path, list[Instrument], dt.date], tmp_path: Path
) -> None:
    path, options, day = session
    assert path.name == f"{day.isoformat()}.ticks" and recording_day(path) == day
    assert all(MasterData.load().by_key.get(o.key) is None for o in options)  # expired: not in today's
    master = master_for_recording(tmp_path / "home", path)
    assert all(master.by_key.get(o.key) == o for o in options)  # the recording's day's contracts

    report = run_backtest(iter_ticks(path, master), STRAT, cfg=load_config(env={}), master=master,
                          instruments=["Nifty 50"]).report  # fmt: skip

    assert report["orders"] == {"requested": 4, "approved": 4, "rejected": 0}, report["rejections"]
    assert report["errors"] == 0 and not report["halted"]
    legs = report["trade_list"]
    recorded = {o.symbol for o in options}
    assert len(legs) == 2 and {t["symbol"] for t in legs} <= recorded
    assert {t["symbol"][-2:] for t in legs} == {"CE", "PE"}  # the ATM call and put of one strike
    assert len({t["symbol"][:-2] for t in legs}) == 1
    start = dt.datetime.fromisoformat(report["start"])  # the first tick: the strategy's clock starts there

    def after(seconds: float) -> dt.datetime:
        return start + dt.timedelta(seconds=seconds)

    for t in legs:
        assert (t["direction"], t["quantity"], t["open"], t["fills"]) == ("SHORT", 65, False, 2)
        # sent at the first tick past the mark, filled on the leg's next tick (no look-ahead)
        assert after(ENTRY_AFTER_S) <= dt.datetime.fromisoformat(t["entry_time"]) < after(ENTRY_AFTER_S + 2)
        assert after(EXIT_AFTER_S) <= dt.datetime.fromisoformat(t["exit_time"]) < after(EXIT_AFTER_S + 2)
        assert t["entry_price"] > 0 and t["exit_price"] > 0
        assert t["pnl"] == pytest.approx((t["entry_price"] - t["exit_price"]) * 65, abs=0.01)
        turnover = (t["entry_price"] + t["exit_price"]) * 65
        assert t["cost"] == pytest.approx(turnover * 0.00035, abs=0.01)
        assert t["net_pnl"] == pytest.approx(t["pnl"] - t["cost"], abs=1e-6)
    s = report["summary"]
    assert (s["trades"], s["closed_trades"], s["open_trades"], s["fills"]) == (2, 2, 0, 4)
    assert s["net_pnl"] == pytest.approx(sum(t["net_pnl"] for t in legs), abs=1e-6)
    assert s["net_pnl"] == pytest.approx(s["gross_pnl"] - s["cost"], abs=1e-6)
    assert report["risk"]["net_pnl"] == pytest.approx(s["net_pnl"], abs=0.01)  # risk's own book agrees
    assert {t["symbol"] for t in legs} <= set(report["instruments"])

    text = render_text(report)
    for t in legs:
        line = next(x for x in text.splitlines() if t["symbol"] in x)
        assert line.split()[:3] == ["SHORT", "65", t["symbol"]]
        assert f"{t['entry_price']:,.2f}" in line and f"{t['exit_price']:,.2f}" in line
        assert f"PnL {t['pnl']:,.2f}" in line and f"net {t['net_pnl']:,.2f}" in line
    assert f"net PnL       {s['net_pnl']:,.2f}" in text


def test_a_recording_over_several_days_gets_every_days_contracts(tmp_path: Path) -> None:
    day, expiry = session_day()
    first, first_options = record_session(tmp_path / "home", day, expiry)
    later = expiries("NIFTY", "weekly", expiry + dt.timedelta(days=60), 1)[0]  # not yet listed on day one
    second, second_options = record_session(tmp_path / "home", default_calendar().previous_trading_day(
        "NSE", later), later)  # fmt: skip
    assert first.parent == second.parent and first != second

    master = master_for_recording(tmp_path / "home", first.parent)

    assert all(master.by_key.get(o.key) == o for o in [*first_options, *second_options])
    assert master_for_recording(tmp_path / "home", first).by_key.get(second_options[0].key) is None


def test_the_backtest_command_replays_an_earlier_days_options_on_that_days_master(
    session: tuple[Path, list[Instrument], dt.date],
) -> None:
    path, _, _ = session
    cli._register()
    args = ["backtest", "--ticks", str(path), "--strategy", STRAT, "--instruments", "Nifty 50", "--json"]

    result = CliRunner().invoke(cli.app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["orders"] == {"requested": 4, "approved": 4, "rejected": 0}, report["rejections"]
    assert [t["direction"] for t in report["trade_list"]] == ["SHORT", "SHORT"]
    assert not any(t["open"] for t in report["trade_list"])


def test_without_following_the_chain_an_index_only_filter_would_see_no_option_tick(
    session: tuple[Path, list[Instrument], dt.date], tmp_path: Path
) -> None:
    """The recording holds option ticks, yet only the index was asked for: every option tick the
    strategy saw came through its own chain subscription."""
    path, options, _ = session
    master = master_for_recording(tmp_path / "home", path)
    keys = {o.key for o in options}
    assert sum(1 for t in iter_ticks(path) if f"{t.segment}|{t.token}" in keys) > 0

    report = run_backtest(iter_ticks(path, master), "momentum", cfg=load_config(env={}), master=master,
                          instruments=["Nifty 50"]).report  # fmt: skip

    assert report["instruments"] == ["Nifty 50"]  # a strategy that subscribes nothing gets the index only
