"""The execution engine's shared state, its constants and its small value types."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.common.bus import topic
from libs.common.clock import Clock, trading_day
from libs.common.config import ExecutionConfig
from libs.common.instruments import MasterData
from libs.common.messages import (
    Flatten,
    FlattenPhase,
    Message,
    Purpose,
    RiskEvent,
    Tick,
)
from libs.common.positions import PositionState  # the one position model
from services.execution.brokers.base import Broker, BrokerOrderStatus, BrokerTrade
from services.execution.intents import Intent, PlaceIntent
from services.execution.model import (
    BRACKET_OPEN,
    LEG_PURPOSES,
    BasketRow,
    BracketRow,
    EventRow,
    FillRow,
    OrderRow,
    RiskEventRow,
    tag_key,
)
from services.execution.pricing import MAX_PRICE  # noqa: F401 - re-exported
from services.execution.settled import CodeSet, SettledIds
from services.execution.store import (
    CARRIED_STRATEGY,
    LedgerError,
    OrderStore,
)

_ZERO = Decimal(0)
_LEGS = LEG_PURPOSES
_CLOSES = frozenset({*LEG_PURPOSES, Purpose.EXIT, Purpose.FLATTEN})  # orders that only close
RETRY_BASE_S = 0.5  # first retry of a failed cancel or leg place; doubles up to RETRY_MAX_S
RETRY_MAX_S = 30.0
RETRY_ALERT_AFTER = 5  # failures of one owed cancel / leg place before a CRITICAL alert
MISSING_SNAPSHOTS = 2  # consecutive order books without an order before it is closed
LOST_CLOSE_S = 300.0  # an acknowledged order absent from a working book this long is gone
MISSING_RECHECK_NS = 1_000_000_000  # the next book after a miss is asked for this soon at the earliest
CANCEL_CONFIRM_NS = 5_000_000_000  # an accepted cancel whose order still works after this is sent again
FLATTEN_CANCEL_WAIT_S = 10.0  # flatten closes positions once its cancels are confirmed, or after this
# A terminal order (with the rest of its bracket, slices and legs) unchanged this long, with a
# books snapshot read since, is settled: it leaves memory and only its ids stay (``SettledIds``).
SETTLED_AFTER_S = 300.0
SETTLED_RECHECK_NS = 10_000_000_000  # a group not ready to go (open bracket, a write) is looked at again
# the switch events, and the legacy name old ledger rows may carry
KILL_EVENTS = (RiskEvent.KILL_SWITCH_ON, RiskEvent.KILL_SWITCH_OFF, "kill_switch")
CARRIED = CARRIED_STRATEGY  # the strategy id of carried positions no strategy's fills explain
QTY_MAX = 2**31 - 1  # the ledger's INTEGER quantity columns
MAX_TICK_PRICE = 10_000_000.0  # a tick above the price cap (or NaN, or not positive) is not a price
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
    phase: FlattenPhase = FlattenPhase.CANCEL  # cancel → close → ready → done
    report: dict[str, Any] | None = None


@dataclass(slots=True)
class ReconcileState:
    """What reconciliation remembers between snapshots."""

    incomplete_since_ns: int = 0  # first of the consecutive order books that were not whole
    incomplete_alerted: bool = False
    carried_retry: bool = False  # the carried positions could not be read: ask again
    bad_rows: set[str] = field(default_factory=set)  # orders whose impossible book row was alerted
    carry_alerted: set[tuple[str, str]] = field(default_factory=set)  # (instrument, product)



class EngineBase:
    """The engine's state and indexes; each part of the engine (unit of work, orders, broker
    events, brackets, flatten, reconciliation) is a subclass adding its rules."""

    def __init__(  # noqa: PLR0915 - one statement per piece of the engine's state
        self, store: OrderStore, broker: Broker, master: MasterData, clock: Clock, cfg: ExecutionConfig, *,
        log: Any = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.master = master
        self.clock = clock
        self.cfg = cfg
        self.log = log
        self.protection_pct = float(cfg.protection_pct)
        self.broker_name = broker.name
        self.book_lag_ns = int(float(broker.book_lag_s) * 1e9)
        self.day = trading_day(clock)
        # state
        self.orders: dict[str, OrderRow] = {}
        self.by_request: dict[str, str] = {}
        self.by_tag: dict[str, str] = {}
        self.by_broker_id: dict[str, str] = {}
        self.children: dict[str, list[str]] = {}  # sliced parent → slices
        # rows not terminal (sliced parents too): what the scans of working orders go over, so
        # their cost follows the open orders, not the day's
        self.working: dict[str, OrderRow] = {}
        # the ids of evicted (settled) groups, compact and exact (``settled.py``): enough to know
        # the broker's rows of them all day and to load a group back from the ledger; a row's ids
        # leave ``by_request``, ``by_tag`` and ``by_broker_id`` when it goes there
        self.settled = SettledIds()
        self._settle_due: list[tuple[int, str]] = []  # heap of (when to look at it, order id)
        # when the latest whole, non-empty books snapshot was asked for, and the broker ids it
        # showed done: only such a book is evidence that lets a settled group leave memory
        self._books_seen_ns = 0
        self._book_done: set[str] = set()
        self.ledger_behind: set[str] = set()  # orders with a change the ledger refused (quarantined)
        self.brackets: dict[str, BracketRow] = {}
        # (strategy, segment, token) → its brackets that may still be open, in creation order
        # (pruned as they close: a closed bracket never reopens); ``brackets`` is the truth
        self._bgroups: dict[tuple[str, str, str], list[BracketRow]] = {}
        self.legs: dict[str, list[str]] = {}  # bracket → STOP/TARGET orders
        self.positions: dict[tuple[str, str], PositionState] = {}
        # trade ids applied, per (trading day, segment): a broker's trade id is unique per
        # exchange segment and day (nested, and each a compact exact set: a few bytes a fill)
        self.fill_keys: dict[tuple[str, str], CodeSet] = {}
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
        self._kdirty: dict[str, BasketRow] = {}  # baskets changed since the last flush
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
        self._unprotected: dict[str, str] = {}  # bracket → why its stop was rejected: to close
        self._unpriced: set[str] = set()  # of those, the ones already alerted as not priceable yet
        # (strategy, instrument) → the part of its position that closes made (an exit and a stop
        # that both filled): nobody's intent and unprotected; ``keep_stray_flat`` closes it
        self._stray: dict[tuple[str, str], int] = {}
        self._stray_alerted: set[tuple[str, str]] = set()
        self._stray_rounds: dict[tuple[str, str], int] = {}
        self._stray_jobs: dict[tuple[str, str], tuple[str, int, int]] = {}
        # the intraday square-off (``square_off_if_due``): today's instant (0: not computed,
        # -1: off), its day, the products, and per (strategy, instrument, product) its rounds
        # and the running flatten's request id
        self._square_off_ns = 0
        self._square_day = ""
        self._square_products = frozenset(cfg.square_off_products)
        self._square_rounds: dict[tuple[str, str, str], int] = {}
        self._square_jobs: dict[tuple[str, str, str], tuple[str, int, int]] = {}  # (id, held, started)
        self._started_ns = clock.now_ns()  # square-off ids of this process differ from an earlier one's
        # strategies risk stopped today (``strategy_stopped`` risk events: max_loss, target_profit)
        # → when the stop was recorded; ``keep_stopped_flat`` closes what they still hold, per
        # (strategy, instrument) its rounds and the running flatten (id, held, started)
        self.stopped: dict[str, int] = {}
        self._stop_rounds: dict[tuple[str, str], int] = {}
        self._stop_jobs: dict[tuple[str, str], tuple[str, int, int]] = {}
        self._oversized: dict[str, tuple[int, int]] = {}  # leg → (size it should have, failed resizes)
        self._modifying: set[str] = set()  # legs with a modify not answered yet (one at a time)
        # trailing stops: instrument key → its active trailing brackets (ids); the brackets whose
        # stop legs lag the trailed stop; per stop leg the earliest next modify and its failures
        self._trailing: dict[str, list[str]] = {}
        self._trail_owed: set[str] = set()
        self._trail_next_ns: dict[str, int] = {}
        self._trail_failures: dict[str, int] = {}
        self.trail_every_ns = int(float(cfg.trail_modify_every_s) * 1e9)
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
        # told (start_ns, end_ns) of every broker place call that ``pump`` makes (latency)
        self.place_timer: Callable[[int, int], None] | None = None

    def _index(self, o: OrderRow) -> None:
        self.orders[o.order_id] = o
        if o.terminal:
            self._settle_later(o)
        else:
            self.working[o.order_id] = o
        self.by_request[o.request_id] = o.order_id
        self.by_tag[tag_key(o.client_tag)] = o.order_id
        if o.broker_order_id:
            self.by_broker_id[o.broker_order_id] = o.order_id
        if o.parent_id and o.purpose not in _LEGS:
            self.children.setdefault(o.parent_id, []).append(o.order_id)
        if o.bracket_id and o.purpose in _LEGS:
            self.legs.setdefault(o.bracket_id, []).append(o.order_id)

    def request_known(self, request_id: str) -> bool:
        """Whether a row with this request id exists: in memory, or settled (then the ledger,
        which holds every request id once, says; when it cannot be read, taken as known, so
        nothing is built twice — the insert's conflict on ``request_id`` is the backstop)."""
        if request_id in self.by_request:
            return True
        if not self.settled.maybe_request(request_id):
            return False
        try:
            return bool(self.store.find_by_request_ids([request_id]))
        except LedgerError:
            return True

    def _settle_later(self, o: OrderRow) -> None:
        """``o`` is terminal: look at it once it may have settled."""
        heapq.heappush(self._settle_due, (o.updated_ns + int(SETTLED_AFTER_S * 1e9), o.order_id))

    def _unindex(self, o: OrderRow) -> None:
        self.orders.pop(o.order_id, None)
        self.working.pop(o.order_id, None)
        if self.by_request.get(o.request_id) == o.order_id:
            del self.by_request[o.request_id]
        self.by_tag.pop(tag_key(o.client_tag), None)
        if o.parent_id and o.parent_id in self.children:
            self.children[o.parent_id] = [c for c in self.children[o.parent_id] if c != o.order_id]
        if o.bracket_id and o.bracket_id in self.legs:
            self.legs[o.bracket_id] = [c for c in self.legs[o.bracket_id] if c != o.order_id]

    def _now(self) -> int:
        return self.clock.now_ns()

    def _bracket_of(self, o: OrderRow) -> BracketRow | None:
        """The bracket an entry or leg belongs to (slices reach it through their parent)."""
        return self.brackets.get(o.bracket_id) if o.bracket_id else None

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

    def open_count(self) -> int:
        return sum(1 for o in self.working.values() if not o.sliced)

    def open_bracket_count(self) -> int:
        """Open brackets, from the per-instrument groups (every open bracket is in one)."""
        brackets = self.brackets
        return sum(
            1 for g in self._bgroups.values() for b in g
            if b.state in BRACKET_OPEN and brackets.get(b.bracket_id) is b
        )  # fmt: skip


    # ------------------------------------------------------------ provided by the later parts
    # (each part builds on the one before: unit of work → orders → brackets → broker events →
    # flatten → reconciliation; these few calls go the other way)
    def _sync_bracket(self, b: BracketRow) -> None:
        raise NotImplementedError  # brackets.Brackets

    def _trim_exits(self, o: OrderRow) -> None:
        raise NotImplementedError  # brackets.Brackets

    def _overclosed(self, o: OrderRow) -> None:
        raise NotImplementedError  # brackets.Brackets

    def _new_bracket(
        self, entry: OrderRow, stop_loss: Decimal | None, target: Decimal | None, stop_limit: Decimal | None,
        trail: tuple[Decimal | None, Decimal | None] = (None, None), *, stop_pct: Decimal | None = None,
    ) -> None:
        raise NotImplementedError  # brackets.Brackets

    def _advance_jobs(self) -> None:
        raise NotImplementedError  # flatten.Flattening

    def on_books(
        self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade], started_ns: int
    ) -> None:
        raise NotImplementedError  # reconcile.Reconciliation

    def _on_carried(self, result: Any) -> None:
        raise NotImplementedError  # reconcile.Reconciliation
