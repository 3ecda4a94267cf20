"""Tick → durable paper order in ONE asyncio process: what the multi-process design costs.

    python -m benchmarks.bench_inprocess [--orders 200] [--gap-ms 5 10] [--kind market|limit] [--json]

The same path as ``benchmarks.bench_pipeline``, with no process boundary and no socket on it:

* a feed task stamps a RELIANCE-EQ ``Tick`` with ``time.time_ns()`` and puts it on an
  ``asyncio.Queue`` (the in-process stand-in for the PUB/SUB hop);
* the tick task hands it first to what the services do with every tick (``ExecutionEngine.on_tick``,
  ``PaperBroker.on_tick``, ``RiskSentinel.on_tick``), then to the same minimal strategy as the
  pipeline bench (``order_for``: quantity-1 market orders, BUY and SELL alternating, or BUY
  limits 10 % below the market);
* ``RiskSentinel.evaluate`` (``services.risk``) → ``ExecutionEngine.submit`` with the paper
  broker (``services.execution.engine``) → ``PgOrderStore`` (``services.execution.ledger``),
  which commits the ``PENDING_BROKER`` row (one transaction, fsync on) → ``RiskSentinel.confirm``.
  Latency = wall clock at the confirmed verdict minus the tick's stamp: the end point of the
  pipeline bench (risk's verdict after execution's ack).
* After the verdict, as execution does: the paper broker's place runs inline
  (``engine.pump(settle=False)``), its ack and fill are committed ``FLUSH_DELAY_S`` later
  (group commit, a timer on the loop), and the fills go to the sentinel.

Pacing is closed-loop like the pipeline bench: the next tick ``--gap-ms`` (random in the
range) after the previous verdict. The ledger is an embedded PostgreSQL in a temp dir, or
``NEOPULSE_DATABASE__URL`` (a database ``bench_inproc`` is created on it and dropped after).
``make bench`` runs this path interleaved with the pipeline bench's rounds (same PostgreSQL,
same run), so machine noise falls on both designs alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.clock import Clock  # noqa: E402
from libs.common.config import Config, load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from libs.common.messages import Fill, OrderRequest, RiskVerdict, Tick  # noqa: E402
from services.execution.brokers.paper import PaperBroker  # noqa: E402
from services.execution.engine import ExecutionEngine  # noqa: E402
from services.execution.ledger import PgOrderStore  # noqa: E402
from services.execution.service import FLUSH_DELAY_S  # noqa: E402
from services.risk.sentinel import RiskSentinel  # noqa: E402
from tests.helpers import ANY_HOUR  # noqa: E402

SYMBOL = "RELIANCE-EQ"
WARMUP = 20
DATABASE = "bench_inproc"
# what bench_pipeline gives its services, so the sentinel judges the same way
RISK_ENV = {
    "NEOPULSE_RISK__MAX_ORDERS_PER_SEC": "100000",
    "NEOPULSE_RISK__MAX_OPEN_POSITIONS": "100000",
    "NEOPULSE_RISK__MAX_NOTIONAL": "1000000000000",
    "NEOPULSE_RISK__MAX_DAILY_LOSS": "1000000000",
    "NEOPULSE_EXECUTION__RECONCILE_S": "3600",
    # and, as bench_pipeline's stack_env has, no time-of-day rules (after 15:00 IST the late-entry
    # cutoff refused every order and the run measured nothing)
    **ANY_HOUR,
}


def order_for(i: int, tick: Tick, kind: str, step: Decimal) -> OrderRequest:
    """The minimal strategy's order for its ``i``-th tick (both benches use this)."""
    rid = f"pl{i}-{uuid.uuid4().hex[:8]}"
    if kind == "limit":
        px = (Decimal(repr(tick.ltp)) * Decimal("0.9") / step).to_integral_value() * step
        return OrderRequest(request_id=rid, strategy_id="bench", side="BUY", quantity=1,
                            segment=tick.segment, token=tick.token, price=px, order_type="LIMIT")
    side = "BUY" if i % 2 else "SELL"
    return OrderRequest(request_id=rid, strategy_id="bench", side=side, quantity=1,
                        segment=tick.segment, token=tick.token, order_type="MARKET")


def database_url(admin_url: str, name: str = DATABASE) -> str:
    """A fresh database ``name`` on the server of ``admin_url``; returns its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    head, _, query = admin_url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


class InProcessPath:
    """Feed → strategy → risk → execution → ledger on one asyncio loop (see the module doc)."""

    def __init__(self, url: str, cfg: Config, home: Path, kind: str = "market") -> None:
        from libs.common.log import setup_logging

        self.kind = kind
        self.loop = asyncio.new_event_loop()
        self.log = setup_logging("bench-inprocess", home, cfg.log.level, console_level=cfg.log.console_level)
        master = MasterData.load()
        clock = Clock()
        self.inst = master.resolve(SYMBOL)
        self.step = self.inst.tick_size
        self.store = PgOrderStore(url, self.log, reconnect=False)
        self.store.migrate()
        (home / "run").mkdir(parents=True, exist_ok=True)
        self.paper = PaperBroker(master, clock, slippage_bps=cfg.paper.slippage_bps,
                                 journal=home / "run" / "paper-book.jsonl", log=self.log,
                                 capital=cfg.paper.capital)
        self.engine = ExecutionEngine(self.store, self.paper, master, clock, cfg.execution, log=self.log)
        self.engine.start()
        self.engine.pump()
        exec_timeout_ms = max(200, cfg.bus.request_timeout_ms * 2 // 5)  # as risk's service sets it
        self.sentinel = RiskSentinel(cfg.risk, master, clock, exec_timeout_ms=exec_timeout_ms)
        self.sentinel.set_strategy_limits({s.id: (s.max_loss, s.target_profit) for s in cfg.strategy})
        self.sentinel.restore(self.engine.day_state())
        self.i = 0
        self.n_pub = 0
        self.refused: list[str] = []
        self._flush_scheduled = False
        self.messages = 0

    # ------------------------------------------------------------------ the path
    def _tick(self) -> Tick:
        self.n_pub += 1
        ltp = float(self.inst.ref_price or 1000.0)
        step = float(self.step)
        px = ltp + step * (self.n_pub % 3 - 1)  # the pipeline feed's wobble
        inst = self.inst
        return Tick(segment=inst.segment, token=inst.token, ltp=px, bid=px - step, ask=px + step,
                    bid_qty=1_000_000, ask_qty=1_000_000, symbol=inst.symbol, ts_ns=time.time_ns())

    def _on_tick(self, tick: Tick, out: dict[str, list[float]]) -> None:
        """What risk, execution and the strategy do with one tick, one after the other."""
        t_recv = time.time_ns()
        engine, sentinel = self.engine, self.sentinel
        engine.on_tick(tick)
        self.paper.on_tick(tick)
        sentinel.on_tick(tick)
        self.i += 1
        req = order_for(self.i, tick, self.kind, self.step)
        t_send = time.perf_counter()
        verdict, execute = sentinel.evaluate(req)
        if execute is not None:
            res = engine.submit([execute])[0]  # the PENDING_BROKER row committed
            if res.ok:
                verdict = sentinel.confirm(req.request_id, res.order_id) or verdict
            else:
                verdict = sentinel.execution_failed(req.request_id, f"execution refused: {res.reason}")
        now = time.time_ns()
        t_done = time.perf_counter()
        if isinstance(verdict, RiskVerdict) and verdict.approved and verdict.order_id:
            out["tick_to_ack"].append((now - tick.ts_ns) / 1e9)
            out["feed_to_strategy"].append((t_recv - tick.ts_ns) / 1e9)
            out["order_round_trip"].append(t_done - t_send)
        else:
            self.refused.append(f"{req.request_id}: {verdict.reason}")
        self._pump()

    def _pump(self) -> None:
        """Execution's hot-path pump: the paper place inline, acks and fills committed a moment
        later with whatever comes next (group commit); fills to the sentinel as risk gets them."""
        engine = self.engine
        engine.pump(settle=False)
        if engine.pending_writes() and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_later(FLUSH_DELAY_S, self._deferred_flush)
        for _topic, msg in engine.take_messages():
            self.messages += 1
            if isinstance(msg, Fill):
                self.sentinel.on_fill(msg)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self.engine.pump()
        for _topic, msg in self.engine.take_messages():
            self.messages += 1
            if isinstance(msg, Fill):
                self.sentinel.on_fill(msg)

    async def _run(self, n: int, lo: float, hi: float) -> dict[str, list[float]]:
        from benchmarks.bench_pipeline import gaps

        out: dict[str, list[float]] = {"tick_to_ack": [], "feed_to_strategy": [], "order_round_trip": []}
        queue: asyncio.Queue[Tick] = asyncio.Queue()
        answered = asyncio.Event()

        async def strategy() -> None:
            while True:
                tick = await queue.get()
                self._on_tick(tick, out)
                answered.set()

        task = self.loop.create_task(strategy())
        try:
            for g in gaps(n, lo, hi, seed=self.i + 7):
                await asyncio.sleep(g)
                answered.clear()
                queue.put_nowait(self._tick())
                await answered.wait()
        finally:
            task.cancel()
        await asyncio.sleep(FLUSH_DELAY_S * 2)  # the last ack and fill committed before a pause
        return out

    def run(self, n: int, lo: float, hi: float) -> dict[str, list[float]]:
        """n orders, each on a fresh tick LO..HI ms after the previous verdict."""
        return self.loop.run_until_complete(self._run(n, lo, hi))

    def close(self) -> None:
        self.engine.flush()
        self.paper.close()
        self.store.close()
        self.loop.close()


def bench_config(home: Path, extra: dict[str, str] | None = None) -> Config:
    return load_config(env={"NEOPULSE_HOME": str(home), "NEOPULSE_ENV_FILE": str(home / "no.env"),
                            "NEOPULSE_LOG__LEVEL": "WARNING", "NEOPULSE_CONSOLE_LEVEL": "WARNING",
                            **RISK_ENV, **(extra or {})})


def run(n: int = 200, lo: float = 5.0, hi: float = 10.0, kind: str = "market",
        rounds: int = 4) -> dict[str, Any]:
    """The in-process path beside a raw INSERT + COMMIT on the same PostgreSQL, interleaved."""
    from benchmarks.bench_pipeline import RawInsert, pct
    from services.execution.embedded_pg import open_database

    tmp = Path(tempfile.mkdtemp(prefix="neopulse-bench-inproc-"))
    home = tmp / "home"
    home.mkdir()
    external = os.environ.get("NEOPULSE_DATABASE__URL", "")
    cfg = bench_config(home, {"NEOPULSE_DATABASE__URL": external} if external else None)
    db = open_database(cfg, home)
    path: InProcessPath | None = None
    raw: RawInsert | None = None
    rounds = max(1, min(rounds, n))
    samples: dict[str, list[float]] = {"tick_to_ack": [], "feed_to_strategy": [], "order_round_trip": [],
                                       "raw_psycopg_insert_commit": []}
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_avg_1m_before": round(os.getloadavg()[0], 2), "orders": n, "gap_ms": [lo, hi], "kind": kind,
        "warmup": WARMUP, "rounds": rounds, "database": "external" if external else "embedded",
    }
    try:
        path = InProcessPath(database_url(db.url), cfg, home, kind)
        raw = RawInsert(db.url)
        path.run(WARMUP, lo, hi)
        raw.run(WARMUP, lo, hi)
        for r in range(rounds):
            k = n // rounds + (1 if r < n % rounds else 0)
            for key, xs in path.run(k, lo, hi).items():
                samples[key] += xs
            samples["raw_psycopg_insert_commit"] += raw.run(k, lo, hi)
        result["refused"] = len(path.refused)
        result["refused_examples"] = path.refused[:3]
    finally:
        if raw is not None:
            raw.close()
        if path is not None:
            path.close()
        db.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    for key, xs in samples.items():
        result[key] = pct(xs)
    return result


def print_table(res: dict[str, Any]) -> None:
    print(f"machine: {res['machine']}; load avg (1 min) {res['load_avg_1m_before']} before, "
          f"{res['load_avg_1m_after']} after; {res['database']} PostgreSQL")
    print(f"{res['orders']} {res['kind']} orders in one asyncio process, each {res['gap_ms'][0]:g}-"
          f"{res['gap_ms'][1]:g} ms after the previous verdict ({res['warmup']} warm-up, "
          f"{res['rounds']} rounds interleaved with raw inserts); refused {res['refused']}")
    print(f"{'':40} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'n':>5}")
    for label, key in (("tick -> durable paper order (verdict)", "tick_to_ack"),
                       ("  tick stamp -> strategy has tick", "feed_to_strategy"),
                       ("  OrderRequest -> RiskVerdict", "order_round_trip"),
                       ("raw psycopg INSERT+COMMIT", "raw_psycopg_insert_commit")):
        s = res[key]
        print(f"{label:40} {s['p50_ms']:>8.3f} {s['p90_ms']:>8.3f} {s['p99_ms']:>8.3f} "
              f"{s['max_ms']:>8.3f} {s['n']:>5}")
    if res["refused_examples"]:
        print("refused, e.g.:", "; ".join(res["refused_examples"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=200, help="orders measured (after 20 warm-up)")
    ap.add_argument("--gap-ms", type=float, nargs=2, default=[5.0, 10.0], metavar=("MIN", "MAX"),
                    help="pause between a verdict and the next tick, random in this range")
    ap.add_argument("--kind", choices=("market", "limit"), default="market",
                    help="market: qty-1 BUY/SELL alternating (every order fills); limit: BUYs 10%% below")
    ap.add_argument("--rounds", type=int, default=4,
                    help="interleave with the raw inserts in this many rounds")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.orders < 1 or args.gap_ms[0] < 0 or args.gap_ms[1] < args.gap_ms[0]:
        ap.error("--orders must be at least 1 and --gap-ms MIN MAX with 0 <= MIN <= MAX")
    import psycopg

    from services.execution.embedded_pg import DatabaseError
    from services.execution.store import LedgerError

    try:
        res = run(args.orders, args.gap_ms[0], args.gap_ms[1], args.kind, args.rounds)
    except (DatabaseError, LedgerError, psycopg.Error) as exc:
        why = " ".join(str(exc).split())  # one line
        print(f"bench_inprocess: the ledger database is not usable: {why}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    if res["refused"]:  # the figures then time refusals, not the order path: say so, fail the run
        print(f"bench_inprocess: risk or execution refused {res['refused']} orders, so the figures do "
              f"not describe the order path; first: {res['refused_examples'][0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
