"""``PgOrderStore``: the durable ledger on PostgreSQL (psycopg 3, synchronous).

One connection, owned by execution's loop; autocommit off; every ``write`` is one short
transaction (rows with ``executemany``, so a batch of orders costs one commit). Migrations
in ``migrations/NNNN_*.sql`` are applied at startup under an advisory lock and tracked in
``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from libs.common.instruments import Instrument
from services.execution.model import (
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
from services.execution.store import CARRIED_STRATEGY, LedgerDataError, LedgerError, carried_net

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x4E50_4C44  # "NPLD": one migrator at a time
_UTC = dt.UTC
_json = msgspec.json.Encoder(enc_hook=str, decimal_format="string")

_SELECT_ORDER = (
    "SELECT internal_id, request_id, client_tag, exchange_id, token, exchange_segment, trading_symbol, "
    "transaction_type, order_type, product, quantity, price, trigger_price, status, filled_qty, avg_price, "
    "strategy_id, parent_id, bracket_id, broker, purpose, sliced, cancel_requested, reason, trading_day, "
    "created_at, updated_at FROM order_ledger"
)
_SELECT_FILL = (
    "SELECT trade_id, order_id, exchange_id, strategy_id, exchange_segment, token, trading_symbol, "
    "transaction_type, quantity, price, ts, trading_day, broker FROM fills"
)
_SELECT_BRACKET = (
    "SELECT bracket_id, entry_id, strategy_id, exchange_segment, token, trading_symbol, transaction_type, "
    "product, stop_loss, target, state, trading_day, created_at, updated_at, stop_limit, entry_filled, "
    "exit_filled, reason, trail_points, trail_pct, trail_best, to_cost, stop_pct FROM brackets"
)


def _ts(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, _UTC)


def _ns(value: dt.datetime) -> int:
    return int(value.timestamp() * 1_000_000) * 1000


def _nul_free(text: str) -> str:
    """PostgreSQL stores no NUL character, in ``text`` nor in ``jsonb`` (``\\u0000``): a broker
    reply or a reason that carries one is kept with U+FFFD in its place instead of failing the
    whole transaction."""
    return text.replace("\\u0000", "\\ufffd") if "\\u0000" in text else text


def _jsonb(value: Any) -> str | None:
    if value is None:
        return None
    return _nul_free(_json.encode(value).decode())


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _ledger_error(what: str, exc: psycopg.Error) -> LedgerError:
    """A data error (the rows themselves are refused) can never succeed on a retry; anything
    else (connection, server restart, lock) may."""
    kind = LedgerDataError if isinstance(exc, psycopg.DataError | psycopg.IntegrityError) else LedgerError
    return kind(f"{what}: {type(exc).__name__}: {exc}")


# The hot path, one new order and its PENDING event, as one short statement (parsed and prepared
# once by psycopg): a duplicate request_id inserts nothing and returns no row.
_ORDER_COLS = (
    "internal_id, request_id, client_tag, exchange_id, token, exchange_segment, trading_symbol, "
    "transaction_type, order_type, product, quantity, price, trigger_price, status, filled_qty, avg_price, "
    "strategy_id, parent_id, bracket_id, broker, purpose, sliced, cancel_requested, reason, raw_response, "
    "trading_day, created_at, updated_at"
)
_PENDING_ONE = (
    f"WITH o AS (INSERT INTO order_ledger ({_ORDER_COLS}) VALUES ("  # noqa: S608 - constant SQL
    + ", ".join(["%s"] * 24)
    + ", %s::jsonb, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING RETURNING internal_id) "
    "INSERT INTO order_events (order_id, ts, kind, from_status, to_status, payload) "
    "SELECT internal_id, %s, %s, %s, %s, %s::jsonb FROM o RETURNING order_id"
)
_SELECT_BASKET = (
    "SELECT basket_id, request_id, strategy_id, legs, closes, state, rollback, reason, trading_day, "
    "created_at, updated_at FROM baskets"
)
_BASKET_UPSERT = (
    "INSERT INTO baskets (basket_id, request_id, strategy_id, legs, closes, state, rollback, reason, "
    "trading_day, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s::uuid[], %s::uuid[], %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (basket_id) DO UPDATE SET closes = EXCLUDED.closes, state = EXCLUDED.state, "
    "reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at"
)
_WRITE = "SELECT np_ledger_write(%s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb)"


def _single_pending(ch: Changes) -> bool:
    """One new top-level order and its one event, nothing else: the latency-critical write."""
    return (len(ch.new_orders) == 1 and len(ch.events) == 1 and not ch.new_orders[0].parent_id
            and ch.events[0].order_id == ch.new_orders[0].order_id and not ch.updated and not ch.fills
            and not ch.brackets and not ch.risk_events and not ch.baskets)  # fmt: skip


def _order_params(o: OrderRow) -> tuple[Any, ...]:
    return (
        o.order_id, o.request_id, o.client_tag, o.broker_order_id or None, o.token, o.segment, o.symbol,
        o.side, o.order_type, o.product, o.quantity, o.price, o.trigger_price, o.status, o.filled_qty,
        o.avg_price, o.strategy_id, o.parent_id or None, o.bracket_id or None, o.broker, o.purpose,
        o.sliced, o.cancel_requested, _text(o.reason), _jsonb(o.raw), o.trading_day, _ts(o.created_ns),
        _ts(o.updated_ns),
    )  # fmt: skip


def _json_rows(rows: list[dict[str, Any]]) -> str | None:
    return _nul_free(_json.encode(rows).decode()) if rows else None


def _write_args(ch: Changes) -> list[str | None]:
    """The seven JSON arrays ``np_ledger_write`` takes (migrations/0002_ledger_write.sql)."""
    orders = [{
        "internal_id": o.order_id, "request_id": o.request_id, "client_tag": o.client_tag,
        "exchange_id": o.broker_order_id or None, "token": o.token, "exchange_segment": o.segment,
        "trading_symbol": o.symbol, "transaction_type": o.side, "order_type": o.order_type,
        "product": o.product, "quantity": o.quantity, "price": o.price, "trigger_price": o.trigger_price,
        "status": o.status,
        "filled_qty": o.filled_qty, "avg_price": o.avg_price, "strategy_id": o.strategy_id,
        "parent_id": o.parent_id or None, "bracket_id": o.bracket_id or None, "broker": o.broker,
        "purpose": o.purpose, "sliced": o.sliced, "cancel_requested": o.cancel_requested, "reason": o.reason,
        "raw_response": o.raw, "trading_day": o.trading_day, "created_at": _ts(o.created_ns),
        "updated_at": _ts(o.updated_ns),
    } for o in ch.new_orders]  # fmt: skip
    parents = [r for r in orders if r["parent_id"] is None]
    children = [r for r in orders if r["parent_id"] is not None]
    updates = [{
        "internal_id": o.order_id, "exchange_id": o.broker_order_id or None, "quantity": o.quantity,
        "price": o.price, "trigger_price": o.trigger_price, "status": o.status, "filled_qty": o.filled_qty,
        "avg_price": o.avg_price, "cancel_requested": o.cancel_requested, "reason": o.reason,
        "raw_response": o.raw, "updated_at": _ts(o.updated_ns),
    } for o in ch.updated.values()]  # fmt: skip
    events = [{
        "order_id": e.order_id, "ts": _ts(e.ts_ns), "kind": e.kind, "from_status": e.from_status,
        "to_status": e.to_status, "payload": e.payload,
    } for e in ch.events]  # fmt: skip
    fills = [{
        "trade_id": f.trade_id, "broker": f.broker, "trading_day": f.trading_day, "order_id": f.order_id,
        "exchange_id": f.broker_order_id, "strategy_id": f.strategy_id, "token": f.token,
        "exchange_segment": f.segment, "trading_symbol": f.symbol, "transaction_type": f.side,
        "quantity": f.quantity, "price": f.price, "ts": _ts(f.ts_ns), "raw": f.raw,
    } for f in ch.fills]  # fmt: skip
    brackets = [{
        "bracket_id": b.bracket_id, "entry_id": b.entry_id, "strategy_id": b.strategy_id, "token": b.token,
        "exchange_segment": b.segment, "trading_symbol": b.symbol, "transaction_type": b.side,
        "product": b.product, "stop_loss": b.stop_loss, "stop_limit": b.stop_limit, "target": b.target,
        "state": b.state, "entry_filled": b.entry_filled, "exit_filled": b.exit_filled, "reason": b.reason,
        "trail_points": b.trail_points, "trail_pct": b.trail_pct, "trail_best": b.trail_best,
        "to_cost": b.to_cost, "stop_pct": b.stop_pct,
        "trading_day": b.trading_day, "created_at": _ts(b.created_ns), "updated_at": _ts(b.updated_ns),
    } for b in ch.brackets.values()]  # fmt: skip
    risk = [{
        "ts": _ts(r.ts_ns), "trading_day": r.trading_day, "event": r.event, "reason": r.reason,
        "source": r.source, "request_id": r.request_id, "data": r.data,
    } for r in ch.risk_events]  # fmt: skip
    return [_json_rows(x) for x in (parents, children, updates, events, fills, brackets, risk)]


def _order_row(r: Sequence[Any]) -> OrderRow:
    filled = r[14]
    avg = r[15]
    return OrderRow(
        order_id=str(r[0]),
        request_id=r[1],
        client_tag=r[2],
        broker_order_id=r[3] or "",
        token=r[4],
        segment=r[5],
        symbol=r[6],
        side=r[7],
        order_type=r[8],
        product=r[9],
        quantity=r[10],
        price=r[11],
        trigger_price=r[12],
        status=r[13],
        filled_qty=filled,
        avg_price=avg,
        strategy_id=r[16],
        parent_id=str(r[17]) if r[17] else "",
        bracket_id=str(r[18]) if r[18] else "",
        broker=r[19],
        purpose=r[20],
        sliced=r[21],
        cancel_requested=r[22],
        reason=r[23],
        trading_day=r[24].isoformat(),
        created_ns=_ns(r[25]),
        updated_ns=_ns(r[26]),
        filled_value=(avg * filled) if (avg is not None and filled) else Decimal(0),
    )


def _fill_row(r: Sequence[Any]) -> FillRow:
    return FillRow(
        trade_id=r[0],
        order_id=str(r[1]),
        broker_order_id=r[2],
        strategy_id=r[3],
        segment=r[4],
        token=r[5],
        symbol=r[6],
        side=r[7],
        quantity=r[8],
        price=r[9],
        ts_ns=_ns(r[10]),
        trading_day=r[11].isoformat(),
        broker=r[12],
    )


def _risk_row(r: Sequence[Any]) -> RiskEventRow:
    return RiskEventRow(
        event=r[0],
        reason=r[1],
        source=r[2],
        ts_ns=_ns(r[3]),
        trading_day=r[4].isoformat(),
        data=r[5] or {},
        request_id=r[6],
    )


def _bracket_row(r: Sequence[Any]) -> BracketRow:
    return BracketRow(
        bracket_id=str(r[0]),
        entry_id=str(r[1]),
        strategy_id=r[2],
        segment=r[3],
        token=r[4],
        symbol=r[5],
        side=r[6],
        product=r[7],
        stop_loss=r[8],
        target=r[9],
        state=r[10],
        trading_day=r[11].isoformat(),
        created_ns=_ns(r[12]),
        updated_ns=_ns(r[13]),
        stop_limit=r[14],
        entry_filled=r[15],
        exit_filled=r[16],
        reason=r[17],
        trail_points=r[18],
        trail_pct=r[19],
        trail_best=r[20],
        to_cost=r[21],
        stop_pct=r[22],
    )


def connect(url: str, timeout_s: int = 5) -> psycopg.Connection[Any]:
    """A ledger connection (autocommit off); ``LedgerError`` when the server cannot be reached."""
    try:
        return psycopg.connect(url, autocommit=False, connect_timeout=timeout_s)
    except psycopg.Error as exc:
        raise LedgerError(f"cannot connect to the ledger database: {exc}") from None


class PgOrderStore:
    """The ledger on PostgreSQL. Not thread-safe: the execution loop owns it.

    With ``reconnect=False`` (execution) a lost connection is never re-opened on the caller's
    thread, where a frozen server would block the loop for ``connect_timeout``: every call fails
    fast with ``LedgerError`` until ``adopt`` hands over a connection opened elsewhere. After
    ``arm_deadlines`` a write or read that gets no answer for that long (the server frozen, not
    gone) has its socket shut down from a watchdog thread, so the call fails instead of hanging."""

    def __init__(self, url: str, log: Any = None, *, reconnect: bool = True) -> None:
        self.url = url
        self.log = log
        self.reconnect = reconnect
        self.transactions = 0
        self.last_error = ""
        self.conn = connect(url)
        self._busy: tuple[psycopg.Connection[Any], float] | None = None  # (conn, deadline)
        self._write_s = self._read_s = 0.0
        self._closing = threading.Event()

    def arm_deadlines(self, write_s: float, read_s: float) -> None:
        """From now on a write (read) with no answer after ``write_s`` (``read_s``) fails."""
        self._write_s, self._read_s = write_s, read_s
        threading.Thread(target=self._watch, name="ledger-watchdog", daemon=True).start()

    def _connect(self) -> psycopg.Connection[Any]:
        return connect(self.url)

    def connected(self) -> bool:
        """False once the connection broke (the server went away, or a call overran its deadline).
        An idle connection is looked at without blocking: a server that was stopped or killed
        has left its FATAL message and EOF on the socket, which only a read would notice."""
        conn = self.conn
        if conn.closed or conn.broken:
            return False
        if self._busy is None and conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            try:
                poller = select.poll()
                poller.register(conn.pgconn.socket, select.POLLIN)
                if poller.poll(0):
                    conn.pgconn.consume_input()  # fails at EOF, and libpq marks the connection bad
            except (OSError, psycopg.Error) as exc:
                self.last_error = f"{type(exc).__name__}: {str(exc).strip()}"
        return not (conn.closed or conn.broken)

    def adopt(self, conn: psycopg.Connection[Any]) -> None:
        """Take over a connection opened on another thread (the old one is dropped)."""
        with contextlib.suppress(psycopg.Error):
            self.conn.close()
        self.conn = conn
        self.last_error = ""

    def drop(self, reason: str) -> None:
        """Close the connection: the server is known to be gone."""
        self.last_error = reason
        with contextlib.suppress(psycopg.Error):
            self.conn.close()

    def _ensure(self) -> psycopg.Connection[Any]:
        if self.conn.closed or self.conn.broken:
            if not self.reconnect:
                raise LedgerError(f"ledger connection lost: {self.last_error or 'connection closed'}")
            self.conn = self._connect()
        return self.conn

    def _watch(self) -> None:
        while not self._closing.wait(0.1):
            busy = self._busy
            if busy is None or time.monotonic() < busy[1]:
                continue
            conn = busy[0]
            if self._busy is not busy or conn.closed:
                continue
            with contextlib.suppress(OSError, psycopg.Error):
                fd = conn.pgconn.socket
                sock = socket.socket(fileno=os.dup(fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked call sees EOF and fails
                finally:
                    sock.close()
                if self.log is not None:
                    self.log.warning("ledger_call_timed_out")
            self._busy = None

    def _start(self, conn: psycopg.Connection[Any], deadline_s: float) -> None:
        if deadline_s:
            self._busy = (conn, time.monotonic() + deadline_s)

    def _failed(self, exc: BaseException) -> None:
        self._busy = None
        self.last_error = f"{type(exc).__name__}: {str(exc).strip()}"

    # ------------------------------------------------------------------ schema
    def migrate(self) -> list[str]:
        conn = self._ensure()
        applied: list[str] = []
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, "
                    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                cur.execute("SELECT version FROM schema_migrations")
                done = {r[0] for r in cur.fetchall()}
                for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
                    version = path.stem
                    if version in done:
                        continue
                    cur.execute(path.read_text().encode())
                    cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                    applied.append(version)
            conn.commit()
        except psycopg.Error as exc:
            conn.rollback()
            raise LedgerError(f"migration failed: {exc}") from None
        return applied

    # ------------------------------------------------------------------ writes
    def write(self, changes: Changes) -> dict[str, OrderRow]:
        """One transaction, one round trip: ``np_ledger_write`` (BEGIN, call, COMMIT). New orders
        whose ``request_id`` is already in the ledger are skipped with everything that belongs
        to them, and returned as the existing rows."""
        if not changes:
            return {}
        conn = self._ensure()
        conflicts: dict[str, OrderRow] = {}
        self._start(conn, self._write_s)
        try:
            with conn.cursor() as cur:
                if _single_pending(changes):
                    o, e = changes.new_orders[0], changes.events[0]
                    cur.execute(_PENDING_ONE, (*_order_params(o), _ts(e.ts_ns), e.kind, e.from_status,
                                               e.to_status, _jsonb(e.payload)))  # fmt: skip
                    skipped = [] if cur.fetchone() else [o.request_id]
                else:
                    cur.execute(_WRITE, _write_args(changes))
                    row = cur.fetchone()
                    skipped = list(row[0]) if row and row[0] else []
                if skipped:
                    conflicts = self._find(cur, skipped)
                if changes.baskets:  # same transaction; a repeat whose legs were skipped is not written
                    rids = {o.order_id: o.request_id for o in changes.new_orders}
                    gone = set(skipped)
                    cur.executemany(_BASKET_UPSERT, [
                        (k.basket_id, k.request_id, k.strategy_id, k.legs, k.closes, k.state, k.rollback,
                         _text(k.reason), k.trading_day, _ts(k.created_ns), _ts(k.updated_ns))
                        for k in changes.baskets.values()
                        if not (k.legs and rids.get(k.legs[0], "") in gone)
                    ])  # fmt: skip
            conn.commit()
        except psycopg.Error as exc:
            self._failed(exc)
            self._rollback()
            raise _ledger_error("ledger write failed", exc) from None
        self._busy = None
        self.transactions += 1
        return conflicts

    def _rollback(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()

    # ------------------------------------------------------------------ reads
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._ensure()
        self._start(conn, self._read_s)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall()
            conn.commit()  # end the read transaction: never sit idle in one
        except psycopg.Error as exc:
            self._failed(exc)
            self._rollback()
            raise LedgerError(f"ledger read failed: {type(exc).__name__}: {exc}") from None
        self._busy = None
        return rows

    def _find(self, cur: psycopg.Cursor[Any], request_ids: list[str]) -> dict[str, OrderRow]:
        cur.execute(_SELECT_ORDER + " WHERE request_id = ANY(%s)", (request_ids,))
        return {r[1]: _order_row(r) for r in cur.fetchall()}

    def find_by_request_ids(self, request_ids: Iterable[str]) -> dict[str, OrderRow]:
        ids = list(request_ids)
        if not ids:
            return {}
        rows = self._read(_SELECT_ORDER + " WHERE request_id = ANY(%s)", (ids,))
        return {r[1]: _order_row(r) for r in rows}

    def find_by_order_ids(
        self, order_ids: Iterable[str], *, with_children: bool = False
    ) -> dict[str, OrderRow]:
        ids = list(order_ids)
        if not ids:
            return {}
        if with_children:
            where = " WHERE internal_id = ANY(%s::uuid[]) OR parent_id = ANY(%s::uuid[])"
            rows = self._read(_SELECT_ORDER + where, (ids, ids))
        else:
            rows = self._read(_SELECT_ORDER + " WHERE internal_id = ANY(%s::uuid[])", (ids,))
        return {str(r[0]): _order_row(r) for r in rows}

    def find_brackets(self, bracket_ids: Iterable[str]) -> dict[str, BracketRow]:
        ids = list(bracket_ids)
        if not ids:
            return {}
        rows = self._read(_SELECT_BRACKET + " WHERE bracket_id = ANY(%s::uuid[])", (ids,))
        return {b.bracket_id: b for b in (_bracket_row(r) for r in rows)}

    def load_orders(self, trading_day: str) -> list[OrderRow]:
        rows = self._read(
            _SELECT_ORDER  # noqa: S608 - constant SQL
            + " WHERE trading_day = %s OR status NOT IN ('COMPLETE', 'REJECTED', 'CANCELLED') "
            "OR bracket_id IN (SELECT bracket_id FROM brackets WHERE state IN ('PENDING_ENTRY', 'ACTIVE')) "
            "ORDER BY created_at, internal_id",
            (trading_day,),
        )
        return [_order_row(r) for r in rows]

    def load_open_brackets(self) -> list[BracketRow]:
        rows = self._read(
            _SELECT_BRACKET  # noqa: S608 - constant SQL
            + " WHERE state IN ('PENDING_ENTRY', 'ACTIVE') OR bracket_id IN (SELECT bracket_id FROM "
            "order_ledger WHERE bracket_id IS NOT NULL AND status NOT IN ('COMPLETE', 'REJECTED', "
            "'CANCELLED')) ORDER BY created_at"
        )
        return [_bracket_row(r) for r in rows]

    def load_open_baskets(self, trading_day: str = "") -> list[BasketRow]:
        rows = self._read(
            _SELECT_BASKET
            + " WHERE state IN ('PLACING_LONGS', 'PLACED', 'ROLLING_BACK')"
            " OR (state = 'FAILED' AND trading_day = %s AND cardinality(closes) > 0) ORDER BY created_at",
            (trading_day or "1970-01-01",),
        )
        return [
            BasketRow(basket_id=str(r[0]), request_id=r[1], strategy_id=r[2], legs=[str(x) for x in r[3]],
                      closes=[str(x) for x in r[4]], state=r[5], rollback=r[6], reason=r[7],
                      trading_day=r[8].isoformat(), created_ns=_ns(r[9]), updated_ns=_ns(r[10]))
            for r in rows
        ]  # fmt: skip

    def load_fills(self, trading_day: str) -> list[FillRow]:
        rows = self._read(_SELECT_FILL + " WHERE trading_day = %s ORDER BY ts, id", (trading_day,))
        return [_fill_row(r) for r in rows]

    def query_orders(self, q: OrderQuery) -> list[tuple[OrderRow, list[FillRow]]]:
        where: list[str] = []
        params: list[Any] = []
        if q.status:
            where.append("status = %s")
            params.append(q.status.upper())
        if q.symbol:
            where.append("upper(trading_symbol) = %s")
            params.append(q.symbol.upper())
        if q.strategy_id:
            where.append("strategy_id = %s")
            params.append(q.strategy_id)
        if q.trading_day:
            where.append("trading_day = %s")
            params.append(q.trading_day)
        sql = _SELECT_ORDER + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, internal_id LIMIT %s"
        params.append(max(1, min(q.limit, 10_000)))
        orders = [_order_row(r) for r in self._read(sql, params)]
        fills: dict[str, list[FillRow]] = {}
        if orders:
            for r in self._read(
                _SELECT_FILL + " WHERE order_id = ANY(%s::uuid[]) ORDER BY ts, id",
                ([o.order_id for o in orders],),
            ):
                f = _fill_row(r)
                fills.setdefault(f.order_id, []).append(f)
        return [(o, fills.get(o.order_id, [])) for o in orders]

    def events_for(self, order_id: str) -> list[EventRow]:
        rows = self._read(
            "SELECT order_id, kind, from_status, to_status, ts, payload FROM order_events "
            "WHERE order_id = %s ORDER BY id",
            (order_id,),
        )
        return [
            EventRow(
                order_id=str(r[0]), kind=r[1], from_status=r[2], to_status=r[3], ts_ns=_ns(r[4]), payload=r[5]
            )
            for r in rows
        ]

    def risk_events(self, trading_day: str) -> list[RiskEventRow]:
        rows = self._read(
            "SELECT event, reason, source, ts, trading_day, data, request_id FROM risk_events "
            "WHERE trading_day = %s ORDER BY id",
            (trading_day,),
        )
        return [_risk_row(r) for r in rows]

    def entry_counts(self, trading_day: str) -> dict[tuple[str, str, str], int]:
        rows = self._read(
            "SELECT strategy_id, exchange_segment, token, count(*) FROM order_ledger WHERE trading_day = %s "
            "AND purpose = 'ENTRY' AND parent_id IS NULL AND status <> 'REJECTED' GROUP BY 1, 2, 3",
            (trading_day,),
        )
        return {(r[0], r[1], r[2]): int(r[3]) for r in rows}

    def carried_nets(self, before_day: str) -> list[CarriedNet]:
        rows = self._read(
            "SELECT f.strategy_id, f.exchange_segment, f.token, max(f.trading_symbol), o.product, "
            "sum(CASE WHEN f.transaction_type = 'BUY' THEN f.quantity ELSE -f.quantity END) AS net, "
            "sum(CASE WHEN f.transaction_type = 'BUY' THEN f.quantity * f.price END) AS buy_value, "
            "sum(CASE WHEN f.transaction_type = 'BUY' THEN f.quantity END) AS buy_qty, "
            "sum(CASE WHEN f.transaction_type = 'SELL' THEN f.quantity * f.price END) AS sell_value, "
            "sum(CASE WHEN f.transaction_type = 'SELL' THEN f.quantity END) AS sell_qty "
            "FROM fills f JOIN order_ledger o ON o.internal_id = f.order_id "
            "WHERE f.trading_day < %s AND o.product IN ('NRML', 'CNC') AND f.strategy_id <> %s "
            "GROUP BY f.strategy_id, f.exchange_segment, f.token, o.product "
            "HAVING sum(CASE WHEN f.transaction_type = 'BUY' THEN f.quantity ELSE -f.quantity END) <> 0",
            (before_day, CARRIED_STRATEGY),
        )
        return [carried_net(tuple(r[:5]), tuple(r[6:10])) for r in rows]

    def latest_risk_event(self, events: Iterable[str]) -> RiskEventRow | None:
        rows = self._read(
            "SELECT event, reason, source, ts, trading_day, data, request_id FROM risk_events "
            "WHERE event = ANY(%s) ORDER BY id DESC LIMIT 1",
            (list(events),),
        )
        return _risk_row(rows[0]) if rows else None

    def replace_instruments(self, instruments: Iterable[Instrument]) -> int:
        conn = self._ensure()
        n = 0
        try:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM instrument_master")
                with cur.copy(
                    "COPY instrument_master (exchange_segment, token, trading_symbol, name, inst_type, "
                    "lot_size, tick_size, freeze_qty, expiry, strike, option_type) FROM STDIN"
                ) as cp:
                    for i in {i.key: i for i in instruments}.values():
                        cp.write_row(
                            (
                                i.segment,
                                i.token,
                                i.symbol,
                                i.name,
                                i.inst_type,
                                i.lot_size,
                                i.tick_size,
                                i.freeze_qty,
                                i.expiry or None,
                                i.strike,
                                i.option_type,
                            )
                        )
                        n += 1
            conn.commit()
        except psycopg.Error as exc:
            self._rollback()
            raise LedgerError(f"instrument master write failed: {exc}") from None
        return n

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(psycopg.Error):
            self.conn.close()
