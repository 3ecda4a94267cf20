"""Backtest: recorded ticks through the SAME strategy class, RiskSentinel and ExecutionEngine.

There is no second implementation of the trading logic: the loop below is an in-process,
synchronous stand-in for the bus. Each tick goes, in this order, to

1. the report's book (marks) and the ``RiskSentinel`` (marks, loss limit);
2. execution (``ExecutionEngine`` with ``PaperBroker`` and ``MemoryOrderStore``): resting
   orders and bracket legs fill against this tick;
3. the strategy (``dispatch_tick``), whose ``OrderRequest``s go to ``RiskSentinel.evaluate``
   and, when approved, to the engine as ``ExecuteOrder``s.

Every ``OrderUpdate`` and ``Fill`` the engine emits is delivered, in order, to the sentinel,
the strategy (``dispatch_order``/``dispatch_fill``) and the book — the same messages the
live processes exchange over ZeroMQ. Time is a ``ManualClock`` set to each tick's exchange
time, so throttles, bars and timestamps follow the recording, and a run is deterministic.
Orders a strategy places on a tick can fill from the next tick on (no look-ahead).

With an instrument list, only those instruments' ticks are replayed, plus what the strategy
subscribes to as it runs (``self.chain()``'s index and strikes, ``self.subscribe()``): the
loop takes ``new_subscriptions`` after every tick, as the live host does, so an option strategy
sees its chain's ticks from the next one on. The master must be the recording's day's
(``master_for_recording``): the paper contracts, and so the option tokens, change with the day.
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from libs.common.clock import IST, ManualClock
from libs.common.config import Config
from libs.common.instruments import MasterData
from libs.common.messages import Alert, BasketRequest, Fill, Flatten, OrderRequest, OrderUpdate, Tick
from services.backtest.report import Book, _iso
from services.strategy import registry
from services.strategy.base import Strategy, StrategyContext

GC_GEN0 = 20_000  # collector thresholds during a replay (Python's defaults: 700, 10, 10)
GC_GEN1 = 50
GC_GEN2 = 100
TIMER_NS = 1_000_000_000  # strategy housekeeping (quiet bars) once per exchange second
MAX_EVENTS = 1000  # execution's alerts kept for the report (a stop moved, a square-off, ...)


class BacktestError(ValueError):
    """Bad input for a backtest (no ticks, unknown strategy or instruments)."""


@dataclass
class BacktestResult:
    report: dict[str, Any]
    ticks: int
    elapsed_s: float

    @property
    def ticks_per_s(self) -> float:
        return self.ticks / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Pipeline:
    """Strategy → risk → execution, wired in-process with a FIFO of messages."""

    def __init__(self, cfg: Config, master: MasterData, strategy: Strategy, clock: ManualClock) -> None:
        from services.backtest.execution import PaperExecution
        from services.risk.sentinel import RiskSentinel

        self.cfg = cfg
        self.clock = clock
        self.strategy = strategy
        self.risk = RiskSentinel(cfg.risk, master, clock)
        limits = {s.id: (s.max_loss, s.target_profit) for s in cfg.strategy}
        if strategy.id not in limits:  # run under its own id (--id): the configured strategy of that name
            same = next((s for s in cfg.strategy if s.name == strategy.name), None)
            if same is not None:
                limits[strategy.id] = (same.max_loss, same.target_profit)
        self.risk.set_strategy_limits(limits)
        self.execution = PaperExecution(cfg, master, clock)
        self.book = Book(cost_rate=Decimal(repr(cfg.risk.cost_rate)))
        self.requested = 0
        self.approved = 0
        self.rejections: Counter[str] = Counter()
        self.events: list[dict[str, str]] = []  # execution's alerts, in order (at most MAX_EVENTS)
        self.dropped_events = 0
        self._purpose: dict[str, str] = {}  # order id -> ENTRY | EXIT | STOP | TARGET | FLATTEN
        self._work: deque[Any] = deque()

    def submit(self, orders: Iterable[OrderRequest]) -> None:
        self._work.extend(orders)
        self._drain()

    def risk_events(self, events: Iterable[Any]) -> None:
        """What risk asks of execution when a limit is crossed: a strategy stopped by its
        ``max_loss``/``target_profit`` is squared off (the rest is for humans and the ledger)."""
        for ev in events:
            if isinstance(ev, Flatten):
                self.execution.engine.flatten(ev, lambda _report: None)
                self.deliver(self.execution.pump())

    def deliver(self, events: Iterable[Any]) -> None:
        self._work.extend(events)
        self._drain()

    def _drain(self) -> None:
        work = self._work
        strat = self.strategy
        while work or strat.new_baskets:
            if strat.new_baskets:  # baskets the strategy queued (``Strategy.basket``)
                baskets, strat.new_baskets = strat.new_baskets, []
                for b in baskets:
                    self._basket(b)
                continue
            item = work.popleft()
            kind = type(item)  # the commonest first: several order updates to each fill
            if kind is OrderUpdate:
                self._purpose.setdefault(item.order_id, item.purpose)
                self.risk.on_order_update(item)
                work.extend(strat.dispatch_order(item))
            elif kind is Fill:
                self.risk_events(self.risk.on_fill(item))
                self.book.on_fill(item, self.clock.now_ns(), self._purpose.get(item.order_id, ""))
                work.extend(strat.dispatch_fill(item))
            elif kind is OrderRequest:
                self._order(item)
            elif kind is Alert:
                self._alert(item)
            # Position and the rest are for humans and other services.

    def _alert(self, alert: Alert) -> None:
        if len(self.events) >= MAX_EVENTS:
            self.dropped_events += 1
            return
        self.events.append({"time": _iso(self.clock.now_ns()), "level": alert.level, "code": alert.code,
                            "text": alert.text})  # fmt: skip

    def _basket(self, req: BasketRequest) -> None:
        """A basket: judged whole by risk, then placed by the engine (long legs first)."""
        self.requested += len(req.legs)
        verdict, execute = self.risk.evaluate_basket(req)
        if execute is None or not verdict.approved:
            self.rejections[verdict.reason] += 1
            self._work.extend(self.strategy.dispatch_basket_verdict(req, verdict))
            return
        engine = self.execution.engine
        res = engine.submit_basket(execute)
        engine.pump()
        events = [m for _, m in engine.take_messages()]
        if not res.ok:
            verdict = self.risk.basket_failed(req.request_id, res.reason)
            self.rejections[verdict.reason] += 1
        else:
            self.approved += len(req.legs)
            verdict = self.risk.confirm_basket(req.request_id, res.data()) or verdict
        self._work.extend(events)
        self._work.extend(self.strategy.dispatch_basket_verdict(req, verdict))

    def _order(self, req: OrderRequest) -> None:
        self.requested += 1
        verdict, execute = self.risk.evaluate(req)
        if execute is None or not verdict.approved:
            self.rejections[verdict.reason] += 1
            self._work.extend(self.strategy.dispatch_verdict(req, verdict))
            return
        ok, order_id, reason, events = self.execution.execute(execute)
        if not ok:
            verdict = self.risk.execution_failed(req.request_id, reason)
            self.rejections[verdict.reason] += 1
            self._work.extend(self.strategy.dispatch_verdict(req, verdict))
            return
        self.approved += 1
        final = self.risk.confirm(req.request_id, order_id) or verdict
        self._work.extend(events)
        self._work.extend(self.strategy.dispatch_verdict(req, final))


@contextmanager
def _replay_collector() -> Iterator[None]:
    """The cyclic garbage collector, tuned for a replay and put back after it.

    A replay allocates container objects by the million (messages, rows, the in-memory
    ledger's copies) and frees almost all of them by reference counting; at the default
    thresholds the collector runs every 700 allocations and, every hundred of those, walks
    everything alive: the master, the decoded ticks, the growing ledger. Here what existed
    before the replay is frozen out of the collector's walks (``gc.freeze``; not when the
    caller froze already, as a forking grid parent may have) and collections run less often.
    No object's life changes: the same garbage is collected, later."""
    old = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.set_threshold(max(old[0], GC_GEN0), max(old[1], GC_GEN1), max(old[2], GC_GEN2))
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if freeze:
            gc.unfreeze()


@_replay_collector()  # a fresh collector setting for each call (contextmanager as a decorator)
def run_backtest(  # noqa: PLR0915 - the replay loop is kept in one frame for speed
    ticks: Iterable[Tick],
    strategy: str,
    params: dict[str, Any] | None = None,
    *,
    cfg: Config,
    master: MasterData,
    strategy_id: str = "bt",
    instruments: list[str] | None = None,
    on_error: str = "continue",
    log: Any = None,
) -> BacktestResult:
    """Replay ``ticks`` (in exchange-time order) through ``strategy`` and the paper pipeline."""
    try:
        cls = registry.load(strategy)
    except registry.UnknownStrategy as exc:
        raise BacktestError(str(exc)) from None
    wanted: set[str] | None = None
    if instruments:
        try:
            wanted = {master.resolve(n).key for n in instruments}
        except KeyError as exc:
            raise BacktestError(str(exc)) from None
    clock = ManualClock(0)
    it = iter(ticks)
    t0 = time.perf_counter()
    first: Tick | None = None
    for candidate in it:
        # instrument_key, inlined: hot path
        if wanted is None or f"{candidate.segment}|{candidate.token}" in wanted:
            first = candidate
            break
    if first is None:
        raise BacktestError("no ticks to replay")
    clock.set_ns(first.exch_ts_ns or first.ts_ns)
    # The strategy's instruments: the ones asked for, else those the recording holds (known ones).
    ctx = StrategyContext(
        strategy_id,
        clock=clock,
        master=master,
        log=log,
        instruments=sorted(wanted) if wanted else [],
        on_error=on_error,
        request_ids=StrategyContext.sequential_ids(strategy_id),
    )
    strat = cls(ctx, params or {})
    pipe = Pipeline(cfg, master, strat, clock)
    pipe.submit(strat.dispatch_start())
    if strat.new_subscriptions:
        _follow(strat, wanted)

    book, execution = pipe.book, pipe.execution
    dispatch = strat.dispatch_tick
    submit, deliver = pipe.submit, pipe.deliver
    set_ns = clock.set_ns
    book_tick, risk_tick = book.on_tick, pipe.risk.on_tick
    engine_tick, broker_tick = execution.engine.on_tick, execution.broker.on_tick
    broker = execution.broker
    seen_keys: dict[str, str] = {}
    n = 0
    now = 0
    next_timer = 0
    next_day = 0  # IST midnight after the current tick's day: risk starts a new day there
    for tick in itertools.chain((first,), it):
        key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
        if wanted is None or key in wanted:
            ts = tick.exch_ts_ns or tick.ts_ns
            if ts > now:
                now = ts
                set_ns(ts)
                if now >= next_day:
                    day = dt.datetime.fromtimestamp(now / 1e9, IST).date()
                    midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), IST)
                    next_day = int(midnight.timestamp()) * 10**9
                    if pipe.risk.trading_day and pipe.risk.trading_day != day.isoformat():
                        pipe.risk.new_day()  # a fresh loss budget, entry counts and stopped strategies
                        execution.engine.check_day()  # as live execution's timer does: the day's books
                    pipe.risk.trading_day = day.isoformat()
            n += 1
            if key not in seen_keys:
                inst = master.by_key.get(key)
                seen_keys[key] = inst.symbol if inst is not None else (tick.symbol or key)
                book.mark(key, seen_keys[key], tick.ltp)
            book_tick(key, now, tick.ltp)
            crossed = risk_tick(tick, key)
            if crossed:  # a strategy's MTM limit (or the loss limit) crossed
                pipe.risk_events(crossed)
            trailed = engine_tick(tick, key)  # execution's marks (market intent, flatten), trailing stops
            broker_tick(tick, key)  # paper fills of resting orders and bracket legs
            if trailed or broker.events:
                deliver(execution.pump())
            orders = dispatch(tick, key)
            if orders or strat.new_baskets:
                submit(orders)
            if now >= next_timer:
                next_timer = now + TIMER_NS
                orders = strat.dispatch_timer(now)
                if orders or strat.new_baskets:
                    submit(orders)
            if strat.new_subscriptions:  # a chain's strikes, subscribe(): their ticks from now on
                _follow(strat, wanted)
            if strat.halted:
                break
    submit(strat.dispatch_stop())
    book.finish()
    elapsed = time.perf_counter() - t0
    report = _report(strat, pipe, n, seen_keys)
    return BacktestResult(report=report, ticks=n, elapsed_s=elapsed)


def _follow(strat: Strategy, wanted: set[str] | None) -> None:
    """The live host's job for ``new_subscriptions``: listen to them (here: let their ticks
    through the instrument filter) and clear the list."""
    added, strat.new_subscriptions = strat.new_subscriptions, []
    if wanted is not None:
        wanted.update(inst.key for inst in added)


def recording_day(path: str | Path) -> dt.date | None:
    """The trading day (IST) of a recording's first tick; ``None`` for an empty one."""
    from services.feed.sources.replay import iter_ticks

    first = next(iter_ticks(path), None)  # reads the first block only
    if first is None:
        return None
    ts = first.exch_ts_ns or first.ts_ns
    return dt.datetime.fromtimestamp(ts / 1e9, IST).date()


def recording_days(path: str | Path) -> list[dt.date]:
    """The trading days a recording covers: the day of each of its files' first tick (the
    recorder starts a file per day), in order."""
    from services.feed.sources.replay import replay_files

    days = {d for f in replay_files(Path(path)) if (d := recording_day(f)) is not None}
    return sorted(days)


def master_for_recording(home: Path, path: str | Path) -> MasterData:
    """The master a backtest of ``path`` needs: the cached Kotak master as it is, else the
    paper master with the contracts of every day the recording covers, so the option
    contracts each day's feed published (weeklies that have expired since) resolve to the
    tokens in the recording."""
    days = recording_days(path)
    return MasterData.load_for_home(home, today=days[0] if days else None, also=days[1:])


def _report(strat: Strategy, pipe: Pipeline, n: int, seen: dict[str, str]) -> dict[str, Any]:
    book = pipe.book
    risk_state = pipe.risk.state()
    cost_rate = book.cost_rate
    return {
        "strategy": strat.name or type(strat).__name__,
        "strategy_id": strat.id,
        "params": msgspec.to_builtins(strat.params),
        "instruments": sorted(seen.values()),
        "ticks": n,
        "start": _iso(book.first_ns) if book.first_ns else None,
        "end": _iso(book.last_ns) if book.last_ns else None,
        "summary": book.summary(),
        "orders": {
            "requested": pipe.requested,
            "approved": pipe.approved,
            "rejected": sum(pipe.rejections.values()),
        },
        "rejections": dict(sorted(pipe.rejections.items())),
        "errors": strat.errors,
        "halted": strat.halted,
        # risk's own view of the day, as a cross-check of the report's arithmetic
        "risk": {
            "state": risk_state.state,
            "net_pnl": round(risk_state.net_pnl, 2),
            "turnover": round(risk_state.turnover, 2),
        },
        "trade_list": [t.as_dict(cost_rate) for t in book.trades],
        # what execution announced on the way: stops moved or trailed, square-offs, refusals
        "events": pipe.events,
        "events_dropped": pipe.dropped_events,
        "equity_curve": [[_iso(ts), eq] for ts, eq in book.equity_curve()],
    }
