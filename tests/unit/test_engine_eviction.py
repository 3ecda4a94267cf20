"""Settled orders leave the engine's memory (and the paper broker's) and everything that read
them still behaves: idempotent repeats, reconciliation, late trades, queries, positions.

Driven by hand (``Hand`` from ``test_engine_faults``: the test answers every intent) and, for
the paper broker, by the inline ``Harness`` of ``test_engine``.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from libs.common.clock import ManualClock
from libs.common.messages import CANCELLED, COMPLETE, OPEN, REJECTED, Flatten
from services.execution.base import SETTLED_RECHECK_NS
from services.execution.brokers.base import BrokerOrderStatus, BrokerRejected, BrokerTrade
from services.execution.brokers.paper import SETTLED_AFTER_S as PAPER_SETTLED_AFTER_S
from services.execution.brokers.paper import PaperBroker
from services.execution.engine import SETTLED_AFTER_S, freeze_step
from services.execution.model import B_ACTIVE, B_CLOSED, STOP, TARGET, Changes, OrderQuery, OrderRow, tag_key
from services.execution.store import LedgerDataError, LedgerError, MemoryOrderStore
from tests.unit.test_engine import MASTER, Harness
from tests.unit.test_engine import execute as paper_execute
from tests.unit.test_engine_faults import DAY0_NS, Hand, bracketed_entry, cancels, execute, places

STOP_LOSS, TARGET_PRICE = Decimal("1280.00"), Decimal("1300.00")


def book_row(o: OrderRow, status: str, filled: int = 0) -> BrokerOrderStatus:
    return BrokerOrderStatus(broker_order_id=o.broker_order_id, client_tag=o.client_tag, status=status,
                             quantity=o.quantity, filled_qty=filled)  # fmt: skip


def settle(h: Hand, rows: list[BrokerOrderStatus] | None = None,
           trades: list[BrokerTrade] | None = None) -> int:  # fmt: skip
    """Let the settle time pass, read one books snapshot (by default the broker's whole day
    book as the engine knows it: an empty one is no evidence), run the periodic eviction."""
    h.clock.advance(SETTLED_AFTER_S + 1)
    if rows is None:
        rows = [BrokerOrderStatus(broker_order_id=o.broker_order_id, client_tag=o.client_tag, status=o.status,
                                  quantity=o.quantity, filled_qty=o.filled_qty)
                for o in h.engine.orders.values() if o.broker_order_id]  # fmt: skip
    h.books(rows, trades or [])
    h.engine.flush()
    return h.engine.evict_settled()


def is_settled(e: Any, o: OrderRow) -> bool:
    """``o`` left memory as settled: gone from the rows, still known by its broker id and tag."""
    return (o.order_id not in e.orders and e.settled.group_of(o.broker_order_id, "") >= 0
            and e.settled.group_of("", tag_key(o.client_tag)) >= 0)  # fmt: skip


def filled_order(h: Hand, qty: int = 10, price: str = "1290.00",
                 **kw: Any) -> tuple[str, OrderRow, BrokerTrade]:  # fmt: skip
    """An order acknowledged and filled at once; returns (request id, row, its trade)."""
    cmd = execute(qty=qty, price=price, **kw)
    [res] = h.engine.submit([cmd])
    [p] = places(h.take())
    h.ack(p)
    o = h.order(res.order_id)
    tr = h.trade(o, qty, price)
    assert o.status == COMPLETE
    return cmd.request_id, o, tr


def closed_bracket(h: Hand) -> tuple[OrderRow, OrderRow, OrderRow, list[BrokerTrade]]:
    """A bracketed entry whose target filled and whose stop was cancelled (confirmed)."""
    eid = bracketed_entry(h)
    entry = h.order(eid)
    [stop] = h.legs(eid, STOP)
    [target] = h.legs(eid, TARGET)
    [f] = [f for f in h.store.fills.values() if f.order_id == eid]
    t_entry = BrokerTrade(trade_id=f.trade_id, broker_order_id=entry.broker_order_id,
                          client_tag=entry.client_tag, side="BUY", quantity=10, price=f.price,
                          ts_ns=f.ts_ns)  # fmt: skip
    t_target = h.trade(target, 10, "1300.00")
    [c] = cancels(h.take())
    h.answer(c, None)
    h.status(stop, CANCELLED)
    assert h.engine.brackets[entry.bracket_id].state == B_CLOSED and stop.terminal and target.terminal
    return entry, stop, target, [t_entry, t_target]


# ------------------------------------------------------------------ what leaves memory, and when


def test_a_closed_bracket_leaves_memory_with_its_legs_and_keeps_only_its_ids() -> None:
    h = Hand()
    entry, stop, target, _ = closed_bracket(h)
    realised = h.engine.day_state().realised_pnl

    assert settle(h) == 3

    e = h.engine
    for o in (entry, stop, target):
        assert o.order_id not in e.orders and is_settled(e, o)
        # only compact ids stay: none of the row's strings is held in the dicts of live rows
        assert o.request_id not in e.by_request and e.settled.maybe_request(o.request_id)
        assert o.broker_order_id not in e.by_broker_id and tag_key(o.client_tag) not in e.by_tag
    assert entry.bracket_id not in e.brackets and entry.bracket_id not in e.legs
    assert h.position() == 0 and e.day_state().realised_pnl == realised == Decimal("100.00")
    assert e.status()["open_orders"] == 0 and e.status()["settled_orders"] == 3


def test_a_terminal_order_stays_until_the_settle_time_has_passed_and_a_books_snapshot_was_read() -> None:
    h = Hand()
    _, o, _ = filled_order(h)

    h.clock.advance(1)
    h.books([book_row(o, COMPLETE, 10)], [])
    h.clock.advance(SETTLED_AFTER_S - 5)
    assert h.engine.evict_settled() == 0  # not settled long enough

    _, late, _ = filled_order(h)
    h.clock.advance(SETTLED_AFTER_S + 1)
    assert h.engine.evict_settled() == 1  # the first; the second ended after the last books
    assert is_settled(h.engine, o) and late.order_id in h.engine.orders

    h.books([book_row(o, COMPLETE, 10), book_row(late, COMPLETE, 10)], [])
    h.clock.advance(SETTLED_RECHECK_NS / 1e9)  # a group that had to wait is looked at again this soon
    assert h.engine.evict_settled() == 1
    assert is_settled(h.engine, late)


def test_an_open_bracket_keeps_its_entry_and_working_legs_in_memory() -> None:
    h = Hand()
    eid = bracketed_entry(h)  # the entry is COMPLETE, its stop and target work

    assert settle(h) == 0

    assert eid in h.engine.orders and h.engine.brackets[h.order(eid).bracket_id].state == B_ACTIVE
    assert len(h.legs(eid, STOP)) == 1 and len(h.legs(eid, TARGET)) == 1


def test_an_order_whose_cancel_is_owed_stays_in_memory() -> None:
    h = Hand()
    [res] = h.engine.submit([execute()])
    h.ack(places(h.take())[0])
    o = h.order(res.order_id)
    h.engine.cancel_entries("kill switch")
    [c] = cancels(h.take())
    h.answer(c, BrokerRejected("busy"))  # the cancel failed: it is owed

    assert settle(h, [book_row(o, OPEN)]) == 0
    assert o.order_id in h.engine.orders and o.order_id in h.engine.owed_cancels


def test_an_order_an_open_flatten_waits_on_stays_in_memory() -> None:
    h = Hand()
    _, o, _ = filled_order(h)
    h.tick(1290.0)
    reports: list[dict[str, Any]] = []
    h.engine.flatten(Flatten(request_id="fl1", source="cli"), reports.append)
    [p] = places(h.take())  # the close is sent; its answer is not in yet

    h.clock.advance(SETTLED_AFTER_S + 1)
    h.books([book_row(o, COMPLETE, 10)], [])
    h.engine.flush()
    h.engine.evict_settled()

    assert p.order_id in h.engine.orders and not reports


def test_basket_legs_stay_in_memory_for_the_day() -> None:
    from tests.unit.test_baskets_engine import pair  # a BUY leg, then a held SELL leg

    h = Hand()
    res = h.engine.submit_basket(pair("bk-evict"))
    [long_place] = places(h.take())
    h.answer(long_place, BrokerRejected("RMS: margin exceeds"))  # the basket fails, nothing placed
    legs = [h.engine.orders[r.order_id] for r in res.legs]
    assert all(x.terminal for x in legs)

    settle(h)

    assert all(x.order_id in h.engine.orders for x in legs)
    again = h.engine.submit_basket(pair("bk-evict"))
    assert [r.order_id for r in again.legs] == [x.order_id for x in legs]


# ------------------------------------------------------------------ repeats of settled requests


def test_a_repeat_of_a_settled_request_is_answered_from_the_ledger_with_its_order_id_and_status() -> None:
    h = Hand()
    cmd = execute()
    [first] = h.engine.submit([cmd])
    h.ack(places(h.take())[0])
    h.trade(h.order(first.order_id), 10, "1290.00")
    row = h.order(first.order_id)
    settle(h)
    assert is_settled(h.engine, row)

    [again] = h.engine.submit([cmd])

    assert again.ok and again.order_id == first.order_id and again.status == COMPLETE
    assert again.client_tag == first.client_tag
    assert not places(h.take()) and h.engine.stats["duplicates"] == 1
    assert first.order_id not in h.engine.orders  # answered, not loaded back


def test_a_repeat_of_a_settled_rejected_request_is_still_refused_as_rejected() -> None:
    h = Hand()
    cmd = execute()
    [first] = h.engine.submit([cmd])
    h.answer(places(h.take())[0], BrokerRejected("RMS: margin exceeded"))
    settle(h)

    [again] = h.engine.submit([cmd])

    assert not again.ok and again.code == "rejected" and again.status == REJECTED
    assert again.order_id == first.order_id and "margin" in again.reason


class ReadFailingStore(MemoryOrderStore):
    """A ledger whose reads by request id can be made to fail (a lost connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_fail = False

    def find_by_request_ids(self, request_ids: Any) -> Any:
        if self.reads_fail:
            raise LedgerError("ledger connection lost")
        return super().find_by_request_ids(request_ids)

    def find_by_order_ids(self, order_ids: Any, *, with_children: bool = False) -> Any:
        if self.reads_fail:
            raise LedgerError("ledger connection lost")
        return super().find_by_order_ids(order_ids, with_children=with_children)

    def find_brackets(self, bracket_ids: Any) -> Any:
        if self.reads_fail:
            raise LedgerError("ledger connection lost")
        return super().find_brackets(bracket_ids)


def test_a_repeat_of_a_settled_request_while_the_ledger_cannot_be_read_is_refused_unplaced() -> None:
    store = ReadFailingStore()
    h = Hand(store=store)
    rid, _, _ = filled_order(h)
    settle(h)
    store.reads_fail = True

    [again] = h.engine.submit([execute(rid=rid)])

    assert not again.ok and again.code == "ledger" and not places(h.take())


# ------------------------------------------------------------------ reconciliation


def test_reconciliation_knows_a_settled_order_in_the_brokers_books_as_closed() -> None:
    h = Hand()
    entry, stop, target, trades = closed_bracket(h)
    settle(h)
    fills = h.engine.fill_count

    # the broker's day book still shows all three closed, with their trades
    closed = [book_row(entry, COMPLETE, 10), book_row(stop, CANCELLED), book_row(target, COMPLETE, 10)]
    h.books(closed, trades)

    e = h.engine
    assert "orphan_order" not in h.codes() and "order_adopted" not in h.codes()
    assert e.stats["adopted"] == 0 and e.stats["orphans"] == 0
    assert all(is_settled(e, x) for x in (entry, stop, target))  # not loaded back
    assert e.fill_count == fills and h.position() == 0
    assert not places(h.take()) and not cancels(h.take())


def test_a_settled_stop_a_later_book_shows_working_comes_back_adopted_and_is_cancelled() -> None:
    # a lagging replica cannot be told from a stop that is live after all: a live SELL stop
    # of a flat position would open a short when it triggers, so it is taken back and cancelled
    h = Hand()
    entry, stop, target, trades = closed_bracket(h)
    assert settle(h) == 3

    h.clock.advance(1)
    h.books([book_row(entry, COMPLETE, 10), book_row(stop, OPEN), book_row(target, COMPLETE, 10)], trades)
    h.clock.advance(6)  # the owed cancel's confirm wait passes
    h.engine.reconcile_if_due()

    assert "order_adopted" in h.codes() and h.engine.stats["adopted"] == 1
    assert not is_settled(h.engine, stop) and h.order(stop.order_id).status == OPEN
    assert stop.order_id in [c.order_id for c in cancels(h.take())]
    assert h.position() == 0 and not places(h.take())  # nothing counted twice, no new legs


def test_a_settled_orders_status_saying_it_works_asks_for_the_books_at_once() -> None:
    h = Hand()
    _entry, stop, _target, _ = closed_bracket(h)
    settle(h)
    h.engine.reconcile_due_ns = 1 << 62

    h.engine.on_broker_event(book_row(stop, OPEN))

    assert h.engine.reconcile_due_ns <= h.clock.now_ns()  # the books bring it back (above)


def _working_order(h: Hand) -> tuple[str, OrderRow]:
    cmd = execute(qty=5, price="1200.00")
    [res] = h.engine.submit([cmd])
    h.ack(places(h.take())[0])
    return cmd.request_id, h.order(res.order_id)


def test_an_empty_or_incomplete_book_is_no_evidence_that_a_group_settled() -> None:
    h = Hand()
    entry, stop, target, trades = closed_bracket(h)

    assert settle(h, [], []) == 0  # "No Data": proves nothing
    _, working = _working_order(h)  # then a book without this working order of today: incomplete
    closed = [book_row(entry, COMPLETE, 10), book_row(stop, CANCELLED), book_row(target, COMPLETE, 10)]
    assert settle(h, closed, trades) == 0
    h.books([book_row(working, OPEN)], [])

    assert settle(h) == 3


def test_at_a_live_broker_each_broker_order_must_show_done_in_the_book() -> None:
    h = Hand()
    h.engine.book_lag_ns = 30_000_000_000  # a live broker's book, which keeps the day's orders
    entry, _stop, _target, trades = closed_bracket(h)
    _, other, _ = filled_order(h)
    h.clock.advance(60)

    # a whole book that lists the other order only: not evidence for the bracket's three
    assert settle(h, [book_row(other, COMPLETE, 10)], trades) == 1
    assert entry.order_id in h.engine.orders

    assert settle(h) == 3


class RefusingStore(MemoryOrderStore):
    """Refuses (LedgerDataError) an update that writes one chosen order as COMPLETE: a final
    event the ledger cannot store (e.g. a NUL in a broker's raw reply)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()

    def write(self, changes: Changes) -> Any:
        for oid, row in changes.updated.items():
            if oid in self.refuse and row.status == COMPLETE:
                raise LedgerDataError("invalid input: unsupported Unicode escape sequence")
        return super().write(changes)


def test_an_order_whose_final_update_the_ledger_refused_never_leaves_memory() -> None:
    store = RefusingStore()
    h = Hand(store=store)
    cmd = execute()
    [first] = h.engine.submit([cmd])
    h.ack(places(h.take())[0])
    store.refuse.add(first.order_id)
    h.trade(h.order(first.order_id), 10, "1290.00")  # COMPLETE in memory; the ledger row is not
    assert "ledger_quarantine" in h.codes()

    assert settle(h) == 0

    [again] = h.engine.submit([cmd])  # so a repeat is answered from memory, not the stale row
    assert again.status == COMPLETE


def test_an_order_unknown_to_the_ledger_is_still_an_orphan_after_evictions() -> None:
    h = Hand()
    filled_order(h)
    settle(h)

    h.books([BrokerOrderStatus(broker_order_id="X9", client_tag="npzzzzzzzzzz", status=OPEN, quantity=1)], [])

    assert "orphan_order" in h.codes()


# ------------------------------------------------------------------ late trades


def test_a_late_trade_for_a_settled_cancelled_entry_loads_it_back_and_reopens_its_bracket() -> None:
    h = Hand()
    [res] = h.engine.submit([execute(stop_loss=STOP_LOSS, target=TARGET_PRICE)])
    h.ack(places(h.take())[0])
    entry = h.order(res.order_id)
    h.status(entry, CANCELLED, filled=0)  # closed unfilled: its bracket is CANCELLED
    settle(h, [book_row(entry, CANCELLED)])
    assert is_settled(h.engine, entry) and entry.bracket_id not in h.engine.brackets

    h.trade(entry, 10, "1290.00")  # a real broker can report a fill after the cancel

    back = h.order(entry.order_id)
    assert back.filled_qty == 10 and back.avg_price == Decimal("1290.00")
    assert h.position() == 10 and not is_settled(h.engine, entry)
    assert h.engine.brackets[entry.bracket_id].state == B_ACTIVE
    assert sorted(h.order(p.order_id).purpose for p in places(h.take())) == [STOP, TARGET]
    assert sum(f.quantity for f in h.store.load_fills(h.engine.day)) == 10


def test_a_late_trade_of_a_settled_order_in_the_trade_book_is_applied_once() -> None:
    h = Hand()
    [res] = h.engine.submit([execute()])
    h.ack(places(h.take())[0])
    o = h.order(res.order_id)
    h.status(o, CANCELLED)
    settle(h, [book_row(o, CANCELLED)])
    late = BrokerTrade(trade_id="T-late", broker_order_id=o.broker_order_id, client_tag=o.client_tag,
                       side="BUY", quantity=4, price=Decimal("1289.00"), ts_ns=h.clock.now_ns())  # fmt: skip

    h.books([book_row(o, CANCELLED, 4)], [late])
    h.books([book_row(o, CANCELLED, 4)], [late])  # and again in the next snapshot

    assert h.position() == 4 and h.engine.fill_count == 1
    assert h.order(o.order_id).filled_qty == 4
    [row] = h.engine.orders_query(OrderQuery(trading_day=h.engine.day))
    assert row["filled_qty"] == 4 and len(row["fills"]) == 1


def test_a_late_trade_while_the_ledger_cannot_be_read_is_applied_from_the_next_books() -> None:
    store = ReadFailingStore()
    h = Hand(store=store)
    [res] = h.engine.submit([execute()])
    h.ack(places(h.take())[0])
    o = h.order(res.order_id)
    h.status(o, CANCELLED)
    settle(h, [book_row(o, CANCELLED)])
    store.reads_fail = True

    tr = h.trade(o, 10, "1290.00")

    assert h.position() == 0 and is_settled(h.engine, o)
    assert h.engine.reconcile_due_ns  # the books are asked for again soon
    store.reads_fail = False
    h.books([book_row(o, CANCELLED, 10)], [tr])
    assert h.position() == 10 and h.engine.fill_count == 1


def test_a_late_trade_of_a_settled_slice_reloads_its_parent_and_siblings() -> None:
    from tests.kit.builders import front_future

    nifty = front_future("NIFTY", MASTER)
    h = Hand()
    from tests.kit import execute_order

    qty = freeze_step(nifty.lot_size, nifty.freeze_qty) + nifty.lot_size  # two slices

    [res] = h.engine.submit([execute_order(nifty, "BUY", qty, "24000.00", order_type="LIMIT")])
    kids = places(h.take())
    assert len(kids) == 2
    for p in kids:
        h.ack(p)
    rows = [h.order(p.order_id) for p in kids]
    h.trade(rows[0], rows[0].quantity, "24000.00")
    h.status(rows[1], CANCELLED)
    parent = h.order(res.order_id)
    assert parent.status == CANCELLED and parent.filled_qty == rows[0].quantity
    assert settle(h, [book_row(rows[0], COMPLETE, rows[0].quantity), book_row(rows[1], CANCELLED)]) == 3

    h.trade(rows[1], nifty.lot_size, "24000.00")

    parent = h.order(res.order_id)
    assert parent.filled_qty == qty - rows[1].quantity + nifty.lot_size
    assert h.position(key=nifty.key) == parent.filled_qty


# ------------------------------------------------------------------ queries and positions


def test_queries_and_the_day_state_are_the_same_after_eviction() -> None:
    h = Hand()
    closed_bracket(h)
    filled_order(h, price="1295.00")
    before_orders = h.engine.orders_query(OrderQuery(trading_day=h.engine.day))
    before_state = h.engine.day_state()
    before_positions = h.engine.position_list()

    assert settle(h) == 4

    assert h.engine.orders_query(OrderQuery(trading_day=h.engine.day)) == before_orders
    after = h.engine.day_state()
    assert (after.realised_pnl, after.turnover, after.fills) == (
        before_state.realised_pnl, before_state.turnover, before_state.fills)  # fmt: skip
    assert [(p.symbol, p.quantity) for p in h.engine.position_list()] == [
        (p.symbol, p.quantity) for p in before_positions]  # fmt: skip


def test_a_new_trading_day_drops_yesterdays_settled_ids() -> None:
    h = Hand()
    rid, o, _ = filled_order(h)
    settle(h)
    h.clock.advance(24 * 3600)

    assert h.engine.check_day()

    assert not h.engine.settled and rid not in h.engine.by_request
    assert o.broker_order_id not in h.engine.by_broker_id


# ------------------------------------------------------------------ the paper broker


def test_the_paper_broker_forgets_finished_orders_after_its_settle_time_and_its_journal_keeps_them(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "paper-book.jsonl"
    h = Harness(journal=journal)
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.95, ask=1290.05)
    [res] = h.submit(paper_execute(price="1290.50"))  # marketable: fills on arrival
    boid = h.order(res.order_id).broker_order_id
    assert h.broker.orders[boid].status == COMPLETE and len(h.broker.trade_book()) == 1

    h.clock.advance(PAPER_SETTLED_AFTER_S + 1)
    h.broker.order_book()

    assert boid not in h.broker.orders and h.broker.trade_book() == []
    again = PaperBroker(MASTER, h.clock, journal=journal)  # a restart reads it back from the journal
    assert again.orders[boid].status == COMPLETE and len(again.trade_book()) == 1
    again.close()


def test_a_working_paper_order_stays_in_the_paper_book() -> None:
    h = Harness()
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.95, ask=1295.05)
    [res] = h.submit(paper_execute(price="1290.50"))  # rests

    h.clock.advance(PAPER_SETTLED_AFTER_S + 1)

    boid = h.order(res.order_id).broker_order_id
    assert [s.broker_order_id for s in h.broker.order_book()] == [boid]


def test_a_day_of_paper_orders_keeps_memory_bounded_and_reconciles_cleanly() -> None:
    clock = ManualClock(DAY0_NS)
    store = MemoryOrderStore()
    h = Harness(store=store, clock=clock)
    e = h.engine
    for n in range(60):
        h.tick("RELIANCE-EQ", 1290.0, bid=1289.95, ask=1290.05)
        h.submit(paper_execute(price="1290.50", stop_loss=STOP_LOSS, target=TARGET_PRICE))  # fills; legs go
        h.tick("RELIANCE-EQ", 1300.5, bid=1300.45, ask=1300.55)  # the target fills, the stop goes
        clock.advance(30)
        if n % 2:
            e.request_reconcile("periodic")
            h.pump()
        e.reconcile_if_due()
        h.pump()
    codes = [getattr(m, "code", "") for m in h.published]

    assert len(e.orders) < 60 and len(e.settled) > 90  # 180 rows today, most of them settled
    assert len(h.broker.orders) < 90
    assert e.open_count() == 0 and h.position() == 0
    assert "orphan_order" not in codes and "order_adopted" not in codes and "order_vanished" not in codes
    assert sum(1 for x in store.orders.values() if x.status == COMPLETE) == 120


def test_an_order_whose_request_id_is_a_number_still_leaves_memory() -> None:
    h = Hand()
    filled_order(h, rid="20261202")  # only a basket leg's id ("<basket>:leg<n>") keeps its rows

    assert settle(h) == 1


# ------------------------------------------------------------------ each guarantee on the compact ids


def test_the_broker_repeating_a_settled_orders_trade_applies_nothing_and_loads_nothing_back() -> None:
    h = Hand()
    entry, stop, target, trades = closed_bracket(h)
    settle(h)
    fills, realised = h.engine.fill_count, h.engine.day_state().realised_pnl

    for tr in trades:  # the order feed sends both trades again, after the rows left memory
        h.engine.on_broker_event(tr)
    h.engine.flush()

    assert h.engine.fill_count == fills and h.position() == 0
    assert h.engine.day_state().realised_pnl == realised
    assert all(is_settled(h.engine, x) for x in (entry, stop, target))  # known without the ledger
    assert len(h.store.fills) == 2 and "orphan_order" not in h.codes()


def test_a_late_closed_status_of_a_settled_order_is_known_and_changes_nothing() -> None:
    h = Hand()
    _entry, stop, _target, _ = closed_bracket(h)
    settle(h)
    h.engine.reconcile_due_ns = 1 << 62

    h.status(stop, CANCELLED)

    assert is_settled(h.engine, stop) and h.engine.reconcile_due_ns == 1 << 62
    assert "orphan_order" not in h.codes() and h.engine.stats["orphans"] == 0


def test_a_late_trade_naming_a_settled_order_only_by_its_tag_loads_the_group_back() -> None:
    h = Hand()
    [res] = h.engine.submit([execute()])
    h.ack(places(h.take())[0])
    o = h.order(res.order_id)
    h.status(o, CANCELLED)
    settle(h, [book_row(o, CANCELLED)])

    h.engine.on_broker_event(BrokerTrade(trade_id="77", broker_order_id="", client_tag=o.client_tag.upper(),
                                         side="BUY", quantity=3, price=Decimal("1290.00"),
                                         ts_ns=h.clock.now_ns()))  # fmt: skip
    h.engine.flush()

    assert h.position() == 3 and h.order(o.order_id).filled_qty == 3 and not is_settled(h.engine, o)


def test_a_new_request_whose_id_hash_matches_a_settled_one_is_asked_of_the_ledger_and_placed() -> None:
    # memory keeps a hash of a settled request id: a match is a maybe, the ledger says no
    h = Hand()
    _, o, _ = filled_order(h)
    settle(h)
    e = h.engine
    e.settled.by_request.add("fresh-1")  # as a hash collision would

    [res] = e.submit([execute(rid="fresh-1")])

    assert res.ok and res.order_id != o.order_id and e.stats["duplicates"] == 0
    assert [p.order_id for p in places(h.take())] == [res.order_id]


def test_a_retry_of_a_settled_request_after_a_restart_and_a_second_eviction_is_answered_not_placed() -> None:
    h = Hand()
    rid, o, _ = filled_order(h)
    settle(h)
    again = Hand(store=h.store, clock=h.clock)  # kill -9 and a restart: today's rows are loaded back
    assert o.order_id in again.engine.orders
    [first] = again.engine.submit([execute(rid=rid)])
    settle(again)

    [second] = again.engine.submit([execute(rid=rid)])

    for r in (first, second):
        assert r.ok and r.order_id == o.order_id and r.status == COMPLETE
    assert not places(again.take()) and sum(1 for x in h.store.orders.values() if x.request_id == rid) == 1


def test_a_new_client_tag_never_repeats_a_settled_orders_tag(monkeypatch: Any) -> None:
    import services.execution.orders as orders_mod

    h = Hand()
    _, o, _ = filled_order(h)
    settle(h)
    fresh = iter([o.client_tag, "npaaaaaaaaaa"])
    monkeypatch.setattr(orders_mod, "new_client_tag", lambda: next(fresh))

    [res] = h.engine.submit([execute()])

    assert res.ok and res.client_tag == "npaaaaaaaaaa"


def test_a_trade_for_a_settled_order_the_ledger_lost_is_alerted_and_its_ids_are_orphans_after() -> None:
    h = Hand()
    _, o, _ = filled_order(h)
    settle(h)
    del h.store.orders[o.order_id]  # (a ledger restored from an older backup)

    h.trade(o, 1, "1290.00", tid="T-after")

    assert "settled_missing" in h.codes() and h.position() == 10  # the trade is not applied
    h.status(o, COMPLETE)
    assert "orphan_order" in h.codes()
