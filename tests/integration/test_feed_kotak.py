"""``python -m services.feed`` with ``feed.source=kotak`` against the SFeed fake: the SDK's
real ``SFeedWebSocket`` in the feed process, our fake server speaking native_batch.

Market hours come from config, never the real clock: ``00:00-24:00`` on every weekday is
"always open", ``00:00-00:00`` is "never open".
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Bus
from libs.common.config import load_config
from libs.common.messages import Alert, GetFeedSession, Reply, Subscribe
from tests.fakes.sfeed_server import DepthRow, FakeSFeedServer
from tests.helpers import eventually, stack_env
from tests.integration.feed_support import Collector, FeedProc, env_json

os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")

NOW_S = 1_767_000_000  # the fake stamps exchange times with this
ALWAYS_OPEN = {"NEOPULSE_FEED__MARKET_HOURS": "00:00-24:00", "NEOPULSE_FEED__MARKET_DAYS": "[0,1,2,3,4,5,6]"}
NEVER_OPEN = {"NEOPULSE_FEED__MARKET_HOURS": "00:00-00:00", "NEOPULSE_FEED__MARKET_DAYS": "[0,1,2,3,4,5,6]"}


@pytest.fixture
def fake() -> Iterator[FakeSFeedServer]:
    with FakeSFeedServer(clock=lambda: NOW_S) as server:
        yield server


def kotak_feed(home: Path, base_port: int, url: str, *, instruments: list[str] | None = None,
               hours: dict[str, str] | None = None, lease: bool = False, **extra: str) -> FeedProc:
    env: dict[str, Any] = {
        "NEOPULSE_FEED__SOURCE": "kotak",
        "NEOPULSE_KOTAK__SFEED_URL": url,
        "NEOPULSE_FEED__INSTRUMENTS": env_json(instruments or ["nse_cm|2885"]),
        "NEOPULSE_FEED__WATCHDOG_S": "0.5",
        "NEOPULSE_FEED__RECONNECT_MIN_S": "0.2",
        "NEOPULSE_FEED__RECONNECT_MAX_S": "1.0",
        "NEO_LOG_FILE_ENABLED": "false",
        **(hours or ALWAYS_OPEN),
        **extra,
    }
    if not lease:
        env |= {"NEOPULSE_KOTAK__FEED_USER": "UCC42", "NEOPULSE_KOTAK__FEED_AUTH": "sid-secret-1234"}
    return FeedProc(home, base_port, **env)


def connections(fake: FakeSFeedServer) -> int:
    return fake.stats().connections_total


def test_ticks_reach_the_bus_with_exact_prices_quantities_and_exchange_time(
        tmp_path: Path, base_port: int, fake: FakeSFeedServer) -> None:
    feed = kotak_feed(tmp_path / "home", base_port, fake.url,
                      instruments=["nse_cm|2885", "TCS-EQ", "Nifty 50"])
    col = Collector(feed.subscriber(b"tick.", b"feedstatus."))
    try:
        feed.start()
        col.wait_live(feed)
        eventually(lambda: {("nse_cm", "2885"), ("nse_cm", "11536")} <= fake.subscribed_keys(), 5,
                   message="scrips subscribed at the server")

        fake.push_tick("nse_cm", "2885", ltp=2950.45, volume=1_234_567, last_trade_qty=37, close=2901.10,
                       open=2910.0, high=2961.95, low=2899.05, open_interest=0,
                       bids=(DepthRow(2950.40, 120, 3),), asks=(DepthRow(2950.55, 80, 2),))
        fake.push_tick("nse_cm", "11536", ltp=3120.05, volume=42, last_trade_qty=1)
        fake.push_index("nse_cm", "Nifty 50", value=25912.35, close=25880.10)
        eventually(lambda: len({t.token for t in col.poll().ticks}) >= 3, 5, message="three instruments")
    finally:
        feed.stop()

    rel = [t for t in col.ticks if t.token == "2885"][-1]
    assert (rel.segment, rel.symbol) == ("nse_cm", "RELIANCE-EQ")
    assert rel.ltp == 2950.45 and rel.close == 2901.10
    assert (rel.open, rel.high, rel.low) == (2910.0, 2961.95, 2899.05)
    assert (rel.bid, rel.bid_qty, rel.ask, rel.ask_qty) == (2950.40, 120, 2950.55, 80)
    assert (rel.volume, rel.last_qty) == (1_234_567, 37)
    assert rel.exch_ts_ns == NOW_S * 1_000_000_000
    tcs = [t for t in col.ticks if t.token == "11536"][-1]
    assert (tcs.ltp, tcs.volume, tcs.last_qty, tcs.symbol) == (3120.05, 42, 1, "TCS-EQ")
    nifty = [t for t in col.ticks if t.token == "Nifty 50"][-1]
    assert (nifty.ltp, nifty.close, nifty.symbol) == (25912.35, 25880.10, "Nifty 50")
    assert col.sub.stats.gaps == 0


def test_a_silent_connection_is_replaced_and_resubscribed_stale_then_live(
        tmp_path: Path, base_port: int, fake: FakeSFeedServer) -> None:
    feed = kotak_feed(tmp_path / "home", base_port, fake.url)
    col = Collector(feed.subscriber(b"tick.", b"feedstatus."))
    try:
        feed.start()
        col.wait_live(feed)
        first = set(fake.subscriptions())
        mark = len(col.statuses)

        fake.go_silent(first)  # TCP stays open, nothing more is sent (or read)

        col.wait_state("STALE", after=mark)
        live = col.wait_state("LIVE", after=mark)
        subs = eventually(lambda: {c: k for c, k in fake.subscriptions().items() if c not in first}, 5,
                          message="a new connection")
        assert ("nse_cm", "2885") in next(iter(subs.values()))  # resubscribed
        fake.push_tick("nse_cm", "2885", ltp=1301.25, last_trade_qty=5)
        eventually(lambda: any(t.ltp == 1301.25 for t in col.poll().ticks), 5, message="tick after reconnect")
    finally:
        feed.stop()
    states = col.states()[mark:]
    assert states.index("STALE") < states.index("RECONNECTING") < states.index("LIVE")
    assert live.reconnects >= 1
    assert "silent" in col.statuses[mark + states.index("RECONNECTING")].detail


def test_a_dropped_connection_is_healed_with_backoff(tmp_path: Path, base_port: int,
                                                     fake: FakeSFeedServer) -> None:
    # A watchdog far beyond the test's length: this test is about a drop, and on a loaded machine
    # 0.5 s without a frame could name the reconnect "silent" before the drop is seen.
    feed = kotak_feed(tmp_path / "home", base_port, fake.url, NEOPULSE_FEED__RECONNECT_MIN_S="0.4",
                      NEOPULSE_FEED__RECONNECT_MAX_S="2.0", NEOPULSE_FEED__WATCHDOG_S="30")
    col = Collector(feed.subscriber(b"tick.", b"feedstatus."))
    try:
        feed.start()
        col.wait_live(feed)
        before = connections(fake)
        mark = len(col.statuses)

        t_drop = time.monotonic()
        fake.drop_all()
        col.wait_state("RECONNECTING", after=mark)
        eventually(lambda: connections(fake) > before, 10, message="reconnected")
        waited = time.monotonic() - t_drop
        col.wait_state("LIVE", after=mark)
        eventually(lambda: ("nse_cm", "2885") in fake.subscribed_keys(), 5, message="resubscribed")

        fake.push_tick("nse_cm", "2885", ltp=1299.95, last_trade_qty=2)
        eventually(lambda: any(t.ltp == 1299.95 for t in col.poll().ticks), 5, message="tick after drop")
        status = feed.status()
    finally:
        feed.stop()
    assert waited >= 0.4  # the first backoff step: at least reconnect_min_s
    reconnecting = col.statuses[mark + col.states()[mark:].index("RECONNECTING")]
    assert "connection dropped" in reconnecting.detail and "retrying in" in reconnecting.detail
    assert status["source_stats"]["reconnects"] >= 1 and status["state"] == "LIVE"


def test_repeated_failures_back_off_further_and_report_down(tmp_path: Path, base_port: int) -> None:
    # Nothing listens on this port: every connect fails at once.
    with FakeSFeedServer() as probe:
        dead_url = probe.url
    feed = kotak_feed(tmp_path / "home", base_port, dead_url, NEOPULSE_FEED__RECONNECT_MIN_S="0.1",
                      NEOPULSE_FEED__RECONNECT_MAX_S="0.8")
    col = Collector(feed.subscriber(b"feedstatus."))
    try:
        feed.start()
        down = col.wait_state("DOWN", timeout=20)
        eventually(lambda: feed.status()["source_stats"]["reconnects"] >= 6, 20, message="more retries")
    finally:
        feed.stop()
    assert "connect failed" in down.detail
    # every retry's delay, from the feed's log (a status is published only when the state
    # changes, and PUB/SUB may drop the first one before the subscriber has joined)
    log = (tmp_path / "home" / "log" / "feed.log").read_text(errors="replace").splitlines()
    delays = [json.loads(line)["retry_in_s"] for line in log if '"sfeed_connection_lost"' in line]
    assert len(delays) >= 6
    assert delays[0] <= 0.2 + 1e-9 and max(delays) <= 0.8 + 1e-9
    assert delays == sorted(delays)  # backs off further, up to the cap


def test_garbage_frames_are_ignored_and_counted(tmp_path: Path, base_port: int,
                                                fake: FakeSFeedServer) -> None:
    # A watchdog far beyond the test's length: this test is about garbage, not silence, and
    # a loaded machine can leave more than the usual 0.5 s between LIVE and the first frame.
    feed = kotak_feed(tmp_path / "home", base_port, fake.url, NEOPULSE_FEED__WATCHDOG_S="30")
    col = Collector(feed.subscriber(b"tick.", b"feedstatus."))
    try:
        feed.start()
        # Ask the feed for its state: with no reconnect, the one LIVE publication may come
        # before this subscriber has joined (slow joiner), so the bus alone cannot tell.
        eventually(lambda: feed.status()["state"] == "LIVE", 15, message="feed LIVE")
        conns = connections(fake)

        binary = fake.send_garbage_binary()
        text = fake.send_garbage_text()

        def good_tick_arrived() -> bool:
            # Re-sent until seen: a slow-joining subscriber may miss the first one.
            fake.push_tick("nse_cm", "2885", ltp=1288.80, last_trade_qty=3)
            return any(t.ltp == 1288.80 for t in col.poll().ticks)

        eventually(good_tick_arrived, 5, interval=0.2, message="good tick after garbage")
        stats = eventually(lambda: (s := feed.status()["source_stats"])["garbage"] >= 16 and s, 5,
                           message="garbage counted")
    finally:
        feed.stop()
    assert binary == text == 1  # sent to our one connection
    assert stats["garbage_frames"] >= 12 and stats["bad_packets"] >= 3 and stats["dropped_messages"] >= 1
    assert all(t.token == "2885" and t.ltp > 0 for t in col.ticks)  # the token-0 packet never got out
    assert connections(fake) == conns and "STALE" not in col.states()


def test_outside_market_hours_silence_does_not_reconnect(tmp_path: Path, base_port: int,
                                                         fake: FakeSFeedServer) -> None:
    feed = kotak_feed(tmp_path / "home", base_port, fake.url, hours=NEVER_OPEN)
    col = Collector(feed.subscriber(b"feedstatus."))
    try:
        feed.start()
        col.wait_live(feed)
        conns = connections(fake)

        fake.go_silent()
        eventually(lambda: feed.status()["source_stats"]["last_packet_age_s"] > 4 * 0.5, 10,
                   message="silence well past the watchdog")
        status = feed.status()
        col.poll()
    finally:
        feed.stop()
    assert status["state"] == "LIVE" and status["market_open"] is False
    assert connections(fake) == conns
    assert not {"STALE", "RECONNECTING", "DOWN"} & set(col.states())


def test_subscribe_request_while_live_reaches_the_server(tmp_path: Path, base_port: int,
                                                          fake: FakeSFeedServer) -> None:
    feed = kotak_feed(tmp_path / "home", base_port, fake.url)
    col = Collector(feed.subscriber(b"tick.nse_cm.1594."))
    try:
        feed.start().wait_ready()
        eventually(lambda: feed.status()["state"] == "LIVE", 10, message="LIVE")

        reply = feed.ask(Subscribe(instruments=["INFY-EQ"], requester="test"))
        eventually(lambda: ("nse_cm", "1594") in fake.subscribed_keys(), 5, message="INFY at the server")
        fake.push_tick("nse_cm", "1594", ltp=1510.35, last_trade_qty=4)
        tick = col.wait_ticks(1)[-1]
    finally:
        feed.stop()
    assert isinstance(reply, Reply) and reply.ok and reply.data["total"] == 2
    assert (tick.ltp, tick.last_qty, tick.symbol) == (1510.35, 4, "INFY-EQ")


class LeaseServer:
    """Stands in for execution's REP at the protocol level: answers ``GetFeedSession``."""

    def __init__(self, endpoint: str, lease: dict[str, str]) -> None:
        self.bus = Bus(load_config(env={}))
        self.server = self.bus.server(endpoint)
        self.lease = lease
        self.requests = 0
        self.server.handler = self._handle
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _handle(self, msg: Any, _responder: Any) -> Reply:
        assert isinstance(msg, GetFeedSession)
        self.requests += 1
        return Reply(ok=True, data=self.lease)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.server.sock.poll(50):
                self.server.drain()

    def __enter__(self) -> LeaseServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(2)
        self.server.close()
        self.bus.close()


def test_credentials_are_leased_from_execution_when_not_configured(tmp_path: Path, base_port: int) -> None:
    with FakeSFeedServer(clock=lambda: NOW_S, expected_user="UCC7", expected_auth="edit-sid-7") as fake:
        feed = kotak_feed(tmp_path / "home", base_port, "", lease=True,
                          NEOPULSE_BUS__REQUEST_TIMEOUT_MS="400")
        endpoint = load_config(env=stack_env(tmp_path, base_port)).bus.endpoint("execution_rep")
        col = Collector(feed.subscriber(b"feedstatus."))
        try:
            feed.start()
            down = col.wait_state("RECONNECTING", timeout=15)  # execution is not there yet
            with LeaseServer(endpoint, {"url": fake.url, "user": "UCC7", "auth": "edit-sid-7"}) as lease:
                col.wait_state("LIVE", timeout=15)
                status = feed.status()
        finally:
            feed.stop()
    assert "execution" in down.detail
    assert lease.requests >= 1 and status["source_stats"]["leased"] is True
    assert fake.auth_frames[-1]["user"] == "UCC7"
    assert "edit-sid-7" not in feed.log_lines() and "edit-sid-7" not in feed.output()


def test_a_new_login_at_execution_makes_the_feed_reconnect_on_a_fresh_lease(
    tmp_path: Path, base_port: int
) -> None:
    # Arrange: the feed live on a lease of execution's session 7 (execution stood in for by a
    # REP answering GetFeedSession and a PUB announcing logins).
    with FakeSFeedServer(clock=lambda: NOW_S) as fake:
        feed = kotak_feed(tmp_path / "home", base_port, "", lease=True, hours=NEVER_OPEN)  # no watchdog
        cfg = load_config(env=stack_env(tmp_path, base_port))
        bus = Bus(cfg)
        pub = bus.publisher(cfg.bus.endpoint("execution_pub"))
        lease = {"url": fake.url, "user": "UCC7", "auth": "edit-sid-7", "issued_ns": str(time.time_ns())}
        try:
            with LeaseServer(cfg.bus.endpoint("execution_rep"), lease) as rep:
                feed.start()

                def live() -> bool:  # asked, not heard: FeedStatus LIVE may come before a SUB joins
                    return bool(feed.status()["source_stats"]["connected"])

                eventually(live, timeout=15, message="the feed live")
                # a login older than the lease in use (the one it came from) changes nothing
                older = Alert(level="INFO", source="execution", code="broker_login", text="session 7",
                              ts_ns=int(lease["issued_ns"]) - 1)  # fmt: skip
                pub.publish(b"session.execution.", older)
                time.sleep(1.0)
                assert connections(fake) == 1

                # Act: execution logs in again (the next morning): a new session, announced.
                rep.lease = {**lease, "auth": "edit-sid-8", "issued_ns": str(time.time_ns() + 10**9)}
                newer = Alert(level="INFO", source="execution", code="broker_login", text="session 8")
                for _ in range(3):  # PUB/SUB: the subscription may still be joining
                    pub.publish(b"session.execution.", newer)
                    time.sleep(0.3)
                eventually(lambda: connections(fake) >= 2 and live(), timeout=15,
                           message="the feed live again on a second connection")  # fmt: skip
        finally:
            feed.stop()
            pub.close()
            bus.close()

    # Assert: the feed reconnected at once on the new session's lease.
    assert [f["auth"] for f in fake.auth_frames][-1] == "edit-sid-8", fake.auth_frames
    assert rep.requests >= 2 and connections(fake) >= 2


def test_feed_process_streams_a_configured_instrument_from_a_separate_sfeed_server(
        tmp_path: Path, base_port: int) -> None:
    # Issue 3, acceptance 2: everything through the environment, the fake in its own process.
    import subprocess
    import sys

    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.sfeed_server", "--rate", "20"],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert fake.stdout is not None
        ready = fake.stdout.readline()
        assert ready.startswith("SFEED_FAKE_READY"), ready
        url = ready.split("url=")[1].split()[0]
        feed = FeedProc(tmp_path / "home", base_port, NEOPULSE_FEED__SOURCE="kotak",
                        NEOPULSE_KOTAK__SFEED_URL=url, NEOPULSE_KOTAK__FEED_USER="UCC42",
                        NEOPULSE_KOTAK__FEED_AUTH="sid-secret-1234",
                        NEOPULSE_FEED__INSTRUMENTS='["nse_cm|2885"]', NEO_LOG_FILE_ENABLED="false")
        col = Collector(feed.subscriber(b"tick.nse_cm.2885."))
        try:
            feed.start()
            ticks = col.wait_ticks(10)
            recorded = feed.status()["recorder"]
        finally:
            feed.stop()
    finally:
        fake.terminate()
        fake.wait(10)
    assert all(t.segment == "nse_cm" and t.token == "2885" and t.symbol == "RELIANCE-EQ" for t in ticks)
    assert all(t.ltp > 0 and t.bid <= t.ask for t in ticks)
    assert len({t.ltp for t in ticks}) > 1 and col.sub.stats.gaps == 0
    assert recorded["path"].endswith(".ticks")
    assert "sid-secret-1234" not in feed.log_lines() + feed.output()
