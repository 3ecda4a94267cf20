"""``neopulse trade``, ``neopulse kill-switch on|off|status`` and ``neopulse pnl``."""

from __future__ import annotations

import datetime as dt
import sys
import uuid
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import typer

from libs.common.chain import find_option
from libs.common.clock import IST, Clock
from libs.common.config import home_dir
from libs.common.instruments import MasterData, UnknownInstrument
from libs.common.messages import (
    BASKET_MAX_LEGS,
    BASKET_MIN_LEGS,
    MAX_QTY,
    BasketRequest,
    BasketVerdict,
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


def _trail(text: str | None, sl: str | None) -> tuple[Decimal | None, Decimal | None]:
    """``--trail 5`` → (5 rupees, None); ``--trail 1.5%`` → (None, 1.5 percent)."""
    if text is None:
        return None, None
    if sl is None:
        fail("--trail needs --sl: the stop it starts from", EXIT_USAGE)
    raw = text.strip()
    pct = raw.endswith("%")
    distance = _decimal("--trail", raw[:-1] if pct else raw)
    if distance is None or not distance.is_finite() or distance <= 0 or (pct and distance > 50):
        fail(f"--trail {text!r} must be a distance above 0 (rupees, or a percent up to 50%)", EXIT_USAGE)
    return (None, distance) if pct else (distance, None)

LEG_OPT = typer.Option(None, "--leg", help=(
    'A basket leg (repeat 2 to 4 times): "SIDE UNDERLYING STRIKE CE|PE EXPIRY QTY [@PRICE]" '
    '(EXPIRY weekly, next-weekly, monthly or YYYY-MM-DD), or "SIDE SYMBOL QTY [@PRICE]". '
    "The legs are judged and placed as one: long legs first, short legs once every long "
    "is accepted; if a leg fails the others are rolled back."), show_default=False)



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
    trail: str = typer.Option(None, "--trail", show_default=False, help=(
        "Trailing stop (needs --sl): the stop follows the best price since entry at this distance "
        "in rupees, or in percent with a % sign (--trail 5, --trail 1.5%); it only ever tightens.")),
    product: str = typer.Option("MIS", "--product", help="MIS (intraday), CNC (delivery) or NRML."),
    leg: list[str] | None = LEG_OPT,
    sl_pct: str = typer.Option(None, "--sl-pct", help="Basket legs: a stop loss this many percent "
                               "beyond each leg's price (its own bracket); needs @PRICE on every leg.",
                               show_default=False),
    as_json: bool = JSON_OPT,
) -> None:
    """Send a manual order through risk, like any strategy order; or, with --leg, a basket.

    Prints the verdict: the order id, or why it was rejected; for a basket one line per leg.
    With --json a rejection also carries its code (quantity, tick, halted, reducing, ...).
    Exit codes: 0 approved, 1 rejected, 2 usage error, 3 risk unreachable.
    Missing values are asked for on a terminal.
    """
    if leg:
        if side is not None or symbol is not None or qty is not None or price is not None:
            fail("--leg cannot be combined with SIDE SYMBOL --qty --price: put each order in a --leg",
                 EXIT_USAGE)
        _trade_basket(leg, product, _decimal("--sl-pct", sl_pct), as_json)
        return
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
    if qty > MAX_QTY:  # it could not even be sent
        fail(f"--qty {qty} is more than {MAX_QTY:,} (the most one order carries)", EXIT_USAGE)
    product = product.strip().upper()
    if product not in ("MIS", "CNC", "NRML"):
        fail(f"--product must be MIS, CNC or NRML, got {product!r}", EXIT_USAGE)
    trail_points, trail_pct = _trail(trail, sl)
    req = OrderRequest(
        request_id=f"cli-{uuid.uuid4().hex[:16]}", strategy_id=MANUAL_STRATEGY, side=side,
        symbol=symbol.strip(), quantity=qty, price=_decimal("--price", price),
        stop_loss=_decimal("--sl", sl), target=_decimal("--target", target), product=product,
        trail_points=trail_points, trail_pct=trail_pct, purpose="MANUAL",
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
    extras = "".join(f" {k} {v}" for k, v in (("SL", sl), ("target", target), ("trail", trail))
                     if v is not None)
    if as_json:
        emit({**to_builtins(reply), "symbol": req.symbol, "side": side, "price": price,
              "stop_loss": sl, "target": target, "trail": trail, "product": product}, True)
    elif reply.approved:
        typer.echo(f"APPROVED  {what}{extras} — order {reply.order_id} (quantity {reply.quantity}, "
                   f"risk {reply.state})")
    else:
        typer.echo(f"REJECTED  {what}{extras} — {reply.reason}")
    raise typer.Exit(EXIT_OK if reply.approved else EXIT_REFUSED)


# --------------------------------------------------------------------------- basket


class LegError(ValueError):
    """A ``--leg`` the CLI cannot read or resolve; the text says which and why."""


def parse_leg(text: str, master: MasterData, today: dt.date, product: str = "MIS",
              sl_pct: Decimal | None = None) -> OrderRequest:
    """One ``--leg``: ``SIDE UNDERLYING STRIKE CE|PE EXPIRY QTY [@PRICE]`` (the option is
    found in the master's chain) or ``SIDE SYMBOL QTY [@PRICE]``. The request id and the
    strategy id are the basket's (risk sets them)."""
    words = text.replace("@ ", "@").split()
    price: Decimal | None = None
    if words and words[-1].startswith("@"):
        try:
            price = Decimal(words.pop()[1:])
        except InvalidOperation:
            raise LegError(f"leg {text!r}: the price after @ is not a number") from None
        if not price.is_finite() or price <= 0:
            raise LegError(f"leg {text!r}: the price must be above 0")
    if len(words) not in (3, 6):
        raise LegError(f"leg {text!r}: expected \"SIDE UNDERLYING STRIKE CE|PE EXPIRY QTY [@PRICE]\" "
                       f"or \"SIDE SYMBOL QTY [@PRICE]\"")
    side = words[0].upper()
    if side not in ("BUY", "SELL"):
        raise LegError(f"leg {text!r}: side must be BUY or SELL, not {words[0]!r}")
    try:
        qty = int(words[-1])
    except ValueError:
        raise LegError(f"leg {text!r}: quantity {words[-1]!r} is not a whole number") from None
    if qty <= 0:
        raise LegError(f"leg {text!r}: quantity must be above 0")
    if qty > MAX_QTY:  # it could not even be sent: a request carries at most MAX_QTY
        raise LegError(f"leg {text!r}: quantity {qty} is more than {MAX_QTY:,} (the most one order carries)")
    if len(words) == 6 and words[3].upper() not in ("CE", "PE"):
        raise LegError(f"leg {text!r}: option type must be CE or PE, not {words[3]!r}")
    try:
        if len(words) == 6:
            underlying, strike, option_type, expiry = words[1].upper(), words[2], words[3].upper(), words[4]
            try:
                spec: str | dt.date = dt.date.fromisoformat(expiry)
            except ValueError:
                spec = expiry.lower()
            inst = find_option(master, underlying, strike, option_type, spec, today)
        else:
            inst = master.resolve(words[1])
    except UnknownInstrument as exc:
        raise LegError(f"leg {text!r}: {exc}") from None
    except (ValueError, InvalidOperation) as exc:
        raise LegError(f"leg {text!r}: {exc}") from None
    stop = None
    if sl_pct is not None:
        if price is None:
            raise LegError(f"leg {text!r}: --sl-pct needs a price (@PRICE) on every leg")
        away = price * sl_pct / 100
        tick = inst.tick_size
        raw = price - away if side == "BUY" else price + away
        stop = (raw / tick).to_integral_value(ROUND_FLOOR if side == "BUY" else ROUND_CEILING) * tick
    return OrderRequest(request_id="leg", strategy_id=MANUAL_STRATEGY, side=side, symbol=inst.symbol,
                        segment=inst.segment, token=inst.token, quantity=qty, price=price,
                        order_type="LIMIT" if price is not None else "MARKET", stop_loss=stop,
                        product=product, purpose="MANUAL")  # fmt: skip


def _trade_basket(texts: list[str], product: str, sl_pct: Decimal | None, as_json: bool) -> None:
    product = product.strip().upper()
    if product not in ("MIS", "CNC", "NRML"):
        fail(f"--product must be MIS, CNC or NRML, got {product!r}", EXIT_USAGE)
    if not BASKET_MIN_LEGS <= len(texts) <= BASKET_MAX_LEGS:
        fail(f"a basket has {BASKET_MIN_LEGS} to {BASKET_MAX_LEGS} --leg options, not {len(texts)}",
             EXIT_USAGE)
    if sl_pct is not None and not (sl_pct.is_finite() and 0 < sl_pct < 100):
        fail(f"--sl-pct must be above 0 and below 100, got {sl_pct}", EXIT_USAGE)
    master = MasterData.load_for_home(home_dir())
    now = Clock().now(IST)  # a time, not a date: after 15:30 on an expiry day "weekly" is the next
    try:
        legs = [parse_leg(t, master, now, product, sl_pct) for t in texts]
    except LegError as exc:
        fail(str(exc), EXIT_USAGE)
    req = BasketRequest(request_id=f"cli-{uuid.uuid4().hex[:16]}", strategy_id=MANUAL_STRATEGY, legs=legs)
    admin = AdminClient()
    try:
        reply = admin.ask("risk_rep", req, timeout_ms=2 * admin.timeout_ms + 1000)
    finally:
        admin.close()
    if not isinstance(reply, BasketVerdict):
        error = reply.error if isinstance(reply, Reply) else type(reply).__name__
        fail(f"refused: {error}", EXIT_REFUSED)
    if as_json:
        emit({**to_builtins(reply), "legs_sent": [to_builtins(x) for x in legs]}, True)
    else:
        head = "APPROVED" if reply.approved else "REJECTED"
        basket_id = f" — {reply.basket_id}" if reply.basket_id else ""
        typer.echo(f"{head}  basket of {len(legs)} legs{basket_id}"
                   + ("" if reply.approved else f" — {reply.reason}"))
        verdicts: list[RiskVerdict | None] = [*reply.legs] or [None] * len(legs)
        for n, (x, v) in enumerate(zip(legs, verdicts, strict=False), 1):
            what = f"{x.side} {x.quantity} {x.symbol} @ {x.price if x.price is not None else 'market'}"
            if x.stop_loss is not None:
                what += f" SL {x.stop_loss}"
            if v is None:
                typer.echo(f"  leg {n}  {what}")
            elif v.approved:
                typer.echo(f"  leg {n}  ok        {what} — order {v.order_id or '(not placed)'}")
            else:
                typer.echo(f"  leg {n}  REJECTED  {what} — {v.reason}")
    raise typer.Exit(EXIT_OK if reply.approved else EXIT_REFUSED)


# --------------------------------------------------------------------------- kill switch


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
        reply = admin.ask_or_none("risk_rep", KillSwitch(on=True, reason=reason, source="cli",
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
    recorded = admin.ask_or_none("execution_rep", record)
    cancelled = admin.ask_or_none("execution_rep", CancelEntries(request_id=f"{request_id}-cancel",
                                                                   reason=f"kill switch: {reason}"))
    if isinstance(recorded, Reply) and recorded.ok:
        note = "open entry orders cancelled" if isinstance(cancelled, Reply) and cancelled.ok else \
            "cancelling open entries FAILED"
        not_sent = cancelled.data.get("not_sent") if isinstance(cancelled, Reply) and isinstance(
            cancelled.data, dict) else None
        if not_sent:  # the broker refuses order calls from this IP: requested, not sent
            note = f"open entry orders NOT cancelled at the broker yet — {not_sent}"
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
