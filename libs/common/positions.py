"""Net positions by the average-cost method: one model for execution, risk, strategies and backtests.

A position is one strategy's net quantity in one instrument (signed: + long, - short), built
from its fills:

- a fill that opens or adds re-averages: ``avg = (avg x |held| + price x qty) / (|held| + qty)``;
- a fill that reduces realises ``(price - avg) x closed x direction`` and keeps the average;
- a fill that goes through zero realises the part that closes and opens the rest at its price;
- a flat position has an average of 0.

``PositionState`` keeps the money in ``Decimal``: execution's ledger and messages, and risk.
``FloatPositionState`` runs the same code on floats for paths that never reach the ledger (a
strategy's own view of its fills, the backtest's equity curve). Every branch depends on the
integer quantities only, so the two take the same branches and their money differs only by
float rounding (``tests/unit/test_positions.py`` checks it).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Generic, TypeVar

from libs.common.messages import Position

__all__ = ["FloatPositionState", "NetPosition", "PositionState"]

_ZERO = Decimal(0)

N = TypeVar("N", Decimal, float)


class NetPosition(Generic[N]):
    """One strategy's net position in one instrument, in money of type ``N``.

    ``by_product`` is the net quantity per product (MIS / NRML / CNC), so a close goes out in
    the product it closes; ``carried`` is what the broker carried into today per product
    (already included in ``quantity``). ``last_price`` is the mark for ``unrealised``.
    """

    __slots__ = (
        "avg_price",
        "buy_qty",
        "buy_value",
        "by_product",
        "carried",
        "last_price",
        "quantity",
        "realised",
        "segment",
        "sell_qty",
        "sell_value",
        "strategy_id",
        "symbol",
        "token",
    )

    zero: N  # each concrete class sets it: the money of a flat, empty position

    def __init__(
        self,
        strategy_id: str = "",
        segment: str = "",
        token: str = "",
        symbol: str = "",
        *,
        quantity: int = 0,
        avg_price: N | None = None,
        realised: N | None = None,
        buy_qty: int = 0,
        sell_qty: int = 0,
        buy_value: N | None = None,
        sell_value: N | None = None,
        by_product: dict[str, int] | None = None,
        carried: dict[str, int] | None = None,
        last_price: float = 0.0,
    ) -> None:
        zero = self.zero
        self.strategy_id = strategy_id
        self.segment = segment
        self.token = token
        self.symbol = symbol
        self.quantity = quantity
        self.avg_price: N = zero if avg_price is None else avg_price
        self.realised: N = zero if realised is None else realised
        self.buy_qty = buy_qty
        self.sell_qty = sell_qty
        self.buy_value: N = zero if buy_value is None else buy_value
        self.sell_value: N = zero if sell_value is None else sell_value
        self.by_product: dict[str, int] = {} if by_product is None else by_product
        self.carried: dict[str, int] = {} if carried is None else carried
        self.last_price = last_price

    @property
    def key(self) -> str:
        """The instrument key, ``segment|token``."""
        return f"{self.segment}|{self.token}"

    @property
    def unrealised(self) -> float:
        """Open PnL marked at ``last_price`` (0 while flat or not marked yet)."""
        if not self.quantity or not self.last_price:
            return 0.0
        return (self.last_price - float(self.avg_price)) * self.quantity

    def apply(self, side: str, qty: int, price: N, product: str = "MIS") -> N:
        """Book a fill of ``qty`` (> 0) at ``price``; returns the PnL it realised (0 when it
        only opens or adds)."""
        signed = qty if side == "BUY" else -qty
        by_product = self.by_product
        net = by_product.get(product, 0) + signed
        if net:
            by_product[product] = net
        else:
            by_product.pop(product, None)
        value = price * qty
        if side == "BUY":
            self.buy_qty += qty
            self.buy_value += value
        else:
            self.sell_qty += qty
            self.sell_value += value
        held = self.quantity
        if held == 0 or (held > 0) == (signed > 0):
            self.avg_price = (self.avg_price * abs(held) + value) / (abs(held) + qty)
            self.quantity = held + signed
            return self.zero
        closing = min(abs(held), qty)
        direction = 1 if held > 0 else -1
        gain = (price - self.avg_price) * closing * direction
        self.realised += gain
        self.quantity = held + signed
        if self.quantity == 0:
            self.avg_price = self.zero
        elif qty > closing:  # flipped through zero: the rest opens at this price
            self.avg_price = price
        return gain

    def carry(self, product: str, qty: int, avg_price: N) -> None:
        """Set the quantity carried from earlier days in ``product`` (idempotent: a second
        report of the same carry changes nothing; today's fills stay on top of it)."""
        delta = qty - self.carried.get(product, 0)
        if not delta:
            return
        self.carried[product] = qty
        if self.quantity == 0:
            self.avg_price = avg_price
        self.quantity += delta
        net = self.by_product.get(product, 0) + delta
        if net:
            self.by_product[product] = net
        else:
            self.by_product.pop(product, None)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.strategy_id} {self.key} qty={self.quantity} "
            f"avg={self.avg_price:.2f} realised={self.realised:.2f})"
        )


class PositionState(NetPosition[Decimal]):
    """A net position with exact money: what execution writes and publishes, and risk books."""

    __slots__ = ()
    zero = _ZERO

    def message(self, last_price: float, now_ns: int) -> Position:
        return Position(
            strategy_id=self.strategy_id,
            symbol=self.symbol,
            segment=self.segment,
            token=self.token,
            quantity=self.quantity,
            avg_price=self.avg_price,
            realised_pnl=self.realised,
            buy_qty=self.buy_qty,
            sell_qty=self.sell_qty,
            buy_value=self.buy_value,
            sell_value=self.sell_value,
            last_price=last_price,
            ts_ns=now_ns,
        )


class FloatPositionState(NetPosition[float]):
    """The same position on floats, for paths that never reach the ledger (a strategy's view
    of its own fills, the backtest's equity curve)."""

    __slots__ = ()
    zero = 0.0
