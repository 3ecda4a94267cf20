"""The intraday square-off through the real execution process (paper broker, PostgreSQL): with
``execution.square_off_at`` a few seconds ahead (the clock moved to 15:14:5x IST), every MIS
position is flat and nothing is working within 5 s after the time, while NRML stays; and a
start after the time with an open MIS position squares it off at once."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.clock import IST
from tests.helpers import eventually
from tests.integration.conftest import cloned_db
from tests.integration.test_execution_service import ExecStack


def offset_to(hh: int, mm: int, ss: int) -> str:
    """NEOPULSE_CLOCK_OFFSET_S that makes now read today's hh:mm:ss IST."""
    now = dt.datetime.now(IST)
    target = now.replace(hour=hh, minute=mm, second=ss, microsecond=0)
    return f"{(target - now).total_seconds():.3f}"


@pytest.fixture
def stack(tmp_path: Path, pg_server: Any) -> Iterator[ExecStack]:
    with cloned_db(pg_server, f"np_sq_{os.getpid()}_{tmp_path.name[-6:]}") as url:
        s = ExecStack(tmp_path / "home", url)
        try:
            yield s
        finally:
            s.close()


def working(s: ExecStack) -> list[dict[str, Any]]:
    return [o for o in s.orders() if o["status"] in ("PENDING_BROKER", "ACK", "OPEN", "PARTIAL", "UNKNOWN")
            and not o.get("sliced")]  # fmt: skip


def test_at_square_off_at_every_mis_position_is_flat_and_nothing_works_within_5_s(stack: ExecStack) -> None:
    s = stack
    clock_offset = offset_to(15, 14, 52)
    s.start(NEOPULSE_EXECUTION__SQUARE_OFF_AT="15:15", NEOPULSE_CLOCK_OFFSET_S=clock_offset)
    s.ok(s.order("RELIANCE-EQ", qty=5, strategy="mis1"))
    s.ok(s.order("INFY-EQ", qty=3, strategy="mis2"))
    s.ok(s.order("TCS-EQ", qty=2, strategy="carry", product="NRML"))
    s.ok(s.order("RELIANCE-EQ", qty=4, price="1000.00", strategy="mis1"))  # rests far below
    eventually(lambda: s.positions().get(("mis1", "RELIANCE-EQ")) == 5 and
               s.positions().get(("carry", "TCS-EQ")) == 2, timeout=5, message="the positions")  # fmt: skip
    now = dt.datetime.now(IST) + dt.timedelta(seconds=float(clock_offset))  # the stack's clock
    assert now.time() < dt.time(15, 15), "the orders went in before the square-off"

    due = time.monotonic() + (dt.datetime.combine(now.date(), dt.time(15, 15), IST) - now).total_seconds()
    eventually(lambda: s.positions().get(("mis1", "RELIANCE-EQ")) == 0
               and s.positions().get(("mis2", "INFY-EQ")) == 0 and not working(s),
               timeout=max(1.0, due - time.monotonic()) + 5,
               message="MIS flat and nothing working")  # fmt: skip

    assert time.monotonic() <= due + 5
    assert s.positions().get(("carry", "TCS-EQ")) == 2  # NRML is left alone
    assert s.output().count("square-off at 15:15: closing MIS") == 2


def test_a_start_after_the_time_with_an_open_mis_position_squares_it_off_at_once(stack: ExecStack) -> None:
    s = stack
    s.start(NEOPULSE_EXECUTION__SQUARE_OFF_AT="")
    s.ok(s.order("RELIANCE-EQ", qty=5, strategy="late"))
    eventually(lambda: s.positions().get(("late", "RELIANCE-EQ")) == 5, timeout=5, message="the position")
    s.stop()

    s.start(NEOPULSE_EXECUTION__SQUARE_OFF_AT="15:15", NEOPULSE_CLOCK_OFFSET_S=offset_to(15, 20, 0))

    eventually(lambda: s.positions().get(("late", "RELIANCE-EQ")) == 0, timeout=10,
               message="the MIS position squared off at start")  # fmt: skip
