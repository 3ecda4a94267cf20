"""The ledger contract (``OrderStore``) and its in-memory implementation.

``PgOrderStore`` (``ledger.py``) is the durable one; ``MemoryOrderStore`` behaves the same
for backtests and unit tests: idempotent on ``request_id``, ``client_tag`` unique, fills
unique per (broker, trading day, trade id), events append-only, rows copied in and out so
that the engine's in-memory objects are never the stored ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from libs.common.instruments import Instrument
from services.execution.model import (
    BRACKET_OPEN,
    TERMINAL,
    BasketRow,
    BracketRow,
    CarriedNet,
    Changes,
    EventRow,
    FillRow,
    OrderQuery,
    OrderRow,
    RiskEventRow,
)

_T = TypeVar("_T")
_INT_MAX = 2**31 - 1  # the ledger's INTEGER columns
CARRY_PRODUCTS = ("NRML", "CNC")  # products that outlive the trading day (MIS is squared off)
CARRIED_STRATEGY = "carried"  # positions the broker carries that no strategy's fills explain


class _Copier:
    """A shallow copy of a slotted dataclass row, many times faster than ``copy.copy``: one
    generated function per row class assigns each slot in turn (no per-slot getattr calls)."""

    def __init__(self) -> None:
        self._by_class: dict[type, Callable[[Any], Any]] = {}

    def copy(self, row: _T) -> _T:
        cls = type(row)
        fn = self._by_class.get(cls)
        if fn is None:
            fn = self._by_class[cls] = self._compile(cls)
        return fn(row)  # type: ignore[no-any-return]

    @staticmethod
    def _compile(kind: Any) -> Callable[[Any], Any]:
        body = "".join(f"    new.{name} = row.{name}\n" for name in kind.__slots__)
        src = f"def copy(row):\n    new = _new(_cls)\n{body}    return new\n"
        scope: dict[str, Any] = {"_new": object.__new__, "_cls": kind}
        exec(src, scope)  # noqa: S102 - the source is built from the class's own slot names
        return scope["copy"]  # type: ignore[no-any-return]


copy = _Copier()


class LedgerError(RuntimeError):
    """The ledger could not write or read; the transaction was rolled back."""


def carried_net(names: tuple[str, str, str, str, str], sums: tuple[Any, Any, Any, Any]) -> CarriedNet:
    """The net of a strategy's earlier-day fills in one instrument and product, at the average
    price of the side it is net of (the same rule for every store). ``names`` is (strategy,
    segment, token, symbol, product); ``sums`` (buy value, buy qty, sell value, sell qty)."""
    buy_value, buy_qty, sell_value, sell_qty = sums
    bq, sq = int(buy_qty or 0), int(sell_qty or 0)
    net = bq - sq
    value, qty = (buy_value, bq) if net > 0 else (sell_value, sq)
    avg = Decimal(value) / qty if value is not None and qty else Decimal(0)
    return CarriedNet(*names, quantity=net, avg_price=avg)


class LedgerDataError(LedgerError):
    """The ledger refused the data itself (a CHECK, a type, an unstorable value): writing the
    same rows again can never succeed, so the caller must set the offending row aside."""


def fill_problem(f: FillRow) -> str | None:
    """Why the ledger cannot store this fill (the ``fills`` CHECK constraints), or None."""
    if f.quantity <= 0 or f.quantity > _INT_MAX:
        return f"quantity {f.quantity} is not a positive share count"
    if not f.price.is_finite() or f.price <= 0:
        return f"price {f.price} is not positive"
    if f.side not in ("BUY", "SELL"):
        return f"side {f.side!r} is not BUY or SELL"
    return None


class OrderStore(Protocol):
    def migrate(self) -> list[str]:
        """Apply pending migrations; returns the versions applied now."""
        ...

    def write(self, changes: Changes) -> dict[str, OrderRow]:
        """Write everything in one transaction. Returns ``{request_id: existing_row}`` for new
        orders whose ``request_id`` was already in the ledger (those were not written, nor
        their children, events or brackets)."""
        ...

    def load_orders(self, trading_day: str) -> list[OrderRow]:
        """Orders of ``trading_day``, every non-terminal order, and every order of an open
        bracket — what the engine needs in memory after a restart."""
        ...

    def load_open_brackets(self) -> list[BracketRow]:
        """Open brackets, and closed ones that still have a working leg (a cancel is owed)."""
        ...

    def load_fills(self, trading_day: str) -> list[FillRow]: ...

    def load_open_baskets(self, trading_day: str = "") -> list[BasketRow]:
        """Baskets still placing or rolling back (``BASKET_OPEN``), whatever their day, and
        the ``FAILED`` baskets of ``trading_day`` that placed rollback closes (a close may
        still be working: its chase resumes)."""
        ...

    def find_by_request_ids(self, request_ids: Iterable[str]) -> dict[str, OrderRow]: ...

    def find_by_order_ids(
        self, order_ids: Iterable[str], *, with_children: bool = False
    ) -> dict[str, OrderRow]:
        """The rows of these order ids (a settled group loaded back), by order id; with
        ``with_children`` also every row whose ``parent_id`` is one of them."""
        ...

    def find_brackets(self, bracket_ids: Iterable[str]) -> dict[str, BracketRow]:
        """The brackets of these ids, whatever their state, by bracket id."""
        ...

    def query_orders(self, q: OrderQuery) -> list[tuple[OrderRow, list[FillRow]]]: ...

    def events_for(self, order_id: str) -> list[EventRow]: ...

    def risk_events(self, trading_day: str) -> list[RiskEventRow]: ...

    def entry_counts(self, trading_day: str) -> dict[tuple[str, str, str], int]:
        """A strategy's entry orders (``ENTRY``, not a slice, not rejected) per (strategy,
        segment, token) of ``trading_day``: what risk's ``max_entries_per_day`` counts after a
        restart."""
        ...

    def latest_risk_event(self, events: Iterable[str]) -> RiskEventRow | None:
        """The newest ``risk_events`` row of any day whose event is one of ``events``."""
        ...

    def carried_nets(self, before_day: str) -> list[CarriedNet]:
        """Per strategy, instrument and product (NRML, CNC): the net of fills of the days
        before ``before_day``, where not zero (strategy ``carried`` excluded)."""
        ...

    def replace_instruments(self, instruments: Iterable[Instrument]) -> int: ...

    def close(self) -> None: ...


class MemoryOrderStore:
    """``OrderStore`` in memory, for backtests and unit tests."""

    def __init__(self) -> None:
        self.orders: dict[str, OrderRow] = {}
        self.by_request: dict[str, str] = {}
        self.tags: set[str] = set()
        self.events: list[EventRow] = []
        self.fills: dict[tuple[str, str, str, str], FillRow] = {}
        self.brackets: dict[str, BracketRow] = {}
        self.risk: list[RiskEventRow] = []
        self.baskets: dict[str, BasketRow] = {}
        self.instruments: dict[str, Instrument] = {}
        self.transactions = 0

    def migrate(self) -> list[str]:
        return []

    def write(self, changes: Changes) -> dict[str, OrderRow]:  # noqa: PLR0915 - one transaction, in order
        conflicts: dict[str, OrderRow] = {}
        skipped: set[str] = set()
        new_rows: list[OrderRow] = []
        orders = self.orders
        cp = copy.copy
        if changes.new_orders:
            staged_tags: set[str] = set()
            staged_requests: set[str] = set()
            for row in changes.new_orders:
                if row.parent_id and row.parent_id in skipped:
                    skipped.add(row.order_id)
                    continue
                existing = self.by_request.get(row.request_id)
                if existing is not None or row.request_id in staged_requests:
                    if existing is not None:
                        conflicts[row.request_id] = cp(orders[existing])
                    skipped.add(row.order_id)
                    continue
                if row.client_tag in self.tags or row.client_tag in staged_tags:
                    raise LedgerError(f"duplicate client_tag {row.client_tag}")
                staged_tags.add(row.client_tag)
                staged_requests.add(row.request_id)
                new_rows.append(row)
        staged = {r.order_id for r in new_rows}
        for ev in changes.events:
            if ev.order_id not in orders and ev.order_id not in skipped and ev.order_id not in staged:
                raise LedgerError(f"event for unknown order {ev.order_id}")
        for f in changes.fills:
            if f.order_id not in orders and f.order_id not in skipped and f.order_id not in staged:
                raise LedgerError(f"fill for unknown order {f.order_id}")
            problem = fill_problem(f)
            if problem is not None:  # the CHECK constraints of ``fills``
                raise LedgerDataError(f"fill {f.trade_id} refused: {problem}")
        # all checks passed: apply (all or nothing, like a transaction)
        for row in new_rows:
            orders[row.order_id] = cp(row)
            self.by_request[row.request_id] = row.order_id
            self.tags.add(row.client_tag)
        for oid, row in changes.updated.items():
            if oid in orders and oid not in skipped:
                orders[oid] = cp(row)
        if skipped:
            self.events.extend(cp(ev) for ev in changes.events if ev.order_id not in skipped)
        else:
            self.events.extend(map(cp, changes.events))
        for f in changes.fills:
            if f.order_id in skipped:
                continue
            self.fills.setdefault((f.broker, f.trading_day, f.segment, f.trade_id), cp(f))
        for b in changes.brackets.values():
            if b.entry_id in skipped:
                continue
            self.brackets[b.bracket_id] = cp(b)
        if changes.baskets:
            self._write_baskets(changes, skipped)
        if changes.risk_events:
            seen = {r.request_id for r in self.risk if r.request_id}
            for r in changes.risk_events:
                if r.request_id and r.request_id in seen:
                    continue
                seen.add(r.request_id)
                self.risk.append(cp(r))
        self.transactions += 1
        return conflicts

    def _write_baskets(self, changes: Changes, skipped: set[str]) -> None:
        for k in changes.baskets.values():
            if k.legs and k.legs[0] in skipped:  # a repeat of a basket already in the ledger
                continue
            row = self.baskets[k.basket_id] = copy.copy(k)
            row.legs, row.closes = list(k.legs), list(k.closes)

    def load_orders(self, trading_day: str) -> list[OrderRow]:
        open_brackets = {b.bracket_id for b in self.brackets.values() if b.state in BRACKET_OPEN}
        out = [
            copy.copy(o)
            for o in self.orders.values()
            if o.trading_day == trading_day or o.status not in TERMINAL or o.bracket_id in open_brackets
        ]
        out.sort(key=lambda o: o.created_ns)
        return out

    def load_open_brackets(self) -> list[BracketRow]:
        working = {o.bracket_id for o in self.orders.values() if o.bracket_id and o.status not in TERMINAL}
        return [
            copy.copy(b)
            for b in self.brackets.values()
            if b.state in BRACKET_OPEN or b.bracket_id in working
        ]

    def load_fills(self, trading_day: str) -> list[FillRow]:
        return [copy.copy(f) for f in self.fills.values() if f.trading_day == trading_day]

    def load_open_baskets(self, trading_day: str = "") -> list[BasketRow]:
        from libs.common.messages import BASKET_OPEN, BasketState

        out = []
        for k in sorted(self.baskets.values(), key=lambda x: x.created_ns):
            closing = k.state == BasketState.FAILED and k.closes and k.trading_day == trading_day
            if k.state in BASKET_OPEN or closing:
                row = copy.copy(k)
                row.legs, row.closes = list(k.legs), list(k.closes)
                out.append(row)
        return out

    def find_by_request_ids(self, request_ids: Iterable[str]) -> dict[str, OrderRow]:
        out = {}
        for rid in request_ids:
            oid = self.by_request.get(rid)
            if oid is not None:
                out[rid] = copy.copy(self.orders[oid])
        return out

    def find_by_order_ids(
        self, order_ids: Iterable[str], *, with_children: bool = False
    ) -> dict[str, OrderRow]:
        ids = set(order_ids)
        return {oid: copy.copy(o) for oid, o in self.orders.items()
                if oid in ids or (with_children and o.parent_id in ids)}  # fmt: skip

    def find_brackets(self, bracket_ids: Iterable[str]) -> dict[str, BracketRow]:
        return {bid: copy.copy(self.brackets[bid]) for bid in bracket_ids if bid in self.brackets}

    def query_orders(self, q: OrderQuery) -> list[tuple[OrderRow, list[FillRow]]]:
        rows = [
            o
            for o in self.orders.values()
            if (not q.status or o.status == q.status.upper())
            and (not q.symbol or o.symbol.upper() == q.symbol.upper())
            and (not q.strategy_id or o.strategy_id == q.strategy_id)
            and (not q.trading_day or o.trading_day == q.trading_day)
        ]
        rows.sort(key=lambda o: o.created_ns, reverse=True)
        rows = rows[: q.limit]
        by_order: dict[str, list[FillRow]] = {}
        for f in self.fills.values():
            by_order.setdefault(f.order_id, []).append(copy.copy(f))
        return [(copy.copy(o), sorted(by_order.get(o.order_id, []), key=lambda f: f.ts_ns)) for o in rows]

    def events_for(self, order_id: str) -> list[EventRow]:
        return [copy.copy(e) for e in self.events if e.order_id == order_id]

    def risk_events(self, trading_day: str) -> list[RiskEventRow]:
        return [copy.copy(r) for r in self.risk if r.trading_day == trading_day]

    def entry_counts(self, trading_day: str) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for o in self.orders.values():
            if (o.trading_day == trading_day and o.purpose == "ENTRY" and not o.parent_id
                    and o.status != "REJECTED"):  # fmt: skip
                k = (o.strategy_id, o.segment, o.token)
                out[k] = out.get(k, 0) + 1
        return out

    def carried_nets(self, before_day: str) -> list[CarriedNet]:
        acc: dict[tuple[str, str, str, str], list[Any]] = {}
        for f in self.fills.values():
            o = self.orders.get(f.order_id)
            if f.trading_day >= before_day or o is None or o.product not in CARRY_PRODUCTS:
                continue
            if f.strategy_id == CARRIED_STRATEGY:
                continue
            # symbol, buy value, buy qty, sell value, sell qty
            a = acc.setdefault((f.strategy_id, f.segment, f.token, o.product), [f.symbol, 0, 0, 0, 0])
            i = 1 if f.side == "BUY" else 3
            a[i] += f.price * f.quantity
            a[i + 1] += f.quantity
        return [
            carried_net((sid, seg, tok, a[0], prod), (a[1], a[2], a[3], a[4]))
            for (sid, seg, tok, prod), a in acc.items()
            if a[2] != a[4]
        ]

    def latest_risk_event(self, events: Iterable[str]) -> RiskEventRow | None:
        wanted = set(events)
        for r in reversed(self.risk):
            if r.event in wanted:
                return copy.copy(r)
        return None

    def replace_instruments(self, instruments: Iterable[Instrument]) -> int:
        self.instruments = {i.key: i for i in instruments}
        return len(self.instruments)

    def close(self) -> None:
        pass
