"""Risk against the real execution service (paper broker, real PostgreSQL: a database of the
session's embedded server) and the sim feed, driven through the real CLI and the real bus.

One stack for the module. The tests run in file order; the last one latches the daily-loss
breach, so it comes last.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import zmq

from libs.common.messages import Codec, GetOrders, KillSwitch, OrderRequest, Reply, RiskVerdict, VerdictCode
from tests.helpers import eventually, free_base_port
from tests.integration.conftest import cloned_db
from tests.integration.risk_support import Stack, has_execution_service
from tests.kit.builders import NIFTY_FUT

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")

MAX_DAILY_LOSS = 5.0  # rupees: a 20-share round of RELIANCE costs more than this in charges alone
FAR_BELOW = "1000.0"  # RELIANCE starts at 1290.5 and walks in 0.1 steps: a BUY here stays open


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory, pg_server: Any) -> Iterator[Stack]:
    with cloned_db(pg_server, f"np_risk_{os.getpid()}") as url:
        home = tmp_path_factory.mktemp("risk-stack") / "home"
        s = Stack(home, free_base_port(), NEOPULSE_DATABASE__URL=url,
                  NEOPULSE_RISK__MAX_DAILY_LOSS=MAX_DAILY_LOSS, NEOPULSE_FEED__INSTRUMENTS='["RELIANCE-EQ"]',
                  NEOPULSE_FEED__RECORD="false", NEOPULSE_FEED__SIM_VOLATILITY="0",
                  NEOPULSE_FEED__SIM_RATE="50")
        try:
            s.start("execution")
            s.start("feed")
            s.start("risk")
            eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
            yield s
        finally:
            s.close()


def trade(s: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    return s.cli_json("trade", *args)


def ledger_order(s: Stack, order_id: str) -> dict[str, Any] | None:
    reply = s.ask("execution_rep", GetOrders(limit=1000))
    assert isinstance(reply, Reply) and reply.ok, reply
    return next((o for o in reply.data if o.get("order_id") == order_id), None)


REJECTIONS = [
    (("BUY", "RELIANCE-EQ", "--qty", "0", "--price", "1290.5"), "quantity",
     "quantity 0 must be greater than 0"),
    (("BUY", "TATASTEEL-EQ", "--qty", "1001", "--price", "165.3"), "quantity",
     "quantity 1001 exceeds max_qty 1000"),
    (("BUY", NIFTY_FUT.symbol, "--qty", "10", "--price", "25950"), "lot",
     f"quantity 10 is not a multiple of lot size 65 for {NIFTY_FUT.symbol}"),
    (("BUY", "RELIANCE-EQ", "--qty", "1", "--price", "1290.55"), "tick",
     "price 1290.55 is not on tick size 0.1 for RELIANCE-EQ"),
    (("BUY", "RELIANCE-EQ", "--qty", "1", "--price", "1290.5", "--sl", "1300"), "bracket",
     "BUY stop loss 1300 must be below entry 1290.5"),
    (("BUY", "NOPE-EQ", "--qty", "1", "--price", "10"), "instrument", "unknown instrument: NOPE-EQ"),
]


def test_bad_orders_are_rejected_with_a_reason_and_exit_1_and_logged(paper: Stack) -> None:
    results = paper.cli_many(*[("trade", *args, "--json") for args, _, _ in REJECTIONS],
                             ("trade", "BUY", "RELIANCE-EQ", "--qty", "0", "--price", "1290.5"))
    for (args, code, reason), (rc, stdout, stderr) in zip(REJECTIONS, results, strict=False):
        verdict = json.loads(stdout) if stdout.strip() else {"stderr": stderr}
        got = (rc, verdict.get("approved"), verdict.get("code"), verdict.get("reason"))
        assert got == (1, False, code, reason), (args, verdict)
    rc, human, _ = results[-1]
    assert rc == 1
    assert "REJECTED  BUY 0 RELIANCE-EQ @ 1290.5 (MIS) — quantity 0 must be greater than 0" in human

    logged = {ln["reason"]: ln for ln in paper.log_lines("risk") if ln.get("event") == "order_rejected"}
    for _, code, reason in REJECTIONS:
        assert reason in logged and logged[reason]["request_id"].startswith("cli-")
        assert logged[reason]["code"] == code


def test_a_valid_order_passes_and_reaches_the_ledger(paper: Stack) -> None:
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW)
    assert rc == 0 and verdict["approved"] and verdict["order_id"], verdict
    row = eventually(lambda: ledger_order(paper, verdict["order_id"]), timeout=5, message="ledger row")
    assert row["quantity"] == 1 and row["side"] == "BUY"
    human = paper.cli("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW)
    assert human.returncode == 0
    assert human.stdout.startswith("APPROVED  BUY 1 RELIANCE-EQ @ 1000.0 (MIS) — order ")


def test_a_manual_trade_with_a_trailing_stop_reaches_the_ledger_with_its_trail(paper: Stack) -> None:
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW, "--sl", "990",
                        "--trail", "1.5%")  # fmt: skip
    assert rc == 0 and verdict["approved"] and verdict["trail"] == "1.5%", verdict
    row = eventually(lambda: ledger_order(paper, verdict["order_id"]), timeout=5, message="ledger row")
    assert row["bracket_id"]
    no_sl = paper.cli("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW, "--trail", "5")
    assert no_sl.returncode == 2 and "--trail needs --sl" in no_sl.stderr


def test_a_burst_of_15_orders_inside_one_second_has_at_most_10_approved(paper: Stack) -> None:
    codec = Codec()
    sock: zmq.Socket[bytes] = paper.bus.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(paper.cfg.bus.endpoint("risk_rep"))
    try:
        t0 = time.monotonic()
        for i in range(15):
            req = OrderRequest(request_id=f"burst-{i}", strategy_id="burst", side="BUY", symbol="RELIANCE-EQ",
                               quantity=1, price=Decimal(FAR_BELOW))
            sock.send_multipart([b"", struct.pack("<Q", i), codec.encode(req)])
        sent_in = time.monotonic() - t0
        verdicts: list[RiskVerdict] = []
        while len(verdicts) < 15 and sock.poll(5000):
            reply = codec.decode(sock.recv_multipart()[2])
            assert isinstance(reply, RiskVerdict)
            verdicts.append(reply)
    finally:
        sock.close(0)
    assert sent_in < 1.0 and len(verdicts) == 15
    approved = [v for v in verdicts if v.approved]
    assert 1 <= len(approved) <= 10
    assert all(v.order_id for v in approved)
    assert {(v.code, v.reason) for v in verdicts if not v.approved} == {
        (VerdictCode.THROTTLE, "throttled: 10 orders in the last second (max_orders_per_sec 10)")}


def test_kill_switch_on_halts_trades_and_off_lets_them_pass(paper: Stack) -> None:
    rc, state = paper.cli_json("kill-switch", "on", "--reason", "integration test")
    assert rc == 0 and state["state"] == "HALTED"
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW)
    assert rc == 1 and verdict["code"] == "halted"
    assert verdict["reason"] == "HALTED: kill switch is on (integration test)"
    rc, state = paper.cli_json("kill-switch", "off")
    assert rc == 0 and state["state"] == "ACTIVE"
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW)
    assert rc == 0 and verdict["approved"]


def test_flatten_warns_while_risk_is_active_and_with_halt_trips_the_kill_switch_first(paper: Stack) -> None:
    plain = paper.cli("flatten", "--strategy", "nobody", "--yes", "--json")
    assert plain.returncode == 0, plain.stderr
    assert "warning: risk is ACTIVE: running strategies may enter again after this flatten" in plain.stderr
    assert _risk_state(paper)["state"] == "ACTIVE"

    halted = paper.cli("flatten", "--strategy", "nobody", "--halt", "--yes", "--json")

    assert halted.returncode == 0, halted.stderr
    assert "kill switch ON (flatten --halt): new orders are refused; flattening" in halted.stderr
    assert "warning" not in halted.stderr
    assert _risk_state(paper)["state"] == "HALTED" and _risk_state(paper)["reason"] == "flatten --halt"
    rc, state = paper.cli_json("kill-switch", "off")
    assert rc == 0 and state["state"] == "ACTIVE"


def _risk_state(s: Stack) -> dict[str, Any]:
    reply = s.ask("risk_rep", KillSwitch(query=True))
    assert isinstance(reply, Reply)
    data: dict[str, Any] = reply.data
    return data


def test_loss_turns_risk_reducing_and_the_switch_survives_a_restart(paper: Stack) -> None:
    # Arrange: a market BUY of 20 fills; slippage and charges alone push net PnL below -5.
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "20")
    assert rc == 0 and verdict["approved"], verdict
    eventually(lambda: _risk_state(paper).get("open_positions") == 1, timeout=10, message="filled")
    eventually(lambda: _risk_state(paper)["state"] == "REDUCING", timeout=15, message="REDUCING")
    state = _risk_state(paper)
    assert state["net_pnl"] < -MAX_DAILY_LOSS and state["reason"].startswith("daily loss limit breached")

    # A new BUY is refused; the SELL that closes the position passes.
    rc, verdict = trade(paper, "BUY", "RELIANCE-EQ", "--qty", "1", "--price", FAR_BELOW)
    assert rc == 1 and verdict["code"] == "reducing", verdict
    rc, verdict = trade(paper, "SELL", "RELIANCE-EQ", "--qty", "20")
    assert rc == 0 and verdict["approved"], verdict
    eventually(lambda: _risk_state(paper).get("open_positions", 0) == 0, timeout=10, message="flat")

    # Kill switch on, risk killed and restarted without its local backstop: execution's record holds.
    rc, _ = paper.cli_json("kill-switch", "on", "--reason", "before restart")
    assert rc == 0
    eventually(lambda: paper.status()["events_pending"] == 0, timeout=10, message="events delivered")
    paper.kill("risk")
    (paper.home / "run" / "risk-day.json").unlink()
    paper.start("risk")
    eventually(lambda: paper.status()["day_loaded"], timeout=15, message="day reloaded")
    state = _risk_state(paper)
    assert state["state"] == "HALTED" and state["kill_switch"] is True
    rc, verdict = trade(paper, "SELL", "RELIANCE-EQ", "--qty", "1", "--price", "1290.5")
    assert rc == 1 and verdict["code"] == "halted", verdict
    # Off again: the loss is still breached, so risk goes to REDUCING, not ACTIVE.
    rc, state = paper.cli_json("kill-switch", "off")
    assert rc == 0 and state["state"] == "REDUCING"
