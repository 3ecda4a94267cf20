"""Run the benchmarks with modest sizes and print one summary (``make bench``, ``neopulse bench``).

    python -m benchmarks.run_all [feed|execution|backtest|pipeline|grid ...] [--full] [--json]

Each benchmark runs in its own process (``python -m benchmarks.bench_<name> --json``) with the
sizes below, chosen so that the five together take about a minute (three at most) on a 2-core machine;
``--full`` uses each benchmark's own defaults instead. The summary gives each one's headline
figures beside its target: feed at least 200,000 ticks/s to a subscriber with no gaps, and the
per-hop latency recorder costing at most 2 % of it (A/B runs, recorder on vs off); execution
at least 1,000 paper orders/s acknowledged; backtest at least 100,000 ticks per CPU-second with
``momentum``, 250,000 with ``ema_cross`` on 1-second bars and 300,000 with it on 5-second bars and
with ``macd`` on 5-second bars;
pipeline (tick to durable paper order) p50 at most twice the raw floor measured in the same run,
p99 at most 3 ms and at most twice the raw floor's p99; the same path in one asyncio process
(``bench_inprocess``, interleaved with the pipeline's rounds) with the multi-process design's
p50 at most 1.3x and p99 at most 1.5x of it, and the services' idle CPU; grid (nine
backtests) the speedup of 2 jobs over 1, which has no target (it depends on how idle the cores
are), beside the one-by-one baseline and the CPU the workers got.
Benchmarks are measurements, not tests: a missed target is reported, and the exit status is 1
only when a benchmark failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name → (arguments for the quick run, seconds allowed)
BENCHES: dict[str, tuple[list[str], float]] = {
    "feed": (["--ticks", "200000", "--pairs", "3"], 240.0),
    "execution": (["--orders", "2000", "--inserts", "500", "--single", "300"], 300.0),
    "backtest": (["--ticks", "200000", "--repeat", "5"], 300.0),
    "pipeline": (["--orders", "400", "--idle-s", "5"], 300.0),
    "grid": (["--ticks", "40000", "--jobs", "2"], 300.0),
}


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _feed(r: dict[str, Any]) -> list[str]:
    from benchmarks.bench_feed import latency_lines

    f = r["feed"]
    return [
        f"feed -> subscriber {f['per_s']:,.0f} ticks/s ({r['feed_vs_raw']:.0%} of raw pyzmq "
        f"{r['raw_pyzmq']['per_s']:,.0f} msgs/s), {r['ticks']:,} ticks, gaps {f['gaps']}",
        f"target >= 200k ticks/s with no gaps: {_mark(r['meets_target'])}",
        *latency_lines(r),
    ]


def _execution(r: dict[str, Any]) -> list[str]:
    s = r["service"]
    a, p = s["ack_round_trip"], s["ack_round_trip_paced"]
    raw = r["raw_psycopg_insert_commit"]
    return [
        f"paper orders {s['acked_per_s']:,} acked/s, {s['complete_per_s']:,} complete/s "
        f"(window {s['window']}, {s['orders']:,} orders)",
        f"ExecuteOrder -> ack p50 {a['p50_ms']:.3f} / p99 {a['p99_ms']:.3f} ms; "
        f"paced p50 {p['p50_ms']:.3f} ms; raw INSERT+COMMIT p50 {raw['p50_ms']:.3f} ms",
        f"target >= 1,000 orders/s: {_mark(s['acked_per_s'] >= 1000)}",
    ]


def _backtest(r: dict[str, Any]) -> list[str]:
    from benchmarks.bench_backtest import target_lines

    return [
        f"{r['strategy']}: {r['pipeline_ticks_per_s']:,} ticks/s in memory "
        f"({r['pipeline_ticks_per_cpu_s']:,} per CPU-second), end to end from CSV "
        f"{r['end_to_end_ticks_per_s']:,}/s; {r['trades']} trades",
        f"ticks per CPU-second, each case in its own process, best of {r['repeat']} runs:",
        *(f"  {line}" for line in target_lines(r["targets"])),
    ]


def _pipeline(r: dict[str, Any]) -> list[str]:
    from benchmarks.bench_pipeline import design_lines

    t = r["tick_to_ack"]
    lines = [
        f"tick -> durable paper order p50 {t['p50_ms']:.3f} / p99 {t['p99_ms']:.3f} ms over {t['n']} "
        f"{r['kind']} orders; raw floor (PUB/SUB + 2 round trips + insert) {r['raw_sum_p50_ms']:.3f} ms",
        f"target p50 <= 2x floor (ratio {r['ratio_p50']}): {_mark(r['meets_p50'])}; "
        f"p99 <= 3 ms: {_mark(r['meets_p99'])}",
        *design_lines(r),
    ]
    if "idle_cpu_pct" in r:
        lines.append(f"idle CPU over {r['idle_s']:g} s: " + ", ".join(
            f"{k} {v:.2f} %" for k, v in r["idle_cpu_pct"].items()) + f" (bus.spin_us {r['spin_us']})")
    return lines


def _grid(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['combinations']} {r['strategy']} backtests over {r['ticks']:,} ticks: --jobs {r['jobs']} "
        f"{r['grid_jobs_n_s']:.2f} s, --jobs 1 {r['grid_jobs_1_s']:.2f} s, one by one (each reading "
        f"the CSV) {r['baseline_serial_s']:.2f} s",
        f"speedup {r['speedup']}x over --jobs 1, {r['vs_baseline']}x over one by one; the workers got "
        f"{r['workers_cores_used']} of {r['jobs']} cores ({r['cpu_count']} on the machine; no target)",
    ]


SUMMARY: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "feed": _feed, "execution": _execution, "backtest": _backtest, "pipeline": _pipeline, "grid": _grid,
}


def run_one(name: str, full: bool = False) -> dict[str, Any]:
    """Run one benchmark in its own process; returns ``{"ok", "seconds", "result" | "error"}``."""
    args, timeout = BENCHES[name]
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--json", *([] if full else args)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout * (4 if full else 1))
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": round(time.monotonic() - t0, 1), "error": "timed out"}
    seconds = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"ok": False, "seconds": seconds, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    out = proc.stdout
    try:  # the JSON document is the last thing printed
        result = json.loads(out[out.index("{"):])
    except ValueError:
        return {"ok": False, "seconds": seconds, "error": f"no JSON in the output: {out[-300:]!r}"}
    return {"ok": True, "seconds": seconds, "result": result}


def summary_lines(name: str, outcome: dict[str, Any]) -> list[str]:
    head = f"== {name} ({outcome['seconds']} s)"
    if not outcome["ok"]:
        return [head, f"   FAILED: {outcome['error']}"]
    try:
        body = SUMMARY[name](outcome["result"])
    except (KeyError, TypeError, ValueError) as exc:  # a benchmark changed its output
        body = [f"(no summary: {type(exc).__name__}: {exc}); see --json"]
    return [head, *(f"   {line}" for line in body)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"which to run (default all): {', '.join(BENCHES)}")
    ap.add_argument("--full", action="store_true", help="each benchmark's own (larger) default sizes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    names = list(dict.fromkeys(args.names)) or list(BENCHES)
    header = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
    }
    if not args.json:
        print(f"machine: {header['machine']}; load average (1 min) {header['load_avg_1m_before']}",
              flush=True)
    t0 = time.monotonic()
    outcomes: dict[str, dict[str, Any]] = {}
    for name in names:
        if not args.json:
            print(f"running {name} ...", flush=True)
        outcomes[name] = run_one(name, args.full)
        if not args.json:
            print("\n".join(summary_lines(name, outcomes[name])), flush=True)
    total = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps({**header, "seconds": total, "load_avg_1m_after": round(os.getloadavg()[0], 2),
                          "benchmarks": outcomes}, indent=2))
    else:
        failed = [n for n, o in outcomes.items() if not o["ok"]]
        print(f"done in {total} s; load average (1 min) now {os.getloadavg()[0]:.2f}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if any(not o["ok"] for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
