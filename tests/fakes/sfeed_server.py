"""A protocol-level fake of Kotak's SFeed market-data websocket (``native_batch``).

The fake speaks the wire protocol that the SDK's own client,
``neo_api_client.websocket.feed.SFeedWebSocket``, expects, so tests drive the real
client against a local server. It is written from the wire layout alone and does
not import the SDK: if the two disagree, the integration tests fail.

Wire summary (see docs/kotak-sfeed.md for the client side):

* Control plane, JSON text frames. The client opens with an auth frame
  ``{"user", "auth", "format": "native_batch", ...}``; the server answers
  ``{"message_code": 1117, "format": "native_batch", "exchanges": {name:
  {"value": exchange_id, "divider": N}}}``. Subscribe frames look like
  ``{"event": "subscribeScrips", "inputtoken": "nse_cm|2885,nse_cm|11536",
  "ack_symbol": true}``; the server acknowledges each with
  ``{"message_code": 1109, "trading_symbols": {"nse_cm|2885": "RELIANCE-EQ"}}``.
  Unsubscribe frames carry no ack.
* Data plane, binary frames: little-endian packed packets laid end to end, each
  starting with a ``uint16`` length and a 9-byte header (length, message code,
  exchange id, level, auction flag, sequence number, bitmask length). Prices are
  integers in 1/divider rupee (paise on equity segments).

In-process use (the server runs its own event loop in a daemon thread)::

    with FakeSFeedServer() as fake:
        ws = SFeedWebSocket(url=fake.url, user="UCC", auth="SID")
        ...                                   # connect + subscribe nse_cm|2885
        fake.push_tick("nse_cm", "2885", ltp=2950.45, volume=1200, last_trade_qty=10)
        fake.go_silent(); fake.resume()
        fake.drop_all()
        fake.send_garbage_binary(); fake.send_garbage_text()
        fake.stats().auth_attempts, fake.subscriptions()

Process mode (streams a random walk for whatever is subscribed)::

    python -m tests.fakes.sfeed_server --port 0 --control-port 0 --rate 5   # default 2 Hz

It prints one line when ready, then serves until SIGTERM/SIGINT::

    SFEED_FAKE_READY url=ws://127.0.0.1:41234 control=127.0.0.1:41235

Control channel (process mode): a line-based TCP port. Send one command per line;
each gets one JSON line back, ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``.
``control(host, port, "status")`` in this module does the round trip.

=================================  ===========================================
``status``                         counters, silence flag, subscriptions
``silence [CONN_ID ...]``          stop all traffic (or only those connections'),
                                   TCP stays open
``resume``                         undo every silence
``drop``                           abort every connection (client sees 1006)
``close [CODE]``                   close every connection with a close frame (1001)
``garbage-binary [N]``             N malformed binary frames to each client
``garbage-text [N]``               N malformed text frames to each client
``tick SEG TOKEN LTP [VOLUME]``    push a scrip update
``index SEG VALUE NAME_OR_TOKEN``  push an index update (name may have spaces)
``market-status SEG CODE``         push a market-status packet (code 105)
``rate HZ``                        change the random-walk rate (0 stops it)
=================================  ===========================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, NamedTuple, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

T = TypeVar("T")
Price = float | int | Decimal

# ---------------------------------------------------------------------------
# Wire constants
# ---------------------------------------------------------------------------

MSG_AUTH_RESPONSE = 1117  # production has also been seen answering 1119
MSG_SUBSCRIBE_ACK = 1109
MSG_MARKET_STATUS = 105
MSG_MARKET_OPEN = 6511
MSG_MARKET_CLOSE = 6521
MSG_INDEX = 7207
# Scrip packets (mini touch line and market picture) are routed by the client on the
# level byte, not on the message code, so both use the market-picture code here.
MSG_MARKET_PICTURE = 7208

LEVEL_MINI_TOUCH_LINE = 1
LEVEL_TOUCH_LINE = 4
LEVEL_DEPTH = 8
LEVEL_FULL_DEPTH = 16

# name -> (exchange_id, price divider). The client reads both from the auth reply.
# The currency dividers are a guess; the real server announces its own.
DEFAULT_EXCHANGES: dict[str, tuple[int, int]] = {
    "nse_cm": (1, 100),
    "nse_fo": (2, 100),
    "cde_fo": (3, 10_000_000),
    "nse_com": (4, 100),
    "bse_cm": (5, 100),
    "bse_fo": (6, 100),
    "bse_cd": (7, 10_000_000),
    "bse_co": (8, 100),
    "mcx_fo": (9, 100),
    "ncd_co": (10, 100),
}

DEFAULT_SYMBOLS: dict[str, str] = {
    "nse_cm|2885": "RELIANCE-EQ",
    "nse_cm|11536": "TCS-EQ",
    "nse_cm|1594": "INFY-EQ",
    "nse_cm|1333": "HDFCBANK-EQ",
    "nse_cm|3045": "SBIN-EQ",
}

# (segment, index name) -> token the server streams it under.
DEFAULT_INDICES: dict[tuple[str, str], str] = {
    ("nse_cm", "Nifty 50"): "26000",
    ("nse_cm", "Nifty Bank"): "26009",
    ("bse_cm", "SENSEX"): "1",
}

# Subscribe / unsubscribe / snapshot event -> intent.
SUBSCRIBE_EVENTS: dict[str, str] = {
    "subscribeScrips": "scrips",
    "subscribeScripsLite": "scrips_lite",
    "subscribeDepth": "depth",
    "subscribeFullDepth": "full_depth",
    "subscribeIndices": "index",
}
UNSUBSCRIBE_EVENTS: dict[str, str] = {
    "unsubscribeScrips": "scrips",
    "unsubscribeScripsLite": "scrips_lite",
    "unsubscribeDepth": "depth",
    "unsubscribeFullDepth": "full_depth",
    "unsubscribeIndices": "index",
}
SNAPSHOT_EVENTS: dict[str, str] = {
    "snapshotScrips": "scrips",
    "snapshotScripsLite": "scrips_lite",
    "snapshotDepth": "depth",
    "snapshotIndices": "index",
}
INTENT_LEVEL: dict[str, int] = {
    "scrips": LEVEL_TOUCH_LINE,
    "scrips_lite": LEVEL_MINI_TOUCH_LINE,
    "depth": LEVEL_DEPTH,
    "full_depth": LEVEL_FULL_DEPTH,
}
# Depth rows carried per side at each market-picture level.
LEVEL_ROWS: dict[int, int] = {LEVEL_TOUCH_LINE: 1, LEVEL_DEPTH: 5, LEVEL_FULL_DEPTH: 20}

_HEADER = struct.Struct("<HHbBBBB")  # 9 bytes
_MINI_BODY = struct.Struct("<IqIqIiiIBI")  # 45 bytes
_MP_BODY = struct.Struct("<IqqqqqIIIIIqIIIIhiIdiIIIIIBI")  # 135 bytes, then depth rows
_DEPTH_ROW = struct.Struct("<qii")  # qty, price, orders
_INDEX_BODY = struct.Struct("<IiiiiiQiiidBi21s")  # 78 bytes
_MARKET_STATUS_BODY = struct.Struct("<H5s")

Key = tuple[str, str]  # (segment, token as the client sent it)


# ---------------------------------------------------------------------------
# Instrument state and packet encoders (pure functions)
# ---------------------------------------------------------------------------


class DepthRow(NamedTuple):
    price: Price
    quantity: int
    orders: int = 1


@dataclass(frozen=True)
class ScripState:
    """Everything one scrip packet carries. Prices in rupees, quantities in shares."""

    segment: str
    token: str
    ltp: Price = 0
    open: Price = 0
    high: Price = 0
    low: Price = 0
    close: Price = 0  # previous close; net change is computed against it
    avg_price: Price = 0
    volume: int = 0
    last_trade_qty: int = 0
    last_trade_time: int = 0  # epoch seconds
    last_update_time: int = 0  # epoch seconds
    total_buy_qty: int = 0
    total_sell_qty: int = 0
    open_interest: int = 0
    total_traded_value: Price = 0
    upper_circuit: Price = 0
    lower_circuit: Price = 0
    yearly_high: Price = 0
    yearly_low: Price = 0
    market_lot: int = 1
    precision: int = 2
    multiplier: int = 1
    auction: bool = False
    trading_status: int = 0
    bids: tuple[DepthRow, ...] = ()
    asks: tuple[DepthRow, ...] = ()


@dataclass(frozen=True)
class IndexState:
    segment: str
    token: str
    name: str
    value: Price = 0
    open: Price = 0
    high: Price = 0
    low: Price = 0
    close: Price = 0
    yearly_high: Price = 0
    yearly_low: Price = 0
    last_trade_time: int = 0
    precision: int = 2
    multiplier: int = 1


def to_wire_price(price: Price, divider: int) -> int:
    """Rupees -> integer wire units (``1234.55`` at divider 100 -> ``123455``)."""
    scaled = Decimal(str(price)) * divider
    return int(scaled.to_integral_value(rounding=ROUND_HALF_EVEN))


def _header(length: int, code: int, exchange_id: int, level: int, auction: int, seq: int) -> bytes:
    return _HEADER.pack(length, code, exchange_id, level, auction, seq & 0xFF, 0)


def _net_change(ltp: int, close: int) -> tuple[int, int]:
    """(net change in wire units, net change percent * 100)."""
    if close <= 0:
        return 0, 0
    net = ltp - close
    return net, round(net * 10_000 / close)


def encode_mini_touch_line(s: ScripState, exchange_id: int, divider: int, seq: int = 0) -> bytes:
    ltp = to_wire_price(s.ltp, divider)
    close = to_wire_price(s.close, divider)
    net, pct = _net_change(ltp, close)
    body = _MINI_BODY.pack(
        int(s.token), s.last_trade_time, ltp, s.last_trade_qty, close, pct, net,
        s.market_lot, s.precision, s.multiplier,
    )
    length = _HEADER.size + len(body)
    return _header(length, MSG_MARKET_PICTURE, exchange_id, LEVEL_MINI_TOUCH_LINE, 0, seq) + body


def encode_market_picture(
    s: ScripState, exchange_id: int, divider: int, level: int, seq: int = 0
) -> bytes:
    rows_per_side = LEVEL_ROWS[level]
    bids = list(s.bids[:rows_per_side])
    asks = list(s.asks[:rows_per_side])
    if level == LEVEL_TOUCH_LINE:
        # The touch line always carries exactly one bid and one ask row.
        bids = bids or [DepthRow(0, 0, 0)]
        asks = asks or [DepthRow(0, 0, 0)]
    def p(value: Price) -> int:
        return to_wire_price(value, divider)

    ltp, close = p(s.ltp), p(s.close)
    net, pct = _net_change(ltp, close)
    body = _MP_BODY.pack(
        int(s.token), s.total_buy_qty, s.total_sell_qty, s.volume, s.last_trade_time,
        s.last_update_time, p(s.open), close, p(s.high), p(s.low), ltp, s.last_trade_qty,
        p(s.avg_price), 0, len(bids), len(asks), s.trading_status, pct, s.open_interest,
        float(Decimal(str(s.total_traded_value)) * divider), net, p(s.upper_circuit),
        p(s.lower_circuit), p(s.yearly_high), p(s.yearly_low), s.market_lot, s.precision,
        s.multiplier,
    )
    rows = b"".join(_DEPTH_ROW.pack(r.quantity, p(r.price), r.orders) for r in (*bids, *asks))
    length = _HEADER.size + len(body) + len(rows)
    header = _header(length, MSG_MARKET_PICTURE, exchange_id, level, int(s.auction), seq)
    return header + body + rows


def encode_index(s: IndexState, exchange_id: int, divider: int, seq: int = 0) -> bytes:
    def p(value: Price) -> int:
        return to_wire_price(value, divider)

    value, close = p(s.value), p(s.close)
    _, pct = _net_change(value, close)
    body = _INDEX_BODY.pack(
        int(s.token), p(s.open), close, p(s.high), p(s.low), value, s.last_trade_time,
        p(s.yearly_high), p(s.yearly_low), pct, 0.0, s.precision, s.multiplier,
        s.name.encode()[:21],
    )
    return _header(_HEADER.size + len(body), MSG_INDEX, exchange_id, 0, 0, seq) + body


def encode_market_status(exchange_id: int, status_code: int, text: str = "", seq: int = 0) -> bytes:
    body = _MARKET_STATUS_BODY.pack(status_code, text.encode()[:5])
    return _header(_HEADER.size + len(body), MSG_MARKET_STATUS, exchange_id, 0, 0, seq) + body


def encode_market_open_close(exchange_id: int, is_open: bool, seq: int = 0) -> bytes:
    code = MSG_MARKET_OPEN if is_open else MSG_MARKET_CLOSE
    return _header(_HEADER.size, code, exchange_id, 0, 0, seq)


def garbage_binary_frames(seed: int = 0) -> list[bytes]:
    """Malformed binary frames, one per way the client's decoder can be hurt."""
    rng = random.Random(seed)
    noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(16, 200)))
    return [
        b"",                                                   # empty frame
        b"\x01",                                               # shorter than a length prefix
        b"\xff\xff" + noise,                                   # length prefix past the frame end
        b"\x00\x00" + noise,                                   # zero length prefix
        _header(20, MSG_MARKET_PICTURE, 1, LEVEL_MINI_TOUCH_LINE, 0, 0) + bytes(11),  # truncated
        _header(30, MSG_INDEX, 1, 0, 0, 0) + bytes(21),        # truncated index body
        _header(12, 9999, 77, 99, 0, 0) + b"abc",              # unknown code, exchange, level
        _bogus_market_picture(),                               # decodes, but is nonsense
    ]


def _bogus_market_picture() -> bytes:
    """A well-formed level-8 packet for token 0 whose depth counts promise rows it lacks.

    The SDK does not validate values: this one reaches on_message as a scrip for
    instrument "0" with every price 0.0, which a consumer has to discard.
    """
    body = bytearray(_MP_BODY.size)
    struct.pack_into("<II", body, 80, 0xFFFFFFFF, 0xFFFFFFFF)  # buy/sell depth counts
    return _header(_HEADER.size + len(body), MSG_MARKET_PICTURE, 1, LEVEL_DEPTH, 0, 0) + bytes(body)


GARBAGE_TEXT_FRAMES: tuple[str, ...] = (
    "not json at all",
    "{",
    "[1, 2, 3]",
    "null",
    '{"message_code": "1109"}',
    '{"message_code": 1109, "trading_symbols": ["not", "a", "map"]}',
    '{"message_code": 1117, "exchanges": "garbage"}',
    "\u0000\u0001\u2603",
)


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeStats:
    connections_total: int
    connections_active: int
    auth_attempts: int
    auth_failures: int
    subscribe_requests: int
    unsubscribe_requests: int
    frames_sent: int
    packets_sent: int
    silent: bool


@dataclass(eq=False)
class _Conn:
    id: int
    ws: ServerConnection
    authenticated: bool = False
    # raw key as requested (e.g. ("nse_cm", "Nifty 50")) -> intents
    subs: dict[Key, set[str]] = field(default_factory=dict)
    # raw key -> canonical (segment, numeric token) the packets are built for
    canonical: dict[Key, Key] = field(default_factory=dict)
    exchange_subscribed: bool = False
    silent: bool = False
    seq: int = 0

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq


class FakeSFeedServer:
    """SFeed websocket fake. Thread-safe public API; the server loop runs in its own thread.

    Args:
        host, port: bind address; port 0 picks a free port (read ``.port`` / ``.url``).
        rate_hz: random-walk updates per second for every subscribed instrument;
            0 (default for tests) means data is sent only by ``push_*`` calls.
        control_port: also serve the line-based control channel (process mode);
            ``None`` disables it, 0 picks a free port.
        expected_user, expected_auth: when set, auth frames carrying other values are
            refused (error frame, then close code 1008).
        snapshot_on_subscribe: after acking a subscribe, send the last known state of
            each newly subscribed instrument (only instruments that have a state).
        auth_message_code: 1117 (documented) or 1119 (seen in production).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rate_hz: float = 0.0,
        control_port: int | None = None,
        expected_user: str | None = None,
        expected_auth: str | None = None,
        snapshot_on_subscribe: bool = True,
        auth_message_code: int = MSG_AUTH_RESPONSE,
        exchanges: dict[str, tuple[int, int]] | None = None,
        symbols: dict[str, str] | None = None,
        indices: dict[tuple[str, str], str] | None = None,
        seed: int = 7,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.control_port = control_port
        self.rate_hz = rate_hz
        self.expected_user = expected_user
        self.expected_auth = expected_auth
        self.snapshot_on_subscribe = snapshot_on_subscribe
        self.auth_message_code = auth_message_code
        self.exchanges = dict(exchanges or DEFAULT_EXCHANGES)
        self.symbols = dict(symbols or DEFAULT_SYMBOLS)
        self._index_tokens = {(seg, name.lower()): tok for (seg, name), tok in
                              (indices or DEFAULT_INDICES).items()}
        self._index_names = {(seg, tok): name for (seg, name), tok in
                             (indices or DEFAULT_INDICES).items()}
        self._rng = random.Random(seed)
        self._clock = clock

        self._scrips: dict[Key, ScripState] = {}
        self._indices: dict[Key, IndexState] = {}
        self._conns: dict[int, _Conn] = {}
        self._conn_ids = itertools.count(1)
        self._silent = False
        self._garbage_seed = itertools.count(seed)
        self.auth_frames: list[dict[str, Any]] = []
        self.control_frames: list[dict[str, Any]] = []  # every JSON frame after auth
        self._connections_total = 0
        self._auth_attempts = 0
        self._auth_failures = 0
        self._subscribe_requests = 0
        self._unsubscribe_requests = 0
        self._frames_sent = 0
        self._packets_sent = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._control_server: asyncio.Server | None = None
        self._walk_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> FakeSFeedServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="fake-sfeed", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake SFeed server did not start within 10 s")
        if errors:
            raise RuntimeError("fake SFeed server failed to start") from errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FakeSFeedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _startup(self) -> None:
        self._server = await serve(
            self._handle, self.host, self.port,
            ping_interval=None,  # the real feed relies on client pings; we only answer them
            compression=None,
            max_size=2**20,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.control_port is not None:
            self._control_server = await asyncio.start_server(
                self._handle_control, self.host, self.control_port
            )
            self.control_port = self._control_server.sockets[0].getsockname()[1]
        self._walk_task = asyncio.get_running_loop().create_task(self._random_walk())

    async def _shutdown(self) -> None:
        if self._walk_task is not None:
            self._walk_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._walk_task
        if self._control_server is not None:
            self._control_server.close()
        # Abort first: a graceful close would wait for a silent peer's close frame.
        for conn in list(self._conns.values()):
            conn.ws.transport.abort()
        if self._server is not None:
            self._server.close(close_connections=False)
            await self._server.wait_closed()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("fake SFeed server is not running")
        if self._thread is threading.current_thread():
            coro.close()
            raise RuntimeError("blocking FakeSFeedServer API called from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    # -- introspection ----------------------------------------------------

    def stats(self) -> FakeStats:
        return FakeStats(
            connections_total=self._connections_total,
            connections_active=len(self._conns),
            auth_attempts=self._auth_attempts,
            auth_failures=self._auth_failures,
            subscribe_requests=self._subscribe_requests,
            unsubscribe_requests=self._unsubscribe_requests,
            frames_sent=self._frames_sent,
            packets_sent=self._packets_sent,
            silent=self._silent,
        )

    @property
    def connection_count(self) -> int:
        """Connections currently open."""
        return len(self._conns)

    def subscriptions(self) -> dict[int, frozenset[Key]]:
        """Currently subscribed (segment, token) keys, per open connection id.

        Keys are as the client sent them, so an index subscribed by name reads
        ``("nse_cm", "Nifty 50")``.
        """
        async def snap() -> dict[int, frozenset[Key]]:
            return {c.id: frozenset(c.subs) for c in self._conns.values()}
        return self._call(snap())

    def subscribed_keys(self) -> frozenset[Key]:
        """Union of every open connection's subscribed keys."""
        return frozenset().union(*self.subscriptions().values())

    def scrip_state(self, segment: str, token: str) -> ScripState | None:
        return self._scrips.get((segment, token))

    # -- driving the feed -------------------------------------------------

    def push_tick(self, segment: str, token: str, **fields: Any) -> int:
        """Update a scrip and send it to every subscriber at its subscribed level(s).

        ``fields`` are ``ScripState`` fields (``ltp``, ``volume``, ``last_trade_qty``,
        ``open``/``high``/``low``/``close``, ``bids``/``asks`` as ``DepthRow``s, ...).
        Unset fields keep their previous value; on the first tick ``open``/``high``/
        ``low`` default to ``ltp``, afterwards ``high``/``low`` track ``ltp``.
        Returns the number of connections a frame went to (0 while silent).
        """
        return self.push_ticks([(segment, token, fields)])

    def push_ticks(self, updates: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
        """Several scrip updates, batched into one binary frame per connection."""
        return self._call(self._push_ticks(list(updates)))

    def push_index(self, segment: str, name_or_token: str, **fields: Any) -> int:
        """Update an index (``value``, ``open``/``high``/``low``/``close``, ...) and send it."""
        return self._call(self._push_index(segment, name_or_token, fields))

    def push_market_status(self, segment: str, status_code: int, text: str = "") -> int:
        """Market-status packet (code 105) to connections that sent subscribeExchange."""
        return self._call(self._push_market_status(segment, status_code, text))

    def push_market_open_close(self, segment: str, *, is_open: bool) -> int:
        """Header-only 6511/6521 packet to connections subscribed to anything on segment."""
        return self._call(self._push_open_close(segment, is_open))

    def send_raw(self, frame: bytes | str) -> int:
        """One frame exactly as given, to every authenticated connection."""
        return self._call(self._broadcast_frames([frame]))

    def go_silent(self, connection_ids: Iterable[int] | None = None) -> None:
        """Send nothing (no data, no acks, no pongs) and stop reading; TCP stays open.

        Without ``connection_ids`` the whole server goes silent, including connections
        opened later (their websocket handshake completes, their auth is never
        answered). With ids, only those open connections hang; new ones work.
        """
        ids = None if connection_ids is None else frozenset(connection_ids)
        self._call(self._set_silent(True, ids))

    def resume(self) -> None:
        """Undo every ``go_silent``. Updates pushed meanwhile are not replayed."""
        self._call(self._set_silent(False, None))

    def drop_all(self, *, code: int | None = None, reason: str = "") -> int:
        """Abort every connection (no close frame: the client sees 1006), or close
        with ``code`` via a proper close frame. Returns how many were dropped."""
        return self._call(self._drop_all(code, reason))

    def send_garbage_binary(self, count: int | None = None) -> int:
        """Malformed binary frames to every authenticated connection."""
        frames: list[bytes | str] = list(garbage_binary_frames(next(self._garbage_seed)))
        return self._call(self._broadcast_frames(frames[:count] if count else frames))

    def send_garbage_text(self, count: int | None = None) -> int:
        """Malformed (but valid UTF-8) text frames to every authenticated connection."""
        frames: list[bytes | str] = list(GARBAGE_TEXT_FRAMES)
        return self._call(self._broadcast_frames(frames[:count] if count else frames))

    def set_rate(self, rate_hz: float) -> None:
        self.rate_hz = rate_hz

    # -- connection handling (loop thread) ---------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(id=next(self._conn_ids), ws=ws)
        self._conns[conn.id] = conn
        self._connections_total += 1
        if self._silent:
            conn.silent = True
            ws.transport.pause_reading()
        try:
            async for raw in ws:
                if isinstance(raw, str):
                    await self._on_text(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            self._conns.pop(conn.id, None)

    async def _on_text(self, conn: _Conn, raw: str) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        if not conn.authenticated:
            if "user" in frame and "auth" in frame:
                await self._on_auth(conn, frame)
            return
        self.control_frames.append(frame)
        event = frame.get("event")
        keys = _parse_inputtoken(frame.get("inputtoken"))
        if event in SUBSCRIBE_EVENTS:
            self._subscribe_requests += 1
            await self._on_subscribe(conn, SUBSCRIBE_EVENTS[event], keys, bool(frame.get("ack_symbol")))
        elif event in UNSUBSCRIBE_EVENTS:
            self._unsubscribe_requests += 1
            intent = UNSUBSCRIBE_EVENTS[event]
            for key in keys:
                intents = conn.subs.get(key)
                if intents is not None:
                    intents.discard(intent)
                    if not intents:
                        del conn.subs[key]
                        conn.canonical.pop(key, None)
        elif event in SNAPSHOT_EVENTS:
            await self._on_snapshot(conn, SNAPSHOT_EVENTS[event], keys, bool(frame.get("ack_symbol")))
        elif event == "subscribeExchange":
            conn.exchange_subscribed = True
        elif event == "unsubscribeExchange":
            conn.exchange_subscribed = False

    async def _on_auth(self, conn: _Conn, frame: dict[str, Any]) -> None:
        self._auth_attempts += 1
        self.auth_frames.append(frame)
        refused = (
            frame.get("format") != "native_batch"
            or (self.expected_user is not None and frame.get("user") != self.expected_user)
            or (self.expected_auth is not None and frame.get("auth") != self.expected_auth)
        )
        if refused:
            self._auth_failures += 1
            await self._send(conn, json.dumps({"status": "error", "message": "invalid session"}))
            await conn.ws.close(1008, "auth failed")
            return
        conn.authenticated = True
        reply = {
            "message_code": self.auth_message_code,
            "format": "native_batch",
            "exchanges": {name: {"value": ex_id, "divider": div}
                          for name, (ex_id, div) in self.exchanges.items()},
        }
        await self._send(conn, json.dumps(reply))

    async def _on_subscribe(self, conn: _Conn, intent: str, keys: list[Key], ack: bool) -> None:
        fresh: list[Key] = []
        for key in keys:
            canonical = self._canonical(key, intent)
            if canonical is None:
                continue
            conn.canonical[key] = canonical
            intents = conn.subs.setdefault(key, set())
            if intent not in intents:
                intents.add(intent)
                fresh.append(key)
        if ack:
            await self._send_ack(conn, keys, intent)
        if self.rate_hz > 0:
            for key in fresh:
                self._seed_state(conn.canonical[key], intent)
        if self.snapshot_on_subscribe:
            packets = [pkt for key in fresh for pkt in self._packets_for(conn, key, {intent})]
            if packets:
                await self._send(conn, b"".join(packets), len(packets))

    async def _on_snapshot(self, conn: _Conn, intent: str, keys: list[Key], ack: bool) -> None:
        if ack:
            await self._send_ack(conn, keys, intent)
        packets: list[bytes] = []
        for key in keys:
            canonical = self._canonical(key, intent)
            if canonical is not None:
                packets.extend(self._encode(canonical, intent, conn))
        if packets:
            await self._send(conn, b"".join(packets), len(packets))

    async def _send_ack(self, conn: _Conn, keys: list[Key], intent: str) -> None:
        symbols = {f"{seg}|{tok}": self._symbol_for(seg, tok, intent) for seg, tok in keys}
        await self._send(conn, json.dumps({"message_code": MSG_SUBSCRIBE_ACK,
                                           "trading_symbols": symbols}))

    def _symbol_for(self, segment: str, token: str, intent: str) -> str:
        if intent == "index":
            canonical = self._canonical((segment, token), intent)
            if canonical is not None:
                return self._index_names.get(canonical, token)
        return self.symbols.get(f"{segment}|{token}", f"{segment.upper()}-{token}")

    def _canonical(self, key: Key, intent: str) -> Key | None:
        """The (segment, numeric token) packets for ``key`` are built with."""
        segment, token = key
        if segment not in self.exchanges:
            return None
        if intent != "index":
            return key if token.isdigit() else None
        if token.isdigit():
            return key
        known = self._index_tokens.get((segment, token.lower()))
        if known is None:  # an index we have never heard of gets a stable made-up token
            known = str(90_000 + zlib.crc32(token.lower().encode()) % 9_000)
            self._index_tokens[(segment, token.lower())] = known
            self._index_names[(segment, known)] = token
        return (segment, known)

    # -- encoding and sending ---------------------------------------------

    def _encode(self, canonical: Key, intent: str, conn: _Conn) -> list[bytes]:
        exchange_id, divider = self.exchanges[canonical[0]]
        if intent == "index":
            index = self._indices.get(canonical)
            return [] if index is None else [encode_index(index, exchange_id, divider, conn.next_seq())]
        scrip = self._scrips.get(canonical)
        if scrip is None:
            return []
        level = INTENT_LEVEL[intent]
        if level == LEVEL_MINI_TOUCH_LINE:
            return [encode_mini_touch_line(scrip, exchange_id, divider, conn.next_seq())]
        return [encode_market_picture(scrip, exchange_id, divider, level, conn.next_seq())]

    def _packets_for(self, conn: _Conn, key: Key, intents: Iterable[str]) -> list[bytes]:
        canonical = conn.canonical.get(key)
        if canonical is None:
            return []
        return [pkt for intent in intents for pkt in self._encode(canonical, intent, conn)]

    def _packets_for_changed(self, conn: _Conn, changed: set[Key], *, index: bool) -> list[bytes]:
        packets: list[bytes] = []
        for key, intents in conn.subs.items():
            if conn.canonical.get(key) not in changed:
                continue
            wanted = [i for i in intents if (i == "index") == index]
            packets.extend(self._packets_for(conn, key, wanted))
        return packets

    async def _send(self, conn: _Conn, frame: bytes | str, packets: int = 0) -> bool:
        if self._silent or conn.silent:
            return False
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            return False
        self._frames_sent += 1
        self._packets_sent += packets
        return True

    async def _broadcast_changed(self, changed: set[Key], *, index: bool) -> int:
        sent = 0
        for conn in list(self._conns.values()):
            packets = self._packets_for_changed(conn, changed, index=index)
            if packets and await self._send(conn, b"".join(packets), len(packets)):
                sent += 1
        return sent

    async def _broadcast_frames(self, frames: list[bytes | str]) -> int:
        sent = 0
        for conn in list(self._conns.values()):
            if not conn.authenticated:
                continue
            ok = [await self._send(conn, frame) for frame in frames]
            sent += int(any(ok))
        return sent

    async def _push_ticks(self, updates: list[tuple[str, str, dict[str, Any]]]) -> int:
        changed: set[Key] = set()
        for segment, token, fields in updates:
            key = (segment, str(token))
            self._scrips[key] = self._apply_tick(self._scrips.get(key), key, fields)
            changed.add(key)
        return await self._broadcast_changed(changed, index=False)

    def _apply_tick(self, prev: ScripState | None, key: Key, fields: dict[str, Any]) -> ScripState:
        base = prev or ScripState(segment=key[0], token=key[1])
        state = dataclasses.replace(base, **fields)
        if "ltp" in fields:
            ltp = fields["ltp"]
            first = prev is None or not prev.ltp
            if "open" not in fields and first:
                state = dataclasses.replace(state, open=ltp)
            if "high" not in fields:
                state = dataclasses.replace(state, high=ltp if first else max(state.high, ltp))
            if "low" not in fields:
                state = dataclasses.replace(state, low=ltp if first else min(state.low, ltp))
            if "last_trade_time" not in fields:
                state = dataclasses.replace(state, last_trade_time=int(self._clock()))
        if "last_update_time" not in fields:
            state = dataclasses.replace(state, last_update_time=int(self._clock()))
        return state

    async def _push_index(self, segment: str, name_or_token: str, fields: dict[str, Any]) -> int:
        canonical = self._canonical((segment, name_or_token), "index")
        if canonical is None:
            raise ValueError(f"unknown segment {segment!r}")
        name = self._index_names.get(canonical, name_or_token)
        prev = self._indices.get(canonical) or IndexState(segment, canonical[1], name)
        state = dataclasses.replace(prev, **fields)
        if "value" in fields and "last_trade_time" not in fields:
            state = dataclasses.replace(state, last_trade_time=int(self._clock()))
        self._indices[canonical] = state
        return await self._broadcast_changed({canonical}, index=True)

    async def _push_market_status(self, segment: str, status_code: int, text: str) -> int:
        exchange_id = self.exchanges[segment][0]
        sent = 0
        for conn in list(self._conns.values()):
            if conn.exchange_subscribed:
                pkt = encode_market_status(exchange_id, status_code, text, conn.next_seq())
                sent += int(await self._send(conn, pkt, 1))
        return sent

    async def _push_open_close(self, segment: str, is_open: bool) -> int:
        exchange_id = self.exchanges[segment][0]
        sent = 0
        for conn in list(self._conns.values()):
            if any(seg == segment for seg, _ in conn.subs):
                pkt = encode_market_open_close(exchange_id, is_open, conn.next_seq())
                sent += int(await self._send(conn, pkt, 1))
        return sent

    async def _set_silent(self, silent: bool, ids: frozenset[int] | None) -> None:
        if ids is None:
            self._silent = silent
        for conn in self._conns.values():
            if ids is not None and conn.id not in ids:
                continue
            conn.silent = silent
            # Not reading means client pings are never answered with pongs.
            if silent:
                conn.ws.transport.pause_reading()
            else:
                conn.ws.transport.resume_reading()

    async def _drop_all(self, code: int | None, reason: str) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            if code is None:
                conn.ws.transport.abort()
            else:
                # Don't wait for the closing handshake: the caller may be the client's
                # own event loop thread, which can't answer while it waits for us.
                task = asyncio.get_running_loop().create_task(conn.ws.close(code, reason))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        return len(conns)

    # -- random walk (process mode) ----------------------------------------

    def _seed_state(self, key: Key, intent: str) -> None:
        segment, token = key
        now = int(self._clock())
        if intent == "index":
            if key not in self._indices:
                name = self._index_names.get(key, token)
                base = {"nifty 50": 22500.0, "nifty bank": 48000.0, "sensex": 74000.0}.get(
                    name.lower(), 10_000.0)
                self._indices[key] = IndexState(segment, token, name, value=base, open=base,
                                                high=base, low=base, close=base,
                                                last_trade_time=now)
            return
        if key not in self._scrips:
            base = round(100 + (zlib.crc32(token.encode()) % 3000) + 0.05, 2)
            self._scrips[key] = ScripState(
                segment, token, ltp=base, open=base, high=base, low=base, close=base,
                avg_price=base, last_trade_time=now, last_update_time=now,
                bids=_book(base, -1), asks=_book(base, +1),
            )

    def _walk_step(self) -> tuple[set[Key], set[Key]]:
        wanted_scrips: set[Key] = set()
        wanted_indices: set[Key] = set()
        for conn in self._conns.values():
            for key, intents in conn.subs.items():
                canonical = conn.canonical[key]
                for intent in intents:
                    self._seed_state(canonical, intent)
                    (wanted_indices if intent == "index" else wanted_scrips).add(canonical)
        now = int(self._clock())
        for key in wanted_scrips:
            s = self._scrips[key]
            ltp = max(0.05, round(float(s.ltp) + 0.05 * round(self._rng.gauss(0, 2)), 2))
            qty = self._rng.randint(1, 500)
            self._scrips[key] = dataclasses.replace(
                s, ltp=ltp, high=max(float(s.high), ltp), low=min(float(s.low), ltp),
                volume=s.volume + qty, last_trade_qty=qty, last_trade_time=now,
                last_update_time=now, total_buy_qty=self._rng.randint(1_000, 90_000),
                total_sell_qty=self._rng.randint(1_000, 90_000),
                bids=_book(ltp, -1), asks=_book(ltp, +1),
            )
        for key in wanted_indices:
            i = self._indices[key]
            value = round(float(i.value) * (1 + self._rng.gauss(0, 0.0002)), 2)
            self._indices[key] = dataclasses.replace(
                i, value=value, high=max(float(i.high), value), low=min(float(i.low), value),
                last_trade_time=now,
            )
        return wanted_scrips, wanted_indices

    async def _random_walk(self) -> None:
        while True:
            if self.rate_hz <= 0:
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(1 / self.rate_hz)
            scrips, indices = self._walk_step()
            for conn in list(self._conns.values()):
                packets = self._packets_for_changed(conn, scrips, index=False)
                packets += self._packets_for_changed(conn, indices, index=True)
                if packets:
                    await self._send(conn, b"".join(packets), len(packets))

    # -- control channel (process mode) -------------------------------------

    async def _handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                command = line.decode(errors="replace").strip()
                if command == "quit":
                    break
                try:
                    reply = await self._control_command(command)
                except Exception as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    async def _control_command(self, command: str) -> dict[str, Any]:
        verb, _, rest = command.partition(" ")
        args = rest.split()
        match verb:
            case "status":
                subs = {str(c.id): sorted(f"{s}|{t}" for s, t in c.subs) for c in self._conns.values()}
                return {"ok": True, "stats": dataclasses.asdict(self.stats()), "subscriptions": subs}
            case "silence":
                ids = frozenset(int(a) for a in args) if args else None
                await self._set_silent(True, ids)
                return {"ok": True}
            case "resume":
                await self._set_silent(False, None)
                return {"ok": True}
            case "drop":
                return {"ok": True, "dropped": await self._drop_all(None, "")}
            case "close":
                code = int(args[0]) if args else 1001
                return {"ok": True, "dropped": await self._drop_all(code, "closed by control")}
            case "garbage-binary":
                frames: list[bytes | str] = list(garbage_binary_frames(next(self._garbage_seed)))
                n = int(args[0]) if args else len(frames)
                return {"ok": True, "sent_to": await self._broadcast_frames(frames[:n])}
            case "garbage-text":
                texts: list[bytes | str] = list(GARBAGE_TEXT_FRAMES)
                n = int(args[0]) if args else len(texts)
                return {"ok": True, "sent_to": await self._broadcast_frames(texts[:n])}
            case "tick":
                fields: dict[str, Any] = {"ltp": float(args[2])}
                if len(args) > 3:
                    fields["volume"] = int(args[3])
                return {"ok": True, "sent_to": await self._push_ticks([(args[0], args[1], fields)])}
            case "index":
                segment, value = args[0], float(args[1])
                name = rest.split(maxsplit=2)[2]
                return {"ok": True, "sent_to": await self._push_index(segment, name, {"value": value})}
            case "market-status":
                return {"ok": True,
                        "sent_to": await self._push_market_status(args[0], int(args[1]), "")}
            case "rate":
                self.rate_hz = float(args[0])
                return {"ok": True}
            case _:
                return {"ok": False, "error": f"unknown command {verb!r}"}


def _book(price: float, side: int, levels: int = 5) -> tuple[DepthRow, ...]:
    """A plausible five-level book below (side -1) or above (+1) ``price``."""
    return tuple(
        DepthRow(round(price + side * 0.05 * (i + 1), 2), 100 * (i + 1), i + 1) for i in range(levels)
    )


def _parse_inputtoken(value: object) -> list[Key]:
    """``"nse_cm|2885,nse_cm|Nifty 50"`` -> ``[("nse_cm", "2885"), ("nse_cm", "Nifty 50")]``."""
    if not isinstance(value, str):
        return []
    keys: list[Key] = []
    for item in value.split(","):
        segment, sep, token = item.strip().partition("|")
        if sep and segment and token:
            keys.append((segment.strip(), token.strip()))
    return keys


def control(host: str, port: int, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one control command to a fake running in another process; return its reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Kotak SFeed websocket (native_batch).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="websocket port (0 = any free port)")
    parser.add_argument("--control-port", type=int, default=0, help="control port (0 = any free port)")
    parser.add_argument("--rate", type=float, default=2.0, help="random-walk updates per second")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    fake = FakeSFeedServer(args.host, args.port, rate_hz=args.rate,
                           control_port=args.control_port, seed=args.seed)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    fake.start()
    print(f"SFEED_FAKE_READY url={fake.url} control={fake.host}:{fake.control_port}", flush=True)
    try:
        done.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
