"""Historical candles, plain logic: reading Kotak's replies (429s the SDK does not raise), the
call budget, the chunk grid within Kotak's range limits, Parquet files (round trip, resume,
atomic writes) and the candle → tick replay that rebuilds the same bars."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from services.execution.brokers import kotak_history as kh
from services.history import store
from services.history.replay import candle_ticks, merged
from services.strategy.bars import BarAggregator

D1, D2 = dt.date(2026, 11, 23), dt.date(2026, 11, 24)


def ok(*rows: Any) -> dict[str, Any]:
    return {"status": "success", "interval": "1min", "data": {"candles": list(rows)}}


def ns(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp()) * 10**9


# --------------------------------------------------------------------------- replies


def test_candles_are_read_sorted_deduplicated_and_cut_to_the_days_asked() -> None:
    reply = ok(
        ["2026-11-24T09:16:00+0530", 101, 102, 100.5, 101.5, 900],  # 6 items: no oi
        ["2026-11-24T09:15:00+0530", 100, 101, 99.5, 100.5, 1000, None],
        ["2026-11-24T09:15:00+0530", 100, 101.5, 99.5, 100.75, 1100, 7],  # repeated: the later wins
        ["2026-11-25T09:15:00+0530", 1, 1, 1, 1, 1, 0],  # the extra day asked for todate: dropped
    )

    rows = kh.read_reply(reply, D1, D2)

    assert rows == [[ns("2026-11-24T09:15:00+05:30"), 100.0, 101.5, 99.5, 100.75, 1100, 7],
                    [ns("2026-11-24T09:16:00+05:30"), 101.0, 102.0, 100.5, 101.5, 900, 0]]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "wait"),
    [
        ({"code": 429, "message": "too many request received", "rateLimit": {"Retry-After": "7"}}, 7.0),
        ({"code": 429, "error": "Rate limit exceeded", "message": "too many request received"}, 60.0),
        ({"Error": "Unexpected response format", "StatusCode": 429, "ResponseText": "<html>"}, 60.0),
        ({"stat": "Not_Ok", "stCode": 429, "errMsg": "Too many requests"}, 60.0),
        ({"code": 429, "rateLimit": {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}}, 60.0),
    ],
)
def test_a_429_in_every_shape_is_rate_limited_with_its_wait(reply: dict[str, Any], wait: float) -> None:
    with pytest.raises(kh.HistoryRateLimited) as caught:
        kh.read_reply(reply, D1, D2)
    assert caught.value.retry_after_s == wait


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ({"status": "ERROR", "fault": {"code": 400, "message": "Invalid interval value"}}, kh.HistoryRefused),
        ({"Error": "Unexpected response format", "StatusCode": 500}, kh.HistoryUnavailable),
        ({"stat": "Not_Ok", "errMsg": "Service Unavailable"}, kh.HistoryUnavailable),
        ({"stat": "Not_Ok", "stCode": 900901, "errMsg": "Invalid Credentials"}, kh.HistoryUnavailable),
        ([["2026-11-24T09:15:00+0530", 1, 1, 1, 1, 1]], kh.HistoryUnavailable),  # a bare list
        (None, kh.HistoryUnavailable),
        (ok(["2026-11-24T09:15:00+0530", float("nan"), 1, 1, 1, 1]), kh.HistoryUnavailable),
        (ok(["2026-11-24T09:15:00+0530", 100, 99, 101, 100, 1]), kh.HistoryUnavailable),  # high < low
        (ok(["2026-11-24T09:15:00+0530", -1, 1, 1, 1, 1]), kh.HistoryUnavailable),
        (ok(["2026-11-24T09:15:00+0530", 1, 1, 1, 1, 1e300]), kh.HistoryUnavailable),  # volume
        (ok(["2026-11-24T09:15:00+0530", 1, 1, 1, 1, 1, -5]), kh.HistoryUnavailable),  # oi
        (ok(["not a time", 1, 1, 1, 1, 1]), kh.HistoryUnavailable),
        (ok(["2026-11-24T09:15:00+0530", 1, 1, 1]), kh.HistoryUnavailable),
        (ok(*[["2026-11-24T09:15:00+0530", 1, 1, 1, 1, 1]] * (kh.MAX_CANDLES + 1)), kh.HistoryUnavailable),
    ],
)
def test_other_replies_say_whether_to_repeat(reply: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        kh.read_reply(reply, D1, D2)


@pytest.mark.parametrize(("text", "secs"), [("5", 5.0), ("0", 1.0), ("1e9", 3600.0), ("-3", 60.0),
                                            ("nan", 60.0), ("soon", 60.0)])  # fmt: skip
def test_retry_after_is_bounded(text: str, secs: float) -> None:
    assert kh.retry_after_s(text) == secs


def test_the_budget_allows_per_min_calls_in_any_minute_and_holds_a_429s_wait() -> None:
    now = [1000.0]
    budget = kh.CallBudget(3, clock=lambda: now[0])

    assert [budget.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take() == pytest.approx(60.0)
    now[0] += 30
    assert budget.take() == pytest.approx(30.0)  # still three in the last minute
    now[0] += 30
    assert budget.take() == 0.0  # the first three have aged out

    budget.back_off(20)
    now[0] += 5
    assert budget.take() == pytest.approx(15.0)
    now[0] += 15
    assert budget.take() == 0.0


def test_a_request_asks_one_day_more_within_the_limit_and_never_past_it() -> None:
    assert kh.request_range(D1, D2, "1min") == ("2026-11-23", "2026-11-25")
    assert kh.request_range(D1, D1 + dt.timedelta(days=29), "1min")[1] == "2026-12-22"  # 30 days: no extra
    with pytest.raises(kh.HistoryRefused):
        kh.request_range(D1, D1 + dt.timedelta(days=30), "1min")
    with pytest.raises(kh.HistoryRefused):
        kh.request_range(D2, D1, "D")


# --------------------------------------------------------------------------- chunks


def test_chunks_follow_a_fixed_grid() -> None:
    half = store.chunks(dt.date(2026, 1, 10), dt.date(2026, 2, 20), "1m")
    assert [(c.start, c.first, c.last) for c in half] == [
        (dt.date(2026, 1, 1), dt.date(2026, 1, 10), dt.date(2026, 1, 15)),
        (dt.date(2026, 1, 16), dt.date(2026, 1, 16), dt.date(2026, 1, 31)),
        (dt.date(2026, 2, 1), dt.date(2026, 2, 1), dt.date(2026, 2, 15)),
        (dt.date(2026, 2, 16), dt.date(2026, 2, 16), dt.date(2026, 2, 20)),
    ]
    assert [c.start for c in store.chunks(dt.date(2025, 12, 31), dt.date(2026, 1, 1), "1h")] == [
        dt.date(2025, 12, 1), dt.date(2026, 1, 1)]  # fmt: skip
    assert [c.start for c in store.chunks(dt.date(2026, 2, 1), dt.date(2026, 12, 31), "1d")] == [
        dt.date(2026, 1, 1), dt.date(2026, 4, 1), dt.date(2026, 7, 1), dt.date(2026, 10, 1)]  # fmt: skip
    with pytest.raises(store.HistoryInputError, match="--interval"):
        store.chunks(D1, D2, "2m")


def test_every_chunk_fits_kotaks_range_limit_with_the_extra_day() -> None:
    rnd = random.Random(15)
    for _ in range(300):
        interval = rnd.choice(store.INTERVALS)
        first = dt.date(2021, 1, 1) + dt.timedelta(days=rnd.randrange(2000))
        last = first + dt.timedelta(days=rnd.randrange(400))
        parts = store.chunks(first, last, interval)
        assert parts[0].first == first and parts[-1].last == last
        for a, b in itertools.pairwise(parts):
            assert b.first == a.last + dt.timedelta(days=1)  # no gap, no overlap
        for c in parts:
            kh.request_range(c.first, c.last, store.WIRE_INTERVAL[interval])  # raises if too long


def test_bad_dates_are_one_line_errors() -> None:
    with pytest.raises(store.HistoryInputError, match="not a date"):
        store.parse_day("2026-02-30", "--from")
    with pytest.raises(store.HistoryInputError, match="before"):
        store.parse_day("1999-01-01", "--from")
    with pytest.raises(store.HistoryInputError, match="is before --from"):
        store.check_range(D2, D1, D2)
    with pytest.raises(store.HistoryInputError, match="future"):
        store.check_range(D2, D2, D1)


# --------------------------------------------------------------------------- parquet


def candles(day: dt.date, n: int) -> list[list[Any]]:
    t0 = ns(f"{day.isoformat()}T09:15:00+05:30")
    return [[t0 + i * 60 * 10**9, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 1000 + i, 0] for i in range(n)]


def test_a_chunk_round_trips_through_parquet_with_ist_timestamps(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    [chunk] = store.chunks(D1, D2, "1m")
    path = store.chunk_path(tmp_path, "nse_cm|2885", "1m", chunk.start)
    rows = candles(D1, 3) + candles(D2, 2)

    store.write_chunk(path, chunk, rows, today=dt.date(2026, 12, 1), symbol="RELIANCE-EQ")

    assert path == tmp_path / "history" / "nse_cm_2885" / "1m" / "2026-11-16.parquet"
    assert str(pq.read_schema(path).field("ts").type) == "timestamp[ns, tz=Asia/Kolkata]"
    assert store.read_candles(tmp_path, "nse_cm|2885", "1m", D1, D2) == [tuple(r) for r in rows]
    assert store.read_candles(tmp_path, "nse_cm|2885", "1m", D2, D2) == [tuple(r) for r in rows[3:]]
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_resume_skips_only_complete_chunks_that_cover_the_days(tmp_path: Path) -> None:
    [chunk] = store.chunks(D1, D2, "1m")
    path = store.chunk_path(tmp_path, "nse_cm|2885", "1m", chunk.start)
    assert not store.stored_covers(path, chunk)

    store.write_chunk(path, chunk, candles(D1, 2), today=D2)  # D2 was today: not complete
    assert not store.stored_covers(path, chunk)

    store.write_chunk(path, chunk, [], today=dt.date(2026, 12, 1))  # a holiday: empty, complete
    assert store.stored_covers(path, chunk)
    [wider] = store.chunks(D1 - dt.timedelta(days=1), D2, "1m")
    assert not store.stored_covers(path, wider)  # a day more is asked for: fetch again

    path.write_bytes(b"PAR1 half a file")  # a damaged file is fetched again, not trusted
    assert not store.stored_covers(path, chunk)
    with pytest.raises(store.HistoryInputError, match="unreadable"):
        store.read_candles(tmp_path, "nse_cm|2885", "1m", D1, D2)


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    [chunk] = store.chunks(D1, D2, "1m")
    path = store.chunk_path(tmp_path, "nse_cm|2885", "1m", chunk.start)
    store.write_chunk(path, chunk, candles(D1, 2), today=dt.date(2026, 12, 1))

    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error for a bad row
        store.write_chunk(path, chunk, [[1, "x", 1, 1, 1, 1, 0]], today=dt.date(2026, 12, 1))

    assert len(store.read_candles(tmp_path, "nse_cm|2885", "1m", D1, D2)) == 2
    assert list(path.parent.iterdir()) == [path]


def test_pyarrow_is_not_imported_by_the_services() -> None:
    import subprocess
    import sys

    code = (
        "import sys, services.execution.service, services.execution.brokers.kotak, "
        "services.history.store, services.admin.cmd_history; print('pyarrow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize(("interval", "secs"), [("1m", 60), ("5m", 300), ("1d", 86400)])
def test_replayed_candles_rebuild_the_same_bars(interval: str, secs: int) -> None:
    t0 = ns("2026-11-24T09:15:00+05:30") if interval != "1d" else ns("2026-11-24T00:00:00+05:30")
    rows = [(t0, 100.0, 103.0, 99.0, 102.0, 600, 0), (t0 + secs * 10**9, 102.0, 102.5, 97.0, 98.0, 900, 0),
            (t0 + 2 * secs * 10**9, 98.0, 99.0, 98.0, 99.0, 300, 0)]  # fmt: skip
    agg = BarAggregator("nse_cm|2885", secs)
    ticks = candle_ticks("nse_cm|2885", "RELIANCE-EQ", rows, secs)
    bars = [b for t in ticks for b in agg.update_tick(t) or []]
    bars += agg.flush(t0 + 10 * secs * 10**9) or []

    assert [(b.start_ns, b.open, b.high, b.low, b.close, b.volume) for b in bars] == [
        (ts, o, h, lo, c, v) for ts, o, h, lo, c, v, _ in rows]  # fmt: skip


def test_instruments_are_merged_in_time_order() -> None:
    t0 = ns("2026-11-24T09:15:00+05:30")
    a = candle_ticks("nse_cm|1", "A", [(t0, 1.0, 1.0, 1.0, 1.0, 1, 0)], 60)
    b = candle_ticks("nse_cm|2", "B", [(t0 - 60 * 10**9, 2.0, 2.0, 2.0, 2.0, 1, 0)], 60)
    times = [t.exch_ts_ns for t in merged([a, b])]
    assert times == sorted(times) and len(times) == 8


def test_a_backtest_over_several_days_of_candles_trades_every_day(tmp_path: Path) -> None:
    import math

    from libs.common.config import load_config
    from libs.common.instruments import MasterData
    from services.backtest.runner import run_backtest

    # Arrange: three days of 1-minute candles swinging every 45 minutes (MACD crosses often).
    rows = []
    for day in (D1, D2, D2 + dt.timedelta(days=1)):
        t0 = ns(f"{day.isoformat()}T09:15:00+05:30")
        for k in range(375):
            o, c = (1000 + 10 * math.sin(2 * math.pi * (k + j) / 45) for j in (0, 1))
            rows.append((t0 + k * 60 * 10**9, o, max(o, c) + 0.5, min(o, c) - 0.5, c, 100, 0))
    cfg = load_config(env={"NEOPULSE_HOME": str(tmp_path), "NEOPULSE_ENV_FILE": str(tmp_path / "no.env")})

    # Act
    result = run_backtest(candle_ticks("nse_cm|2885", "RELIANCE-EQ", rows, 60), "macd", {}, cfg=cfg,
                          master=MasterData.load(), instruments=["nse_cm|2885"])  # fmt: skip

    # Assert: execution turned the day with risk (its positions are the new day's), so every
    # day trades and no exit is refused for a position execution forgot.
    report = result.report
    days = {t["entry_time"][:10] for t in report["trade_list"]}
    assert days == {"2026-11-23", "2026-11-24", "2026-11-25"}
    assert not any("nothing to exit" in reason for reason in report["rejections"])
