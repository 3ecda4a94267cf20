"""kill -9 at the worst moments, with the paper broker: (a) after the PENDING_BROKER commit and
before the broker call, (b) after the broker accepted and before the ack was written. After a
restart, reconciliation leaves every row right, no order reached the broker twice, and
positions equal the sum of fills."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import RequestTimeout
from libs.common.messages import Reply
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack


@pytest.fixture
def stack(tmp_path: Path, pg_url: str) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url)
    yield s
    s.close()


def _send_and_die(stack: ExecStack, crash_at: str, *orders: Any) -> None:
    stack.start(NEOPULSE_TEST_CRASH_AT=crash_at)
    for cmd in orders:
        try:
            reply = stack.ask(cmd, timeout_ms=1500)
            assert isinstance(reply, Reply)
        except RequestTimeout:
            pass  # it may die before answering
        if stack.proc is not None and stack.proc.poll() is not None:
            break
    assert stack.proc is not None
    assert stack.proc.wait(10) == -signal.SIGKILL
    assert "test_crash" in (stack.home / "log" / "execution.log").read_text()


def _consistent(stack: ExecStack) -> None:
    places = stack.journal_places()
    assert all(n == 1 for n in places.values()), f"an order reached the broker twice: {places}"
    positions = {k: v for k, v in stack.positions().items() if v}
    assert positions == {k: v for k, v in stack.fills_sum().items() if v}
    assert not [o for o in stack.orders() if o["status"] in ("PENDING_BROKER", "UNKNOWN", "ACK")]


def test_kill_9_after_the_pending_commit_before_the_broker_call(stack: ExecStack) -> None:
    cmd = stack.order(qty=7)
    _send_and_die(stack, "after_pending", cmd)
    assert stack.journal_places() == {}  # the broker never saw it

    stack.start()  # restart without the crash switch: reconciliation closes it after two books

    def closed() -> dict[str, Any] | None:
        [row] = [o for o in stack.orders() if o["request_id"] == cmd.request_id]
        return row if row["status"] != "PENDING_BROKER" else None

    row = eventually(closed, timeout=10)
    assert row["status"] == "REJECTED" and "never reached the broker" in row["reason"]
    again = stack.ask(cmd)  # the strategy's retry is answered from the ledger, not re-sent
    assert isinstance(again, Reply) and (again.ok, again.code) == (False, "rejected")
    assert again.data["order_id"] == row["order_id"] and again.data["status"] == "REJECTED"
    _consistent(stack)
    assert stack.journal_places() == {}
    fresh = stack.ok(stack.order(qty=2))
    eventually(lambda: stack.find(fresh["order_id"])["status"] == "COMPLETE", timeout=5)
    _consistent(stack)


def test_kill_9_after_the_broker_accepted_before_the_ack_was_written(stack: ExecStack) -> None:
    filled = stack.order(qty=4)  # marketable: the paper broker fills it at once
    _send_and_die(stack, "after_broker", filled)
    [tag] = stack.journal_places()

    stack.start()

    [row] = [o for o in stack.orders() if o["request_id"] == filled.request_id]
    assert row["client_tag"] == tag
    assert row["status"] == "COMPLETE" and row["filled_qty"] == 4 and len(row["fills"]) == 1
    assert row["broker_order_id"]
    assert stack.positions()[("s1", "RELIANCE-EQ")] == 4
    _consistent(stack)


def test_kill_9_after_a_resting_order_was_accepted(stack: ExecStack) -> None:
    resting = stack.order(qty=3, price="1200.00")
    _send_and_die(stack, "after_broker", resting)
    stack.start()
    [row] = [o for o in stack.orders() if o["request_id"] == resting.request_id]
    assert row["status"] == "OPEN" and row["broker_order_id"]
    stack.feed.set("RELIANCE-EQ", 1199.0)  # the market comes down to it after the restart
    eventually(lambda: stack.find(row["order_id"])["status"] == "COMPLETE", timeout=5)
    assert stack.positions()[("s1", "RELIANCE-EQ")] == 3
    _consistent(stack)


def test_bracket_survives_kill_9_and_the_target_fill_cancels_the_stop(stack: ExecStack) -> None:
    # Arrange: a bracketed BUY fills; the protective stop is live at the (paper) broker.
    from decimal import Decimal

    stack.start()
    entry = stack.ok(stack.order(qty=10, stop_loss=Decimal("1270.00"), target=Decimal("1300.00")))
    eventually(
        lambda: stack.find(entry["order_id"])["status"] == "COMPLETE", timeout=10, message="entry fill"
    )

    def legs() -> dict[str, dict[str, Any]]:
        return {o["purpose"]: o for o in stack.orders() if o["purpose"] in ("STOP", "TARGET")}

    live = eventually(lambda: (x := legs()).get("STOP", {}).get("status") == "OPEN" and x, timeout=10,
                      message="stop live at the broker")
    stop_tag = live["STOP"]["client_tag"]
    assert stack.journal_places().get(stop_tag) == 1

    # Act: kill -9, restart, then the price reaches the target.
    assert stack.kill9() == -signal.SIGKILL
    stack.start()
    stack.feed.set("RELIANCE-EQ", 1301.0)

    # Assert: the target leg filled, the stop was cancelled, nothing is open, flat position,
    # and no leg reached the broker twice.
    done = eventually(
        lambda: (x := legs()).get("TARGET", {}).get("status") == "COMPLETE"
        and x["STOP"]["status"] == "CANCELLED" and x,
        timeout=15, message="target filled and stop cancelled",
    )
    assert done["TARGET"]["filled_qty"] == 10
    assert not [o for o in stack.orders() if o["status"] not in ("COMPLETE", "CANCELLED", "REJECTED")]
    assert stack.positions().get(("s1", "RELIANCE-EQ"), 0) == 0
    _consistent(stack)
