"""`neopulse chain` and a strategy's chain subscriptions against a real feed process (sim source).

Two masters: the paper master (generated for today's trading day), and a Kotak-format
F&O CSV that the test writes into ``$NEOPULSE_HOME/master/``, which the feed and the CLI
load instead (as after ``neopulse sync-master``).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from libs.common.clock import IST, Clock
from libs.common.instruments import KOTAK_EPOCH_OFFSET
from libs.common.messages import GetStatus, Reply, Tick
from services.strategy.base import Strategy, StrategyParams
from tests.helpers import eventually, free_base_port
from tests.integration.feed_support import FeedProc
from tests.kit import processes

ROOT = Path(__file__).resolve().parents[2]
NEOPULSE = str(Path(sys.executable).parent / "neopulse")
HEADER = (
    "pSymbol,pGroup,pExchSeg,pInstType,pSymbolName,pTrdSymbol,pOptionType,pScripRefKey,pISIN,"
    "pAssetCode,pExpiryDate,lLotSize,dTickSize ,lExpiryDate,dStrikePrice;,lFreezeQty,dRefPrice"
)


class ChainFollower(Strategy):
    """Uses the weekly NIFTY chain and nothing else (run by the strategy process below)."""

    name = "chain-follower"

    class Params(StrategyParams, frozen=True):
        strikes: int = 2

    def on_start(self) -> None:
        self.chain("NIFTY", "weekly", strikes=self.params.strikes)

    def on_tick(self, tick: Tick) -> None:
        self.chain("NIFTY", "weekly", strikes=self.params.strikes)


def _cli(feed: FeedProc, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NEOPULSE, "chain", *args],
        cwd=ROOT,
        env=feed.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _sim_feed(home: Path, **env: str) -> FeedProc:
    env.setdefault("NEOPULSE_FEED__SIM_RATE", "20")
    return FeedProc(home, free_base_port(), **env)


def _assert_live(data: dict[str, Any], strikes: int) -> None:
    rows = data["rows"]
    assert len(rows) == 2 * strikes + 1
    assert [r["atm"] for r in rows].count(True) == 1
    assert rows[strikes]["atm"], "the ATM row sits in the middle of the window"
    for row in rows:
        for kind in ("CE", "PE"):
            side = row[kind]
            assert side is not None and side["ltp"] is not None, f"{row['strike']} {kind} had no tick"
            assert side["ltp"] > 0 and 0 < side["bid"] <= side["ask"], side


# ---------------------------------------------------------------------- the paper master
def test_chain_shows_live_call_and_put_prices_around_atm_on_the_paper_master(tmp_path: Path) -> None:
    feed = _sim_feed(tmp_path / "home")
    try:
        feed.start().wait_ready()

        shown = _cli(feed, "NIFTY", "--strikes", "3", "--json")
        monthly = _cli(feed, "NIFTY", "--expiry", "monthly", "--strikes", "1", "--json")
        table = _cli(feed, "NIFTY", "--strikes", "2")

        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["underlying"] == "NIFTY" and data["spot"]["symbol"] == "Nifty 50"
        assert data["spot"]["ltp"] > 0
        assert dt.date.fromisoformat(data["expiry"]) >= Clock().now(IST).date()
        _assert_live(data, 3)
        spot, atm = data["spot"]["ltp"], float(data["atm"])
        assert abs(atm - spot) <= float(data["step"]) / 2  # the strike nearest the index's last price
        atm_row = data["rows"][3]
        assert atm_row["CE"]["symbol"].startswith("NIFTY") and atm_row["CE"]["symbol"].endswith("CE")
        assert monthly.returncode == 0, monthly.stderr
        month = json.loads(monthly.stdout)
        assert month["expiry"] >= data["expiry"] and month["expiry_spec"] == "monthly"
        _assert_live(month, 1)
        assert table.returncode == 0, table.stderr
        assert "NIFTY options expiring" in table.stdout and "STRIKE" in table.stdout
        assert "▶" in table.stdout and "◀" in table.stdout  # the ATM row
        assert "no tick" not in table.stdout
    finally:
        feed.stop()


def test_chain_errors_are_one_line_with_their_exit_codes(tmp_path: Path) -> None:
    feed = _sim_feed(tmp_path / "home", NEOPULSE_BUS__REQUEST_TIMEOUT_MS="400")  # never started

    unknown = _cli(feed, "NOSUCHINDEX")
    no_expiry = _cli(feed, "NIFTY", "--expiry", "2020-01-07")
    bad_spec = _cli(feed, "NIFTY", "--expiry", "fortnightly")
    unreachable = _cli(feed, "NIFTY")

    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("no options on 'NOSUCHINDEX' in the instrument master")
    assert "NIFTY" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    assert no_expiry.returncode == 2
    assert no_expiry.stderr.strip().startswith("no NIFTY options expire on 2020-01-07")
    assert bad_spec.returncode == 2 and "use weekly, next-weekly, monthly or a date" in bad_spec.stderr
    assert unreachable.returncode == 3
    assert unreachable.stderr.strip().startswith("feed is unreachable at tcp://127.0.0.1:")


# ---------------------------------------------------------------------- a Kotak-format master
def _expiry_secs(day: dt.date) -> int:
    """Kotak's nse_fo ``lExpiryDate`` for ``day``: seconds since 1980-01-01 (IST), at 14:30."""
    at = dt.datetime(day.year, day.month, day.day, 14, 30, tzinfo=IST)
    return int(at.timestamp()) - KOTAK_EPOCH_OFFSET


def _kotak_master(home: Path, expiry: dt.date) -> None:
    rows = [HEADER, "Nifty 50,,nse_cm,INDEX,NIFTY,Nifty 50,XX,NIFTY,,,,1,5,-1,-1,,24010.00"]
    token = 71000
    for strike in range(23700, 24350, 50):
        for kind in ("CE", "PE"):
            token += 1
            symbol = f"NIFTY{expiry:%y}{'123456789OND'[expiry.month - 1]}{expiry:%d}{strike}{kind}"
            ref = max(5.0, 24010 - strike if kind == "CE" else strike - 24010) + 60.0
            rows.append(
                f"{token},,nse_fo,OPTIDX,NIFTY,{symbol},{kind},NIFTY,,,{expiry:%d%b%Y},65,5,"
                f"{_expiry_secs(expiry)},{strike * 100},1800,{ref:.2f}"
            )
    (home / "master").mkdir(parents=True)
    (home / "master" / "nse_fo.csv").write_text("\n".join(rows) + "\n")


def test_chain_reads_a_kotak_format_master_from_the_home_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    today = Clock().now(IST).date()
    expiry = today + dt.timedelta(days=(1 - today.weekday()) % 7 + 7)  # a Tuesday 8..14 days ahead
    _kotak_master(home, expiry)
    feed = _sim_feed(home, NEOPULSE_FEED__INSTRUMENTS='["Nifty 50"]')
    try:
        feed.start().wait_ready()

        shown = _cli(feed, "nifty", "--strikes", "2", "--json")
        explicit = _cli(feed, "NIFTY", "--expiry", expiry.isoformat(), "--strikes", "1", "--json")

        assert shown.returncode == 0, shown.stderr + feed.output()
        data = json.loads(shown.stdout)
        assert data["expiry"] == expiry.isoformat() and data["lot_size"] == 65 and data["step"] == "50"
        _assert_live(data, 2)
        strikes = [int(r["strike"]) for r in data["rows"]]
        assert strikes == [s for s in range(23700, 24350, 50) if abs(s - int(data["atm"])) <= 100]
        assert explicit.returncode == 0, explicit.stderr
        _assert_live(json.loads(explicit.stdout), 1)
    finally:
        feed.stop()


# ---------------------------------------------------------------------- a strategy's chain
def _strategy(feed: FeedProc, *args: str) -> Any:
    return processes.spawn(
        feed.home, "strategy", feed.env, f"{__name__}:ChainFollower", "--id", "follow", *args
    )


def _log_events(home: Path, event: str) -> list[dict[str, Any]]:
    path = home / "log" / "strategy-follow.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def test_a_strategy_using_a_chain_has_the_feed_publish_the_index_and_its_strikes(tmp_path: Path) -> None:
    feed = _sim_feed(tmp_path / "home")
    strat = None
    try:
        feed.start().wait_ready()
        before = feed.status()["subscribed"]

        strat = _strategy(feed, "--param", "strikes=2")

        def chain_subscribed() -> dict[str, Any] | None:
            reply = feed.ask(GetStatus())
            assert isinstance(reply, Reply) and reply.ok
            return reply.data if reply.data["subscribed"] >= before + 11 else None  # type: ignore[no-any-return]

        status = eventually(chain_subscribed, 30, message="the strategy's chain subscribed at the feed")
        assert "nse_cm|Nifty 50" in status["instruments"]
        assert status["subscribed"] == before + 11  # the index and 5 strikes x CE, PE
    finally:
        if strat is not None:
            processes.stop(strat)
        feed.stop()


def test_a_chain_over_the_feed_limit_is_refused_and_the_strategy_says_so(tmp_path: Path) -> None:
    feed = _sim_feed(tmp_path / "home", NEOPULSE_FEED__MAX_SUBSCRIPTIONS="10")
    strat = None
    try:
        feed.start().wait_ready()

        strat = _strategy(feed, "--param", "strikes=10")
        refused = eventually(
            lambda: _log_events(feed.home, "feed_subscription_refused"),
            30,
            message="the strategy logging the refusal",
        )

        rec = refused[0]
        assert rec["level"] == "error" and rec["code"] == "subscription_limit" and rec["asked"] == 43
        assert rec["error"] == (
            "subscription limit: strategy-follow asked for 43 instruments (43 new); with the 5 already "
            "subscribed that is 48, over feed.max_subscriptions (10): none added"
        )
        assert feed.status()["subscribed"] == 5
        assert strat.poll() is None, "the strategy keeps running on its configured instruments"
    finally:
        if strat is not None:
            processes.stop(strat)
        feed.stop()
