"""Baskets through the real processes on paper: ``neopulse trade --leg`` → risk → execution
(paper broker, real PostgreSQL) with the sim feed. A valid basket fills both legs; one whose
second leg is invalid is refused whole, naming that leg, and nothing of it reaches the ledger;
one whose short leg the paper broker's RMS rejects (more margin than ``paper.capital``) ends
with the long leg closed and an alert.
Then execution alone, killed with SIGKILL between two steps of a basket: the restart finishes
it from the ``baskets`` table (places the held short once, or rolls back)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import RequestTimeout
from libs.common.messages import ExecuteBasket, GetOrders, Reply, basket_leg_id
from tests.helpers import eventually, free_base_port
from tests.integration.conftest import cloned_db
from tests.integration.risk_support import Stack, has_execution_service
from tests.integration.test_execution_service import ExecStack
from tests.kit import execute_order

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory, pg_server: Any) -> Iterator[Stack]:
    with cloned_db(pg_server, f"np_basket_{os.getpid()}") as url:
        home = tmp_path_factory.mktemp("basket-stack") / "home"
        s = Stack(home, free_base_port(), NEOPULSE_DATABASE__URL=url,
                  NEOPULSE_FEED__INSTRUMENTS='["RELIANCE-EQ", "INFY-EQ"]', NEOPULSE_FEED__RECORD="false",
                  NEOPULSE_FEED__SIM_VOLATILITY="0", NEOPULSE_FEED__SIM_RATE="50")  # fmt: skip
        try:
            s.start("execution")
            s.start("feed")
            s.start("risk")
            eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
            yield s
        finally:
            s.close()


def ledger(s: Stack) -> dict[str, dict[str, Any]]:
    reply = s.ask("execution_rep", GetOrders(limit=1000))
    assert isinstance(reply, Reply) and reply.ok, reply
    return {o["request_id"]: o for o in reply.data}


def test_a_valid_basket_fills_both_legs(paper: Stack) -> None:
    code, out = paper.cli_json("trade", "--leg", "BUY RELIANCE-EQ 10 @1300", "--leg", "SELL INFY-EQ 5 @1480")

    assert code == 0, out
    assert out["approved"] is True and out["basket_id"]
    rid = out["request_id"]
    assert [v["request_id"] for v in out["legs"]] == [f"{rid}:leg1", f"{rid}:leg2"]
    assert all(v["order_id"] for v in out["legs"])
    rows = eventually(lambda: (r := ledger(paper)) and all(
        r.get(f"{rid}:leg{n}", {}).get("status") == "COMPLETE" for n in (1, 2)) and r,
        timeout=15, message="both legs to fill")  # fmt: skip
    assert (rows[f"{rid}:leg1"]["side"], rows[f"{rid}:leg1"]["filled_qty"]) == ("BUY", 10)
    assert (rows[f"{rid}:leg2"]["side"], rows[f"{rid}:leg2"]["filled_qty"]) == ("SELL", 5)


def test_a_basket_with_one_invalid_leg_is_refused_whole_naming_it(paper: Stack) -> None:
    code, out = paper.cli_json("trade", "--leg", "BUY RELIANCE-EQ 10 @1300",
                               "--leg", "SELL INFY-EQ 5 @1480.03")

    assert code == 1, out
    assert out["approved"] is False and out["code"] == "tick"
    assert out["reason"].startswith("leg 2 SELL 5 INFY-EQ @ 1480.03: price 1480.03 is not on tick size")
    assert [v["approved"] for v in out["legs"]] == [True, False]
    rid = out["request_id"]
    assert not any(k.startswith(rid) for k in ledger(paper))  # nothing of it was written or sent


def test_a_basket_whose_short_the_paper_rms_rejects_ends_with_the_long_closed_and_an_alert(
    paper: Stack,
) -> None:
    # 10 lots sold at the money block 0.12 x 25,900 x 650 = 2.0 million of margin: more than
    # paper.capital (1 million), so the paper broker rejects that leg once the long has filled
    # (limit prices: the options have no last price until risk asks the feed for them)
    code, out = paper.cli_json("trade", "--leg", "BUY NIFTY 25900 CE weekly 65 @900",
                               "--leg", "SELL NIFTY 25900 PE weekly 650 @0.05")  # fmt: skip

    assert code == 0 and out["approved"] is True, out
    rid = out["request_id"]
    rows = eventually(lambda: (r := ledger(paper)) and r.get(f"{rid}:leg2", {}).get("status") == "REJECTED"
                      and r, timeout=20, message="the short leg to be rejected")  # fmt: skip
    assert rows[f"{rid}:leg2"]["reason"].startswith(
        "RMS: insufficient funds: the order needs margin of 2,020,200.00 and ")
    long = rows[f"{rid}:leg1"]
    assert (long["side"], long["filled_qty"]) == ("BUY", 65)

    def closed() -> dict[str, Any] | None:
        closes = [o for o in ledger(paper).values() if o["symbol"] == long["symbol"] and o["side"] == "SELL"]
        return closes[0] if closes and closes[0]["filled_qty"] == 65 else None

    close = eventually(closed, timeout=20, message="the rollback to close the long leg")
    assert close["status"] == "COMPLETE"
    log = paper.output("execution")
    assert "basket_failed" in log and "basket_rolled_back" in log


def test_a_malformed_leg_is_a_usage_error(paper: Stack) -> None:
    result = paper.cli("trade", "--leg", "BUY RELIANCE-EQ ten", "--leg", "SELL INFY-EQ 5")

    assert result.returncode == 2
    assert "leg 'BUY RELIANCE-EQ ten': quantity 'ten' is not a whole number" in result.stderr


# ------------------------------------------------------------------ kill -9 in the middle


@pytest.fixture
def exec_stack(tmp_path: Path, pg_url: str) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url)
    yield s
    s.close()


def pair(s: ExecStack) -> ExecuteBasket:
    rid = f"bk-{os.getpid()}-{s.home.parent.name[-8:]}"
    return ExecuteBasket(request_id=rid, strategy_id="s1", legs=[
        execute_order("INFY-EQ", "BUY", 4, "1520.00", rid=basket_leg_id(rid, 1), order_type="LIMIT"),
        execute_order("TCS-EQ", "SELL", 2, "3000.00", rid=basket_leg_id(rid, 2), order_type="LIMIT"),
    ])  # fmt: skip


def leg_rows(s: ExecStack, rid: str) -> dict[int, dict[str, Any]]:
    return {n: o for o in s.orders() for n in (1, 2) if o["request_id"] == basket_leg_id(rid, n)}


def test_kill_9_after_the_long_reached_the_broker_the_restart_places_the_short_once(
    exec_stack: ExecStack,
) -> None:
    s = exec_stack
    s.start(NEOPULSE_TEST_CRASH_AT="after_broker")
    cmd = pair(s)
    with contextlib.suppress(RequestTimeout):
        s.ask(cmd, timeout_ms=3000)
    assert s.proc is not None and s.proc.wait(15) == -signal.SIGKILL

    s.start()

    rows = eventually(lambda: (r := leg_rows(s, cmd.request_id)) and all(
        r[n]["status"] == "COMPLETE" for n in (1, 2)) and r,
        timeout=20, message="both legs to fill")  # fmt: skip
    places = s.journal_places()
    assert [places.get(rows[n]["client_tag"]) for n in (1, 2)] == [1, 1]  # each sent exactly once
    again = s.ok(cmd)
    assert again["state"] == "COMPLETE" and [x["order_id"] for x in again["legs"]] == [
        rows[1]["order_id"], rows[2]["order_id"]]


def test_kill_9_before_the_long_was_sent_the_restart_never_places_the_short(exec_stack: ExecStack) -> None:
    s = exec_stack
    s.start(NEOPULSE_TEST_CRASH_AT="after_pending")
    cmd = pair(s)
    with contextlib.suppress(RequestTimeout):
        s.ask(cmd, timeout_ms=3000)
    assert s.proc is not None and s.proc.wait(15) == -signal.SIGKILL

    s.start()

    rows = eventually(lambda: (r := leg_rows(s, cmd.request_id)) and r[1]["status"] == "REJECTED" and r,
                      timeout=20, message="the long leg closed as never sent")  # fmt: skip
    assert rows[2]["status"] == "CANCELLED" and "not placed" in rows[2]["reason"]
    assert s.journal_places() == {}
    assert "basket_failed" in s.output()
