"""The README's "write a strategy" example, verbatim: it loads by dotted path from the
current directory and trades in a backtest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.admin import cli
from tests.unit.test_backtest import random_walk_csv

README_EXAMPLE = '''
from collections import deque

from services.strategy.base import Strategy, StrategyParams, Tick


class Breakout(Strategy):
    """Buy a new N-tick high with a stop below it; exit on a new N-tick low."""

    name = "breakout"

    class Params(StrategyParams, frozen=True):
        lookback: int = 100
        quantity: int = 1
        stop_pct: float = 0.5

    def on_start(self) -> None:
        self.windows: dict[str, deque[float]] = {}

    def on_tick(self, tick: Tick) -> None:
        p = self.params
        window = self.windows.setdefault(self.key_of(tick), deque(maxlen=p.lookback))
        if len(window) == p.lookback:
            if tick.ltp > max(window) and self.is_flat(tick):
                self.buy(tick, p.quantity, stop_loss=tick.ltp * (1 - p.stop_pct / 100))
            elif tick.ltp < min(window) and self.position(tick) > 0:
                self.exit(tick)
        window.append(tick.ltp)
'''


def test_readme_strategy_runs_in_a_backtest_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "mystrats"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "breakout.py").write_text(README_EXAMPLE)
    csv_path = random_walk_csv(tmp_path / "walk.csv", 2000)
    monkeypatch.chdir(tmp_path)
    cli._register()
    result = CliRunner().invoke(
        cli.app,
        [
            "backtest",
            "--ticks",
            str(csv_path),
            "--strategy",
            "mystrats.breakout:Breakout",
            "--param",
            "lookback=200",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["strategy"] == "breakout" and report["params"]["lookback"] == 200
    assert report["summary"]["trades"] > 0 and report["errors"] == 0
