"""Parameter grid speed: a 9-combination ``momentum`` grid over the bench walk, 1 job vs 2.

    python -m benchmarks.bench_grid [--ticks 200000] [--jobs 2] [--json]

The walk is ``bench_backtest``'s (five instruments, ±0.08 % steps), written once as a tick CSV.
Then the same nine backtests (lookback 10, 20, 40 x entry_pct 0.2, 0.3, 0.4) three ways:

1. baseline: one ``run_backtest`` after another, each reading the CSV itself, as a loop over
   ``neopulse backtest`` would (without the process start-up such a loop also pays);
2. the grid with ``--jobs 1``: the CSV decoded once into the shared store, the runs in this process;
3. the grid with ``--jobs N`` (default 2): the same store, memory-mapped by N spawned workers.

The figures are wall-clock seconds of each (the grid's include decoding the store and, for N
jobs, starting the pool) and their ratios: ``speedup`` is (2) over (3), ``vs_baseline`` is (1)
over (3). ``workers_cores_used`` is the workers' CPU time over (3)'s wall time: on a machine
whose cores are busy with other work it falls short of N, and the speedup with it (nine runs on
two workers also leave one worker idle for the last run: 1.8x at best). All three must produce
the same nine summaries, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_backtest import write_walk  # noqa: E402
from libs.common.config import load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from services.backtest import grid as gridmod  # noqa: E402
from services.backtest.runner import run_backtest  # noqa: E402
from services.backtest.tickstore import TickStore, write_store  # noqa: E402
from services.feed.sources.replay import iter_ticks  # noqa: E402
from services.strategy import registry  # noqa: E402

STRATEGY = "momentum"
GRID = ["lookback=10,20,40", "entry_pct=0.2,0.3,0.4"]
KEYS = ("net_pnl", "gross_pnl", "cost", "max_drawdown", "trades")


def _timed_grid(csv: Path, tmp: Path, jobs: int, home: Path) -> tuple[float, float, list[dict[str, Any]]]:
    """(wall seconds, CPU seconds of the pool's workers, the ranked rows) of one grid run."""
    cfg = load_config(env={})
    master = MasterData.load()
    grid = gridmod.parse_grid(GRID, registry.load(STRATEGY), {})
    t0 = time.perf_counter()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    path = tmp / f"store-{jobs}.arrow"
    rows = write_store(iter_ticks(csv, master), path)
    store = TickStore(path)
    job = gridmod.GridJob(str(path), STRATEGY, cfg, gridmod.MasterSpec(str(home)))
    with gridmod.Runner(job, jobs) as runner:
        report = gridmod.sweep(runner, grid, strategy=STRATEGY, fixed={}, cfg=cfg, days=store.days(),
                               ticks=rows)  # fmt: skip
    store.close()
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool has been joined: all counted
    cpu = children.ru_utime + children.ru_stime - children0.ru_utime - children0.ru_stime
    return wall, cpu, report["results"]


def run(n: int, jobs: int = 2) -> dict[str, Any]:
    cfg = load_config(env={})
    master = MasterData.load()
    grid = gridmod.parse_grid(GRID, registry.load(STRATEGY), {})
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"  # no cached master here: the bundled paper master, as `MasterData.load()`
        csv = tmp / "walk.csv"
        write_walk(csv, n)
        t0 = time.perf_counter()
        baseline = []
        for combo in grid.combinations():
            result = run_backtest(iter_ticks(csv, master), STRATEGY, combo, cfg=cfg, master=master)
            s = result.report["summary"]
            baseline.append({"params": combo, **{k: s[k] for k in KEYS}})
        baseline_s = time.perf_counter() - t0
        one_s, _, one = _timed_grid(csv, tmp, 1, home)
        many_s, many_cpu, many = _timed_grid(csv, tmp, jobs, home)

    def table(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((tuple(r["params"].values()), *(r[k] for k in KEYS)) for r in rows)

    if not table(baseline) == table(one) == table(many):
        raise SystemExit("bench_grid: the grid's results differ from the runs one by one")
    return {
        "ticks": n,
        "strategy": STRATEGY,
        "grid": GRID,
        "combinations": grid.size,
        "jobs": jobs,
        "cpu_count": os.cpu_count(),
        "baseline_serial_s": round(baseline_s, 2),
        "grid_jobs_1_s": round(one_s, 2),
        "grid_jobs_n_s": round(many_s, 2),
        "workers_cpu_s": round(many_cpu, 2),
        # how much of the N cores the workers had over the run (N if nothing else was running)
        "workers_cores_used": round(many_cpu / many_s, 2),
        "speedup": round(one_s / many_s, 2),
        "vs_baseline": round(baseline_s / many_s, 2),
        "best": max(many, key=lambda r: r["net_pnl"])["params"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=200_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.ticks, args.jobs)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"ticks: {res['ticks']:,}  {res['combinations']} combinations of {STRATEGY} "
          f"({' x '.join(GRID)}), {res['cpu_count']} cores")  # fmt: skip
    print(f"baseline, one after another, each reading the CSV: {res['baseline_serial_s']:>7.2f} s")
    print(f"grid --jobs 1 (decoded once):                       {res['grid_jobs_1_s']:>7.2f} s")
    print(f"grid --jobs {res['jobs']}:                                      {res['grid_jobs_n_s']:>7.2f} s  "
          f"(speedup {res['speedup']}x over --jobs 1, {res['vs_baseline']}x over the baseline)")
    print(f"the workers used {res['workers_cpu_s']:.2f} CPU-s: {res['workers_cores_used']} of {res['jobs']} "
          f"cores on average")  # fmt: skip


if __name__ == "__main__":
    main()
