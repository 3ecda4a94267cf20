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

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.common.bus import topic
from libs.common.clock import IST, Clock, trading_day
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import (
    ACK,
    ACTIVE,
    CANCELLED,
    COMPLETE,
    HALTED,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REDUCING,
    REJECTED,
    UNKNOWN,
    Alert,
    DayState,
    ExecuteOrder,
    Fill,
    Flatten,
    Message,
    OrderUpdate,
    Position,
    RecordRiskEvent,
    Tick,
    to_builtins,
)
from libs.common.money import MoneyError, protected_limit, to_decimal
from services.execution.brokers.base import (
    BrokerAck,
    BrokerOrder,
    BrokerOrderStatus,
    BrokerPosition,
    BrokerRejected,
    BrokerTemporary,
    BrokerTrade,
    BrokerUnknown,
)
from services.execution.model import (
    B_ACTIVE,
    B_CANCELLED,
    B_CLOSED,
    B_FLATTENED,
    B_PENDING,
    BRACKET_OPEN,
    ENTRY,
    EXIT,
    FLATTEN_P,
    LEG_PURPOSES,
    RANK,
    REQUEST_PURPOSES,
    STOP,
    BracketRow,
    Changes,
    EventRow,
    FillRow,
    OrderQuery,
    OrderRow,
    RiskEventRow,
    new_client_tag,
    new_id,
    tag_key,
)
from services.execution.store import (
    CARRIED_STRATEGY,
    LedgerDataError,
    LedgerError,
    OrderStore,
    fill_problem,
)

_ZERO = Decimal(0)
_LEGS = LEG_PURPOSES
RETRY_BASE_S = 0.5  # first retry of a failed cancel or leg place; doubles up to RETRY_MAX_S
RETRY_MAX_S = 30.0
RETRY_ALERT_AFTER = 5  # failures of one owed cancel / leg place before a CRITICAL alert
MISSING_SNAPSHOTS = 2  # consecutive order books without an order before it is closed
LOST_CLOSE_S = 300.0  # an acknowledged order absent from a working book this long is gone
MISSING_RECHECK_NS = 1_000_000_000  # the next book after a miss is asked for this soon at the earliest
CANCEL_CONFIRM_NS = 5_000_000_000  # an accepted cancel whose order still works after this is sent again
FLATTEN_CANCEL_WAIT_S = 10.0  # flatten closes positions once its cancels are confirmed, or after this
KILL_EVENTS = ("kill_switch_on", "kill_switch_off", "kill_switch")
CARRIED = CARRIED_STRATEGY  # the strategy id of carried positions no strategy's fills explain
QTY_MAX = 2**31 - 1  # the ledger's INTEGER quantity columns
MAX_PRICE = Decimal(10_000_000)  # the decoder's cap on any price (risk checks it too)
_TOPICS: dict[tuple[str, str], bytes] = {}


def _topic(kind: str, name: str) -> bytes:
    """``topic(kind, name)``, remembered: a few strategies make a few topics, used per order."""
    t = _TOPICS.get((kind, name))
    if t is None:
        if len(_TOPICS) > 10_000:  # strategy ids come from requests: keep the memo bounded
            _TOPICS.clear()
        # an id that is not plain ASCII is refused, but its REJECTED row is still published
        safe = name if name.isascii() else name.encode("ascii", "replace").decode()
        t = _TOPICS[(kind, name)] = topic(kind, safe)
    return t


# --------------------------------------------------------------------------- intents


@dataclass(slots=True)
class PlaceIntent:
    order_id: str
    order: BrokerOrder
    expires_ns: int = 0  # the request's deadline: not sent once it has passed (0: none)


@dataclass(slots=True)
class CancelIntent:
    order_id: str
    broker_order_id: str


@dataclass(slots=True)
class ModifyIntent:
    order_id: str
    broker_order_id: str
    quantity: int
    old_quantity: int


@dataclass(slots=True)
class BooksIntent:
    """Fetch the broker's order book and trade book (reconciliation)."""

    started_ns: int
    reason: str = "periodic"


@dataclass(slots=True)
class PositionsIntent:
    """Fetch the positions the broker carries from earlier days (NRML/CNC), once at start."""

    started_ns: int


Intent = PlaceIntent | CancelIntent | ModifyIntent | BooksIntent | PositionsIntent


def run_intent(broker: Any, intent: Intent, clock: Clock | None = None) -> Any:
    """Execute one intent against a broker (on the loop for paper, in a worker thread otherwise).
    A place whose deadline passed while it waited for a worker is not sent: risk has told the
    strategy by then that the order expires unplaced."""
    if isinstance(intent, PlaceIntent):
        if intent.expires_ns and clock is not None and clock.now_ns() > intent.expires_ns:
            late_ms = (clock.now_ns() - intent.expires_ns) / 1e6
            raise BrokerTemporary(f"deadline passed {late_ms:.0f} ms before it could be sent")
        return broker.place(intent.order)
    if isinstance(intent, CancelIntent):
        return broker.cancel(intent.broker_order_id)
    if isinstance(intent, ModifyIntent):
        return broker.modify(intent.broker_order_id, quantity=intent.quantity)
    if isinstance(intent, PositionsIntent):
        carried = getattr(broker, "carried_positions", None)
        return carried() if carried is not None else None
    return (broker.order_book(), broker.trade_book())


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class SubmitResult:
    request_id: str
    ok: bool
    order_id: str = ""
    status: str = ""
    client_tag: str = ""
    reason: str = ""
    code: str = ""

    def data(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "status": self.status,
            "client_tag": self.client_tag,
            "reason": self.reason,
        }


@dataclass
class PositionState:
    strategy_id: str
    segment: str
    token: str
    symbol: str
    quantity: int = 0
    avg_price: Decimal = _ZERO
    realised: Decimal = _ZERO
    buy_qty: int = 0
    sell_qty: int = 0
    buy_value: Decimal = _ZERO
    sell_value: Decimal = _ZERO
    # net quantity per product (MIS / NRML / CNC): a close goes out in the product it closes
    by_product: dict[str, int] = field(default_factory=dict)
    # what the broker carried into today per product (already included in ``quantity``)
    carried: dict[str, int] = field(default_factory=dict)

    def carry(self, product: str, qty: int, avg_price: Decimal) -> None:
        """Set the quantity carried from earlier days in ``product`` (idempotent: a second
        report of the same carry changes nothing; today's fills stay on top of it)."""
        delta = qty - self.carried.get(product, 0)
        if not delta:
            return
        self.carried[product] = qty
        if self.quantity == 0:
            self.avg_price = avg_price
        self.quantity += delta
        net = self.by_product.get(product, 0) + delta
        if net:
            self.by_product[product] = net
        else:
            self.by_product.pop(product, None)

    def apply(self, side: str, qty: int, price: Decimal, product: str = "MIS") -> None:
        signed = qty if side == "BUY" else -qty
        net = self.by_product.get(product, 0) + signed
        if net:
            self.by_product[product] = net
        else:
            self.by_product.pop(product, None)
        if side == "BUY":
            self.buy_qty += qty
            self.buy_value += price * qty
        else:
            self.sell_qty += qty
            self.sell_value += price * qty
        held = self.quantity
        if held == 0 or (held > 0) == (signed > 0):
            total = abs(held) + qty
            self.avg_price = (self.avg_price * abs(held) + price * qty) / total
            self.quantity = held + signed
            return
        closing = min(abs(held), qty)
        direction = 1 if held > 0 else -1
        self.realised += (price - self.avg_price) * closing * direction
        self.quantity = held + signed
        if self.quantity == 0:
            self.avg_price = _ZERO
        elif qty > closing:  # flipped through zero: the rest opens at this price
            self.avg_price = price

    def message(self, last_price: float, now_ns: int) -> Position:
        return Position(
            strategy_id=self.strategy_id,
            symbol=self.symbol,
            segment=self.segment,
            token=self.token,
            quantity=self.quantity,
            avg_price=self.avg_price,
            realised_pnl=self.realised,
            buy_qty=self.buy_qty,
            sell_qty=self.sell_qty,
            buy_value=self.buy_value,
            sell_value=self.sell_value,
            last_price=last_price,
            ts_ns=now_ns,
        )


@dataclass
class FlattenJob:
    """One flatten: cancel what works, wait until the broker confirms every one of those
    orders closed (fills of a leg may still be on their way), then close what is held."""

    request: Flatten
    waiters: list[Callable[[dict[str, Any]], None]]
    deadline_ns: int = 0
    waiting: set[str] = field(default_factory=set)  # orders that must end before the close
    pending_places: set[str] = field(default_factory=set)
    cancelled: list[str] = field(default_factory=list)
    closing: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)  # still working when the wait ran out
    rounds: int = 0  # close rounds: the first, then one per unconfirmed order that ended
    phase: str = "cancel"  # cancel → close → ready → done
    report: dict[str, Any] | None = None


@dataclass(slots=True)
class ReconcileState:
    """What reconciliation remembers between snapshots."""

    incomplete_since_ns: int = 0  # first of the consecutive order books that were not whole
    incomplete_alerted: bool = False
    carried_retry: bool = False  # the carried positions could not be read: ask again
    bad_rows: set[str] = field(default_factory=set)  # orders whose impossible book row was alerted
    carry_alerted: set[tuple[str, str]] = field(default_factory=set)  # (instrument, product)


# --------------------------------------------------------------------------- engine


def _odd_price(o: Any) -> str | None:
    """A price, trigger, stop loss or target that is not finite and within the price cap."""
    for name, value in (("price", o.price), ("trigger price", o.trigger_price), ("stop loss", o.stop_loss),
                        ("target", o.target)):  # fmt: skip
        if value is not None and (not value.is_finite() or not 0 < value <= MAX_PRICE):
            return f"{name} {value} must be a finite number above 0 and at most {MAX_PRICE}"
    return None


def _printable_id(text: str) -> bool:
    """An id that can go into a bus topic and a log line: 1-64 printable ASCII characters."""
    return 0 < len(text) <= 64 and text.isascii() and text.isprintable()


def freeze_step(lot_size: int, freeze_qty: int) -> int:
    """The largest order size the exchange accepts under a freeze quantity: the biggest
    multiple of the lot size not above ``freeze_qty`` (one lot when the lot exceeds it)."""
    lot = max(1, lot_size)
    return max(lot, freeze_qty - freeze_qty % lot)


class ExecutionEngine:
    """Order lifecycle, OCO brackets, flatten and reconciliation over an ``OrderStore``."""

    def __init__(
        self, store: OrderStore, broker: Any, master: MasterData, clock: Clock, cfg: Any, *, log: Any = None
    ) -> None:
        self.store = store
        self.broker = broker
        self.master = master
        self.clock = clock
        self.cfg = cfg
        self.log = log
        self.protection_pct = float(cfg.execution.protection_pct)
        self.broker_name = str(getattr(broker, "name", cfg.execution.broker))
        self.book_lag_ns = int(float(getattr(broker, "book_lag_s", 10.0)) * 1e9)
        self.day = trading_day(clock)
        # state
        self.orders: dict[str, OrderRow] = {}
        self.by_request: dict[str, str] = {}
        self.by_tag: dict[str, str] = {}
        self.by_broker_id: dict[str, str] = {}
        self.children: dict[str, list[str]] = {}  # sliced parent → slices
        self.brackets: dict[str, BracketRow] = {}
        # (strategy, segment, token) → its brackets that may still be open, in creation order
        # (pruned as they close: a closed bracket never reopens); ``brackets`` is the truth
        self._bgroups: dict[tuple[str, str, str], list[BracketRow]] = {}
        self.legs: dict[str, list[str]] = {}  # bracket → STOP/TARGET orders
        self.positions: dict[tuple[str, str], PositionState] = {}
        self.fill_keys: set[tuple[str, str, str]] = set()  # (trading day, segment, trade id)
        self._day_span: tuple[float, float, str] = (0.0, 0.0, "")  # _day_of's last day (seconds)
        self.last: dict[str, Tick] = {}
        self.turnover = _ZERO
        self.fill_count = 0
        # unit of work (one ledger transaction per flush)
        self._new: dict[str, OrderRow] = {}
        self._dirty: dict[str, OrderRow] = {}
        self._events: list[EventRow] = []
        self._fills: list[FillRow] = []
        self._bdirty: dict[str, BracketRow] = {}
        self._risk: list[RiskEventRow] = []
        self._held_intents: list[Intent] = []
        self._held_msgs: list[tuple[bytes, Message]] = []
        # released after the flush that made them durable
        self.intents: deque[Intent] = deque()
        self.messages: list[tuple[bytes, Message]] = []
        self.inflight: set[str] = set()  # place intents not answered yet
        self.cancel_sent: set[str] = set()  # cancel intents not answered yet
        self.owed_cancels: set[str] = set()  # cancel requested, order not closed yet
        self.leg_failed: set[tuple[str, str]] = set()  # legs the broker refused: not re-placed
        self.leg_retry: dict[tuple[str, str], tuple[int, int]] = {}  # (bracket, kind) → (failures, due)
        self._temp_refused: set[str] = set()  # leg rows that failed for a passing reason
        self._awaiting_alerted: set[str] = set()
        self.flatten_jobs: dict[str, FlattenJob] = {}
        self._books_pending = False
        self.reconcile_due_ns = 0
        self._orphans_alerted: set[str] = set()
        self._refused: dict[str, str] = {}  # request id → why the ledger would not store it
        self._active_jobs: set[str] = set()  # flattens not answered yet
        self.recon = ReconcileState()
        self.stats = {
            "submitted": 0,
            "duplicates": 0,
            "rejected": 0,
            "fills": 0,
            "flushes": 0,
            "ledger_errors": 0,
            "reconciles": 0,
            "unknown": 0,
            "orphans": 0,
            "quarantined": 0,
            "cancel_retries": 0,
            "adopted": 0,
        }
        self.after_place: Callable[[PlaceIntent, Any], None] | None = None  # test crash hook

    # ================================================================== startup
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
        self._held_intents.append(PositionsIntent(self._now()))
        self.request_reconcile("startup")

    def _index(self, o: OrderRow) -> None:
        self.orders[o.order_id] = o
        self.by_request[o.request_id] = o.order_id
        self.by_tag[tag_key(o.client_tag)] = o.order_id
        if o.broker_order_id:
            self.by_broker_id[o.broker_order_id] = o.order_id
        if o.parent_id and o.purpose not in _LEGS:
            self.children.setdefault(o.parent_id, []).append(o.order_id)
        if o.bracket_id and o.purpose in _LEGS:
            self.legs.setdefault(o.bracket_id, []).append(o.order_id)

    def _unindex(self, o: OrderRow) -> None:
        self.orders.pop(o.order_id, None)
        if self.by_request.get(o.request_id) == o.order_id:
            del self.by_request[o.request_id]
        self.by_tag.pop(tag_key(o.client_tag), None)
        if o.parent_id and o.parent_id in self.children:
            self.children[o.parent_id] = [c for c in self.children[o.parent_id] if c != o.order_id]
        if o.bracket_id and o.bracket_id in self.legs:
            self.legs[o.bracket_id] = [c for c in self.legs[o.bracket_id] if c != o.order_id]

    # ================================================================== unit of work
    def flush(self) -> bool:
        """Write pending changes in one transaction, then release their intents and messages.
        On a ledger error the changes stay pending (retried on the next flush) and nothing
        that depends on them is released."""
        if self._new or self._dirty or self._events or self._fills or self._bdirty or self._risk:
            changes = Changes(
                new_orders=list(self._new.values()),
                updated={k: v for k, v in self._dirty.items() if k not in self._new},
                events=self._events,
                fills=self._fills,
                brackets=self._bdirty,
                risk_events=self._risk,
            )
            try:
                try:
                    conflicts = self.store.write(changes)
                except LedgerDataError as exc:  # one row is unstorable: write the rest without it
                    conflicts = self._write_isolating(changes, exc)
            except LedgerError as exc:
                self.stats["ledger_errors"] += 1
                n = self.stats["ledger_errors"]
                if self.log is not None and (n < 5 or n % 100 == 0):
                    self.log.error("ledger_write_failed", error=str(exc), failures=n)
                return False
            self.stats["flushes"] += 1
            self._new, self._dirty, self._events, self._fills, self._bdirty, self._risk = (
                {},
                {},
                [],
                [],
                {},
                [],
            )
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
            self.inflight -= dropped
            self._held_intents = [i for i in self._held_intents if getattr(i, "order_id", "") not in dropped]
            self._held_msgs = [
                (t, m) for t, m in self._held_msgs if getattr(m, "order_id", "") not in dropped
            ]
            for bid in unit.brackets:
                b = self.brackets.pop(bid, None)
                if b is not None:
                    self._open_brackets(b.strategy_id, b.segment, b.token)
        self.alert(
            "CRITICAL",
            f"the ledger refused a {kind} ({name[:64]}): {why[:300]}; set aside, the rest was written",
            "ledger_quarantine",
        )

    def _adopt_conflicts(self, conflicts: dict[str, OrderRow]) -> None:
        for rid, existing in conflicts.items():
            mine = self.orders.get(self.by_request.get(rid, ""))
            if mine is not None and mine.order_id != existing.order_id:
                dropped = {mine.order_id, *self.children.get(mine.order_id, [])}
                for oid in dropped:
                    o = self.orders.get(oid)
                    if o is not None:
                        self._unindex(o)
                self._held_intents = [
                    i for i in self._held_intents if getattr(i, "order_id", "") not in dropped
                ]
                self.intents = deque(i for i in self.intents if getattr(i, "order_id", "") not in dropped)
                self.brackets = {k: b for k, b in self.brackets.items() if b.entry_id not in dropped}
            self._index(existing)

    def take_intents(self) -> list[Intent]:
        out = list(self.intents)
        self.intents.clear()
        return out

    def take_messages(self) -> list[tuple[bytes, Message]]:
        out, self.messages = self.messages, []
        return out

    def _now(self) -> int:
        return self.clock.now_ns()

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

    # ================================================================== submit
    def submit(self, cmds: Iterable[ExecuteOrder]) -> list[SubmitResult]:
        """Accept approved orders: their ``PENDING_BROKER`` rows are committed in ONE transaction
        (together with any changes still waiting for a flush — group commit), then their place
        intents are released. A refused order is written as ``REJECTED``. When the ledger
        cannot write, nothing of this batch is kept and every order is refused.

        An order whose ``expires_ns`` passed before its row was committed is never sent: risk
        has told the strategy by then that it was not placed (it gave up waiting)."""
        cmds = list(cmds)
        mark = self._uow_mark()
        created: list[OrderRow] = []
        now = self._now()
        for cmd in cmds:
            if cmd.request_id in self.by_request:
                self.stats["duplicates"] += 1
                continue
            one = self._uow_mark()
            try:
                created.extend(self._build(cmd, expired=bool(cmd.expires_ns) and now > cmd.expires_ns))
            except Exception as exc:  # noqa: BLE001 - one odd command must not leave a half-built row
                self._uow_rollback(one, [o for k, o in self._new.items() if k not in one[3]])
                self._refused[cmd.request_id] = f"order could not be built: {type(exc).__name__}: {exc}"
                if self.log is not None:
                    self.log.error("order_build_failed", request_id=cmd.request_id, error=repr(exc))
        if not self.flush():
            self._uow_rollback(mark, created)
            return [
                SubmitResult(c.request_id, False, reason="ledger unavailable", code="ledger") for c in cmds
            ]
        self._expire_late(cmds)
        out: list[SubmitResult] = []
        for cmd in cmds:
            row = self.orders.get(self.by_request.get(cmd.request_id, ""))
            if row is None:
                why = self._refused.pop(cmd.request_id, "order lost")
                out.append(SubmitResult(cmd.request_id, False, reason=why, code="refused"))
                continue
            ok = row.status != REJECTED
            code = "" if ok else "rejected"
            out.append(
                SubmitResult(cmd.request_id, ok, row.order_id, row.status, row.client_tag, row.reason, code)
            )
        self.stats["submitted"] += len(cmds)
        return out

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

    def _expire_late(self, cmds: list[ExecuteOrder]) -> None:
        """Orders whose deadline passed while their rows were being committed: their place
        intents are withdrawn and the rows closed as not placed."""
        now = self._now()
        for cmd in cmds:
            if not cmd.expires_ns or now <= cmd.expires_ns:
                continue
            row = self.orders.get(self.by_request.get(cmd.request_id, ""))
            if row is None or row.status != PENDING_BROKER:
                continue
            late_ms = (now - cmd.expires_ns) / 1e6
            for x in [self.orders[c] for c in self.children.get(row.order_id, [])] or [row]:
                self._withdraw(x, f"expired {late_ms:.0f} ms before it could be sent; not placed", REJECTED)

    def _withdraw(self, o: OrderRow, reason: str, status: str = CANCELLED) -> bool:
        """Take back a place intent that has not reached the broker; the row ends ``status``."""
        for queue in (self._held_intents, self.intents):
            for i in list(queue):
                if isinstance(i, PlaceIntent) and i.order_id == o.order_id:
                    queue.remove(i)
                    self.inflight.discard(o.order_id)
                    self._transition(o, status, status, {"reason": reason}, reason)
                    return True
        return False

    def _instrument(self, cmd: ExecuteOrder) -> Instrument | None:
        inst = self.master.get(cmd.segment, cmd.token) if cmd.segment and cmd.token else None
        if inst is None and (cmd.symbol or cmd.order.symbol):
            try:
                inst = self.master.resolve(cmd.symbol or cmd.order.symbol)
            except KeyError:
                inst = None
        return inst

    def _price(self, cmd: ExecuteOrder, inst: Instrument, side: str) -> tuple[str, Decimal, Decimal | None]:
        """(broker order type, limit price, trigger) for the request; raises MoneyError with the reason."""
        o = cmd.order
        tick = inst.tick_size
        if tick <= 0:
            raise MoneyError(f"tick size unknown for {inst.symbol}: refusing to price the order")
        otype = (o.order_type or "LIMIT").upper()

        def on_tick(name: str, value: Decimal | None) -> Decimal:
            if value is None or value <= 0:
                raise MoneyError(f"{name} is required")
            if value % tick != 0:
                raise MoneyError(f"{name} {value} is not a multiple of the tick size {tick}")
            return value

        if otype == "MARKET" or (otype == "LIMIT" and o.price is None):
            last = self.last.get(inst.key)
            if last is None or last.ltp <= 0:
                raise MoneyError(f"no last price for {inst.symbol}: refusing a market order")
            return "LIMIT", protected_limit(side, last.ltp, self.protection_pct, tick), None
        if otype == "LIMIT":
            return "LIMIT", on_tick("price", o.price), None
        if otype == "SL-M":
            trig = on_tick("trigger price", o.trigger_price)
            return "SL", protected_limit(side, trig, self.protection_pct, tick), trig
        if otype == "SL":
            trig = on_tick("trigger price", o.trigger_price)
            price = on_tick("price", o.price)
            if (side == "BUY" and trig > price) or (side == "SELL" and trig < price):
                raise MoneyError(
                    f"{side} stop-limit: trigger {trig} is on the wrong side of the limit {price}"
                )
            return "SL", price, trig
        raise MoneyError(f"unknown order type {o.order_type!r}")

    def _build(self, cmd: ExecuteOrder, expired: bool = False) -> list[OrderRow]:
        """The rows of one command. Every check (prices, bracket, stop limit) runs before the
        first row is added, so a refusal is one REJECTED row and never a half-built order."""
        o = cmd.order
        now = self._now()
        side = (o.side or "").upper()
        purpose = (o.purpose or ENTRY).upper()
        inst = self._instrument(cmd)
        qty = int(cmd.quantity)
        otype, price, trig = "LIMIT", None, None
        stop_limit: Decimal | None = None
        reason = self._refusal(cmd, side, purpose, inst, qty, expired_at=now if expired else 0)
        if not reason:
            assert inst is not None
            try:
                otype, price, trig = self._price(cmd, inst, side)
                reason = self._bracket_reason(cmd, inst, side, price) or ""
                if not reason and o.stop_loss is not None:
                    exit_side = "SELL" if side == "BUY" else "BUY"
                    stop_limit = protected_limit(exit_side, o.stop_loss, self.protection_pct, inst.tick_size)
            except MoneyError as exc:
                reason = str(exc)
            except ArithmeticError:  # decimal.InvalidOperation / Overflow on absurd values
                reason = "price, trigger, stop loss or target is out of range"
        seg = inst.segment if inst else cmd.segment
        tok = inst.token if inst else cmd.token
        sym = inst.symbol if inst else (cmd.symbol or o.symbol)
        row = OrderRow(
            order_id=new_id(),
            request_id=cmd.request_id,
            client_tag=self._tag(),
            strategy_id=o.strategy_id,
            segment=seg,
            token=tok,
            symbol=sym,
            side=side or "BUY",
            order_type=otype,
            product=o.product or "MIS",
            quantity=max(qty, 0),
            price=price,
            trigger_price=trig,
            status=REJECTED if reason else PENDING_BROKER,
            trading_day=self.day,
            created_ns=now,
            updated_ns=now,
            purpose=purpose if purpose in REQUEST_PURPOSES else ENTRY,
            broker=self.broker_name,
            reason=reason,
            expires_ns=cmd.expires_ns,
        )
        payload = {"request": to_builtins(cmd)}
        rows = [row]
        self._add(row, "REJECTED" if reason else "PENDING", payload)
        if reason:
            self.stats["rejected"] += 1
            return rows
        assert inst is not None
        if o.stop_loss is not None or o.target is not None:
            self._new_bracket(row, o.stop_loss, o.target, stop_limit)
        rows.extend(self._slice_and_place(row, inst))
        return rows

    @staticmethod
    def _refusal(cmd: ExecuteOrder, side: str, purpose: str, inst: Instrument | None, qty: int, *,
                 expired_at: int) -> str:  # fmt: skip
        """Why the command's fields refuse it before any pricing, or ""."""
        o = cmd.order
        if expired_at:
            late_ms = (expired_at - cmd.expires_ns) / 1e6
            return f"reached execution {late_ms:.0f} ms after its deadline; not placed"
        if side not in ("BUY", "SELL"):
            return f"side {o.side!r} must be BUY or SELL"
        if purpose not in REQUEST_PURPOSES:
            return f"purpose {o.purpose!r} must be one of {', '.join(sorted(REQUEST_PURPOSES))}"
        if not _printable_id(o.strategy_id):
            return "strategy id must be 1-64 printable ASCII characters"
        odd = _odd_price(o)
        if odd is not None:
            return odd
        if inst is None:
            return f"unknown instrument: {cmd.symbol or cmd.segment + '|' + cmd.token}"
        if qty <= 0:
            return "quantity must be positive"
        if qty % max(1, inst.lot_size) != 0:
            return f"quantity {qty} is not a multiple of the lot size {inst.lot_size}"
        return ""

    def _bracket_reason(self, cmd: ExecuteOrder, inst: Instrument, side: str, price: Decimal) -> str | None:
        sl, tgt = cmd.order.stop_loss, cmd.order.target
        if sl is None and tgt is None:
            return None
        tick = inst.tick_size
        for name, value in (("stop loss", sl), ("target", tgt)):
            if value is not None and (value <= 0 or value % tick != 0):
                return f"{name} {value} is not a positive multiple of the tick size {tick}"
        otype = (cmd.order.order_type or "LIMIT").upper()
        ref: Decimal | None
        if otype in ("SL", "SL-M"):
            ref = cmd.order.trigger_price
        elif otype == "MARKET" or cmd.order.price is None:
            # Market intent: judge the bracket against the last price, as risk does. The
            # protected limit is only a cap on the fill, not the expected entry.
            last = self.last.get(inst.key)
            ref = to_decimal(last.ltp) if last is not None and last.ltp > 0 else None
        else:
            ref = price
        if ref is None:
            return "bracket entry needs a price"
        if side == "BUY" and ((sl is not None and sl >= ref) or (tgt is not None and tgt <= ref)):
            return f"bracket for a BUY needs stop loss < entry ({ref}) < target"
        if side == "SELL" and ((sl is not None and sl <= ref) or (tgt is not None and tgt >= ref)):
            return f"bracket for a SELL needs target < entry ({ref}) < stop loss"
        return None

    def _tag(self) -> str:
        while True:
            tag = new_client_tag()
            if tag not in self.by_tag:
                return tag

    def _add(self, row: OrderRow, kind: str, payload: Any) -> None:
        self._index(row)
        self._new[row.order_id] = row
        self._events.append(
            EventRow(
                order_id=row.order_id,
                kind=kind,
                from_status="",
                to_status=row.status,
                ts_ns=row.created_ns,
                payload=payload,
            )
        )
        self._publish_order(row)

    def _slice_and_place(self, row: OrderRow, inst: Instrument) -> list[OrderRow]:
        """Queue the place intent(s): one order, or slices within the freeze quantity."""
        freeze = inst.freeze_qty
        if not freeze or row.quantity <= freeze:
            self._queue_place(row)
            return []
        step = freeze_step(inst.lot_size, freeze)
        row.sliced = True
        sizes = [step] * (row.quantity // step)
        if row.quantity % step:
            sizes.append(row.quantity % step)
        kids = []
        for n, size in enumerate(sizes, 1):
            kid = OrderRow(
                order_id=new_id(),
                request_id=f"{row.request_id}#{n}",
                client_tag=self._tag(),
                strategy_id=row.strategy_id,
                segment=row.segment,
                token=row.token,
                symbol=row.symbol,
                side=row.side,
                order_type=row.order_type,
                product=row.product,
                quantity=size,
                price=row.price,
                trigger_price=row.trigger_price,
                status=PENDING_BROKER,
                trading_day=row.trading_day,
                created_ns=row.created_ns,
                updated_ns=row.created_ns,
                parent_id=row.order_id,
                purpose=row.purpose,
                broker=row.broker,
                expires_ns=row.expires_ns,
            )
            self._add(kid, "PENDING", {"slice": n, "of": len(sizes), "freeze_qty": freeze})
            self._queue_place(kid)
            kids.append(kid)
        return kids

    def _queue_place(self, o: OrderRow) -> None:
        self.inflight.add(o.order_id)
        self._held_intents.append(
            PlaceIntent(
                o.order_id,
                expires_ns=o.expires_ns,
                order=BrokerOrder(
                    client_tag=o.client_tag,
                    segment=o.segment,
                    token=o.token,
                    symbol=o.symbol,
                    side=o.side,
                    quantity=o.quantity,
                    price=o.price if o.price is not None else _ZERO,
                    order_type=o.order_type,
                    trigger_price=o.trigger_price,
                    product=o.product,
                ),
            )
        )

    # ================================================================== transitions
    def _transition(self, o: OrderRow, status: str, kind: str, payload: Any = None, reason: str = "") -> bool:
        if o.status == status or o.status in (COMPLETE, REJECTED, CANCELLED):
            return False
        if RANK[status] < RANK[o.status]:
            return False
        old = o.status
        o.status = status
        if reason:
            o.reason = reason
        o.updated_ns = self._now()
        self._mark(o)
        self._event(o, kind, old, payload)
        self._publish_order(o)
        if o.parent_id and o.purpose not in _LEGS:
            self._refresh_parent(o.parent_id)
        if o.terminal:
            self._on_terminal(o)
        return True

    def _on_terminal(self, o: OrderRow) -> None:
        self.inflight.discard(o.order_id)
        self.cancel_sent.discard(o.order_id)
        self.owed_cancels.discard(o.order_id)
        b = self._bracket_of(o)
        if b is not None:
            if o.order_id in self._temp_refused:  # not placed for a passing reason: re-placed later
                self._temp_refused.discard(o.order_id)
            elif o.status == REJECTED and o.purpose in _LEGS:
                self.leg_failed.add((b.bracket_id, o.purpose))
                self.alert(
                    "CRITICAL",
                    f"{o.purpose.lower()} leg of {o.symbol} rejected by the broker "
                    f"({o.reason}); the position is not protected by it",
                    "leg_rejected",
                )
            self._sync_bracket(b)

    def _refresh_parent(self, parent_id: str) -> None:
        p = self.orders.get(parent_id)
        if p is None or not p.sliced:
            return
        kids = [self.orders[c] for c in self.children.get(parent_id, []) if c in self.orders]
        if not kids:
            return
        filled = sum(k.filled_qty for k in kids)
        value = sum((k.filled_value for k in kids), _ZERO)
        if filled != p.filled_qty:
            p.filled_qty = filled
            p.filled_value = value
            p.avg_price = value / filled if filled else None
            p.updated_ns = self._now()
            self._mark(p)
            self._publish_order(p)
        statuses = [k.status for k in kids]
        if all(s in (COMPLETE, REJECTED, CANCELLED) for s in statuses):
            if filled >= p.quantity:
                status = COMPLETE
            elif all(s == REJECTED for s in statuses):
                status = REJECTED
            else:
                status = CANCELLED
        elif filled > 0:
            status = PARTIAL
        elif UNKNOWN in statuses:
            status = UNKNOWN
        else:
            status = min(statuses, key=lambda s: RANK[s])
        if status != p.status:
            reason = next((k.reason for k in kids if k.status == REJECTED and k.reason), "")
            self._transition(
                p,
                status,
                "SLICES",
                {"slices": {k.order_id: k.status for k in kids}},
                reason if status in (REJECTED, CANCELLED) else "",
            )
        b = self._bracket_of(p)
        if b is not None:
            self._sync_bracket(b)

    # ================================================================== results
    def on_result(self, intent: Intent, result: Any) -> None:
        """The outcome of an intent: a return value, or the exception the broker raised."""
        if isinstance(intent, PlaceIntent):
            self._on_place(intent, result)
        elif isinstance(intent, CancelIntent):
            self._on_cancel(intent, result)
        elif isinstance(intent, ModifyIntent):
            self._on_modify(intent, result)
        elif isinstance(intent, PositionsIntent):
            self._on_carried(result)
        else:
            self._books_pending = False
            if isinstance(result, BaseException):
                if self.log is not None:
                    self.log.warning("reconcile_books_failed", error=f"{type(result).__name__}: {result}")
                self.reconcile_due_ns = self._now() + 5_000_000_000
            else:
                self.on_books(result[0], result[1], intent.started_ns)
        if self._active_jobs:
            self._advance_jobs()

    def _load_carries(self) -> None:
        """Each strategy's NRML/CNC net from the ledger's fills of earlier days: what it
        carries into today, so its position (and the legs sized to it) outlives midnight."""
        for c in self.store.carried_nets(self.day):
            k = (c.strategy_id, f"{c.segment}|{c.token}")
            pos = self.positions.get(k)
            if pos is None:
                pos = self.positions[k] = PositionState(c.strategy_id, c.segment, c.token, c.symbol)
            pos.carry(c.product, c.quantity, c.avg_price)

    def _on_carried(self, result: Any) -> None:
        """The broker's carried positions (NRML/CNC from earlier days) are the truth for the
        account; the ledger says which strategy holds them. What the ledger cannot attribute
        is held under the strategy id ``carried``, so risk limits, ``neopulse positions`` and
        flatten see it. When the ledger claims more than the broker carries (closed outside
        NeoPulse, a delivery settled), the broker's figure goes to ``carried`` and the
        strategies' carries are dropped, with a warning."""
        if result is None:  # the broker has no positions call
            return
        if isinstance(result, BaseException) or not isinstance(result, list):
            why = getattr(result, "reason", str(result))
            self.recon.carried_retry = True  # asked again with the next reconciliation
            self.alert(
                "WARNING", f"carried positions could not be read from the broker: {why}", "carried_unread"
            )
            return
        self.recon.carried_retry = False
        broker: dict[tuple[str, str], BrokerPosition] = {}
        for cp in result:
            if isinstance(cp, BrokerPosition) and abs(cp.quantity) <= QTY_MAX:
                broker[(f"{cp.segment}|{cp.token}", cp.product)] = cp
        ledger: dict[tuple[str, str], int] = {}
        for (sid, key), pos in self.positions.items():
            if sid != CARRIED:
                for product, q in pos.carried.items():
                    ledger[(key, product)] = ledger.get((key, product), 0) + q
        for key, product in sorted(set(broker) | set(ledger)):
            cp = broker.get((key, product))
            held, known = (cp.quantity if cp is not None else 0), ledger.get((key, product), 0)
            if known and ((held > 0) != (known > 0) or abs(held) < abs(known)):
                self._carry_mismatch(key, product, held, known)
            if cp is not None or (CARRIED, key) in self.positions or held != known:
                seg, tok = key.split("|", 1)
                rest = self.positions.get((CARRIED, key))
                if rest is None:
                    rest = self.positions[(CARRIED, key)] = PositionState(
                        CARRIED, seg, tok, cp.symbol if cp is not None else key
                    )
                rest.carry(product, held - known, cp.avg_price if cp is not None else _ZERO)
                last = self.last.get(key)
                msg = rest.message(last.ltp if last else 0.0, self._now())
                self._held_msgs.append((_topic("position", CARRIED), msg))
        if result and self.log is not None:
            self.log.info("carried_positions", count=len(result))

    def _carry_mismatch(self, key: str, product: str, held: int, known: int) -> None:
        """The ledger's strategies carry more than the broker reports (closed outside NeoPulse,
        a settlement, or a broker read before its start-of-day roll). One reading never takes
        a strategy's carry away (its legs are sized to it): the difference is held, negative,
        under ``carried`` so the account's net matches the broker, and the positions are read
        again with the next reconciliation."""
        self.recon.carried_retry = True
        if (key, product) in self.recon.carry_alerted:
            return
        self.recon.carry_alerted.add((key, product))
        self.alert(
            "CRITICAL",
            f"the broker carries {held:+d} {key} {product} into today but the ledger's strategies carry "
            f"{known:+d}: the difference is held as 'carried' until they agree — check the account",
            "carried_mismatch",
        )

    def _on_place(self, intent: PlaceIntent, result: Any) -> None:
        o = self.orders.get(intent.order_id)
        self.inflight.discard(intent.order_id)
        if o is None:
            return
        if isinstance(result, BrokerAck):
            if result.broker_order_id and not o.broker_order_id:
                o.broker_order_id = result.broker_order_id
                self.by_broker_id[result.broker_order_id] = o.order_id
            o.raw = result.raw
            if not self._transition(
                o, ACK, "ACK", {"ack": result.raw, "broker_order_id": result.broker_order_id}
            ):
                o.updated_ns = self._now()
                self._mark(o)
            self._pay_cancel(o)
            b = self._bracket_of(o)
            if b is not None:
                if o.purpose in _LEGS:
                    self.leg_retry.pop((b.bracket_id, o.purpose), None)
                self._sync_bracket(b)
            return
        if isinstance(result, BrokerRejected):
            self._transition(
                o, REJECTED, "REJECTED", {"error": result.reason, "raw": result.raw}, result.reason
            )
            return
        if isinstance(result, BrokerTemporary):
            if o.purpose in _LEGS and o.bracket_id:
                self._leg_not_placed(o, result.reason)
            self._transition(
                o,
                REJECTED,
                "REJECTED",
                {"error": result.reason, "raw": result.raw},
                f"not placed: {result.reason}",
            )
            return
        # BrokerUnknown, or anything unexpected: we cannot tell whether the broker has it
        why = result.reason if isinstance(result, BrokerUnknown) else f"{type(result).__name__}: {result}"
        self.stats["unknown"] += 1
        if RANK[o.status] >= RANK[ACK]:  # the broker's book already showed it: nothing is unknown
            o.updated_ns = self._now()
            self._event(o, "PLACE_REPLY_LOST", o.status, {"error": why})
            return
        self._transition(o, UNKNOWN, "UNKNOWN", {"error": why}, f"outcome unknown: {why}")
        self.alert(
            "WARNING",
            f"order {o.client_tag} ({o.side} {o.quantity} {o.symbol}): broker outcome unknown "
            f"({why}); reconciling by tag, not re-sending",
            "order_unknown",
        )
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now() + self.book_lag_ns)

    def _leg_not_placed(self, o: OrderRow, why: str) -> None:
        """A bracket leg did not reach the broker for a passing reason (rate limit, timeout,
        a book that lost it): place it again after a backoff; CRITICAL after a few failures."""
        key = (o.bracket_id, o.purpose)
        n = self.leg_retry.get(key, (0, 0))[0] + 1
        self.leg_retry[key] = (n, self._now() + self._backoff_ns(n))
        self._temp_refused.add(o.order_id)
        if n == RETRY_ALERT_AFTER:
            self.alert(
                "CRITICAL",
                f"{o.purpose.lower()} leg of {o.symbol} could not be placed {n} times ({why}); "
                "still retrying: the position is not protected by it meanwhile",
                "leg_place_failing",
            )

    def _on_cancel(self, intent: CancelIntent, result: Any) -> None:
        self.cancel_sent.discard(intent.order_id)
        o = self.orders.get(intent.order_id)
        if o is None or o.terminal:
            return
        now = self._now()
        if not isinstance(result, BaseException):
            # accepted: the broker's book confirms it; still working after a while → sent again
            o.cancel_due_ns = now + max(self._backoff_ns(o.cancel_failures + 1), CANCEL_CONFIRM_NS)
            return
        why = getattr(result, "reason", str(result))
        o.cancel_failures += 1
        n = o.cancel_failures
        o.cancel_due_ns = now + self._backoff_ns(n)
        o.updated_ns = now
        self.stats["cancel_retries"] += 1
        self._event(o, "CANCEL_FAILED", o.status, {"error": why, "failures": n})
        if self.log is not None:
            self.log.warning("cancel_failed", order_id=o.order_id, error=why, failures=n)
        if n == RETRY_ALERT_AFTER:
            self.alert(
                "CRITICAL",
                f"cancel of {o.purpose.lower()} order {o.client_tag} ({o.side} {o.remaining} {o.symbol}) "
                f"failed {n} times ({why}); still retrying: check it at the broker",
                "cancel_failing",
            )
        # the order may have ended meanwhile (a fill, an expiry): the books tell
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, now + self._backoff_ns(n))

    def _on_modify(self, intent: ModifyIntent, result: Any) -> None:
        o = self.orders.get(intent.order_id)
        if o is None or not isinstance(result, BaseException):
            return
        why = getattr(result, "reason", str(result))
        if not o.terminal and o.quantity == intent.quantity:
            o.quantity = intent.old_quantity
            o.updated_ns = self._now()
            self._mark(o)
        self._event(o, "MODIFY_FAILED", o.status, {"error": why, "quantity": intent.quantity})
        self.alert(
            "WARNING",
            f"could not resize {o.purpose.lower()} leg {o.client_tag} of {o.symbol} to "
            f"{intent.quantity}: {why}",
            "modify_failed",
        )

    # ================================================================== broker events
    def on_broker_event(self, ev: BrokerOrderStatus | BrokerTrade) -> None:
        """An order-feed update or a trade, from the broker's push channel or a book poll."""
        o = self._find(ev.broker_order_id, ev.client_tag)
        if o is None:
            self._orphan(ev.broker_order_id, ev.client_tag)
            return
        if isinstance(ev, BrokerTrade):
            self._on_trade(ev, o)
        else:
            self._on_status(ev, o)
        if self._active_jobs:
            self._advance_jobs()

    def _find(self, broker_order_id: str, client_tag: str) -> OrderRow | None:
        oid = self.by_broker_id.get(broker_order_id) if broker_order_id else None
        if oid is None and client_tag:
            oid = self.by_tag.get(tag_key(client_tag))
        o = self.orders.get(oid) if oid else None
        if o is not None and broker_order_id and not o.broker_order_id:
            o.broker_order_id = broker_order_id
            self.by_broker_id[broker_order_id] = o.order_id
            self._mark(o)
            self._pay_cancel(o)  # a cancel asked for while its place was unanswered or UNKNOWN
        return o

    def _orphan(self, broker_order_id: str, client_tag: str) -> None:
        if not client_tag.lower().startswith("np") or broker_order_id in self._orphans_alerted:
            return
        self._orphans_alerted.add(broker_order_id)
        self.stats["orphans"] += 1
        self.alert(
            "CRITICAL",
            f"broker order {broker_order_id} (tag {client_tag}) is not in the ledger",
            "orphan_order",
        )

    def _on_status(self, st: BrokerOrderStatus, o: OrderRow) -> None:
        raw = st.raw if st.raw is not None else {"status": st.status, "filled_qty": st.filled_qty}
        if not 0 <= st.filled_qty <= QTY_MAX or not 0 <= st.quantity <= QTY_MAX:
            self._bad_row(o, f"quantity {st.quantity} / filled {st.filled_qty} out of range", raw)
            return
        if (
            st.quantity
            and st.quantity != o.quantity
            and not o.terminal
            and st.status != REJECTED
            and st.quantity >= max(1, o.filled_qty)  # a modify never goes below what has traded
        ):
            old_q = o.quantity
            o.quantity = st.quantity
            o.updated_ns = self._now()
            self._mark(o)
            self._event(o, "MODIFIED", o.status, {"quantity": st.quantity, "was": old_q})
            self._publish_order(o)
        status = st.status.upper()
        if status in (OPEN, ACK, PARTIAL):
            if status == PARTIAL and o.filled_qty == 0:
                status = OPEN  # the trade itself moves it to PARTIAL
            if o.status in (PENDING_BROKER, UNKNOWN) and status != ACK:
                self._transition(o, ACK, "ACK", raw)
            self._transition(o, status, status, raw)
        elif status in (COMPLETE, CANCELLED):
            if o.status in (PENDING_BROKER, UNKNOWN):
                self._transition(o, ACK, "ACK", raw)
            # a filled quantity comes only from trades: the broker's book may call an order
            # COMPLETE before its trade is in the trade book
            traded = (st.filled_qty or o.quantity) if status == COMPLETE else st.filled_qty
            if o.filled_qty < traded:
                self._await_fills(o, status, traded, st.reason, raw)
                return
            reason = "" if status == COMPLETE else (st.reason or "cancelled")
            self._transition(o, status, status, raw, reason)
        elif status == REJECTED:
            self._transition(o, REJECTED, REJECTED, raw, st.reason or "rejected by the broker")

    def _bad_row(self, o: OrderRow, why: str, raw: Any) -> None:
        """A broker book row for ``o`` that cannot be true: ignored, recorded, alerted once."""
        if o.order_id not in self.recon.bad_rows:  # recorded and alerted once, not every snapshot
            self.recon.bad_rows.add(o.order_id)
            o.updated_ns = self._now()
            self._event(o, "BROKER_ROW_IGNORED", o.status, {"error": why, "raw": raw})
            self._mark(o)
            text = f"broker row for {o.client_tag} ({o.symbol}) ignored: {why}"
            self.alert("CRITICAL", text, "broker_row_bad")

    def _await_fills(self, o: OrderRow, status: str, traded: int, reason: str, raw: Any) -> None:
        """The broker says the order ended with ``traded`` filled, but fewer shares have arrived
        as trades: it stays working until they do (``_on_trade`` then closes it)."""
        if o.broker_final:
            o.broker_filled = max(o.broker_filled, traded)
            return
        o.broker_final, o.broker_filled, o.awaiting_since_ns = status, traded, self._now()
        if status == CANCELLED and reason:
            o.reason = reason
        self._transition(o, OPEN, OPEN, raw)
        o.updated_ns = self._now()
        self._event(o, "AWAITING_FILLS", o.status, {"broker_status": status, "traded": traded, "raw": raw})
        self.owed_cancels.discard(o.order_id)
        b = self._bracket_of(o)
        if b is not None:  # a leg announced as done: its OCO partner goes now
            self._sync_bracket(b)

    def _on_trade(self, tr: BrokerTrade, o: OrderRow) -> None:
        day = self._day_of(tr.ts_ns)
        key = (day, o.segment, tr.trade_id)
        if key in self.fill_keys:
            return
        self.fill_keys.add(key)
        now = self._now()
        fill = FillRow(
            trade_id=tr.trade_id,
            order_id=o.order_id,
            broker_order_id=tr.broker_order_id,
            strategy_id=o.strategy_id,
            segment=o.segment,
            token=o.token,
            symbol=o.symbol,
            side=o.side,
            quantity=tr.quantity,
            price=tr.price,
            ts_ns=tr.ts_ns or now,
            trading_day=day,
            broker=self.broker_name,
            raw=tr.raw,
        )
        problem = fill_problem(fill)
        if problem is not None:  # the ledger could never store it, and the position must not take it
            self.stats["quarantined"] += 1
            self._event(o, "TRADE_QUARANTINED", o.status, {"trade_id": tr.trade_id, "error": problem,
                                                          "raw": tr.raw})  # fmt: skip
            self._mark(o)
            self.alert(
                "CRITICAL",
                f"broker trade {tr.trade_id} of {o.symbol} ({o.client_tag}) set aside: {problem}; "
                "the position ignores it — check the broker's trade book",
                "trade_quarantined",
            )
            return
        self._fills.append(fill)
        self.stats["fills"] += 1
        o.filled_qty += tr.quantity
        o.filled_value += tr.price * tr.quantity
        o.avg_price = o.filled_value / o.filled_qty
        o.updated_ns = now
        self._mark(o)
        self._event(
            o,
            "FILL",
            o.status,
            {"trade_id": tr.trade_id, "qty": tr.quantity, "price": str(tr.price), "raw": tr.raw},
        )
        if o.filled_qty > o.quantity:
            self.alert(
                "CRITICAL", f"order {o.client_tag} overfilled: {o.filled_qty} of {o.quantity}", "overfill"
            )
        self._held_msgs.append(
            (
                _topic("fill", o.strategy_id),
                Fill(
                    fill_id=tr.trade_id,
                    order_id=o.parent_id if o.parent_id and o.purpose not in _LEGS else o.order_id,
                    strategy_id=o.strategy_id,
                    symbol=o.symbol,
                    segment=o.segment,
                    token=o.token,
                    side=o.side,
                    quantity=tr.quantity,
                    price=tr.price,
                    ts_ns=fill.ts_ns,
                ),
            )
        )
        if day == self.day:
            pos = self._apply_position(fill)
            last = self.last.get(o.key)
            self._held_msgs.append(
                (_topic("position", o.strategy_id), pos.message(last.ltp if last else 0.0, now))
            )
        if not o.terminal:
            status = COMPLETE if o.filled_qty >= o.quantity else PARTIAL
            if o.broker_final and o.filled_qty >= o.broker_filled:
                status = o.broker_final  # the trades the broker's status announced are all here
            if o.status in (PENDING_BROKER, UNKNOWN):
                self._transition(o, ACK, "ACK", {"via": "trade"})
            if not self._transition(o, status, status, {"trade_id": tr.trade_id}):
                self._publish_order(o)
        else:
            self._publish_order(o)
        if o.parent_id and o.purpose not in _LEGS:
            self._refresh_parent(o.parent_id)
        b = self._bracket_of(o)
        if b is None:  # any fill moves the position that brackets of this instrument protect
            b = next(iter(self._open_brackets(o.strategy_id, o.segment, o.token)), None)
        if b is not None:
            self._sync_bracket(b)

    def _day_of(self, ts_ns: int) -> str:
        if not ts_ns:
            return self.day
        secs = ts_ns / 1e9
        lo, hi, day = self._day_span
        if lo < secs < hi:  # well inside the day of the previous answer
            return day
        import datetime as _dt

        when = _dt.datetime.fromtimestamp(secs, IST)
        day = when.strftime("%Y-%m-%d")
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
        start = midnight.timestamp()
        end = (midnight + _dt.timedelta(days=1)).timestamp()
        # a millisecond of margin at both ends keeps clear of fromtimestamp's rounding
        self._day_span = (start + 1e-3, end - 1e-3, day)
        return day

    def _apply_position(self, f: FillRow) -> PositionState:
        k = (f.strategy_id, f.key)
        pos = self.positions.get(k)
        if pos is None:
            pos = self.positions[k] = PositionState(f.strategy_id, f.segment, f.token, f.symbol)
        o = self.orders.get(f.order_id)
        pos.apply(f.side, f.quantity, f.price, o.product if o is not None else "MIS")
        self.turnover += f.price * f.quantity
        self.fill_count += 1
        return pos

    # ================================================================== market data
    def on_tick(self, tick: Tick) -> None:
        """Remember the last price (market intent, flatten, marks). Hot path: one dict store."""
        self.last[f"{tick.segment}|{tick.token}"] = tick

    # ================================================================== OCO brackets
    def _new_bracket(
        self, entry: OrderRow, stop_loss: Decimal | None, target: Decimal | None, stop_limit: Decimal | None
    ) -> None:
        b = BracketRow(
            bracket_id=new_id(),
            entry_id=entry.order_id,
            strategy_id=entry.strategy_id,
            segment=entry.segment,
            token=entry.token,
            symbol=entry.symbol,
            side=entry.side,
            product=entry.product,
            stop_loss=stop_loss,
            target=target,
            state=B_PENDING,
            trading_day=entry.trading_day,
            created_ns=entry.created_ns,
            updated_ns=entry.created_ns,
            stop_limit=stop_limit,
        )
        entry.bracket_id = b.bracket_id
        self.brackets[b.bracket_id] = b
        self._bgroups.setdefault((b.strategy_id, b.segment, b.token), []).append(b)
        self._bdirty[b.bracket_id] = b

    def _bracket_of(self, o: OrderRow) -> BracketRow | None:
        """The bracket an entry or leg belongs to (slices reach it through their parent)."""
        return self.brackets.get(o.bracket_id) if o.bracket_id else None

    def _sync_bracket(self, b: BracketRow) -> None:
        """Re-size the legs of every bracket of this strategy and instrument. Legs protect what
        is really held: each bracket's own exposure (entry fills - leg fills), capped by the
        strategy's position in the entry's direction, shared oldest bracket first. So an exit
        by other means (the strategy's own EXIT, a manual order) shrinks or cancels the legs
        instead of leaving a stop that would open a new position."""
        pos = self.positions.get((b.strategy_id, f"{b.segment}|{b.token}"))
        held = pos.quantity if pos is not None else 0
        avail = {"BUY": max(held, 0), "SELL": max(-held, 0)}
        group = self._open_brackets(b.strategy_id, b.segment, b.token)
        if self.brackets.get(b.bracket_id) is b and not any(x is b for x in group):
            group.append(b)  # a closed one still cancels what is left of its legs
        if len(group) > 1:
            group.sort(key=lambda y: (y.created_ns, y.bracket_id))
        for x in group:
            if x.state in BRACKET_OPEN or x is b:  # an earlier one's sync may have closed it
                avail[x.side] -= self._sync_one(x, avail[x.side])

    def _open_brackets(self, strategy_id: str, segment: str, token: str) -> list[BracketRow]:
        """The open brackets of one strategy and instrument, in the order ``brackets`` holds
        them; drops the closed (or forgotten) ones from the index on the way."""
        key = (strategy_id, segment, token)
        group = self._bgroups.get(key)
        if not group:
            return []
        brackets = self.brackets
        live = [x for x in group if x.state in BRACKET_OPEN and brackets.get(x.bracket_id) is x]
        if len(live) != len(group):
            self._bgroups[key] = live
        return list(live)

    def _sync_one(self, b: BracketRow, avail: int) -> int:
        """Size one bracket's legs to min(own exposure, ``avail``); returns the size protected."""
        entry = self.orders.get(b.entry_id)
        if entry is None:
            return 0
        legs = [self.orders[x] for x in self.legs.get(b.bracket_id, []) if x in self.orders]
        exit_filled = sum(leg.filled_qty for leg in legs)
        own = entry.filled_qty - exit_filled
        # a leg the broker called complete has exited, even before its trade is in: the
        # other leg goes now (OCO), and no leg is placed for those shares again
        exited = sum(leg.exited_qty for leg in legs)
        protect = max(0, min(entry.filled_qty - exited, avail))
        changed = entry.filled_qty != b.entry_filled or exit_filled != b.exit_filled
        b.entry_filled, b.exit_filled = entry.filled_qty, exit_filled
        if b.state == B_CANCELLED and own > 0:
            # closed as "entry ended unfilled", yet a trade of the entry arrived after all
            # (a status that came before its trade): the position it opened needs its legs
            b.state = B_ACTIVE
            changed = True
            self._bgroups.setdefault((b.strategy_id, b.segment, b.token), []).append(b)
            self.alert(
                "WARNING",
                f"bracket on {b.symbol} reopened: the entry filled {entry.filled_qty} after it was "
                "reported closed; placing its stop and target",
                "bracket_reopened",
            )
        state = b.state
        if state in BRACKET_OPEN:
            if own < 0:
                self.alert(
                    "CRITICAL",
                    f"bracket on {b.symbol} over-exited by {-own}: check the position",
                    "bracket_overexit",
                )
            if entry.filled_qty - exited <= 0 and exited > 0 and not entry.terminal:
                self._cancel_tree(entry)  # a leg ended the trade: drop the rest of the entry
            for kind in _LEGS:
                price = b.stop_loss if kind == STOP else b.target
                if price is not None:
                    self._size_legs(b, kind, [x for x in legs if x.purpose == kind], protect)
            if entry.terminal and protect <= 0:
                state = B_CLOSED if entry.filled_qty > 0 else B_CANCELLED
            elif entry.filled_qty > 0:
                state = B_ACTIVE
        else:
            protect = 0
            for leg in legs:
                if not leg.terminal:
                    self._request_cancel(leg)
        if state != b.state or changed:
            b.state = state
            b.updated_ns = self._now()
            self._bdirty[b.bracket_id] = b
        return protect

    def _size_legs(self, b: BracketRow, kind: str, legs: list[OrderRow], want: int) -> None:
        live = [x for x in legs if not x.terminal and not x.cancel_requested and x.open_qty]
        have = sum(x.open_qty for x in live)
        if have < want:
            if (b.bracket_id, kind) in self.leg_failed:
                return
            retry = self.leg_retry.get((b.bracket_id, kind))
            if retry is not None and self._now() < retry[1]:
                return  # placed again once the backoff has passed (``_retry_owed``)
            self._place_legs(b, kind, want - have, len(legs))
        elif have > want:
            excess = have - want
            for leg in sorted(live, key=lambda x: x.created_ns, reverse=True):
                if excess <= 0:
                    break
                if not leg.broker_order_id or leg.order_id in self.inflight:
                    continue  # resized once the broker has acknowledged it
                if leg.open_qty <= excess:
                    excess -= leg.open_qty
                    self._request_cancel(leg)
                else:
                    self._modify_qty(leg, leg.quantity - excess)
                    excess = 0

    def _place_legs(self, b: BracketRow, kind: str, qty: int, seen: int) -> None:
        inst = self.master.get(b.segment, b.token)
        freeze = inst.freeze_qty if inst is not None else 0
        step = freeze_step(inst.lot_size, freeze) if inst is not None and freeze else qty
        now = self._now()
        exit_side = "SELL" if b.side == "BUY" else "BUY"
        n = seen
        while qty > 0:
            size = min(step, qty)
            qty -= size
            n += 1
            leg = OrderRow(
                order_id=new_id(),
                request_id=f"{b.bracket_id}:{kind}:{n}",
                client_tag=self._tag(),
                strategy_id=b.strategy_id,
                segment=b.segment,
                token=b.token,
                symbol=b.symbol,
                side=exit_side,
                order_type="SL" if kind == STOP else "LIMIT",
                product=b.product,
                quantity=size,
                price=b.stop_limit if kind == STOP else b.target,
                trigger_price=b.stop_loss if kind == STOP else None,
                status=PENDING_BROKER,
                trading_day=self.day,
                created_ns=now,
                updated_ns=now,
                parent_id=b.entry_id,
                bracket_id=b.bracket_id,
                purpose=kind,
                broker=self.broker_name,
            )
            self._add(leg, "PENDING", {"bracket_id": b.bracket_id, "leg": kind})
            self._queue_place(leg)

    def _modify_qty(self, o: OrderRow, qty: int) -> None:
        old = o.quantity
        o.quantity = qty
        o.updated_ns = self._now()
        self._mark(o)
        self._event(o, "MODIFY_REQUESTED", o.status, {"quantity": qty, "was": old})
        self._publish_order(o)
        self._held_intents.append(ModifyIntent(o.order_id, o.broker_order_id, qty, old))

    # ================================================================== cancels
    def _request_cancel(self, o: OrderRow, reason: str = "") -> bool:
        """Ask for ``o`` to be cancelled. The cancel is owed until the broker's book shows the
        order closed: sent now when its broker id is known, else once it is (ack, order feed or
        reconciliation), and sent again with backoff when it fails. True if newly requested."""
        if o.terminal or o.sliced or o.broker_final:  # done at the broker: nothing to cancel
            return False
        if o.cancel_requested:
            self._pay_cancel(o)
            return False
        o.cancel_requested = True
        o.updated_ns = self._now()
        self._mark(o)
        self._event(o, "CANCEL_REQUESTED", o.status, {"reason": reason} if reason else None)
        if self._withdraw(o, reason or "cancelled before it was sent"):  # not sent yet: never will be
            return True
        self.owed_cancels.add(o.order_id)
        self._pay_cancel(o)
        return True

    def _pay_cancel(self, o: OrderRow) -> None:
        """Send an owed cancel if it can go now: broker id known, place answered, no cancel of
        it in flight, and its backoff elapsed."""
        if (
            o.cancel_requested
            and not o.terminal
            and not o.broker_final
            and o.broker_order_id
            and o.order_id not in self.inflight
            and o.order_id not in self.cancel_sent
            and self._now() >= o.cancel_due_ns
        ):
            self._send_cancel(o)

    def _send_cancel(self, o: OrderRow) -> None:
        self.cancel_sent.add(o.order_id)
        self._held_intents.append(CancelIntent(o.order_id, o.broker_order_id))

    def _retry_owed(self) -> None:
        """Periodic: owed cancels whose backoff elapsed, and legs whose re-place is due."""
        for oid in list(self.owed_cancels):
            o = self.orders.get(oid)
            if o is None or o.terminal or o.broker_final or not o.cancel_requested:
                self.owed_cancels.discard(oid)
                continue
            self._pay_cancel(o)
        if self.leg_retry:
            now = self._now()
            for (bid, _kind), (_n, due) in list(self.leg_retry.items()):
                b = self.brackets.get(bid)
                if b is None or b.state not in BRACKET_OPEN:
                    self.leg_retry.pop((bid, _kind), None)
                elif now >= due:
                    self._sync_bracket(b)

    @staticmethod
    def _backoff_ns(failures: int) -> int:
        return int(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, failures - 1)) * 1e9)

    def _cancel_tree(self, o: OrderRow, reason: str = "") -> list[str]:
        ids = []
        targets = [self.orders[c] for c in self.children.get(o.order_id, [])] if o.sliced else [o]
        for x in targets:
            if self._request_cancel(x, reason):
                ids.append(x.order_id)
        return ids

    def cancel_entries(self, reason: str = "kill switch") -> list[str]:
        """Kill-switch hook: cancel every working order that can add exposure — entries and
        manual orders, and an exit that would now open or flip its strategy's position.
        Bracket legs and flatten closes keep working: they only take exposure off."""
        ids = []
        for o in list(self.orders.values()):
            if o.terminal or o.sliced or not self._can_add_exposure(o):
                continue
            if self._request_cancel(o, reason):
                ids.append(o.order_id)
        if ids and self.log is not None:
            self.log.info("entries_cancelled", count=len(ids), reason=reason)
        return ids

    def _can_add_exposure(self, o: OrderRow) -> bool:
        if o.purpose in _LEGS or o.purpose == FLATTEN_P:
            return False
        if o.purpose != EXIT:
            return True
        pos = self.positions.get((o.strategy_id, o.key))
        held = pos.quantity if pos is not None else 0
        reduces = (held > 0 and o.side == "SELL") or (held < 0 and o.side == "BUY")
        return not reduces or o.remaining > abs(held)

    # ================================================================== flatten
    def flatten(self, req: Flatten, done: Callable[[dict[str, Any]], None]) -> None:
        """Cancel open orders; once the broker confirms each of them closed (a leg's fill may
        still be on its way, an order in flight or UNKNOWN may still turn up), close the
        positions as they then stand, each in its own product, with protected limits;
        ``done(report)`` once every close has its broker answer. If confirmations take longer
        than ``FLATTEN_CANCEL_WAIT_S`` the close goes out anyway and the report names the orders
        still working. Idempotent on ``request_id``."""
        job = self.flatten_jobs.get(req.request_id)
        if job is not None:
            if job.report is not None:
                done(job.report)
            else:
                job.waiters.append(done)
            return
        job = FlattenJob(
            request=req, waiters=[done], deadline_ns=self._now() + int(FLATTEN_CANCEL_WAIT_S * 1e9)
        )
        self.flatten_jobs[req.request_id] = job
        self._active_jobs.add(req.request_id)
        match_key = self._match_symbol(req.symbol) if req.symbol else None
        if req.symbol and match_key is None:
            job.skipped.append({"symbol": req.symbol, "reason": f"unknown instrument: {req.symbol}"})
        for b in self.brackets.values():
            if b.state in BRACKET_OPEN and self._matches(
                b.strategy_id, f"{b.segment}|{b.token}", req, match_key
            ):
                b.state = B_FLATTENED
                b.reason = f"flatten {req.request_id}"
                b.updated_ns = self._now()
                self._bdirty[b.bracket_id] = b
        for o in list(self.orders.values()):
            if o.terminal or o.sliced or not self._matches(o.strategy_id, o.key, req, match_key):
                continue
            if req.symbol and match_key is None:
                continue
            if self._request_cancel(o, f"flatten {req.request_id}"):
                job.cancelled.append(o.order_id)
            if not o.terminal:
                job.waiting.add(o.order_id)
        self._advance_job(job)

    def _match_symbol(self, symbol: str) -> str | None:
        try:
            return self.master.resolve(symbol).key
        except KeyError:
            return None

    @staticmethod
    def _matches(strategy_id: str, key: str, req: Flatten, match_key: str | None) -> bool:
        if req.strategy_id and strategy_id != req.strategy_id:
            return False
        return not (req.symbol and key != match_key)

    def _flatten_close(self, job: FlattenJob) -> None:
        """Close what is held, less what working orders on the closing side (still waiting for
        a cancel the broker has not confirmed, or this job's own earlier closes) may still
        take off: never sell what an unconfirmed stop might also sell."""
        job.phase = "close"
        job.rounds += 1
        req = job.request
        match_key = self._match_symbol(req.symbol) if req.symbol else None
        now = self._now()
        for (sid, key), pos in sorted(self.positions.items()):
            if pos.quantity == 0 or not self._matches(sid, key, req, match_key):
                continue
            if req.symbol and match_key is None:
                continue
            inst = self.master.get(pos.segment, pos.token)
            last = self.last.get(key)
            if inst is None or inst.tick_size <= 0:
                job.skipped.append(
                    {"symbol": pos.symbol, "reason": "tick size unknown: cannot price the close"}
                )
                continue
            if last is None or last.ltp <= 0:
                job.skipped.append({"symbol": pos.symbol, "reason": "no last price: cannot price the close"})
                continue
            by_product = pos.by_product or {"MIS": pos.quantity}
            for product, held in sorted(by_product.items()):
                if not held:
                    continue
                side = "SELL" if held > 0 else "BUY"
                qty = abs(held) - self._closing_qty(sid, key, product, side)
                if qty <= 0:
                    continue
                price = protected_limit(side, last.ltp, self.protection_pct, inst.tick_size)
                rid = f"flatten:{req.request_id}:{sid}:{key}"
                if len(by_product) > 1:
                    rid += f":{product}"
                if job.rounds > 1:
                    rid += f":{job.rounds}"
                row = OrderRow(
                    order_id=new_id(),
                    request_id=rid,
                    client_tag=self._tag(),
                    strategy_id=sid,
                    segment=pos.segment,
                    token=pos.token,
                    symbol=pos.symbol,
                    side=side,
                    order_type="LIMIT",
                    product=product,
                    quantity=qty,
                    price=price,
                    status=PENDING_BROKER,
                    trading_day=self.day,
                    created_ns=now,
                    updated_ns=now,
                    purpose=FLATTEN_P,
                    broker=self.broker_name,
                )
                if row.request_id in self.by_request:
                    continue
                self._add(row, "PENDING", {"flatten": req.request_id, "position": held, "product": product})
                kids = self._slice_and_place(row, inst)
                job.closing.append(row.order_id)
                for x in kids or [row]:
                    job.pending_places.add(x.order_id)
        self._advance_job(job)

    def _closing_qty(self, strategy_id: str, key: str, product: str, side: str) -> int:
        """What working orders of this strategy, instrument and product on ``side`` may still
        move the position by (their open rest, or trades a final status announced that are
        still on their way); the two legs of one bracket protect the same shares (OCO), so
        count once."""
        total, per_bracket = 0, dict[tuple[str, str], int]()
        for o in self.orders.values():
            if (
                o.terminal or o.sliced or o.side != side or o.strategy_id != strategy_id
                or o.product != product or o.key != key or not o.unsettled_qty
            ):  # fmt: skip
                continue
            if o.bracket_id and o.purpose in _LEGS:
                leg = (o.bracket_id, o.purpose)
                per_bracket[leg] = per_bracket.get(leg, 0) + o.unsettled_qty
            else:
                total += o.unsettled_qty
        legs: dict[str, int] = {}
        for (bid, _kind), q in per_bracket.items():
            legs[bid] = max(legs.get(bid, 0), q)
        return total + sum(legs.values())

    def _unconfirmed(self, order_id: str) -> dict[str, Any]:
        o = self.orders[order_id]
        return {"order_id": o.order_id, "symbol": o.symbol, "side": o.side, "purpose": o.purpose,
                "status": o.status, "remaining": o.remaining}  # fmt: skip

    def _advance_job(self, job: FlattenJob) -> None:
        if job.phase == "cancel":
            job.waiting = {oid for oid in job.waiting if oid in self.orders and not self.orders[oid].terminal}
            if job.waiting and self._now() < job.deadline_ns:
                return
            if job.waiting:
                job.unconfirmed = sorted(job.waiting)
                self.alert(
                    "WARNING",
                    f"flatten {job.request.request_id}: {len(job.waiting)} order(s) still working at the "
                    f"broker after {FLATTEN_CANCEL_WAIT_S:.0f} s (cancel not confirmed); closing the "
                    "positions as they stand — check those orders",
                    "flatten_unconfirmed",
                )
            self._flatten_close(job)
        if job.phase == "close" and not any(oid in self.inflight for oid in job.pending_places):
            job.phase = "ready"
        if job.phase in ("ready", "done") and job.unconfirmed:
            # answered already; an order that was still working has ended since: close what
            # it did not take off
            still = [x for x in job.unconfirmed if x in self.orders and not self.orders[x].terminal]
            if len(still) != len(job.unconfirmed):
                job.unconfirmed = still
                self._flatten_close(job)

    def _advance_jobs(self) -> None:
        """Move every flatten on: cancels confirmed (or waited out), closes answered, and the
        follow-up closes of a flatten that had to go ahead with orders still working."""
        for rid in list(self._active_jobs):
            job = self.flatten_jobs.get(rid)
            if job is None or (job.phase == "done" and not job.unconfirmed):
                self._active_jobs.discard(rid)
                continue
            self._advance_job(job)

    def finish_jobs(self) -> None:
        """Answer flatten requests whose orders are all placed (after the pump settled)."""
        for job in self.flatten_jobs.values():
            if job.phase != "ready":
                continue
            job.phase = "done"
            closing = []
            for oid in job.closing:
                o = self.orders.get(oid)
                if o is not None:
                    closing.append(
                        {
                            "order_id": o.order_id,
                            "symbol": o.symbol,
                            "strategy_id": o.strategy_id,
                            "side": o.side,
                            "quantity": o.quantity,
                            "price": str(o.price),
                            "status": o.status,
                            "filled_qty": o.filled_qty,
                            "reason": o.reason,
                        }
                    )
            req = job.request
            left = [
                p
                for (sid, key), p in self.positions.items()
                if p.quantity != 0
                and self._matches(sid, key, req, self._match_symbol(req.symbol) if req.symbol else None)
            ]
            job.report = {
                "request_id": req.request_id,
                "cancelled": len(job.cancelled),
                "cancelled_ids": job.cancelled,
                "unconfirmed": [self._unconfirmed(x) for x in job.unconfirmed if x in self.orders],
                "closing": closing,
                "skipped": job.skipped,
                "open_positions": [
                    {"strategy_id": p.strategy_id, "symbol": p.symbol, "quantity": p.quantity} for p in left
                ],
            }
            for w in job.waiters:
                w(job.report)
            job.waiters = []
        if len(self.flatten_jobs) > 100:  # keep recent reports for idempotent retries
            for rid in [r for r, j in self.flatten_jobs.items() if j.phase == "done"][:-50]:
                del self.flatten_jobs[rid]

    # ================================================================== reconciliation
    def request_reconcile(self, reason: str = "periodic") -> bool:
        """Queue a fetch of the broker's books (skipped while one is outstanding)."""
        if self._books_pending:
            return False
        self._books_pending = True
        self.reconcile_due_ns = 0
        if self.recon.carried_retry:
            self.recon.carried_retry = False
            self._held_intents.append(PositionsIntent(self._now()))
        self._held_intents.append(BooksIntent(self._now(), reason))
        return True

    def reconcile_if_due(self) -> None:
        """Periodic (the service calls it every 0.25 s): reconciliation when due, owed cancels
        and leg re-places whose backoff passed, flattens waiting on confirmations."""
        if self.reconcile_due_ns and self._now() >= self.reconcile_due_ns:
            self.request_reconcile("due")
        self._retry_owed()
        if self._active_jobs:
            self._advance_jobs()

    def on_books(
        self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade], started_ns: int
    ) -> None:
        """Match every non-terminal row and open bracket against the broker's books by tag.

        One snapshot is never trusted to close an order: a book that lags or answers "No Data"
        would otherwise close live orders and have fresh legs placed beside the old ones. The
        broker's day book keeps every order it acknowledged today, so a book without one of
        them (or without fills the ledger holds) is not whole and closes nothing; only an
        order missing from a book that shows others for ``LOST_CLOSE_S`` is taken as gone.
        From whole books, a row never acknowledged or an order of an earlier day is closed
        after ``MISSING_SNAPSHOTS`` consecutive books over ``book_lag_s`` without it. A row
        the ledger calls terminal that the broker shows working is adopted back, with a
        CRITICAL alert."""
        self.stats["reconciles"] += 1
        by_id = {s.broker_order_id: s for s in order_book if s.broker_order_id}
        by_tag = {tag_key(s.client_tag): s for s in order_book if s.client_tag}
        traded = self._apply_book_rows(order_book, trade_book, started_ns)
        cutoff = started_ns - self.book_lag_ns
        absent: list[OrderRow] = []
        lost: list[OrderRow] = []  # today's acknowledged orders the book does not show
        for o in list(self.orders.values()):
            if o.terminal or o.sliced:
                continue
            found = by_id.get(o.broker_order_id) if o.broker_order_id else None
            if found is None:
                found = by_tag.get(tag_key(o.client_tag))
            if found is not None:
                o.missing = 0
                self._on_status(found, o)
                if o.broker_final and not o.terminal:
                    self._alert_awaiting(o, started_ns)
                continue
            if o.order_id in self.inflight or o.created_ns > cutoff:
                continue
            acked = o.status not in (PENDING_BROKER, UNKNOWN)
            if (acked and o.trading_day == self.day) or (
                o.filled_qty and o.trading_day == self.day and o.order_id not in traded
            ):
                lost.append(o)
            else:
                absent.append(o)
        if lost and order_book:
            lost = [o for o in lost if not self._gone_for_good(o, started_ns)]
        if lost:
            # The broker's day book keeps every order it acknowledged today, filled or not, and
            # its trade book every trade: a snapshot without one of them is not whole ("No
            # Data", a lagging replica). Nothing is closed from it.
            self._book_incomplete(lost, started_ns)
            self._after_books(order_book, trade_book)
            return
        self.recon.incomplete_since_ns = 0
        for o in absent:  # never acknowledged, or of an earlier day (expired overnight)
            self._count_absent(o, started_ns)
        self._after_books(order_book, trade_book)

    def _apply_book_rows(
        self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade], started_ns: int
    ) -> set[str]:
        """Orphans, adoptions and the trade book's fills; returns the orders with a trade in it."""
        for st in order_book:
            o = self._find(st.broker_order_id, st.client_tag)
            if o is None:
                self._orphan(st.broker_order_id, st.client_tag)
            elif (
                o.terminal
                and not o.sliced
                and st.status.upper() in (ACK, OPEN, PARTIAL)
                and o.updated_ns < started_ns  # closed before this snapshot was asked for
                and o.filled_qty < o.quantity  # all its trades are in: a stale row, not a live order
            ):
                self._adopt(o, st)
        traded: set[str] = set()
        for tr in trade_book:
            o = self._find(tr.broker_order_id, tr.client_tag)
            if o is None:
                self._orphan(tr.broker_order_id, tr.client_tag)
                continue
            traded.add(o.order_id)
            self._on_trade(tr, o)
        return traded

    def _count_absent(self, o: OrderRow, started_ns: int) -> None:
        o.missing += 1
        if o.missing == 1:
            o.missing_since_ns = started_ns
        if o.missing < MISSING_SNAPSHOTS or started_ns - o.missing_since_ns < self.book_lag_ns:
            # look again soon: an order that is really gone is closed within about book_lag
            again = o.missing_since_ns + max(self.book_lag_ns, MISSING_RECHECK_NS)
            self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, max(again, self._now() + 1))
            return
        self._close_missing(o)

    def _after_books(self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade]) -> None:
        for b in list(self.brackets.values()):
            if b.state in BRACKET_OPEN or self._has_working_leg(b):
                self._sync_bracket(b)
        if self.log is not None:
            self.log.info(
                "reconciled",
                broker_orders=len(order_book),
                broker_trades=len(trade_book),
                open_orders=self.open_count(),
            )

    def _gone_for_good(self, o: OrderRow, started_ns: int) -> bool:
        """An acknowledged order of today that the broker's book, while it shows other orders,
        has not shown for ``LOST_CLOSE_S`` (at least ten book lags): the book is working and
        this order is gone. It is closed with a CRITICAL alert, so one vanished order cannot
        stop reconciliation for the rest of the day."""
        if not o.missing:
            o.missing_since_ns = started_ns
        o.missing += 1
        if started_ns - o.missing_since_ns < max(10 * self.book_lag_ns, int(LOST_CLOSE_S * 1e9)):
            return False
        self.alert(
            "CRITICAL",
            f"{o.purpose.lower()} order {o.client_tag} ({o.side} {o.remaining} {o.symbol}) has been missing "
            f"from the broker's order book for {(started_ns - o.missing_since_ns) / 1e9:.0f} s while it "
            "showed other orders: closed as gone — check it at the broker",
            "order_vanished",
        )
        self._close_missing(o)
        return True

    def _book_incomplete(self, lost: list[OrderRow], started_ns: int) -> None:
        if not self.recon.incomplete_since_ns:
            self.recon.incomplete_since_ns = started_ns
            self.recon.incomplete_alerted = False
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now() + MISSING_RECHECK_NS * 5)
        if self.log is not None:
            self.log.warning("broker_book_incomplete", missing=len(lost),
                             client_tags=[o.client_tag for o in lost[:10]])  # fmt: skip
        if self.recon.incomplete_alerted or started_ns - self.recon.incomplete_since_ns < max(
            self.book_lag_ns, 60_000_000_000
        ):
            return
        self.recon.incomplete_alerted = True
        names = ", ".join(
            f"{o.purpose.lower()} {o.side} {o.remaining} {o.symbol} ({o.client_tag})" for o in lost[:5]
        )
        self.alert(
            "CRITICAL",
            f"the broker's order book has not shown {len(lost)} of today's acknowledged orders for "
            f"{(started_ns - self.recon.incomplete_since_ns) / 1e9:.0f} s ({names}); nothing is closed from "
            "it — check them at the broker: a stop that is really gone leaves its position unprotected",
            "book_incomplete",
        )

    def _close_missing(self, o: OrderRow) -> None:
        """Consecutive books over ``book_lag_s`` agree the order is not at the broker."""
        if o.status in (PENDING_BROKER, UNKNOWN):
            if o.purpose in _LEGS and o.bracket_id:
                self._leg_not_placed(o, "never reached the broker")
                key = (o.bracket_id, o.purpose)
                self.leg_retry[key] = (self.leg_retry[key][0], self._now())  # place it again now
            self._transition(
                o,
                REJECTED,
                "RECONCILED",
                {"found": False, "snapshots": o.missing},
                "never reached the broker (not in its order book); not re-sent",
            )
            self.alert(
                "WARNING",
                f"order {o.client_tag} ({o.side} {o.quantity} {o.symbol}) never reached the "
                "broker; marked REJECTED, not re-sent",
                "order_not_sent",
            )
        else:
            self._transition(
                o,
                CANCELLED,
                "RECONCILED",
                {"found": False, "snapshots": o.missing},
                "no longer in the broker's order book (expired)",
            )

    def _adopt(self, o: OrderRow, st: BrokerOrderStatus) -> None:
        """The ledger closed ``o`` but the broker shows it working: take it back as working so
        its fills count, its bracket sees it and a cancel can reach it."""
        old = o.status
        o.status = PARTIAL if o.filled_qty else OPEN
        o.broker_final = ""
        o.missing = 0
        o.updated_ns = self._now()
        self.stats["adopted"] += 1
        if o.bracket_id and o.purpose in _LEGS:  # it protects after all: the bracket may size on it
            self.leg_failed.discard((o.bracket_id, o.purpose))
        self._mark(o)
        self._event(o, "ADOPTED", old, {"broker_status": st.status, "raw": st.raw})
        self._publish_order(o)
        if o.cancel_requested:
            self.owed_cancels.add(o.order_id)
            self._pay_cancel(o)
        self.alert(
            "CRITICAL",
            f"order {o.client_tag} ({o.purpose.lower()} {o.side} {o.quantity} {o.symbol}) was {old} in the "
            f"ledger but is working at the broker: adopted back as {o.status}",
            "order_adopted",
        )

    def _alert_awaiting(self, o: OrderRow, started_ns: int) -> None:
        if o.order_id in self._awaiting_alerted:
            return
        if started_ns - o.awaiting_since_ns < max(self.book_lag_ns, 60_000_000_000):
            return
        self._awaiting_alerted.add(o.order_id)
        self.alert(
            "CRITICAL",
            f"the broker reports order {o.client_tag} ({o.side} {o.symbol}) {o.broker_final} with "
            f"{o.broker_filled} traded, but its trade book shows {o.filled_qty}: the position counts "
            "only traded shares — check the broker's trade book",
            "fills_missing",
        )

    def _has_working_leg(self, b: BracketRow) -> bool:
        orders = self.orders
        return any(x in orders and not orders[x].terminal for x in self.legs.get(b.bracket_id, ()))

    # ================================================================== inline runner
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

    def pending_writes(self) -> bool:
        return bool(
            self._new
            or self._dirty
            or self._events
            or self._fills
            or self._bdirty
            or self._risk
            or self._held_intents
            or self._held_msgs
        )

    def drain_broker_events(self) -> None:
        drain = getattr(self.broker, "drain_events", None)
        if drain is None:
            return
        for ev in drain():
            self.on_broker_event(ev)

    # ================================================================== queries
    def open_count(self) -> int:
        return sum(1 for o in self.orders.values() if not o.terminal and not o.sliced)

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
            if ev == "kill_switch_on" or (
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
