"""Backtest throughput: ticks/s through strategy + RiskSentinel + ExecutionEngine/PaperBroker.

    python -m benchmarks.bench_backtest [--ticks 500000] [--strategy momentum] [--repeat 3] [--json]

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

Then the targets, each a pipeline run over the same ticks in memory, in ticks per CPU-second
(the best of ``--repeat`` runs: other work on a shared machine only ever slows a run down), each
case in a fresh process of its own:
``momentum`` (defaults, thousands of bracket orders) at least 100,000; ``ema_cross`` on 1-second
bars at least 250,000 and on 5-second bars at least 300,000; ``macd`` on 5-second bars at least
300,000. They are stated for the 200,000-tick walk (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


# (label, strategy, params, target in ticks per CPU-second)
TARGETS: tuple[tuple[str, str, dict[str, Any], int], ...] = (
    ("momentum", "momentum", {}, 100_000),
    ("ema_cross, 1 s bars", "ema_cross", {"bar_seconds": 1}, 250_000),
    ("ema_cross, 5 s bars", "ema_cross", {"bar_seconds": 5}, 300_000),
    ("macd, 5 s bars", "macd", {"bar_seconds": 5}, 300_000),
)


def measure_case(ticks: list[Any], case: tuple[str, str, dict[str, Any], int], repeat: int) -> dict[str, Any]:
    """One of ``TARGETS`` over ``ticks`` (in memory): the best CPU-second figure of ``repeat`` runs."""
    label, strategy, params, target = case
    cfg = load_config(env={})
    master = MasterData.load()
    best = float("inf")
    trades = 0
    for _ in range(max(1, repeat)):
        c0 = time.process_time()
        res = run_backtest(ticks, strategy, params, cfg=cfg, master=master)
        best = min(best, time.process_time() - c0)
        trades = res.report["summary"]["trades"]
    per_cpu_s = round(len(ticks) / best) if best > 0 else 0
    return {"case": label, "strategy": strategy, "params": params, "trades": trades,
            "ticks_per_cpu_s": per_cpu_s, "us_per_tick": round(best / len(ticks) * 1e6, 2),
            "target": target, "met": per_cpu_s >= target}  # fmt: skip


def _case_in_child(path: str, index: int, repeat: int) -> dict[str, Any]:
    ticks = list(iter_ticks(Path(path), MasterData.load()))
    return measure_case(ticks, TARGETS[index], repeat)


def measure_targets(path: Path, repeat: int = 3) -> list[dict[str, Any]]:
    """Each of ``TARGETS`` over the tick CSV at ``path``, each in a fresh process (as
    ``neopulse backtest`` runs), so no case inherits another's heap or warmed caches."""
    ctx = multiprocessing.get_context("spawn")
    out = []
    for index in range(len(TARGETS)):
        with ctx.Pool(1) as pool:
            out.append(pool.apply(_case_in_child, (str(path), index, repeat)))
    return out


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """One line per target: the figure beside it, met or MISSED."""
    return [
        f"{t['case'] + ':':<22}{t['ticks_per_cpu_s']:>10,} ticks per CPU-second ({t['us_per_tick']:.2f} us a "
        f"tick, {t['trades']} trades); target >= {t['target']:,}: {'met' if t['met'] else 'MISSED'}"
        for t in targets
    ]


def run(n: int, strategy: str = "momentum", params: dict[str, Any] | None = None,
        repeat: int = 3) -> dict[str, Any]:
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
        targets = measure_targets(path, repeat)
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
        "repeat": repeat,
        "targets": targets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=500_000,
                    help="ticks in the random walk (default 500,000; make bench uses 200,000)")
    ap.add_argument("--strategy", default="momentum",
                    help="strategy of the reader / pipeline / end-to-end figures (default momentum)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="runs of each target case; the best CPU time counts (default 3)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    args = ap.parse_args()
    if args.ticks < 1 or args.repeat < 1:
        ap.error("--ticks and --repeat must be at least 1")
    res = run(args.ticks, args.strategy, repeat=args.repeat)
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
    print(f"targets (ticks in memory, each case in its own process, best of {res['repeat']} runs):")
    for line in target_lines(res["targets"]):
        print(f"  {line}")


if __name__ == "__main__":
    main()
