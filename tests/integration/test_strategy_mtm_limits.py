"""Per-strategy MTM limits end to end (issue 14, acceptance 3): real risk and execution
processes (paper broker, the session's embedded PostgreSQL), real ZeroMQ, and a stand-in feed
whose prices the test moves. The test plays the strategies: it sends their ``OrderRequest``s to
risk over the bus, as the strategy host does.

``loser`` (max_loss 50) is driven below its limit: it is squared off (flat in execution's
positions, its close in the ledger), stopped (its new entries refused, code
``strategy_stopped``, the reason naming max_loss), the ``strategy_stopped`` row is in
``risk_events`` and the CRITICAL alert was published; ``winner`` (no limit) keeps trading, also
after a restart of risk, and of the whole stack, the same day. ``taker`` (target_profit 50) is
stopped the same way when it is up."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from libs.common.bus import topic
from libs.common.messages import (
    Alert,
    DayState,
    GetDayState,
    GetOrders,
    GetPositions,
    Reply,
    RiskVerdict,
    VerdictCode,
)
from tests.helpers import eventually, free_base_port
from tests.integration.conftest import cloned_db
from tests.integration.risk_support import Stack
from tests.integration.test_execution_service import FakeFeed
from tests.kit import order_request, processes

CONFIG = """
[[strategy]]
name = "momentum"
id = "loser"
max_loss = 50.0

[[strategy]]
name = "momentum"
id = "winner"

[[strategy]]
name = "momentum"
id = "taker"
target_profit = 50.0
"""
QUOTES = {"RELIANCE-EQ": 1290.0, "INFY-EQ": 1510.0, "TCS-EQ": 3100.0}
_ids = itertools.count(1)


@pytest.fixture
def paper(tmp_path: Path, pg_server: Any) -> Iterator[tuple[Stack, FakeFeed, str]]:
    with cloned_db(pg_server, f"np_mtm_{os.getpid()}_{tmp_path.name[-8:]}") as url:
        home = tmp_path / "home"
        home.mkdir(parents=True)
        (home / "neopulse.toml").write_text(CONFIG)
        s = Stack(home, free_base_port(), NEOPULSE_DATABASE__URL=url,
                  NEOPULSE_CONFIG=str(home / "neopulse.toml"), NEOPULSE_RISK__MAX_DAILY_LOSS=1_000_000.0)
        feed = FakeFeed(s.bus, s.cfg.bus.endpoint("feed_pub"), QUOTES)
        try:
            start(s)
            yield s, feed, url
        finally:
            s.close()
            feed.close()


def start(s: Stack, *services: str) -> None:
    for name in services or ("execution", "risk"):
        s.start(name)
    eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
    eventually(lambda: all(_marked(s, sym) for sym in QUOTES), timeout=10, message="risk to see prices")


def _marked(s: Stack, symbol: str) -> bool:
    verdict = _ask_risk(s, order_request(symbol, qty=0, strategy="probe", rid=f"probe-{next(_ids)}"))
    return verdict.code == VerdictCode.QUANTITY  # got past the last-price check


def _ask_risk(s: Stack, req: Any) -> RiskVerdict:
    verdict = s.ask("risk_rep", req, timeout_ms=5000)
    assert isinstance(verdict, RiskVerdict), verdict
    return verdict


def trade(s: Stack, strategy: str, symbol: str, side: str = "BUY", qty: int = 10) -> RiskVerdict:
    """A market order of ``strategy``, as its host sends it to risk."""
    return _ask_risk(s, order_request(symbol, side, qty, strategy=strategy, rid=f"{strategy}-{os.getpid()}-"
                                                                                f"{next(_ids)}"))  # fmt: skip


def positions(s: Stack) -> dict[tuple[str, str], int]:
    reply = processes.ask_execution(s.bus, s.cfg, s.home, GetPositions())
    assert isinstance(reply, Reply) and reply.ok, reply
    return {(p["strategy_id"], p["symbol"]): p["quantity"] for p in reply.data}


def orders(s: Stack, strategy: str) -> list[dict[str, Any]]:
    reply = processes.ask_execution(s.bus, s.cfg, s.home, GetOrders(limit=10_000))
    assert isinstance(reply, Reply) and reply.ok, reply
    return [o for o in reply.data if o["strategy_id"] == strategy]


def held(s: Stack, strategy: str, symbol: str, qty: int, message: str) -> None:
    eventually(lambda: positions(s).get((strategy, symbol)) == qty, timeout=10,
               message=f"{message}: {strategy} {symbol} {qty} (have {positions(s)})")  # fmt: skip


def stop_rows(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT request_id, reason, data FROM risk_events "
                            "WHERE event = 'strategy_stopped' ORDER BY ts").fetchall()  # fmt: skip
    return [(r[0], r[1], r[2]) for r in rows]


def assert_refused_for_max_loss(s: Stack, strategy: str, symbol: str, limit: str = "max_loss") -> None:
    verdict = trade(s, strategy, symbol)
    assert not verdict.approved and verdict.code == VerdictCode.STRATEGY_STOPPED, verdict
    assert f"strategy {strategy} is stopped for the day" in verdict.reason and limit in verdict.reason


def assert_trades(s: Stack, strategy: str, symbol: str, before: int, qty: int = 5) -> None:
    verdict = trade(s, strategy, symbol, qty=qty)
    assert verdict.approved and verdict.order_id, verdict
    held(s, strategy, symbol, before + qty, "the other strategy's new order filled")


def test_past_max_loss_a_strategy_is_squared_off_and_stopped_while_another_trades_on_across_a_risk_restart(
    paper: tuple[Stack, FakeFeed, str],
) -> None:
    s, feed, url = paper
    alerts = s.bus.subscriber([s.cfg.bus.endpoint("risk_pub")], [topic("alert", "risk")])
    assert trade(s, "loser", "RELIANCE-EQ").approved
    assert trade(s, "winner", "INFY-EQ").approved
    held(s, "loser", "RELIANCE-EQ", 10, "the entry filled")
    held(s, "winner", "INFY-EQ", 10, "the entry filled")

    feed.set("RELIANCE-EQ", 1280.0)  # loser down about 100 + costs: past its max_loss of 50

    held(s, "loser", "RELIANCE-EQ", 0, "squared off")
    closes = [o for o in orders(s, "loser") if o["purpose"] == "FLATTEN"]
    assert [(o["side"], o["filled_qty"], o["status"]) for o in closes] == [("SELL", 10, "COMPLETE")]
    assert_refused_for_max_loss(s, "loser", "RELIANCE-EQ")
    assert_trades(s, "winner", "INFY-EQ", before=10)
    eventually(lambda: stop_rows(url), timeout=5, message="the strategy_stopped row")
    [(rid, reason, data)] = stop_rows(url)
    assert rid.startswith("risk-stop-") and data["strategy_id"] == "loser" and "max_loss -50.00" in reason
    got = [m for m in iter(lambda: alerts.recv(200), None) if isinstance(m[1], Alert)]
    assert [a.code for _, a in got if isinstance(a, Alert)] == ["strategy_stopped"]
    alerts.close()

    s.stop("risk")
    start(s, "risk")

    assert_refused_for_max_loss(s, "loser", "RELIANCE-EQ")
    assert_trades(s, "winner", "INFY-EQ", before=15)
    assert len(stop_rows(url)) == 1  # nothing recorded twice
    assert len([o for o in orders(s, "loser") if o["purpose"] == "FLATTEN"]) == 1  # nor closed twice


def test_a_stopped_strategy_stays_stopped_after_a_restart_of_the_whole_stack_the_same_day(
    paper: tuple[Stack, FakeFeed, str],
) -> None:
    s, feed, url = paper
    assert trade(s, "taker", "TCS-EQ").approved
    assert trade(s, "winner", "INFY-EQ").approved
    held(s, "taker", "TCS-EQ", 10, "the entry filled")
    held(s, "winner", "INFY-EQ", 10, "the entry filled")

    feed.set("TCS-EQ", 3112.0)  # taker up about 110 less costs: past its target_profit of 50

    held(s, "taker", "TCS-EQ", 0, "squared off")
    assert_refused_for_max_loss(s, "taker", "TCS-EQ", limit="target_profit")
    eventually(lambda: s.status()["events_pending"] == 0, timeout=5, message="the stop recorded")
    s.stop("risk")
    s.stop("execution")
    (s.home / "run" / "risk-day.json").unlink()  # only the ledger remembers the stop now
    start(s)

    day = processes.ask_execution(s.bus, s.cfg, s.home, GetDayState())
    assert isinstance(day, DayState) and set(day.stopped) == {"taker"}
    assert_refused_for_max_loss(s, "taker", "TCS-EQ", limit="target_profit")
    assert_trades(s, "winner", "INFY-EQ", before=10)
    assert positions(s).get(("taker", "TCS-EQ")) == 0
    assert len(stop_rows(url)) == 1


def test_a_stop_risk_could_not_deliver_before_it_was_killed_is_recorded_and_squared_off_after_its_restart(
    paper: tuple[Stack, FakeFeed, str],
) -> None:
    s, feed, url = paper
    assert trade(s, "loser", "RELIANCE-EQ").approved
    held(s, "loser", "RELIANCE-EQ", 10, "the entry filled")
    s.stop("execution")

    feed.set("RELIANCE-EQ", 1280.0)  # crossed while execution is down: the record and flatten wait
    # (a loaded machine: risk's first attempt to deliver has to time out before they queue)
    eventually(lambda: s.status()["events_pending"] >= 2, timeout=15, interval=0.1, message="the stop queued")
    s.kill("risk")  # ... and die with them (only the local backstop knows)
    start(s)

    held(s, "loser", "RELIANCE-EQ", 0, "squared off after the restart")
    assert_refused_for_max_loss(s, "loser", "RELIANCE-EQ")
    eventually(lambda: len(stop_rows(url)) == 1, timeout=5, message="the stop recorded")
    assert len([o for o in orders(s, "loser") if o["purpose"] == "FLATTEN"]) == 1


def test_a_strategy_that_crossed_its_max_loss_while_risk_was_down_is_stopped_when_it_starts(
    paper: tuple[Stack, FakeFeed, str],
) -> None:
    s, feed, _ = paper
    assert trade(s, "loser", "RELIANCE-EQ").approved
    assert trade(s, "winner", "INFY-EQ").approved
    held(s, "loser", "RELIANCE-EQ", 10, "the entry filled")
    s.stop("risk")

    feed.set("RELIANCE-EQ", 1280.0)
    start(s, "risk")

    held(s, "loser", "RELIANCE-EQ", 0, "squared off")
    assert_refused_for_max_loss(s, "loser", "RELIANCE-EQ")
    assert_trades(s, "winner", "INFY-EQ", before=10)
