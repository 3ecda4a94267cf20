"""The execution service with ``execution.broker=kotak`` against the Kotak REST fake (the real
SDK underneath): broker calls in the thread pool, status by polling, a place that times out
resolved by tag without a second send, and kill -9 after the broker accepted."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import RequestTimeout
from libs.common.messages import GetFeedSession, GetStatus, Reply
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    c = fake.credentials
    s = ExecStack(
        tmp_path / "home",
        pg_url,
        quotes={"RELIANCE-EQ": 1290.0},
        NEOPULSE_EXECUTION__BROKER="kotak",
        NEOPULSE_EXECUTION__BROKER_TIMEOUT_S="1",
        NEOPULSE_LIVE="1",
        NEOPULSE_KOTAK__CONSUMER_KEY=c.consumer_key,
        NEOPULSE_KOTAK__MOBILE=c.mobile_number,
        NEOPULSE_KOTAK__UCC=c.ucc,
        NEOPULSE_KOTAK__MPIN=c.mpin,
        NEOPULSE_KOTAK__TOTP_SECRET=c.totp_secret,
        NEOPULSE_KOTAK__BASE_URL=fake.base_url,
        NEOPULSE_KOTAK__SFEED_URL="ws://127.0.0.1:9/feed",
    )
    yield s
    s.close()


def received(fake: KotakRestFake, tag: str) -> list[dict[str, Any]]:
    return [r for r in fake.received_orders() if tag.lower() in str(r).lower()]


def test_kotak_orders_run_in_the_pool_and_fills_arrive_by_polling(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    stack.start()
    lease = stack.ask(GetFeedSession())
    assert isinstance(lease, Reply) and lease.ok and lease.data["url"] == "ws://127.0.0.1:9/feed"

    placed = stack.ok(stack.order(qty=5, price="1200.00"))
    row = eventually(lambda: (o := stack.find(placed["order_id"]))["broker_order_id"] and o, timeout=10)
    assert row["status"] in ("ACK", "OPEN") and len(received(fake, placed["client_tag"])) == 1
    fake.fill(row["broker_order_id"])
    done = eventually(lambda: (o := stack.find(placed["order_id"]))["status"] == "COMPLETE" and o, timeout=10)
    assert done["filled_qty"] == 5 and len(done["fills"]) == 1
    assert stack.positions()[("s1", "RELIANCE-EQ")] == 5

    # a place that times out: found by its tag in the broker's book — never sent twice
    fake.hang_next_place(seconds=3)
    hung = stack.ok(stack.order(qty=2, price="1200.00"))
    found = eventually(lambda: (o := stack.find(hung["order_id"]))["status"] == "OPEN" and o, timeout=15)
    assert found["broker_order_id"] and len(received(fake, hung["client_tag"])) == 1
    eventually(lambda: stack.ok(GetStatus())["unknown"] == 1, timeout=10, message="the lost place reply")
    assert stack.find(hung["order_id"])["status"] == "OPEN" and len(received(fake, hung["client_tag"])) == 1

    # the broker call -> ack hop is timed on the pool's threads too: both places, the hung one as well
    def place_hop() -> dict[str, Any] | None:
        res = stack.cli("status", "--latency", "--json", "-s", "execution")
        hops = json.loads(res.stdout)["latency"] if res.stdout else []
        rows = [r for r in hops if r["hop"] == "broker_place"]
        return rows[0] if rows and rows[0]["count"] >= 2 else None

    hop = eventually(place_hop, timeout=10, message="broker_place counted in execution's heartbeat")
    assert hop["service"] == "execution" and hop["max"] >= 1_000_000  # us: the hung place, timed out at 1 s


def test_kotak_kill_9_after_the_broker_accepted(stack: ExecStack, fake: KotakRestFake) -> None:
    stack.start(NEOPULSE_TEST_CRASH_AT="after_broker")
    cmd = stack.order(qty=3, price="1200.00")
    with contextlib.suppress(RequestTimeout):
        stack.ask(cmd, timeout_ms=3000)
    assert stack.proc is not None and stack.proc.wait(15) == -signal.SIGKILL
    [sent] = fake.received_orders()

    stack.start()

    row = eventually(
        lambda: (
            (o := next(x for x in stack.orders() if x["request_id"] == cmd.request_id))["status"] == "OPEN"
            and o
        ),
        timeout=10,
    )
    assert row["broker_order_id"] and len(fake.received_orders()) == 1
    assert row["client_tag"].lower() in str(sent).lower()
    again = stack.ok(cmd)  # the retry is answered from the ledger
    assert again["order_id"] == row["order_id"] and len(fake.received_orders()) == 1


def test_kotak_kill_9_after_the_pending_commit_before_the_broker_call(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: execution dies right after committing PENDING_BROKER, before calling Kotak.
    stack.start(NEOPULSE_TEST_CRASH_AT="after_pending")
    cmd = stack.order(qty=4, price="1200.00")
    with contextlib.suppress(RequestTimeout):
        stack.ask(cmd, timeout_ms=3000)
    assert stack.proc is not None and stack.proc.wait(15) == -signal.SIGKILL
    assert fake.received_orders() == []

    # Act: restart; the book lag is shortened so the test need not wait Kotak's 30 s default.
    stack.start(NEOPULSE_EXECUTION__BOOK_LAG_S="1.5")

    # Assert: the row is closed as never sent, nothing reached Kotak, and a retry of the same
    # request is answered from the ledger instead of placing a second order.
    row = eventually(
        lambda: (
            (o := next(x for x in stack.orders() if x["request_id"] == cmd.request_id))["status"]
            == "REJECTED"
            and o
        ),
        timeout=15,
    )
    assert "never reached the broker" in row["reason"]
    again = stack.ask(cmd)
    assert isinstance(again, Reply) and not again.ok and again.data["order_id"] == row["order_id"]
    assert fake.received_orders() == []
    assert not [o for o in stack.orders() if o["status"] in ("PENDING_BROKER", "UNKNOWN", "ACK")]
    assert {k: v for k, v in stack.positions().items() if v} == {}


def test_kotak_a_trailing_stop_is_modified_at_the_broker_as_the_price_rises(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a BUY 5 at 1290 with a 10-point trail, filled at Kotak; its stop rests at 1280.
    stack.start()
    placed = stack.ok(stack.order(qty=5, price="1290.00", stop_loss=Decimal("1280.00"),
                                  target=Decimal("1400.00"), trail_points=Decimal("10")))  # fmt: skip
    row = eventually(lambda: (o := stack.find(placed["order_id"]))["broker_order_id"] and o, timeout=10)
    fake.fill(row["broker_order_id"])

    def stop_at_kotak() -> dict[str, Any] | None:
        legs = [o for o in stack.orders() if o["parent_id"] == placed["order_id"] and o["purpose"] == "STOP"]
        if not legs or not legs[0]["broker_order_id"]:
            return None
        return fake.order(legs[0]["broker_order_id"])

    first = eventually(stop_at_kotak, timeout=10, message="the stop leg at Kotak")
    assert (first["prcTp"], Decimal(first["trgPrc"])) == ("SL", Decimal("1280"))

    # Act: the price rises to 1300, then falls back to 1295.
    stack.feed.set("RELIANCE-EQ", 1300.0)
    moved = eventually(lambda: (o := stop_at_kotak()) and Decimal(o["trgPrc"]) == Decimal("1290") and o,
                       timeout=10, message="the stop modified to 1290 at Kotak")  # fmt: skip
    stack.feed.set("RELIANCE-EQ", 1295.0)
    time.sleep(1.5)  # longer than execution.trail_modify_every_s: a loosening would have gone out

    # Assert: the same order at Kotak (modified, not replaced), its limit moved with it, and
    # the stop did not come back down.
    again = stop_at_kotak()
    assert again is not None and again["nOrdNo"] == first["nOrdNo"] == moved["nOrdNo"]
    assert Decimal(again["trgPrc"]) == Decimal("1290") and Decimal(again["prc"]) < Decimal("1290")
    assert Decimal(again["prc"]) > Decimal(first["prc"])
