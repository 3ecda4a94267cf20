"""The NeoPulse message bus on ZeroMQ.

Wire format
-----------
PUB/SUB: one frame ``topic NUL header payload``. ``topic`` is dotted ASCII ending in ``.``
(``tick.nse_cm.2885.``) so a prefix subscription to token 2885 never receives 28850.
``header`` is ``<IQ``: the publisher's random epoch (changes on restart) and a per-topic
sequence number, so subscribers filtering by prefix still see contiguous numbers and can
count gaps. ``payload`` is a msgpack-encoded message from ``libs.common.messages``.

Requests: clients are DEALER sockets, servers ROUTER. A request is
``["", corr, payload]`` or ``["", corr, payload, credential]`` and the reply echoes
``corr``; the server may answer later (deferred), so a slow downstream never blocks it.
After a timeout the client closes and reopens its socket (Lazy Pirate), so a stale reply
can never be taken for a new one. The optional credential frame (the per-stack secret of
``libs.common.stack_secret``) travels outside the message, so it never reaches a log line
or the ledger; with CURVE the server also learns the sender's public key (ZAP User-Id).

Nothing on the wire can crash a service: malformed, unknown or oversized frames are
counted, logged (rate limited) and dropped, or answered with an error ``Reply``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

from libs.common.messages import Codec, Message, Reply

_HDR = struct.Struct("<IQ")
_HDR_LEN = _HDR.size
_CORR = struct.Struct("<Q")
SEP = b"\x00"


class RequestTimeout(Exception):
    """No reply within the timeout; names the endpoint so the operator knows who is down."""

    def __init__(self, endpoint: str, timeout_ms: int) -> None:
        super().__init__(f"no reply from {endpoint} within {timeout_ms} ms")
        self.endpoint = endpoint


def topic(*parts: str) -> bytes:
    """``topic("tick", "nse_cm", "2885")`` → ``b"tick.nse_cm.2885."``."""
    return ("".join(p + "." for p in parts)).encode("ascii")


@dataclass
class BusStats:
    """Counters every socket wrapper keeps; published in heartbeats."""

    received: int = 0
    sent: int = 0
    gaps: int = 0
    malformed: int = 0
    oversized: int = 0
    timeouts: int = 0
    last_error: str = ""
    _last_log: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "sent": self.sent, "gaps": self.gaps,
            "malformed": self.malformed, "oversized": self.oversized, "timeouts": self.timeouts,
        }


def _rate_limited_warn(stats: BusStats, log: Any, event: str, **kw: Any) -> None:
    now = time.monotonic()
    if log is not None and now - stats._last_log > 1.0:
        stats._last_log = now
        log.warning(event, **kw)


# --------------------------------------------------------------------------- socket factory


class Bus:
    """Owns the ZeroMQ context and applies socket options (and CURVE) in one place."""

    def __init__(
        self, cfg: Any | None = None, log: Any = None, ctx: zmq.Context[zmq.Socket[Any]] | None = None
    ) -> None:
        self.ctx: zmq.Context[zmq.Socket[Any]] = ctx or zmq.Context()
        self.cfg = cfg
        self.log = log
        self.max_frame = getattr(getattr(cfg, "bus", None), "max_frame_bytes", 1_048_576)
        self.sndhwm = getattr(getattr(cfg, "bus", None), "sndhwm", 1_000_000)
        self.timeout_ms = getattr(getattr(cfg, "bus", None), "request_timeout_ms", 2500)
        self.spin_s = getattr(getattr(cfg, "bus", None), "spin_us", 0) / 1e6
        self.security: Any = None  # set by libs.common.security when bus.curve is on

    def socket(self, kind: int, *, server: bool) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if server:
            # Only on binders: libzmq treats an oversized frame as a protocol error and
            # terminates the session without reconnecting, so on a SUB/DEALER one big
            # publication or reply would cut that peer off for good. Subscribers count and
            # drop oversized frames themselves (Subscriber.parse).
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        if self.security is not None:
            self.security.apply(sock, server=server)
        return sock

    def publisher(self, endpoint: str, bind: bool = True) -> Publisher:
        return Publisher(self, endpoint, bind=bind)

    def subscriber(self, endpoints: Iterable[str], topics: Iterable[bytes] = (b"",)) -> Subscriber:
        return Subscriber(self, list(endpoints), list(topics))

    def server(self, endpoint: str) -> Server:
        return Server(self, endpoint)

    def client(self, endpoint: str, timeout_ms: int | None = None) -> Client:
        return Client(self, endpoint, timeout_ms or self.timeout_ms)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# --------------------------------------------------------------------------- PUB/SUB


class Publisher:
    """PUB socket with per-topic sequence numbers."""

    def __init__(self, bus: Bus, endpoint: str, bind: bool = True) -> None:
        self.endpoint = endpoint
        self.sock = bus.socket(zmq.PUB, server=bind)
        self.sock.setsockopt(zmq.SNDHWM, bus.sndhwm)
        if bind:
            _prepare_ipc(endpoint)
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        self.epoch = int.from_bytes(os.urandom(4), "little")
        self._seq: dict[bytes, int] = {}
        self._encode = Codec().encode
        self.stats = BusStats()

    def publish(self, topic: bytes, msg: Message) -> None:
        self.publish_raw(topic, self._encode(msg))

    def publish_raw(self, topic: bytes, payload: bytes) -> None:
        seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        self.sock.send(b"".join((topic, SEP, _HDR.pack(self.epoch, seq), payload)))
        self.stats.sent += 1

    def raw_sender(self) -> Callable[[bytes, bytes], None]:
        """``publish_raw`` as a closure over locals, for hot paths (the feed's tick loop).
        Same wire format and per-topic sequence; the caller adds to ``stats.sent`` itself."""
        seqs, send, pack, epoch, join = self._seq, self.sock.send, _HDR.pack, self.epoch, b"".join

        def send_raw(tpc: bytes, payload: bytes) -> None:
            seq = seqs.get(tpc, 0) + 1
            seqs[tpc] = seq
            send(join((tpc, SEP, pack(epoch, seq), payload)))

        return send_raw

    def close(self) -> None:
        self.sock.close(0)


class Subscriber:
    """SUB socket that decodes, counts gaps per topic, and drops what it cannot read."""

    def __init__(self, bus: Bus, endpoints: list[str], topics: list[bytes]) -> None:
        self.sock = bus.socket(zmq.SUB, server=False)
        self.sock.setsockopt(zmq.RCVHWM, bus.sndhwm)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t)
        for ep in endpoints:
            self.sock.connect(ep)
        self.endpoints = endpoints
        self._decode = Codec().decode
        self._last: dict[bytes, tuple[int, int]] = {}
        self.stats = BusStats()
        self.log = bus.log
        self.max_frame = bus.max_frame

    def subscribe(self, prefix: bytes) -> None:
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix)

    def unsubscribe(self, prefix: bytes) -> None:
        self.sock.setsockopt(zmq.UNSUBSCRIBE, prefix)

    def parse(self, frame: bytes) -> tuple[bytes, Message] | None:
        """Split, check sequence and decode one frame; None when it was dropped."""
        stats = self.stats
        if len(frame) > self.max_frame:
            stats.oversized += 1
            _rate_limited_warn(stats, self.log, "bus_oversized_frame", size=len(frame))
            return None
        i = frame.find(SEP)
        if i <= 0 or len(frame) < i + 1 + _HDR_LEN:
            stats.malformed += 1
            _rate_limited_warn(stats, self.log, "bus_malformed_frame", size=len(frame))
            return None
        tpc = frame[:i]
        epoch, seq = _HDR.unpack_from(frame, i + 1)
        last = self._last.get(tpc)
        if last is not None and last[0] == epoch and seq != last[1] + 1 and seq > last[1]:
            stats.gaps += seq - last[1] - 1
        self._last[tpc] = (epoch, seq)
        try:
            msg = self._decode(frame[i + 1 + _HDR_LEN:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            stats.malformed += 1
            stats.last_error = str(exc)[:200]
            _rate_limited_warn(
                stats, self.log, "bus_undecodable_message", topic=tpc[:64], error=str(exc)[:200]
            )
            return None
        stats.received += 1
        return tpc, msg

    def drain(self, handler: Callable[[bytes, Message], None], limit: int = 10_000) -> int:
        """Receive everything queued (up to ``limit``) and hand each message to ``handler``."""
        # Hot path: the fast case (known framing, contiguous seq, decodable) is inlined;
        # anything unusual falls back to ``parse``, which counts and logs it.
        recv = self.sock.recv
        parse = self.parse
        decode = self._decode
        unpack = _HDR.unpack_from
        last_seen = self._last
        max_frame = self.max_frame
        nonblock = zmq.NOBLOCK
        n = ok = 0
        while n < limit:
            try:
                frame = recv(nonblock)
            except zmq.Again:
                break
            n += 1
            i = frame.find(SEP)
            if i > 0 and len(frame) <= max_frame:
                tpc = frame[:i]
                msg = None
                try:
                    stamp = unpack(frame, i + 1)
                    last = last_seen[tpc]
                    if last[0] == stamp[0] and last[1] + 1 == stamp[1]:
                        msg = decode(memoryview(frame)[i + 1 + _HDR_LEN:])
                        last_seen[tpc] = stamp
                except (KeyError, struct.error, msgspec.DecodeError, msgspec.ValidationError):
                    msg = None
                if msg is not None:
                    ok += 1
                    handler(tpc, msg)
                    continue
            parsed = parse(frame)
            if parsed is not None:
                handler(parsed[0], parsed[1])
        self.stats.received += ok
        return n

    def recv(self, timeout_ms: int) -> tuple[bytes, Message] | None:
        """Blocking receive of one decodable message (for CLI tools and tests)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0 or not self.sock.poll(left):
                return None
            parsed = self.parse(self.sock.recv())
            if parsed is not None:
                return parsed

    def close(self) -> None:
        self.sock.close(0)


# --------------------------------------------------------------------------- requests


class Responder:
    """Where a deferred reply goes: the client identity and correlation id. Also who sent
    the request: ``user_id`` is the sender's CURVE public key (z85, as the ZAP authenticator
    reports it; empty without CURVE) and ``credential`` the request's credential frame
    (empty when none was sent)."""

    __slots__ = ("_corr", "_ident", "_server", "credential", "user_id")

    def __init__(self, server: Server, ident: bytes, corr: bytes, credential: bytes = b"",
                 user_id: str = "") -> None:
        self._server = server
        self._ident = ident
        self._corr = corr
        self.credential = credential
        self.user_id = user_id

    def send(self, msg: Message) -> None:
        self._server.send_reply(self._ident, self._corr, msg)


RequestHandler = Callable[[Message, Responder], "Message | None"]
Credential = Callable[[], bytes]  # called per request; b"" sends no credential frame
MAX_CREDENTIAL = 256  # bytes; a longer credential frame is a malformed request


def _user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of the connection a frame came in on (empty without CURVE)."""
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:
        return ""


def _envelope(corr: bytes, payload: bytes, credential: Credential | None) -> list[bytes]:
    cred = credential() if credential is not None else b""
    return [b"", corr, payload, cred] if cred else [b"", corr, payload]


class Server:
    """ROUTER socket answering ``[corr, payload]`` requests. A handler returns a reply now,
    or ``None`` and answers later through the ``Responder``."""

    def __init__(self, bus: Bus, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = bus.socket(zmq.ROUTER, server=True)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        _prepare_ipc(endpoint)
        self.sock.bind(endpoint)
        self._codec = Codec()
        self.stats = BusStats()
        self.log = bus.log
        self.handler: RequestHandler | None = None
        # With CURVE, receive zero-copy frames to read the sender's key off them.
        self._read_user_id = bus.security is not None

    def send_reply(self, ident: bytes, corr: bytes, msg: Message) -> None:
        try:
            self.sock.send_multipart([ident, b"", corr, self._codec.encode(msg)], zmq.NOBLOCK)
            self.stats.sent += 1
        except zmq.ZMQError as exc:  # client gone or queue full: the client's timeout handles it
            self.stats.last_error = str(exc)

    def drain(self, limit: int = 1000) -> int:
        handler = self.handler
        assert handler is not None, "Server.handler must be set before draining"
        n = 0
        user_id = ""
        while n < limit:
            try:
                if self._read_user_id:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    user_id = _user_id(parts[-1])
                    frames = [p.bytes for p in parts]
                else:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            if (len(frames) not in (4, 5) or frames[1] != b"" or len(frames[2]) != _CORR.size
                    or (len(frames) == 5 and len(frames[4]) > MAX_CREDENTIAL)):
                self.stats.malformed += 1
                _rate_limited_warn(self.stats, self.log, "bus_malformed_request", frames=len(frames))
                if len(frames) >= 2:
                    corr = frames[2] if len(frames) > 2 and len(frames[2]) == _CORR.size else b"\0" * 8
                    self.send_reply(frames[0], corr, Reply(ok=False, code="malformed",
                                                           error="malformed request envelope"))
                continue
            ident, _, corr, payload = frames[:4]
            credential = frames[4] if len(frames) == 5 else b""
            try:
                msg = self._codec.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.stats.malformed += 1
                _rate_limited_warn(self.stats, self.log, "bus_undecodable_request", error=str(exc)[:200])
                self.send_reply(ident, corr, Reply(ok=False, code="malformed",
                                                   error=f"malformed request: {str(exc)[:200]}"))
                continue
            self.stats.received += 1
            responder = Responder(self, ident, corr, credential, user_id)
            try:
                reply = handler(msg, responder)
            except Exception as exc:  # a handler bug answers with an error and never kills the loop
                if self.log is not None:
                    self.log.exception("request_handler_failed", kind=type(msg).__name__)
                reply = Reply(ok=False, code="internal", error=f"internal error: {type(exc).__name__}: {exc}")
            if reply is not None:
                responder.send(reply)
        return n

    def close(self) -> None:
        self.sock.close(0)


class Client:
    """Blocking request client (CLI, tests, simple tools). Lazy Pirate: after a timeout the
    socket is closed and reopened, and ``RequestTimeout`` names the endpoint."""

    def __init__(self, bus: Bus, endpoint: str, timeout_ms: int) -> None:
        self.bus = bus
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self._codec = Codec()
        self._corr = itertools.count(int.from_bytes(os.urandom(3), "little"))
        self.stats = BusStats()
        self.credential: Credential | None = None  # e.g. a StackSecret: sent with every request
        self.sock = self._open()

    def _open(self) -> zmq.Socket[Any]:
        sock = self.bus.socket(zmq.DEALER, server=False)
        sock.connect(self.endpoint)
        return sock

    def reopen(self) -> None:
        self.sock.close(0)
        self.sock = self._open()

    def request(self, msg: Message, timeout_ms: int | None = None, retries: int = 0) -> Message:
        timeout = timeout_ms or self.timeout_ms
        payload = self._codec.encode(msg)
        for attempt in range(retries + 1):
            corr = _CORR.pack(next(self._corr) & 0xFFFFFFFFFFFFFFFF)
            self.sock.send_multipart(_envelope(corr, payload, self.credential))
            deadline = time.monotonic() + timeout / 1000
            if self.bus.spin_s:  # poll without blocking for a prompt reply first (bus.spin_us)
                spin_until = min(deadline, time.monotonic() + self.bus.spin_s)
                while not self.sock.poll(0) and time.monotonic() < spin_until:
                    pass
            while True:
                left = int((deadline - time.monotonic()) * 1000)
                if left <= 0 or not self.sock.poll(left):
                    break
                frames = self.sock.recv_multipart()
                if len(frames) == 3 and frames[1] == corr:
                    self.stats.received += 1
                    return self._codec.decode(frames[2])
                # a stale reply from an earlier, timed-out request: ignore it
            self.stats.timeouts += 1
            self.reopen()
            if attempt == retries:
                break
        raise RequestTimeout(self.endpoint, timeout)

    def close(self) -> None:
        self.sock.close(0)


class AsyncClient:
    """Non-blocking request client for use inside a ``Reactor``: replies and timeouts come
    back as callbacks, so a stuck peer never wedges the service."""

    def __init__(self, bus: Bus, reactor: Reactor, endpoint: str, timeout_ms: int | None = None) -> None:
        self.bus = bus
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms or bus.timeout_ms
        self._codec = Codec()
        self._corr = itertools.count(1)
        self._pending: dict[bytes, tuple[float, Callable[[Message | Exception], None]]] = {}
        self.stats = BusStats()
        self.credential: Credential | None = None  # e.g. a StackSecret: sent with every request
        self.sock = self._open()
        reactor.call_every(0.05, self._expire)

    def _open(self) -> zmq.Socket[Any]:
        sock = self.bus.socket(zmq.DEALER, server=False)
        sock.connect(self.endpoint)
        self.reactor.add_reader(sock, self._on_readable)
        return sock

    def request(self, msg: Message, callback: Callable[[Message | Exception], None],
                timeout_ms: int | None = None) -> None:
        corr = _CORR.pack(next(self._corr))
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000
        self._pending[corr] = (deadline, callback)
        try:
            self.sock.send_multipart(_envelope(corr, self._codec.encode(msg), self.credential), zmq.NOBLOCK)
        except zmq.Again:
            del self._pending[corr]
            callback(RequestTimeout(self.endpoint, 0))
            return
        self.reactor.awaiting(1)

    def _on_readable(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                self.stats.malformed += 1
                continue
            entry = self._pending.pop(frames[1], None)
            if entry is None:
                continue  # late reply after a timeout
            self.reactor.awaiting(-1)
            try:
                reply: Message | Exception = self._codec.decode(frames[2])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                reply = exc
            self.stats.received += 1
            entry[1](reply)

    def _expire(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        expired = [c for c, (deadline, _) in self._pending.items() if deadline <= now]
        if not expired:
            return
        callbacks = [self._pending.pop(c)[1] for c in expired]
        self.stats.timeouts += len(expired)
        # Lazy Pirate: a fresh socket so nothing stale is delivered later. Requests still in
        # flight on the old socket are failed too: their replies could never arrive now.
        callbacks.extend(cb for _, cb in self._pending.values())
        self._pending.clear()
        self.reactor.awaiting(-len(callbacks))
        self.reactor.remove_reader(self.sock)
        self.sock.close(0)
        self.sock = self._open()
        for cb in callbacks:
            cb(RequestTimeout(self.endpoint, self.timeout_ms))

    def close(self) -> None:
        self.reactor.awaiting(-len(self._pending))
        self._pending.clear()
        self.reactor.remove_reader(self.sock)
        self.sock.close(0)


# --------------------------------------------------------------------------- reactor


class Reactor:
    """A single-threaded event loop over ``zmq.Poller`` with timers and a thread-safe queue.

    Readers drain their sockets completely when woken, which keeps per-message overhead
    to a non-blocking ``recv`` and a decode. Blocking work (broker SDK calls) runs in a
    thread pool and comes back through ``call_soon_threadsafe``.
    """

    def __init__(self, ctx: zmq.Context[Any], spin_us: int = 0) -> None:
        self.ctx = ctx
        # While a request of an AsyncClient on this loop awaits its reply, poll without
        # blocking for up to this long after it was sent (``bus.spin_us``), so a prompt reply
        # is read without a wake-up; never while nothing is awaited, so an idle loop sleeps.
        self.spin_s = max(0, spin_us) / 1e6
        self._awaiting = 0
        self._spin_until = 0.0
        self.poller = zmq.Poller()
        self._readers: dict[Any, Callable[[], Any]] = {}
        self._timers: list[tuple[float, int, Callable[[], Any], float | None]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._queue: deque[Callable[[], Any]] = deque()
        self._wake_addr = f"inproc://reactor-wake-{id(self)}"
        self._wake_pull = ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._wake_push = ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(self._wake_addr)
        self.add_reader(self._wake_pull, self._on_wake)
        self.running = False
        self._stop_asked = False  # a stop asked for before ``run`` (a signal during start-up) is kept
        self.error_handler: Callable[[str, BaseException], None] | None = None

    def add_reader(self, sock: Any, fn: Callable[[], Any]) -> None:
        self._readers[sock] = fn
        self.poller.register(sock, zmq.POLLIN)

    def remove_reader(self, sock: Any) -> None:
        if self._readers.pop(sock, None) is not None:
            self.poller.unregister(sock)

    def call_later(self, delay: float, fn: Callable[[], Any]) -> int:
        tid = next(self._ids)
        heapq.heappush(self._timers, (time.monotonic() + delay, tid, fn, None))
        return tid

    def call_every(self, interval: float, fn: Callable[[], Any]) -> int:
        tid = next(self._ids)
        heapq.heappush(self._timers, (time.monotonic() + interval, tid, fn, interval))
        return tid

    def awaiting(self, delta: int) -> None:
        """An AsyncClient's count of requests awaiting a reply: +1 per request sent (which
        starts a spin window of ``spin_s``), -1 per reply or failure."""
        self._awaiting = max(0, self._awaiting + delta)
        if delta > 0 and self.spin_s:
            self._spin_until = time.monotonic() + self.spin_s

    def cancel(self, tid: int) -> None:
        self._cancelled.add(tid)

    def call_soon_threadsafe(self, fn: Callable[[], Any]) -> None:
        self._queue.append(fn)
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake_push.send(b"", zmq.NOBLOCK)

    def _on_wake(self) -> None:
        while True:
            try:
                self._wake_pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while self._queue:
            self._guard("threadsafe_callback", self._queue.popleft())

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            if self.error_handler is not None:
                self.error_handler(what, exc)
            else:
                raise

    def stop(self) -> None:
        self.running = False
        self._stop_asked = True

    def run(self) -> None:
        """Run until ``stop``; a stop asked for before this call (a SIGINT while the service
        was still starting) makes it return at once, never lost."""
        if self._stop_asked:
            self._stop_asked = False
            return
        self.running = True
        try:
            self._loop()
        finally:
            self._stop_asked = False

    def _loop(self) -> None:
        timers = self._timers
        poll = self.poller.poll
        while self.running:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                when, tid, fn, interval = heapq.heappop(timers)
                if tid in self._cancelled:
                    self._cancelled.discard(tid)
                    continue
                if interval is not None:
                    heapq.heappush(timers, (max(when + interval, now), tid, fn, interval))
                self._guard("timer", fn)
                if not self.running:
                    return
            # Rounded up: a timer due in under a millisecond is waited for in one poll, not by
            # polling with a zero timeout until it is due (that spun up to 1 ms per timer). So a
            # timer may run up to 1 ms late, after a message that came in during that wait.
            timeout_ms = 100
            if timers:
                timeout_ms = min(timeout_ms, max(0, math.ceil((timers[0][0] - time.monotonic()) * 1000)))
            spinning = self._awaiting > 0 and time.monotonic() < self._spin_until
            try:
                events = poll(0 if spinning else timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                raise
            if not events:
                continue
            for sock, _ in events:
                reader = self._readers.get(sock)
                if reader is not None:
                    self._guard("reader", reader)

    def close(self) -> None:
        self._wake_pull.close(0)
        self._wake_push.close(0)


def _prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
