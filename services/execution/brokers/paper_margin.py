"""The paper account's margin: the check a real broker's risk system (RMS) makes before it
accepts an order, so that paper refuses what the account could not carry.

The model is deliberately simple and errs on the side of refusing:

* buying an option blocks its premium;
* selling an option blocks ``SHORT_OPTION_RATE`` of the strike's value (SPAN plus exposure
  margin of an index option is about 10-13 % of the underlying's value);
* a future blocks ``FUTURES_RATE`` of its value, either side;
* cash equity blocks ``MIS_RATE`` of its value intraday (MIS), all of it otherwise.

What is blocked is the margin of every open position plus that of every working order's
opening part: the part of an order that does not reduce what is already held. An order that
only reduces a position needs nothing. Realised profit and loss does not change the funds.
"""

from __future__ import annotations

from typing import Any

from libs.common.instruments import Instrument

SHORT_OPTION_RATE = 0.12
FUTURES_RATE = 0.12
MIS_RATE = 0.20
DELIVERY_RATE = 1.0
_EPS = 1e-6


def unit_margin(inst: Instrument | None, long: bool, price: float, product: str) -> float:
    """Margin blocked by one unit of a position (``long`` or short) at ``price``."""
    if inst is None:
        return price
    if inst.option_type in ("CE", "PE"):
        if long:
            return price
        strike = float(inst.strike) if inst.strike is not None and inst.strike > 0 else price
        return SHORT_OPTION_RATE * strike
    if inst.inst_type.startswith("FUT"):
        return FUTURES_RATE * price
    return (MIS_RATE if product == "MIS" else DELIVERY_RATE) * price


class Margin:
    """Funds, the margin of open positions, and the margin reserved by working orders."""

    __slots__ = ("_pos", "capital", "net", "positions", "reserved")

    def __init__(self, capital: float) -> None:
        self.capital = capital
        self.net: dict[str, list[Any]] = {}  # instrument key → [signed qty, avg price, product]
        self._pos: dict[str, float] = {}  # instrument key → margin its position blocks
        self.positions = 0.0  # sum of ``_pos``
        self.reserved = 0.0  # working orders' opening parts

    @property
    def free(self) -> float:
        return self.capital - self.positions - self.reserved

    def opening_qty(self, key: str, side: str, qty: int) -> int:
        """The part of an order of ``qty`` on ``side`` that does not reduce what is held."""
        held = self.net[key][0] if key in self.net else 0
        reducible = max(0, -held) if side == "BUY" else max(0, held)
        return max(0, qty - reducible)

    def required(
        self, inst: Instrument | None, key: str, side: str, qty: int, *, price: float, product: str
    ) -> float:
        """The margin an order of ``qty`` on ``side`` at ``price`` would block now."""
        opening = self.opening_qty(key, side, qty)
        return opening * unit_margin(inst, side == "BUY", price, product) if opening else 0.0

    def reserve(self, amount: float) -> None:
        self.reserved += amount

    def release(self, amount: float) -> None:
        self.reserved = max(0.0, self.reserved - amount)

    def trade(
        self, inst: Instrument | None, key: str, side: str, qty: int, *, price: float, product: str
    ) -> None:
        """A trade moved the position in ``key``: re-mark the margin it blocks."""
        held, avg, prod = self.net.get(key, (0, 0.0, product))
        signed = qty if side == "BUY" else -qty
        if held == 0 or (held > 0) == (signed > 0):  # opens or adds: average in
            avg = (avg * abs(held) + price * qty) / (abs(held) + qty)
            prod = product
        elif qty > abs(held):  # flips: the rest opens at this price
            avg, prod = price, product
        self.hold(inst, key, held + signed, avg, prod)

    def hold(self, inst: Instrument | None, key: str, qty: int, avg: float, product: str) -> None:
        """Set the position in ``key`` (a carried one at the day's start, or after a trade)."""
        self.positions -= self._pos.pop(key, 0.0)
        if qty == 0:
            self.net.pop(key, None)
            return
        self.net[key] = [qty, avg, product]
        blocked = abs(qty) * unit_margin(inst, qty > 0, avg, product)
        self._pos[key] = blocked
        self.positions += blocked

    def refusal(self, need: float) -> str:
        """The RMS line for an order needing ``need`` when less is free, or "" if it fits."""
        free = self.free
        if need <= 0 or need <= free + _EPS:  # what needs nothing always passes
            return ""
        return (
            f"RMS: insufficient funds: the order needs margin of {need:,.2f} and {max(free, 0.0):,.2f} "
            f"is free (paper.capital {self.capital:,.2f})"
        )
