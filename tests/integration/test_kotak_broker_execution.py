"""``python -m services.execution --live`` with ``execution.broker=kotak`` against the Kotak REST fake.

Execution is a real process on a real (embedded) PostgreSQL; the fake is its own process; the
test plays the feed (a PUB on ``feed_pub`` sending ticks) and risk (``ExecuteOrder`` over the
bus). Risk's default ``max_qty`` would refuse 3,900 NIFTY futures, so the order is driven at
the execution level, as issue 5 asks.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Bus, topic
from libs.common.config import ExecutionConfig, load_config
from libs.common.messages import (
    ExecuteOrder,
    GetFeedSession,
    GetOrders,
    GetPositions,
    Message,
    OrderRequest,
    Reply,
    Tick,
)
from libs.common.money import protected_limit
from services.execution.brokers.kotak import KotakBroker
from services.execution.master_sync import fetch_kotak_master
from tests.fakes.kotak_rest import KotakRestFake, default_instruments
from tests.helpers import eventually, stack_env
from tests.kit import processes

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "services" / "execution" / "service.py").exists(),
    reason="services/execution/service.py is not there yet",
)

ROOT = Path(__file__).resolve().parents[2]
NIFTY = next(i for i in default_instruments() if i.inst_type == "FUTIDX")
LTP = 24_087.35
SFEED_URL = "ws://127.0.0.1:9/feed"  # never connected to: only leased


class LiveExecution:
    """The execution process, a feed publisher and a bus client for one test."""

    def __init__(self, home: Path, base_port: int, fake: KotakRestFake, pg_url: str) -> None:
        c = fake.credentials
        self.env = stack_env(
            home, base_port, NEOPULSE_ENV_FILE=str(home / "no.env"),
            NEOPULSE_EXECUTION__BROKER="kotak", NEOPULSE_DATABASE__URL=pg_url,
            NEOPULSE_EXECUTION__BROKER_TIMEOUT_S="2", NEOPULSE_KOTAK__SFEED_URL=SFEED_URL,
            NEOPULSE_KOTAK__BASE_URL=fake.base_url, NEOPULSE_KOTAK__CONSUMER_KEY=c.consumer_key,
            NEOPULSE_KOTAK__MOBILE=c.mobile_number, NEOPULSE_KOTAK__UCC=c.ucc,
            NEOPULSE_KOTAK__MPIN=c.mpin, NEOPULSE_KOTAK__TOTP_SECRET=c.totp_secret,
        )  # fmt: skip
        self.home = home
        self.cfg = load_config(env=self.env)
        self.bus = Bus(self.cfg)
        self.feed = self.bus.publisher(self.cfg.bus.endpoint("feed_pub"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._ticking = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        proc = self.proc = processes.spawn(self.home, "execution", self.env, "--live")
        status = functools.partial(self.ask, timeout_ms=300)
        eventually(lambda: processes.answers(proc, self.home, "execution", status), timeout=30,
                   message="execution to answer")  # fmt: skip

    def output(self) -> str:
        return processes.output(self.home, "execution")

    def ask(self, msg: Message, timeout_ms: int = 5000) -> Message:
        return processes.ask_execution(self.bus, self.cfg, self.home, msg, timeout_ms)

    def start_ticks(self, ltp: float) -> None:
        """Publish the NIFTY future's last price every 50 ms (the feed's job), until stopped."""
        def run() -> None:
            while not self._ticking.wait(0.05):
                self.feed.publish(topic("tick", NIFTY.segment, NIFTY.token),
                                  Tick(segment=NIFTY.segment, token=NIFTY.token, ltp=ltp,
                                       symbol=NIFTY.trading_symbol))  # fmt: skip

        self._ticker = threading.Thread(target=run, daemon=True)
        self._ticker.start()

    def orders(self) -> list[dict[str, Any]]:
        reply = self.ask(GetOrders())
        assert isinstance(reply, Reply) and reply.ok, reply
        rows: list[dict[str, Any]] = reply.data
        return rows

    def close(self) -> None:
        self._ticking.set()
        if self._ticker is not None:
            self._ticker.join(2)
        if self.proc is not None:
            processes.stop(self.proc)
        self.feed.close()
        self.bus.close()


@pytest.fixture
def live(tmp_path: Path, base_port: int, fake: KotakRestFake, pg_url: str) -> Iterator[LiveExecution]:
    home = tmp_path / "home"
    ex = LiveExecution(home, base_port, fake, pg_url)
    # The day's instrument master, as `neopulse sync-master` leaves it: the fake's own.
    broker = KotakBroker(ex.cfg.kotak, ExecutionConfig())
    try:
        fetch_kotak_master(broker, home)
    finally:
        broker.close()
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


def execute(request_id: str, *, side: str, quantity: int, order_type: str = "LIMIT",
            price: Decimal | None = None, trigger: Decimal | None = None) -> ExecuteOrder:  # fmt: skip
    order = OrderRequest(request_id=request_id, strategy_id="t1", side=side, quantity=quantity,
                         segment=NIFTY.segment, token=NIFTY.token, symbol=NIFTY.trading_symbol, price=price,
                         order_type=order_type, trigger_price=trigger, product="NRML")  # fmt: skip
    return ExecuteOrder(request_id=request_id, order=order, quantity=quantity, segment=NIFTY.segment,
                        token=NIFTY.token, symbol=NIFTY.trading_symbol)  # fmt: skip


def test_market_intent_for_3900_nifty_futures_goes_out_as_three_protected_limit_slices(
    live: LiveExecution, fake: KotakRestFake
) -> None:
    live.start_ticks(LTP)
    limit = protected_limit("BUY", LTP, 1.0, Decimal("0.1"))  # execution.protection_pct = 1 %

    attempts = iter(range(100))

    def submitted() -> Reply | None:
        # Market intent (no price). A fresh request id per attempt: a refused one is final.
        reply = live.ask(execute(f"exec-1-{next(attempts)}", side="BUY", quantity=3900))
        assert isinstance(reply, Reply)
        # Until the first tick arrives, execution refuses to price a market order.
        return reply if reply.ok else None

    reply = eventually(submitted, timeout=10, interval=0.2, message="execution to accept the order")
    parent_tag = reply.data["client_tag"]

    received = eventually(lambda: len(fake.received_orders()) == 3 and fake.received_orders(), timeout=15,
                          message="three slices at the broker")  # fmt: skip
    bodies = [r["body"] for r in received]
    assert sorted(int(b["qt"]) for b in bodies) == [390, 1755, 1755]  # freeze 1,800 → 27 lots of 65
    assert {(b["pt"], b["pr"], b["tp"], b["tt"], b["es"], b["ts"], b["pc"]) for b in bodies} == {
        ("L", f"{limit:.2f}", "0", "B", "nse_fo", NIFTY.trading_symbol, "NRML")
    }
    tags = [b["ig"] for b in bodies]
    assert len(set(tags)) == 3 and parent_tag not in tags  # each slice is its own order at Kotak
    assert {r["outcome"] for r in received} == {"ack"}

    # The broker fills everything; execution sees it through order-book polling.
    for r in received:
        fake.fill(r["nOrdNo"], price=str(limit))

    def position() -> dict[str, Any] | None:
        reply = live.ask(GetPositions())
        assert isinstance(reply, Reply) and reply.ok
        return next((p for p in reply.data if int(p["quantity"]) == 3900), None)

    pos = eventually(position, timeout=15, message="a 3,900 position from the fills")
    assert Decimal(str(pos["avg_price"])) == limit
    slices = [o for o in live.orders() if o["client_tag"] in tags]
    assert {o["status"] for o in slices} == {"COMPLETE"} and len(slices) == 3
    assert len(fake.received_orders()) == 3  # nothing was sent twice


def test_sl_m_intent_arrives_as_a_stop_limit(live: LiveExecution, fake: KotakRestFake) -> None:
    trigger = Decimal("24000.0")
    reply = live.ask(execute("exec-2", side="SELL", quantity=65, order_type="SL-M", trigger=trigger))
    assert isinstance(reply, Reply) and reply.ok, reply

    received = eventually(fake.received_orders, timeout=10, message="the stop at the broker")
    (body,) = [r["body"] for r in received]
    limit = protected_limit("SELL", trigger, 1.0, Decimal("0.1"))
    assert (body["pt"], body["tp"], body["pr"], body["qt"], body["tt"]) == (
        "SL", "24000.00", f"{limit:.2f}", "65", "S"
    )

    def stop_open() -> bool:
        return any(o["client_tag"] == body["ig"] and o["status"] == "OPEN" for o in live.orders())

    eventually(stop_open, timeout=10, message="the stop OPEN in the ledger (trigger pending at Kotak)")


def test_feed_session_lease_over_the_bus(live: LiveExecution, fake: KotakRestFake) -> None:
    reply = live.ask(GetFeedSession(requester="feed"))
    assert isinstance(reply, Reply) and reply.ok, reply
    assert (reply.data["url"], reply.data["user"]) == (SFEED_URL, fake.credentials.ucc)
    assert reply.data["auth"]  # the session's sid; no trading token is handed out
    assert fake.credentials.mpin not in str(reply.data)


def test_cli_sync_master_fetches_the_csvs_caches_them_and_fills_instrument_master(
    live: LiveExecution, fake: KotakRestFake, pg_url: str
) -> None:
    # Arrange: an empty cache; the fake serves the file-path endpoint and its CSV files.
    import json
    import shutil

    import psycopg

    shutil.rmtree(live.home / "master", ignore_errors=True)

    # Act: the operator's command, through execution (the SDK holder).
    res = subprocess.run([sys.executable, "-m", "services.admin.cli", "sync-master", "--json"], cwd=ROOT,
                         env=live.env, capture_output=True, text=True, timeout=60)  # fmt: skip

    # Assert: exit 0, CSVs cached under $NEOPULSE_HOME/master/, and the ledger's table filled
    # with the fake's instruments (tick size converted from paise).
    assert res.returncode == 0, res.stderr + live.output()[-2000:]
    data = json.loads(res.stdout)
    cached = sorted(p.name for p in (live.home / "master").glob("*.csv"))
    assert cached and data["instruments"] >= len(default_instruments())
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT tick_size, lot_size FROM instrument_master WHERE exchange_segment = %s AND token = %s",
            (NIFTY.segment, NIFTY.token),
        ).fetchall()
    assert rows == [(NIFTY.tick_paise / 100, NIFTY.lot_size)]
    assert len(cached) == len(data["files"])
