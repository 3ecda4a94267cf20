"""Execution (``execution.broker=kotak``, the real SDK) against the Kotak REST fake under the
ordinary broker faults of issue 10, paths 1, 2, 5 and 6: status before trade, a cancel that
fails once, risk giving up on an order while execution is stalled, and an empty order book.

Each test drives the real execution process the way test_execution_kotak.py does (the test
plays risk with ``ExecuteOrder``; path 5 runs the real risk process too) and reads the truth
from the fake's control API: what reached the broker, and what is live in its book.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import RequestTimeout
from libs.common.messages import ExecuteOrder, GetOrders, OrderRequest, Reply, RiskVerdict
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually, free_base_port
from tests.integration.risk_support import Stack, has_execution_service
from tests.integration.test_execution_service import ExecStack

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")

# RELIANCE-EQ (tick 0.10) is in both the repository's master and the fake's.
ENTRY = Decimal("1290.00")
STOP_LOSS = Decimal("1280.00")
TARGET = Decimal("1300.00")
QTY = 5
BROKER_TIMEOUT_S = 1.0
BOOK_LAG_S = 4.0  # short, so a test need not wait Kotak's 30 s default
LIVE_AT_KOTAK = {"open", "trigger pending", "open pending", "validation pending", "put order req received"}


def kotak_env(fake: KotakRestFake) -> dict[str, str]:
    c = fake.credentials
    return {
        "NEOPULSE_EXECUTION__BROKER": "kotak",
        "NEOPULSE_LIVE": "1",
        "NEOPULSE_EXECUTION__BROKER_TIMEOUT_S": str(BROKER_TIMEOUT_S),
        "NEOPULSE_EXECUTION__BOOK_LAG_S": str(BOOK_LAG_S),
        "NEOPULSE_EXECUTION__RECONCILE_S": "1",
        "NEOPULSE_KOTAK__CONSUMER_KEY": c.consumer_key,
        "NEOPULSE_KOTAK__MOBILE": c.mobile_number,
        "NEOPULSE_KOTAK__UCC": c.ucc,
        "NEOPULSE_KOTAK__MPIN": c.mpin,
        "NEOPULSE_KOTAK__TOTP_SECRET": c.totp_secret,
        "NEOPULSE_KOTAK__BASE_URL": fake.base_url,
        "NEOPULSE_KOTAK__SFEED_URL": "ws://127.0.0.1:9/feed",
    }


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url, quotes={"RELIANCE-EQ": 1290.0}, **kotak_env(fake))
    try:
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------------------ helpers


def bracket_entry(stack: ExecStack) -> ExecuteOrder:
    return stack.order(qty=QTY, price=str(ENTRY), stop_loss=STOP_LOSS, target=TARGET)


def kind_of(body: dict[str, Any]) -> str:
    """What a place_order body is in this file's orders: the entry buys, the legs sell."""
    if body.get("tt") == "B":
        return "entry"
    return "stop" if body.get("pt") == "SL" else "target"


def places(fake: KotakRestFake, kind: str) -> list[dict[str, Any]]:
    """Every place_order of ``kind`` the broker received (a duplicate shows up here)."""
    return [r for r in fake.received_orders() if isinstance(r["body"], dict) and kind_of(r["body"]) == kind]


def book_rows(fake: KotakRestFake, kind: str) -> list[dict[str, Any]]:
    """The broker's order-book rows of ``kind`` (the control view: the truth, not a fault)."""
    tags = {r["tag"] for r in places(fake, kind)}
    return [o for o in fake.orders() if o["GuiOrdId"] in tags]


def live_rows(fake: KotakRestFake, kind: str) -> list[dict[str, Any]]:
    return [o for o in book_rows(fake, kind) if o["ordSt"] in LIVE_AT_KOTAK]


def ledger(stack: ExecStack, order_id: str) -> dict[str, Any]:
    return stack.find(order_id)


def legs(stack: ExecStack, entry_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"STOP": [], "TARGET": []}
    for o in stack.orders():
        if o["parent_id"] == entry_id and o["purpose"] in out:
            out[o["purpose"]].append(o)
    return out


def at_broker(stack: ExecStack, order_id: str, timeout: float = 10) -> dict[str, Any]:
    """The ledger row once the broker acknowledged it (broker order id known, row OPEN)."""

    def acked() -> dict[str, Any] | None:
        o = ledger(stack, order_id)
        return o if o["broker_order_id"] and o["status"] == "OPEN" else None

    return eventually(acked, timeout=timeout, message=f"order {order_id} OPEN at the broker")


def wait_requests(fake: KotakRestFake, api: str, more: int, where: Callable[[dict[str, Any]], bool] = bool,
                  timeout: float = 10, message: str = "") -> None:  # fmt: skip
    """Wait until the fake logged ``more`` further requests of ``api`` matching ``where``."""
    before = sum(1 for r in fake.requests(api=api) if where(r))
    eventually(lambda: sum(1 for r in fake.requests(api=api) if where(r)) >= before + more, timeout=timeout,
               interval=0.1, message=message or f"{more} more {api} requests")  # fmt: skip


def settle(fake: KotakRestFake, polls: int = 2) -> None:
    """Let execution look at the books ``polls`` more times (its status poll runs every second)."""
    wait_requests(fake, "order_book", polls, timeout=5 + 2 * polls, message=f"{polls} more order-book polls")


def protected_bracket(stack: ExecStack, fake: KotakRestFake) -> tuple[dict[str, Any], str, str]:
    """An entry with stop and target, filled in the ordinary way: (entry row, stop no, target no)."""
    placed = stack.ok(bracket_entry(stack))
    entry = at_broker(stack, placed["order_id"])
    fake.fill(entry["broker_order_id"])
    found = eventually(lambda: (lg := legs(stack, entry["order_id"]))["STOP"] and lg["TARGET"] and lg,
                       timeout=10, message="stop and target legs in the ledger")  # fmt: skip
    stop = at_broker(stack, found["STOP"][0]["order_id"])
    target = at_broker(stack, found["TARGET"][0]["order_id"])
    return entry, stop["broker_order_id"], target["broker_order_id"]


# ------------------------------------------------------------------ path 1: status before trade


def test_entry_reported_complete_before_its_trade_gets_one_stop_and_one_target_when_the_trade_arrives(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a bracket entry resting at Kotak.
    stack.start()
    placed = stack.ok(bracket_entry(stack))
    entry = at_broker(stack, placed["order_id"])

    # Act: it fills; the order book says COMPLETE at once, the trade book only three looks later.
    fake.fill(entry["broker_order_id"], trade_after_polls=3)

    # Assert: the trade reached execution (the harness did its part) ...
    eventually(lambda: ledger(stack, entry["order_id"])["filled_qty"] == QTY, timeout=15,
               message="the entry's trade in the ledger")  # fmt: skip
    # ... and the position it opened is protected: one stop and one target live at Kotak.
    eventually(lambda: live_rows(fake, "stop") and live_rows(fake, "target"), timeout=8,
               message="a live stop and target at the broker once the entry's trade arrived")  # fmt: skip
    settle(fake)
    assert (len(places(fake, "stop")), len(places(fake, "target"))) == (1, 1)
    assert (len(live_rows(fake, "stop")), len(live_rows(fake, "target"))) == (1, 1)
    assert stack.positions().get(("s1", "RELIANCE-EQ"), 0) == QTY


def test_stop_reported_complete_before_its_trade_does_not_place_a_second_stop(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a filled entry protected by its stop and target.
    stack.start()
    entry, stop_no, target_no = protected_bracket(stack, fake)

    # Act: the stop triggers and fills; Kotak says COMPLETE before the trade shows.
    fake.fill(stop_no, trade_after_polls=3)

    # Assert: the stop's trade reached execution, no second stop was ever sent, and the target
    # (the other side of the OCO) is cancelled at the broker.
    eventually(lambda: stack.positions().get(("s1", "RELIANCE-EQ"), 0) == 0, timeout=15,
               message="the stop's trade flattening the position")  # fmt: skip
    settle(fake)
    assert len(places(fake, "stop")) == 1, "a second stop was placed while the first one's trade was coming"
    eventually(lambda: fake.order(target_no)["ordSt"] == "cancelled", timeout=10,
               message="the target cancelled at the broker")  # fmt: skip
    assert not live_rows(fake, "stop") and not live_rows(fake, "target")
    assert ledger(stack, entry["order_id"])["status"] == "COMPLETE"


# --------------------------------------------------------- path 2: a cancel that fails once


@pytest.mark.parametrize("fault", ["timeout", "5xx"])
def test_stop_whose_first_cancel_fails_is_cancelled_after_the_target_fills(
    stack: ExecStack, fake: KotakRestFake, fault: str
) -> None:
    # Arrange: a protected position; the first cancel of its stop will fail.
    stack.start()
    _, stop_no, target_no = protected_bracket(stack, fake)
    if fault == "timeout":  # the fake answers after the client's 1 s timeout; the stop stays live
        fake.fail_next_cancel(stop_no, mode="timeout", seconds=BROKER_TIMEOUT_S + 1.5)
    else:
        fake.fail_next_cancel(stop_no, mode="error", status=503)

    # Act: the target fills, so the stop must go.
    fake.fill(target_no)

    # Assert: the failed cancel happened, and the stop is cancelled at Kotak within bounded time.
    wait_requests(fake, "cancel_order", 1, lambda r: r.get("order_no") == stop_no and bool(r.get("fault")),
                  timeout=15, message="the failing cancel of the stop")  # fmt: skip
    eventually(lambda: fake.order(stop_no)["ordSt"] == "cancelled", timeout=20,
               message="the stop cancelled at the broker (the failed cancel retried)")  # fmt: skip
    assert stack.positions().get(("s1", "RELIANCE-EQ"), 0) == 0
    assert len(places(fake, "stop")) == 1


def test_stop_whose_cancel_failed_is_cancelled_after_execution_restarts(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a protected position; every cancel of its stop fails until execution restarts.
    stack.start()
    _, stop_no, target_no = protected_bracket(stack, fake)
    fake.fail_next_cancel(stop_no, mode="error", status=503, count=None)
    fake.fill(target_no)
    wait_requests(fake, "cancel_order", 1, lambda r: r.get("order_no") == stop_no and bool(r.get("fault")),
                  timeout=15, message="the failing cancel of the stop")  # fmt: skip
    eventually(lambda: stack.positions().get(("s1", "RELIANCE-EQ"), 0) == 0, timeout=10,
               message="the target's fill in the ledger")  # fmt: skip

    # Act: restart execution between the failed cancel and its retry; Kotak answers again.
    stack.stop()
    fake.clear_faults()
    stack.start()

    # Assert: the restarted execution still owes that cancel and sends it.
    eventually(lambda: fake.order(stop_no)["ordSt"] == "cancelled", timeout=20,
               message="the stop cancelled at the broker after the restart")  # fmt: skip
    assert len(places(fake, "stop")) == 1


# ------------------------------------------- path 5: risk and execution agree after a timeout


REQUEST_TIMEOUT_MS = 1500  # risk -> execution: 0.4 x this per attempt, two attempts


@pytest.fixture
def risk_stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[Stack]:
    s = Stack(tmp_path / "home", free_base_port(), NEOPULSE_DATABASE__URL=pg_url,
              NEOPULSE_BUS__REQUEST_TIMEOUT_MS=REQUEST_TIMEOUT_MS, **kotak_env(fake))  # fmt: skip
    try:
        yield s
    finally:
        for proc in s.procs.values():  # never leave a stopped process behind
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        s.close()


def ask_risk(s: Stack, rid: str, price: str) -> RiskVerdict:
    """What a strategy hears from risk, within the strategy's own request timeout."""
    req = OrderRequest(request_id=rid, strategy_id="s5", side="BUY", symbol="RELIANCE-EQ", quantity=1,
                       price=Decimal(price))  # fmt: skip
    try:
        reply = s.ask("risk_rep", req, timeout_ms=REQUEST_TIMEOUT_MS)
    except RequestTimeout:
        raise AssertionError("the strategy heard nothing from risk within its own timeout") from None
    assert isinstance(reply, RiskVerdict), reply
    return reply


def test_an_order_risk_answered_not_placed_while_execution_stalled_is_never_placed(
    risk_stack: Stack, fake: KotakRestFake
) -> None:
    # Arrange: risk and execution (Kotak) running; one order goes through, to show the path works.
    s = risk_stack
    execution = s.start("execution")
    s.start("risk")
    eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
    first = eventually(lambda: (v := ask_risk(s, f"p5-ok-{time.monotonic_ns()}", "1000.0")).approved and v,
                       timeout=10, message="an approved order through risk")  # fmt: skip
    eventually(lambda: len(fake.received_orders()) == 1, timeout=10, message="the first order at the broker")

    # Act: execution stalls (SIGSTOP) for longer than two of risk's request timeouts while a
    # second order is sent through risk; then it resumes.
    stall_s = 2 * 0.4 * REQUEST_TIMEOUT_MS / 1000 + 2.5
    os.kill(execution.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        verdict = ask_risk(s, "p5-stalled", "1001.0")
        time.sleep(max(0.0, stall_s - (time.monotonic() - t0)))
    finally:
        os.kill(execution.pid, signal.SIGCONT)

    # Assert: the strategy was told "not placed" ...
    assert not verdict.approved and not verdict.order_id, verdict
    # ... and execution, once it caught up, did not place it behind risk's back.
    eventually(lambda: isinstance(s.ask("execution_rep", GetOrders(limit=1000)), Reply), timeout=10,
               message="execution answering again")  # fmt: skip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(fake.received_orders()) == 1:
        time.sleep(0.1)
    sent = [r["body"].get("pr") for r in fake.received_orders() if isinstance(r["body"], dict)]
    assert sent == ["1000.00"], f"the broker received an order risk had answered 'not placed': {sent}"
    assert first.order_id


# --------------------------------------------------------- path 6: one empty book is not the truth


def test_one_empty_order_book_does_not_close_live_orders_or_double_the_legs(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a protected position and a resting buy, older than the book lag.
    stack.start()
    entry, stop_no, target_no = protected_bracket(stack, fake)
    resting = at_broker(stack, stack.ok(stack.order(qty=1, price="1000.00", strategy="s6"))["order_id"])
    time.sleep(BOOK_LAG_S + 0.5)  # older than book_lag_s: one empty snapshot used to close them
    live_ids = {o["order_id"] for o in (*legs(stack, entry["order_id"])["STOP"],
                                        *legs(stack, entry["order_id"])["TARGET"], resting)}  # fmt: skip

    # Act: for 1.5 s Kotak answers "No Data" for the order book and the trade book.
    fake.empty_books(order_book=-1, trade_book=-1, seconds=1.5)

    # Assert: reconciliation did see an empty snapshot (the trade book is read by it) ...
    wait_requests(fake, "trade_report", 1, lambda r: r.get("fault") == "empty_book", timeout=5,
                  message="a reconcile reading the empty books")  # fmt: skip
    wait_requests(fake, "trade_report", 2, lambda r: not r.get("fault"), timeout=8,
                  message="two reconciles on the real books afterwards")  # fmt: skip
    # ... the live orders are still OPEN in the ledger ...
    statuses = {o["order_id"]: (o["purpose"], o["status"], o["reason"]) for o in stack.orders()
                if o["order_id"] in live_ids}  # fmt: skip
    assert {v[1] for v in statuses.values()} == {"OPEN"}, statuses
    # ... and no second stop or target was placed beside the live ones.
    assert (len(places(fake, "stop")), len(places(fake, "target"))) == (1, 1)
    assert [o["nOrdNo"] for o in live_rows(fake, "stop")] == [stop_no]
    assert [o["nOrdNo"] for o in live_rows(fake, "target")] == [target_no]

    # Act: the order book stays "No Data" for longer than book_lag_s. Kotak's day book keeps every
    # order it acknowledged today, so such a book is not whole however long it lasts.
    fake.empty_books(order_book=-1)
    time.sleep(BOOK_LAG_S + 1.0)
    wait_requests(fake, "order_book", 3, lambda r: r.get("fault") == "empty_book", timeout=8,
                  message="reconciles reading the empty order book")  # fmt: skip

    # Assert: nothing was closed from it, nothing was placed beside the live orders, and the
    # operator can see why in execution's log.
    assert all(ledger(stack, oid)["status"] == "OPEN" for oid in live_ids)
    assert (len(places(fake, "stop")), len(places(fake, "target"))) == (1, 1)
    assert "broker_book_incomplete" in (stack.home / "log" / "execution.log").read_text()
    fake.clear_faults()
