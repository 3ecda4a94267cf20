"""Builders with the defaults most tests want; a test names only what it is about.

Instruments are named by trading symbol and resolved in the repository's sample master
(``RELIANCE-EQ`` nse_cm|2885, tick 0.10; ``INFY-EQ`` nse_cm|1594). Index derivatives are
generated for the trading day (``libs.common.contracts``), so their symbols change with the
date: take them from ``front_future("NIFTY")`` (``NIFTY_FUT``: lot 65, tick 0.10, freeze
1,800), never spelled out."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from libs.common.instruments import Instrument, MasterData
from libs.common.messages import ExecuteOrder, Fill, OrderRequest, OrderUpdate, Tick

MASTER = MasterData.load()


def front_future(underlying: str = "NIFTY", master: MasterData = MASTER) -> Instrument:
    """The nearest-expiry future of an index in ``master`` (the paper master's are generated
    for today, so the symbol changes every month)."""
    futures = [i for i in master if i.underlying == underlying and i.inst_type == "FUTIDX"]
    return min(futures, key=lambda i: (i.expiry is None, i.expiry))


NIFTY_FUT = front_future("NIFTY")
S = 1_000_000_000
T0 = 1_704_167_100 * S  # Tue 2 Jan 2024 09:15 IST, the market open

_request_ids = itertools.count(1)
_fill_ids = itertools.count(1)


def _inst(instrument: str | Instrument) -> Instrument:
    return instrument if isinstance(instrument, Instrument) else MASTER.resolve(instrument)


def _money(value: str | Decimal | float | None) -> Decimal | None:
    return None if value is None or value == "" else Decimal(str(value))


def order_request(
    instrument: str | Instrument = "RELIANCE-EQ",
    side: str = "BUY",
    qty: int = 10,
    price: str | Decimal | None = None,
    *,
    order_type: str | None = None,
    strategy: str = "s1",
    rid: str | None = None,
    **kw: Any,
) -> OrderRequest:
    """An ``OrderRequest`` for ``instrument`` (a trading symbol or an ``Instrument``):
    LIMIT at ``price``, or MARKET without one (``order_type`` overrides); ``rid`` defaults
    to a fresh ``r<n>``."""
    inst = _inst(instrument)
    return OrderRequest(
        request_id=rid or f"r{next(_request_ids)}",
        strategy_id=strategy,
        side=side,
        quantity=qty,
        symbol=inst.symbol,
        segment=inst.segment,
        token=inst.token,
        price=_money(price),
        order_type=order_type or ("LIMIT" if price else "MARKET"),
        **kw,
    )


def execute_order(*args: Any, expires_ns: int = 0, **kw: Any) -> ExecuteOrder:
    """What risk sends execution for an approved ``order_request(*args, **kw)``."""
    req = order_request(*args, **kw)
    return ExecuteOrder(
        request_id=req.request_id, order=req, quantity=req.quantity, segment=req.segment, token=req.token,
        symbol=req.symbol, expires_ns=expires_ns,
    )  # fmt: skip


def tick(
    instrument: str | Instrument = "RELIANCE-EQ", ltp: float = 1290.0, ts: int | None = None, **kw: Any
) -> Tick:
    """A ``Tick`` of ``instrument`` at ``ltp``; ``ts`` sets both exchange and local time."""
    inst = _inst(instrument)
    if ts is not None:
        kw.setdefault("exch_ts_ns", ts)
        kw.setdefault("ts_ns", ts)
    return Tick(segment=inst.segment, token=inst.token, ltp=ltp, **kw)


def fill(
    instrument: str | Instrument = "RELIANCE-EQ",
    side: str = "BUY",
    qty: int = 10,
    price: str | Decimal | float = "1290.50",
    *,
    strategy: str = "s1",
    order_id: str = "o1",
    fill_id: str | None = None,
    **kw: Any,
) -> Fill:
    """A ``Fill`` of ``qty`` at ``price``; ``fill_id`` defaults to a fresh ``f<n>``."""
    inst = _inst(instrument)
    return Fill(
        fill_id=fill_id or f"f{next(_fill_ids)}", order_id=order_id, strategy_id=strategy,
        symbol=inst.symbol, segment=inst.segment, token=inst.token, side=side, quantity=qty,
        price=Decimal(str(price)), **kw,
    )  # fmt: skip


def strategy_context(strategy_id: str, instruments: list[str], clock: Any = None, **kw: Any) -> Any:
    """A ``StrategyContext`` on the sample master and a manual clock at ``T0``, with
    deterministic request ids ``<id>-000001``…"""
    from libs.common.clock import ManualClock
    from services.strategy.base import StrategyContext

    return StrategyContext(
        strategy_id, clock=clock or ManualClock(T0), master=MASTER, instruments=instruments,
        request_ids=StrategyContext.sequential_ids(strategy_id), **kw,
    )  # fmt: skip


def order_update(
    req: OrderRequest, status: str, filled: int = 0, avg: str | None = None, oid: str = "o1", **kw: Any
) -> OrderUpdate:
    """Execution's ``OrderUpdate`` for ``req`` (the strategy's request) in ``status``."""
    return OrderUpdate(
        order_id=oid, request_id=req.request_id, strategy_id=req.strategy_id, client_tag="t",
        symbol=req.symbol, segment=req.segment, token=req.token, side=req.side, quantity=req.quantity,
        status=status, filled_qty=filled, avg_price=_money(avg), purpose=req.purpose, **kw,
    )  # fmt: skip


def fill_of(req: OrderRequest, qty: int, price: str | Decimal, fid: str = "f1", oid: str = "o1") -> Fill:
    """A ``Fill`` of ``qty`` of ``req`` at ``price``."""
    return Fill(
        fill_id=fid, order_id=oid, strategy_id=req.strategy_id, symbol=req.symbol, segment=req.segment,
        token=req.token, side=req.side, quantity=qty, price=Decimal(str(price)),
    )  # fmt: skip
