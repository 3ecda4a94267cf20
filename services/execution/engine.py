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
* ``submit`` is idempotent on ``request_id`` (in memory, and in the ledger's unique key).
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

from typing import Any

from libs.common.clock import trading_day
from libs.common.messages import (
    ACTIVE,
    HALTED,
    REDUCING,
    DayState,
    Position,
    RecordRiskEvent,
    RiskEvent,
)
from libs.common.positions import PositionState
from services.execution.base import (  # the engine's names, re-exported (``__all__``)
    _ZERO,
    CARRIED,
    KILL_EVENTS,
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
    BRACKET_OPEN,
    OrderQuery,
    RiskEventRow,
)
from services.execution.pricing import freeze_step  # re-exported (``__all__``)

__all__ = [
    "CARRIED", "KILL_EVENTS", "BooksIntent", "CancelIntent", "EngineBase", "ExecutionEngine", "FlattenJob",
    "Intent", "ModifyIntent", "PlaceIntent", "PositionState", "PositionsIntent", "ReconcileState",
    "SubmitResult", "freeze_step", "run_intent",
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
        self._load_carries()
        for f in self.store.load_fills(self.day):
            self.fill_keys.add((f.trading_day, f.segment, f.trade_id))
            self._apply_position(f)
        self._load_baskets()
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
                    result = run_intent(self.broker, intent, self.clock)
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
        self._risk.append(
            RiskEventRow(
                event=ev.event,
                reason=ev.reason,
                source=ev.source,
                ts_ns=ev.ts_ns or self._now(),
                trading_day=self.day,
                data=dict(ev.data),
                request_id=ev.request_id,
            )
        )

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
        for r in self.store.risk_events(self.day):
            ev = r.event.lower()
            data = r.data or {}
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
            ts_ns=self._now(),
        )

    def check_day(self) -> bool:
        """A new trading day while running: fresh positions; yesterday's finished orders leave memory."""
        today = trading_day(self.clock)
        if today == self.day:
            return False
        self.day = today
        self.positions.clear()
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
        self.fill_keys = {k for k in self.fill_keys if k[0] == today}
        self.recon.carry_alerted.clear()
        self._held_intents.append(PositionsIntent(self._now()))  # yesterday's NRML/CNC are carried now
        return True

    def status(self) -> dict[str, Any]:
        return {
            "broker": self.broker_name,
            "trading_day": self.day,
            "open_orders": self.open_count(),
            "open_brackets": sum(1 for b in self.brackets.values() if b.state in BRACKET_OPEN),
            "positions": sum(1 for p in self.positions.values() if p.quantity),
            "inflight": len(self.inflight),
            "last_prices": len(self.last),
            **self.stats,
        }
