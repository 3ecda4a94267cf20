"""Money helpers: Decimal prices snapped to the instrument's tick size.

Prices that reach an order, the broker or the ledger are ``Decimal``. Floats from ticks
are converted through ``str`` (never ``Decimal(float)``) so 101.15 stays 101.15.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation

ZERO = Decimal(0)
_ROUNDING = {"nearest": ROUND_HALF_UP, "down": ROUND_FLOOR, "up": ROUND_CEILING}


class MoneyError(ValueError):
    """A price that cannot be used for an order (not finite, not positive, no tick size)."""


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    """Exact decimal for a price; floats go through ``repr`` so binary noise is dropped."""
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MoneyError(f"price {value} is not a finite number")
        d = Decimal(repr(value))
    else:
        try:
            d = Decimal(value)
        except InvalidOperation:
            raise MoneyError(f"price {value!r} is not a number") from None
    if not d.is_finite():
        raise MoneyError(f"price {value} is not a finite number")
    return d


def is_on_tick(price: Decimal, tick: Decimal) -> bool:
    if tick <= 0:
        raise MoneyError("tick size unknown")
    return (price % tick) == 0


def snap(price: Decimal | float, tick: Decimal, mode: str = "nearest") -> Decimal:
    """Snap ``price`` to a multiple of ``tick``: ``nearest``, ``down`` (floor) or ``up`` (ceil).

    Refuses (``MoneyError``) when the tick size is unknown (zero or negative).
    """
    if tick is None or tick <= 0:
        raise MoneyError("tick size unknown: refusing to price the order")
    p = to_decimal(price)
    rounding = _ROUNDING[mode]
    units = (p / tick).to_integral_value(rounding=rounding)
    return (units * tick).quantize(tick)


def stop_at(side: str, price: Decimal, distance: Decimal, tick: Decimal) -> Decimal:
    """The stop of a position opened by ``side``, ``distance`` from ``price``: below it for a
    BUY (rounded down to the tick), above it for a SELL (rounded up), so never nearer than the
    distance. A BUY's may come out at 0 or below: the caller refuses it."""
    if side == "BUY":
        return snap(price - distance, tick, "down")
    return snap(price + distance, tick, "up")


def pct_stop(side: str, entry: Decimal, pct: Decimal, tick: Decimal) -> Decimal:
    """The stop loss ``pct`` percent from ``entry`` (``stop_at``)."""
    return stop_at(side, entry, entry * pct / Decimal(100), tick)


def protected_limit(side: str, last_price: Decimal | float, protection_pct: float, tick: Decimal) -> Decimal:
    """Market intent → a marketable LIMIT inside a protection band around the last price.

    BUY pays at most ``last * (1 + pct)`` (rounded down to tick, so never beyond the band);
    SELL accepts at least ``last * (1 - pct)`` (rounded up).
    """
    last = to_decimal(last_price)
    if last <= 0:
        raise MoneyError("no last price to protect a market order")
    band = to_decimal(protection_pct) / Decimal(100)
    if side == "BUY":
        return snap(last * (1 + band), tick, "down")
    return max(snap(last * (1 - band), tick, "up"), tick)
