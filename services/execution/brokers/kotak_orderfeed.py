"""Kotak's order feed (``NeoAPI.create_order_feed()``, the ``/realtime`` websocket) for ``KotakBroker``.

The SDK's ``OrderFeedWebSocket`` is pure asyncio: it runs on its own event loop in one daemon
thread ("orderfeed"), like the market feed's SFeed client. What comes in crosses to the broker
as plain order-row dicts in a bounded deque; ``wake`` (set by execution) is called after each
batch so the broker's ``drain_events()`` runs at once instead of at the next poll.

Decisions (facts in docs/kotak-rest.md "Order feed"):

* **Own parsing.** Frames are read from ``on_raw`` with our own ``json.loads``: the SDK's strict
  pydantic models turn a whole frame into a raw dict for one odd field type, and they drop the
  connect answer (``type: cn``) -- so an auth refusal (``"ak": "nk"``) is only visible raw. The
  SDK's own queue (unbounded, filled whatever the callbacks do) is emptied by an ``async for``
  that discards what it reads.
* **LIVE only when proven.** A connection counts as LIVE after the server's ``cn`` ack or its
  first order/position frame. The SDK does not wait for an ack; a socket without one for
  ``ACK_WAIT_S`` stays DOWN (polling at the old rate) and says so.
* **Own reconnects, bounded.** The SDK's reconnect is off (``max_reconnect_attempts=0``,
  ``max_connect_retries=0``): its counter resets on every socket open, so a server that
  accepts and closes would be retried forever. After a drop, a fresh client connects after a
  doubling delay (``RECONNECT_S``); ``MAX_FAILURES`` connections in a row that never became
  LIVE (or each stayed LIVE less than ``STABLE_S``), or one refused authentication, stop it
  until the next login (``open()``).
* **Half-open sockets.** websockets pings every ``PING_S``; our own check also pings and
  closes a connection whose pong takes longer than ``PONG_WAIT_S``, so a silent peer is
  noticed within about 5 s (the SDK cannot shorten websockets' 20 s ping timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LIVE, DOWN, POLLING = "LIVE", "DOWN", "polling"
ACK_WAIT_S = 3.0
RECONNECT_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
MAX_FAILURES = 12  # about 3 minutes of attempts
STABLE_S = 30.0  # a connection LIVE for less than this before it dropped counts as a failure
PING_S = 2.0
PONG_WAIT_S = 2.5
QUEUE_MAX = 20_000  # rows waiting for drain_events; past this the books are read instead
MAX_FRAME_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame from the feed. ``kind``: ``order`` / ``position`` (``row`` is its ``data``),
    ``ack`` (the connect answer), ``refused`` (``"ak": "nk"``; ``text`` is the message),
    ``other`` (JSON we do not use) or ``bad`` (not JSON, or an order without an order number)."""

    kind: str
    row: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def parse_frame(raw: str | bytes | bytearray) -> Frame:
    """Read one frame as Kotak sends it (JSON text; binary frames are UTF-8 text too)."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return Frame("bad", text="binary frame that is not UTF-8")
    if len(raw) > MAX_FRAME_CHARS:
        return Frame("bad", text=f"frame of {len(raw)} characters")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return Frame("bad", text=_short(raw))
    if not isinstance(msg, dict):
        return Frame("bad", text=_short(raw))
    kind = str(msg.get("type") or "")
    ak = str(msg.get("ak") or "").lower()
    if ak == "nk":
        return Frame("refused", text=str(msg.get("msg") or msg.get("type") or "refused"), row=msg)
    if kind == "cn" or ak == "ok":
        return Frame("ack", text=str(msg.get("msg") or ""))
    data = msg.get("data")
    if kind in {"order", "position"}:
        if isinstance(data, str):  # some gateways double-encode
            with contextlib.suppress(ValueError, RecursionError):
                data = json.loads(data)
        if not isinstance(data, dict):
            return Frame("bad", text=f"{kind} frame without a data object")
        if kind == "order" and not str(data.get("nOrdNo") or "").strip():
            return Frame("bad", text="order frame without nOrdNo")
        return Frame(kind, row=data)
    return Frame("other", row=msg, text=_short(raw))


def _short(text: str) -> str:
    return text[:200].replace("\x00", "")


def realtime_url(explicit: str, order_feed_url: str, rt_url: str, base_url: str) -> str:
    """The order feed's URL, in the SDK's own precedence (an explicit URL first, then the dynamic
    config's, then the login reply's ``rtUrl``, then ``baseUrl`` with the path ``/realtime``).
    "" when none is known: the SDK would then use its built-in host, which we never do."""
    for url in (explicit, order_feed_url, rt_url):
        if url:
            return _ws_scheme(url)
    if base_url and "://" in base_url:
        parts = urlsplit(base_url)
        scheme = "ws" if parts.scheme in {"http", "ws"} else "wss"
        return urlunsplit((scheme, parts.netloc, "/realtime", "", ""))
    return ""


def _ws_scheme(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    return url


class FeedHealth:
    """The order feed's state machine (no I/O; ``now`` is a monotonic clock in seconds).

    ``state``: LIVE (connected and proven), DOWN (wanted but not LIVE: polling at the old rate
    while it reconnects), POLLING (off: never opened, logged out, refused, or given up until
    the next login). ``note`` says why it is not LIVE."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.state = POLLING
        self.note = "order feed not opened yet"
        self.failures = 0  # connections in a row that never became LIVE
        self.flaps = 0  # LIVE periods in a row shorter than STABLE_S
        self.session_refused = False  # the server refused this login's session
        self.reconnects = 0
        self.frames = 0
        self.bad_frames = 0
        self.opened_at = 0.0
        self.live_since = 0.0
        self.wanted = False

    def want(self) -> None:
        """A login: (re)start from scratch."""
        self.wanted, self.failures, self.flaps, self.session_refused = True, 0, 0, False
        self._down("connecting")

    def stop(self, note: str) -> None:
        self.wanted = False
        self.state, self.note, self.live_since = POLLING, note, 0.0

    def socket_open(self) -> None:
        self.opened_at = self.now()
        if self.state != LIVE:
            self.note = "connected; waiting for the feed's ack"

    def on_frame(self, frame: Frame) -> None:
        self.frames += 1
        if frame.kind == "bad":
            self.bad_frames += 1
        elif frame.kind in {"ack", "order", "position"} and self.wanted and self.state != LIVE:
            self.state, self.note, self.failures = LIVE, "", 0
            self.live_since = self.now()

    def refused(self, why: str) -> None:
        """The server refused our session (``"ak": "nk"`` on connect): no retry before a login."""
        self.stop(f"order feed refused the session ({why}); polling until the next login")
        self.session_refused = True

    def check_ack(self) -> bool:
        """True when an open socket has gone ``ACK_WAIT_S`` without an ack or any order frame."""
        late = self.state == DOWN and self.opened_at and self.now() - self.opened_at >= ACK_WAIT_S
        if late and "no ack" not in self.note:
            self.note = f"connected but no ack from the feed in {ACK_WAIT_S:.0f} s; polling"
            return True
        return False

    def lost(self, why: str) -> float | None:
        """The connection is gone. Returns the delay before the next attempt, or None when it
        gives up (``MAX_FAILURES`` connections in a row that never became LIVE, or that each were
        LIVE for less than ``STABLE_S``: a server that acks and closes at once is not retried
        every half second forever)."""
        self.opened_at = 0.0
        if not self.wanted:
            return None
        if self.state != LIVE:
            self.failures += 1
        elif self.now() - self.live_since >= STABLE_S:
            self.flaps = 0
        else:
            self.flaps += 1
        tries = max(self.failures, self.flaps)
        if tries >= MAX_FAILURES:
            self.stop(f"order feed gave up after {tries} failed connections ({why}); "
                      "polling until the next login")  # fmt: skip
            return None
        self.reconnects += 1
        self._down(why)
        return RECONNECT_S[min(tries, len(RECONNECT_S) - 1)]

    def _down(self, why: str) -> None:
        self.state, self.note, self.live_since = DOWN, why, 0.0


class FeedAnnouncer:
    """When to tell the trader about the feed: ``down`` once it has not been LIVE for
    ``hold_s`` after having been LIVE, ``back`` once it has been LIVE for ``hold_s`` after a down
    alert, and never a second down alert within ``quiet_s`` of the last one (a flapping feed
    gives one pair, not a storm). No I/O: ``step`` returns the alert to send, or None."""

    def __init__(self, hold_s: float = 3.0, quiet_s: float = 300.0) -> None:
        self.hold_s, self.quiet_s = hold_s, quiet_s
        self.was_live = False
        self.announced_down = False
        self._since = 0.0  # when the state last changed between LIVE and not LIVE
        self._live = False
        self._down_at = -1e18

    def step(self, live: bool, now: float) -> str | None:
        if live != self._live:
            self._live, self._since = live, now
        held = now - self._since >= self.hold_s
        if live:
            self.was_live = True
            if self.announced_down and held:
                self.announced_down = False
                return "back"
            return None
        if self.was_live and not self.announced_down and held and now - self._down_at >= self.quiet_s:
            self.announced_down, self._down_at = True, now
            return "down"
        return None


class OrderFeed:
    """The SDK's order feed on its own loop and thread. Thread-safe: ``open``/``stop``/``take``
    from any thread; the SDK objects are only touched on the feed thread."""

    def __init__(self, log: Any, *, ping_s: float = PING_S, pong_wait_s: float = PONG_WAIT_S) -> None:
        self.log = log
        self.health = FeedHealth()
        self.wake: Callable[[], None] | None = None
        self.ping_s, self.pong_wait_s = ping_s, pong_wait_s
        self._lock = threading.Lock()
        self._rows: deque[dict[str, Any]] = deque()
        self._overflow = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gen = 0  # connection generation (feed thread); events from older ones are ignored
        self._feed: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._factory: Callable[[], Any] | None = None

    # ---------------------------------------------------------------- any thread

    @property
    def live(self) -> bool:
        return self.health.state == LIVE

    def status(self) -> dict[str, Any]:
        h = self.health
        return {"state": h.state, "note": h.note, "reconnects": h.reconnects, "frames": h.frames,
                "bad_frames": h.bad_frames}  # fmt: skip

    def open(self, factory: Callable[[], Any]) -> None:
        """Connect (again) with a new session: ``factory`` builds the SDK client (it is called on
        the feed thread). Replaces any connection and clears a give-up."""
        self._ensure_thread()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._open, factory)

    def stop(self, note: str) -> None:
        """Close the connection; polling only until the next ``open``."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stop, note)

    def take(self) -> tuple[list[dict[str, Any]], bool]:
        """The order rows received since the last call (oldest first), and whether some were
        dropped (the queue was full): then the caller reads the books instead."""
        with self._lock:
            rows, lost = list(self._rows), self._overflow
            self._rows.clear()
            self._overflow = False
        return rows, lost

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._a_close_all(), loop)
        with contextlib.suppress(Exception):
            fut.result(timeout=3.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=3.0)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._run, name="orderfeed", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # ---------------------------------------------------------------- feed thread

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _open(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self.health.want()
        self._gen += 1
        self._detach()
        self._spawn(self._connect(self._gen))

    def _stop(self, note: str) -> None:
        self._gen += 1
        self._factory = None
        self.health.stop(note)
        self._detach()
        self.log.info("kotak_order_feed_stopped", note=note)

    def _detach(self) -> None:
        old, self._feed = self._feed, None
        if old is not None:
            old.on_raw = old.on_disconnect = old.on_error = None
            self._spawn(self._quiet_close(old))

    @staticmethod
    async def _quiet_close(feed: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed.close(), 12.0)

    async def _connect(self, gen: int) -> None:
        factory = self._factory
        if factory is None or gen != self._gen:
            return
        try:
            feed = factory()
        except Exception as exc:  # noqa: BLE001 - no URL / no session: polling, one line
            self.health.stop(f"order feed not opened: {exc}")
            self.log.warning("kotak_order_feed_unavailable", error=str(exc))
            return
        feed.on_raw = lambda raw: self._on_raw(gen, raw)
        feed.on_disconnect = lambda: self._on_disconnect(gen)
        self._feed = feed
        try:
            await feed.connect()
        except Exception as exc:  # noqa: BLE001 - the SDK raises ConnectionError / AuthenticationError
            if gen == self._gen:
                self._lost(gen, f"connect failed: {type(exc).__name__}: {exc}")
            return
        if gen != self._gen:  # a new session or a stop came meanwhile
            self._spawn(self._quiet_close(feed))
            return
        self.health.socket_open()
        self.log.info("kotak_order_feed_connected", url=getattr(feed, "url", ""))
        self._spawn(self._drain_sdk_queue(feed))
        self._spawn(self._watch(gen, feed))

    async def _drain_sdk_queue(self, feed: Any) -> None:
        """Empty the SDK's unbounded queue (we read ``on_raw``); ends with the connection."""
        with contextlib.suppress(Exception):
            async for _ in feed:
                pass

    async def _watch(self, gen: int, feed: Any) -> None:
        """While this connection is current: the ack deadline, and a ping that must be answered
        within ``pong_wait_s`` (a half-open socket is otherwise seen only after 20 s or more)."""
        while gen == self._gen:
            await asyncio.sleep(self.ping_s)
            if gen != self._gen:
                return
            if self.health.check_ack():
                self.log.warning("kotak_order_feed_no_ack", wait_s=ACK_WAIT_S)
            ws = getattr(feed, "_ws", None)
            if ws is None:
                continue
            try:
                pong = await ws.ping()
                await asyncio.wait_for(pong, self.pong_wait_s)
            except Exception as exc:  # noqa: BLE001 - timeout or closed: the connection is gone
                if gen == self._gen:
                    self.log.warning("kotak_order_feed_silent", error=type(exc).__name__)
                    self._lost(gen, "no pong from the feed")
                return

    def _on_raw(self, gen: int, raw: Any) -> None:
        if gen != self._gen:
            return
        frame = parse_frame(raw)
        was_live = self.live
        self.health.on_frame(frame)
        if frame.kind == "refused" and frame.row.get("type") == "cn":
            self.log.error("kotak_order_feed_refused", reason=frame.text)
            self._gen += 1
            self.health.refused(frame.text)
            self._detach()
            self._wake()
            return
        if frame.kind == "bad":
            n = self.health.bad_frames  # the first few, then every 100th: a broken gateway is no log storm
            if n <= 3 or n % 100 == 0:
                self.log.warning("kotak_order_feed_bad_frame", why=frame.text, bad_frames=n)
        elif frame.kind == "refused":
            self.log.warning("kotak_order_feed_error_frame", msg=frame.text)
        if not was_live and self.live:
            self.log.info("kotak_order_feed_live")
        if frame.kind == "order":
            with self._lock:
                if len(self._rows) >= QUEUE_MAX:
                    self._rows.popleft()
                    self._overflow = True
                self._rows.append(frame.row)
            self._wake()
        elif not was_live and self.live:
            self._wake()

    def _wake(self) -> None:
        wake = self.wake
        if wake is not None:
            with contextlib.suppress(Exception):
                wake()

    def _on_disconnect(self, gen: int) -> None:
        if gen == self._gen:
            self._lost(gen, "connection closed")

    def _lost(self, gen: int, why: str) -> None:
        self._gen += 1
        was_live = self.live
        delay = self.health.lost(why)
        self._detach()
        self.log.warning("kotak_order_feed_down", reason=why, retry_in_s=delay, was_live=was_live)
        self._wake()  # polling takes over now
        if delay is not None:
            self._spawn(self._reconnect_after(self._gen, delay))

    async def _reconnect_after(self, gen: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if gen == self._gen:
            await self._connect(gen)

    async def _a_close_all(self) -> None:
        self._gen += 1
        self.health.stop("closed")
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.on_raw = feed.on_disconnect = feed.on_error = None
            await self._quiet_close(feed)
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for task in rest:
            task.cancel()
        await asyncio.wait(rest, timeout=2.0) if rest else None


__all__ = ["DOWN", "LIVE", "POLLING", "FeedAnnouncer", "FeedHealth", "Frame", "OrderFeed", "parse_frame",
           "realtime_url"]  # fmt: skip
