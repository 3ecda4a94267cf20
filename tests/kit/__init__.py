"""The test kit: builders for the messages tests send (``ExecuteOrder``, ``OrderRequest``,
``Tick``, ``Fill``), the sample instrument master and a manual clock (also as fixtures, from
``tests.kit.fixtures``), and the harnesses several test modules share."""

from tests.kit.builders import (
    MASTER,
    T0,
    S,
    execute_order,
    fill,
    fill_of,
    order_request,
    order_update,
    strategy_context,
    tick,
)

__all__ = [
    "MASTER",
    "T0",
    "S",
    "execute_order",
    "fill",
    "fill_of",
    "order_request",
    "order_update",
    "strategy_context",
    "tick",
]
