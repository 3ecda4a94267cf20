"""Bar aggregation by exchange time: boundaries, the first partial bar, gaps, late ticks."""

from __future__ import annotations

from libs.common.messages import Tick
from services.strategy.bars import IST_OFFSET_NS, BarAggregator

S = 1_000_000_000
# 2024-01-02 09:15:00 IST as epoch ns (a minute boundary in IST and UTC alike)
T0 = 1_704_167_100 * S


def test_ticks_in_one_minute_make_one_bar_emitted_when_the_next_minute_starts() -> None:
    agg = BarAggregator("nse_cm|1", 60)
    assert agg.update(T0, 100.0, 5) is None
    assert agg.update(T0 + 10 * S, 102.0, 1) is None
    assert agg.update(T0 + 20 * S, 99.0, 1) is None
    assert agg.update(T0 + 59 * S, 101.0, 1) is None
    bars = agg.update(T0 + 60 * S, 103.0, 2)
    assert bars is not None and len(bars) == 1
    b = bars[0]
    assert (b.open, b.high, b.low, b.close, b.volume, b.ticks) == (100.0, 102.0, 99.0, 101.0, 8, 4)
    assert (b.start_ns, b.end_ns, b.partial, b.key) == (T0, T0 + 60 * S, False, "nse_cm|1")


def test_bars_align_to_ist_minutes_and_intervals() -> None:
    agg = BarAggregator("k", 300)
    # 09:15 IST is a 5-minute boundary of the exchange day
    assert (agg.bucket(T0 + 299 * S) + IST_OFFSET_NS) % (300 * S) == 0
    assert agg.bucket(T0 + 299 * S) == T0
    assert agg.bucket(T0 + 300 * S) == T0 + 300 * S


def test_first_partial_bar_is_not_emitted_by_default() -> None:
    agg = BarAggregator("k", 60)
    agg.update(T0 + 30 * S, 100.0)  # started watching mid-minute
    bars = agg.update(T0 + 60 * S, 101.0)
    assert bars is None
    bars = agg.update(T0 + 120 * S, 102.0)
    assert bars is not None and bars[0].start_ns == T0 + 60 * S and not bars[0].partial


def test_first_partial_bar_can_be_emitted_flagged() -> None:
    agg = BarAggregator("k", 60, emit_partial=True)
    agg.update(T0 + 30 * S, 100.0)
    bars = agg.update(T0 + 60 * S, 101.0)
    assert bars is not None and bars[0].partial


def test_watching_since_before_the_bar_makes_the_first_bar_complete() -> None:
    agg = BarAggregator("k", 60, start_ns=T0 - 5 * S)
    agg.update(T0 + 30 * S, 100.0)
    bars = agg.update(T0 + 60 * S, 101.0)
    assert bars is not None and not bars[0].partial


def test_gap_minutes_produce_no_bars_by_default() -> None:
    agg = BarAggregator("k", 60)
    agg.update(T0, 100.0)
    bars = agg.update(T0 + 5 * 60 * S + S, 105.0)
    assert bars is not None and [b.start_ns for b in bars] == [T0]
    bars = agg.update(T0 + 6 * 60 * S, 106.0)
    assert bars is not None and bars[0].start_ns == T0 + 5 * 60 * S and bars[0].open == 105.0


def test_gap_minutes_become_flat_bars_with_fill_gaps() -> None:
    agg = BarAggregator("k", 60, fill_gaps=True)
    agg.update(T0, 100.0)
    agg.update(T0 + 30 * S, 101.0)
    bars = agg.update(T0 + 3 * 60 * S, 103.0)
    assert bars is not None
    assert [b.start_ns for b in bars] == [T0, T0 + 60 * S, T0 + 120 * S]
    flat = bars[1]
    assert (flat.open, flat.high, flat.low, flat.close, flat.volume, flat.ticks) == (
        101.0,
        101.0,
        101.0,
        101.0,
        0,
        0,
    )


def test_flush_closes_a_quiet_bar_once_its_time_has_passed() -> None:
    agg = BarAggregator("k", 60)
    agg.update(T0, 100.0)
    assert agg.flush(T0 + 59 * S) is None
    bars = agg.flush(T0 + 61 * S)
    assert bars is not None and bars[0].close == 100.0
    assert agg.update(T0 + 30 * S, 99.0) is None and agg.late == 1  # belongs to a bar already out
    assert agg.flush(T0 + 200 * S) is None


def test_late_ticks_are_dropped_and_counted() -> None:
    agg = BarAggregator("k", 60)
    agg.update(T0 + 60 * S, 100.0)
    agg.update(T0 + 10 * S, 50.0)
    assert agg.late == 1
    assert agg.current is not None and agg.current.low == 100.0


def test_update_tick_uses_exchange_time_and_cumulative_volume() -> None:
    agg = BarAggregator("nse_cm|1", 60, start_ns=T0)
    mk = lambda ts, p, vol: Tick(segment="nse_cm", token="1", ltp=p, volume=vol, exch_ts_ns=ts, ts_ns=1)  # noqa: E731
    agg.update_tick(mk(T0 + S, 100.0, 1000))
    agg.update_tick(mk(T0 + 2 * S, 101.0, 1100))
    agg.update_tick(mk(T0 + 3 * S, 100.5, 1250))
    bars = agg.update_tick(mk(T0 + 61 * S, 100.0, 1300))
    assert bars is not None
    # the first tick only adds its last_qty: its cumulative volume includes earlier trades
    assert bars[0].volume == 0 + 100 + 150
    assert bars[0].close == 100.5
