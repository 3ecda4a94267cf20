"""``neopulse backtest`` (and ``neopulse strategies``): replay ticks through a strategy and the
paper pipeline, in-process; print or save the report and the equity curve."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from libs.common import config as config_mod
from libs.common.config import ConfigError
from libs.common.log import setup_logging
from services.admin.cli import app
from services.admin.common import EXIT_USAGE, JSON_OPT, fail, get_config

if TYPE_CHECKING:
    from libs.common.config import Config
    from libs.common.instruments import MasterData
    from libs.common.messages import Tick


def _params(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--param expects key=value, got {pair!r}", EXIT_USAGE)
        out[key.strip()] = value.strip()
    return out


TicksOpt = Annotated[
    Path | None, typer.Option("--ticks", help="Recorded tick file, CSV, or a directory of them (or --sim).")
]
StrategyOpt = Annotated[
    str, typer.Option("--strategy", help="Strategy name (momentum, macd, straddle, ...) or pkg.module:Class.")
]
SimOpt = Annotated[
    str, typer.Option("--sim", metavar="YYYY-MM-DD",
                      help="Simulate this trading day instead of a recording: the index and its "
                           "options (that day's weekly contracts), 09:15-15:30 IST.")
]  # fmt: skip
SimPathOpt = Annotated[
    str, typer.Option("--sim-path", metavar="HH:MM=PCT,...",
                      help="Script the index instead of a random walk: percent from the open at "
                           "each time, straight lines between, e.g. 09:15=0,10:30=+0.8,15:30=+0.8.")
]  # fmt: skip
SimUnderlyingOpt = Annotated[
    str, typer.Option("--sim-underlying",
                      help="Index to simulate (default: the strategy's `underlying` param, else NIFTY).")
]  # fmt: skip
SimEveryOpt = Annotated[
    float, typer.Option("--sim-every", help="Seconds between simulated ticks of each instrument.")
]
SimStrikesOpt = Annotated[
    int, typer.Option("--sim-strikes", help="Simulated strikes either side of the open's ATM.")
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", help="Strategy parameter, key=value (repeatable).")
]
InstrumentsOpt = Annotated[str, typer.Option("--instruments", help="Only these symbols (comma-separated).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for report.json and equity.png.")]
IdOpt = Annotated[str, typer.Option("--id", help="Strategy instance id used in the run.")]
HistoryOpt = Annotated[
    list[str] | None, typer.Option("--history", metavar="SYMBOL",
                                   help="Replay stored candles of this symbol (repeatable, or comma-"
                                        "separated; see `neopulse history fetch`).")
]  # fmt: skip
FromOpt = Annotated[str, typer.Option("--from", metavar="YYYY-MM-DD", help="--history: first day (IST).")]
ToOpt = Annotated[str, typer.Option("--to", metavar="YYYY-MM-DD", help="--history: last day (IST).")]
IntervalOpt = Annotated[str, typer.Option("--interval", help="--history: 1m, 5m, 15m, 1h or 1d.")]
GridOpt = Annotated[
    list[str] | None, typer.Option("--grid", metavar="NAME=V1,V2,...",
                                   help="Sweep a parameter over these values (repeatable): every "
                                        "combination of the --grid options is one backtest, ranked "
                                        "by net PnL after costs.")
]  # fmt: skip
JobsOpt = Annotated[
    int, typer.Option("--jobs", metavar="N", show_default=False,
                      help="--grid: worker processes (default: one per core, os.cpu_count()).")
]  # fmt: skip
YesOpt = Annotated[
    bool, typer.Option("--yes", help=f"--grid: run even more than {10_000:,} backtests.")
]
TopOpt = Annotated[
    int, typer.Option("--top", metavar="N", help="--grid: rows of the ranked table printed (0: all; "
                                                 "--json always has every row).")
]  # fmt: skip
WalkForwardOpt = Annotated[
    int, typer.Option("--walk-forward", metavar="K", show_default=False,
                      help="With --grid: split the trading days into K+1 blocks; in each of K folds "
                           "pick the best combination on one block and test it on the next.")
]  # fmt: skip
AnchoredOpt = Annotated[
    bool, typer.Option("--anchored",
                       help="--walk-forward: optimise on every day up to the fold (default: rolling, "
                            "the one block before it).")
]  # fmt: skip
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", metavar="PATH",
                              help="--walk-forward: the out-of-sample equity PNG (default "
                                   "$NEOPULSE_HOME/reports/walk-forward-<strategy>.png).")
]  # fmt: skip


@app.command("backtest")
def backtest(  # noqa: PLR0917 - one parameter per CLI option
    strategy: StrategyOpt,
    ticks: TicksOpt = None,
    param: ParamOpt = None,
    instruments: InstrumentsOpt = "",
    out: OutOpt = None,
    strategy_id: IdOpt = "bt",
    sim: SimOpt = "",
    sim_path: SimPathOpt = "",
    sim_underlying: SimUnderlyingOpt = "",
    sim_every: SimEveryOpt = 1.0,
    sim_strikes: SimStrikesOpt = 8,
    history: HistoryOpt = None,
    from_: FromOpt = "",
    to: ToOpt = "",
    interval: IntervalOpt = "1m",
    grid: GridOpt = None,
    jobs: JobsOpt = 0,
    yes: YesOpt = False,
    top: TopOpt = 20,
    walk_forward: WalkForwardOpt = 0,
    anchored: AnchoredOpt = False,
    plot: PlotOpt = None,
    as_json: bool = JSON_OPT,
) -> None:
    """Replay recorded ticks (--ticks) or a simulated day with options (--sim) through a
    strategy, risk and paper execution (the same code as live), or stored Kotak candles
    (--history SYMBOL --from --to [--interval]: each candle is replayed as four trades, open,
    low/high, close; a strategy with a ``bar_seconds`` parameter gets the candle length unless
    --param sets it).

    The report has every trade (each basket leg on its own line: entry, exit and why, PnL),
    win rate, gross PnL, cost (turnover x 0.00035), net PnL, max drawdown, exposure time and
    what execution did on the way (a stop moved to cost, a trailed stop). With the same input
    it is byte-identical from run to run.

    With --grid NAME=V1,V2,... (repeatable) every combination runs, on --jobs processes that
    share one decoded copy of the ticks, and the table ranks them by net PnL after costs
    (equal nets by parameter values); --walk-forward K then tests the in-sample winners on
    the days after their window.

    \b
    neopulse backtest --strategy straddle --sim 2026-12-03 --sim-path 09:15=0,10:30=+0.8,15:30=+0.8
    neopulse backtest --ticks var/ticks --strategy macd --grid fast=8,12,16 --grid slow=21,26,34
    neopulse backtest --ticks var/ticks --strategy macd --grid fast=8,12 --grid slow=21,26 --walk-forward 4
    """
    from services.backtest.report import render_text, to_json, write_equity_png
    from services.backtest.runner import BacktestError, run_backtest
    from services.backtest.simday import SimDayError
    from services.history.store import HistoryInputError
    from services.strategy.base import ParamsError

    cfg = get_config()
    home = config_mod.home_dir()
    log = setup_logging("backtest", home, cfg.log.level, config_mod.secret_values(cfg), console=False)
    if sum((ticks is not None, bool(sim), bool(history))) != 1:
        fail("backtest: give either --ticks (a recording), --sim YYYY-MM-DD (a simulated day) or --history "
             "SYMBOL --from --to (stored candles)", EXIT_USAGE)  # fmt: skip
    if ticks is not None and not ticks.exists():
        fail(f"no such file or directory: {ticks}", EXIT_USAGE)
    names = [s.strip() for s in instruments.split(",") if s.strip()]
    params = _params(param or [])
    if grid or walk_forward or anchored or plot is not None:
        opts = GridOptions(grid or [], jobs, yes, walk_forward, anchored, plot, as_json, top)
        _grid(cfg, home, strategy, params, names, strategy_id, opts, ticks=ticks, sim=sim,
              sim_args=(sim_path, sim_underlying, sim_every, sim_strikes),
              history=(history or [], interval, from_, to), out=out)  # fmt: skip
        return
    try:
        if history:
            source, master, keys = _history(home, history, interval, from_, to, strategy, params)
            names = names or keys
        elif ticks is not None:
            source, master = _recording(home, ticks)
        else:
            underlying = sim_underlying or params.get("underlying", "NIFTY")
            source, master = _sim_day(cfg, home, sim, sim_path, underlying, sim_every, sim_strikes)
        result = run_backtest(
            source,
            strategy,
            params,
            cfg=cfg,
            master=master,
            strategy_id=strategy_id,
            instruments=names or None,
            log=log,
        )
    except (BacktestError, ParamsError, ConfigError, FileNotFoundError, SimDayError,
            HistoryInputError) as exc:  # fmt: skip
        fail(f"backtest: {exc}", EXIT_USAGE)
    report = result.report
    text = to_json(report)
    speed = f"replayed {result.ticks:,} ticks in {result.elapsed_s:.2f} s ({result.ticks_per_s:,.0f} ticks/s)"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(text)
        write_equity_png(report, out / "equity.png")
    if as_json:
        sys.stdout.write(text)
        typer.echo(speed, err=True)
    else:
        typer.echo(render_text(report))
        typer.echo(f"  {speed}")
        if out is not None:
            typer.echo(f"  wrote {out / 'report.json'} and {out / 'equity.png'}")


@dataclass(frozen=True)
class GridOptions:
    specs: list[str]
    jobs: int
    yes: bool
    walk_forward: int
    anchored: bool
    plot: Path | None
    as_json: bool
    top: int = 20


EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


def _grid(  # noqa: PLR0917, PLR0915 - the options of `backtest --grid`, checked in the order given
    cfg: Config, home: Path, strategy: str, fixed: dict[str, str], names: list[str], strategy_id: str,
    opts: GridOptions, *, ticks: Path | None, sim: str, sim_args: tuple[str, str, float, int],
    history: tuple[list[str], str, str, str], out: Path | None,
) -> None:
    """``backtest --grid``: validate everything first, decode the ticks once, run the pool."""
    import os
    import re
    import tempfile
    import time

    from services.backtest import grid as gridmod
    from services.backtest.report import to_json
    from services.backtest.simday import SimDayError
    from services.backtest.tickstore import TickStore, write_store
    from services.history.store import HistoryInputError
    from services.strategy import registry
    from services.strategy.base import ParamsError

    if out is not None:
        fail("backtest: --out is for a single backtest; with --grid use --json (and --plot for "
             "--walk-forward)", EXIT_USAGE)  # fmt: skip
    if not opts.specs:
        fail("backtest: --walk-forward, --anchored and --plot need --grid NAME=V1,V2,... (the "
             "parameters to optimise)", EXIT_USAGE)  # fmt: skip
    if not opts.walk_forward and (opts.anchored or opts.plot is not None):
        fail("backtest: --anchored and --plot go with --walk-forward K", EXIT_USAGE)
    if opts.jobs < 0:
        fail(f"backtest: --jobs must be 1 or more, got {opts.jobs}", EXIT_USAGE)
    try:
        cls = registry.load(strategy)
        cls.parse_params(fixed)
        grid = gridmod.parse_grid(opts.specs, cls, fixed)
        folds_k = opts.walk_forward
        runs = grid.size * folds_k + folds_k if folds_k else grid.size
        what = (f"--walk-forward {folds_k} over {grid.size:,} combinations" if folds_k
                else f"the grid ({grid.label()})")  # fmt: skip
        gridmod.check_runs(runs, what, opts.yes)
    except registry.UnknownStrategy as exc:
        fail(f"backtest: {exc}", EXIT_USAGE)
    except (ParamsError, gridmod.GridError) as exc:
        fail(f"backtest: {exc}", EXIT_USAGE)
    if folds_k < 0:
        fail(f"backtest: --walk-forward K must be at least 1, got {folds_k}", EXIT_USAGE)
    label = cls.name or cls.__name__
    hist_names, interval, from_, to = history
    try:
        if hist_names:
            source, _, keys = _history(home, hist_names, interval, from_, to, strategy, fixed)
            if "bar_seconds" in grid.names:
                fixed.pop("bar_seconds", None)  # the grid sets it
            names = names or keys
            spec = gridmod.MasterSpec(str(home))
        elif ticks is not None:
            from services.feed.sources.replay import iter_ticks

            spec = gridmod.MasterSpec.for_recording(home, ticks)
            source = iter_ticks(ticks, spec.load())
        else:
            sim_path, sim_underlying, sim_every, sim_strikes = sim_args
            underlying = sim_underlying or fixed.get("underlying", "NIFTY")
            source, _ = _sim_day(cfg, home, sim, sim_path, underlying, sim_every, sim_strikes)
            spec = gridmod.MasterSpec(str(home), dt.date.fromisoformat(sim.strip()))
    except (ConfigError, FileNotFoundError, SimDayError, HistoryInputError) as exc:
        fail(f"backtest: {exc}", EXIT_USAGE)
    jobs = opts.jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="neopulse-grid-") as tmp:
        t0 = time.perf_counter()
        with _status("decoding the ticks once", show=not opts.as_json):
            rows = write_store(source, Path(tmp) / "ticks.arrow")
        decode_s = time.perf_counter() - t0
        if rows == 0:
            fail("backtest: no ticks to replay", EXIT_USAGE)
        store = TickStore(Path(tmp) / "ticks.arrow")
        days = store.days()
        try:
            folds = gridmod.make_folds(days, folds_k, opts.anchored) if folds_k else []
        except gridmod.GridError as exc:
            fail(f"backtest: {exc}", EXIT_USAGE)
        job = gridmod.GridJob(str(store.path), strategy, cfg, spec, fixed, strategy_id, tuple(names))
        jobs = min(jobs, grid.size * max(1, folds_k))
        t0 = time.perf_counter()
        try:
            with _progress(runs, show=not opts.as_json) as advance, gridmod.Runner(job, jobs) as runner:
                if folds:
                    report = gridmod.walk_forward(
                        runner, store, grid, folds, strategy=label, fixed=fixed, cfg=cfg,
                        anchored=opts.anchored, progress=advance,
                    )  # fmt: skip
                else:
                    report = gridmod.sweep(runner, grid, strategy=label, fixed=fixed, cfg=cfg, days=days,
                                           ticks=rows, progress=advance)  # fmt: skip
        except gridmod.GridError as exc:
            fail(f"backtest: {exc}", EXIT_USAGE)
        except KeyboardInterrupt:  # the workers ignore SIGINT; leaving the Runner terminated them
            fail("backtest: interrupted; the grid's workers are stopped", EXIT_INTERRUPTED)
        finally:
            store.close()
    elapsed = time.perf_counter() - t0
    plural = "es" if jobs > 1 else ""
    timing = (f"ran {runs:,} backtests in {elapsed:.1f} s on {jobs} process{plural}; "
              f"{rows:,} ticks decoded once in {decode_s:.1f} s")  # fmt: skip
    png = None
    if folds:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label)
        png = opts.plot or home / "reports" / f"walk-forward-{slug}.png"
        gridmod.write_walk_forward_png(report, png)
        report["plot"] = str(png)
    if opts.as_json:
        sys.stdout.write(to_json(report))
    else:
        text = gridmod.render_walk_forward(report) if folds else gridmod.render_grid(report, max(0, opts.top))
        typer.echo(text)
        if png is not None:
            typer.echo(f"wrote {png}")
    typer.echo(timing, err=True)


@contextmanager
def _progress(total: int, show: bool) -> Iterator[Callable[[], None]]:
    """A progress bar with ETA on stderr, only on a terminal (never with --json)."""
    from rich import progress as rp
    from rich.console import Console

    console = Console(stderr=True)
    enabled = show and console.is_terminal
    columns = (rp.TextColumn("backtests"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
               rp.TextColumn("ETA"), rp.TimeRemainingColumn())  # fmt: skip
    with rp.Progress(*columns, console=console, disable=not enabled, transient=True) as bar:
        task = bar.add_task("backtests", total=total)
        yield lambda: bar.advance(task)


@contextmanager
def _status(text: str, show: bool) -> Iterator[None]:
    from rich.console import Console

    console = Console(stderr=True)
    if not (show and console.is_terminal):
        yield
        return
    with console.status(text):
        yield


def _recording(home: Path, ticks: Path) -> tuple[Iterator[Tick], MasterData]:
    from services.backtest.runner import master_for_recording
    from services.feed.sources.replay import iter_ticks

    master = master_for_recording(home, ticks)  # the recording's day: its contracts' tokens
    return iter_ticks(ticks, master), master


def _history(  # noqa: PLR0917 - the --history options
    home: Path, names: list[str], interval: str, from_: str, to: str, strategy: str, params: dict[str, str]
) -> tuple[Iterator[Tick], MasterData, list[str]]:
    import msgspec

    from libs.common.instruments import MasterData
    from services.admin.cmd_history import history_ticks
    from services.history.store import INTERVAL_S
    from services.strategy import registry

    source, keys = history_ticks(home, names, interval, from_, to)
    try:
        cls = registry.load(strategy)
    except registry.UnknownStrategy:
        cls = None  # run_backtest says so
    fields = {f.name for f in msgspec.structs.fields(cls.Params)} if cls is not None else set()
    if "bar_seconds" in fields and "bar_seconds" not in params and interval in INTERVAL_S:
        params["bar_seconds"] = str(INTERVAL_S[interval])  # one bar per candle
    return source, MasterData.load_for_home(home), keys


def _sim_day(  # noqa: PLR0917 - the --sim options
    cfg: Config, home: Path, day: str, path: str, underlying: str, every_s: float, strikes: int
) -> tuple[Iterator[Tick], MasterData]:
    from libs.common.instruments import MasterData
    from services.backtest.simday import SimDay, SimDayError, parse_path, sim_day_ticks

    try:
        when = dt.date.fromisoformat(day.strip())
    except ValueError:
        raise SimDayError(f"--sim: {day!r} is not a date YYYY-MM-DD") from None
    spec = SimDay(day=when, underlying=underlying, every_s=every_s, strikes=strikes, path=parse_path(path))
    master = MasterData.load_for_home(home, today=when)  # that day's contracts (paper master)
    return sim_day_ticks(spec, master, cfg.feed), master


@app.command("strategies")
def strategies() -> None:
    """List the built-in strategies (any package.module:Class works too)."""
    from services.strategy import registry

    for name in registry.names():
        cls = registry.load(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:12s} {doc}")
