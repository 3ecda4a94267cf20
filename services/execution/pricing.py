"""The pure checks of an order: its fields, its price, its bracket and its slices.

Each returns its reason (or raises ``MoneyError`` with it, for the pricing); nothing here
touches the engine's state, so a refusal is decided before the first row is built."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from libs.common.instruments import Instrument
from libs.common.messages import (
    ExecuteOrder,
    Tick,
)
from libs.common.money import MoneyError, protected_limit, to_decimal
from services.execution.model import (
    REQUEST_PURPOSES,
)

MAX_PRICE = Decimal(10_000_000)  # the decoder's cap on any price (risk checks it too)


def freeze_step(lot_size: int, freeze_qty: int) -> int:
    """The largest order size the exchange accepts under a freeze quantity: the biggest
    multiple of the lot size not above ``freeze_qty`` (one lot when the lot exceeds it)."""
    lot = max(1, lot_size)
    return max(lot, freeze_qty - freeze_qty % lot)


def printable_id(text: str) -> bool:
    """An id that can go into a bus topic and a log line: 1-64 printable ASCII characters."""
    return 0 < len(text) <= 64 and text.isascii() and text.isprintable()


def odd_price(o: Any) -> str | None:
    """A price, trigger, stop loss or target that is not finite and within the price cap."""
    for name, value in (("price", o.price), ("trigger price", o.trigger_price), ("stop loss", o.stop_loss),
                        ("target", o.target)):  # fmt: skip
        if value is not None and (not value.is_finite() or not 0 < value <= MAX_PRICE):
            return f"{name} {value} must be a finite number above 0 and at most {MAX_PRICE}"
    return None


def refusal(cmd: ExecuteOrder, side: str, purpose: str, inst: Instrument | None, qty: int, *,
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
    if not printable_id(o.strategy_id):
        return "strategy id must be 1-64 printable ASCII characters"
    odd = odd_price(o)
    if odd is not None:
        return odd
    if inst is None:
        return f"unknown instrument: {cmd.symbol or cmd.segment + '|' + cmd.token}"
    if qty <= 0:
        return "quantity must be positive"
    if qty % max(1, inst.lot_size) != 0:
        return f"quantity {qty} is not a multiple of the lot size {inst.lot_size}"
    return ""


def price_order(
    cmd: ExecuteOrder, inst: Instrument, side: str, last: Tick | None, protection_pct: float
) -> tuple[str, Decimal, Decimal | None]:
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
        if last is None or last.ltp <= 0:
            raise MoneyError(f"no last price for {inst.symbol}: refusing a market order")
        return "LIMIT", protected_limit(side, last.ltp, protection_pct, tick), None
    if otype == "LIMIT":
        return "LIMIT", on_tick("price", o.price), None
    if otype == "SL-M":
        trig = on_tick("trigger price", o.trigger_price)
        return "SL", protected_limit(side, trig, protection_pct, tick), trig
    if otype == "SL":
        trig = on_tick("trigger price", o.trigger_price)
        price = on_tick("price", o.price)
        if (side == "BUY" and trig > price) or (side == "SELL" and trig < price):
            raise MoneyError(
                f"{side} stop-limit: trigger {trig} is on the wrong side of the limit {price}"
            )
        return "SL", price, trig
    raise MoneyError(f"unknown order type {o.order_type!r}")


def bracket_reason(
    cmd: ExecuteOrder, inst: Instrument, side: str, price: Decimal, last: Tick | None
) -> str | None:
    """Why the stop loss and target do not fit the entry, or None."""
    sl, tgt = cmd.order.stop_loss, cmd.order.target
    points, pct = cmd.order.trail_points, cmd.order.trail_pct
    if points is not None or pct is not None:
        if points is not None and pct is not None:
            return "give trail_points or trail_pct, not both"
        if sl is None:
            return "a trailing stop needs a stop_loss to start from"
    stop_pct = cmd.order.stop_loss_pct
    if stop_pct is not None:
        if sl is None:
            return "stop_loss_pct needs risk's stop_loss estimate (orders reach execution through risk)"
        if side == "BUY" and not stop_pct < 100:
            return f"BUY stop_loss_pct {stop_pct} must be below 100"
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
