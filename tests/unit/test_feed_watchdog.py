"""Market hours, silence detection and reconnect backoff (pure logic, manual clocks)."""

from __future__ import annotations

from datetime import datetime

import pytest

from libs.common.clock import IST, ManualClock
from libs.common.config import ConfigError
from services.feed.watchdog import Backoff, MarketHours, Watchdog

WEDNESDAY_10AM = int(datetime(2026, 11, 18, 10, 0, tzinfo=IST).timestamp() * 1e9)
WEDNESDAY_8AM = int(datetime(2026, 11, 18, 8, 0, tzinfo=IST).timestamp() * 1e9)
SATURDAY_10AM = int(datetime(2026, 11, 21, 10, 0, tzinfo=IST).timestamp() * 1e9)


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("now", "open_"), [
    (WEDNESDAY_10AM, True), (WEDNESDAY_8AM, False), (SATURDAY_10AM, False),
])
def test_nse_hours_on_weekdays(now: int, open_: bool) -> None:
    assert MarketHours("09:15-15:30", "Asia/Kolkata").is_open(ManualClock(now)) is open_


def test_end_of_session_is_exclusive_and_start_inclusive() -> None:
    hours = MarketHours("09:15-15:30")
    at = lambda h, m: ManualClock(int(datetime(2026, 11, 18, h, m, tzinfo=IST).timestamp() * 1e9))  # noqa: E731
    assert hours.is_open(at(9, 15)) and hours.is_open(at(15, 29))
    assert not hours.is_open(at(9, 14)) and not hours.is_open(at(15, 30))


def test_hours_are_read_in_the_configured_timezone() -> None:
    # 10:00 IST is 04:30 UTC: closed when the hours are meant in UTC.
    assert not MarketHours("09:15-15:30", "UTC").is_open(ManualClock(WEDNESDAY_10AM))


def test_market_days_can_include_weekends() -> None:
    assert MarketHours("00:00-24:00", days=range(7)).is_open(ManualClock(SATURDAY_10AM))


@pytest.mark.parametrize(("spec", "tz", "days"), [
    ("9-15", "Asia/Kolkata", [0]), ("09:15-15:30", "Mars/Base", [0]), ("09:15-15:30", "UTC", [7]),
])
def test_bad_hours_timezone_or_days_are_config_errors(spec: str, tz: str, days: list[int]) -> None:
    with pytest.raises(ConfigError):
        MarketHours(spec, tz, days)


def test_silence_past_the_timeout_during_market_hours_is_stale() -> None:
    mono = FakeMonotonic()
    dog = Watchdog(10.0, MarketHours("09:15-15:30"), ManualClock(WEDNESDAY_10AM), mono)
    mono.t += 9.9
    assert not dog.is_stale()
    mono.t += 0.2
    assert dog.is_stale()
    dog.packet()
    assert not dog.is_stale()


def test_silence_outside_market_hours_is_not_stale() -> None:
    mono = FakeMonotonic()
    dog = Watchdog(10.0, MarketHours("09:15-15:30"), ManualClock(WEDNESDAY_8AM), mono)
    mono.t += 3600
    assert not dog.is_stale()
    assert dog.fired == 0


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    b = Backoff(0.5, 8.0)
    delays = [b.next_delay() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1.0
    assert 1.0 <= delays[1] <= 1.5
    assert 2.0 <= delays[2] <= 2.5
    assert all(d <= 8.0 for d in delays) and delays[-1] == 8.0
    b.reset()
    assert b.next_delay() <= 1.0


def test_backoff_jitter_spreads_delays() -> None:
    assert len({round(Backoff(1.0, 30.0).next_delay(), 6) for _ in range(20)}) > 1
