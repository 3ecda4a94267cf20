"""The whole paper pipeline from the Procfile: ticks → strategy → risk → execution → ledger."""

from __future__ import annotations

import json

import pytest

from tests.helpers import eventually, free_base_port
from tests.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack():
    s = Stack(free_base_port()).start()
    yield s
    s.remove()


def test_momentum_order_reaches_the_ledger_and_fills_then_ctrl_c_stops_everything(stack: Stack) -> None:
    # Arrange: the stack is up when every service answers status.
    def all_up():
        res = stack.cli("status", "--json")
        return res.returncode == 0 and json.loads(res.stdout)

    status = eventually(all_up, timeout=40, interval=0.5, message=f"all services up\n{stack.log()[-3000:]}")
    names = {s["service"] for s in status["services"]}
    assert {"feed", "risk", "execution", "notifier", "strategy-mom1"} <= names
    assert all(s["heartbeat_age_s"] < 3 for s in status["services"])

    # Act: wait for the momentum strategy's first filled order.
    def complete_order():
        orders = stack.cli_json("orders")
        return [o for o in orders or [] if o["status"] == "COMPLETE" and o["strategy_id"] == "mom1"]

    done = eventually(
        complete_order, timeout=30, interval=0.5, message=f"a COMPLETE order\n{stack.log()[-3000:]}"
    )

    # Assert: the order has its fill, each log is JSON naming service and pid, Ctrl-C is clean.
    order = done[0]
    assert order["fills"], order
    assert sum(f["quantity"] for f in order["fills"]) == order["filled_qty"] == order["quantity"]
    for service in ("feed", "risk", "execution", "notifier", "strategy-mom1"):
        lines = (stack.home / "log" / f"{service}.log").read_text().splitlines()
        assert lines, service
        first = json.loads(lines[0])
        assert first["service"] == service and isinstance(first["pid"], int)
    took = stack.stop()
    assert took < 5.0, f"stack took {took:.1f}s to stop\n{stack.log()[-2000:]}"
    assert stack.member_pids() == []


def test_status_names_risk_as_down_and_exits_3() -> None:
    # Arrange: every process of the Procfile except risk.
    stack = Stack(free_base_port()).start("feed", "strategy", "execution", "notifier")
    try:
        def others_up():
            r = stack.cli("status", "--json")
            if r.returncode != 3 or not r.stdout:
                return None
            services = {s["service"]: s for s in json.loads(r.stdout)["services"]}
            ups = [services[n]["up"] for n in ("feed", "execution", "notifier", "strategy-mom1")]
            return r if all(ups) else None

        # Act
        res = eventually(others_up, timeout=40, interval=0.5, message=f"others up\n{stack.log()[-3000:]}")

        # Assert: risk is named as down with its endpoint, and the exit code is 3.
        services = {s["service"]: s for s in json.loads(res.stdout)["services"]}
        assert services["risk"]["up"] is False
        assert "risk" in res.stderr and str(stack.base_port + 102) in res.stderr
    finally:
        stack.stop()
        stack.remove()
