"""The kill switch in a paper stack (feed sim, risk, execution on its embedded PostgreSQL),
driven through the real CLI: it cancels every working opening order, not only strategy
entries, and a restart on the next trading day does not unlock it (issue 10, paths 7 and 8).

Every service runs with ``NEOPULSE_CLOCK_OFFSET_S``, so the test does not depend on the
wall clock: day one is the next weekday at 10:00 IST, day two the weekday after that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Any

import pytest

from libs.common.clock import IST, OFFSET_ENV
from tests.helpers import eventually, free_base_port
from tests.stack import Stack

pytestmark = pytest.mark.e2e

FAR_BELOW = "1000.0"  # the sim holds RELIANCE at 1290.5 (volatility 0): a BUY here rests
SERVICES = ("execution", "feed", "risk")
OPEN_STATES = {"PENDING_BROKER", "ACK", "OPEN", "UNKNOWN"}


def _weekday_on_or_after(day: date) -> date:
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day


def _offset_s(day: date, now: datetime) -> int:
    """Seconds to add to ``now`` so that the clock reads 10:00 IST on ``day``."""
    return round((datetime.combine(day, time(10, 0), IST) - now).total_seconds())


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack(free_base_port(),
              NEOPULSE_FEED__INSTRUMENTS='["RELIANCE-EQ"]', NEOPULSE_FEED__RECORD="false",
              NEOPULSE_FEED__SIM_VOLATILITY="0", NEOPULSE_FEED__SIM_RATE="20")
    try:
        yield s
    finally:
        for name in ("risk", "feed", "execution"):  # execution last: it stops its PostgreSQL
            if name in s.services:
                s.stop_service(name)
        s.remove()


def _start(stack: Stack, offset_s: int) -> None:
    for name in SERVICES:
        stack.start_service(name, **{OFFSET_ENV: offset_s})


def _risk_state(stack: Stack) -> dict[str, Any] | None:
    res = stack.cli("kill-switch", "status", "--json")
    if res.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def _day_loaded(stack: Stack) -> dict[str, Any]:
    def loaded() -> dict[str, Any] | None:
        for name, proc in stack.services.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{stack.service_output()}")
        state = _risk_state(stack)
        return state if state and state.get("day_loaded") else None

    return eventually(loaded, timeout=60, interval=0.5,
                      message=f"risk to load the day from execution\n{stack.service_output()}")


def _order(stack: Stack, order_id: str) -> dict[str, Any] | None:
    res = stack.cli("orders", "--json")
    assert res.returncode == 0, res.stderr
    return next((o for o in json.loads(res.stdout) if o["order_id"] == order_id), None)


def test_kill_switch_cancels_a_resting_manual_order_and_stays_on_the_next_trading_day(
    stack: Stack,
) -> None:
    # Arrange: the stack on day one, and a manual BUY far below the market, resting.
    now = datetime.now(IST)
    day_one = _weekday_on_or_after(now.date() + timedelta(days=1))
    day_two = _weekday_on_or_after(day_one + timedelta(days=1))
    _start(stack, _offset_s(day_one, now))
    state = _day_loaded(stack)
    assert state["trading_day"] == day_one.isoformat() and state["state"] == "ACTIVE", state

    res = stack.cli("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW, "--json")
    verdict = json.loads(res.stdout) if res.stdout.strip() else {"stderr": res.stderr}
    assert res.returncode == 0 and verdict["approved"], verdict
    order_id = verdict["order_id"]
    resting = eventually(lambda: (o := _order(stack, order_id)) and o["status"] == "OPEN" and o,
                         timeout=15, interval=0.25, message=f"manual order {order_id} to rest OPEN")
    assert resting["purpose"] == "MANUAL" and resting["filled_qty"] == 0, resting

    # Act: trip the kill switch.
    res = stack.cli("kill-switch", "on", "--reason", "e2e: resting manual order", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "HALTED"

    # Assert: the resting opening order is cancelled, like a strategy's entry.
    def settled() -> dict[str, Any] | None:
        o = _order(stack, order_id)
        return o if o and o["status"] not in OPEN_STATES else None

    try:
        final = eventually(settled, timeout=10, interval=0.25, message="the manual order to leave OPEN")
    except AssertionError:
        still = _order(stack, order_id) or {}
        pytest.fail(f"kill switch on, but the resting {still.get('purpose')} order {order_id} is still "
                    f"{still.get('status')} 10 s later")
    assert final["status"] == "CANCELLED", final

    # Act: restart risk and execution (and the feed) with the clock on the next trading day.
    for name in ("risk", "feed", "execution"):
        assert stack.stop_service(name) == 0, stack.service_output(name)
    _start(stack, _offset_s(day_two, now))

    # Assert: the switch is still on, and risk still refuses orders.
    state = _day_loaded(stack)
    assert state["trading_day"] == day_two.isoformat(), state
    # (RiskState omits its defaults: no "kill_switch" key means it is off.)
    assert (state["state"], state.get("kill_switch", False)) == ("HALTED", True), (
        f"a restart on the next trading day unlocked the kill switch: {state}")
    res = stack.cli("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW, "--json")
    verdict = json.loads(res.stdout)
    assert res.returncode == 1 and verdict["code"] == "halted", verdict
