"""The built-in ``straddle`` on the paper pipeline: sim feed (option premiums) → strategy → risk
→ execution (PostgreSQL), with the stack's clock moved to 09:19:50 IST of a trading day.

At 09:20 it sells the ATM call and put of the nearest weekly NIFTY expiry as one basket, each
with its stop-limit BUY resting 25 % above its premium; a restart of the strategy that day does
not sell the straddle again.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from libs.common.calendar import TradingCalendar
from libs.common.clock import IST
from tests.helpers import eventually, free_base_port
from tests.stack import Stack

CONFIG = """
[[strategy]]
name = "straddle"
id = "sd1"
params = { underlying = "NIFTY", entry_at = "09:20", leg_sl_pct = 25 }
"""


def _offset_to_0919() -> str:
    """NEOPULSE_CLOCK_OFFSET_S that makes now read 09:19:50 IST of a trading day (today or the
    next one: the suite may run on a weekend)."""
    now = dt.datetime.now(IST)
    calendar = TradingCalendar.load()
    day = now.date()
    if not calendar.is_trading_day("NSE", day):
        day = calendar.next_trading_day("NSE", day)
    target = dt.datetime.combine(day, dt.time(9, 19, 50), IST)
    return f"{(target - now).total_seconds():.3f}"


def _cli(stack: Stack, *args: str) -> Any:
    exe = str(Path(sys.executable).parent / "neopulse")
    res = subprocess.run([exe, *args, "--json"], env=stack.env, capture_output=True, text=True, timeout=20,
                         check=False)  # fmt: skip
    return json.loads(res.stdout) if res.returncode == 0 else None


def test_the_straddle_sells_both_legs_at_0920_with_their_stops_and_only_once(
    tmp_path: Path, pg_url: str
) -> None:
    home = tmp_path / "home"
    config = tmp_path / "neopulse.toml"
    config.write_text(CONFIG)
    stack = Stack(free_base_port(), home=home, NEOPULSE_DATABASE__URL=pg_url, NEOPULSE_CONFIG=str(config),
                  NEOPULSE_CLOCK_OFFSET_S=_offset_to_0919(),
                  # a calm index (the default sim walk is sized to make the stock demos trade
                  # within seconds; at that pace a 25 % premium stop can fill in a second)
                  NEOPULSE_FEED__SIM_VOLATILITY="0.00001")  # fmt: skip
    stack.start("feed", "risk", "execution")
    stack.start_service("strategy")  # alone, so it can be restarted
    try:

        def legs() -> list[dict[str, Any]] | None:
            orders = _cli(stack, "orders") or []
            done = [o for o in orders if o["strategy_id"] == "sd1" and o["purpose"] == "ENTRY"
                    and o["status"] == "COMPLETE"]  # fmt: skip
            return done if len(done) == 2 else None

        entries = eventually(legs, 45, 0.5, message=f"both legs sold\n{stack.log()[-3000:]}")
        assert sorted(o["symbol"][-2:] for o in entries) == ["CE", "PE"]
        assert all(o["side"] == "SELL" and o["symbol"].startswith("NIFTY") for o in entries)
        assert entries[0]["symbol"][:-2] == entries[1]["symbol"][:-2]  # one strike: the straddle
        assert len({o["request_id"].rpartition(":")[0] for o in entries}) == 1  # one basket

        def stops() -> list[dict[str, Any]] | None:
            orders = _cli(stack, "orders") or []
            live = [o for o in orders if o["strategy_id"] == "sd1" and o["purpose"] == "STOP"
                    and o["status"] in ("OPEN", "ACK")]  # fmt: skip
            return live if len(live) == 2 else None

        resting = eventually(stops, 15, 0.5, message="a resting stop per leg")
        for stop in resting:
            entry = next(o for o in entries if o["symbol"] == stop["symbol"])
            assert stop["side"] == "BUY" and stop["quantity"] == entry["quantity"]
            # 25 % above the premium it was sold at (its fill), on the tick
            assert abs(float(stop["trigger_price"]) - float(entry["avg_price"]) * 1.25) <= 0.05, (stop, entry)

        # A restart of the strategy that day does not sell the straddle again.
        stack.stop_service("strategy")
        stack.start_service("strategy")
        log = home / "log" / "strategy-sd1.log"
        eventually(lambda: log.read_text().count('"straddle_sent"') >= 2 or
                   log.read_text().count('"service_started"') >= 2, 20, 0.5,
                   message="the strategy restarted")  # fmt: skip
        time.sleep(3)  # ticks flow past 09:20 again: nothing may be sold
        orders = _cli(stack, "orders") or []
        assert len([o for o in orders if o["strategy_id"] == "sd1" and o["purpose"] == "ENTRY"]) == 2
        assert log.read_text().count('"straddle_sent"') == 1
    finally:
        if "strategy" in stack.services:
            stack.stop_service("strategy")
        stack.stop()
