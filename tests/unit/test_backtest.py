"""Backtests: determinism, MACD trades at the crossovers a batch MACD predicts, internal
consistency of the report, isolation of a raising strategy, the CLI and the chart."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import Tick
from services.admin import cli
from services.backtest.report import _iso
from services.backtest.runner import BacktestError, run_backtest
from services.feed.sources.replay import iter_ticks
from services.strategy.base import Strategy
from tests.unit.test_indicators import batch_macd

MASTER = MasterData.load()
S = 1_000_000_000
T0 = 1_704_167_100 * S  # 2024-01-02 09:15:00 IST, a minute boundary


class Raiser(Strategy):
    """Queues an order and raises on every tick (loaded by dotted path)."""

    name = "raiser"

    def on_tick(self, tick: Tick) -> None:
        self.buy(tick, 1)
        raise RuntimeError("strategy bug")


def write_csv(path: Path, rows: list[tuple[int, str, float]]) -> Path:
    lines = ["ts,segment,token,ltp,qty"]
    for ts, symbol, price in rows:
        inst = MASTER.resolve(symbol)
        lines.append(f"{ts},{inst.segment},{inst.token},{price:.2f},{1 + ts // S % 7}")
    path.write_text("\n".join(lines) + "\n")
    return path


def random_walk_csv(
    path: Path,
    n_per_symbol: int = 3000,
    seed: int = 11,
    symbols: tuple[str, ...] = ("RELIANCE-EQ", "INFY-EQ", "SBIN-EQ"),
) -> Path:
    rng = random.Random(seed)
    prices = {s: MASTER.resolve(s).ref_price for s in symbols}
    rows = []
    for i in range(n_per_symbol):
        for j, s in enumerate(symbols):
            prices[s] *= 1 + rng.uniform(-0.0012, 0.0012)
            rows.append((T0 + i * 250_000_000 + j * 1_000_000, s, prices[s]))
    return write_csv(path, rows)


def _run(path: Path, strategy: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = load_config(env={"NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER": ""})  # the day's crossovers to its end
    return run_backtest(iter_ticks(path, MASTER), strategy, params or {}, cfg=cfg, master=MASTER).report


@pytest.fixture
def cli_runner() -> CliRunner:
    cli._register()
    return CliRunner()


def test_json_output_is_byte_identical_across_runs(tmp_path: Path, cli_runner: CliRunner) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv")
    args = [
        "backtest",
        "--ticks",
        str(csv_path),
        "--strategy",
        "momentum",
        "--param",
        "entry_pct=0.3",
        "--json",
    ]
    first = cli_runner.invoke(cli.app, args)
    second = cli_runner.invoke(cli.app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    report = json.loads(first.stdout)
    assert report["summary"]["trades"] > 3 and report["params"]["entry_pct"] == 0.3


def test_report_is_internally_consistent(tmp_path: Path) -> None:
    report = _run(random_walk_csv(tmp_path / "walk.csv"), "momentum")
    s = report["summary"]
    assert s["trades"] > 3 and s["fills"] >= 2 * s["closed_trades"]
    assert s["net_pnl"] == pytest.approx(s["gross_pnl"] - s["turnover"] * 0.00035, abs=1e-6)
    assert s["cost"] == pytest.approx(s["turnover"] * 0.00035, abs=1e-6)
    assert sum(t["pnl"] for t in report["trade_list"]) == pytest.approx(s["gross_pnl"], abs=1e-6)
    assert report["equity_curve"][-1][1] == s["net_pnl"]
    assert report["equity_curve"][0][1] == 0.0
    # risk's own bookkeeping of the same day agrees with the report
    assert report["risk"]["net_pnl"] == pytest.approx(s["net_pnl"], abs=0.01)
    assert report["risk"]["turnover"] == pytest.approx(s["turnover"], abs=0.01)
    assert 0 <= s["win_rate"] <= 1 and s["max_drawdown"] >= 0 and 0 < s["exposure_pct"] <= 100


def _macd_path() -> list[tuple[int, str, float]]:
    """INFY: one tick every 10 s for 6 hours; a slow sine wave on a mild trend."""
    rows = []
    for i in range(6 * 360):
        t = i * 10
        price = 1500 + 0.002 * t + 12 * math.sin(2 * math.pi * t / 2400) + 3 * math.sin(2 * math.pi * t / 530)
        rows.append((T0 + t * S, "INFY-EQ", round(price, 1)))
    return rows


def test_macd_trades_at_the_crossovers_a_batch_macd_predicts(tmp_path: Path) -> None:
    rows = _macd_path()
    report = _run(write_csv(tmp_path / "infy.csv", rows), "macd")
    # batch: 1-minute closes (last tick of each minute), MACD(12, 26, 9), sign changes of the histogram
    closes: dict[int, float] = {}
    for ts, _, price in rows:
        closes[(ts - T0) // (60 * S)] = price
    minutes = sorted(closes)
    _, _, hist = batch_macd([closes[m] for m in minutes], 12, 26, 9)
    ups, downs = [], []
    for i in range(1, len(hist)):
        a, b = hist[i - 1], hist[i]
        if a is None or b is None:
            continue
        bar_end = T0 + (minutes[i] + 1) * 60 * S  # the bar closes; the next tick acts on it
        if a <= 0 < b:
            ups.append(_iso(bar_end))
        elif a >= 0 > b:
            downs.append(_iso(bar_end))
    assert len(ups) >= 3 and len(downs) >= 3
    trades = report["trade_list"]
    entries = [t["entry_time"] for t in trades]
    exits = [t["exit_time"] for t in trades if t["exit_time"]]
    assert all(t["direction"] == "LONG" for t in trades)
    # long at every up-cross, flat at every down-cross that follows one
    assert entries == ups
    assert exits == [d for d in downs if d > ups[0]][: len(exits)]
    assert len(exits) >= len(entries) - 1
    assert report["orders"]["rejected"] == 0


def test_on_tick_raising_is_isolated_in_a_backtest(tmp_path: Path) -> None:
    report = _run(random_walk_csv(tmp_path / "w.csv", 100), "tests.unit.test_backtest:Raiser")
    assert report["errors"] == 300
    assert report["orders"]["requested"] == 0  # nothing half-built ever reached risk
    assert report["ticks"] == 300 and report["halted"] == ""


def test_cli_writes_report_and_equity_png(tmp_path: Path, cli_runner: CliRunner) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv", 1500)
    out = tmp_path / "out"
    result = cli_runner.invoke(
        cli.app, ["backtest", "--ticks", str(tmp_path), "--strategy", "momentum", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "net PnL" in result.stdout and "ticks/s" in result.stdout
    assert (out / "equity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["ticks"] == 4500
    assert csv_path.exists()


def test_cli_usage_errors_exit_2(tmp_path: Path, cli_runner: CliRunner) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv", 10)
    result = cli_runner.invoke(cli.app, ["backtest", "--ticks", str(csv_path), "--strategy", "nosuch"])
    assert result.exit_code == 2 and "unknown strategy" in result.output
    result = cli_runner.invoke(
        cli.app, ["backtest", "--ticks", str(csv_path), "--strategy", "momentum", "--param", "lookback=zero"]
    )
    assert result.exit_code == 2 and "lookback" in result.output
    result = cli_runner.invoke(
        cli.app, ["backtest", "--ticks", str(tmp_path / "missing.csv"), "--strategy", "momentum"]
    )
    assert result.exit_code == 2


def test_no_ticks_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_text("ts,segment,token,ltp,qty\n")
    with pytest.raises(BacktestError, match="no ticks"):
        _run(empty, "momentum")


def test_strategies_lists_the_builtins(cli_runner: CliRunner) -> None:
    result = cli_runner.invoke(cli.app, ["strategies"])
    assert result.exit_code == 0
    assert "momentum" in result.stdout and "macd" in result.stdout


def test_a_strategys_max_loss_applies_in_a_backtest_run_under_its_own_id(tmp_path: Path) -> None:
    path = random_walk_csv(tmp_path / "walk.csv")
    free = _run(path, "momentum")
    toml = tmp_path / "neopulse.toml"
    toml.write_text('[[strategy]]\nname = "momentum"\nid = "mom1"\nmax_loss = 1.0\n')
    cfg = load_config(toml, env={"NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER": ""})
    assert cfg.strategy[0].max_loss == 1.0

    capped = run_backtest(iter_ticks(path, MASTER), "momentum", {}, cfg=cfg, master=MASTER).report

    assert free["summary"]["trades"] > 3
    stopped = [why for why in capped["rejections"] if "strategy bt is stopped for the day" in why]
    assert stopped and "reached its max_loss -1.00" in stopped[0]  # stopped once it lost a rupee
    assert capped["summary"]["trades"] < free["summary"]["trades"]
    assert capped["summary"]["open_trades"] == 0  # squared off when it stopped


def test_each_day_of_a_multi_day_backtest_starts_with_no_strategy_stopped(tmp_path: Path) -> None:
    day2 = 86_400 * 1_000_000_000
    rows = [(T0 + i * 250_000_000, "RELIANCE-EQ", 1290.0 * (1 + 0.0005 * ((i // 40) % 2 * 2 - 1) * (i % 40)))
            for i in range(2400)]  # fmt: skip
    path = write_csv(tmp_path / "two-days.csv", rows + [(t + day2, s, p) for t, s, p in rows])
    toml = tmp_path / "neopulse.toml"
    toml.write_text('[[strategy]]\nname = "momentum"\nid = "mom1"\nmax_loss = 1.0\n')
    cfg = load_config(toml, env={"NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER": ""})

    report = run_backtest(iter_ticks(path, MASTER), "momentum", {}, cfg=cfg, master=MASTER).report

    days = {t["entry_time"][:10] for t in report["trade_list"]}
    assert len(days) == 2, days  # stopped on the first day, trading again on the second
