"""The built-in ``straddle`` in a backtest over a simulated options day (issue 14, acceptance 1).

The day is scripted: NIFTY flat until 09:20, up 0.8 % by 10:30, then flat. The short call's
premium rises through its 25 % stop; the put's stop then moves to its entry price (the put is
far below it by then); the put is bought back at the 15:15 exit. The pure pipeline (strategy,
risk, the execution engine on the paper broker) runs it in-process, as ``neopulse backtest``.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from libs.common.config import load_config
from libs.common.instruments import MasterData
from services.admin import cli
from services.backtest.runner import run_backtest
from services.backtest.simday import SimDay, SimDayError, parse_path, sim_day_ticks

DAY = dt.date(2026, 12, 3)  # a Thursday; the weekly NIFTY expiry is Tuesday 2026-12-08
RALLY = "09:15=0,09:20=0,10:30=+0.8,15:30=+0.8"


def _backtest(path: str = RALLY, env: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    cfg = load_config(env=env or {})
    master = MasterData.load(today=DAY)
    spec = SimDay(day=DAY, every_s=5.0, strikes=6, path=parse_path(path))
    return run_backtest(sim_day_ticks(spec, master, cfg.feed), "straddle", params, cfg=cfg, master=master,
                        strategy_id="sd").report  # fmt: skip


@pytest.fixture(scope="module")
def rally() -> dict[str, Any]:
    return _backtest()


def _leg(report: dict[str, Any], kind: str) -> dict[str, Any]:
    (leg,) = [t for t in report["trade_list"] if t["symbol"].endswith(kind)]
    return leg


def test_both_legs_are_sold_at_0920_as_one_basket(rally: dict[str, Any]) -> None:
    ce, pe = _leg(rally, "CE"), _leg(rally, "PE")
    assert [ce["direction"], pe["direction"]] == ["SHORT", "SHORT"]
    assert ce["entry_time"][11:19] == pe["entry_time"][11:19] == "09:20:00"
    assert ce["quantity"] == pe["quantity"] == 65  # one NIFTY lot each
    assert ce["symbol"][:-2] == pe["symbol"][:-2] == "NIFTY26D0825900"  # the ATM strike of the 09:20 spot
    assert rally["orders"] == {"requested": 3, "approved": 3, "rejected": 0}  # 2 legs, then the put's exit


def test_the_call_is_stopped_out_past_25_percent(rally: dict[str, Any]) -> None:
    ce = _leg(rally, "CE")
    assert ce["exit_reason"] == "STOP" and not ce["open"]
    assert ce["exit_price"] >= ce["entry_price"] * 1.25
    assert "10:30:00" > ce["exit_time"][11:19] > "09:20:00"  # on the way up
    assert ce["pnl"] == pytest.approx((ce["entry_price"] - ce["exit_price"]) * 65, abs=0.01)


def test_the_puts_stop_moves_to_cost_and_the_put_is_squared_off_at_1515(rally: dict[str, Any]) -> None:
    ce, pe = _leg(rally, "CE"), _leg(rally, "PE")
    (moved,) = [e for e in rally["events"] if e["code"] == "stop_to_cost"]
    assert moved["time"] == ce["exit_time"]  # as the call's stop filled
    assert pe["symbol"] in moved["text"]
    assert f"to its entry price {Decimal(str(pe['entry_price'])):.2f}" in moved["text"]
    assert pe["exit_reason"] == "EXIT" and pe["exit_time"][11:19] == "15:15:00"
    assert pe["exit_price"] < pe["entry_price"]  # the rally took the put's premium down: a profit
    assert rally["summary"]["closed_trades"] == 2 and rally["summary"]["open_trades"] == 0


def test_the_report_adds_up_after_costs(rally: dict[str, Any]) -> None:
    s = rally["summary"]
    legs = rally["trade_list"]
    assert s["gross_pnl"] == pytest.approx(sum(t["pnl"] for t in legs), abs=0.01)
    assert s["net_pnl"] == pytest.approx(sum(t["net_pnl"] for t in legs), abs=0.02)
    assert s["net_pnl"] == pytest.approx(s["gross_pnl"] - s["turnover"] * 0.00035, abs=1e-6)
    assert rally["risk"]["net_pnl"] == pytest.approx(s["net_pnl"], abs=0.01)


def test_the_same_day_gives_the_same_report(rally: dict[str, Any]) -> None:
    assert json.dumps(_backtest(), sort_keys=True) == json.dumps(rally, sort_keys=True)


def test_without_move_sl_to_cost_the_put_keeps_its_stop() -> None:
    report = _backtest(move_sl_to_cost="false")
    assert not [e for e in report["events"] if e["code"] == "stop_to_cost"]
    assert _leg(report, "CE")["exit_reason"] == "STOP" and _leg(report, "PE")["exit_reason"] == "EXIT"


def test_a_quiet_day_keeps_both_legs_to_the_exit() -> None:
    report = _backtest("09:15=0,15:30=0")
    assert [t["exit_reason"] for t in report["trade_list"]] == ["EXIT", "EXIT"]
    assert all(t["exit_time"][11:19] == "15:15:00" for t in report["trade_list"])
    assert report["summary"]["gross_pnl"] > 0  # theta: both premiums decayed through the day


def test_the_straddle_sells_once_a_day_even_when_both_legs_are_stopped() -> None:
    # up 0.8 % then back down 1.6 %: the call stops out, then the put (its stop at cost)
    report = _backtest("09:15=0,09:20=0,10:30=+0.8,12:00=-0.8,15:30=-0.8")
    assert len(report["trade_list"]) == 2 and report["orders"]["requested"] == 2
    assert sorted(t["exit_reason"] for t in report["trade_list"]) == ["STOP", "STOP"]
    put = _leg(report, "PE")
    assert put["exit_price"] >= put["entry_price"]  # bought back at (about) cost, not at its first stop


def test_a_refused_basket_is_sent_again_5_s_later_at_most_three_times() -> None:
    report = _backtest(env={"NEOPULSE_RISK__MAX_NOTIONAL": "5000"})  # each leg is worth about 10,000
    assert report["trade_list"] == []
    assert report["orders"] == {"requested": 6, "approved": 0, "rejected": 3}  # 3 baskets of 2 legs
    assert all("exceeds max_notional" in reason for reason in report["rejections"])


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("10:30", "must look like HH:MM=percent"),
        ("25:00=1", "must look like HH:MM=percent"),
        ("10:30=up", "is not a percent"),
        ("10:30=nan", "within ±50%"),
        ("10:30=1E+26", "within ±50%"),
        ("10:30=1,10:00=2", "the times must increase"),
    ],
)
def test_a_bad_path_is_one_clear_error(path: str, words: str) -> None:
    with pytest.raises(SimDayError, match=words):
        parse_path(path)


def test_a_trail_too_small_to_price_stops_the_strategy_at_start() -> None:
    report = _backtest(trail_pct="0.004")  # rounds to a zero distance, which risk would refuse all day
    assert report["halted"] and report["errors"] == 1 and report["orders"]["requested"] == 0


def test_a_saturday_is_not_simulated() -> None:
    cfg = load_config(env={})
    spec = SimDay(day=dt.date(2026, 12, 5))
    with pytest.raises(SimDayError, match="not an NSE trading day \\(Saturday\\)"):
        next(sim_day_ticks(spec, MasterData.load(today=spec.day), cfg.feed))


def test_the_cli_backtests_a_simulated_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEOPULSE_HOME", str(tmp_path))
    cli._register()
    runner = CliRunner()
    args = ["backtest", "--strategy", "straddle", "--sim", DAY.isoformat(), "--sim-path", RALLY,
            "--sim-every", "10", "--sim-strikes", "4"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "(stop)" in result.stdout and "(exit)" in result.stdout and "moves from" in result.stdout
    first, second = (runner.invoke(cli.app, [*args, "--json"]) for _ in range(2))
    assert first.exit_code == 0 and first.stdout == second.stdout
    bad = runner.invoke(cli.app, ["backtest", "--strategy", "straddle", "--sim", "2026-12-05"])
    assert bad.exit_code == 2 and "not an NSE trading day (Saturday)" in bad.output
    both = runner.invoke(cli.app, [*args[:5], "--ticks", "."])
    assert both.exit_code == 2 and "either --ticks" in both.output
    neither = runner.invoke(cli.app, ["backtest", "--strategy", "straddle"])
    assert neither.exit_code == 2 and "either --ticks" in neither.output
