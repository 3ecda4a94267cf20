"""``neopulse bench`` finds the benchmarks of a checkout and refuses clearly without one;
``benchmarks.run_all`` validates names and summarises a failed run. Nothing is benchmarked."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.admin import cli
from services.admin.cmd_bench import find_checkout

ROOT = Path(__file__).resolve().parents[2]


def test_the_checkout_is_found_next_to_services_and_not_elsewhere(tmp_path: Path) -> None:
    assert find_checkout() == ROOT
    assert find_checkout([tmp_path]) is None  # e.g. an installed image: no benchmarks/
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "run_all.py").write_text("")
    assert find_checkout([tmp_path / "nope", tmp_path]) == tmp_path


def test_an_unknown_benchmark_is_a_usage_error() -> None:
    cli._register()
    result = CliRunner().invoke(cli.app, ["bench", "nope"])
    assert result.exit_code == 2
    assert "unknown benchmark 'nope'" in result.output
    assert "pipeline" in result.output


def test_the_help_names_each_target_in_words_a_user_has() -> None:
    cli._register()
    result = CliRunner().invoke(cli.app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    targets = ("200,000 ticks/s", "1,000 paper orders/s", "100,000 ticks per CPU-second", "p99 at most 3 ms")
    for words in targets:
        assert words in result.output
    assert "DESIGN" not in result.output and "§" not in result.output


def test_run_all_refuses_unknown_names_and_reports_a_failed_benchmark() -> None:
    from benchmarks import run_all

    with pytest.raises(SystemExit) as exc:
        run_all.main(["feed", "nope"])
    assert exc.value.code == 2
    lines = run_all.summary_lines("pipeline", {"ok": False, "seconds": 1.5, "error": "exit 1: boom"})
    assert lines == ["== pipeline (1.5 s)", "   FAILED: exit 1: boom"]
    assert set(run_all.BENCHES) == {"feed", "execution", "backtest", "pipeline", "grid"}


def test_a_tiny_backtest_bench_reports_each_target_met_or_missed() -> None:
    from benchmarks import bench_backtest, run_all

    res = bench_backtest.run(3000, repeat=1)
    cases = [t["case"] for t in res["targets"]]
    assert cases == ["momentum", "ema_cross, 1 s bars", "ema_cross, 5 s bars", "macd, 5 s bars"]
    assert [t["target"] for t in res["targets"]] == [100_000, 250_000, 300_000, 300_000]
    assert all(t["ticks_per_cpu_s"] > 0 and t["met"] == (t["ticks_per_cpu_s"] >= t["target"])
               for t in res["targets"])  # fmt: skip
    lines = run_all.summary_lines("backtest", {"ok": True, "seconds": 1.0, "result": res})
    marks = [line.rsplit(": ", 1)[-1] for line in lines if "target >=" in line]
    assert len(marks) == 4 and set(marks) <= {"met", "MISSED"}
