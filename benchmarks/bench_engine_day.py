"""The pure execution engine over a trading day: does per-order cost or memory grow with the
number of orders already done today?

    python -m benchmarks.bench_engine_day [--orders 20000] [--memory-orders 20000] [--json]

``ExecutionEngine`` + ``MemoryOrderStore`` + ``PaperBroker`` inline on a ``ManualClock``
(as in ``tests/unit/test_engine.py``'s ``Harness``). Each order is a bracketed BUY that
fills on arrival; three in four are closed by their target (the stop is cancelled, OCO),
one in four by the strategy's own EXIT (both legs cancelled). The clock moves 100 ms per
order, the service's periodic work runs as it would: ``reconcile_if_due`` and ``status()``
(the heartbeat) every simulated second, a full reconciliation every 60 s.

Printed (timing from one untraced run; memory from a second run under tracemalloc, which
is several times slower):

* per-order cost (submit + pump, plus the ticks that close it) of the first 1,000 orders
  against the last 1,000 of the same run: the ratio is what matters (1.0 = flat);
* what a full reconciliation costs a minute into the day and at its end, with the broker
  book's size (orders + trades);
* bytes retained per order by the engine and the paper broker (tracemalloc, after the
  in-memory ledger's own copies are dropped: a real ledger is PostgreSQL), and the top
  allocation sites still alive.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.clock import ManualClock  # noqa: E402
from libs.common.config import load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from libs.common.messages import ExecuteOrder, OrderRequest, Tick  # noqa: E402
from services.execution.brokers.paper import PaperBroker  # noqa: E402
from services.execution.engine import ExecutionEngine  # noqa: E402
from services.execution.store import MemoryOrderStore  # noqa: E402

MASTER = MasterData.load()
INST = MASTER.resolve("RELIANCE-EQ")
STRATEGIES = ("s1", "s2", "s3", "s4")
STEP_S = 0.1  # simulated time per order
WINDOW = 1_000  # orders in the early and the late sample


def _order(n: int, side: str, qty: int, price: str, *, purpose: str = "ENTRY", strategy: str = "s1",
           stop: str | None = None, target: str | None = None) -> ExecuteOrder:  # fmt: skip
    req = OrderRequest(
        request_id=f"bench-{n}-{purpose[0]}", strategy_id=strategy, side=side, quantity=qty,
        symbol=INST.symbol, segment=INST.segment, token=INST.token, price=Decimal(price), order_type="LIMIT",
        purpose=purpose,
        stop_loss=Decimal(stop) if stop else None, target=Decimal(target) if target else None,
    )  # fmt: skip
    return ExecuteOrder(request_id=req.request_id, order=req, quantity=qty, segment=INST.segment,
                        token=INST.token, symbol=INST.symbol)  # fmt: skip


class Day:
    def __init__(self) -> None:
        cfg = load_config(env={})
        self.clock = ManualClock(1_763_700_000_000_000_000)  # a weekday, 2025-11-21 (IST day)
        self.store = MemoryOrderStore()
        self.broker = PaperBroker(MASTER, self.clock, slippage_bps=cfg.paper.slippage_bps)
        self.engine = ExecutionEngine(self.store, self.broker, MASTER, self.clock, cfg.execution)
        self.engine.start()
        self.engine.pump()
        self.next_second = self.clock.now_ns()
        self.next_reconcile = self.clock.now_ns()
        self.reconcile_s: list[float] = []
        self.book_rows: list[int] = []
        self.heartbeats = 0

    def tick(self, ltp: float, bid: float, ask: float) -> None:
        t = Tick(segment=INST.segment, token=INST.token, ltp=ltp, bid=bid, ask=ask, bid_qty=10_000,
                 ask_qty=10_000)  # fmt: skip
        self.engine.on_tick(t)
        self.broker.on_tick(t)
        self.engine.pump()
        self.engine.take_messages()

    def one_order(self, n: int) -> None:
        e = self.engine
        sid = STRATEGIES[n % len(STRATEGIES)]
        self.tick(1290.0, 1289.95, 1290.05)
        e.submit([_order(n, "BUY", 10, "1290.50", strategy=sid, stop="1280.00", target="1300.00")])
        e.pump()
        e.take_messages()
        if n % 4 == 3:  # the strategy's own exit: its legs are cancelled (exposure 0)
            e.submit([_order(n, "SELL", 10, "1289.00", purpose="EXIT", strategy=sid)])
            e.pump()
            e.take_messages()
        else:  # the target fills, the stop is cancelled
            self.tick(1300.5, 1300.45, 1300.55)

    def periodic(self) -> None:
        """What the service's timers do, in simulated time (outside the per-order timing)."""
        now = self.clock.now_ns()
        e = self.engine
        while now >= self.next_second:
            self.next_second += 1_000_000_000
            e.check_day()
            e.reconcile_if_due()
            e.status()  # the heartbeat
            self.heartbeats += 1
            e.pump()
            e.take_messages()
        if now >= self.next_reconcile:
            self.next_reconcile = now + 60_000_000_000
            rows = len(self.broker.order_book()) + len(self.broker.trade_book())
            t0 = time.perf_counter()
            e.request_reconcile("periodic")
            e.pump()
            e.take_messages()
            self.reconcile_s.append(time.perf_counter() - t0)
            self.book_rows.append(rows)


def _engine_only_bytes(day: Day) -> int:
    """Traced bytes once the in-memory ledger's own copies are gone (PostgreSQL holds them)."""
    s = day.store
    s.orders.clear()
    s.by_request.clear()
    s.tags.clear()
    s.events.clear()
    s.fills.clear()
    s.brackets.clear()
    s.baskets.clear()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _drive(day: Day, orders: int) -> list[float]:
    per_order: list[float] = []
    for n in range(orders):
        t0 = time.perf_counter()
        day.one_order(n)
        per_order.append(time.perf_counter() - t0)
        day.clock.advance(STEP_S)
        day.periodic()
    day.clock.advance(600)  # let the last orders settle, then one more reconciliation
    day.next_reconcile = 0
    day.periodic()
    return per_order


def timing(orders: int) -> dict[str, Any]:
    """Pass 1, untraced: per-order cost, early against late, and the reconciliations."""
    day = Day()
    per_order = _drive(day, orders)
    e = day.engine
    early, late = per_order[:WINDOW], per_order[-WINDOW:]
    return {
        "orders": orders,
        "ledger_orders": len(day.store.orders),
        "fills": e.stats["fills"],
        "early_us_per_order": round(statistics.mean(early) * 1e6, 1),
        "late_us_per_order": round(statistics.mean(late) * 1e6, 1),
        "late_over_early": round(statistics.mean(late) / statistics.mean(early), 3),
        "p99_early_us": round(sorted(early)[int(len(early) * 0.99)] * 1e6, 1),
        "p99_late_us": round(sorted(late)[int(len(late) * 0.99)] * 1e6, 1),
        "heartbeats": day.heartbeats,
        "reconciles": len(day.reconcile_s),
        # the first one is at the start (an empty book); the second is a minute into the day
        "reconcile_ms_second": round(day.reconcile_s[1] * 1e3, 2),
        "reconcile_ms_last": round(day.reconcile_s[-2] * 1e3, 2),  # the last one of the trading
        "book_rows_second": day.book_rows[1],
        "book_rows_last": day.book_rows[-2],
    }


def memory(orders: int, top: int) -> dict[str, Any]:
    """Pass 2, under tracemalloc: what stays allocated per ledger order once the day is done."""
    gc.collect()
    tracemalloc.start(1)
    base = tracemalloc.get_traced_memory()[0]
    day = Day()
    _drive(day, orders)
    gc.collect()
    ledger_orders = len(day.store.orders)
    with_store = tracemalloc.get_traced_memory()[0] - base
    engine_bytes = _engine_only_bytes(day) - base
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    filt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    sites = [
        {"site": str(st.traceback[0]), "kib": round(st.size / 1024, 1), "count": st.count}
        for st in snap.filter_traces(filt).statistics("lineno")[:top]
    ]
    return {
        "memory_orders": orders,
        "memory_ledger_orders": ledger_orders,
        "retained_bytes_per_order_engine_and_broker": round(engine_bytes / max(1, ledger_orders)),
        "retained_bytes_per_order_with_memory_ledger": round(with_store / max(1, ledger_orders)),
        "engine_rows_in_memory": len(day.engine.orders),
        "paper_orders_in_memory": len(day.broker.orders),
        "top_sites_engine_and_broker": sites,
    }


def run(orders: int, memory_orders: int, top: int) -> dict[str, Any]:
    out = timing(orders)
    if memory_orders:
        out.update(memory(memory_orders, top))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=20_000)
    ap.add_argument("--memory-orders", type=int, default=20_000, help="entries of the traced pass (0: none)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    o = run(args.orders, args.memory_orders, args.top)
    if args.json:
        print(json.dumps(o, indent=2))
        return
    print(f"{o['orders']} bracketed entries, {o['ledger_orders']} ledger orders, {o['fills']} fills")
    print(f"per order (submit + pump + closing ticks): first {WINDOW}: {o['early_us_per_order']} us, "
          f"last {WINDOW}: {o['late_us_per_order']} us → late/early = {o['late_over_early']}")  # fmt: skip
    print(f"  p99: first {o['p99_early_us']} us, last {o['p99_late_us']} us")
    print(f"reconciliation ({o['reconciles']}): {o['reconcile_ms_second']} ms "
          f"({o['book_rows_second']} book rows) a minute in, {o['reconcile_ms_last']} ms "
          f"({o['book_rows_last']} rows) at the end")  # fmt: skip
    if "memory_orders" not in o:
        return
    print(f"memory pass, {o['memory_orders']} entries, {o['memory_ledger_orders']} ledger orders:")
    mine = o["retained_bytes_per_order_engine_and_broker"]
    print(f"retained per ledger order: engine + paper broker {mine} B "
          f"(with the in-memory ledger {o['retained_bytes_per_order_with_memory_ledger']} B)")
    print(f"in memory at the end: engine rows {o['engine_rows_in_memory']}, "
          f"paper orders {o['paper_orders_in_memory']}")
    print("top allocation sites alive (engine + broker):")
    for s in o["top_sites_engine_and_broker"]:
        print(f"  {s['kib']:>9} KiB {s['count']:>7}  {s['site']}")


if __name__ == "__main__":
    main()
