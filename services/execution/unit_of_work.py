"""The unit of work: changes are held until one ledger transaction has written them, then their
    intents and publications are released; a savepoint rolls a batch back; an unstorable row is
    set aside."""

from __future__ import annotations

from collections import deque
from typing import Any

from libs.common.messages import Alert, Fill, Message, OrderUpdate
from services.execution.base import (
    EngineBase,
    _topic,
)
from services.execution.intents import CancelIntent, Intent, ModifyIntent, PlaceIntent
from services.execution.model import (
    Changes,
    EventRow,
    OrderRow,
)
from services.execution.store import (
    LedgerDataError,
    LedgerError,
)


class UnitOfWork(EngineBase):
    """The unit of work: changes are held until one ledger transaction has written them, then their
    intents and publications are released; a savepoint rolls a batch back; an unstorable row is
    set aside."""

    LEDGER_LOG_EVERY_NS = 10_000_000_000  # while the ledger is down: one error line per 10 s
    _ledger_logged_ns = 0  # when ``ledger_write_failed`` was last logged (0: the ledger is fine)
    _ledger_failures = 0  # failed flushes since the last good one

    def flush(self) -> bool:
        """Write pending changes in one transaction, then release their intents and messages.
        On a ledger error the changes stay pending (retried on the next flush) and nothing
        that depends on them is released."""
        if (self._new or self._dirty or self._events or self._fills or self._bdirty or self._risk
                or self._kdirty):  # fmt: skip
            changes = Changes(
                new_orders=list(self._new.values()),
                updated={k: v for k, v in self._dirty.items() if k not in self._new},
                events=self._events,
                fills=self._fills,
                brackets=self._bdirty,
                risk_events=self._risk,
                baskets=self._kdirty,
            )
            try:
                try:
                    conflicts = self.store.write(changes)
                except LedgerDataError as exc:  # one row is unstorable: write the rest without it
                    conflicts = self._write_isolating(changes, exc)
            except LedgerError as exc:
                self.stats["ledger_errors"] += 1
                self._ledger_failures += 1
                now = self._now()
                if self.log is not None and (
                    not self._ledger_logged_ns or now - self._ledger_logged_ns >= self.LEDGER_LOG_EVERY_NS
                ):
                    self._ledger_logged_ns = now or 1
                    self.log.error("ledger_write_failed", error=str(exc), failures=self._ledger_failures,
                                   total=self.stats["ledger_errors"])  # fmt: skip
                return False
            if self._ledger_failures:
                if self.log is not None:
                    self.log.warning("ledger_write_recovered", failures=self._ledger_failures)
                self._ledger_logged_ns = self._ledger_failures = 0
            self.stats["flushes"] += 1
            self._new, self._dirty, self._events, self._fills, self._bdirty, self._risk = (
                {},
                {},
                [],
                [],
                {},
                [],
            )
            self._kdirty = {}
            if conflicts:  # pragma: no cover - only when another writer raced us
                self._adopt_conflicts(conflicts)
        if self._held_intents:
            self.intents.extend(self._held_intents)
            self._held_intents = []
        if self._held_msgs:
            self.messages.extend(self._held_msgs)
            self._held_msgs = []
        return True

    def _write_isolating(self, changes: Changes, first: LedgerDataError) -> dict[str, OrderRow]:
        """Write ``changes`` one self-contained unit per transaction (an order with its slices,
        events and bracket; an update with its events; a fill; a bracket; a risk event) so the
        unit the ledger refuses is set aside with an alert and everything else is written.
        A connection error on the way raises ``LedgerError``: the caller keeps the whole set
        pending, and the units already written are idempotent on the retry (new orders on
        ``request_id``, fills on their key, brackets and updates are upserts)."""
        if self.log is not None:
            self.log.error("ledger_refused_rows", error=str(first))
        root: dict[str, str] = {}
        for o in changes.new_orders:
            root[o.order_id] = root.get(o.parent_id, o.order_id) if o.parent_id else o.order_id
        units: list[tuple[str, str, Changes]] = []
        new_units: dict[str, Changes] = {}
        for o in changes.new_orders:
            r = root[o.order_id]
            unit = new_units.get(r)
            if unit is None:
                unit = new_units[r] = Changes()
                units.append(("order", r, unit))
            unit.new_orders.append(o)
        upd_units: dict[str, Changes] = {}
        for oid, o in changes.updated.items():
            upd_units[oid] = Changes(updated={oid: o})
            units.append(("update", oid, upd_units[oid]))
        for ev in changes.events:
            er = root.get(ev.order_id)
            if er is not None:
                new_units[er].events.append(ev)
            elif ev.order_id in upd_units:
                upd_units[ev.order_id].events.append(ev)
            else:
                units.append(("event", ev.order_id, Changes(events=[ev])))
        for f in changes.fills:
            units.append(("fill", f.trade_id, Changes(fills=[f])))
        for bid, b in changes.brackets.items():
            br = root.get(b.entry_id)
            if br is not None:
                new_units[br].brackets[bid] = b
            else:
                units.append(("bracket", bid, Changes(brackets={bid: b})))
        for rv in changes.risk_events:
            units.append(("risk event", rv.event, Changes(risk_events=[rv])))
        for kid, k in changes.baskets.items():  # a basket goes with its first leg's order
            kr = root.get(k.legs[0]) if k.legs else None
            if kr is not None:
                new_units[kr].baskets[kid] = k
            else:
                units.append(("basket", kid, Changes(baskets={kid: k})))
        conflicts: dict[str, OrderRow] = {}
        for kind, name, unit in units:
            try:
                conflicts.update(self.store.write(unit))
            except LedgerDataError as exc:
                self._quarantine(kind, name, unit, str(exc))
        return conflicts

    def _quarantine(self, kind: str, name: str, unit: Changes, why: str) -> None:
        """The ledger cannot store this unit. A new order is refused (never sent: its place
        intents are dropped); anything else is alerted and left out of the ledger."""
        self.stats["quarantined"] += 1
        if kind == "order":
            dropped = {o.order_id for o in unit.new_orders}
            for o in unit.new_orders:
                self._refused[o.request_id] = f"the ledger refused the order: {why}"
                self._unindex(o)
            self._drop_work(dropped)
            for bid in unit.brackets:
                b = self.brackets.pop(bid, None)
                if b is not None:
                    self._open_brackets(b.strategy_id, b.segment, b.token)
        else:  # the ledger is behind memory for these orders: they never leave memory as settled
            self.ledger_behind.update(unit.updated)
            self.ledger_behind.update(e.order_id for e in unit.events)
            self.ledger_behind.update(f.order_id for f in unit.fills)
            self.ledger_behind.update(b.entry_id for b in unit.brackets.values())
        self.alert(
            "CRITICAL",
            f"the ledger refused a {kind} ({name[:64]}): {why[:300]}; set aside, the rest was written",
            "ledger_quarantine",
        )

    def _drop_work(self, dropped: set[str]) -> None:
        """Forget the intents and held publications of orders that are not in the ledger."""

        def keep(x: object) -> bool:
            if isinstance(x, PlaceIntent | CancelIntent | ModifyIntent):
                return x.order_id not in dropped
            if isinstance(x, OrderUpdate | Fill):
                return x.order_id not in dropped
            return True

        self.inflight -= dropped
        self._held_intents = [i for i in self._held_intents if keep(i)]
        self.intents = deque(i for i in self.intents if keep(i))
        self._held_msgs = [(t, m) for t, m in self._held_msgs if keep(m)]

    def _adopt_conflicts(self, conflicts: dict[str, OrderRow]) -> None:
        for rid, existing in conflicts.items():
            mine = self.orders.get(self.by_request.get(rid, ""))
            if mine is not None and mine.order_id != existing.order_id:
                dropped = {mine.order_id, *self.children.get(mine.order_id, [])}
                for oid in dropped:
                    o = self.orders.get(oid)
                    if o is not None:
                        self._unindex(o)
                self._drop_work(dropped)
                self.brackets = {k: b for k, b in self.brackets.items() if b.entry_id not in dropped}
            self._index(existing)

    def take_intents(self) -> list[Intent]:
        out = list(self.intents)
        self.intents.clear()
        return out

    def take_messages(self) -> list[tuple[bytes, Message]]:
        out, self.messages = self.messages, []
        return out

    def _event(self, o: OrderRow, kind: str, old: str, payload: Any = None) -> None:
        self._events.append(
            EventRow(
                order_id=o.order_id,
                kind=kind,
                from_status=old,
                to_status=o.status,
                ts_ns=o.updated_ns,
                payload=payload,
            )
        )

    def _mark(self, o: OrderRow) -> None:
        if o.order_id not in self._new:
            self._dirty[o.order_id] = o

    def _publish_order(self, o: OrderRow) -> None:
        self._held_msgs.append(
            (
                _topic("order", o.strategy_id),
                OrderUpdate(
                    order_id=o.order_id,
                    request_id=o.request_id,
                    strategy_id=o.strategy_id,
                    client_tag=o.client_tag,
                    symbol=o.symbol,
                    segment=o.segment,
                    token=o.token,
                    side=o.side,
                    quantity=o.quantity,
                    status=o.status,
                    price=o.price,
                    trigger_price=o.trigger_price,
                    order_type=o.order_type,
                    filled_qty=o.filled_qty,
                    avg_price=o.avg_price,
                    broker_order_id=o.broker_order_id,
                    reason=o.reason,
                    parent_id=o.parent_id,
                    purpose=o.purpose,
                    ts_ns=o.updated_ns,
                ),
            )
        )

    def alert(self, level: str, text: str, code: str = "") -> None:
        self._held_msgs.append(
            (
                _topic("alert", "execution"),
                Alert(level=level, source="execution", text=text, code=code, ts_ns=self._now()),
            )
        )
        if self.log is not None:
            self.log.warning("alert", level=level, text=text, code=code)

    def _uow_mark(self) -> tuple[int, int, int, set[str], set[str]]:
        held = (len(self._events), len(self._held_intents), len(self._held_msgs))
        return (*held, set(self._new), set(self._bdirty))

    def _uow_rollback(self, mark: tuple[int, int, int, set[str], set[str]], created: list[OrderRow]) -> None:
        """Forget what was added since ``mark``: rows, events, intents, messages, brackets."""
        ids = {o.order_id for o in created}
        for o in created:
            self._unindex(o)
        self._events = self._events[: mark[0]]
        self._held_intents = self._held_intents[: mark[1]]
        self._held_msgs = self._held_msgs[: mark[2]]
        self._new = {k: v for k, v in self._new.items() if k in mark[3]}
        self._bdirty = {k: v for k, v in self._bdirty.items() if k in mark[4]}
        self.brackets = {k: b for k, b in self.brackets.items() if b.entry_id not in ids}
        self.inflight -= ids

    def pending_writes(self) -> bool:
        return bool(
            self._new
            or self._dirty
            or self._events
            or self._fills
            or self._bdirty
            or self._risk
            or self._kdirty
            or self._held_intents
            or self._held_msgs
        )
