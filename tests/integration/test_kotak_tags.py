"""Kotak rewrites an order's tag (``GuiOrdId``) on modify and cancel (users of the v2 SDK, issue
#33). Once an order is acknowledged NeoPulse matches it by Kotak's order number: with the Kotak
REST fake rewriting tags, a bracket's legs are still resized and cancelled, their trades still
land on the right rows, and no "orphan order" alert fires.

The fake's rewritten tags start with ``np`` like NeoPulse's own, so a match by tag would find no
row and raise the orphan alert (execution alerts only for ``np`` tags).
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.messages import Alert
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.risk_support import has_execution_service
from tests.integration.test_execution_kotak_faults import (
    QTY,
    at_broker,
    bracket_entry,
    kotak_env,
    legs,
    settle,
)
from tests.integration.test_execution_service import ExecStack

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url, quotes={"RELIANCE-EQ": 1290.0}, **kotak_env(fake))
    try:
        yield s
    finally:
        s.close()


def alerts(sub: Any, into: list[Alert]) -> list[Alert]:
    while (m := sub.recv(50)) is not None:
        if isinstance(m[1], Alert):
            into.append(m[1])
    return into


def test_a_bracket_resizes_and_cancels_by_order_number_when_kotak_rewrites_the_tags(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: Kotak rewrites the tag on every modify and cancel; a filled entry with its legs.
    fake.rewrite_tags("np")
    stack.start()
    sub = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    seen: list[Alert] = []
    entry = at_broker(stack, stack.ok(bracket_entry(stack))["order_id"])
    fake.fill(entry["broker_order_id"])
    found = eventually(lambda: (lg := legs(stack, entry["order_id"]))["STOP"] and lg["TARGET"] and lg,
                       timeout=10, message="stop and target legs in the ledger")  # fmt: skip
    stop = at_broker(stack, found["STOP"][0]["order_id"])
    target = at_broker(stack, found["TARGET"][0]["order_id"])
    stop_no, target_no = stop["broker_order_id"], target["broker_order_id"]

    # Act 1: the stop fills in part: the target is resized (a modify, which rewrites its tag).
    fake.fill(stop_no, qty=2)
    eventually(lambda: fake.order(target_no)["qty"] == QTY - 2, timeout=10,
               message="the target resized to what is still held")  # fmt: skip
    rewritten = fake.order(target_no)["GuiOrdId"]
    assert rewritten != target["client_tag"] and rewritten.startswith("np")
    settle(fake)  # the books with the rewritten tag are read (status poll and reconciliation)

    # Act 2: the target fills (its trade carries the rewritten tag), so the stop is cancelled
    # (which rewrites the stop's tag too).
    fake.fill(target_no, price=Decimal("1300.00"))
    eventually(lambda: stack.positions().get(("s1", "RELIANCE-EQ"), 0) == 0, timeout=15,
               message="the target's trade closing the position")  # fmt: skip
    eventually(lambda: fake.order(stop_no)["ordSt"] == "cancelled", timeout=10,
               message="the stop cancelled at Kotak")  # fmt: skip
    assert fake.order(stop_no)["GuiOrdId"] != stop["client_tag"]
    settle(fake, polls=3)

    # Assert: each row kept its own order number and the right fills; no leg was placed again;
    # nobody saw an orphan.
    eventually(lambda: stack.find(stop["order_id"])["status"] == "CANCELLED", timeout=5,
               message="the stop CANCELLED in the ledger")  # fmt: skip
    st = stack.find(stop["order_id"])
    assert (st["filled_qty"], st["broker_order_id"]) == (2, stop_no), st
    done = stack.find(target["order_id"])
    assert (done["status"], done["filled_qty"], done["quantity"]) == ("COMPLETE", QTY - 2, QTY - 2), done
    assert [o["broker_order_id"] for o in legs(stack, entry["order_id"])["STOP"]] == [stop_no]
    assert [o["broker_order_id"] for o in legs(stack, entry["order_id"])["TARGET"]] == [target_no]
    sells = [r for r in fake.received_orders() if isinstance(r["body"], dict) and r["body"].get("tt") == "S"]
    assert len(sells) == 2, "a leg was placed again"
    codes = [a.code for a in alerts(sub, seen)]
    assert "orphan_order" not in codes and "broker_row_bad" not in codes, codes
    sub.close()
