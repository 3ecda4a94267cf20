"""The reactor's waits on real ZeroMQ sockets: a near timer is waited for, not spun for; the
optional busy-poll (``bus.spin_us``) runs only while a reply is awaited, within its window."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import zmq

from libs.common.bus import AsyncClient, Bus, Reactor, RequestTimeout
from libs.common.config import load_config
from libs.common.messages import Codec, GetStatus, Message, Reply
from tests.helpers import free_port
from tests.kit.bus import served


def _ep() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def bus() -> Iterator[Bus]:
    b = Bus()
    yield b
    b.close()


def _count_polls(reactor: Reactor) -> list[tuple[float, int]]:
    """Every poll the loop makes, as (monotonic time, timeout ms): pyzmq's Poller, wrapped."""
    calls: list[tuple[float, int]] = []
    real = reactor.poller.poll

    def poll(timeout: int | None = None) -> Any:
        calls.append((time.monotonic(), -1 if timeout is None else timeout))
        return real(timeout)

    reactor.poller.poll = poll  # type: ignore[method-assign]
    return calls


@contextmanager
def slow_router(endpoint: str, delay_s: float) -> Iterator[None]:
    """A peer at protocol level: a ROUTER that answers each request with Reply(ok) after delay_s."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    stop = threading.Event()
    ok = Codec().encode(Reply(ok=True))

    def run() -> None:
        while not stop.is_set():
            if sock.poll(10):
                frames = sock.recv_multipart()
                time.sleep(delay_s)
                sock.send_multipart([frames[0], b"", frames[2], ok])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        sock.close(0)
        ctx.term()


def test_a_timer_due_within_a_millisecond_is_waited_for_not_spun(bus: Bus) -> None:
    reactor = Reactor(bus.ctx)
    calls = _count_polls(reactor)
    fired: list[float] = []
    reactor.call_every(0.002, lambda: fired.append(time.monotonic()))
    reactor.call_later(0.2, reactor.stop)

    reactor.run()

    zero = [c for c in calls if c[1] == 0]
    assert len(fired) >= 20
    # a zero-timeout poll loop would make hundreds per timer; a rounded-up wait makes none
    assert len(zero) <= len(fired) // 4, f"{len(zero)} zero-timeout polls for {len(fired)} timers"
    reactor.close()


def test_the_busy_poll_runs_only_while_a_reply_is_awaited(bus: Bus) -> None:
    ep = _ep()
    reactor = Reactor(bus.ctx, spin_us=200_000)  # a window longer than the peer's 30 ms
    calls = _count_polls(reactor)
    client = AsyncClient(bus, reactor, ep, timeout_ms=2000)
    replies: list[tuple[float, Message | Exception]] = []
    sent: list[float] = []

    def ask() -> None:
        sent.append(time.monotonic())
        client.request(GetStatus(), lambda r: replies.append((time.monotonic(), r)))

    with slow_router(ep, 0.03):
        reactor.call_later(0.1, ask)  # idle first: nothing awaited, nothing spun
        reactor.call_later(0.35, reactor.stop)  # then idle again after the reply
        reactor.run()

    assert len(replies) == 1 and isinstance(replies[0][1], Reply) and replies[0][1].ok
    t_sent, t_reply = sent[0], replies[0][0]
    zero = [t for t, timeout in calls if timeout == 0]
    assert not [t for t in zero if t < t_sent], "spun while idle before the request"
    assert len([t for t in zero if t_sent <= t <= t_reply]) > 10, "no busy-poll while the reply was awaited"
    assert len([t for t in zero if t > t_reply + 0.005]) <= 1, "kept spinning after the reply came"
    client.close()
    reactor.close()


def test_the_busy_poll_stops_at_its_window_when_no_reply_comes(bus: Bus) -> None:
    reactor = Reactor(bus.ctx, spin_us=20_000)
    calls = _count_polls(reactor)
    client = AsyncClient(bus, reactor, _ep(), timeout_ms=150)  # nobody is bound there
    results: list[Message | Exception] = []
    sent: list[float] = []

    def ask() -> None:
        sent.append(time.monotonic())
        client.request(GetStatus(), results.append)

    reactor.call_later(0.02, ask)
    reactor.call_later(0.4, reactor.stop)
    reactor.run()

    assert len(results) == 1 and isinstance(results[0], RequestTimeout)
    late = [t for t, timeout in calls if timeout == 0 and t > sent[0] + 0.02 + 0.01]
    assert len(late) <= 2, f"{len(late)} zero-timeout polls after the 20 ms window"
    client.close()
    reactor.close()


def test_a_blocking_client_with_spin_still_gets_its_reply_and_times_out() -> None:
    cfg = load_config(env={"NEOPULSE_BUS__SPIN_US": "2000"})
    sbus = Bus(cfg)
    ep = _ep()
    try:
        client = sbus.client(ep, 300)

        def ok(_msg: Message, _r: Any) -> Message:
            return Reply(ok=True)

        with served(ep, ok):
            reply = client.request(GetStatus(), timeout_ms=3000)
        assert isinstance(reply, Reply) and reply.ok
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            client.request(GetStatus())
        assert 0.25 < time.monotonic() - t0 < 2.0
        client.close()
    finally:
        sbus.close()
