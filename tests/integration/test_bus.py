"""The bus on real ZeroMQ sockets: gaps, prefixes, malformed frames, timeouts that recover."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from libs.common.bus import _HDR, SEP, Bus, Reactor, RequestTimeout, Responder, topic
from libs.common.config import load_config
from libs.common.messages import Codec, GetStatus, Heartbeat, Message, Reply, Tick
from tests.helpers import eventually, free_port
from tests.kit.bus import served


def _ep() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def bus() -> Iterator[Bus]:
    b = Bus()
    yield b
    b.close()


def _handshake(pub_send: Callable[[], None], sub: Any) -> None:
    """Publish until the subscriber sees something: the PUB/SUB join has happened."""
    def seen() -> bool:
        pub_send()
        return sub.sock.poll(20) != 0
    eventually(seen, 5, 0.0, "subscription handshake")
    while sub.sock.poll(50):
        sub.sock.recv()


def _status_ok(msg: Message, _r: Responder) -> Message:
    return Reply(ok=True, data={"got": type(msg).__name__})


# --------------------------------------------------------------------------- PUB/SUB


def test_missing_sequence_numbers_are_counted_as_gaps(bus: Bus) -> None:
    ep = _ep()
    raw = bus.ctx.socket(zmq.PUB)
    raw.bind(ep)
    sub = bus.subscriber([ep], [b"hb."])
    payload = Codec().encode(Heartbeat(service="risk", pid=1))
    t = b"hb.risk."

    def frame(epoch: int, seq: int) -> bytes:
        return t + SEP + _HDR.pack(epoch, seq) + payload

    _handshake(lambda: raw.send(frame(9, 1)), sub)
    sub.stats.received = 0
    for seq in (1, 2, 5, 6, 10):  # 3, 4, 7, 8, 9 lost
        raw.send(frame(7, seq))
    raw.send(frame(8, 1))  # publisher restarted: a new epoch is not a gap
    raw.send(frame(8, 2))

    eventually(lambda: sub.drain(lambda *_: None) >= 0 and sub.stats.received == 7, 5)
    assert sub.stats.gaps == 5
    raw.close(0)


def test_slow_subscriber_with_tiny_queue_counts_what_it_lost() -> None:
    cfg = load_config(env={}, overrides={"bus": {"sndhwm": 20}})
    bus = Bus(cfg)
    ep = _ep()
    pub = bus.publisher(ep)
    sub = bus.subscriber([ep], [b"tick."])
    t = topic("tick", "nse_cm", "2885")
    tick = Tick(segment="nse_cm", token="2885", ltp=100.0)
    _handshake(lambda: pub.publish(t, tick), sub)
    n = 5000
    for _ in range(n):  # the subscriber is not reading: queues overflow and PUB drops frames
        pub.publish(t, tick)
    seqs: list[int] = []

    def drain() -> None:
        while sub.sock.poll(200):
            frame = sub.sock.recv()
            seqs.append(_HDR.unpack_from(frame, frame.find(SEP) + 1)[1])
            sub.parse(frame)

    drain()
    # PUB may have dropped only a contiguous tail: nothing after it has arrived to reveal the
    # hole yet. One frame published once the queues are empty always arrives and shows it.
    pub.publish(t, tick)
    drain()

    assert 0 < len(seqs) < n
    assert sub.stats.gaps > 0
    # every sequence number between the first and last received is either received or a gap
    assert sub.stats.gaps == (seqs[-1] - seqs[0] + 1) - len(seqs)
    bus.close()


def test_prefix_subscription_to_one_token_never_receives_a_longer_token(bus: Bus) -> None:
    ep = _ep()
    pub = bus.publisher(ep)
    sub = bus.subscriber([ep], [topic("tick", "nse_cm", "2885")])
    first = Tick(segment="nse_cm", token="2885", ltp=1)
    _handshake(lambda: pub.publish(topic("tick", "nse_cm", "2885"), first), sub)

    pub.publish(topic("tick", "nse_cm", "28850"), Tick(segment="nse_cm", token="28850", ltp=2))
    pub.publish(topic("tick", "nse_cm", "2885"), Tick(segment="nse_cm", token="2885", ltp=3))

    got = sub.recv(2000)
    assert got is not None
    assert got[1].token == "2885"
    assert got[1].ltp == 3
    assert sub.recv(200) is None


def test_malformed_frames_are_dropped_counted_and_the_subscriber_keeps_going(bus: Bus) -> None:
    ep = _ep()
    raw = bus.ctx.socket(zmq.PUB)
    raw.bind(ep)
    sub = bus.subscriber([ep], [b""])
    good = Codec().encode(Heartbeat(service="feed", pid=2))
    _handshake(lambda: raw.send(b"hb.feed." + SEP + _HDR.pack(1, 1) + good), sub)
    received: list[Message] = []

    raw.send(b"garbage without separator")
    raw.send(b"hb.feed." + SEP + b"\x01\x02")  # header cut short
    raw.send(b"hb.feed." + SEP + _HDR.pack(1, 2) + b"\xc1\xff not msgpack")
    raw.send(b"hb.feed." + SEP + _HDR.pack(1, 3) + msgspec.msgpack.encode({"kind": "Bogus"}))
    raw.send(b"hb.feed." + SEP + _HDR.pack(1, 4) + good)

    eventually(lambda: sub.drain(lambda _t, m: received.append(m)) >= 0 and received, 5)
    assert received == [Heartbeat(service="feed", pid=2, ts_ns=received[0].ts_ns)]
    assert sub.stats.malformed == 4
    assert sub.stats.gaps == 0
    raw.close(0)


def test_oversized_frame_is_dropped_counted_and_later_frames_still_arrive() -> None:
    cfg = load_config(env={}, overrides={"bus": {"max_frame_bytes": 4096}})
    bus = Bus(cfg)
    ep = _ep()
    pub = bus.publisher(ep)
    sub = bus.subscriber([ep], [b"hb."])
    hb = Heartbeat(service="feed", pid=3)
    _handshake(lambda: pub.publish(b"hb.feed.", hb), sub)

    pub.publish(b"hb.feed.", Heartbeat(service="feed", pid=3, info={"blob": "x" * 100_000}))

    def small_arrives() -> bool:
        pub.publish(b"hb.feed.", hb)
        got = sub.recv(100)
        return got is not None and got[1] == hb
    eventually(small_arrives, 10, message="a normal frame after the oversized one")
    assert sub.stats.oversized == 1
    bus.close()


# --------------------------------------------------------------------------- requests


def test_request_to_a_down_server_times_out_naming_it_then_recovers(bus: Bus) -> None:
    ep = _ep()
    client = bus.client(ep, timeout_ms=300)

    with pytest.raises(RequestTimeout) as exc:
        client.request(GetStatus())
    assert ep in str(exc.value)
    assert client.stats.timeouts == 1

    with served(ep, _status_ok):
        reply = client.request(GetStatus(), timeout_ms=2000)

    assert isinstance(reply, Reply)
    assert reply.ok and reply.data == {"got": "GetStatus"}
    client.close()


def test_late_reply_to_a_timed_out_request_is_never_taken_for_the_next_one(bus: Bus) -> None:
    ep = _ep()
    calls = {"n": 0}

    def slow_first(msg: Message, responder: Responder) -> Message | None:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.5)  # the client gives up first
            return Reply(ok=True, data="late")
        return Reply(ok=True, data="fresh")

    client = bus.client(ep, timeout_ms=200)
    with served(ep, slow_first):
        with pytest.raises(RequestTimeout):
            client.request(GetStatus())
        reply = client.request(GetStatus(), timeout_ms=3000)

    assert isinstance(reply, Reply)
    assert reply.data == "fresh"
    client.close()


def test_retries_resend_on_a_fresh_socket_until_the_server_is_up(bus: Bus) -> None:
    ep = _ep()
    client = bus.client(ep, timeout_ms=250)
    result: list[Message] = []
    worker = threading.Thread(target=lambda: result.append(client.request(GetStatus(), retries=20)))
    worker.start()
    eventually(lambda: client.stats.timeouts >= 1, 5, message="a first timeout")

    with served(ep, _status_ok):
        worker.join(10)

    assert isinstance(result[0], Reply) and result[0].ok
    client.close()


def test_malformed_request_gets_an_error_reply_and_the_server_keeps_serving(bus: Bus) -> None:
    ep = _ep()
    with served(ep, _status_ok) as server:
        raw = bus.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(ep)
        raw.send_multipart([b"", b"12345678", b"\xc1 not msgpack"])
        assert raw.poll(3000)
        frames = raw.recv_multipart()
        bad = Codec().decode(frames[2])
        raw.send_multipart([b"just one frame"])
        client = bus.client(ep, timeout_ms=2000)
        good = client.request(GetStatus())
        eventually(lambda: server.stats.malformed == 2, 3)

    assert isinstance(bad, Reply) and not bad.ok and bad.code == "malformed"
    assert isinstance(good, Reply) and good.ok
    raw.close(0)
    client.close()


def test_handler_exception_answers_an_internal_error(bus: Bus) -> None:
    ep = _ep()

    def broken(_m: Message, _r: Responder) -> Message:
        raise ValueError("boom")

    with served(ep, broken):
        reply = bus.client(ep, timeout_ms=2000).request(GetStatus())

    assert isinstance(reply, Reply)
    assert not reply.ok and reply.code == "internal" and "boom" in reply.error


def test_async_client_times_out_inside_the_reactor_then_recovers(bus: Bus) -> None:
    ep = _ep()
    reactor = Reactor(bus.ctx)
    results: list[Any] = []
    from libs.common.bus import AsyncClient

    client = AsyncClient(bus, reactor, ep, timeout_ms=200)

    def run_until(cond: Callable[[], bool], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        def check() -> None:
            if cond() or time.monotonic() > deadline:
                reactor.stop()
        tid = reactor.call_every(0.02, check)
        reactor.run()
        reactor.cancel(tid)

    client.request(GetStatus(), results.append)
    run_until(lambda: len(results) == 1)
    assert isinstance(results[0], RequestTimeout)

    with served(ep, _status_ok):
        client.request(GetStatus(), results.append, timeout_ms=3000)
        run_until(lambda: len(results) == 2)

    assert isinstance(results[1], Reply) and results[1].ok
    client.close()
    reactor.close()


def test_a_stop_asked_for_before_the_reactor_runs_is_kept(bus: Bus) -> None:
    # a SIGINT that lands while a service is still in on_start calls stop() before run():
    # the loop must not start and run for ever (the notifier hung on exactly this)
    reactor = Reactor(bus.ctx)
    reactor.stop()

    t0 = time.monotonic()
    reactor.run()

    assert time.monotonic() - t0 < 0.5
    ticks: list[int] = []
    reactor.call_every(0.01, lambda: (ticks.append(1), len(ticks) >= 3 and reactor.stop()))
    reactor.run()  # the next run is a normal one
    assert len(ticks) == 3
    reactor.close()
