"""``neopulse trade``, ``neopulse kill-switch on|off|status`` and ``neopulse pnl``."""

from __future__ import annotations

import sys
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

import typer

from libs.common.bus import RequestTimeout
from libs.common.messages import (
    CancelEntries,
    GetRiskState,
    KillSwitch,
    Message,
    OrderRequest,
    RecordRiskEvent,
    Reply,
    RiskEvent,
    RiskState,
    RiskVerdict,
    to_builtins,
)
from services.admin.cli import app
from services.admin.common import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    JSON_OPT,
    AdminClient,
    emit,
    fail,
    unauthorised_hint,
)

MANUAL_STRATEGY = "manual"

kill_app = typer.Typer(help="Trip (HALTED), reset or show the kill switch.", no_args_is_help=True)
app.add_typer(kill_app, name="kill-switch")


def _interactive() -> bool:
    return sys.stdin.isatty()


def _decimal(name: str, text: str | None) -> Decimal | None:
    if text is None or text == "":
        return None
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        fail(f"{name}: {text!r} is not a number", EXIT_USAGE)


def _money(value: float) -> str:
    return f"{value:,.2f}"


# --------------------------------------------------------------------------- trade


@app.command()
def trade(
    side: str = typer.Argument(None, help="BUY or SELL.", show_default=False),
    symbol: str = typer.Argument(None, help="Trading symbol (RELIANCE-EQ) or segment|token.",
                                 show_default=False),
    *,
    qty: int = typer.Option(None, "--qty", help="Quantity in shares (a multiple of the lot size).",
                            show_default=False),
    price: str = typer.Option(None, "--price", help="Limit price. Omit for market intent (execution "
                              "sends a protected limit).", show_default=False),
    sl: str = typer.Option(None, "--sl", help="Stop loss: below entry for BUY, above for SELL.",
                           show_default=False),
    target: str = typer.Option(None, "--target", help="Target: above entry for BUY, below for SELL.",
                               show_default=False),
    product: str = typer.Option("MIS", "--product", help="MIS (intraday), CNC (delivery) or NRML."),
    as_json: bool = JSON_OPT,
) -> None:
    """Send a manual order through risk, like any strategy order.

    Prints the verdict: the order id, or why it was rejected.
    With --json a rejection also carries its code (quantity, tick, halted, reducing, ...).
    Exit codes: 0 approved, 1 rejected, 2 usage error, 3 risk unreachable.
    Missing values are asked for on a terminal.
    """
    missing = [name for name, value in (("SIDE", side), ("SYMBOL", symbol), ("--qty", qty)) if value is None]
    if missing and not _interactive():
        fail(f"missing {', '.join(missing)} (no terminal to ask on); "
             "usage: neopulse trade BUY|SELL SYMBOL --qty N [--price P] [--sl S] [--target T]", EXIT_USAGE)
    if side is None:
        side = typer.prompt("Side (BUY/SELL)")
    if symbol is None:
        symbol = typer.prompt("Symbol")
    if qty is None:
        qty = typer.prompt("Quantity", type=int)
    side = side.strip().upper()
    if side not in ("BUY", "SELL"):
        fail(f"side must be BUY or SELL, got {side!r}", EXIT_USAGE)
    product = product.strip().upper()
    if product not in ("MIS", "CNC", "NRML"):
        fail(f"--product must be MIS, CNC or NRML, got {product!r}", EXIT_USAGE)
    req = OrderRequest(
        request_id=f"cli-{uuid.uuid4().hex[:16]}", strategy_id=MANUAL_STRATEGY, side=side,
        symbol=symbol.strip(), quantity=qty, price=_decimal("--price", price),
        stop_loss=_decimal("--sl", sl), target=_decimal("--target", target), product=product,
        purpose="MANUAL",
    )
    admin = AdminClient()
    try:
        # Risk answers an approval only after execution committed the order (two attempts).
        reply = admin.ask("risk_rep", req, timeout_ms=2 * admin.timeout_ms + 1000)
    finally:
        admin.close()
    if not isinstance(reply, RiskVerdict):
        error = reply.error if isinstance(reply, Reply) else type(reply).__name__
        fail(f"refused: {error}", EXIT_REFUSED)
    what = f"{side} {qty} {req.symbol} @ {price if price is not None else 'market'} ({product})"
    extras = "".join(f" {k} {v}" for k, v in (("SL", sl), ("target", target)) if v is not None)
    if as_json:
        emit({**to_builtins(reply), "symbol": req.symbol, "side": side, "price": price,
              "stop_loss": sl, "target": target, "product": product}, True)
    elif reply.approved:
        typer.echo(f"APPROVED  {what}{extras} — order {reply.order_id} (quantity {reply.quantity}, "
                   f"risk {reply.state})")
    else:
        typer.echo(f"REJECTED  {what}{extras} — {reply.reason}")
    raise typer.Exit(EXIT_OK if reply.approved else EXIT_REFUSED)


# --------------------------------------------------------------------------- kill switch


def _ask_or_none(admin: AdminClient, endpoint_name: str, msg: Message) -> Message | None:
    client = admin.open_client(endpoint_name, msg)
    try:
        return client.request(msg)
    except RequestTimeout:
        return None
    finally:
        client.close()


def _describe(data: dict[str, Any]) -> str:
    state = data.get("state", "?")
    if data.get("kill_switch"):
        line = f"kill switch ON ({data.get('reason') or 'no reason given'}) — risk {state}"
    else:
        line = f"kill switch off — risk {state}"
        if state == "REDUCING":
            line += f" ({data.get('reason') or 'daily loss limit breached'})"
    line += f"; net PnL {_money(float(data.get('net_pnl', 0.0)))}"
    if data.get("day_loaded") is False:
        line += " (risk is still loading the day from execution)"
    return line


@kill_app.command("on")
def kill_on(
    reason: str = typer.Option(None, "--reason", help="Why, for the record and the alerts.",
                               show_default=False),
    as_json: bool = JSON_OPT,
) -> None:
    """Trip the kill switch: risk HALTS every order and execution cancels open entry orders."""
    if reason is None:
        # Never refuse an emergency stop for want of a reason: ask on a terminal, else default.
        reason = typer.prompt("Reason", default="manual kill switch") if _interactive() else ""
    reason = reason.strip() or "manual kill switch (no reason given)"
    request_id = f"cli-ks-{uuid.uuid4().hex[:12]}"
    admin = AdminClient()
    try:
        reply = _ask_or_none(admin, "risk_rep", KillSwitch(on=True, reason=reason, source="cli",
                                                            request_id=request_id))
        if reply is None:
            _kill_via_execution(admin, reason, request_id)
    finally:
        admin.close()
    _print_state_reply(reply, as_json)


def _kill_via_execution(admin: AdminClient, reason: str, request_id: str) -> None:
    """Risk is down: have execution record the switch (risk restarts HALTED) and cancel entries."""
    risk_ep = admin.cfg.bus.endpoint("risk_rep")
    record = RecordRiskEvent(event=RiskEvent.KILL_SWITCH_ON, reason=reason, source="cli",
                             request_id=request_id, data={"kill_switch": True, "risk_state": "HALTED"})
    recorded = _ask_or_none(admin, "execution_rep", record)
    cancelled = _ask_or_none(admin, "execution_rep", CancelEntries(request_id=f"{request_id}-cancel",
                                                                   reason=f"kill switch: {reason}"))
    if isinstance(recorded, Reply) and recorded.ok:
        note = "open entry orders cancelled" if isinstance(cancelled, Reply) and cancelled.ok else \
            "cancelling open entries FAILED"
        fail(f"risk is unreachable at {risk_ep}; the kill switch was recorded with execution "
             f"({note}) and risk will start HALTED", EXIT_UNREACHABLE)
    fail(f"risk is unreachable at {risk_ep} and execution did not record the kill switch "
         f"({getattr(recorded, 'error', '') or 'no reply'}{unauthorised_hint(recorded)}) "
         f"— stop the stack to be safe", EXIT_UNREACHABLE)


@kill_app.command("off")
def kill_off(as_json: bool = JSON_OPT) -> None:
    """Reset the kill switch: risk returns to ACTIVE (REDUCING while the daily loss is breached)."""
    admin = AdminClient()
    try:
        msg = KillSwitch(on=False, source="cli", request_id=f"cli-ks-{uuid.uuid4().hex[:12]}")
        reply = admin.ask("risk_rep", msg)
    finally:
        admin.close()
    _print_state_reply(reply, as_json)


@kill_app.command("status")
def kill_status(as_json: bool = JSON_OPT) -> None:
    """Show the kill switch and the risk state."""
    admin = AdminClient()
    try:
        reply = admin.ask("risk_rep", KillSwitch(query=True, source="cli"))
    finally:
        admin.close()
    _print_state_reply(reply, as_json)


def _print_state_reply(reply: Message | None, as_json: bool) -> None:
    if not isinstance(reply, Reply):
        fail(f"refused: unexpected answer {type(reply).__name__}", EXIT_REFUSED)
    if not reply.ok:
        fail(f"refused: {reply.error}", EXIT_REFUSED)
    data = reply.data if isinstance(reply.data, dict) else {}
    emit(data, as_json, _describe(data))


# --------------------------------------------------------------------------- pnl


@app.command()
def pnl(as_json: bool = JSON_OPT) -> None:
    """The day's PnL as risk sees it: gross, cost (turnover x cost rate), net, turnover, state."""
    admin = AdminClient()
    try:
        reply = admin.ask("risk_rep", GetRiskState())
    finally:
        admin.close()
    if not isinstance(reply, RiskState):
        fail(f"refused: {getattr(reply, 'error', '') or type(reply).__name__}", EXIT_REFUSED)
    if as_json:
        emit(reply, True)
        return
    rows = [
        ("state", reply.state + (f" ({reply.reason})" if reply.reason else "")),
        ("gross", _money(reply.gross_pnl)),
        ("  realised", _money(reply.realised_pnl)),
        ("  unrealised", _money(reply.unrealised_pnl)),
        ("cost", _money(reply.cost)),
        ("net", _money(reply.net_pnl)),
        ("turnover", _money(reply.turnover)),
        ("max daily loss", _money(reply.max_daily_loss)),
        ("open positions", str(reply.open_positions)),
    ]
    width = max(len(k) for k, _ in rows)
    emit(reply, False, "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
