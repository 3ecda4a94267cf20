"""Momentum on the real paper pipeline: sim feed → strategy → risk → execution (PostgreSQL).

The default sim feed (5 instruments, 20 ticks/s, ±0.08 % steps) must get the first order out
of the momentum strategy within about 10 s of its start, and that order must reach the
ledger, fill on the paper broker, and come back to the strategy as its position.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.helpers import eventually, free_base_port
from tests.stack import Stack


def _events(home: Path, service: str) -> list[dict[str, Any]]:
    path = home / "log" / f"{service}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _orders(stack: Stack) -> list[dict[str, Any]]:
    # the installed console script (``python -m services.admin.cli`` registers commands on a
    # second copy of the Typer app)
    exe = str(Path(sys.executable).parent / "neopulse")
    res = subprocess.run(
        [exe, "orders", "--json"], env=stack.env, capture_output=True, text=True, timeout=20, check=False
    )
    return json.loads(res.stdout) if res.returncode == 0 else []


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()


def test_momentum_first_order_within_10s_fills_and_updates_its_position(tmp_path: Path, pg_url: str) -> None:
    home = tmp_path / "home"
    stack = Stack(free_base_port(), home=home, NEOPULSE_DATABASE__URL=pg_url).start(
        "feed", "risk", "execution", "strategy"
    )
    try:

        def first_request() -> dict[str, Any] | None:
            return next((e for e in _events(home, "strategy-mom1") if e["event"] == "order_request"), None)

        req = eventually(first_request, 30, 0.2, message=f"a momentum order request\n{stack.log()[-2000:]}")
        started = next(e for e in _events(home, "strategy-mom1") if e["event"] == "service_started")
        assert _ts(req) - _ts(started) <= 10.0

        def filled_entry() -> list[dict[str, Any]] | None:
            return [
                o
                for o in _orders(stack)
                if o["strategy_id"] == "mom1"
                and o["purpose"] == "ENTRY"
                and o["status"] == "COMPLETE"
                and o["fills"]
            ] or None

        done = eventually(filled_entry, 30, 0.5, message=f"a filled momentum entry\n{stack.log()[-2000:]}")
        assert done[0]["request_id"].startswith("mom1-")
        eventually(
            lambda: any(e["event"] == "fill" for e in _events(home, "strategy-mom1")),
            10,
            message="the fill back at the strategy",
        )
        took = stack.stop()
        assert took < 5.0
        assert not [e for e in _events(home, "strategy-mom1") if e["event"] == "strategy_hook_failed"]
    finally:
        stack.kill_all()
