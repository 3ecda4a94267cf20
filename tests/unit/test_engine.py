"""ExecutionEngine on the in-memory ledger and the paper broker, with a manual clock:
lifecycle, idempotency, refusals, protected limits, stop-limits, slicing, positions, OCO
brackets (with restart), flatten, the kill-switch hook and reconciliation."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.clock import ManualClock
from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    ACK,
    CANCELLED,
    COMPLETE,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    UNKNOWN,
    ExecuteOrder,
    Fill,
    Flatten,
    OrderRequest,
    OrderUpdate,
    RecordRiskEvent,
    Tick,
)
from services.execution.brokers.base import BrokerAck, BrokerOrder, BrokerUnknown
from services.execution.brokers.paper import PaperBroker
from services.execution.engine import ExecutionEngine, PlaceIntent
from services.execution.model import B_ACTIVE, B_CLOSED, STOP, TARGET
from services.execution.store import MemoryOrderStore, OrderStore
from tests.kit import execute_order
from tests.kit.builders import front_future

MASTER = MasterData.load()
REL = MASTER.resolve("RELIANCE-EQ")
NIFTY = front_future("NIFTY", MASTER)


def execute(
    symbol: str = "RELIANCE-EQ",
    side: str = "BUY",
    qty: int = 10,
    price: str | None = "1290.50",
    order_type: str = "LIMIT",
    **kw: Any,
) -> ExecuteOrder:
    """The kit's ``execute_order`` with this module's defaults (a LIMIT BUY 10 at 1290.50)."""
    return execute_order(symbol, side, qty, price, order_type=order_type, **kw)


class Harness:
    """Engine + store + paper broker wired like the service wires them (inline)."""

    def __init__(
        self,
        store: OrderStore | None = None,
        journal: Path | None = None,
        clock: ManualClock | None = None,
        **broker_kw: Any,
    ) -> None:
        self.cfg = load_config(env={})
        self.clock = clock or ManualClock(1_763_700_000_000_000_000)  # a weekday, 2025-11-21
        self.store = store if store is not None else MemoryOrderStore()
        self.broker = PaperBroker(
            MASTER, self.clock, slippage_bps=self.cfg.paper.slippage_bps, journal=journal, **broker_kw
        )
        self.engine = ExecutionEngine(self.store, self.broker, MASTER, self.clock, self.cfg.execution)
        self.engine.start()
        self.engine.pump()
        self.published: list[Any] = []

    def tick(self, symbol: str, ltp: float, bid: float = 0.0, ask: float = 0.0, **kw: Any) -> None:
        inst = MASTER.resolve(symbol)
        t = Tick(segment=inst.segment, token=inst.token, ltp=ltp, bid=bid, ask=ask, **kw)
        self.clock.advance(0.001)
        self.engine.on_tick(t)
        self.broker.on_tick(t)
        self.pump()

    def submit(self, *cmds: ExecuteOrder) -> list[Any]:
        res = self.engine.submit(cmds)
        self.pump()
        return res

    def pump(self) -> None:
        self.engine.pump()
        self.published.extend(m for _, m in self.engine.take_messages())

    def order(self, order_id: str) -> Any:
        return self.engine.orders[order_id]

    def position(self, symbol: str = "RELIANCE-EQ", strategy: str = "s1") -> int:
        inst = MASTER.resolve(symbol)
        p = self.engine.positions.get((strategy, inst.key))
        return p.quantity if p else 0


@pytest.fixture
def h() -> Harness:
    return Harness()


def fills_sum(h: Harness, symbol: str = "RELIANCE-EQ", strategy: str = "s1") -> int:
    inst = MASTER.resolve(symbol)
    total = 0
    for f in h.store.load_fills(h.engine.day):
        if f.strategy_id == strategy and f.key == inst.key:
            total += f.quantity if f.side == "BUY" else -f.quantity
    return total


# ------------------------------------------------------------------------ lifecycle


def test_resting_limit_goes_pending_ack_open_then_complete_on_a_crossing_tick(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    [res] = h.submit(execute(price="1290.50"))
    assert res.ok and res.status == PENDING_BROKER and res.client_tag.startswith("np")
    o = h.order(res.order_id)
    assert o.status == OPEN and o.broker_order_id
    kinds = [e.kind for e in h.store.events_for(o.order_id)]
    assert kinds[:3] == ["PENDING", "ACK", "OPEN"]

    h.tick("RELIANCE-EQ", 1290.4, bid=1290.3, ask=1290.4)

    assert o.status == COMPLETE and o.filled_qty == 10 and o.avg_price == Decimal("1290.50")
    assert h.position() == 10 == fills_sum(h)
    statuses = [m.status for m in h.published if isinstance(m, OrderUpdate) and m.order_id == o.order_id]
    assert statuses[0] == PENDING_BROKER and statuses[-1] == COMPLETE
    assert any(isinstance(m, Fill) and m.order_id == o.order_id for m in h.published)


def test_submit_is_idempotent_on_request_id(h: Harness) -> None:
    cmd = execute(rid="same-1")
    [a] = h.submit(cmd)
    [b] = h.submit(cmd)
    [c, d] = h.engine.submit([execute(rid="same-2"), execute(rid="same-2")])
    h.pump()
    assert a.order_id == b.order_id
    assert c.order_id == d.order_id
    assert h.broker.places == 2
    assert len(h.store.orders) == 2


def test_idempotent_across_a_restart_from_the_same_store() -> None:
    h1 = Harness()
    [a] = h1.submit(execute(rid="persist-1"))
    h2 = Harness(store=h1.store)
    [b] = h2.submit(execute(rid="persist-1"))
    assert b.order_id == a.order_id
    assert h2.broker.places == 0


def test_refusals_are_recorded_as_rejected_rows(h: Harness) -> None:
    bad_tick = execute(price="1290.55")
    bad_lot = execute(NIFTY.symbol, qty=70, price="25950.00")
    market_no_price = execute("INFY-EQ", price=None, order_type="MARKET")
    results = h.submit(bad_tick, bad_lot, market_no_price)
    assert [r.ok for r in results] == [False, False, False]
    assert "tick size" in results[0].reason
    assert "lot size" in results[1].reason
    assert "no last price" in results[2].reason
    for r in results:
        assert h.store.orders[r.order_id].status == REJECTED
    assert h.broker.places == 0


def test_broker_rejection_ends_rejected_with_the_brokers_reason(h: Harness) -> None:
    cmd = execute("Nifty 50", price="25900.00")  # an index: the paper broker knows it but...
    [res] = h.submit(cmd)
    # the index has a tick size, so the engine sends it; the paper broker accepts indices too,
    # so use an unknown token at the broker instead:
    assert res.ok
    inst = REL
    ghost = ExecuteOrder(
        request_id="ghost",
        order=OrderRequest(
            request_id="ghost", strategy_id="s1", side="BUY", quantity=1, price=Decimal("10.00")
        ),
        quantity=1,
        segment=inst.segment,
        token=inst.token,
        symbol=inst.symbol,
    )
    h.broker.master = MasterData([])  # the broker no longer knows the instrument
    [g] = h.submit(ghost)
    assert h.order(g.order_id).status == REJECTED
    assert "unknown instrument" in h.order(g.order_id).reason


def test_market_intent_becomes_a_protected_limit_filled_at_the_touch_plus_slippage(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    [res] = h.submit(execute(price=None, order_type="MARKET"))
    o = h.order(res.order_id)
    assert o.order_type == "LIMIT"
    assert o.price == Decimal("1302.90")  # 1290 x 1.01, rounded down to the 0.10 tick
    assert o.status == COMPLETE
    # ask 1290.1 + 2 bps = 1290.358 → 1290.40 (rounded against the trader), within the limit
    assert o.avg_price == Decimal("1290.40")


def test_market_bracket_is_judged_against_the_last_price_not_the_protection_cap(h: Harness) -> None:
    # Arrange: the target is 0.5 % above the last price, inside the 1 % protection band.
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)

    # Act
    [res] = h.submit(execute(price=None, order_type="MARKET", stop_loss=Decimal("1280.00"),
                             target=Decimal("1296.50")))

    # Assert: accepted (risk judges it the same way) and filled, with its bracket open.
    o = h.order(res.order_id)
    assert o.status == COMPLETE, o.reason
    assert len(h.engine.brackets) == 1


def test_market_bracket_with_target_below_the_last_price_is_refused(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    [res] = h.submit(execute(price=None, order_type="MARKET", stop_loss=Decimal("1280.00"),
                             target=Decimal("1285.00")))
    o = h.order(res.order_id)
    assert o.status == "REJECTED"
    assert o.reason == "bracket for a BUY needs stop loss < entry (1290.0) < target"


def test_sl_m_intent_becomes_a_stop_limit_that_fills_when_triggered(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    [res] = h.submit(execute(side="SELL", price=None, order_type="SL-M", trigger_price=Decimal("1280.00")))
    o = h.order(res.order_id)
    assert (o.order_type, o.trigger_price, o.price) == ("SL", Decimal("1280.00"), Decimal("1267.20"))
    h.tick("RELIANCE-EQ", 1285.0, bid=1284.9, ask=1285.1)
    assert o.status == OPEN
    h.tick("RELIANCE-EQ", 1279.0, bid=1278.9, ask=1279.1)
    assert o.status == COMPLETE
    assert Decimal("1267.20") <= o.avg_price <= Decimal("1278.90")
    assert h.position() == -10


def test_order_above_freeze_quantity_is_sliced_into_legal_children(h: Harness) -> None:
    h.tick(NIFTY.symbol, 25950.0, bid=25949.9, ask=25950.1)
    [res] = h.submit(execute(NIFTY.symbol, qty=3900, price="25940.00"))  # 60 lots of 65
    parent = h.order(res.order_id)
    kids = [h.order(c) for c in h.engine.children[parent.order_id]]
    assert parent.sliced and [k.quantity for k in kids] == [1755, 1755, 390]  # freeze 1,800 → 27 lots
    assert all(k.quantity % NIFTY.lot_size == 0 and k.quantity <= NIFTY.freeze_qty for k in kids)
    assert all(k.parent_id == parent.order_id for k in kids)
    assert h.broker.places == 3
    assert parent.status == OPEN

    h.tick(NIFTY.symbol, 25930.0, bid=25929.9, ask=25930.0)

    assert parent.status == COMPLETE and parent.filled_qty == 3900
    assert h.position(NIFTY.symbol) == 3900 == fills_sum(h, NIFTY.symbol)


def test_partial_fills_then_complete(tmp_path: Path) -> None:
    h = Harness(partial_fills=True)
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1, ask_qty=5)
    [res] = h.submit(execute(qty=12, price="1290.00"))
    h.tick("RELIANCE-EQ", 1289.0, bid=1288.9, ask=1289.0, ask_qty=5)
    o = h.order(res.order_id)
    assert o.status == PARTIAL and o.filled_qty == 5
    h.tick("RELIANCE-EQ", 1289.0, bid=1288.9, ask=1289.0, ask_qty=5)
    h.tick("RELIANCE-EQ", 1289.0, bid=1288.9, ask=1289.0, ask_qty=5)
    assert o.status == COMPLETE and o.filled_qty == 12 and h.position() == 12


def test_positions_average_price_and_realised_pnl_from_fills(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1000.0, bid=1000.0, ask=1000.0)
    h.broker.slip = Decimal(0)
    h.submit(execute(qty=10, price="1005.00"))  # fills at 1000
    h.tick("RELIANCE-EQ", 1010.0, bid=1010.0, ask=1010.0)
    h.submit(execute(qty=10, price="1015.00"))  # fills at 1010 → avg 1005
    h.tick("RELIANCE-EQ", 1020.0, bid=1020.0, ask=1020.0)
    h.submit(execute(side="SELL", qty=15, price="1015.00"))  # sells 15 at 1020
    p = h.engine.positions[("s1", REL.key)]
    assert p.quantity == 5 and p.avg_price == Decimal("1005")
    assert p.realised == Decimal(15 * 15)
    day = h.engine.day_state()
    assert day.fills == 3 and day.realised_pnl == Decimal(225)
    assert day.turnover == Decimal(10 * 1000 + 10 * 1010 + 15 * 1020)


# ------------------------------------------------------------------------ brackets


def bracket_entry(h: Harness, qty: int = 10) -> Any:
    h.tick("RELIANCE-EQ", 1300.0, bid=1299.9, ask=1300.1)
    [res] = h.submit(
        execute(qty=qty, price="1295.00", stop_loss=Decimal("1280.00"), target=Decimal("1320.00"))
    )
    return res


def legs(h: Harness, kind: str) -> list[Any]:
    b = next(iter(h.engine.brackets.values()))
    return [h.order(x) for x in h.engine.legs.get(b.bracket_id, []) if h.order(x).purpose == kind]


def test_bracket_places_stop_and_target_after_the_entry_fills_and_target_cancels_stop(h: Harness) -> None:
    res = bracket_entry(h)
    assert legs(h, STOP) == [] and legs(h, TARGET) == []
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)  # entry fills
    [stop], [target] = legs(h, STOP), legs(h, TARGET)
    assert (stop.order_type, stop.side, stop.trigger_price, stop.quantity) == (
        "SL",
        "SELL",
        Decimal("1280.00"),
        10,
    )
    assert (target.order_type, target.price, target.status) == ("LIMIT", Decimal("1320.00"), OPEN)
    b = next(iter(h.engine.brackets.values()))
    assert b.state == B_ACTIVE and h.order(res.order_id).bracket_id == b.bracket_id

    h.tick("RELIANCE-EQ", 1321.0, bid=1320.9, ask=1321.1)  # target fills

    assert target.status == COMPLETE and stop.status == CANCELLED
    assert b.state == B_CLOSED and h.position() == 0 == fills_sum(h)
    assert h.engine.open_count() == 0


def test_partial_entry_fill_sizes_the_legs_and_partial_target_shrinks_the_stop() -> None:
    h = Harness(partial_fills=True)
    h.tick("RELIANCE-EQ", 1300.0, bid=1299.9, ask=1300.1, ask_qty=100)
    h.submit(execute(qty=10, price="1295.00", stop_loss=Decimal("1280.00"), target=Decimal("1320.00")))
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0, ask_qty=4)
    assert sum(x.quantity for x in legs(h, STOP)) == 4 == sum(x.quantity for x in legs(h, TARGET))
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0, ask_qty=6)
    assert sum(x.remaining for x in legs(h, STOP) if not x.terminal) == 10
    h.tick("RELIANCE-EQ", 1321.0, bid=1320.0, bid_qty=3, ask=1321.1)  # target fills 3 of 10
    live_stop = sum(x.remaining for x in legs(h, STOP) if not x.terminal)
    assert h.position() == 7 and live_stop == 7
    h.tick("RELIANCE-EQ", 1279.0, bid=1278.9, bid_qty=100, ask=1279.1)  # stop triggers for the rest
    assert h.position() == 0 == fills_sum(h)
    assert all(x.terminal for x in legs(h, STOP) + legs(h, TARGET))
    assert next(iter(h.engine.brackets.values())).state == B_CLOSED


def test_bracket_survives_a_restart_and_the_target_still_cancels_the_stop(tmp_path: Path) -> None:
    journal = tmp_path / "paper.jsonl"
    clock = ManualClock(1_763_700_000_000_000_000)
    h1 = Harness(journal=journal, clock=clock)
    bracket_entry(h1)
    h1.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)
    assert [x.status for x in legs(h1, STOP)] == [OPEN]
    h1.broker.close()

    h2 = Harness(store=h1.store, journal=journal, clock=clock)  # a new engine and broker, same books
    assert [x.status for x in legs(h2, STOP)] == [OPEN]
    h2.tick("RELIANCE-EQ", 1321.0, bid=1320.9, ask=1321.1)

    assert [x.status for x in legs(h2, TARGET)] == [COMPLETE]
    assert [x.status for x in legs(h2, STOP)] == [CANCELLED]
    assert h2.position() == 0 == fills_sum(h2)
    assert h2.engine.open_count() == 0
    assert h1.store.load_open_brackets() == []


def test_an_exit_by_other_means_cancels_the_legs_instead_of_leaving_a_live_stop(h: Harness) -> None:
    bracket_entry(h)
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)
    assert [x.status for x in legs(h, STOP)] == [OPEN] and h.position() == 10
    h.submit(execute(side="SELL", qty=4, price=None, order_type="MARKET", purpose="EXIT"))
    assert sum(x.remaining for x in legs(h, STOP) if not x.terminal) == 6  # resized to what is held
    h.submit(execute(side="SELL", qty=6, price=None, order_type="MARKET", purpose="EXIT"))
    assert h.position() == 0 == fills_sum(h)
    assert all(x.terminal for x in legs(h, STOP) + legs(h, TARGET))
    assert next(iter(h.engine.brackets.values())).state == B_CLOSED
    h.tick("RELIANCE-EQ", 1270.0, bid=1269.9, ask=1270.1)  # through the old stop: nothing happens
    assert h.position() == 0


# ------------------------------------------------------------------------ flatten and kill switch


def test_flatten_cancels_open_orders_and_closes_every_position(h: Harness) -> None:
    for sym, px in (("RELIANCE-EQ", 1290.0), ("INFY-EQ", 1510.0), ("TCS-EQ", 3100.0)):
        h.tick(sym, px, bid=px - 0.1, ask=px + 0.1)
        h.submit(execute(sym, qty=5, price=None, order_type="MARKET"))
    [resting] = h.submit(execute(qty=5, price="1200.00"))
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f1"), reports.append)
    h.pump()
    [report] = reports
    assert report["cancelled"] == 1 and h.order(resting.order_id).status == CANCELLED
    assert len(report["closing"]) == 3 and report["open_positions"] == []
    for sym in ("RELIANCE-EQ", "INFY-EQ", "TCS-EQ"):
        assert h.position(sym) == 0 == fills_sum(h, sym)
    again: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f1"), again.append)
    assert again == [report]


def test_flatten_one_symbol_leaves_the_others(h: Harness) -> None:
    for sym, px in (("RELIANCE-EQ", 1290.0), ("INFY-EQ", 1510.0)):
        h.tick(sym, px, bid=px - 0.1, ask=px + 0.1)
        h.submit(execute(sym, qty=5, price=None, order_type="MARKET"))
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="f2", symbol="INFY-EQ"), reports.append)
    h.pump()
    assert h.position("INFY-EQ") == 0 and h.position("RELIANCE-EQ") == 5


def test_cancel_entries_cancels_entries_but_keeps_protective_legs(h: Harness) -> None:
    bracket_entry(h)
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)
    [resting] = h.submit(execute(qty=5, price="1200.00"))
    ids = h.engine.cancel_entries("kill switch")
    h.pump()
    assert ids == [resting.order_id]
    assert h.order(resting.order_id).status == CANCELLED
    assert [x.status for x in legs(h, STOP)] == [OPEN]


def test_day_state_reads_the_kill_switch_from_the_latest_risk_event(h: Harness) -> None:
    h.engine.record_risk_event(RecordRiskEvent(event="kill_switch_on", reason="manual", request_id="k1"))
    h.engine.record_risk_event(RecordRiskEvent(event="kill_switch_on", reason="manual", request_id="k1"))
    assert h.engine.day_state().kill_switch is True
    assert len(h.store.risk_events(h.engine.day)) == 1
    h.engine.record_risk_event(RecordRiskEvent(event="kill_switch_off", reason="ok", request_id="k2"))
    state = h.engine.day_state()
    assert state.kill_switch is False and state.risk_state == "ACTIVE"


# ------------------------------------------------------------------------ unknown outcomes and reconciliation


class FlakyPaper(PaperBroker):
    """Places the order, then loses the reply (like a timeout after the broker accepted)."""

    lose_next = False

    def place(self, order: BrokerOrder) -> BrokerAck:
        ack = super().place(order)
        if self.lose_next:
            self.lose_next = False
            raise BrokerUnknown("timeout after 10 s")
        return ack


def test_unknown_outcome_is_resolved_by_tag_without_resending() -> None:
    h = Harness()
    flaky = FlakyPaper(MASTER, h.clock)
    h.engine.broker = flaky
    h.broker = flaky
    flaky.lose_next = True
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    [res] = h.engine.submit([execute(price="1290.00")])
    h.engine.flush()
    [intent] = h.engine.take_intents()
    assert isinstance(intent, PlaceIntent)
    try:
        flaky.place(intent.order)
    except BrokerUnknown as exc:
        h.engine.on_result(intent, exc)
    flaky.drain_events()  # the order feed lost the updates too
    assert h.order(res.order_id).status == UNKNOWN

    h.engine.request_reconcile("test")
    h.pump()

    o = h.order(res.order_id)
    assert o.status == OPEN and o.broker_order_id
    assert flaky.places == 1


def test_pending_row_never_sent_is_rejected_by_reconciliation_not_resent() -> None:
    h = Harness()
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    [res] = h.engine.submit([execute(price="1290.00")])
    h.engine.flush()  # committed, then "crash" before the broker call
    h2 = Harness(store=h.store, clock=h.clock)
    assert h2.order(res.order_id).status == PENDING_BROKER  # one book without it proves nothing
    h2.engine.request_reconcile("test")
    h2.pump()
    o = h2.order(res.order_id)
    assert o.status == REJECTED and "never reached the broker" in o.reason
    assert h2.broker.places == 0 and h.broker.places == 0


def test_ack_lost_in_a_crash_is_recovered_from_the_broker_books(tmp_path: Path) -> None:
    journal = tmp_path / "paper.jsonl"
    h = Harness(journal=journal)
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    [res] = h.engine.submit([execute(price=None, order_type="MARKET")])
    h.engine.flush()
    [intent] = h.engine.take_intents()
    h.broker.place(intent.order)  # the broker accepted (and filled); the ack never got written
    h.broker.close()
    h2 = Harness(store=h.store, journal=journal, clock=h.clock)
    o = h2.order(res.order_id)
    assert o.status == COMPLETE and o.filled_qty == 10
    assert h2.position() == 10 == fills_sum(h2)
    assert h2.broker.places == 0 and len(h2.broker.orders) == 1
    assert any(isinstance(m, OrderUpdate) and m.status == ACK for m in h2.published) or o.status == COMPLETE

