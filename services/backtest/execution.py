"""Execution for backtests: the real ``ExecutionEngine`` with ``PaperBroker`` and
``MemoryOrderStore``, driven inline (no thread pool, no sockets)."""

from __future__ import annotations

from typing import Any

from libs.common.clock import Clock
from libs.common.config import Config
from libs.common.instruments import MasterData
from libs.common.messages import ExecuteOrder, Tick
from services.execution.brokers.paper import PaperBroker
from services.execution.engine import ExecutionEngine
from services.execution.store import MemoryOrderStore

_NONE: tuple[Any, ...] = ()


class PaperExecution:
    """``execute`` an approved order, ``on_tick`` a market update; both return the messages
    execution would have published (``OrderUpdate``, ``Fill``, ``Position``, ``Alert``)."""

    def __init__(self, cfg: Config, master: MasterData, clock: Clock, log: Any = None) -> None:
        self.broker = PaperBroker(master, clock, slippage_bps=cfg.paper.slippage_bps, log=log,
                                  capital=cfg.paper.capital)
        self.engine = ExecutionEngine(MemoryOrderStore(), self.broker, master, clock, cfg.execution, log=log)
        self.engine.start()
        self.engine.pump()
        self.engine.take_messages()

    def execute(self, cmd: ExecuteOrder) -> tuple[bool, str, str, list[Any]]:
        """Submit one approved order; returns (accepted, order_id, reason, messages)."""
        engine = self.engine
        (res,) = engine.submit([cmd])
        engine.pump()
        msgs = [m for _, m in engine.take_messages()]
        return res.ok, res.order_id, res.reason, msgs

    def on_tick(self, tick: Tick) -> list[Any] | tuple[Any, ...]:
        """Mark the tick at the engine and the broker; fills of resting orders come back.
        (The backtest loop inlines this for speed.)"""
        trailed = self.engine.on_tick(tick)
        broker = self.broker
        broker.on_tick(tick)
        if not trailed and not broker.events:
            return _NONE
        return self.pump()

    def pump(self) -> list[Any]:
        """Let the engine process the broker's events; returns the messages it published."""
        self.engine.pump()
        return [m for _, m in self.engine.take_messages()]
