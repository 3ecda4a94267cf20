"""The risk process against a stand-in execution on the real bus (issue 10, paths 5, 8, 11):
execution that never answers ``ExecuteOrder``, a restart on the next trading day, and a
request the decoder refuses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import zmq

from libs.common.bus import Responder
from libs.common.clock import Clock, trading_day
from libs.common.messages import (
    Codec,
    DayState,
    ExecuteOrder,
    GetDayState,
    KillSwitch,
    Message,
    OrderRequest,
    Reply,
    RiskVerdict,
    VerdictCode,
)
from tests.helpers import eventually
from tests.integration.risk_support import Stack, stack
from tests.integration.test_bus import served

DAY_S = 86_400


class SilentExecution:
    """Answers the day state and the risk events; swallows every ExecuteOrder (execution
    stalled, e.g. in an fsync or a long reconcile)."""

    def __init__(self, day: str) -> None:
        self.day = day
        self.kill_switch = False
        self.executes: list[tuple[float, ExecuteOrder]] = []

    def __call__(self, msg: Message, _responder: Responder) -> Message | None:
        if isinstance(msg, GetDayState):
            return DayState(trading_day=self.day, kill_switch=self.kill_switch)
        if isinstance(msg, ExecuteOrder):
            self.executes.append((time.time_ns(), msg))
            return None  # never answered
        return Reply(ok=True)


@pytest.fixture
def risk_with_silent_execution(tmp_path: Path, base_port: int) -> Iterator[tuple[Stack, SilentExecution]]:
    execution = SilentExecution(trading_day(Clock()))
    with stack(tmp_path / "home", base_port) as s, served(s.cfg.bus.endpoint("execution_rep"), execution):
        s.start("risk")
        eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
        yield s, execution


def _order(request_id: str) -> OrderRequest:
    return OrderRequest(request_id=request_id, strategy_id="mom1", side="BUY", symbol="RELIANCE-EQ",
                        quantity=1, price=Decimal("1290.5"))


def test_an_order_execution_never_answers_expires_unplaced_and_its_retry_is_not_sent_again(
        risk_with_silent_execution: tuple[Stack, SilentExecution]) -> None:
    s, execution = risk_with_silent_execution
    budget_ms = 2 * (s.cfg.bus.request_timeout_ms * 2 // 5)

    verdict = s.ask("risk_rep", _order("stall-1"), timeout_ms=3000)
    answered_ns = time.time_ns()

    assert isinstance(verdict, RiskVerdict) and not verdict.approved and verdict.code == VerdictCode.EXPIRED
    assert verdict.reason == f"execution did not answer within {budget_ms} ms; the order expires unplaced"
    sent = [e for _, e in execution.executes]
    assert len(sent) >= 2 and {e.request_id for e in sent} == {"stall-1"}
    assert len({e.expires_ns for e in sent}) == 1  # every attempt carries the first one's deadline
    assert 0 < sent[0].expires_ns < answered_ns  # risk answered only once the deadline had passed

    again = s.ask("risk_rep", _order("stall-1"), timeout_ms=3000)

    assert isinstance(again, RiskVerdict) and again.reason == verdict.reason
    assert len(execution.executes) == len(sent)  # the retry made no new attempt
    assert s.status()["inflight"] == 0


def test_kill_switch_stays_on_when_risk_restarts_on_the_next_trading_day(tmp_path: Path,
                                                                         base_port: int) -> None:
    today = SilentExecution(trading_day(Clock()))
    with stack(tmp_path / "home", base_port) as s:
        with served(s.cfg.bus.endpoint("execution_rep"), today):
            s.start("risk")
            eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
            reply = s.ask("risk_rep", KillSwitch(on=True, reason="broker outage"))
            assert isinstance(reply, Reply) and reply.data["state"] == "HALTED"
            s.kill("risk")

        # The next day, execution's records of today hold no kill switch (the day changed).
        tomorrow = SilentExecution(_day_after(today.day))
        s.env["NEOPULSE_CLOCK_OFFSET_S"] = str(DAY_S)  # risk's clock, and so its trading day
        with served(s.cfg.bus.endpoint("execution_rep"), tomorrow):
            s.start("risk")
            eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
            status = s.status()
            reply = s.ask("risk_rep", KillSwitch(query=True))

    assert status["trading_day"] == tomorrow.day
    assert isinstance(reply, Reply) and reply.data["state"] == "HALTED"
    assert reply.data["reason"] == "broker outage"


def _day_after(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def test_an_order_the_decoder_refuses_gets_a_clear_malformed_reply(
        risk_with_silent_execution: tuple[Stack, SilentExecution]) -> None:
    s, execution = risk_with_silent_execution
    sock: zmq.Socket[bytes] = s.bus.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(s.cfg.bus.endpoint("risk_rep"))
    bad = {"kind": "OrderRequest", "request_id": "r1", "strategy_id": "mom1", "side": "SELL",
           "symbol": "RELIANCE-EQ", "quantity": 1, "price": "1290.5", "stop_loss": "1E+26"}
    try:
        sock.send_multipart([b"", b"\x01" * 8, msgspec.msgpack.encode(bad)])
        assert sock.poll(3000)
        frames = sock.recv_multipart()
    finally:
        sock.close(0)

    reply = Codec().decode(frames[2])
    assert isinstance(reply, Reply) and not reply.ok and reply.code == "malformed"
    assert "stop_loss must be a finite number above 0 and at most 10000000, got 1E+26" in reply.error
    assert "$.stop_loss" in reply.error
    assert execution.executes == []
