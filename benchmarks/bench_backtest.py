"""Backtest throughput: ticks/s through strategy + RiskSentinel + ExecutionEngine/PaperBroker.

    python -m benchmarks.bench_backtest [--ticks 500000] [--strategy momentum] [--json]

A seeded random walk over the five default instruments (±0.08 % steps, like the sim feed)
is written once as a tick CSV. Then, in this process:

1. reader: ``iter_ticks`` over the CSV alone (the floor any replay pays for parsing);
2. pipeline: the same ticks, already decoded in memory, through ``run_backtest``;
3. end to end: ``run_backtest`` reading the CSV, as ``neopulse backtest`` does;
4. end to end from the feed recorder's ``.ticks`` file of the same ticks;
5. pipeline with ``macd`` on 5-second bars (few trades): the per-tick cost without much order handling.

Each figure is ticks divided by wall time of that step; the CPU-second figures divide by the
process's CPU time instead, which a busy machine disturbs less. The report's trade count is printed
so a run that trades nothing is visible.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.clock import ManualClock  # noqa: E402
from libs.common.config import load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from libs.common.messages import Codec  # noqa: E402
from services.backtest.runner import run_backtest  # noqa: E402
from services.feed.recorder import TickRecorder  # noqa: E402
from services.feed.sources.replay import iter_ticks  # noqa: E402

SYMBOLS = ("RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "SBIN-EQ")
T0 = 1_704_167_100 * 1_000_000_000  # 2024-01-02 09:15 IST


def write_walk(path: Path, n: int, seed: int = 7) -> None:
    master = MasterData.load()
    rng = random.Random(seed)
    insts = [master.resolve(s) for s in SYMBOLS]
    prices = [i.ref_price or 1000.0 for i in insts]
    step_ns = 10_000_000  # 20 ticks/s per instrument, interleaved
    with path.open("w") as fh:
        fh.write("ts,segment,token,ltp,qty\n")
        for k in range(n):
            j = k % len(insts)
            prices[j] *= 1 + rng.uniform(-0.0008, 0.0008)
            fh.write(f"{T0 + k * step_ns},{insts[j].segment},{insts[j].token},{prices[j]:.2f},{1 + k % 9}\n")


def run(n: int, strategy: str = "momentum", params: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = load_config(env={})
    master = MasterData.load()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "walk.csv"
        write_walk(path, n)
        t0 = time.perf_counter()
        ticks = list(iter_ticks(path, master))
        read_s = time.perf_counter() - t0
        c0 = time.process_time()
        mem = run_backtest(ticks, strategy, params, cfg=cfg, master=master)
        mem_cpu = time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        full = run_backtest(iter_ticks(path, master), strategy, params, cfg=cfg, master=master)
        full_s, full_cpu = time.perf_counter() - t0, time.process_time() - c0
        rec = TickRecorder(Path(tmp) / "rec", clock=ManualClock(T0))
        encode = Codec().encode
        for t in ticks:
            rec.append(encode(t))
        rec.flush()
        rec.close()
        t0 = time.perf_counter()
        recorded = run_backtest(iter_ticks(Path(tmp) / "rec"), strategy, params, cfg=cfg, master=master)
        rec_s = time.perf_counter() - t0
        macd = run_backtest(ticks, "macd", {"bar_seconds": 5}, cfg=cfg, master=master)
    assert mem.report == full.report
    assert recorded.report["summary"] == mem.report["summary"]
    s = mem.report["summary"]
    return {
        "ticks": n,
        "strategy": strategy,
        "reader_ticks_per_s": round(n / read_s),
        "pipeline_ticks_per_s": round(mem.ticks_per_s),
        "pipeline_ticks_per_cpu_s": round(n / mem_cpu),
        "end_to_end_ticks_per_cpu_s": round(n / full_cpu),
        "end_to_end_ticks_per_s": round(n / full_s),
        "end_to_end_recorded_ticks_per_s": round(n / rec_s),
        "macd_pipeline_ticks_per_s": round(macd.ticks_per_s),
        "macd_trades": macd.report["summary"]["trades"],
        "trades": s["trades"],
        "fills": s["fills"],
        "orders": mem.report["orders"],
        "net_pnl": s["net_pnl"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=500_000)
    ap.add_argument("--strategy", default="momentum")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.ticks, args.strategy)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"ticks: {res['ticks']:,}  strategy: {res['strategy']}  "
        f"trades: {res['trades']}  fills: {res['fills']}"
    )
    print(f"CSV reader alone:                    {res['reader_ticks_per_s']:>10,} ticks/s")
    print(f"pipeline (ticks in memory):          {res['pipeline_ticks_per_s']:>10,} ticks/s  "
          f"({res['pipeline_ticks_per_cpu_s']:,} per CPU-second)")
    print(f"end to end (CSV → report):           {res['end_to_end_ticks_per_s']:>10,} ticks/s  "
          f"({res['end_to_end_ticks_per_cpu_s']:,} per CPU-second)")
    print(f"end to end (.ticks recording):       {res['end_to_end_recorded_ticks_per_s']:>10,} ticks/s")
    macd = f"pipeline, macd ({res['macd_trades']} trades):"
    print(f"{macd:<37}{res['macd_pipeline_ticks_per_s']:>10,} ticks/s")


if __name__ == "__main__":
    main()
