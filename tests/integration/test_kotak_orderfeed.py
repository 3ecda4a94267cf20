"""KotakBroker's order feed on the real SDK against the fakes: the REST fake started with
``--order-feed`` serves ``/realtime`` (tests/fakes/kotak_orderfeed.py) and announces it through
the SDK's dynamic-config call, so ``create_order_feed()`` connects to it by itself."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.config import ExecutionConfig
from services.execution.brokers.base import BrokerOrderStatus, BrokerTrade
from services.execution.brokers.kotak import KotakBroker
from services.execution.brokers.kotak_orderfeed import DOWN, LIVE, POLLING
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.test_kotak_broker import kotak_config, reliance


@pytest.fixture
def ofake(tmp_path: Path) -> Iterator[KotakRestFake]:
    with KotakRestFake(tmp_path / "kotak-state.json", extra_args=["--order-feed"]) as running:
        yield running


def make_broker(fake: KotakRestFake, **execution: Any) -> KotakBroker:
    return KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0, **execution))


@pytest.fixture
def broker(ofake: KotakRestFake) -> Iterator[KotakBroker]:
    b = make_broker(ofake, reconcile_s=60.0)
    yield b
    b.close()


def feed_state(b: KotakBroker) -> str:
    return str(b.order_feed_status()["state"])


def live(b: KotakBroker) -> None:
    b.login()
    eventually(lambda: feed_state(b) == LIVE, timeout=5, message="the order feed LIVE")


def apis(fake: KotakRestFake, since: int) -> list[str]:
    return [r["api"] for r in fake.requests()[since:]]


def drain_until(b: KotakBroker, cond: Any, timeout: float = 3.0) -> list[Any]:
    got: list[Any] = []

    def step() -> bool:
        got.extend(b.drain_events())
        return bool(cond(got))

    eventually(step, timeout=timeout, interval=0.02)
    return got


def test_with_the_feed_live_updates_come_without_book_reads_and_a_fill_reads_the_trade_book_once(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: LIVE, and the first drain's full read of the books done.
    live(broker)
    broker.drain_events()
    n = len(ofake.requests())

    # Act: an order placed and filled at the fake.
    order_no = broker.place(reliance("np0001")).broker_order_id
    got = drain_until(broker, lambda evs: any(getattr(e, "status", "") == "OPEN" for e in evs))
    after_place = apis(ofake, n)
    ofake.fill(order_no)
    got += drain_until(broker, lambda evs: any(isinstance(e, BrokerTrade) for e in evs))
    got += broker.drain_events()

    # Assert: the statuses came from the feed; the only reads are the one trade book read.
    assert after_place == ["place_order"]
    assert apis(ofake, n) == ["place_order", "trade_report"]
    assert [e.status for e in got if isinstance(e, BrokerOrderStatus)] == ["ACK", "OPEN", "COMPLETE"]
    assert [(e.broker_order_id, e.quantity) for e in got if isinstance(e, BrokerTrade)] == [(order_no, 5)]


def test_complete_before_the_trade_book_reads_the_trade_book_until_the_trade_is_there(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    live(broker)
    broker.drain_events()
    order_no = broker.place(reliance("np0002")).broker_order_id
    ofake.fill(order_no, hold_trade=True)
    got = drain_until(broker, lambda evs: any(getattr(e, "status", "") == "COMPLETE" for e in evs))
    assert not [e for e in got if isinstance(e, BrokerTrade)]
    n = len(ofake.requests())
    assert broker.drain_events() == [] and apis(ofake, n) == ["trade_report"]  # still missing: asked again

    ofake.release_trades()
    trades = [e for e in broker.drain_events() if isinstance(e, BrokerTrade)]
    assert [t.quantity for t in trades] == [5]
    n = len(ofake.requests())
    assert broker.drain_events() == [] and apis(ofake, n) == []  # caught up: nothing read


def test_a_reconnect_resends_state_without_a_duplicate_fill_or_a_status_going_back(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: one order filled (COMPLETE, its trade taken), one resting.
    live(broker)
    broker.drain_events()
    done = broker.place(reliance("np0003")).broker_order_id
    resting = broker.place(reliance("np0004")).broker_order_id
    ofake.fill(done)
    drain_until(broker, lambda evs: any(isinstance(e, BrokerTrade) for e in evs))
    broker.drain_events()

    # Act: the connection drops; the feed comes back and resends every order; and an old
    # frame of the filled order (OPEN, nothing filled) arrives late.
    ofake.order_feed_drop()
    eventually(lambda: feed_state(broker) != LIVE, timeout=3, message="the feed seen down")
    eventually(lambda: feed_state(broker) == LIVE, timeout=5, message="the feed back")
    stale = {**ofake.order(done), "ordSt": "open", "fldQty": 0, "unFldSz": 5, "avgPrc": "0.00"}
    ofake.order_feed_push(json.dumps({"type": "order", "data": stale}))
    time.sleep(0.2)
    got = broker.drain_events() + broker.drain_events()

    # Assert: nothing new (the book read after the reconnect matched what was known).
    assert [e for e in got if isinstance(e, BrokerTrade)] == []
    assert [(e.broker_order_id, e.status) for e in got if isinstance(e, BrokerOrderStatus)] == []
    assert ofake.order_feed()["stats"]["sessions"] == 2
    assert {resting, done} <= {o["nOrdNo"] for o in ofake.orders()}


def test_a_frame_before_the_place_reply_comes_out_with_the_clients_tag(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    live(broker)
    broker.drain_events()
    ofake.hang_next_place(seconds=1.0)  # the order is in the book; its reply is late
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(broker.place, reliance("np0005"))
        got = drain_until(broker, lambda evs: any(getattr(e, "status", "") == "OPEN" for e in evs))
        assert not fut.done()  # the feed was first
        ack = fut.result(timeout=5)
    assert {(e.broker_order_id, e.client_tag) for e in got} == {(ack.broker_order_id, "np0005")}


def test_a_refused_session_leaves_polling_and_the_next_login_opens_the_feed_again(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    ofake.order_feed(refuse_auth=True)
    broker.login()
    eventually(lambda: feed_state(broker) == POLLING and "refused" in broker.order_feed_status()["note"],
               timeout=5, message="the refusal seen")  # fmt: skip
    time.sleep(1.0)
    assert ofake.order_feed()["stats"]["connections"] == 1  # no retry with a refused session
    n = len(ofake.requests())
    broker.drain_events()
    broker.drain_events()
    assert apis(ofake, n).count("order_book") == 2  # polling at the old rate

    ofake.order_feed(refuse_auth=False)
    live(broker)  # a login re-opens it


def test_no_ack_keeps_polling_until_an_order_frame_proves_the_session(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    ofake.order_feed(ack=False, resend=False)
    broker.login()
    time.sleep(0.3)
    assert feed_state(broker) == DOWN
    n = len(ofake.requests())
    broker.drain_events()
    assert "order_book" in apis(ofake, n)
    broker.place(reliance("np0006"))
    eventually(lambda: feed_state(broker) == LIVE, timeout=3, message="LIVE on the first order frame")


def test_a_dead_feed_server_is_polled_over_and_retried_with_backoff(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    live(broker)
    ofake.order_feed(refuse_connections=True)
    ofake.order_feed_drop()
    eventually(lambda: feed_state(broker) == DOWN, timeout=2, message="DOWN at once")
    before = ofake.order_feed()["stats"]["attempts"]
    time.sleep(2.0)
    tries = ofake.order_feed()["stats"]["attempts"] - before
    assert 1 <= tries <= 3  # backing off (0.5 s, 1 s, 2 s ...), not hammering
    n = len(ofake.requests())
    broker.drain_events()
    assert "order_book" in apis(ofake, n)
    ofake.order_feed(refuse_connections=False)
    eventually(lambda: feed_state(broker) == LIVE, timeout=6, message="back after the backoff")
