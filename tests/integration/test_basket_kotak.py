"""A basket through the execution service with ``execution.broker=kotak`` against the Kotak REST
fake (the real SDK underneath): the long leg is placed first and fills; the short leg goes
only once the long is acked, and the fake rejects it after its ack. Execution closes the
filled long leg with a protected limit and raises the alert."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.messages import ExecuteBasket, basket_leg_id
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack
from tests.kit import execute_order


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    c = fake.credentials
    s = ExecStack(
        tmp_path / "home",
        pg_url,
        quotes={"RELIANCE-EQ": 1290.0, "INFY-EQ": 1510.0},
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


def tagged(fake: KotakRestFake, tag: str) -> list[dict[str, Any]]:
    return [r for r in fake.received_orders() if tag.lower() in str(r).lower()]


def test_a_basket_whose_second_leg_the_broker_rejects_ends_with_the_first_leg_closed(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    stack.start()
    rid = f"bk-{os.getpid()}"
    cmd = ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order("RELIANCE-EQ", "BUY", 5, "1290.00", rid=basket_leg_id(rid, 1), order_type="LIMIT"),
        execute_order("INFY-EQ", "SELL", 4, "1510.00", rid=basket_leg_id(rid, 2), order_type="LIMIT"),
    ])  # fmt: skip

    accepted = stack.ok(cmd)
    long_leg, short_leg = accepted["legs"]
    assert accepted["state"] == "PLACING_LONGS"
    row = eventually(lambda: (o := stack.find(long_leg["order_id"]))["broker_order_id"] and o, timeout=10)
    fake.fill(row["broker_order_id"])
    short = eventually(lambda: (o := stack.find(short_leg["order_id"]))["broker_order_id"] and o, timeout=10,
                       message="the short leg placed once the long was acked")  # fmt: skip
    first, second = fake.received_orders()
    assert long_leg["client_tag"].lower() in str(first).lower()  # the protective long went first
    assert short_leg["client_tag"].lower() in str(second).lower()
    eventually(lambda: stack.find(long_leg["order_id"])["status"] == "COMPLETE", timeout=10,
               message="the long leg's fill")
    fake.reject(short["broker_order_id"], "RMS:Rule: Check circuit limit including square off order exceeds")

    rejected = eventually(lambda: (o := stack.find(short_leg["order_id"]))["status"] == "REJECTED" and o,
                          timeout=15, message="the short leg rejected after its ack")  # fmt: skip
    assert "circuit limit" in rejected["reason"]
    close = eventually(lambda: next((o for o in stack.orders() if o["request_id"] == f"{rid}:undo1"), None),
                       timeout=15, message="the rollback close of the filled long leg")  # fmt: skip
    assert (close["side"], close["quantity"], close["symbol"], close["purpose"]) == ("SELL", 5, "RELIANCE-EQ",
                                                                                    "FLATTEN")
    placed = eventually(lambda: tagged(fake, close["client_tag"]), timeout=10,
                        message="the close at the broker")
    assert len(placed) == 1
    log = stack.output()
    assert "basket_failed" in log and "basket_rolled_back" in log
    assert stack.find(long_leg["order_id"])["status"] == "COMPLETE"

    again = stack.ok(cmd)  # a repeat of the basket is answered from the ledger: nothing placed twice
    assert again["basket_id"] == accepted["basket_id"] and len(fake.received_orders()) == 3
