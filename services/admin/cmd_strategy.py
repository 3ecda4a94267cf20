"""``neopulse backtest`` (and ``neopulse strategies``): replay ticks through a strategy and the
paper pipeline, in-process; print or save the report and the equity curve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from libs.common import config as config_mod
from libs.common.config import ConfigError
from libs.common.log import setup_logging
from services.admin.cli import app
from services.admin.common import EXIT_USAGE, JSON_OPT, fail, get_config


def _params(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--param expects key=value, got {pair!r}", EXIT_USAGE)
        out[key.strip()] = value.strip()
    return out


TicksOpt = Annotated[Path, typer.Option("--ticks", help="Recorded tick file, CSV, or a directory of them.")]
StrategyOpt = Annotated[
    str, typer.Option("--strategy", help="Strategy name (momentum, macd) or pkg.module:Class.")
]
ParamOpt = Annotated[
    list[str] | None, typer.Option("--param", help="Strategy parameter, key=value (repeatable).")
]
InstrumentsOpt = Annotated[str, typer.Option("--instruments", help="Only these symbols (comma-separated).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for report.json and equity.png.")]
IdOpt = Annotated[str, typer.Option("--id", help="Strategy instance id used in the run.")]


@app.command("backtest")
def backtest(  # noqa: PLR0917 - one parameter per CLI option
    ticks: TicksOpt,
    strategy: StrategyOpt,
    param: ParamOpt = None,
    instruments: InstrumentsOpt = "",
    out: OutOpt = None,
    strategy_id: IdOpt = "bt",
    as_json: bool = JSON_OPT,
) -> None:
    """Replay recorded ticks through a strategy, risk and paper execution (same code as live).

    The report has trades, win rate, gross PnL, cost (turnover x 0.00035), net PnL, max
    drawdown and exposure time. With the same input it is byte-identical from run to run.
    """
    from services.backtest.report import render_text, to_json, write_equity_png
    from services.backtest.runner import BacktestError, master_for_recording, run_backtest
    from services.feed.sources.replay import iter_ticks
    from services.strategy.base import ParamsError

    cfg = get_config()
    home = config_mod.home_dir()
    log = setup_logging("backtest", home, cfg.log.level, config_mod.secret_values(cfg), console=False)
    if not ticks.exists():
        fail(f"no such file or directory: {ticks}", EXIT_USAGE)
    names = [s.strip() for s in instruments.split(",") if s.strip()]
    try:
        master = master_for_recording(home, ticks)  # the recording's day: its contracts' tokens
        result = run_backtest(
            iter_ticks(ticks, master),
            strategy,
            _params(param or []),
            cfg=cfg,
            master=master,
            strategy_id=strategy_id,
            instruments=names or None,
            log=log,
        )
    except (BacktestError, ParamsError, ConfigError, FileNotFoundError) as exc:
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


@app.command("strategies")
def strategies() -> None:
    """List the built-in strategies (any package.module:Class works too)."""
    from services.strategy import registry

    for name in registry.names():
        cls = registry.load(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        typer.echo(f"{name:12s} {doc}")
