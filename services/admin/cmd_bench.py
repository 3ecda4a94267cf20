"""``neopulse bench [feed|execution|backtest|pipeline|grid] [--full] [--json]`` — the benchmarks.

They live in ``benchmarks/`` of a source checkout, which is not an installed package: the
command finds that directory next to ``services/`` (an editable install) or in the current
directory, and runs ``python -m benchmarks.run_all`` there. Without a checkout (e.g. in the
Docker image) it says so and exits 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from services.admin.cli import app
from services.admin.common import EXIT_USAGE, JSON_OPT, fail

NAMES = ("feed", "execution", "backtest", "pipeline", "grid")


def find_checkout(candidates: list[Path] | None = None) -> Path | None:
    """The directory holding ``benchmarks/run_all.py``: the repository this package was loaded
    from, else the current directory; None when neither has it."""
    if candidates is None:
        candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "benchmarks" / "run_all.py").is_file():
            return root
    return None


@app.command("bench")
def bench(
    name: str = typer.Argument("", help=f"One benchmark ({', '.join(NAMES)}); all when omitted."),
    full: bool = typer.Option(False, "--full", help="Each benchmark's own (larger) default sizes."),
    as_json: bool = JSON_OPT,
) -> None:
    """Run the benchmarks (modest sizes, about a minute in all) and print each figure beside its target.

    The targets:
    feed: at least 200,000 ticks/s reach a subscriber, with no gaps;
    execution: at least 1,000 paper orders/s acknowledged;
    backtest: at least 100,000 ticks per CPU-second with momentum, 250,000 with ema_cross on
    1-second bars, 300,000 with ema_cross and with macd on 5-second bars;
    pipeline: tick to durable paper order p50 at most 2x the raw floor, p99 at most 3 ms
    and at most 2x the floor's p99 (the floor: raw PUB/SUB, two round trips and one insert,
    measured in the same run); beside it the same path in one process, with the
    multi-process p50 at most 1.3x and p99 at most 1.5x of it;
    grid: nine backtests with --jobs 2 against --jobs 1 (the speedup, no target).
    A missed target is reported, not failed: the exit status is 1 only when a benchmark could not run.
    """
    if name and name not in NAMES:
        fail(f"unknown benchmark {name!r}: choose from {', '.join(NAMES)}", EXIT_USAGE)
    root = find_checkout()
    if root is None:
        fail("the benchmarks are not here: `neopulse bench` needs a source checkout of NeoPulse "
             "(its benchmarks/ directory is not installed with the package); run it from the "
             "repository, e.g. `make bench`", EXIT_USAGE)
    cmd = [sys.executable, "-m", "benchmarks.run_all", *([name] if name else []),
           *(["--full"] if full else []), *(["--json"] if as_json else [])]
    raise typer.Exit(subprocess.call(cmd, cwd=root))  # noqa: S603 - our own module, fixed arguments
