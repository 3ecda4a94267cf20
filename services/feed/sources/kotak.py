"""Live market data from Kotak SFeed, through the SDK's own ``SFeedWebSocket``.

Threads: the SDK is pure asyncio, so it runs on its own event loop in one daemon thread
("sfeed"). Everything else — the connection state machine, the watchdog, publishing —
runs in the feed's reactor. The SDK thread converts each message to a ``Tick`` and queues
it; the first tick queued after a drain schedules one ``call_soon_threadsafe``, so ticks
cross threads in batches. SDK objects are only touched on the SDK thread.

Connections (docs/kotak-sfeed.md §5-7): the SDK's own reconnect is switched off
(``max_reconnect_attempts=0``, ``max_connect_retries=0``); every connection is a fresh
client. Three signals mean "this connection is gone": ``on_disconnect`` (a drop), the
``async for`` loop ending, and the watchdog (no frame for ``feed.watchdog_s`` while the
market is open). Each leads to the same path: detach the old client and close it in the
background (a silent peer makes ``close()`` wait 10 s), wait an exponential backoff with
jitter (tenacity), fetch a fresh lease, connect, and subscribe the whole union again.

States published as ``FeedStatus``: CONNECTING (first attempt), LIVE, STALE (watchdog
fired), RECONNECTING (waiting/trying after a loss), DOWN (more than three attempts in a
row failed; it keeps trying, with the backoff capped at ``feed.reconnect_max_s``).

Credentials: ``kotak.feed_user`` + ``kotak.feed_auth`` when both are set, otherwise a lease
from execution (``GetFeedSession`` → ``{"url", "user", "auth"}``), asked again before every
reconnect so an expired session is replaced. ``kotak.sfeed_url`` overrides the URL. Execution
announces every login on ``session.execution.``; one newer than the lease in use (the daily
login at ``kotak.login_at``, a re-login) makes the feed reconnect at once on a fresh lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from libs.common.bus import AsyncClient
from libs.common.config import ConfigError
from libs.common.instruments import Instrument
from libs.common.messages import Alert, GetFeedSession, Message, Reply, Tick
from services.feed.sources import CONNECTING, DOWN, LIVE, RECONNECTING, STALE, FeedSink, Source
from services.feed.watchdog import Backoff, MarketHours, Watchdog

CANARY_KEY = "nse_cm|Nifty 50"  # always moves in market hours: a healthy feed is never silent
CONNECT_TIMEOUT_S = 20.0
DOWN_AFTER_FAILURES = 3

# Packet header: length u16, code u16, exchange i8, level u8, auction u8, seq u8, bitmask u8.
_HDR = struct.Struct("<HHbBBBB")
_MIN_SIZE_BY_CODE = {6511: 9, 6521: 9, 7207: 87, 105: 16, 104: 33}
_MIN_SIZE_BY_LEVEL = {1: 54, 2: 144, 4: 144, 8: 144, 16: 144}
_ACK = 1109


def _skip_package_init() -> None:
    """Load only the SDK's websocket-feed modules, not its package ``__init__``.

    ``import neo_api_client`` pulls in the REST client, httpx and pandas (1.3 s and ~55 MB
    here) that the feed never uses; with them the feed would miss the 80 MB idle budget
    of the feed process. A bare package module with the real ``__path__`` lets
    ``neo_api_client.websocket.feed`` import as usual (its own imports are the logger and two
    URL helpers). Skipped when the real package is already loaded in this process.
    """
    import importlib.util
    import sys
    import types

    if "neo_api_client" in sys.modules:
        return
    spec = importlib.util.find_spec("neo_api_client")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("neo_api_client")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["neo_api_client"] = pkg


class _SDK:
    """The SDK pieces we use, imported once with its logging side effects undone."""

    def __init__(self) -> None:
        import structlog

        # The same guard as libs.common.sdk.import_sdk() (docs/interfaces.md), without the package
        # __init__ that import_sdk() runs: see _skip_package_init.
        os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")  # else it opens ./logs/...
        os.environ.setdefault("NEO_LOG_LEVEL", "WARNING")
        saved = structlog.get_config()
        _skip_package_init()
        from neo_api_client.utils import urls
        from neo_api_client.websocket.feed import client as client_mod
        from neo_api_client.websocket.feed import exceptions, protocol
        from neo_api_client.websocket.feed.models import WsToken

        structlog.configure(**saved)  # importing the SDK replaced our structlog config
        sdk_log = logging.getLogger("neo_api_client")
        for h in list(sdk_log.handlers):  # its stdout handler: SDK warnings go to our files
            sdk_log.removeHandler(h)
        sdk_log.propagate = True
        sdk_log.setLevel(logging.WARNING)
        # The client logs every message at INFO; a filtering logger drops that before any
        # processor runs (with a plain stdlib-bound logger the chain runs per tick).
        client_mod.logger = structlog.wrap_logger(
            logging.getLogger("neo_api_client.websocket.feed.client"),
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )
        self.SFeedWebSocket = client_mod.SFeedWebSocket
        self.WsToken = WsToken
        self.split_batch = protocol.split_batch
        self.NotConnectedError = exceptions.NotConnectedError
        self.default_url = urls.SFEED_WEBSOCKET_URL


class KotakSource(Source):
    name = "kotak"

    def __init__(self, sink: FeedSink) -> None:
        super().__init__(sink)
        cfg = sink.cfg
        k = cfg.kotak
        if bool(k.feed_user) != bool(k.feed_auth):
            raise ConfigError("config error: `kotak.feed_user` and `kotak.feed_auth` must be set together")
        self.sdk = _SDK()
        self.feed = cfg.feed
        self.watchdog = Watchdog(cfg.feed.watchdog_s, MarketHours.from_config(cfg.feed), sink.clock)
        self.backoff = Backoff(cfg.feed.reconnect_min_s, cfg.feed.reconnect_max_s)
        self.log = sink.log
        self.reactor = sink.reactor
        # reactor-owned state
        self.wanted: dict[str, Instrument] = {}
        self.subscribed: set[str] = set()
        self.gen = 0  # connection generation; events from older ones are ignored
        self.live_gen = 0  # the generation that is connected, 0 when none
        self.connected_at = 0.0
        self.failures = 0  # consecutive
        self.reconnects = 0
        self.last_error = ""
        self.lease: dict[str, str] | None = None
        self.lease_client: AsyncClient | None = None
        self.market_status: dict[str, str] = {}
        self._timers: list[int] = []
        self._retry_timer: int | None = None
        self.stopped = False
        # routing: written by the reactor, read by the SDK thread (dict.get is atomic)
        self.router = TickRouter()
        self.canary = sink.master.by_key.get(CANARY_KEY)
        # SDK-thread state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="sfeed", daemon=True)
        self._clients: dict[int, Any] = {}
        self._consumers: dict[int, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # SDK thread → reactor
        self._queue: deque[Tick] = deque()
        self._drain_scheduled = False
        # counters (incremented on the SDK thread)
        self.frames = 0
        self.messages = 0
        self.garbage_frames = 0
        self.bad_packets = 0
        self.decode_errors = 0
        self.dropped = 0

    # ================================================================= reactor side
    def start(self, instruments: list[Instrument]) -> None:
        self.thread.start()
        self._add(instruments)
        check = min(0.5, self.feed.watchdog_s / 4)
        self._timers.append(self.reactor.call_every(check, self._check))
        self.sink.set_state(CONNECTING, f"connecting to SFeed ({len(self.wanted)} instruments)")
        if not self.sink.cfg.kotak.feed_user:  # leased from execution: follow its logins
            self.sink.subscribe([self.sink.cfg.bus.endpoint("execution_pub")], [b"session."], self._on_login)
        self._connect()

    def _on_login(self, _topic: bytes, msg: Any) -> None:
        """Execution logged in (``session.execution.``, an Alert stamped with the login's time).
        A login newer than the lease in use replaces that session: reconnect now on a fresh lease.
        While no connection is up the next attempt leases afresh anyway."""
        lease = self.lease
        if not isinstance(msg, Alert) or self.stopped or lease is None:
            return
        try:
            issued_ns = int(lease.get("issued_ns") or 0)
        except ValueError:
            issued_ns = 0
        if msg.ts_ns <= issued_ns:
            return  # the session this lease came from (or an older one)
        self.lease = None  # never fall back on the old session's lease
        gen = self.live_gen
        self.log.info("feed_session_relogin", text=msg.text, live=bool(gen))
        if not gen:
            return
        self.gen += 1  # late events from the old connection are ignored from now on
        self.live_gen = 0
        self.subscribed = set()
        self._discard(gen)
        self.sink.set_state(RECONNECTING, "execution logged in again: re-leasing the feed session")
        self._connect()

    def _add(self, instruments: list[Instrument]) -> None:
        for inst in instruments:
            self.wanted[inst.key] = inst
            self.router.add(inst)
        if self.canary is not None:
            self.router.add(self.canary)

    def _subscription_set(self) -> dict[str, Instrument]:
        subs = dict(self.wanted)
        if self.canary is not None and len(subs) < self.feed.max_subscriptions:
            subs.setdefault(self.canary.key, self.canary)
        return subs

    def add_instruments(self, instruments: list[Instrument]) -> None:
        self._add(instruments)
        if self.live_gen:
            self._subscribe_missing(self.live_gen)

    def _subscribe_missing(self, gen: int) -> None:
        missing = [i for k, i in self._subscription_set().items() if k not in self.subscribed]
        if not missing:
            return
        self.subscribed.update(i.key for i in missing)
        fut = asyncio.run_coroutine_threadsafe(self._a_subscribe(gen, missing), self.loop)
        fut.add_done_callback(lambda f: self._from_sdk(self._on_subscribed, gen, missing, f))

    def _on_subscribed(self, gen: int, insts: list[Instrument], fut: Any) -> None:
        exc = fut.exception()
        if exc is not None and gen == self.gen:
            self.subscribed.difference_update(i.key for i in insts)
            self.log.warning("sfeed_subscribe_failed", error=_describe(exc), count=len(insts))
            self._lost(gen, f"subscribe failed: {_describe(exc)}")

    def _connect(self) -> None:
        self._retry_timer = None
        if self.stopped:
            return
        self.gen += 1
        gen = self.gen
        k = self.sink.cfg.kotak
        if k.feed_user:
            self._open(gen, {"user": k.feed_user, "auth": k.feed_auth, "url": k.sfeed_url})
            return
        if self.lease_client is None:
            self.lease_client = self.sink.client(self.sink.cfg.bus.endpoint("execution_rep"))
        self.lease_client.request(GetFeedSession(requester="feed"), partial(self._on_lease, gen))

    def _on_lease(self, gen: int, reply: Message | Exception) -> None:
        if gen != self.gen or self.stopped:
            return
        if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict):
            self.lease = {str(k): str(v) for k, v in reply.data.items()}
            self._open(gen, self.lease)
            return
        why = reply.error if isinstance(reply, Reply) else _describe(reply)
        if self.lease is not None:  # execution busy or restarting: the last lease may still work
            self.log.warning("feed_session_lease_failed", error=why, using="previous lease")
            self._open(gen, self.lease)
            return
        self._failed(gen, f"no feed session from execution: {why}")

    def _open(self, gen: int, creds: dict[str, str]) -> None:
        user = creds.get("user") or creds.get("ucc") or ""
        auth = creds.get("auth") or creds.get("sid") or creds.get("edit_sid") or ""
        url = (self.sink.cfg.kotak.sfeed_url or creds.get("url") or creds.get("feed_url")
               or self.sdk.default_url)
        if not user or not auth:
            self._failed(gen, "feed session has no user/auth")
            return
        subs = list(self._subscription_set().values())
        fut = asyncio.run_coroutine_threadsafe(self._a_connect(gen, url, user, auth, subs), self.loop)
        fut.add_done_callback(lambda f: self._from_sdk(self._on_connected, gen, url, subs, f))

    def _on_connected(self, gen: int, url: str, subs: list[Instrument], fut: Any) -> None:
        exc = fut.exception()
        if gen != self.gen or self.stopped:
            if exc is None:
                self._discard(gen)
            return
        if exc is not None:
            self._failed(gen, f"connect failed: {_describe(exc)}")
            return
        self.live_gen = gen
        self.connected_at = time.monotonic()
        self.subscribed = {i.key for i in subs}
        self.watchdog.reset()
        self.sink.set_state(LIVE, f"connected to {url}, {len(subs)} subscriptions")
        self.log.info("sfeed_connected", url=url, subscriptions=len(subs), reconnects=self.reconnects)
        self._subscribe_missing(gen)  # anything requested while we were connecting

    def _lost(self, gen: int, reason: str) -> None:
        """The live connection ``gen`` is gone (drop, stopped client, failed subscribe)."""
        if gen != self.gen or self.stopped:
            return
        self._failed(gen, reason)

    def _failed(self, gen: int, reason: str) -> None:
        if gen != self.gen or self.stopped:
            return
        self.gen += 1  # late events from this connection are ignored from now on
        self.live_gen = 0
        self.subscribed = set()
        self._discard(gen)
        self.failures += 1
        self.reconnects += 1
        self.last_error = reason
        delay = self.backoff.next_delay()
        state = DOWN if self.failures > DOWN_AFTER_FAILURES else RECONNECTING
        self.log.warning("sfeed_connection_lost", reason=reason, retry_in_s=round(delay, 2),
                         failures=self.failures)
        self.sink.set_state(state, f"{reason}; retrying in {delay:.1f}s")
        self._retry_timer = self.reactor.call_later(delay, self._connect)

    def _check(self) -> None:
        """Watchdog tick: silence while the market is open means a zombie connection."""
        gen = self.live_gen
        if not gen:
            return
        if self.watchdog.is_stale():
            silent = self.watchdog.silence_s()
            self.log.warning("sfeed_stale", silent_s=round(silent, 2), watchdog_s=self.feed.watchdog_s)
            self.sink.set_state(STALE, f"no packet for {silent:.1f}s during market hours")
            self._failed(gen, f"silent for {silent:.1f}s")
            return
        healthy_for = time.monotonic() - self.connected_at
        recent = self.watchdog.silence_s() < 1.0
        if self.failures and healthy_for >= self.feed.reconnect_max_s and recent:
            self.failures = 0
            self.backoff.reset()

    def _discard(self, gen: int) -> None:
        asyncio.run_coroutine_threadsafe(self._a_discard(gen), self.loop)

    def _from_sdk(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor (called from the SDK thread)."""
        self.reactor.call_soon_threadsafe(partial(fn, *args))

    def _drain(self) -> None:
        self._drain_scheduled = False
        q = self._queue
        ticks = []
        pop = q.popleft
        while q:
            ticks.append(pop())
        if ticks:
            self.sink.publish_ticks(ticks)

    def _on_market_status(self, segment: str, status: str) -> None:
        self.market_status[segment] = status
        self.sink.publish_status(f"market status {segment}: {status}")

    def stop(self) -> None:
        self.stopped = True
        for t in self._timers:
            self.reactor.cancel(t)
        if self._retry_timer is not None:
            self.reactor.cancel(self._retry_timer)
        if self.thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._a_shutdown(), self.loop)
            with contextlib.suppress(Exception):
                fut.result(timeout=1.5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=1.0)

    def stats(self) -> dict[str, Any]:
        return {
            "connected": bool(self.live_gen), "reconnects": self.reconnects, "failures": self.failures,
            "last_error": self.last_error, "subscribed": len(self.subscribed), "frames": self.frames,
            "messages": self.messages,
            "garbage": self.garbage_frames + self.bad_packets + self.dropped + self.router.dropped,
            "garbage_frames": self.garbage_frames, "bad_packets": self.bad_packets,
            "dropped_messages": self.dropped + self.router.dropped, "decode_errors": self.decode_errors,
            "last_packet_age_s": round(self.watchdog.silence_s(), 3),
            "market_status": dict(self.market_status),
            "leased": self.lease is not None and not self.sink.cfg.kotak.feed_user,
        }

    # ================================================================= SDK thread
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _tokens(self, insts: list[Instrument]) -> tuple[list[Any], list[Any]]:
        scrips: list[Any] = []
        indices: list[Any] = []
        for i in insts:
            (indices if i.inst_type == "INDEX" else scrips).append(self.sdk.WsToken(i.segment, i.token))
        return scrips, indices

    async def _a_connect(self, gen: int, url: str, user: str, auth: str, subs: list[Instrument]) -> None:
        ws = self.sdk.SFeedWebSocket(
            url=url, user=user, auth=auth, max_reconnect_attempts=0, max_connect_retries=0,
            reconnect_delay=0, max_subscriptions=max(self.feed.max_subscriptions + 1, 3000),
        )
        ws.on_raw = partial(self._sdk_raw, gen)
        ws.on_error = self._sdk_error
        ws.on_disconnect = partial(self._sdk_disconnect, gen)
        self._clients[gen] = ws
        try:
            await asyncio.wait_for(ws.connect(), CONNECT_TIMEOUT_S)
            self._consumers[gen] = asyncio.create_task(self._a_consume(gen, ws))
            await self._a_send_subscribe(ws, subs)
            await ws.subscribe_exchange()
        except BaseException:
            await self._a_discard(gen)
            raise

    async def _a_send_subscribe(self, ws: Any, insts: list[Instrument]) -> None:
        scrips, indices = self._tokens(insts)
        if scrips:
            await ws.subscribe_scrips(scrips)
        if indices:
            await ws.subscribe_index(indices)

    async def _a_subscribe(self, gen: int, insts: list[Instrument]) -> None:
        ws = self._clients.get(gen)
        if ws is None:
            raise self.sdk.NotConnectedError("connection replaced")
        await self._a_send_subscribe(ws, insts)

    async def _a_consume(self, gen: int, ws: Any) -> None:
        """The data path: ``async for`` drains the SDK's queue (docs/kotak-sfeed.md §4)."""
        convert = self._convert
        queue = self._queue
        try:
            async for msg in ws:
                self.messages += 1
                try:
                    tick = convert(msg)
                except Exception:  # noqa: BLE001 - a bad message must not end the stream
                    self.dropped += 1
                    continue
                if tick is not None:
                    queue.append(tick)
                    if not self._drain_scheduled:
                        self._drain_scheduled = True
                        self.reactor.call_soon_threadsafe(self._drain)
        except self.sdk.NotConnectedError:
            pass
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the SDK's iterator failing ends this connection
            why = _describe(exc)
            self._from_sdk(lambda: self.log.warning("sfeed_consumer_failed", error=why))
        self._from_sdk(self._lost, gen, "feed client stopped")

    async def _a_discard(self, gen: int) -> None:
        ws = self._clients.pop(gen, None)
        task = self._consumers.pop(gen, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if ws is None:
            return
        ws.on_message = ws.on_raw = ws.on_error = ws.on_connect = ws.on_disconnect = None
        closing = asyncio.create_task(_quiet_close(ws))  # a silent peer holds close() for 10 s
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _a_shutdown(self) -> None:
        for gen in list(self._clients):
            await self._a_discard(gen)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=1.0)

    def _sdk_disconnect(self, gen: int) -> None:
        self._from_sdk(self._lost, gen, "connection dropped")

    def _sdk_error(self, exc: Exception) -> None:
        self.decode_errors += 1

    def _sdk_raw(self, gen: int, frame: str | bytes) -> None:
        """Every frame: liveness for the watchdog, and a cheap check that counts garbage."""
        self.watchdog.packet()
        self.frames += 1
        if isinstance(frame, (bytes, bytearray)):
            packets = self.sdk.split_batch(bytes(frame))
            if not packets:
                self.garbage_frames += 1
                return
            for p in packets:
                _, code, _, level, _, _, _ = _HDR.unpack_from(p, 0)
                need = _MIN_SIZE_BY_CODE.get(code) or _MIN_SIZE_BY_LEVEL.get(level)
                if need is None or len(p) < need:
                    self.bad_packets += 1
            return
        try:
            data = json.loads(frame)
        except (ValueError, TypeError):
            self.garbage_frames += 1
            return
        if not (isinstance(data, dict) and data.get("message_code") == _ACK
                and isinstance(data.get("trading_symbols"), dict)):
            self.garbage_frames += 1

    def _convert(self, m: Any) -> Tick | None:
        if m.type == "market_status":
            self._from_sdk(self._on_market_status, m.exchange_segment, m.status)
            return None
        return self.router.to_tick(m)


class TickRouter:
    """SDK feed messages → ``Tick``s for the instruments we subscribed. Pure: no sockets.

    Scrips are keyed by ``(segment, token)``; indices by ``(segment, name)``, because SFeed
    takes index subscriptions by name and streams them under a numeric token. Anything we
    did not ask for, or with no price (the SDK does not validate values), is dropped and
    counted. Prices are the SDK's floats (integer paise over the divider, correctly rounded).
    """

    def __init__(self) -> None:
        self.route: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.index_route: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.dropped = 0

    def add(self, inst: Instrument) -> None:
        target = (inst.segment, inst.token, inst.symbol)
        if inst.inst_type == "INDEX":
            self.index_route[(inst.segment, inst.token)] = target  # the master's token is the name
        else:
            self.route[(inst.segment, inst.token)] = target

    def to_tick(self, m: Any) -> Tick | None:
        kind = m.type
        if kind == "scrip":
            target = self.route.get((m.exchange_segment, m.instrument_token))
            if target is None or m.last_traded_price <= 0:
                self.dropped += 1
                return None
            bid = m.buy[0] if m.buy else None
            ask = m.sell[0] if m.sell else None
            return Tick(
                segment=target[0], token=target[1], symbol=target[2], ltp=m.last_traded_price,
                volume=m.volume_traded_today, last_qty=m.last_trade_qty,
                bid=bid.price if bid else 0.0, bid_qty=bid.quantity if bid else 0,
                ask=ask.price if ask else 0.0, ask_qty=ask.quantity if ask else 0,
                open=m.open_price, high=m.high_price, low=m.low_price, close=m.close_price,
                oi=m.open_interest, exch_ts_ns=max(m.last_trade_time, m.last_update_time) * 1_000_000_000,
            )
        if kind == "scrip_lite":
            target = self.route.get((m.exchange_segment, m.instrument_token))
            if target is None or m.last_traded_price <= 0:
                self.dropped += 1
                return None
            return Tick(segment=target[0], token=target[1], symbol=target[2], ltp=m.last_traded_price,
                        last_qty=m.last_trade_qty, close=m.close_price,
                        exch_ts_ns=m.last_trade_time * 1_000_000_000)
        if kind == "index":
            seg = m.exchange_segment
            target = self.index_route.get((seg, m.name)) or self.index_route.get((seg, m.instrument_token))
            if target is None or m.last_traded_price <= 0:
                self.dropped += 1
                return None
            return Tick(segment=target[0], token=target[1], symbol=target[2], ltp=m.last_traded_price,
                        open=m.open_price, high=m.high_price, low=m.low_price, close=m.close_price,
                        exch_ts_ns=m.last_trade_time * 1_000_000_000)
        return None  # closing-auction updates and future kinds: not ticks


async def _quiet_close(ws: Any) -> None:
    with contextlib.suppress(Exception):
        await ws.close()


def _describe(exc: BaseException | Any) -> str:
    if isinstance(exc, BaseException):
        text = str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {text}"[:300]
    return str(exc)[:300]
