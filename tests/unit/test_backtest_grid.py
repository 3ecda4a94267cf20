"""Parameter grids and walk-forward (``neopulse backtest --grid``): the ranked table is the same
from run to run and the same as running each combination alone; bad grid input is one line and
exit 2; a walk-forward over a recorded multi-day directory prints its folds and writes a PNG."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from libs.common.clock import IST, ManualClock
from libs.common.config import home_dir, load_config
from libs.common.instruments import MasterData
from libs.common.messages import Codec, Tick
from services.admin import cli
from services.backtest.grid import GridError, make_folds, parse_grid
from services.backtest.runner import master_for_recording, run_backtest
from services.backtest.tickstore import TickStore, write_store
from services.feed.recorder import TickRecorder
from services.feed.sources.replay import iter_ticks
from services.strategy.macd import MacdCrossover
from tests.unit.test_backtest import random_walk_csv

PNG = b"\x89PNG\r\n\x1a\n"
S = 1_000_000_000
GRID = ["--strategy", "momentum", "--grid", "lookback=10,20", "--grid", "entry_pct=0.15,0.3"]


@pytest.fixture
def runner() -> CliRunner:
    cli._register()
    return CliRunner()


def record_days(directory: Path, days: list[dt.date], per_day: int = 1200, seed: int = 3) -> Path:
    """A recording the way the feed writes one: a ``.ticks`` file per day, two stocks walking."""
    master = MasterData.load()
    encode = Codec().encode
    rng = random.Random(seed)
    insts = [master.resolve(s) for s in ("RELIANCE-EQ", "INFY-EQ")]
    prices = [i.ref_price for i in insts]
    clock = ManualClock(0)
    rec = TickRecorder(directory, clock=clock)
    for day in days:
        open_ns = int(dt.datetime.combine(day, dt.time(9, 15), IST).timestamp()) * S
        clock.set_ns(open_ns)
        for k in range(per_day):
            j = k % 2
            prices[j] *= 1 + rng.uniform(-0.0012, 0.0012)
            ts = open_ns + k * 250_000_000
            rec.append(encode(Tick(segment=insts[j].segment, token=insts[j].token, ltp=round(prices[j], 2),
                                   last_qty=1 + k % 5, bid=round(prices[j] - 0.05, 2), exch_ts_ns=ts,
                                   ts_ns=ts)))  # fmt: skip
        rec.flush()
    rec.close()
    return directory


def test_grid_table_is_identical_across_runs_and_to_each_combination_run_alone(
    tmp_path: Path, runner: CliRunner
) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv", 800)
    args = ["backtest", "--ticks", str(csv_path), *GRID, "--jobs", "2", "--json"]

    first = runner.invoke(cli.app, args)
    second = runner.invoke(cli.app, args)

    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    report = json.loads(first.stdout)
    rows = report["results"]
    assert report["combinations"] == len(rows) == 4 and report["cost_rate"] == 0.00035
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    keys = [(-r["net_pnl"], r["params"]["lookback"], r["params"]["entry_pct"]) for r in rows]
    assert keys == sorted(keys)
    # each combination alone, serially, on the single backtest's path (its own decode of the CSV)
    master = master_for_recording(home_dir(), csv_path)
    for r in rows:
        alone = run_backtest(iter_ticks(csv_path, master), "momentum", r["params"], cfg=load_config(),
                             master=master).report["summary"]  # fmt: skip
        for k in ("net_pnl", "gross_pnl", "cost", "turnover", "max_drawdown", "trades"):
            assert r[k] == alone[k], (r["params"], k)
        assert alone["cost"] == pytest.approx(alone["turnover"] * 0.00035, abs=1e-6)
    assert sum(r["trades"] for r in rows) > 4


def test_the_text_table_is_the_same_with_one_job_and_two(tmp_path: Path, runner: CliRunner) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv", 500)
    base = ["backtest", "--ticks", str(csv_path), *GRID]

    one = runner.invoke(cli.app, [*base, "--jobs", "1"])
    two = runner.invoke(cli.app, [*base, "--jobs", "2"])

    assert one.exit_code == two.exit_code == 0, one.output
    assert one.stdout == two.stdout
    lines = one.stdout.splitlines()
    assert lines[0].startswith("grid  momentum  4 combinations (lookback x entry_pct)")
    assert lines[3].split() == ["rank", "lookback", "entry_pct", "net", "PnL", "gross", "PnL", "cost",
                                "max", "DD", "trades"]  # fmt: skip
    assert len(lines) == 4 + 4 and "ran 4 backtests" in one.stderr  # the timing stays off stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--grid", "lookback"], "expects name=v1,v2"),
        (["--grid", "lokback=1,2"], "has no parameter 'lokback'"),
        (["--grid", "lookback=ten,20"], "--grid lookback=ten"),
        (["--grid", "lookback=0,5"], ">= 1"),
        (["--grid", "lookback=5,,6"], "empty value"),
        (["--grid", "lookback="], "empty value"),
        (["--grid", ""], "expects name=v1,v2"),
        (["--grid", "lookback=5,5"], "more than once"),
        (["--grid", "lookback=5", "--grid", "lookback=6"], "given twice"),
        (["--param", "lookback=5", "--grid", "lookback=6"], "also set by --param"),
        (["--walk-forward", "2"], "need --grid"),
        (["--grid", "lookback=5", "--plot", "x.png"], "go with --walk-forward"),
        (["--grid", "lookback=5", "--jobs", "-2"], "--jobs must be 1 or more"),
        (["--grid", "lookback=" + ",".join(map(str, range(1, 102))),
          "--grid", "quantity=" + ",".join(map(str, range(1, 101)))], "10,100 backtests, over 10,000"),
    ],
)  # fmt: skip
def test_bad_grid_input_is_one_line_and_exit_2(
    tmp_path: Path, runner: CliRunner, extra: list[str], expected: str
) -> None:
    csv_path = random_walk_csv(tmp_path / "walk.csv", 20)

    result = runner.invoke(cli.app, ["backtest", "--ticks", str(csv_path), "--strategy", "momentum", *extra])

    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_grid_values_take_the_parameters_types() -> None:
    grid = parse_grid(["fast=8,12", "allow_short=true,false", "atr_stop=1.5,2"], MacdCrossover, {})

    assert grid.values == ((8, 12), (True, False), (1.5, 2.0)) and grid.size == 8
    assert grid.combinations()[1] == {"fast": 8, "allow_short": True, "atr_stop": 2.0}
    with pytest.raises(GridError, match="no parameters to sweep"):
        parse_grid([], MacdCrossover, {})


def test_folds_roll_or_anchor_over_k_plus_one_blocks_of_days() -> None:
    days = [dt.date(2024, 1, d) for d in range(1, 8)]  # 7 days, K=3: blocks of 2, 2, 2, 1

    rolling = make_folds(days, 3, anchored=False)
    anchored = make_folds(days, 3, anchored=True)

    assert [(f.in_days, f.out_days) for f in rolling] == [
        (tuple(days[0:2]), tuple(days[2:4])), (tuple(days[2:4]), tuple(days[4:6])),
        (tuple(days[4:6]), tuple(days[6:7])),
    ]  # fmt: skip
    assert [f.in_days for f in anchored] == [tuple(days[0:2]), tuple(days[0:4]), tuple(days[0:6])]
    assert [f.out_days for f in anchored] == [f.out_days for f in rolling]
    with pytest.raises(GridError, match="needs at least 8 trading days"):
        make_folds(days, 7, anchored=False)


def test_the_shared_store_gives_back_exactly_the_decoded_ticks(tmp_path: Path) -> None:
    days = [dt.date(2024, 1, 2), dt.date(2024, 1, 3)]
    path = record_days(tmp_path / "ticks", days, per_day=300)
    decoded = list(iter_ticks(path))

    assert write_store(iter_ticks(path), tmp_path / "s.arrow") == len(decoded) == 600
    store = TickStore(tmp_path / "s.arrow")
    try:
        assert list(store.ticks()) == decoded
        assert store.days() == days
        assert store.day_ranges(days[1:]) == [(300, 600)]
        assert list(store.ticks([(300, 600)])) == decoded[300:]
    finally:
        store.close()


def test_walk_forward_over_a_recorded_directory_prints_folds_and_writes_a_png(
    tmp_path: Path, runner: CliRunner
) -> None:
    days = [dt.date(2024, 1, d) for d in (1, 2, 3, 4)]
    ticks = record_days(tmp_path / "ticks", days)
    png = tmp_path / "wf.png"
    args = ["backtest", "--ticks", str(ticks), *GRID, "--walk-forward", "3", "--jobs", "2"]

    result = runner.invoke(cli.app, [*args, "--plot", str(png)])

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "walk-forward  momentum  3 folds, rolling" in out
    fold_lines = [ln for ln in out.splitlines() if ln.strip()[:1] in "123" and "2024-01-0" in ln]
    assert [ln.split()[0] for ln in fold_lines] == ["1", "2", "3"]
    assert "2024-01-01 (1 d)" in fold_lines[0] and "2024-01-02 (1 d)" in fold_lines[0]
    assert "parameter stability" in out and "won " in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == PNG

    as_json = runner.invoke(cli.app, [*args, "--anchored", "--json"])  # the default plot path

    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["mode"] == "anchored" and [f["in_sample"]["n_days"] for f in report["folds"]] == [1, 2, 3]
    oos = report["out_of_sample_total"]
    fold_nets = [f["out_of_sample"]["net_pnl"] for f in report["folds"]]
    assert oos["net_pnl"] == pytest.approx(sum(fold_nets), abs=1e-9)
    assert report["equity_curve"][-1][1] == pytest.approx(oos["net_pnl"], abs=0.01)
    plot = Path(report["plot"])
    assert plot.parent.name == "reports" and plot.read_bytes()[:8] == PNG


def test_walk_forward_with_fewer_days_than_k_plus_one_says_so(tmp_path: Path, runner: CliRunner) -> None:
    ticks = record_days(tmp_path / "ticks", [dt.date(2024, 1, 1), dt.date(2024, 1, 2)], per_day=50)

    result = runner.invoke(cli.app, ["backtest", "--ticks", str(ticks), *GRID, "--walk-forward", "2"])

    assert result.exit_code == 2
    assert result.output.strip() == ("backtest: --walk-forward 2 needs at least 3 trading days (K in-sample "
                                     "windows and the out-of-sample day after each); the ticks cover 2 "
                                     "trading days")  # fmt: skip


def test_a_grid_over_a_simulated_day_matches_the_single_backtest_of_each_value(runner: CliRunner) -> None:
    sim = ["--strategy", "straddle", "--sim", "2026-12-03", "--sim-every", "30",
           "--sim-path", "09:15=0,10:30=+0.8,15:30=+0.8"]  # fmt: skip

    result = runner.invoke(cli.app, ["backtest", *sim, "--grid", "leg_sl_pct=20,30", "--json"])

    assert result.exit_code == 0, result.output
    rows = {r["params"]["leg_sl_pct"]: r for r in json.loads(result.stdout)["results"]}
    for pct in (20.0, 30.0):
        single = runner.invoke(cli.app, ["backtest", *sim, "--param", f"leg_sl_pct={pct}", "--json"])
        assert single.exit_code == 0, single.output
        s = json.loads(single.stdout)["summary"]
        assert (rows[pct]["net_pnl"], rows[pct]["trades"]) == (s["net_pnl"], s["trades"])
    assert rows[20.0]["trades"] == 2


def test_a_grid_over_stored_candles_matches_the_single_history_backtest_of_each_value(
    runner: CliRunner,
) -> None:
    import math

    from services.history import store

    # Arrange: three days of RELIANCE-EQ 1-minute candles swinging every 45 minutes, stored the
    # way `neopulse history fetch` stores them.
    home = home_dir()
    days = [dt.date(2026, 11, 23), dt.date(2026, 11, 24), dt.date(2026, 11, 25)]
    rows = []
    for day in days:
        t0 = int(dt.datetime.combine(day, dt.time(9, 15), IST).timestamp()) * S
        for k in range(375):
            o, c = (1000 + 10 * math.sin(2 * math.pi * (k + j) / 45) for j in (0, 1))
            rows.append([t0 + k * 60 * S, o, max(o, c) + 0.5, min(o, c) - 0.5, c, 100, 0])
    for chunk in store.chunks(days[0], days[-1], "1m"):
        inside = [
            r for r in rows if chunk.first <= dt.datetime.fromtimestamp(r[0] / S, IST).date() <= chunk.last
        ]
        store.write_chunk(store.chunk_path(home, "nse_cm|2885", "1m", chunk.start), chunk, inside,
                          today=dt.date(2026, 12, 1), symbol="RELIANCE-EQ")  # fmt: skip
    hist = ["--strategy", "macd", "--history", "RELIANCE-EQ", "--from", "2026-11-23", "--to", "2026-11-25",
            "--interval", "1m"]  # fmt: skip

    # Act
    result = runner.invoke(cli.app, ["backtest", *hist, "--grid", "fast=8,12", "--json", "--jobs", "1"])

    # Assert: one bar per candle in every combination, and each row is that value's own backtest
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fixed_params"] == {"bar_seconds": "60"} and report["days"] == ["2026-11-23", "2026-11-25"]
    rows_by_fast = {r["params"]["fast"]: r for r in report["results"]}
    assert set(rows_by_fast) == {8, 12}
    for fast, row in rows_by_fast.items():
        single = runner.invoke(cli.app, ["backtest", *hist, "--param", f"fast={fast}", "--json"])
        assert single.exit_code == 0, single.output
        s = json.loads(single.stdout)["summary"]
        assert (row["net_pnl"], row["trades"]) == (s["net_pnl"], s["trades"])
        assert row["trades"] > 0
