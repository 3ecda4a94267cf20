"""The SDK's real SFeedWebSocket client against our protocol-level SFeed fake.

These tests pin down two things at once: that tests/fakes/sfeed_server.py speaks the
wire protocol the SDK decodes, and how the SDK client behaves on drops, silence and
garbage (see docs/kotak-sfeed.md), which the feed service relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec

import pytest

# Importing the SDK sets up its logging; by default that opens ./logs/neo-api-client.log.
os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")

from neo_api_client.websocket.feed import (
    SFeedIndex,
    SFeedMarketStatus,
    SFeedScrip,
    SFeedScripLite,
    SFeedWebSocket,
    WsToken,
)
from neo_api_client.websocket.feed.exceptions import (
    AuthenticationError,
    NotConnectedError,
)
from websockets.asyncio.client import connect as raw_connect

from tests.fakes.sfeed_server import DepthRow, FakeSFeedServer, control

P = ParamSpec("P")
REPO_ROOT = Path(__file__).resolve().parents[2]
FIXED_NOW = 1_767_000_000  # epoch seconds the fake stamps on ticks
RELIANCE = WsToken("nse_cm", "2885")
TCS = WsToken("nse_cm", "11536")
INFY = WsToken("nse_cm", "1594")
NIFTY = WsToken("nse_cm", "Nifty 50")


# -- helpers ----------------------------------------------------------------


async def eventually(cond: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or cond}")
        await asyncio.sleep(0.01)


def async_test(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body in a fresh event loop (the SDK client is asyncio-only)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout=60))

    return wrapper


@dataclass
class Recorder:
    """Everything the SDK hands to our callbacks."""

    messages: list[Any] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    raw_binary_frames: int = 0
    connects: int = 0
    disconnects: int = 0

    def attach(self, ws: SFeedWebSocket) -> None:
        ws.on_message = self.messages.append
        ws.on_error = self.errors.append
        ws.on_raw = self._on_raw
        ws.on_connect = self._on_connect
        ws.on_disconnect = self._on_disconnect

    def _on_raw(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes | bytearray):
            self.raw_binary_frames += 1

    def _on_connect(self) -> None:
        self.connects += 1

    def _on_disconnect(self) -> None:
        self.disconnects += 1

    def of(self, kind: type, token: str) -> list[Any]:
        """Messages of one SDK model type for one instrument token, in arrival order."""
        return [
            m for m in self.messages
            if isinstance(m, kind) and getattr(m, "instrument_token", None) == token
        ]


async def collect(ws: SFeedWebSocket) -> list[Any]:
    return [message async for message in ws]


def detach(ws: SFeedWebSocket) -> None:
    ws.on_message = ws.on_error = ws.on_raw = ws.on_connect = ws.on_disconnect = None


def new_client(fake: FakeSFeedServer, **overrides: Any) -> SFeedWebSocket:
    """A client configured the way our feed source should: no SDK reconnects or retries."""
    options: dict[str, Any] = {
        "url": fake.url,
        "user": "UCC123",
        "auth": "SID-abc",
        "max_reconnect_attempts": 0,
        "max_connect_retries": 0,
        "reconnect_delay": 0,
        "ack_wait_timeout": 2.0,
    }
    options.update(overrides)
    return SFeedWebSocket(**options)


@contextlib.asynccontextmanager
async def connected(
    fake: FakeSFeedServer, **overrides: Any
) -> AsyncIterator[tuple[SFeedWebSocket, Recorder]]:
    ws = new_client(fake, **overrides)
    rec = Recorder()
    rec.attach(ws)
    await ws.connect()
    try:
        yield ws, rec
    finally:
        detach(ws)
        await ws.close()


@pytest.fixture
def fake() -> Iterator[FakeSFeedServer]:
    with FakeSFeedServer(clock=lambda: FIXED_NOW) as server:
        yield server


# -- handshake ----------------------------------------------------------------


@async_test
async def test_auth_frame_carries_user_and_session_and_reply_sets_dividers(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        assert rec.connects == 1
        assert ws.is_connected
        [auth] = fake.auth_frames
        assert (auth["user"], auth["auth"], auth["format"]) == ("UCC123", "SID-abc", "native_batch")
        assert ws.dividers[1] == 100  # nse_cm prices arrive in paise
        stats = fake.stats()
        assert (stats.connections_total, stats.auth_attempts, stats.auth_failures) == (1, 1, 0)


@async_test
async def test_refused_auth_raises_authentication_error() -> None:
    with FakeSFeedServer(expected_auth="right-sid") as fake:
        ws = new_client(fake, auth="wrong-sid")
        with pytest.raises(AuthenticationError):
            await ws.connect()
        assert fake.stats().auth_failures == 1


# -- data ---------------------------------------------------------------------


@async_test
async def test_touch_line_tick_arrives_with_exact_prices_and_quantities(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])
        assert fake.subscriptions() == {1: frozenset({("nse_cm", "2885")})}
        assert fake.stats().subscribe_requests == 1

        fake.push_tick(
            "nse_cm", "2885", ltp=2950.45, open=2921.0, high=2961.9, low=2915.05, close=2900.0,
            volume=1_234_567, last_trade_qty=25, avg_price=2940.12, total_buy_qty=40_000,
            total_sell_qty=35_500, upper_circuit=3190.0, lower_circuit=2610.0,
            bids=(DepthRow(2950.40, 120, 3),), asks=(DepthRow(2950.50, 80, 2),),
        )
        await eventually(lambda: rec.of(SFeedScrip, "2885"), what="RELIANCE touch line")

        [tick] = rec.of(SFeedScrip, "2885")
        assert tick.exchange_segment == "nse_cm"
        assert tick.trading_symbol == "RELIANCE-EQ"
        assert tick.level == 4
        assert tick.last_traded_price == 2950.45
        assert (tick.open_price, tick.high_price, tick.low_price, tick.close_price) == (
            2921.0, 2961.9, 2915.05, 2900.0)
        assert tick.average_trade_price == 2940.12
        assert tick.volume_traded_today == 1_234_567
        assert tick.last_trade_qty == 25
        assert (tick.total_buy_quantity, tick.total_sell_quantity) == (40_000, 35_500)
        assert (tick.upper_circuit_limit, tick.lower_circuit_limit) == (3190.0, 2610.0)
        assert tick.net_change == 50.45
        assert tick.net_change_percent == 1.74
        assert tick.last_trade_time == FIXED_NOW
        assert [(b.price, b.quantity, b.orders) for b in tick.buy] == [(2950.40, 120, 3)]
        assert [(a.price, a.quantity, a.orders) for a in tick.sell] == [(2950.50, 80, 2)]


@async_test
async def test_scrips_lite_delivers_a_mini_touch_line(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips_lite([TCS])
        fake.push_tick("nse_cm", "11536", ltp=4012.3, last_trade_qty=7, close=4000.0)
        await eventually(lambda: rec.of(SFeedScripLite, "11536"))

        [lite] = rec.of(SFeedScripLite, "11536")
        assert (lite.trading_symbol, lite.last_traded_price, lite.last_trade_qty) == ("TCS-EQ", 4012.3, 7)
        assert (lite.close_price, lite.net_change) == (4000.0, 12.3)


@async_test
async def test_index_subscribed_by_name_streams_under_its_numeric_token(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_index([NIFTY])
        assert fake.subscribed_keys() == {("nse_cm", "Nifty 50")}

        fake.push_index("nse_cm", "Nifty 50", value=22512.35, open=22450.0, high=22530.0,
                        low=22440.1, close=22400.0)
        await eventually(lambda: rec.of(SFeedIndex, "26000"))

        [index] = rec.of(SFeedIndex, "26000")
        assert (index.name, index.trading_symbol) == ("Nifty 50", "Nifty 50")
        assert index.last_traded_price == 22512.35
        assert (index.open_price, index.high_price, index.low_price, index.close_price) == (
            22450.0, 22530.0, 22440.1, 22400.0)
        assert index.change == 112.35
        assert index.net_change_percent == 0.5


@async_test
async def test_depth_subscription_delivers_five_levels_a_side(fake: FakeSFeedServer) -> None:
    bids = tuple(DepthRow(1500.0 - 0.05 * i, 100 * (i + 1), i + 1) for i in range(5))
    asks = tuple(DepthRow(1500.05 + 0.05 * i, 50 * (i + 1), i + 1) for i in range(5))
    async with connected(fake) as (ws, rec):
        await ws.subscribe_depth([INFY])
        fake.push_tick("nse_cm", "1594", ltp=1500.0, bids=bids, asks=asks)
        await eventually(lambda: rec.of(SFeedScrip, "1594"))

        [book] = rec.of(SFeedScrip, "1594")
        assert book.level == 8
        assert [(b.price, b.quantity) for b in book.buy] == [
            (1500.0, 100), (1499.95, 200), (1499.9, 300), (1499.85, 400), (1499.8, 500)]
        assert [(a.price, a.quantity) for a in book.sell] == [
            (1500.05, 50), (1500.1, 100), (1500.15, 150), (1500.2, 200), (1500.25, 250)]


@async_test
async def test_one_binary_frame_carries_a_batch_of_packets(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE, TCS, INFY])
        frames_before = rec.raw_binary_frames

        fake.push_ticks([
            ("nse_cm", "2885", {"ltp": 2950.0}),
            ("nse_cm", "11536", {"ltp": 4010.0}),
            ("nse_cm", "1594", {"ltp": 1500.0}),
        ])
        await eventually(lambda: len(rec.messages) == 3)

        assert rec.raw_binary_frames == frames_before + 1
        assert sorted((m.instrument_token, m.last_traded_price) for m in rec.messages) == [
            ("11536", 4010.0), ("1594", 1500.0), ("2885", 2950.0)]


@async_test
async def test_subscribe_sends_the_last_known_state_as_a_snapshot(fake: FakeSFeedServer) -> None:
    assert fake.push_tick("nse_cm", "2885", ltp=2949.0, volume=10) == 0  # nobody listening yet
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])
        await eventually(lambda: rec.of(SFeedScrip, "2885"))
        [snapshot] = rec.of(SFeedScrip, "2885")
        assert (snapshot.last_traded_price, snapshot.volume_traded_today) == (2949.0, 10)


@async_test
async def test_unsubscribe_removes_the_key_on_the_server(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, _rec):
        await ws.subscribe_scrips([RELIANCE, TCS])
        await ws.unsubscribe_scrips([RELIANCE])
        await eventually(lambda: fake.subscribed_keys() == {("nse_cm", "11536")})

        assert fake.stats().unsubscribe_requests == 1
        assert "nse_cm|2885" not in ws.trading_symbols
        assert ws.subscription_count == 1


@async_test
async def test_market_status_reaches_exchange_subscribers(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])
        await ws.subscribe_exchange()
        await eventually(lambda: any(f.get("event") == "subscribeExchange" for f in fake.control_frames))

        fake.push_market_status("nse_cm", 1)
        fake.push_market_open_close("nse_cm", is_open=False)
        await eventually(lambda: len([m for m in rec.messages if isinstance(m, SFeedMarketStatus)]) == 2)

        statuses = [(m.exchange_segment, m.status_code, m.status)
                    for m in rec.messages if isinstance(m, SFeedMarketStatus)]
        assert statuses == [("nse_cm", 1, "Market open"), ("nse_cm", 2, "Market closed")]


# -- faults ---------------------------------------------------------------------


@async_test
async def test_garbage_frames_do_not_kill_the_client(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])

        assert fake.send_garbage_binary() == 1
        assert fake.send_garbage_text() == 1
        fake.push_tick("nse_cm", "2885", ltp=2951.0)
        await eventually(lambda: rec.of(SFeedScrip, "2885"))

        assert ws.is_connected
        assert fake.stats().connections_total == 1
        assert rec.errors, "truncated packets are reported through on_error"
        # The SDK does not validate values: one garbage packet decodes into a scrip for
        # token "0" at price 0.0. Consumers must drop unsubscribed tokens and bad prices.
        assert [m.last_traded_price for m in rec.of(SFeedScrip, "0")] == [0.0]


@async_test
async def test_abrupt_drop_is_observable_and_sdk_stays_down_when_reconnect_disabled(
    fake: FakeSFeedServer,
) -> None:
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])
        consumer = asyncio.create_task(collect(ws))
        fake.push_tick("nse_cm", "2885", ltp=2950.0)
        await eventually(lambda: rec.of(SFeedScrip, "2885"))

        assert fake.drop_all() == 1
        await eventually(lambda: rec.disconnects == 1, what="on_disconnect")

        assert not ws.is_connected
        # `async for` ends by itself (within about 1 s) once the SDK has given up ...
        streamed = await asyncio.wait_for(consumer, timeout=5)
        assert [m.last_traded_price for m in streamed] == [2950.0]
        # ... and a new iteration refuses to start rather than waiting.
        with pytest.raises(NotConnectedError):
            await anext(aiter(ws))
        stats = fake.stats()
        assert (stats.connections_active, stats.connections_total) == (0, 1)


@async_test
async def test_sdk_own_reconnect_resends_subscriptions_when_enabled(fake: FakeSFeedServer) -> None:
    async with connected(fake, max_reconnect_attempts=3) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])

        fake.drop_all(code=1001, reason="going away")
        await eventually(lambda: fake.stats().connections_total == 2 and fake.subscriptions() == {
            2: frozenset({("nse_cm", "2885")})}, what="SDK reconnected and resubscribed")

        fake.push_tick("nse_cm", "2885", ltp=2952.5)
        await eventually(lambda: rec.of(SFeedScrip, "2885"))
        assert (rec.connects, rec.disconnects) == (2, 1)
        assert fake.stats().auth_attempts == 2


@async_test
async def test_silence_keeps_tcp_open_and_stops_pongs(fake: FakeSFeedServer) -> None:
    async with connected(fake) as (ws, rec), raw_connect(fake.url, ping_interval=None) as probe:
        await ws.subscribe_scrips([RELIANCE])

        fake.go_silent()
        pong = await probe.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), timeout=0.3)
        assert fake.push_tick("nse_cm", "2885", ltp=2953.0) == 0
        assert ws.is_connected
        assert fake.connection_count == 2
        assert fake.stats().silent

        fake.resume()
        await asyncio.wait_for(pong, timeout=5)  # the queued ping is answered now
        fake.push_tick("nse_cm", "2885", ltp=2954.0)
        await eventually(lambda: rec.of(SFeedScrip, "2885"))
        assert [m.last_traded_price for m in rec.of(SFeedScrip, "2885")] == [2954.0]


@async_test
async def test_a_silent_connection_can_be_replaced_without_waiting_for_its_close(
    fake: FakeSFeedServer,
) -> None:
    old = new_client(fake)
    await old.connect()
    await old.subscribe_scrips([RELIANCE])
    fake.go_silent(connection_ids=[1])

    # What our watchdog does: detach, close in the background, open a fresh client.
    detach(old)
    closing = asyncio.create_task(old.close())
    async with connected(fake) as (ws, rec):
        await ws.subscribe_scrips([RELIANCE])
        fake.push_tick("nse_cm", "2885", ltp=2955.0)
        await eventually(lambda: rec.of(SFeedScrip, "2885"))
        assert not closing.done(), "close() of a silent socket waits for the close timeout"

    fake.resume()
    await asyncio.wait_for(closing, timeout=15)


# -- process mode ----------------------------------------------------------------


@pytest.fixture
def fake_process() -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.sfeed_server", "--port", "0", "--control-port", "0",
         "--rate", "20"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "SFEED_FAKE_READY", ready
        fields = dict(part.split("=", 1) for part in ready[1:])
        control_port = int(fields["control"].rsplit(":", 1)[1])
        yield fields["url"], control_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@async_test
async def test_process_mode_streams_a_random_walk_and_obeys_the_control_port(
    fake_process: tuple[str, int],
) -> None:
    url, control_port = fake_process
    ws = SFeedWebSocket(url=url, max_reconnect_attempts=0, max_connect_retries=0)
    rec = Recorder()
    rec.attach(ws)
    await ws.connect()
    try:
        await ws.subscribe_scrips([RELIANCE])
        await ws.subscribe_index([NIFTY])
        await eventually(lambda: len(rec.of(SFeedScrip, "2885")) >= 3 and rec.of(SFeedIndex, "26000"))

        volumes = [m.volume_traded_today for m in rec.of(SFeedScrip, "2885")]
        assert volumes == sorted(volumes) and all(m.last_traded_price > 0 for m in rec.messages)
        status = await asyncio.to_thread(control, "127.0.0.1", control_port, "status")
        assert status["subscriptions"] == {"1": ["nse_cm|2885", "nse_cm|Nifty 50"]}

        reply = await asyncio.to_thread(control, "127.0.0.1", control_port, "tick nse_cm 2885 3001.25 999999")
        assert reply == {"ok": True, "sent_to": 1}
        await eventually(lambda: any(m.last_traded_price == 3001.25 for m in rec.of(SFeedScrip, "2885")))

        assert (await asyncio.to_thread(control, "127.0.0.1", control_port, "silence"))["ok"]
        status = await asyncio.to_thread(control, "127.0.0.1", control_port, "status")
        assert status["stats"]["silent"] is True
        assert (await asyncio.to_thread(control, "127.0.0.1", control_port, "resume"))["ok"]

        reply = await asyncio.to_thread(control, "127.0.0.1", control_port, "drop")
        assert reply == {"ok": True, "dropped": 1}
        await eventually(lambda: rec.disconnects == 1)
        assert not ws.is_connected
    finally:
        detach(ws)
        await ws.close()
