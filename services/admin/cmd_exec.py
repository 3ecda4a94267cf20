"""``neopulse orders``, ``neopulse positions``, ``neopulse flatten`` and ``neopulse sync-master``.

Everything here asks execution (``execution_rep``). Exit codes: 0 ok, 1 refused (or a
flatten that could not close everything), 2 usage, 3 execution unreachable.
"""

from __future__ import annotations

import sys
import uuid
from decimal import Decimal
from typing import Any

import typer

from libs.common.instruments import instrument_key
from libs.common.messages import Flatten, GetOrders, GetPositions, GetStatus, KillSwitch, Reply, SyncMaster
from services.admin.cli import app
from services.admin.common import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, JSON_OPT, AdminClient, emit, fail

_STATUSES = ("PENDING_BROKER", "ACK", "OPEN", "PARTIAL", "COMPLETE", "REJECTED", "CANCELLED", "UNKNOWN")


def _dec(text: Any) -> str:
    if text in (None, ""):
        return "-"
    return f"{Decimal(str(text)):,.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, *body])


# --------------------------------------------------------------------------- orders


@app.command()
def orders(
    status: str = typer.Option("", "--status", help=f"Only this status ({', '.join(_STATUSES)})."),
    symbol: str = typer.Option("", "--symbol", help="Only this trading symbol (RELIANCE-EQ)."),
    strategy: str = typer.Option("", "--strategy", help="Only this strategy id."),
    limit: int = typer.Option(200, "--limit", min=1, max=10_000, help="At most this many, newest first."),
    as_json: bool = JSON_OPT,
) -> None:
    """List ledger orders (newest first), each with its fills."""
    if status and status.upper() not in _STATUSES:
        fail(f"--status must be one of {', '.join(_STATUSES)}", EXIT_USAGE)
    client = AdminClient()
    try:
        rows = client.ask_ok(
            "execution_rep",
            GetOrders(status=status.upper(), symbol=symbol, strategy_id=strategy, limit=limit),
        )
    finally:
        client.close()
    rows = rows or []
    if as_json:
        emit(rows, True)
        return
    if not rows:
        typer.echo("no orders")
        return
    table = [
        [
            r["order_id"][:8],
            r["strategy_id"],
            r["purpose"],
            r["side"],
            r["symbol"],
            str(r["quantity"]),
            r["order_type"],
            _dec(r["price"]),
            r["status"],
            str(r["filled_qty"]),
            _dec(r["avg_price"]),
            (r.get("reason") or "")[:60],
        ]
        for r in rows
    ]
    emit(
        rows,
        False,
        _table(
            [
                "ORDER",
                "STRATEGY",
                "PURPOSE",
                "SIDE",
                "SYMBOL",
                "QTY",
                "TYPE",
                "PRICE",
                "STATUS",
                "FILLED",
                "AVG",
                "REASON",
            ],
            table,
        ),
    )


# --------------------------------------------------------------------------- positions


def _positions(client: AdminClient, strategy: str = "") -> list[dict[str, Any]]:
    data = client.ask_ok("execution_rep", GetPositions(strategy_id=strategy))
    return list(data or [])


@app.command()
def positions(
    strategy: str = typer.Option("", "--strategy", help="Only this strategy id."),
    show_all: bool = typer.Option(False, "--all", help="Also list flat positions (closed today)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Today's positions per strategy and instrument (the sum of fills), with realised PnL."""
    client = AdminClient()
    try:
        rows = _positions(client, strategy)
    finally:
        client.close()
    if not show_all:
        rows = [r for r in rows if r.get("quantity")]
    if as_json:
        emit(rows, True)
        return
    if not rows:
        typer.echo("no open positions")
        return
    table = []
    for r in rows:
        last = r.get("last_price") or 0.0
        unreal = (
            (Decimal(str(last)) - Decimal(str(r["avg_price"]))) * r["quantity"]
            if last and r["quantity"]
            else 0
        )
        table.append(
            [
                r["strategy_id"],
                r["symbol"],
                str(r["quantity"]),
                _dec(r["avg_price"]),
                f"{last:,.2f}" if last else "-",
                _dec(r.get("realised_pnl", 0)),
                _dec(unreal),
            ]
        )
    emit(rows, False, _table(["STRATEGY", "SYMBOL", "QTY", "AVG", "LAST", "REALISED", "UNREALISED"], table))


# --------------------------------------------------------------------------- flatten


@app.command()
def flatten(
    symbol: str = typer.Argument(
        "", help="Only this instrument (symbol or segment|token); default: all.", show_default=False
    ),
    strategy: str = typer.Option("", "--strategy", help="Only this strategy's orders and positions."),
    halt: bool = typer.Option(False, "--halt", help="Trip the kill switch first (no strategy can enter "
                              "again), then flatten. Without it, running strategies may re-enter."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPT,
) -> None:
    """Cancel open orders and close positions with protected limit orders, then report.
    With --halt the kill switch goes on first; otherwise, while risk is ACTIVE, a warning says
    that running strategies may open positions again."""
    client = AdminClient()
    try:
        state = _risk_state(client)
        if not halt and state == "ACTIVE":
            typer.echo("warning: risk is ACTIVE: running strategies may enter again after this flatten; "
                       "use --halt to trip the kill switch first (or `neopulse kill-switch on`)", err=True)
        if not yes:
            if not sys.stdin.isatty():
                fail(
                    "refusing to flatten without confirmation: pass --yes (stdin is not a terminal)",
                    EXIT_USAGE,
                )
            open_pos = [p for p in _positions(client, strategy) if p.get("quantity")]
            if symbol:
                open_pos = [
                    p
                    for p in open_pos
                    if p["symbol"].upper() == symbol.upper()
                    or instrument_key(p["segment"], p["token"]) == symbol
                ]
            what = (
                ", ".join(f"{p['symbol']} {p['quantity']:+d} ({p['strategy_id']})" for p in open_pos)
                or "none"
            )
            scope = f"{symbol or 'every instrument'}" + (f" of strategy {strategy}" if strategy else "")
            first = "trip the kill switch, then " if halt else ""
            typer.confirm(f"Flatten {scope}: {first}cancel open orders and close positions [{what}]?",
                          abort=True)
        else:
            client.ask("execution_rep", GetStatus())  # unreachable → exit 3 fast, before the long wait
        if halt:
            typer.echo(_halt_first(client), err=True)
        req = Flatten(
            request_id=f"cli-flatten-{uuid.uuid4().hex[:12]}",
            symbol=symbol,
            strategy_id=strategy,
            source="cli",
        )
        # cancels are confirmed (up to 10 s) and closes answered by the broker first
        timeout = max(client.timeout_ms, 30_000)
        report = client.ask_ok("execution_rep", req, timeout_ms=timeout)
    finally:
        client.close()
    if as_json:
        emit(report, True)
    else:
        lines = [f"cancelled {report['cancelled']} open order(s)"]
        for c in report["closing"]:
            lines.append(
                f"close {c['side']} {c['quantity']} {c['symbol']} ({c['strategy_id']}) "
                f"@ limit {c['price']}: {c['status']}" + (f" — {c['reason']}" if c.get("reason") else "")
            )
        for s in report["skipped"]:
            lines.append(f"NOT closed {s['symbol']}: {s['reason']}")
        if not report["closing"] and not report["skipped"]:
            lines.append("no open positions")
        for u in report.get("unconfirmed", []):
            lines.append(
                f"NOT confirmed cancelled: {u['purpose'].lower()} {u['side']} {u['remaining']} {u['symbol']} "
                f"({u['status']}) — still working at the broker, check it"
            )
        for p in report.get("open_positions", []):
            lines.append(
                f"still open: {p['symbol']} {p['quantity']:+d} ({p['strategy_id']}) — the close is working"
            )
        emit(report, False, "\n".join(lines))
    failed = (
        report["skipped"]
        or report.get("unconfirmed")
        or any(c["status"] in ("REJECTED", "UNKNOWN") for c in report["closing"])
    )
    raise typer.Exit(EXIT_REFUSED if failed else EXIT_OK)


def _risk_state(client: AdminClient) -> str:
    """Risk's state (``ACTIVE``, ``REDUCING``, ``HALTED``), or "" when risk does not answer."""
    reply = client.ask_or_none("risk_rep", KillSwitch(query=True, source="cli"), min(client.timeout_ms, 2000))
    data = reply.data if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict) else {}
    return str(data.get("state", ""))


def _halt_first(client: AdminClient) -> str:
    """Trip the kill switch before a flatten; the line to tell the operator."""
    rid = f"cli-ks-{uuid.uuid4().hex[:12]}"
    msg = KillSwitch(on=True, reason="flatten --halt", source="cli", request_id=rid)
    reply = client.ask_or_none("risk_rep", msg)
    if reply is None:
        return ("risk is unreachable: the kill switch could not be set, but no new order can pass risk "
                "while it is down; flattening")
    if isinstance(reply, Reply) and reply.ok:
        return "kill switch ON (flatten --halt): new orders are refused; flattening"
    why = getattr(reply, "error", "") or "no reason given"
    return f"the kill switch was NOT set ({why}); flattening anyway"


# --------------------------------------------------------------------------- sync-master


@app.command("sync-master")
def sync_master(as_json: bool = JSON_OPT) -> None:
    """Download today's instrument master from Kotak (needs execution.broker=kotak)."""
    client = AdminClient()
    try:
        client.ask("execution_rep", GetStatus())  # unreachable → exit 3 fast, before the long wait
        data = client.ask_ok(
            "execution_rep",
            SyncMaster(request_id=f"cli-sync-{uuid.uuid4().hex[:12]}"),
            timeout_ms=max(client.timeout_ms, 120_000),
        )
    finally:
        client.close()
    emit(
        data,
        as_json,
        f"instrument master synced: {data.get('instruments', 0)} instruments from "
        f"{len(data.get('files', []))} file(s)",
    )
