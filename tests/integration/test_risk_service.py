"""The risk process on its own (no execution running): its request port survives malformed
bytes, refuses orders until the day is loaded, and keeps the kill switch across a restart."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import zmq

from libs.common.messages import (
    Codec,
    GetRiskState,
    KillSwitch,
    OrderRequest,
    Reply,
    RiskState,
    RiskVerdict,
    VerdictCode,
)
from tests.helpers import eventually
from tests.integration.risk_support import Stack, stack


@pytest.fixture
def risk_alone(tmp_path: Path, base_port: int) -> Iterator[Stack]:
    with stack(tmp_path / "home", base_port) as s:
        s.start("risk")
        yield s


def _dealer(s: Stack) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = s.bus.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.cfg.bus.endpoint("risk_rep"))
    return sock


def test_malformed_bytes_get_an_error_reply_are_counted_and_risk_keeps_running(risk_alone: Stack) -> None:
    s = risk_alone
    sock = _dealer(s)
    try:
        corr = struct.pack("<Q", 77)
        sock.send_multipart([b"", corr, b"\xc1\xff not msgpack"])
        assert sock.poll(3000)
        frames = sock.recv_multipart()
        assert frames[1] == corr
        reply = Codec().decode(frames[2])
        assert isinstance(reply, Reply) and not reply.ok and reply.code == "malformed"
        # a valid msgpack map of an unknown kind, and a broken envelope
        sock.send_multipart([b"", struct.pack("<Q", 78), b"\x81\xa4kind\xa7Nonsuch"])
        sock.send_multipart([b"just one frame"])
        sock.send_multipart([b"", b"short", os.urandom(64)])
        eventually(lambda: s.status()["malformed_requests"] >= 4, timeout=5, message="malformed counted")
    finally:
        sock.close(0)
    # still serving
    state = s.ask("risk_rep", GetRiskState())
    assert isinstance(state, RiskState)
    assert s.procs["risk"].poll() is None


def test_orders_are_refused_until_the_day_is_loaded(risk_alone: Stack) -> None:
    s = risk_alone
    req = OrderRequest(request_id="early-1", strategy_id="t", side="BUY", symbol="RELIANCE-EQ", quantity=1,
                       price=Decimal("1290.5"))
    verdict = s.ask("risk_rep", req)
    assert isinstance(verdict, RiskVerdict)
    assert not verdict.approved and verdict.code == VerdictCode.STARTING
    assert verdict.reason == "risk is starting: day state not loaded"
    assert s.status()["day_loaded"] is False
    res = s.cli("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", "1290.5")
    assert res.returncode == 1
    assert "risk is starting: day state not loaded" in res.stdout
    logged = [ln for ln in s.log_lines("risk") if ln.get("event") == "order_rejected"]
    assert {ln["request_id"] for ln in logged} >= {"early-1"}
    assert all(ln["reason"] and ln["code"] == "starting" for ln in logged)


def test_kill_switch_commands_and_a_restart_without_execution(tmp_path: Path, base_port: int) -> None:
    with stack(tmp_path / "home", base_port) as s:
        s.start("risk")
        rc, data = s.cli_json("kill-switch", "on", "--reason", "fat finger")
        assert rc == 0 and data["state"] == "HALTED" and data["kill_switch"] is True
        assert data["reason"] == "fat finger"
        res = s.cli("kill-switch", "status")
        assert res.returncode == 0 and "kill switch ON (fat finger)" in res.stdout

        s.kill("risk")  # kill -9: execution never recorded it (not running), the local backstop must
        s.start("risk")
        reply = s.ask("risk_rep", KillSwitch(query=True))
        assert isinstance(reply, Reply) and reply.data["state"] == "HALTED"
        assert reply.data["reason"] == "fat finger"

        rc, data = s.cli_json("kill-switch", "off")
        assert rc == 0 and data["state"] == "ACTIVE" and not data.get("kill_switch")
        rc, pnl = s.cli_json("pnl")
        assert rc == 0 and pnl["state"] == "ACTIVE" and pnl["max_daily_loss"] == 5000.0


def test_cli_without_a_terminal_names_what_is_missing(tmp_path: Path, base_port: int) -> None:
    s = Stack(tmp_path / "home", base_port)
    try:
        results = s.cli_many(
            ("trade", "BUY", "RELIANCE-EQ"),
            ("trade",),
            ("trade", "HOLD", "RELIANCE-EQ", "--qty", "1"),
            ("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", "abc"),
        )
        expected = ["missing --qty", "missing SIDE, SYMBOL, --qty", "side must be BUY or SELL",
                    "--price: 'abc' is not a number"]
        for (rc, _, stderr), text in zip(results, expected, strict=True):
            assert rc == 2 and text in stderr, (text, stderr)
    finally:
        s.close()


def test_cli_exits_3_naming_risk_when_it_is_down(tmp_path: Path, base_port: int) -> None:
    s = Stack(tmp_path / "home", base_port, NEOPULSE_BUS__REQUEST_TIMEOUT_MS=300)
    try:
        results = s.cli_many(
            ("trade", "BUY", "RELIANCE-EQ", "--qty", "1", "--price", "1290.5"),
            ("pnl",),
            ("kill-switch", "on", "--reason", "x"),
        )
        expected = ["risk is unreachable at tcp://127.0.0.1:", "risk is unreachable",
                    "execution did not record the kill switch"]
        for (rc, _, stderr), text in zip(results, expected, strict=True):
            assert rc == 3 and text in stderr, (text, stderr)
    finally:
        s.close()


def test_trade_on_a_terminal_asks_for_what_is_missing(risk_alone: Stack) -> None:
    import pexpect

    from tests.integration.risk_support import NEOPULSE

    child = pexpect.spawn(NEOPULSE[0], [*NEOPULSE[1:], "trade"], env=risk_alone.env, encoding="utf-8",
                          timeout=20)
    try:
        child.expect("Side")
        child.sendline("buy")
        child.expect("Symbol")
        child.sendline("RELIANCE-EQ")
        child.expect("Quantity")
        child.sendline("2")
        child.expect("REJECTED  BUY 2 RELIANCE-EQ @ market")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1
