"""Risk under ordinary faults (issue 10, paths 5, 8, 9 and 11): the pure RiskSentinel driven
by hand with a ManualClock. Each test fails on the code before the fix."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from libs.common.clock import ManualClock, trading_day
from libs.common.config import ConfigError, RiskConfig, load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    HALTED,
    REDUCING,
    Alert,
    DayState,
    Fill,
    OrderRequest,
    OrderUpdate,
    VerdictCode,
)
from services.risk.sentinel import RiskSentinel

MASTER = MasterData.load()
_ids = itertools.count(1)
DAY_NS = 86_400 * 10**9
EXEC_TIMEOUT_MS = 400  # risk's per-attempt timeout for the default bus.request_timeout_ms 1000


def make(exec_timeout_ms: int = EXEC_TIMEOUT_MS, clock: ManualClock | None = None,
         **risk: object) -> tuple[RiskSentinel, ManualClock]:
    clock = clock or ManualClock()
    cfg = RiskConfig(**risk)  # type: ignore[arg-type]
    return RiskSentinel(cfg, MASTER, clock, exec_timeout_ms=exec_timeout_ms), clock


def order(side: str = "BUY", qty: int = 10, price: str = "1290.5", strategy: str = "a",
          **kw: object) -> OrderRequest:
    kw.setdefault("request_id", f"r{next(_ids)}")
    return OrderRequest(strategy_id=strategy, side=side, symbol="RELIANCE-EQ", quantity=qty,
                        price=Decimal(price), **kw)  # type: ignore[arg-type]


def fill(side: str, qty: int, strategy: str, price: str = "1290.5") -> Fill:
    return Fill(fill_id=f"f{next(_ids)}", order_id=f"o{next(_ids)}", strategy_id=strategy,
                symbol="RELIANCE-EQ", segment="nse_cm", token="2885", side=side, quantity=qty,
                price=Decimal(price))


def update(req: OrderRequest, status: str, order_id: str = "oid-1") -> OrderUpdate:
    return OrderUpdate(order_id=order_id, request_id=req.request_id, strategy_id=req.strategy_id,
                       client_tag="np0", symbol="RELIANCE-EQ", segment="nse_cm", token="2885",
                       side=req.side, quantity=req.quantity, status=status)


def breach(s: RiskSentinel) -> None:
    s.restore(DayState(trading_day="2026-11-23", loss_breached=True))
    assert s.current_state == REDUCING


# --------------------------------------------------------------------------- path 5: timeouts


def test_execute_order_deadline_falls_inside_the_time_risk_waits_for_execution() -> None:
    s, clock = make()

    _, execute = s.evaluate(order())

    assert execute is not None
    budget_ns = 2 * EXEC_TIMEOUT_MS * 1_000_000
    margin_ns = EXEC_TIMEOUT_MS * 1_000_000 // 5
    assert s.exec_budget_ns == budget_ns
    assert execute.expires_ns == clock.now_ns() + budget_ns - margin_ns
    assert execute.ts_ns + s.exec_budget_ns > execute.expires_ns  # risk gives up after the deadline


def test_without_an_execution_timeout_there_is_no_deadline() -> None:
    s, _ = make(exec_timeout_ms=0)  # a backtest: execution answers at once

    _, execute = s.evaluate(order())

    assert execute is not None and execute.expires_ns == 0


def test_an_order_execution_never_answered_expires_unplaced_and_a_retry_gets_the_same_answer() -> None:
    s, _ = make()
    req = order(request_id="slow-1")
    _, execute = s.evaluate(req)
    assert execute is not None

    verdict = s.execution_timed_out("slow-1", 800)
    retry, again = s.evaluate(msgspec.structs.replace(req, ts_ns=req.ts_ns + 5))

    assert not verdict.approved and verdict.code == VerdictCode.EXPIRED
    assert verdict.reason == "execution did not answer within 800 ms; the order expires unplaced"
    assert again is None  # no second ExecuteOrder for the same request id
    assert retry == verdict
    reused = s.check(order(request_id="slow-1", qty=20))
    assert reused.code == VerdictCode.DUPLICATE
    assert reused.reason == "duplicate request_id slow-1: already used for another order"


def test_an_order_that_expired_unplaced_stops_counting_as_working() -> None:
    s, _ = make(max_open_positions=1)
    _, execute = s.evaluate(order(request_id="slow-2"))
    assert execute is not None
    assert s.state().open_positions == 0
    blocked = s.check(OrderRequest(request_id="other-1", strategy_id="a", side="BUY", symbol="TATASTEEL-EQ",
                                   quantity=1, price=Decimal("165.3")))
    assert blocked.code == VerdictCode.POSITIONS

    s.execution_timed_out("slow-2", 800)

    assert s.check(OrderRequest(request_id="other-2", strategy_id="a", side="BUY", symbol="TATASTEEL-EQ",
                                quantity=1, price=Decimal("165.3"))).approved


def test_an_expired_order_execution_placed_after_all_raises_a_critical_alert_and_counts_again() -> None:
    s, _ = make()
    breach(s)
    s.on_fill(fill("BUY", 100, "a"))
    close = order(side="SELL", qty=100, request_id="slow-3", reduce_only=True)
    _, execute = s.evaluate(close)
    assert execute is not None
    s.execution_timed_out("slow-3", 800)

    events = s.on_order_update(update(close, "OPEN"))

    assert len(events) == 1 and isinstance(events[0], Alert)
    assert events[0].level == "CRITICAL" and events[0].code == "expired_order_placed"
    # the close is working again, so a second close of the same 100 is refused
    assert s.check(order(side="SELL", qty=100, reduce_only=True)).reason.endswith(
        "SELL 100 RELIANCE-EQ is more than the 0 that would close a's position")
    assert s.on_order_update(update(close, "OPEN")) == ()  # announced once


def test_an_expired_order_execution_refused_raises_no_alert() -> None:
    s, _ = make()
    req = order(request_id="slow-4")
    s.evaluate(req)
    s.execution_timed_out("slow-4", 800)

    assert s.on_order_update(update(req, "REJECTED")) == ()


# --------------------------------------------------------------------------- path 8: kill switch across days


def test_kill_switch_stays_on_after_a_restart_on_the_next_trading_day() -> None:
    s, clock = make()
    s.restore(DayState(trading_day=trading_day(clock)))
    s.set_kill_switch(True, "broker outage")
    s.on_fill(fill("BUY", 100, "a"))
    s.loss_breached = True
    saved = json.loads(json.dumps(s.backstop(trading_day(clock))))  # what risk-day.json holds

    tomorrow = ManualClock(clock.now_ns() + DAY_NS)
    restarted, _ = make(clock=tomorrow)
    assert restarted.restore_backstop(saved, trading_day(tomorrow))
    restarted.restore(DayState(trading_day=trading_day(tomorrow), kill_switch=False))

    assert restarted.current_state == HALTED
    assert restarted.kill_reason == "broker outage"
    assert not restarted.loss_breached  # a fresh loss budget: only the switch outlives the day
    halted = restarted.check(order())
    assert (halted.code, halted.reason) == (VerdictCode.HALTED, "HALTED: kill switch is on (broker outage)")


def test_the_loss_breach_restored_locally_only_on_its_own_day() -> None:
    s, clock = make()
    today = trading_day(clock)

    s.restore_backstop({"trading_day": today, "kill_switch": False, "loss_breached": True}, today)

    assert s.current_state == REDUCING


def test_kill_switch_stays_on_at_the_in_process_new_day_resync() -> None:
    s, clock = make()
    s.restore(DayState(trading_day=trading_day(clock), loss_breached=True))
    s.set_kill_switch(True, "fat finger")
    clock.advance(86_400)

    s.new_day()
    s.restore(DayState(trading_day=trading_day(clock), kill_switch=False))

    assert s.current_state == HALTED and s.kill_reason == "fat finger"
    assert not s.loss_breached
    assert s.backstop(trading_day(clock))["kill_switch"] is True
    s.set_kill_switch(False)
    assert s.current_state != HALTED  # only switching it off unlocks it


# --------------------------------------------------------------------------- path 9: netting


def test_reducing_order_must_reduce_its_own_strategys_position() -> None:
    s, _ = make()
    breach(s)
    s.on_fill(fill("BUY", 100, "a"))  # a is long 100 (and has a stop working at the broker)

    verdict = s.check(order(side="SELL", qty=100, strategy="b"))  # b has no position

    assert not verdict.approved and verdict.code == VerdictCode.REDUCING
    assert verdict.reason == (
        "REDUCING: daily loss limit breached; only orders that reduce the strategy's own position pass "
        "(SELL 100 RELIANCE-EQ would open or add for b)")
    assert s.check(order(side="SELL", qty=100, strategy="a")).approved


def test_a_strategy_may_close_its_own_position_while_another_strategy_offsets_it() -> None:
    # a's close leaves b's short protected by b's own legs (sized to b's position): nothing
    # is left that could open new exposure, so REDUCING lets it through
    s, _ = make()
    breach(s)
    s.on_fill(fill("BUY", 100, "a"))
    s.on_fill(fill("SELL", 100, "b"))  # the account is flat

    assert s.check(order(side="SELL", qty=100, strategy="a")).approved


def test_reducing_order_counts_its_own_strategys_closing_orders_already_working() -> None:
    s, _ = make()
    breach(s)
    s.on_fill(fill("BUY", 100, "a"))
    assert s.check(order(side="SELL", qty=60, strategy="a")).approved

    verdict = s.check(order(side="SELL", qty=60, strategy="a"))

    assert verdict.reason.endswith("SELL 60 RELIANCE-EQ is more than the 40 that would close a's position")


def test_reduce_only_must_reduce_its_own_position_outside_reducing() -> None:
    s, _ = make()
    s.on_fill(fill("BUY", 30, "b"))

    assert s.check(order(side="BUY", qty=10, strategy="a", reduce_only=True)).reason == (
        "reduce-only: only orders that reduce the strategy's own position pass "
        "(BUY 10 RELIANCE-EQ would open or add for a)")
    assert s.check(order(side="SELL", qty=10, strategy="b", reduce_only=True)).approved


# --------------------------------------------------------------------------- path 11: risk after the decoder


def test_a_stop_loss_beyond_the_price_cap_is_rejected_with_a_reason() -> None:
    # The decoder refuses this on the wire; an order built in-process (a backtest, a strategy)
    # reaches risk, which must say why instead of handing execution an unusable price.
    s, _ = make()

    verdict = s.check(order(side="SELL", stop_loss=Decimal("1E+26")))

    assert verdict.code == VerdictCode.PRICE
    assert verdict.reason == "stop loss 1E+26 is above the 10000000 cap on any price"


@pytest.mark.parametrize("sid", ["mom.1", "mömentum", "", "x" * 33, "-lead"])
def test_config_refuses_a_strategy_id_the_wire_would_refuse(tmp_path: Path, sid: str) -> None:
    toml = tmp_path / "neopulse.toml"
    toml.write_text(f'[[strategy]]\nname = "momentum"\nid = "{sid}"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as err:
        load_config(path=toml, env={"NEOPULSE_ENV_FILE": str(tmp_path / "no.env")})

    assert "`strategy.id` must be 1-32 letters, digits" in str(err.value)



# ------------------------------------------------------------------ the broker takes no orders


def test_a_broker_halt_refuses_every_order_with_its_reason_until_it_ends_and_is_never_recorded() -> None:
    # Arrange: execution's broker refuses this IP (from execution's day state).
    s, _ = make()
    why = "broker refuses orders from this machine's IP: 100008"
    assert s.set_broker_halt(why) and not s.set_broker_halt(why)

    # Act: an entry and an exit come; the kill switch is switched on and off meanwhile.
    entry, exit_ = s.check(order()), s.check(order(side="SELL"))
    events = [*s.set_kill_switch(True, "test"), *s.set_kill_switch(False)]

    # Assert: both refused HALTED with the broker's reason; the state says so; the records carry
    # only risk's own state (a restart must not read the broker halt as a kill switch).
    for v in (entry, exit_):
        assert not v.approved and v.code == VerdictCode.HALTED and v.reason == f"HALTED: {why}", v
    st = s.state()
    assert st.state == HALTED and not st.kill_switch and why in st.reason
    recorded = [e.data["risk_state"] for e in events if hasattr(e, "data") and "risk_state" in e.data]
    assert recorded == [HALTED, "ACTIVE"], recorded

    # Act / Assert: the broker takes orders again (a login worked): orders pass.
    assert s.set_broker_halt("")
    assert s.current_state == "ACTIVE" and s.check(order()).approved
