"""Trailing stops, the arithmetic (pure): where a bracket's stop goes as the price moves.

A long position (the entry was a BUY) keeps its stop ``distance`` below the highest price
since the entry filled; a short one (a SELL entry, such as a sold option) ``distance`` above
the lowest. The distance is ``trail_points`` rupees, or ``trail_pct`` percent of that best
price. The stop is snapped to the tick away from the price (never nearer than the distance)
and only ever tightens: a price moving against the position leaves it where it is."""

from __future__ import annotations

from decimal import Decimal

from libs.common.money import stop_at

_HUNDRED = Decimal(100)


def improves(side: str, price: Decimal, best: Decimal | None) -> bool:
    """Is ``price`` a new best for a position opened by ``side``?"""
    if best is None:
        return True
    return price > best if side == "BUY" else price < best


def trailed_stop(side: str, best: Decimal, points: Decimal | None, pct: Decimal | None,
                 tick: Decimal) -> Decimal | None:
    """The stop ``points`` (or ``pct``) away from ``best``, on the tick; None when that is
    no price (a trail wider than a long position's best price)."""
    distance = points if points is not None else best * (pct or Decimal(0)) / _HUNDRED
    stop = stop_at(side, best, distance, tick)
    return stop if stop > 0 else None


def tighter(side: str, new: Decimal, old: Decimal | None) -> bool:
    """Is ``new`` a stop at least a tick tighter than ``old`` (both on the tick)?"""
    if old is None:
        return True
    return new > old if side == "BUY" else new < old
