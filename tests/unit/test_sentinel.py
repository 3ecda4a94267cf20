"""RiskSentinel: each pre-trade check passes and fails with its code and exact reason; PnL, the loss
breach, the kill switch and restore. Pure logic with a ManualClock: no sockets."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from libs.common.clock import ManualClock
from libs.common.config import RiskConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import (
    ACTIVE,
    HALTED,
    REDUCING,
    Alert,
    CancelEntries,
    DayState,
    ExecuteOrder,
    Fill,
    OrderRequest,
    OrderUpdate,
    Position,
    RecordRiskEvent,
    Sizing,
    Tick,
    VerdictCode,
)
from services.risk.sentinel import RiskSentinel
from tests.kit.builders import NIFTY_FUT

MASTER = MasterData.load()
_ids = itertools.count(1)

# Sample master facts used below: RELIANCE-EQ nse_cm|2885 lot 1 tick 0.1; HDFCBANK-EQ tick 0.05;
# TATASTEEL-EQ nse_cm|3499; NIFTY_FUT (the front NIFTY future) lot 65 tick 0.1; "Nifty 50" is an index.


def make(**risk: object) -> tuple[RiskSentinel, ManualClock]:
    clock = ManualClock()
    return RiskSentinel(RiskConfig(**risk), MASTER, clock), clock  # type: ignore[arg-type]


def order(
    side: str = "BUY", symbol: str = "RELIANCE-EQ", qty: int = 10, price: str | None = "1290.5", **kw: object
) -> OrderRequest:
    kw.setdefault("request_id", f"r{next(_ids)}")
    return OrderRequest(
        strategy_id=str(kw.pop("strategy_id", "s1")),
        side=side,
        symbol=symbol,
        quantity=qty,
        price=None if price is None else Decimal(price),
        **kw,
    )  # type: ignore[arg-type]


def D(x: str | None) -> Decimal | None:
    return None if x is None else Decimal(x)


def fill(
    side: str,
    qty: int,
    price: str,
    key: str = "nse_cm|2885",
    strategy: str = "s1",
    order_id: str = "",
    ts_ns: int = 0,
) -> Fill:
    seg, tok = key.split("|")
    return Fill(
        fill_id=f"f{next(_ids)}",
        order_id=order_id or f"o{next(_ids)}",
        strategy_id=strategy,
        symbol="",
        segment=seg,
        token=tok,
        side=side,
        quantity=qty,
        price=Decimal(price),
        **({"ts_ns": ts_ns} if ts_ns else {}),
    )


def tick(ltp: float, key: str = "nse_cm|2885") -> Tick:
    seg, tok = key.split("|")
    return Tick(segment=seg, token=tok, ltp=ltp)


def refused(s: RiskSentinel, req: OrderRequest) -> tuple[VerdictCode, str]:
    """The (code, reason) of a rejection."""
    v = s.check(req)
    assert not v.approved, f"expected a rejection, got {v}"
    return v.code, v.reason


def approve(s: RiskSentinel, req: OrderRequest) -> None:
    v = s.check(req)
    assert v.approved, v.reason


# --------------------------------------------------------------------------- a valid order


def test_valid_limit_order_is_approved_with_its_quantity_and_execute_order() -> None:
    s, _ = make()
    verdict, execute = s.evaluate(order(qty=10, price="1290.5"))
    assert verdict.approved and verdict.quantity == 10 and verdict.state == ACTIVE and verdict.reason == ""
    assert verdict.code == VerdictCode.NONE == ""
    assert isinstance(execute, ExecuteOrder)
    assert (execute.segment, execute.token, execute.symbol, execute.quantity) == (
        "nse_cm",
        "2885",
        "RELIANCE-EQ",
        10,
    )
    assert execute.order.price == Decimal("1290.5")


def test_order_named_by_segment_and_token_is_resolved() -> None:
    s, _ = make()
    verdict, execute = s.evaluate(order(symbol="", segment="nse_cm", token="2885"))
    assert verdict.approved and execute is not None and execute.symbol == "RELIANCE-EQ"


# --------------------------------------------------------------------------- 1. duplicate request_id


def test_identical_retry_gets_the_same_verdict_and_no_second_order() -> None:
    s, _ = make()
    req = order(request_id="dup1")
    first, exe1 = s.evaluate(req)
    s.confirm("dup1", "order-1")
    again, exe2 = s.evaluate(
        OrderRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__}, "ts_ns": 5})
    )
    assert first.approved and exe1 is not None
    assert again.approved and again.order_id == "order-1" and exe2 is None


def test_reused_request_id_for_another_order_is_rejected() -> None:
    s, _ = make()
    approve(s, order(request_id="dup2", qty=10))
    assert refused(s, order(request_id="dup2", qty=20)) == (
        VerdictCode.DUPLICATE,
        "duplicate request_id dup2: already used for another order",
    )


def test_rejected_request_may_be_sent_again_and_is_judged_again() -> None:
    s, _ = make()
    s.set_kill_switch(True, "lunch")
    req = order(request_id="again")
    assert refused(s, req)[0] == VerdictCode.HALTED
    s.set_kill_switch(False)
    approve(s, req)


# --------------------------------------------------------------------------- 2. kill switch


def test_halted_rejects_everything_even_unknown_symbols() -> None:
    s, _ = make()
    s.set_kill_switch(True, "broker issue")
    halted = (VerdictCode.HALTED, "HALTED: kill switch is on (broker issue)")
    assert refused(s, order()) == halted
    assert refused(s, order(symbol="NOPE-EQ")) == halted
    assert s.check(order()).state == HALTED


# --------------------------------------------------------------------------- 3. order fields


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"side": "HOLD"}, "side 'HOLD' must be BUY or SELL"),
        ({"product": "BO"}, "product 'BO' must be MIS, CNC or NRML"),
        ({"order_type": "ICEBERG"}, "order type 'ICEBERG' must be LIMIT, MARKET, SL or SL-M"),
        ({"order_type": "SL"}, "order type SL needs a trigger price"),
    ],
)
def test_bad_order_fields_are_rejected(kw: dict[str, str], text: str) -> None:
    s, _ = make()
    assert refused(s, order(**kw)) == (VerdictCode.FIELDS, text)


def test_stop_limit_with_trigger_passes() -> None:
    s, _ = make()
    approve(s, order(order_type="SL", trigger_price=Decimal("1290.0")))


# --------------------------------------------------------------------------- 4. instrument


def test_unknown_symbol_is_rejected() -> None:
    s, _ = make()
    assert refused(s, order(symbol="NOPE-EQ")) == (VerdictCode.INSTRUMENT, "unknown instrument: NOPE-EQ")


def test_unknown_token_is_rejected() -> None:
    s, _ = make()
    assert refused(s, order(symbol="", segment="nse_cm", token="999999")) == (
        VerdictCode.INSTRUMENT,
        "unknown instrument: nse_cm|999999",
    )


def test_order_without_instrument_is_rejected() -> None:
    s, _ = make()
    assert refused(s, order(symbol="")) == (
        VerdictCode.INSTRUMENT,
        "the order names no instrument (symbol, or segment and token)",
    )


def test_index_is_not_tradable() -> None:
    s, _ = make()
    assert refused(s, order(symbol="Nifty 50", price="25900")) == (
        VerdictCode.INSTRUMENT,
        "Nifty 50 is an index and cannot be traded",
    )


def test_an_instrument_without_a_tick_size_is_not_tradable() -> None:
    odd = Instrument(segment="nse_cm", token="1", symbol="ODD-EQ", tick_size=Decimal(0))
    s = RiskSentinel(RiskConfig(), MasterData([odd]), ManualClock())
    assert refused(s, order(symbol="ODD-EQ")) == (
        VerdictCode.INSTRUMENT,
        "ODD-EQ is not tradable: tick size unknown",
    )


# --------------------------------------------------------------------------- 5. prices


@pytest.mark.parametrize(
    ("price", "code", "text"),
    [
        ("0", VerdictCode.PRICE, "price 0 must be a positive finite number"),
        ("-1290.5", VerdictCode.PRICE, "price -1290.5 must be a positive finite number"),
        ("NaN", VerdictCode.PRICE, "price NaN must be a positive finite number"),
        ("Infinity", VerdictCode.PRICE, "price Infinity must be a positive finite number"),
        ("1290.55", VerdictCode.TICK, "price 1290.55 is not on tick size 0.1 for RELIANCE-EQ"),
        ("1E+40", VerdictCode.PRICE, "price 1E+40 is above the 10000000 cap on any price"),
    ],
)
def test_bad_price_is_rejected(price: str, code: VerdictCode, text: str) -> None:
    s, _ = make()
    assert refused(s, order(price=price)) == (code, text)


def test_stop_loss_and_target_must_be_on_tick_and_positive() -> None:
    s, _ = make()
    assert refused(s, order(stop_loss=D("1280.05"))) == (
        VerdictCode.TICK,
        "stop loss 1280.05 is not on tick size 0.1 for RELIANCE-EQ",
    )
    assert refused(s, order(target=D("-5"))) == (
        VerdictCode.PRICE,
        "target -5 must be a positive finite number",
    )
    assert refused(s, order(order_type="SL", trigger_price=D("sNaN"))) == (
        VerdictCode.PRICE,
        "trigger price sNaN must be a positive finite number",
    )


def test_price_on_a_five_paise_tick_passes() -> None:
    s, _ = make()
    approve(s, order(symbol="HDFCBANK-EQ", price="985.45"))


def test_market_intent_needs_a_last_price() -> None:
    s, _ = make()
    assert refused(s, order(price=None)) == (
        VerdictCode.LAST_PRICE,
        "no last price for RELIANCE-EQ yet: give a limit price",
    )
    s.on_tick(tick(1290.5))
    approve(s, order(price=None))


# --------------------------------------------------------------------------- 6. bracket


@pytest.mark.parametrize(
    ("side", "sl", "target", "text"),
    [
        ("BUY", "1291.0", None, "BUY stop loss 1291.0 must be below entry 1290.5"),
        ("BUY", "1290.5", None, "BUY stop loss 1290.5 must be below entry 1290.5"),
        ("BUY", None, "1290.0", "BUY target 1290.0 must be above entry 1290.5"),
        ("SELL", "1290.0", None, "SELL stop loss 1290.0 must be above entry 1290.5"),
        ("SELL", None, "1300.0", "SELL target 1300.0 must be below entry 1290.5"),
    ],
)
def test_bracket_on_the_wrong_side_is_rejected(
    side: str, sl: str | None, target: str | None, text: str
) -> None:
    s, _ = make()
    assert refused(s, order(side=side, stop_loss=D(sl), target=D(target))) == (VerdictCode.BRACKET, text)


@pytest.mark.parametrize(
    ("side", "sl", "target"), [("BUY", "1280.0", "1310.0"), ("SELL", "1300.0", "1270.0")]
)
def test_bracket_on_the_right_side_passes(side: str, sl: str, target: str) -> None:
    s, _ = make()
    approve(s, order(side=side, stop_loss=D(sl), target=D(target)))


def test_market_bracket_uses_the_last_price_as_entry() -> None:
    s, _ = make()
    s.on_tick(tick(1300.0))
    assert refused(s, order(price=None, stop_loss=D("1305.0"))) == (
        VerdictCode.BRACKET,
        "BUY stop loss 1305.0 must be below entry 1300.0",
    )
    approve(s, order(price=None, stop_loss=D("1295.0")))


# --------------------------------------------------------------------------- sizing


def test_sizing_fills_in_the_quantity_from_the_risk_budget() -> None:
    s, _ = make()
    # 1% of 100000 = 1000 at risk; 10.5 per share -> 95 shares
    v = s.check(
        order(qty=0, stop_loss=D("1280.0"), sizing=Sizing(capital=Decimal(100000), risk_pct=Decimal(1)))
    )
    assert v.approved and v.quantity == 95


def test_sizing_a_future_rounds_down_to_lots() -> None:
    s, _ = make()
    # 2% of 1,000,000 = 20000; 100 per unit -> 200 -> 3 lots of 65 = 195
    req = order(
        symbol=NIFTY_FUT.symbol,
        price="25950",
        qty=0,
        stop_loss=D("25850"),
        sizing=Sizing(capital=Decimal(1_000_000), risk_pct=Decimal(2)),
    )
    v, exe = s.evaluate(req)
    # 195 x 25950 is over max_notional, so this also proves the sized quantity is what gets checked
    assert not v.approved and v.code == VerdictCode.NOTIONAL
    assert v.reason == "notional 5060250.00 exceeds max_notional 1000000.00"
    s2, _ = make(max_notional=6_000_000.0)
    v, exe = s2.evaluate(req)
    assert v.approved and v.quantity == 195 and exe is not None and exe.quantity == 195 == exe.order.quantity


def test_sizing_without_a_stop_loss_is_rejected() -> None:
    s, _ = make()
    req = order(qty=0, sizing=Sizing(capital=Decimal(100000), risk_pct=Decimal(1)))
    assert refused(s, req) == (VerdictCode.SIZING, "sizing needs a stop loss to measure the risk per share")


def test_sizing_below_one_lot_is_rejected() -> None:
    s, _ = make()
    req = order(
        symbol=NIFTY_FUT.symbol,
        price="25950",
        qty=0,
        stop_loss=D("25850"),
        sizing=Sizing(capital=Decimal(100000), risk_pct=Decimal(1)),
    )
    assert refused(s, req) == (
        VerdictCode.SIZING,
        f"sized quantity is 0: risk budget 1000.00 is less than one lot of {NIFTY_FUT.symbol} "
        "(6500.00 at risk per lot)",
    )


def test_sizing_with_bad_inputs_is_rejected() -> None:
    s, _ = make()
    bad_pct = order(qty=0, stop_loss=D("1280.0"), sizing=Sizing(capital=Decimal(1000), risk_pct=Decimal(150)))
    assert refused(s, bad_pct) == (VerdictCode.SIZING, "sizing risk_pct 150 must be above 0 and at most 100")
    bad_cap = order(qty=0, stop_loss=D("1280.0"), sizing=Sizing(capital=Decimal("-1"), risk_pct=Decimal(1)))
    assert refused(s, bad_cap) == (VerdictCode.SIZING, "sizing capital -1 must be a positive finite number")


# --------------------------------------------------------------------------- 7. quantity


@pytest.mark.parametrize(
    ("symbol", "price", "qty", "code", "text"),
    [
        ("RELIANCE-EQ", "1290.5", 0, VerdictCode.QUANTITY, "quantity 0 must be greater than 0"),
        ("RELIANCE-EQ", "1290.5", -5, VerdictCode.QUANTITY, "quantity -5 must be greater than 0"),
        ("TATASTEEL-EQ", "165.3", 1001, VerdictCode.QUANTITY, "quantity 1001 exceeds max_qty 1000"),
        (NIFTY_FUT.symbol, "25950", 10, VerdictCode.LOT,
         f"quantity 10 is not a multiple of lot size 65 for {NIFTY_FUT.symbol}"),
    ],
)
def test_bad_quantity_is_rejected(symbol: str, price: str, qty: int, code: VerdictCode, text: str) -> None:
    s, _ = make()
    assert refused(s, order(symbol=symbol, price=price, qty=qty)) == (code, text)


def test_quantity_at_max_qty_and_whole_lots_pass() -> None:
    s, _ = make(max_notional=10_000_000.0)
    approve(s, order(symbol="TATASTEEL-EQ", price="165.3", qty=1000))
    approve(s, order(symbol=NIFTY_FUT.symbol, price="25950", qty=130))


# --------------------------------------------------------------------------- 8. exposure (REDUCING)


def breach(s: RiskSentinel) -> None:
    """Long 100 RELIANCE at 1290.5, then the price falls 60 -> net below -5000."""
    s.on_fill(fill("BUY", 100, "1290.5"))
    events = s.on_tick(tick(1230.5))
    assert s.current_state == REDUCING and len(events) == 2


def test_loss_breach_turns_risk_reducing_and_says_so() -> None:
    s, _ = make()
    s.on_fill(fill("BUY", 100, "1290.5"))
    assert s.on_tick(tick(1245.5)) == ()  # -4500 gross, -4545.17 net: still inside the limit
    events = s.on_tick(tick(1230.5))
    alert, record = events
    assert isinstance(alert, Alert) and alert.level == "CRITICAL" and alert.code == "loss_breached"
    assert alert.text.startswith("daily loss limit breached: net PnL -6045.17 is below -5000.00")
    assert isinstance(record, RecordRiskEvent) and record.event == "loss_breached"
    assert s.state().state == REDUCING and s.state().reason.startswith("daily loss limit breached")
    assert s.on_tick(tick(1200.0)) == ()  # announced once


def test_reducing_refuses_a_new_buy() -> None:
    s, _ = make()
    breach(s)
    assert refused(s, order(side="BUY", qty=10, price="1230.5")) == (
        VerdictCode.REDUCING,
        "REDUCING: daily loss limit breached; only orders that reduce the strategy's own position pass "
        "(BUY 10 RELIANCE-EQ would open or add for s1)",
    )
    assert refused(s, order(side="BUY", symbol="TATASTEEL-EQ", price="165.3"))[0] == VerdictCode.REDUCING


def test_reducing_passes_a_closing_sell_but_not_a_flip() -> None:
    s, _ = make()
    breach(s)
    assert refused(s, order(side="SELL", qty=150, price="1230.5")) == (
        VerdictCode.REDUCING,
        "REDUCING: daily loss limit breached; "
        "SELL 150 RELIANCE-EQ is more than the 100 that would close s1's position",
    )
    approve(s, order(side="SELL", qty=100, price="1230.5"))


def test_reducing_counts_closing_orders_already_working() -> None:
    s, _ = make()
    breach(s)
    approve(s, order(side="SELL", qty=60, price="1230.5"))
    code, text = refused(s, order(side="SELL", qty=60, price="1230.5"))
    assert code == VerdictCode.REDUCING
    assert text.endswith("SELL 60 RELIANCE-EQ is more than the 40 that would close s1's position")
    approve(s, order(side="SELL", qty=40, price="1230.5"))


def test_a_cancelled_working_order_stops_counting() -> None:
    s, _ = make()
    breach(s)
    approve(s, order(side="SELL", qty=100, price="1230.5", request_id="close1"))
    s.confirm("close1", "oid-close1")
    upd = OrderUpdate(
        order_id="oid-close1",
        request_id="close1",
        strategy_id="s1",
        client_tag="t",
        symbol="RELIANCE-EQ",
        segment="nse_cm",
        token="2885",
        side="SELL",
        quantity=100,
        status="CANCELLED",
    )
    s.on_order_update(upd)
    approve(s, order(side="SELL", qty=100, price="1230.5"))


def test_reduce_only_outside_reducing() -> None:
    s, _ = make()
    assert refused(s, order(reduce_only=True)) == (
        VerdictCode.REDUCE_ONLY,
        "reduce-only: only orders that reduce the strategy's own position pass "
        "(BUY 10 RELIANCE-EQ would open or add for s1)",
    )
    s.on_fill(fill("SELL", 10, "1290.5"))
    approve(s, order(side="BUY", qty=10, reduce_only=True))


# --------------------------------------------------------------------------- 9. notional


def test_notional_above_the_limit_is_rejected() -> None:
    s, _ = make()
    assert refused(s, order(qty=800)) == (
        VerdictCode.NOTIONAL,
        "notional 1032400.00 exceeds max_notional 1000000.00",
    )
    approve(s, order(qty=700))


def test_market_notional_uses_the_last_price() -> None:
    s, _ = make()
    s.on_tick(tick(2000.0))
    assert refused(s, order(price=None, qty=600)) == (
        VerdictCode.NOTIONAL,
        "notional 1200000.00 exceeds max_notional 1000000.00",
    )


# --------------------------------------------------------------------------- 10. open positions


def test_a_new_instrument_beyond_max_open_positions_is_rejected() -> None:
    s, _ = make(max_open_positions=2)
    s.on_fill(fill("BUY", 1, "1290.5", key="nse_cm|2885"))
    s.on_fill(fill("BUY", 1, "165.3", key="nse_cm|3499"))
    assert refused(s, order(symbol="HDFCBANK-EQ", price="985.45")) == (
        VerdictCode.POSITIONS,
        "max_open_positions 2 reached: HDFCBANK-EQ would be position 3",
    )
    approve(s, order(symbol="RELIANCE-EQ"))  # adding to an open position is fine


def test_working_entries_count_as_open_positions() -> None:
    s, _ = make(max_open_positions=1)
    approve(s, order(symbol="RELIANCE-EQ"))
    assert refused(s, order(symbol="TATASTEEL-EQ", price="165.3")) == (
        VerdictCode.POSITIONS,
        "max_open_positions 1 reached: TATASTEEL-EQ would be position 2",
    )


# --------------------------------------------------------------------------- 11. throttle


def test_burst_of_15_in_one_second_approves_10() -> None:
    s, clock = make()
    verdicts = []
    for _ in range(15):
        verdicts.append(s.check(order(qty=1)))
        clock.advance(0.05)  # 15 orders inside 0.75 s
    approved = [v for v in verdicts if v.approved]
    assert len(approved) == 10
    assert {(v.code, v.reason) for v in verdicts if not v.approved} == {
        (VerdictCode.THROTTLE, "throttled: 10 orders in the last second (max_orders_per_sec 10)")
    }


def test_throttle_window_slides() -> None:
    s, clock = make(max_orders_per_sec=2)
    approve(s, order(qty=1))
    clock.advance(0.6)
    approve(s, order(qty=1))
    clock.advance(0.3)
    assert refused(s, order(qty=1))[0] == VerdictCode.THROTTLE
    clock.advance(0.1)  # the first approval is now a full second old
    approve(s, order(qty=1))


def test_rejected_orders_do_not_use_up_the_throttle() -> None:
    s, _ = make(max_orders_per_sec=2)
    for _ in range(5):
        refused(s, order(qty=0))
    approve(s, order(qty=1))
    approve(s, order(qty=1))


# --------------------------------------------------------------------------- PnL


def test_net_pnl_is_gross_minus_turnover_cost() -> None:
    s, _ = make()
    s.on_fill(fill("BUY", 10, "100"))
    s.on_fill(fill("SELL", 4, "110"))
    s.on_tick(tick(105.0))
    st = s.state()
    assert st.realised_pnl == pytest.approx(40.0)
    assert st.unrealised_pnl == pytest.approx(30.0)
    assert st.turnover == pytest.approx(1440.0)
    assert st.cost == pytest.approx(1440 * 0.00035)
    assert st.net_pnl == pytest.approx(70.0 - 1440 * 0.00035)
    assert st.open_positions == 1


def test_positions_of_two_strategies_net_for_exposure() -> None:
    s, _ = make()
    s.on_fill(fill("BUY", 10, "100", strategy="a"))
    s.on_fill(fill("SELL", 10, "110", strategy="b"))
    s.on_tick(tick(120.0))
    assert s.position("nse_cm|2885") == 0
    assert s.state().gross_pnl == pytest.approx(100.0)  # +200 long, -100 short


def test_a_repeated_fill_is_counted_once() -> None:
    s, _ = make()
    f = fill("BUY", 10, "100")
    s.on_fill(f)
    s.on_fill(f)
    assert s.position("nse_cm|2885") == 10


def test_failed_execution_withdraws_the_approval() -> None:
    s, _ = make()
    approve(s, order(request_id="x1"))
    v = s.execution_failed("x1", "execution unreachable: no reply")
    assert (v.approved, v.code, v.reason) == (False, VerdictCode.EXECUTION, "execution unreachable: no reply")
    approve(s, order(request_id="x1", qty=20))  # the id is free again


# --------------------------------------------------------------------------- kill switch


def test_kill_switch_on_halts_records_and_cancels_entries() -> None:
    s, _ = make()
    alert, record, cancel = s.set_kill_switch(True, "market crash")
    assert isinstance(alert, Alert) and alert.code == "kill_switch_on"
    assert (
        isinstance(record, RecordRiskEvent)
        and record.event == "kill_switch_on"
        and record.reason == "market crash"
    )
    assert record.data["kill_switch"] is True
    assert isinstance(cancel, CancelEntries)
    st = s.state()
    assert (st.state, st.kill_switch, st.reason) == (HALTED, True, "market crash")


def test_kill_switch_off_returns_to_active() -> None:
    s, _ = make()
    s.set_kill_switch(True, "x")
    events = s.set_kill_switch(False)
    assert [type(e) for e in events] == [Alert, RecordRiskEvent]
    assert s.current_state == ACTIVE
    approve(s, order())


def test_kill_switch_off_while_loss_breached_stays_reducing() -> None:
    s, _ = make()
    breach(s)
    s.set_kill_switch(True, "x")
    assert s.current_state == HALTED
    events = s.set_kill_switch(False)
    assert s.current_state == REDUCING
    assert isinstance(events[0], Alert) and "still breached" in events[0].text


# --------------------------------------------------------------------------- restore


def day(**kw: object) -> DayState:
    return DayState(trading_day="2026-11-23", **kw)  # type: ignore[arg-type]


def test_restore_rebuilds_positions_turnover_and_pnl() -> None:
    s, _ = make()
    pos = Position(
        strategy_id="s1",
        symbol="RELIANCE-EQ",
        segment="nse_cm",
        token="2885",
        quantity=10,
        avg_price=Decimal("100"),
        realised_pnl=Decimal("25"),
        last_price=103.0,
    )
    s.restore(day(positions=[pos], turnover=Decimal("3000"), realised_pnl=Decimal("25")))
    st = s.state()
    assert s.position("nse_cm|2885") == 10
    assert st.realised_pnl == pytest.approx(25.0) and st.unrealised_pnl == pytest.approx(30.0)
    assert st.turnover == pytest.approx(3000.0) and st.state == ACTIVE
    # the position is closable, and its instrument counts as open
    approve(s, order(side="SELL", qty=10, reduce_only=True))


def test_restore_keeps_a_tripped_kill_switch() -> None:
    s, _ = make()
    s.restore(day(kill_switch=True, kill_reason="tripped before restart"))
    assert s.current_state == HALTED
    assert refused(s, order()) == (VerdictCode.HALTED, "HALTED: kill switch is on (tripped before restart)")


def test_restore_never_unlocks_a_switch_tripped_while_loading() -> None:
    s, _ = make()
    s.set_kill_switch(True, "tripped during start")
    s.restore(day(kill_switch=False))
    assert s.current_state == HALTED and s.kill_reason == "tripped during start"


def test_restore_keeps_the_loss_breach() -> None:
    s, _ = make()
    s.restore(day(loss_breached=True))
    assert s.current_state == REDUCING
    s.set_kill_switch(True, "x")
    s.set_kill_switch(False)
    assert s.current_state == REDUCING


def test_restore_detects_a_breach_already_in_the_day() -> None:
    s, _ = make()
    events = s.restore(day(realised_pnl=Decimal("-6000"), turnover=Decimal("100000")))
    assert s.current_state == REDUCING and isinstance(events[0], Alert)


def test_fills_already_in_the_restored_day_are_not_counted_twice() -> None:
    s, _ = make()
    pos = Position(
        strategy_id="s1",
        symbol="RELIANCE-EQ",
        segment="nse_cm",
        token="2885",
        quantity=10,
        avg_price=Decimal("100"),
    )
    s.restore(day(positions=[pos], turnover=Decimal("1000"), ts_ns=2_000))
    s.on_fill(fill("BUY", 10, "100", ts_ns=1_000))  # published before the snapshot
    assert s.position("nse_cm|2885") == 10
    s.on_fill(fill("BUY", 5, "100", ts_ns=3_000))
    assert s.position("nse_cm|2885") == 15


def test_a_late_fill_traded_before_the_snapshot_counts_once_the_guard_window_passed() -> None:
    s, clock = make()
    s.restore(day(ts_ns=2_000))
    clock.advance(11)  # e.g. reconciliation found an old trade long after the restore
    s.on_fill(fill("BUY", 5, "100", ts_ns=1_000))
    assert s.position("nse_cm|2885") == 5


def test_resync_adopts_the_ledger_book_but_not_the_kill_switch() -> None:
    s, _ = make()
    s.restore(day())
    s.on_fill(fill("BUY", 10, "100"))
    s.set_kill_switch(True, "x")
    s.set_kill_switch(False)  # the off may not have reached execution yet
    pos = Position(
        strategy_id="s1",
        symbol="RELIANCE-EQ",
        segment="nse_cm",
        token="2885",
        quantity=15,
        avg_price=Decimal("100"),
    )
    events, drifted = s.resync(day(positions=[pos], turnover=Decimal("1500"), kill_switch=True))
    assert drifted and events == ()
    assert s.position("nse_cm|2885") == 15 and s.state().turnover == pytest.approx(1500.0)
    assert s.current_state == ACTIVE
    _, drifted = s.resync(day(positions=[pos], turnover=Decimal("1500")))
    assert not drifted


def test_resync_can_reveal_a_loss_breach() -> None:
    s, _ = make()
    s.restore(day())
    events, _ = s.resync(day(realised_pnl=Decimal("-5001")))
    assert s.current_state == REDUCING and isinstance(events[0], Alert)
