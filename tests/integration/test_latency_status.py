"""``neopulse status --latency`` on a real paper stack (sim feed, a momentum strategy, risk,
execution on PostgreSQL, the paper broker): once the strategy's order has filled, every hop —
feed receive → publish, tick → on_tick, request → verdict, risk → execution ack, broker call →
ack, broker fill → on_fill — is in the heartbeats with a non-zero count, in the JSON and in the
table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libs.common.latency import HOPS
from tests.helpers import eventually, free_base_port
from tests.stack import Stack

# Enters on any 0.01 % move over two ticks: the sim feed's first steps give an order at once.
CONFIG = """
[[strategy]]
name = "momentum"
id = "lat1"
params = { lookback = 2, entry_pct = 0.01, exit_pct = 5.0, quantity = 1, stop_pct = 5.0, target_pct = 5.0 }
"""
SERVICES = ("-s", "feed", "-s", "risk", "-s", "execution", "-s", "strategy")


def _paper_stack(tmp_path: Path, pg_url: str, **env: str) -> Stack:
    """Feed, risk, execution and the lat1 momentum strategy on a paper stack, started."""
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / "neopulse.toml").write_text(CONFIG)
    stack = Stack(free_base_port(), home=home, NEOPULSE_DATABASE__URL=pg_url,
                  NEOPULSE_CONFIG=str(home / "neopulse.toml"), NEOPULSE_FEED__RECORD="false", **env)
    stack.start("feed", "risk", "execution", "strategy")
    return stack


def _latency(stack: Stack) -> dict[str, dict[str, Any]] | None:
    """hop → its row, once every hop has a non-zero count."""
    res = stack.cli("status", "--latency", "--json", *SERVICES)
    if res.returncode != 0:
        return None
    got = {row["hop"]: row for row in json.loads(res.stdout)["latency"] if row["count"] > 0}
    return got if set(HOPS) <= set(got) else None


def test_status_latency_shows_every_hop_with_a_count_once_a_strategy_order_filled(
        tmp_path: Path, pg_url: str) -> None:
    stack = _paper_stack(tmp_path, pg_url)
    try:
        hops = eventually(lambda: _latency(stack), 40, 0.5,
                          message=f"every hop with a count\n{stack.log()[-3000:]}")

        assert {hops[h]["service"] for h in ("feed_publish", "request_to_verdict", "risk_to_ack",
                                             "broker_place")} == {"feed", "risk", "execution"}
        assert hops["tick_to_strategy"]["service"] == hops["fill_to_strategy"]["service"] == "strategy-lat1"
        for row in hops.values():
            assert row["units"] == "us"
            assert 0 <= row["p50"] <= row["p99"] <= row["max"] < 60_000_000
        table = stack.cli("status", "--latency", *SERVICES)
        assert table.returncode == 0, table.stderr
        for hop, row in hops.items():
            assert HOPS[hop] in table.stdout
            assert row["service"] in table.stdout
        assert "P99" in table.stdout and "us" in table.stdout
        plain = stack.cli("status", "--json", *SERVICES)
        assert plain.returncode == 0 and "latency" not in json.loads(plain.stdout)
    finally:
        stack.stop()
        stack.kill_all()


def test_with_bus_latency_false_no_hop_is_kept_and_the_strategy_still_trades(
        tmp_path: Path, pg_url: str) -> None:
    stack = _paper_stack(tmp_path, pg_url, NEOPULSE_BUS__LATENCY="false")
    try:
        def traded() -> bool:
            res = stack.cli("positions", "--json")
            return res.returncode == 0 and any(p["strategy_id"] == "lat1" for p in json.loads(res.stdout))

        eventually(traded, 40, 0.5, message=f"a lat1 position\n{stack.log()[-3000:]}")

        res = stack.cli("status", "--latency", "--json", *SERVICES)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["latency"] == []
        table = stack.cli("status", "--latency", *SERVICES)
        assert table.returncode == 0, table.stderr
        said = " ".join(table.stdout.split())
        assert "no heartbeat carried any figures yet (or bus.latency is false)" in said
    finally:
        stack.stop()
        stack.kill_all()
