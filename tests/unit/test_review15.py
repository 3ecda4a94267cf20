"""Review 15 (adversarial): pure-logic defects in the order feed's state machine and the history
store. Each test showed a defect found in review (it failed before the fix)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from libs.common.instruments import MasterData
from services.admin.cmd_history import _plan, _store
from services.execution.brokers.kotak_orderfeed import RECONNECT_S, FeedHealth, Frame, parse_frame
from services.history.store import IST, read_candles

# ------------------------------------------------------------------ order feed


def test_review15_a_feed_that_acks_and_drops_at_once_backs_off_not_every_half_second() -> None:
    t = [0.0]
    h = FeedHealth(now=lambda: t[0])
    h.want()
    delays: list[float | None] = []
    for _ in range(30):
        h.socket_open()
        h.on_frame(Frame("ack"))
        t[0] += 0.01  # LIVE for 10 ms
        delay = h.lost("connection closed")
        delays.append(delay)
        if delay is None:
            break
        t[0] += delay

    assert delays[-1] is None or delays[-1] > RECONNECT_S[0], delays


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"type":"order","data":"' + "[" * 100_000 + '"}'])
def test_review15_a_deeply_nested_frame_is_read_as_bad_not_raised(raw: str) -> None:
    assert parse_frame(raw).kind == "bad"


# ------------------------------------------------------------------ history store

MASTER = MasterData.load()
REL = MASTER.resolve("RELIANCE-EQ")
TODAY = dt.date(2026, 12, 3)


def _day_candles(first: dt.date, last: dt.date) -> list[list[Any]]:
    """One 1d candle per weekday, as KotakBroker.historical_candles returns them."""
    out = []
    day = first
    while day <= last:
        if day.weekday() < 5:
            ts = int(dt.datetime.combine(day, dt.time(9, 15), IST).timestamp()) * 10**9
            out.append([ts, 100.0, 101.0, 99.0, 100.5, 1000, 0])
        day += dt.timedelta(days=1)
    return out


def _fetch(home: Path, first: dt.date, last: dt.date) -> None:
    """What ``neopulse history fetch`` does per chunk: plan, then store what Kotak sent."""
    plan, _stored = _plan(home, [REL], first, last, "1d")
    for _inst, chunk, path in plan:
        _store(path, chunk, _day_candles(chunk.first, chunk.last), TODAY, REL.symbol)


def test_review15_an_overlapping_fetch_keeps_the_days_an_earlier_fetch_stored(tmp_path: Path) -> None:
    # Arrange: 5-9 October stored.
    _fetch(tmp_path, dt.date(2026, 10, 5), dt.date(2026, 10, 9))

    # Act: the next week is fetched, starting from the 7th.
    _fetch(tmp_path, dt.date(2026, 10, 7), dt.date(2026, 10, 16))

    # Assert: every weekday of 5-16 October is still there.
    rows = read_candles(tmp_path, REL.key, "1d", dt.date(2026, 10, 5), dt.date(2026, 10, 16))
    days = sorted({dt.datetime.fromtimestamp(r[0] / 1e9, IST).date() for r in rows})
    assert days[0] == dt.date(2026, 10, 5) and len(days) == 10, days
