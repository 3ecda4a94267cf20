"""The per-hop latency recorder (``libs.common.latency``): percentiles, the last-minute window
on an injected clock, values that are clamped out or counted, and what heartbeats carry."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from libs.common.latency import HIGHEST_US, HOPS, HopRecorder, LatencyBook, rows
from libs.common.messages import Codec, Heartbeat

S = 1_000_000_000  # ns per second
T0 = 1_800_000_000 * S  # on a 5 s slot boundary
US = 1000  # ns per µs


class FakeClock:
    def __init__(self, now_ns: int = T0) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def test_percentiles_and_max_of_recorded_hops_are_within_one_percent() -> None:
    rec = HopRecorder("broker_place", clock=FakeClock(T0 + S))
    for us in range(1, 1001):
        rec.record(T0, T0 + us * US)

    s = rec.summary()

    assert s["count"] == 1000
    assert s["p50_us"] == pytest.approx(500, rel=0.01)
    assert s["p99_us"] == pytest.approx(990, rel=0.01)
    assert s["max_us"] == pytest.approx(1000, rel=0.01)
    assert (s["negative"], s["over_range"], s["invalid"]) == (0, 0, 0)


def test_an_idle_recorder_reports_a_zero_count_and_no_figures() -> None:
    assert HopRecorder("feed_publish", clock=FakeClock()).summary() == {
        "count": 0, "p50_us": 0, "p99_us": 0, "max_us": 0, "negative": 0, "over_range": 0, "invalid": 0}


def test_window_keeps_a_value_for_a_minute_and_drops_it_within_65_seconds() -> None:
    clock = FakeClock()
    rec = HopRecorder("risk_to_ack", clock=clock)
    rec.record(T0 + S - 900 * US, T0 + S)  # 900 µs at 1 s
    rec.record(T0 + 31 * S - 20 * US, T0 + 31 * S)  # 20 µs at 31 s

    clock.now_ns = T0 + 31 * S
    both = rec.summary()
    clock.now_ns = T0 + 60 * S + S // 2  # the first is 59.5 s old: still in the last minute
    still = rec.summary()
    clock.now_ns = T0 + 66 * S  # 65 s old: gone, the second stays
    later = rec.summary()

    assert (both["count"], both["max_us"]) == (2, pytest.approx(900, rel=0.01))
    assert still["count"] == 2
    assert (later["count"], later["max_us"], later["p99_us"]) == (1, 20, 20)


def test_a_slot_reused_a_window_later_starts_afresh() -> None:
    clock = FakeClock()
    rec = HopRecorder("request_to_verdict", clock=clock)
    for _ in range(5):
        rec.record(T0 + S - 5000 * US, T0 + S)  # 5 ms, in the slot at 0..5 s
    rec.record(T0 + 66 * S - 7 * US, T0 + 66 * S)  # 65 s later: the same slot of the ring

    clock.now_ns = T0 + 66 * S
    s = rec.summary()

    assert (s["count"], s["max_us"]) == (1, 7)


def test_a_quiet_minute_empties_the_window_without_any_new_record() -> None:
    clock = FakeClock()
    rec = HopRecorder("fill_to_strategy", clock=clock)
    rec.record(T0, T0 + 3 * S)

    clock.now_ns = T0 + 10 * 60 * S

    assert rec.summary()["count"] == 0


@pytest.mark.parametrize(("start", "counted_as"), [
    (T0 + S, "negative"),  # the sender's clock ahead of ours (skew)
    (10**26, "negative"),  # an absurd stamp in the future
    (T0 - 61 * S, "over_range"),  # older than a minute: a stale or replayed stamp
    (-(10**26), "over_range"),
    (None, "invalid"),
    ("12", "invalid"),
    (float("nan"), "invalid"),
])  # fmt: skip
def test_bad_values_are_counted_not_recorded_and_never_raise(start: Any, counted_as: str) -> None:
    rec = HopRecorder("tick_to_strategy", clock=FakeClock(T0))

    rec.record(start, T0)
    rec.record(T0 - 40 * US, T0)  # a good one after it still counts

    s = rec.summary()
    assert s[counted_as] == 1
    assert (s["count"], s["max_us"]) == (1, 40)
    assert s["negative"] + s["over_range"] + s["invalid"] == 1


def test_a_bad_end_time_is_counted_too() -> None:
    rec = HopRecorder("tick_to_strategy", clock=FakeClock(T0))

    rec.record(T0, None)

    assert rec.summary()["invalid"] == 1


def test_the_range_edges_zero_and_sixty_seconds_are_recorded() -> None:
    rec = HopRecorder("broker_place", clock=FakeClock(T0))

    rec.record(T0, T0)
    rec.record(T0 - HIGHEST_US * US, T0)

    s = rec.summary()
    assert s["count"] == 2
    assert s["max_us"] == pytest.approx(HIGHEST_US, rel=0.01)
    assert s["over_range"] == 0


def test_counted_values_leave_the_window_with_their_slot() -> None:
    clock = FakeClock()
    rec = HopRecorder("risk_to_ack", clock=clock)
    rec.record(T0 + 5 * S, T0)

    clock.now_ns = T0 + 70 * S

    assert rec.summary()["negative"] == 0


def test_book_hands_out_one_recorder_per_hop_and_none_when_off() -> None:
    book = LatencyBook(clock=FakeClock())
    off = LatencyBook(enabled=False)

    first = book.hop("feed_publish")
    assert first is not None and book.hop("feed_publish") is first
    assert off.hop("feed_publish") is None and not off.hops
    with pytest.raises(ValueError, match="unknown latency hop 'nope'"):
        book.hop("nope")


def test_book_summary_is_what_the_heartbeat_carries_and_survives_the_wire() -> None:
    book = LatencyBook(clock=FakeClock(T0))
    rec = book.hop("request_to_verdict")
    assert rec is not None
    rec.record(T0 - 250 * US, T0)
    codec = Codec()

    hb = codec.decode(codec.encode(Heartbeat(service="risk", pid=1, info={"latency": book.summary()})))

    assert isinstance(hb, Heartbeat)
    assert hb.info["latency"]["request_to_verdict"]["count"] == 1
    assert hb.info["latency"]["request_to_verdict"]["p50_us"] == pytest.approx(250, rel=0.01)


def test_a_heartbeat_from_before_latency_still_decodes_and_gives_no_rows() -> None:
    old = msgspec.msgpack.encode({"kind": "Heartbeat", "service": "feed", "pid": 7,
                                  "info": {"ticks": 5}, "ts_ns": T0})  # fmt: skip

    hb = Codec().decode(old)

    assert isinstance(hb, Heartbeat) and hb.info == {"ticks": 5}
    assert rows("feed", hb.info.get("latency")) == []


def test_rows_follow_the_hop_order_and_skip_what_they_cannot_read() -> None:
    latency = {
        "fill_to_strategy": {"count": 2, "p50_us": 30, "p99_us": 40, "max_us": 41},
        "tick_to_strategy": {"count": 9, "p50_us": 10, "p99_us": 20, "max_us": 25, "negative": 1},
        "junk": "not a summary",
        "future_hop": {"count": "many"},
    }

    out = rows("strategy-mom1", latency)

    assert [r["hop"] for r in out] == ["tick_to_strategy", "fill_to_strategy", "future_hop"]
    assert out[0] == {"service": "strategy-mom1", "hop": "tick_to_strategy", "what": HOPS["tick_to_strategy"],
                      "count": 9, "p50": 10, "p99": 20, "max": 25, "units": "us", "negative": 1,
                      "over_range": 0, "invalid": 0, "error": ""}  # fmt: skip
    assert out[2]["count"] == 0
    assert rows("x", ["not", "a", "dict"]) == []
