"""A tiny run of ``benchmarks.bench_inprocess`` on the session's PostgreSQL: every order of the
in-process path is approved, committed as a ledger row and timed. Nothing is asserted on speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from benchmarks import bench_inprocess, bench_pipeline, run_all


def test_a_small_run_times_every_order_and_commits_its_row(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NEOPULSE_DATABASE__URL", pg_server.url)

    code = bench_inprocess.main(["--orders", "6", "--gap-ms", "0", "1", "--rounds", "2", "--json"])

    res = json.loads(capsys.readouterr().out)
    assert code == 0
    assert res["database"] == "external" and res["refused"] == 0
    assert res["tick_to_ack"]["n"] == 6 and res["raw_psycopg_insert_commit"]["n"] == 6
    assert res["tick_to_ack"]["p50_ms"] >= res["order_round_trip"]["p50_ms"] > 0
    head, _, query = pg_server.url.partition("?")
    db_url = f"{head.rsplit('/', 1)[0]}/{bench_inprocess.DATABASE}?{query}"
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM order_ledger "
                            "WHERE strategy_id = 'bench'").fetchone()
    assert rows == (6 + bench_inprocess.WARMUP, 6 + bench_inprocess.WARMUP)


def test_limit_orders_rest_and_are_timed_the_same_way(pg_server: Any, tmp_path: Path) -> None:
    cfg = bench_inprocess.bench_config(tmp_path)
    path = bench_inprocess.InProcessPath(
        bench_inprocess.database_url(pg_server.url, "bench_inproc_limit"), cfg, tmp_path, "limit")
    try:
        out = path.run(3, 0.0, 1.0)
    finally:
        path.close()

    assert len(out["tick_to_ack"]) == 3 and not path.refused
    assert path.engine.open_count() == 3  # BUY limits 10 % below the market rest in the book


def test_bad_arguments_are_one_line_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_inprocess.main(["--orders", "0"])

    assert exc.value.code == 2
    assert "--orders must be at least 1" in capsys.readouterr().err


def _pct(p50: float, p99: float) -> dict[str, float]:
    return {"n": 400, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "max_ms": p99, "mean_ms": p50}


def test_run_all_marks_each_design_target_met_or_missed_with_its_figures() -> None:
    res: dict[str, Any] = {
        "tick_to_ack": _pct(2.4, 9.0), "inprocess_tick_to_ack": _pct(1.0, 7.0),
        "raw_pubsub_hop": _pct(0.1, 0.5), "raw_dealer_router_round_trip": _pct(0.2, 1.0),
        "raw_psycopg_insert_commit": _pct(0.8, 4.0), "kind": "market", "raw_sum_p50_ms": 1.3,
        "ratio_p50": 1.85, "meets_p50": True, "meets_p99": False,
        "idle_s": 5.0, "idle_cpu_pct": {"execution": 0.4, "risk": 0.5}, "spin_us": 0,
    }
    res.update(bench_pipeline.design_cost(res))

    lines = run_all.summary_lines("pipeline", {"ok": True, "seconds": 30.0, "result": res})

    text = "\n".join(lines)
    assert res["boundaries_add_us_p50"] == 1400 and res["raw_sum_p99_ms"] == 6.5
    assert "in-process (one asyncio process) p50 1.000 / p99 7.000 ms" in text
    assert "p50 2.4x (target <= 1.3x): MISSED" in text
    assert "p99 1.29x (target <= 1.5x): met" in text
    assert "1.38x (target <= 2x): met" in text
    assert "execution 0.40 %, risk 0.50 %" in text
