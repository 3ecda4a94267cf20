"""``ExecutionEngine``: the order lifecycle, OCO brackets, flatten and reconciliation — pure logic.

No sockets and no SQL here: the engine talks to an ``OrderStore`` (the ledger) and emits
*broker intents* (place / cancel / modify / fetch the books) instead of calling the broker
itself. Whoever runs it executes the intents — inline for the paper broker (``pump()``), in a
thread pool for a real broker — and hands each result back with ``on_result``. The same
engine therefore runs in the service, in backtests and in unit tests.

Durability rules
----------------
* Every order row is committed as ``PENDING_BROKER`` before its place intent is released:
  intents and publications are held until ``flush()`` has written the changes that caused
  them, in one transaction per batch.
* ``submit`` is idempotent on ``request_id``: in memory for the rows it holds, the ledger's
  unique key for settled rows (memory keeps only a hash of their request ids, a maybe the
  ledger answers) and as the backstop of every insert.
* A place whose outcome is unknown leaves the row ``UNKNOWN``; reconciliation finds it by
  ``client_tag``; nothing is ever re-sent blindly.
* Positions are the sum of fills; fills are unique per broker trade id, exchange segment
  and trading day. A filled quantity comes only from trades: a COMPLETE (or CANCELLED) status
  whose trades have not arrived yet leaves the order working, "awaiting fills".
* Cancels are owed work: a cancel that fails is sent again with backoff until the broker's
  book shows the order closed (CRITICAL alert after ``RETRY_ALERT_AFTER`` failures), also
  after a restart and for an order whose broker id becomes known only later.
* An order missing from the broker's book is closed only after ``MISSING_SNAPSHOTS``
  consecutive snapshots spanning ``book_lag_s`` with the trade book agreeing; a row the ledger
  calls terminal but the broker shows working is adopted back (CRITICAL alert).
* A row the ledger refuses (``LedgerDataError``) is set aside with an alert; it never blocks
  the unrelated changes written with it.
"""

from __future__ import annotations

import heapq
import re
from typing import Any

from libs.common.clock import trading_day
from libs.common.messages import (
    ACTIVE,
    HALTED,
    REDUCING,
    DayState,
    EntryCount,
    Position,
    RecordRiskEvent,
    RiskEvent,
    basket_of_leg,
)
from libs.common.positions import PositionState
from services.execution.base import (  # the engine's names, re-exported (``__all__``)
    _ZERO,
    CARRIED,
    KILL_EVENTS,
    SETTLED_AFTER_S,
    SETTLED_RECHECK_NS,
    EngineBase,
    FlattenJob,
    ReconcileState,
    SubmitResult,
)
from services.execution.baskets import Baskets
from services.execution.intents import (  # re-exported (``__all__``)
    BooksIntent,
    CancelIntent,
    Intent,
    ModifyIntent,
    PlaceIntent,
    PositionsIntent,
    run_intent,
)
from services.execution.model import (
    B_ACTIVE,
    BRACKET_OPEN,
    STOP,
    TARGET,
    OrderQuery,
    OrderRow,
    RiskEventRow,
    tag_key,
)
from services.execution.pricing import freeze_step  # re-exported (``__all__``)

_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

__all__ = [
    "CARRIED", "KILL_EVENTS", "SETTLED_AFTER_S", "BooksIntent", "CancelIntent", "EngineBase",
    "ExecutionEngine", "FlattenJob", "Intent", "ModifyIntent", "PlaceIntent", "PositionState",
    "PositionsIntent", "ReconcileState", "SubmitResult", "freeze_step", "run_intent",
]  # fmt: skip


class ExecutionEngine(Baskets):
    """Order lifecycle, OCO brackets, flatten and reconciliation over an ``OrderStore``: the one
    entry point. Its rules live in the parts it is made of, one module each:

    * ``unit_of_work``: held changes, one ledger transaction per flush, savepoints, quarantine;
    * ``orders``: submit, slicing and the order state machine (checks in ``pricing``);
    * ``events``: intent results, order-status and trade events, fills and positions;
    * ``brackets``: OCO legs and the owed cancels; ``flatten``; ``reconcile``: the broker's
      books and the positions it carries; ``baskets``: multi-leg orders, long legs first,
      rollback when a leg fails;
    * ``base``: the shared state and indexes.
    """

    def start(self) -> None:
        """Load today's orders, open brackets and fills from the ledger; reconcile first thing."""
        self.day = trading_day(self.clock)
        for o in self.store.load_orders(self.day):
            self._index(o)
            if o.cancel_requested and not o.terminal and not o.sliced:
                self.owed_cancels.add(o.order_id)  # sent again once the books are read
        for b in self.store.load_open_brackets():
            self.brackets[b.bracket_id] = b
            if b.state in BRACKET_OPEN:
                self._bgroups.setdefault((b.strategy_id, b.segment, b.token), []).append(b)
            if b.state == B_ACTIVE and b.trails:
                self._trail_watch(b)  # resumes from the stop the ledger says it reached
            elif b.state == B_ACTIVE:
                self._trail_owed.add(b.bracket_id)  # a stop moved to cost that its leg may lack
        self._load_carries()
        for f in self.store.load_fills(self.day):
            self._fill_seen(f.trading_day, f.segment).add(f.trade_id)
            self._apply_position(f)
        # an order of an earlier day still working (or in an open bracket): its trades are known
        # too, so one the broker's trade book shows again is not applied to the row a second time
        for day in sorted({o.trading_day for o in self.orders.values()} - {self.day, ""}):
            for f in self.store.load_fills(day):
                self._fill_seen(f.trading_day, f.segment).add(f.trade_id)
        self._load_baskets()
        for r in self.store.risk_events(self.day):
            self._note_stopped(r, min(r.ts_ns, self._now()))
        self._held_intents.append(PositionsIntent(self._now()))
        self.request_reconcile("startup")

    def pump(self, settle: bool = True, max_rounds: int = 10_000) -> int:
        """Run intents inline against ``self.broker`` until nothing is left (paper, backtests).
        New orders are flushed before their intents run. With ``settle=False`` the last
        changes (acks, fills) stay pending for the caller's next flush — group commit.
        Returns the number of intents executed."""
        n = 0
        for _ in range(max_rounds):
            self.drain_broker_events()
            if self._held_intents and not self.flush():  # their rows must be durable first
                break
            intents = self.take_intents()
            if not intents:
                break
            for intent in intents:
                try:
                    result = run_intent(self.broker, intent, self.clock, self.place_timer)
                except Exception as exc:  # noqa: BLE001 - any broker error is a result, never a crash
                    result = exc
                if self.after_place is not None and isinstance(intent, PlaceIntent):
                    self.after_place(intent, result)
                self.on_result(intent, result)
                self.drain_broker_events()
                n += 1
        if settle:
            self.flush()
        self.finish_jobs()
        return n

    def position_list(self, strategy_id: str = "") -> list[Position]:
        now = self._now()
        out = []
        for (sid, key), p in sorted(self.positions.items()):
            if strategy_id and sid != strategy_id:
                continue
            last = self.last.get(key)
            out.append(p.message(last.ltp if last else 0.0, now))
        return out

    def orders_query(self, q: OrderQuery) -> list[dict[str, Any]]:
        self.flush()
        out = []
        for o, fills in self.store.query_orders(q):
            d = o.as_dict()
            d["fills"] = [f.as_dict() for f in fills]
            out.append(d)
        return out

    def record_risk_event(self, ev: RecordRiskEvent) -> None:
        """Store a risk event under the trading day it happened on (``data["trading_day"]``,
        risk's day; else today): a stop or a loss breach risk delivers after midnight belongs
        to the day before and must not carry into the new one."""
        told = ev.data.get("trading_day")
        day = told if isinstance(told, str) and _ISO_DAY.fullmatch(told) else self.day
        row = RiskEventRow(event=ev.event, reason=ev.reason, source=ev.source, ts_ns=ev.ts_ns or self._now(),
                           trading_day=day, data=dict(ev.data), request_id=ev.request_id)  # fmt: skip
        self._risk.append(row)
        self._note_stopped(row, self._now())

    def _note_stopped(self, row: RiskEventRow, since_ns: int) -> None:
        """A strategy stopped today: from ``since_ns`` what it still holds is closed here too."""
        sid = (row.data or {}).get("strategy_id")
        today = row.trading_day == self.day
        if row.event.lower() == RiskEvent.STRATEGY_STOPPED and isinstance(sid, str) and today:
            self.stopped.setdefault(sid, since_ns)

    def day_state(self) -> DayState:
        """What risk rebuilds its day from. The kill switch is the latest switch event of ANY
        day (it stays on until switched off, across midnight and restarts); the loss breach
        and the risk state are today's."""
        self.flush()
        kill, kill_reason, loss, state = False, "", False, ""
        last_switch = self.store.latest_risk_event(KILL_EVENTS)
        if last_switch is not None:
            data = last_switch.data or {}
            ev = last_switch.event.lower()
            if ev == RiskEvent.KILL_SWITCH_ON or (
                ev == "kill_switch" and data.get("on", data.get("kill_switch", True))
            ):
                kill, kill_reason = True, last_switch.reason
        stopped: dict[str, str] = {}
        for r in self.store.risk_events(self.day):
            ev = r.event.lower()
            data = r.data or {}
            if ev == RiskEvent.STRATEGY_STOPPED and isinstance(data.get("strategy_id"), str):
                stopped[data["strategy_id"]] = r.reason
            if ev in ("loss_breached", "daily_loss_breached", "max_daily_loss"):
                loss = True
            rs = data.get("risk_state") or data.get("state")
            if isinstance(rs, str) and rs in (ACTIVE, REDUCING, HALTED):
                state = rs
        if kill:
            state = HALTED
        elif not state or state == HALTED:
            state = REDUCING if loss else ACTIVE
        realised = sum((p.realised for p in self.positions.values()), _ZERO)
        return DayState(
            trading_day=self.day,
            positions=self.position_list(),
            turnover=self.turnover,
            realised_pnl=realised,
            fills=self.fill_count,
            kill_switch=kill,
            kill_reason=kill_reason,
            risk_state=state,
            loss_breached=loss,
            entries=[EntryCount(strategy_id=s, segment=seg, token=tok, count=n)
                     for (s, seg, tok), n in sorted(self.store.entry_counts(self.day).items())],
            stopped=stopped,
            ts_ns=self._now(),
        )

    def check_day(self) -> bool:
        """A new trading day while running: fresh positions; yesterday's finished orders leave memory."""
        today = trading_day(self.clock)
        if today == self.day:
            return False
        self.day = today
        self.positions.clear()
        self.stopped.clear()  # a stop is for its day
        self._stop_rounds.clear()
        self._stop_jobs.clear()
        self._stray.clear()
        self._stray_alerted.clear()
        self._stray_rounds.clear()
        self._stray_jobs.clear()
        self._load_carries()
        self.turnover = _ZERO
        self.fill_count = 0
        for o in list(self.orders.values()):
            if o.terminal and not (
                o.bracket_id
                and o.bracket_id in self.brackets
                and self.brackets[o.bracket_id].state in BRACKET_OPEN
            ):
                self._unindex(o)
        self.settled.clear()  # yesterday's settled rows go the same way (their ids with them)
        self.by_request = {r: oid for r, oid in self.by_request.items() if oid in self.orders}
        self.by_tag = {t: oid for t, oid in self.by_tag.items() if oid in self.orders}
        self.by_broker_id = {b: oid for b, oid in self.by_broker_id.items() if oid in self.orders}
        # the trade ids of the days whose orders are still in memory stay: a trade of one of them
        # that the broker's book shows again after midnight must not fill its row twice
        days = {o.trading_day for o in self.orders.values()} | {today}
        self.fill_keys = {k: v for k, v in self.fill_keys.items() if k[0] in days}
        self.recon.carry_alerted.clear()
        self._held_intents.append(PositionsIntent(self._now()))  # yesterday's NRML/CNC are carried now
        return True

    def status(self) -> dict[str, Any]:
        return {
            "broker": self.broker_name,
            "trading_day": self.day,
            "open_orders": self.open_count(),
            "open_brackets": self.open_bracket_count(),
            "orders_in_memory": len(self.orders),
            "settled_orders": len(self.settled),
            "positions": sum(1 for p in self.positions.values() if p.quantity),
            "inflight": len(self.inflight),
            "last_prices": len(self.last),
            **self.stats,
        }

    # ------------------------------------------------------------------ settled orders
    def reconcile_if_due(self) -> None:
        super().reconcile_if_due()
        self.evict_settled()

    def evict_settled(self) -> int:
        """Settled orders leave memory, so a day's orders cost no time per order and little
        memory. A group — an order with its slices, or an entry with its slices and bracket legs
        — goes once every row of it has been terminal and unchanged for ``SETTLED_AFTER_S``, is
        written to the ledger, owes no cancel, its bracket is closed, no open flatten waits on it,
        and a whole, non-empty books snapshot asked for after its last change has been read (an
        empty "No Data" book or one judged incomplete is no evidence); at a live broker that book
        must show each of its broker orders done. A settled order a later book shows working
        comes back and is adopted (``_apply_book_rows``). Basket legs stay (the basket answers
        from them). Kept per row, in ``settled`` (compact): its order id, its broker order id and
        client tag (exact), a hash of its request id, and the group's segment. A repeat of its
        request is answered from the ledger; a trade for it loads the group back from the ledger.
        Returns the number of rows evicted."""
        due = self._settle_due
        now = self._now()
        if not due or due[0][0] > now:
            return 0
        cutoff = now - int(SETTLED_AFTER_S * 1e9)
        pending = {*self._new, *self._dirty, *(e.order_id for e in self._events)}
        pending.update(f.order_id for f in self._fills)
        pending.update(self.inflight, self.cancel_sent, self.owed_cancels, self._kheld, self._kchase)
        pending.update(self.ledger_behind)  # the ledger's row is not what memory holds: stays
        for rid in self._active_jobs:
            job = self.flatten_jobs.get(rid)
            if job is not None:
                pending.update(job.waiting, job.closing, job.pending_places, job.unconfirmed)
        again: list[tuple[int, str]] = []
        evicted = 0
        while due and due[0][0] <= now:
            _ts, oid = heapq.heappop(due)
            o = self.orders.get(oid)
            if o is None or not o.terminal:
                continue  # gone already, or working again (it comes back here when it ends)
            root = self.orders.get(o.parent_id, o) if o.parent_id else o
            group = self._group(root)
            keep = self._keep_reason(root, group, cutoff, pending)
            if keep == "wait":
                last = max(x.updated_ns for x in group)
                again.append((max(last + int(SETTLED_AFTER_S * 1e9), now + SETTLED_RECHECK_NS), oid))
            elif not keep:
                evicted += self._evict(root, group)
        for item in again:
            heapq.heappush(due, item)
        return evicted

    def _group(self, root: OrderRow) -> list[OrderRow]:
        orders = self.orders
        ids = [root.order_id, *self.children.get(root.order_id, ())]
        if root.bracket_id:
            ids.extend(self.legs.get(root.bracket_id, ()))
        return [orders[x] for x in ids if x in orders]

    def _keep_reason(self, root: OrderRow, group: list[OrderRow], cutoff: int, pending: set[str]) -> str:
        """"" to evict the group now; "wait" to look again later; "stay" to keep it (a row that
        works again comes back when it ends; basket legs stay for the day)."""
        if root.order_id in self._kleg or basket_of_leg(root.request_id):
            return "stay"  # a basket's legs: a repeat of the basket is answered from them
        last = 0
        for x in group:
            if not x.terminal:
                return "stay"
            if x.order_id in pending:
                return "wait"
            last = max(last, x.updated_ns)
        if last > cutoff or self._books_seen_ns <= last:
            return "wait"
        if self.book_lag_ns:  # a live broker's day book lists every order it took, done or not
            done = self._book_done
            if any(x.broker_order_id and x.broker_order_id not in done for x in group):
                return "wait"  # the latest whole book did not show it done: no evidence yet
        b = self.brackets.get(root.bracket_id) if root.bracket_id else None
        if b is not None and (b.state in BRACKET_OPEN or b.bracket_id in self._bdirty):
            return "wait"
        return ""

    def _evict(self, root: OrderRow, group: list[OrderRow]) -> int:
        b = self.brackets.get(root.bracket_id) if root.bracket_id else None
        family = all(x.parent_id == root.order_id for x in group[1:])  # slices, legs: the usual
        self.settled.add(root.segment, [
            (x.order_id, x.request_id, tag_key(x.client_tag), x.broker_order_id) for x in group
        ], family=family)  # fmt: skip
        by_request, by_tag, by_broker_id = self.by_request, self.by_tag, self.by_broker_id
        for x in group:
            oid = x.order_id
            self.orders.pop(oid, None)
            self.working.pop(oid, None)
            if by_request.get(x.request_id) == oid:
                del by_request[x.request_id]
            tag = tag_key(x.client_tag)
            if by_tag.get(tag) == oid:
                del by_tag[tag]
            if x.broker_order_id and by_broker_id.get(x.broker_order_id) == oid:
                del by_broker_id[x.broker_order_id]
            self._awaiting_alerted.discard(oid)
            self._temp_refused.discard(oid)
            self._oversized.pop(oid, None)
            self.recon.bad_rows.discard(oid)
        self.children.pop(root.order_id, None)
        if b is not None:  # a bracket closed unfilled comes back from the ledger with a late trade
            bid = b.bracket_id
            self.brackets.pop(bid, None)
            self.legs.pop(bid, None)
            for kind in (STOP, TARGET):
                self.leg_failed.discard((bid, kind))
                self.leg_retry.pop((bid, kind), None)
        return len(group)
