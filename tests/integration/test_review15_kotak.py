"""Review 15 (adversarial): KotakBroker's order feed and daily session against the real SDK and the
protocol-level fakes (the REST fake, with ``--order-feed`` where the feed is needed). Each test showed
a defect found in review (it failed before the fix)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from libs.common.clock import IST, ManualClock
from libs.common.config import ExecutionConfig
from services.execution.brokers.base import BrokerError, BrokerOrderStatus, BrokerTemporary
from services.execution.brokers.kotak import KotakBroker
from services.execution.brokers.kotak_orderfeed import LIVE
from tests.fakes.kotak_rest import KotakRestFake, login_error
from tests.helpers import eventually
from tests.integration.test_kotak_broker import kotak_config, reliance

THURSDAY = dt.date(2026, 12, 3)  # an NSE trading day
SATURDAY = dt.date(2026, 12, 5)
INVALID_MPIN = login_error("401", "Invalid MPIN")


def ist_ns(day: dt.date, hh: int, mm: int) -> int:
    return int(dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST).timestamp() * 1e9)


@pytest.fixture
def ofake(tmp_path: Path) -> Iterator[KotakRestFake]:
    with KotakRestFake(tmp_path / "kotak-state.json", extra_args=["--order-feed"]) as running:
        yield running


@pytest.fixture
def broker(ofake: KotakRestFake) -> Iterator[KotakBroker]:
    b = KotakBroker(kotak_config(ofake), ExecutionConfig(broker_timeout_s=5.0, reconcile_s=60.0))
    yield b
    b.close()


def live(b: KotakBroker) -> None:
    b.login()
    eventually(lambda: b.order_feed_status()["state"] == LIVE, timeout=5, message="the order feed LIVE")
    b.drain_events()  # the first drain's full read of the books


def collect(b: KotakBroker, seconds: float) -> list[Any]:
    """Everything drain_events returns for ``seconds`` (as execution polls: every 50 ms here),
    a BrokerTemporary being "try again next time"."""
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(BrokerTemporary):
            got.extend(b.drain_events())
        time.sleep(0.05)
    return got


def statuses(events: list[Any], order_no: str) -> list[str]:
    return [e.status for e in events if isinstance(e, BrokerOrderStatus) and e.broker_order_id == order_no]


def test_review15_a_failed_trade_book_read_does_not_lose_the_feed_statuses_of_its_batch(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: two resting orders, the feed LIVE and caught up.
    live(broker)
    filled = broker.place(reliance("np0r01")).broker_order_id
    other = broker.place(reliance("np0r02")).broker_order_id
    assert "OPEN" in statuses(collect(broker, 0.5), other)

    # Act: one batch of frames: the first order fills, the second is cancelled at the exchange;
    # the trade-book read that the fill makes fails once (a 503).
    ofake.order_feed(mode="hold")
    ofake.fill(filled)
    ofake.exchange_cancel(other)
    ofake.fail_next("trade_report", status=503)
    ofake.order_feed_release()
    ofake.order_feed(mode="live")
    time.sleep(0.5)
    with pytest.raises(BrokerTemporary):
        broker.drain_events()
    got = collect(broker, 2.0)

    # Assert: the cancel is reported (its frame came; the feed is LIVE all along).
    assert "CANCELLED" in statuses(got, other), got


def test_review15_one_absurd_feed_frame_does_not_wedge_the_orders_later_updates(
    ofake: KotakRestFake, broker: KotakBroker
) -> None:
    live(broker)
    order_no = broker.place(reliance("np0r03")).broker_order_id
    collect(broker, 0.3)

    bogus = {**ofake.order(order_no), "fldQty": "1e30"}
    ofake.order_feed_push(json.dumps({"type": "order", "data": bogus}))
    collect(broker, 0.3)
    ofake.exchange_cancel(order_no)
    got = collect(broker, 2.0)

    assert "CANCELLED" in statuses(got, order_no), got


# ------------------------------------------------------------------ the daily session


def make_broker(fake: KotakRestFake, clock: ManualClock) -> KotakBroker:
    return KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0), clock=clock,
                       login_retry_s=(0.3,), totp_window_wait=False)  # fmt: skip


def test_review15_a_refused_mpin_is_not_sent_again_by_a_daily_login_that_waited_for_the_lock(
    fake: KotakRestFake,
) -> None:
    # Arrange: 08:45 on a trading day; Kotak refuses the MPIN (its answer 1 s late).
    b = make_broker(fake, ManualClock(ist_ns(THURSDAY, 8, 45)))
    fake.fail_next("totp_validate", status=401, body=INVALID_MPIN, count=5, delay_s=1.0)
    try:
        # Act: a lazy login (the status poll) is waiting for its MPIN answer when the daily
        # login looks whether it is due.
        with ThreadPoolExecutor(2) as pool:
            lazy = pool.submit(b.order_book)
            time.sleep(0.3)
            daily = pool.submit(b.login_if_due)
            for fut in (lazy, daily):
                with contextlib.suppress(BrokerError):
                    fut.result(timeout=15)
    finally:
        b.close()

    # Assert: a refused MPIN is never sent again (repeated wrong MPINs lock the account).
    assert len(fake.requests(api="totp_validate")) == 1


def test_review15_the_status_poll_does_not_log_in_at_midnight_on_a_non_trading_day(
    fake: KotakRestFake,
) -> None:
    clock = ManualClock(ist_ns(THURSDAY, 10, 0))
    b = make_broker(fake, clock)
    try:
        b.order_book()
        b.logout()
        assert len(fake.requests(api="totp_login")) == 1

        clock.set_ns(ist_ns(SATURDAY, 0, 5))
        with contextlib.suppress(BrokerError):
            b.drain_events()  # what execution's status poll does every second
    finally:
        b.close()

    assert len(fake.requests(api="totp_login")) == 1


def test_review15_a_saved_session_the_order_feed_refuses_is_replaced_by_one_fresh_login(
    ofake: KotakRestFake, tmp_path: Path
) -> None:
    # Arrange: a process logged in (its session saved); the feed then refuses that session.
    saved = tmp_path / "run" / "kotak-session.json"
    clock = ManualClock(ist_ns(THURSDAY, 10, 0))

    def fresh() -> KotakBroker:
        return KotakBroker(kotak_config(ofake), ExecutionConfig(broker_timeout_s=5.0), clock=clock,
                           session_file=saved, totp_window_wait=False)  # fmt: skip

    first = fresh()
    first.order_book()
    first.close()
    ofake.order_feed(refuse_auth=True)

    # Act: a restart takes the session back (REST answers on it) and its feed is refused.
    second = fresh()
    try:
        second.order_book()
        eventually(lambda: second.order_feed.health.session_refused, timeout=5, message="feed refused")
        ofake.order_feed(refuse_auth=False)
        relogged = second.login_if_due()

        # Assert: one fresh login, after which the feed is LIVE; no further login.
        eventually(lambda: second.order_feed_status()["state"] == LIVE, timeout=5, message="feed LIVE")
        again = second.login_if_due()
    finally:
        second.close()
    assert relogged and not again
    assert len(ofake.requests(api="totp_login")) == 2
