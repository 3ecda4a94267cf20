"""``PgOrderStore``: the durable ledger on PostgreSQL (psycopg 3, synchronous).

One connection, owned by execution's loop; autocommit off; every ``write`` is one short
transaction (rows with ``executemany``, so a batch of orders costs one commit). Migrations
in ``migrations/NNNN_*.sql`` are applied at startup under an advisory lock and tracked in
``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from libs.common.instruments import Instrument
from services.execution.model import (
    BracketRow,
    Changes,
    EventRow,
    FillRow,
    OrderQuery,
    OrderRow,
    RiskEventRow,
)
from services.execution.store import LedgerError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x4E50_4C44  # "NPLD": one migrator at a time
_UTC = dt.UTC
_json = msgspec.json.Encoder(enc_hook=str, decimal_format="string")

_ORDER_COLS = (
    "internal_id, request_id, client_tag, exchange_id, token, exchange_segment, trading_symbol, "
    "transaction_type, order_type, product, quantity, price, trigger_price, status, filled_qty, "
    "avg_price, strategy_id, parent_id, bracket_id, broker, purpose, sliced, cancel_requested, reason, "
    "raw_response, trading_day, created_at, updated_at"
)
# Constant SQL (column list and placeholders only; values are bound parameters).
_INSERT_ORDER = (
    f"INSERT INTO order_ledger ({_ORDER_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "  # noqa: S608
    "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
_UPDATE_ORDER = (
    "UPDATE order_ledger SET exchange_id = %s, quantity = %s, price = %s, trigger_price = %s, status = %s, "
    "filled_qty = %s, avg_price = %s, cancel_requested = %s, reason = %s, "
    "raw_response = COALESCE(%s::jsonb, raw_response), updated_at = %s WHERE internal_id = %s"
)
_INSERT_EVENT = (
    "INSERT INTO order_events (order_id, ts, kind, from_status, to_status, payload) "
    "VALUES (%s, %s, %s, %s, %s, %s::jsonb)"
)
_INSERT_FILL = (
    "INSERT INTO fills (trade_id, broker, trading_day, order_id, exchange_id, strategy_id, token, "
    "exchange_segment, trading_symbol, transaction_type, quantity, price, ts, raw) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb) "
    "ON CONFLICT (broker, trading_day, trade_id) DO NOTHING"
)
_UPSERT_BRACKET = (
    "INSERT INTO brackets (bracket_id, entry_id, strategy_id, token, exchange_segment, trading_symbol, "
    "transaction_type, product, stop_loss, stop_limit, target, state, entry_filled, exit_filled, reason, "
    "trading_day, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
    "%s, %s, %s, %s) ON CONFLICT (bracket_id) DO UPDATE SET state = EXCLUDED.state, "
    "stop_limit = EXCLUDED.stop_limit, entry_filled = EXCLUDED.entry_filled, "
    "exit_filled = EXCLUDED.exit_filled, reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at"
)
_INSERT_RISK = (
    "INSERT INTO risk_events (ts, trading_day, event, reason, source, request_id, data) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT (request_id) WHERE request_id <> '' DO NOTHING"
)
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
    "exit_filled, reason FROM brackets"
)


def _ts(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, _UTC)


def _ns(value: dt.datetime) -> int:
    return int(value.timestamp() * 1_000_000) * 1000


def _jsonb(value: Any) -> str | None:
    if value is None:
        return None
    return _json.encode(value).decode()


def _order_params(o: OrderRow) -> tuple[Any, ...]:
    return (
        o.order_id,
        o.request_id,
        o.client_tag,
        o.broker_order_id or None,
        o.token,
        o.segment,
        o.symbol,
        o.side,
        o.order_type,
        o.product,
        o.quantity,
        o.price,
        o.trigger_price,
        o.status,
        o.filled_qty,
        o.avg_price,
        o.strategy_id,
        o.parent_id or None,
        o.bracket_id or None,
        o.broker,
        o.purpose,
        o.sliced,
        o.cancel_requested,
        o.reason,
        _jsonb(o.raw),
        o.trading_day,
        _ts(o.created_ns),
        _ts(o.updated_ns),
    )


_MAX_ROWS = 5_000
# Fixed SQL text whatever the number of rows (arrays + unnest): parsed and prepared once.
# fmt: off
_ORDER_TYPES = [
    "uuid", "text", "text", "text", "text", "text", "text", "text", "text", "text", "int",
    "numeric", "numeric", "text", "int", "numeric", "text", "uuid", "uuid", "text", "text", "bool",
    "bool", "text", "jsonb", "date", "timestamptz", "timestamptz"
]
# fmt: on
# fmt: off
_UPDATE_TYPES = [
    "uuid", "text", "int", "numeric", "numeric", "text", "int", "numeric", "bool", "text", "jsonb",
    "timestamptz"
]
# fmt: on


def _unnest(types: list[str]) -> str:
    return "unnest(" + ", ".join(f"%s::{t}[]" for t in types) + ")"


_FAST_ORDERS = f"INSERT INTO order_ledger ({_ORDER_COLS}) SELECT * FROM {_unnest(_ORDER_TYPES)}"  # noqa: S608
_FAST_UPDATES = (
    "UPDATE order_ledger AS t SET exchange_id = v.exchange_id, quantity = v.quantity, price = v.price, "  # noqa: S608
    "trigger_price = v.trigger_price, status = v.status, filled_qty = v.filled_qty, avg_price = v.avg_price, "
    "cancel_requested = v.cancel_requested, reason = v.reason, "
    "raw_response = COALESCE(v.raw, t.raw_response), updated_at = v.updated_at "
    f"FROM {_unnest(_UPDATE_TYPES)} AS v (id, exchange_id, quantity, price, trigger_price, status, "
    "filled_qty, avg_price, cancel_requested, reason, raw, updated_at) WHERE t.internal_id = v.id"
)
_FAST_EVENTS = (
    "INSERT INTO order_events (order_id, ts, kind, from_status, to_status, payload) SELECT * FROM "
    "unnest(%s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::jsonb[])"
)
_FAST_FILLS = (
    "INSERT INTO fills (trade_id, broker, trading_day, order_id, exchange_id, strategy_id, token, "
    "exchange_segment, trading_symbol, transaction_type, quantity, price, ts, raw) SELECT * FROM "
    "unnest(%s::text[], %s::text[], %s::date[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::int[], %s::numeric[], %s::timestamptz[], %s::jsonb[]) "
    "ON CONFLICT (broker, trading_day, trade_id) DO NOTHING"
)
# fmt: off
_BRACKET_TYPES = [
    "uuid", "uuid", "text", "text", "text", "text", "text", "text", "numeric", "numeric",
    "numeric", "text", "int", "int", "text", "date", "timestamptz", "timestamptz"
]
# fmt: on
_FAST_BRACKETS = _UPSERT_BRACKET.replace(
    "VALUES (" + ", ".join(["%s"] * 18) + ")",
    "SELECT * FROM "  # noqa: S608 - constant SQL
    + _unnest(_BRACKET_TYPES),
)
_FAST_RISK = (
    "INSERT INTO risk_events (ts, trading_day, event, reason, source, request_id, data) SELECT * FROM "
    "unnest(%s::timestamptz[], %s::date[], %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[]) "
    "ON CONFLICT (request_id) WHERE request_id <> '' DO NOTHING"
)


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]


def _fast_statement(ch: Changes) -> tuple[str, list[Any]]:
    """Every change of one transaction as one SQL statement (CTEs over unnest'ed arrays);
    ('', []) when there is nothing to write or the batch is too big for one statement."""
    parts: list[str] = []
    params: list[Any] = []
    if max(len(ch.new_orders), len(ch.updated), len(ch.events), len(ch.fills)) > _MAX_ROWS:
        return "", []
    if ch.new_orders:
        parts.append(_FAST_ORDERS)
        params.extend(_columns([_order_params(o) for o in ch.new_orders]))
    if ch.updated:
        parts.append(_FAST_UPDATES)
        params.extend(
            _columns(
                [
                    (
                        o.order_id,
                        o.broker_order_id or None,
                        o.quantity,
                        o.price,
                        o.trigger_price,
                        o.status,
                        o.filled_qty,
                        o.avg_price,
                        o.cancel_requested,
                        o.reason,
                        _jsonb(o.raw),
                        _ts(o.updated_ns),
                    )
                    for o in ch.updated.values()
                ]
            )
        )
    if ch.events:
        parts.append(_FAST_EVENTS)
        params.extend(
            _columns(
                [
                    (e.order_id, _ts(e.ts_ns), e.kind, e.from_status, e.to_status, _jsonb(e.payload))
                    for e in ch.events
                ]
            )
        )
    if ch.fills:
        parts.append(_FAST_FILLS)
        params.extend(
            _columns(
                [
                    (
                        f.trade_id,
                        f.broker,
                        f.trading_day,
                        f.order_id,
                        f.broker_order_id,
                        f.strategy_id,
                        f.token,
                        f.segment,
                        f.symbol,
                        f.side,
                        f.quantity,
                        f.price,
                        _ts(f.ts_ns),
                        _jsonb(f.raw),
                    )
                    for f in ch.fills
                ]
            )
        )
    if ch.brackets:
        parts.append(_FAST_BRACKETS)
        params.extend(
            _columns(
                [
                    (
                        b.bracket_id,
                        b.entry_id,
                        b.strategy_id,
                        b.token,
                        b.segment,
                        b.symbol,
                        b.side,
                        b.product,
                        b.stop_loss,
                        b.stop_limit,
                        b.target,
                        b.state,
                        b.entry_filled,
                        b.exit_filled,
                        b.reason,
                        b.trading_day,
                        _ts(b.created_ns),
                        _ts(b.updated_ns),
                    )
                    for b in ch.brackets.values()
                ]
            )
        )
    if ch.risk_events:
        parts.append(_FAST_RISK)
        params.extend(
            _columns(
                [
                    (_ts(r.ts_ns), r.trading_day, r.event, r.reason, r.source, r.request_id, _jsonb(r.data))
                    for r in ch.risk_events
                ]
            )
        )
    if not parts:
        return "", []
    if len(parts) == 1:
        return parts[0], params
    ctes = ", ".join(f"w{i} AS ({p})" for i, p in enumerate(parts))
    return f"WITH {ctes} SELECT 1", params


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
    )


class PgOrderStore:
    """The ledger on PostgreSQL. Not thread-safe: the execution loop owns it."""

    def __init__(self, url: str, log: Any = None) -> None:
        self.url = url
        self.log = log
        self.transactions = 0
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=False, connect_timeout=5)
        except psycopg.Error as exc:
            raise LedgerError(f"cannot connect to the ledger database: {exc}") from None

    def _ensure(self) -> psycopg.Connection[Any]:
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()
        return self.conn

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
        """One transaction. The fast path sends every row of every table as ONE statement
        (data-modifying CTEs: BEGIN, statement, COMMIT — the round trips of a single-row insert).
        If a new order's request_id already exists, that statement fails as a whole and the
        careful path below redoes the transaction table by table, skipping the duplicates."""
        conn = self._ensure()
        sql, params = _fast_statement(changes)
        if sql:
            try:
                with conn.cursor(binary=True) as cur:  # binary arrays: no per-element text escaping
                    cur.execute(sql, params)
                conn.commit()
                self.transactions += 1
                return {}
            except psycopg.errors.IntegrityError:
                self._rollback()  # a duplicate: redo it carefully
            except psycopg.Error as exc:
                self._rollback()
                raise LedgerError(f"ledger write failed: {type(exc).__name__}: {exc}") from None
        return self._write_careful(conn, changes)

    def _write_careful(self, conn: psycopg.Connection[Any], changes: Changes) -> dict[str, OrderRow]:
        conflicts: dict[str, OrderRow] = {}
        try:
            with conn.cursor() as cur:
                skipped: set[str] = set()
                if changes.new_orders:
                    skipped = self._insert_orders(cur, changes.new_orders)
                    if skipped:
                        wanted = [o.request_id for o in changes.new_orders if o.order_id in skipped]
                        conflicts = self._find(cur, wanted)
                if changes.updated:
                    cur.executemany(
                        _UPDATE_ORDER,
                        [
                            (
                                o.broker_order_id or None,
                                o.quantity,
                                o.price,
                                o.trigger_price,
                                o.status,
                                o.filled_qty,
                                o.avg_price,
                                o.cancel_requested,
                                o.reason,
                                _jsonb(o.raw),
                                _ts(o.updated_ns),
                                o.order_id,
                            )
                            for oid, o in changes.updated.items()
                            if oid not in skipped
                        ],
                    )
                if changes.events:
                    cur.executemany(
                        _INSERT_EVENT,
                        [
                            (e.order_id, _ts(e.ts_ns), e.kind, e.from_status, e.to_status, _jsonb(e.payload))
                            for e in changes.events
                            if e.order_id not in skipped
                        ],
                    )
                if changes.fills:
                    cur.executemany(
                        _INSERT_FILL,
                        [
                            (
                                f.trade_id,
                                f.broker,
                                f.trading_day,
                                f.order_id,
                                f.broker_order_id,
                                f.strategy_id,
                                f.token,
                                f.segment,
                                f.symbol,
                                f.side,
                                f.quantity,
                                f.price,
                                _ts(f.ts_ns),
                                _jsonb(f.raw),
                            )
                            for f in changes.fills
                            if f.order_id not in skipped
                        ],
                    )
                brackets = [b for b in changes.brackets.values() if b.entry_id not in skipped]
                if brackets:
                    cur.executemany(
                        _UPSERT_BRACKET,
                        [
                            (
                                b.bracket_id,
                                b.entry_id,
                                b.strategy_id,
                                b.token,
                                b.segment,
                                b.symbol,
                                b.side,
                                b.product,
                                b.stop_loss,
                                b.stop_limit,
                                b.target,
                                b.state,
                                b.entry_filled,
                                b.exit_filled,
                                b.reason,
                                b.trading_day,
                                _ts(b.created_ns),
                                _ts(b.updated_ns),
                            )
                            for b in brackets
                        ],
                    )
                if changes.risk_events:
                    cur.executemany(
                        _INSERT_RISK,
                        [
                            (
                                _ts(r.ts_ns),
                                r.trading_day,
                                r.event,
                                r.reason,
                                r.source,
                                r.request_id,
                                _jsonb(r.data),
                            )
                            for r in changes.risk_events
                        ],
                    )
            conn.commit()
        except psycopg.Error as exc:
            self._rollback()
            raise LedgerError(f"ledger write failed: {type(exc).__name__}: {exc}") from None
        self.transactions += 1
        return conflicts

    def _insert_orders(self, cur: psycopg.Cursor[Any], rows: list[OrderRow]) -> set[str]:
        """Insert parents first, then rows whose parent was written; returns skipped order ids."""
        skipped: set[str] = set()
        parents = [o for o in rows if not o.parent_id]
        children = [o for o in rows if o.parent_id]
        for group in (parents, children):
            todo = []
            for o in group:
                if o.parent_id and o.parent_id in skipped:
                    skipped.add(o.order_id)
                else:
                    todo.append(o)
            if not todo:
                continue
            if len(todo) == 1:
                cur.execute(_INSERT_ORDER, _order_params(todo[0]))
                if cur.fetchone() is None:
                    skipped.add(todo[0].order_id)
                continue
            cur.executemany(_INSERT_ORDER, [_order_params(o) for o in todo], returning=True)
            inserted: set[str] = set()
            while True:
                row = cur.fetchone()
                if row is not None:
                    inserted.add(row[0])
                if not cur.nextset():
                    break
            skipped.update(o.order_id for o in todo if o.request_id not in inserted)
        return skipped

    def _rollback(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()

    # ------------------------------------------------------------------ reads
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._ensure()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall()
            conn.commit()  # end the read transaction: never sit idle in one
        except psycopg.Error as exc:
            self._rollback()
            raise LedgerError(f"ledger read failed: {type(exc).__name__}: {exc}") from None
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
        rows = self._read(_SELECT_BRACKET + " WHERE state IN ('PENDING_ENTRY', 'ACTIVE') ORDER BY created_at")
        return [_bracket_row(r) for r in rows]

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
        return [
            RiskEventRow(
                event=r[0],
                reason=r[1],
                source=r[2],
                ts_ns=_ns(r[3]),
                trading_day=r[4].isoformat(),
                data=r[5] or {},
                request_id=r[6],
            )
            for r in rows
        ]

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
        with contextlib.suppress(psycopg.Error):
            self.conn.close()
