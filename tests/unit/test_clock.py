"""The test-only clock offset: moves wall time and the trading day, never monotonic time;
refuses a malformed value and any use with a real broker or feed."""

from __future__ import annotations

import pytest

from libs.common.clock import Clock, check_clock_offset, clock_offset_ns, trading_day
from libs.common.config import ConfigError, load_config


def test_offset_is_zero_unless_set() -> None:
    assert clock_offset_ns({}) == 0
    assert clock_offset_ns({"NEOPULSE_CLOCK_OFFSET_S": "  "}) == 0


def test_offset_moves_wall_time_and_the_trading_day_not_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Clock()
    monkeypatch.setenv("NEOPULSE_CLOCK_OFFSET_S", str(86_400 * 3))
    moved = Clock()
    assert abs(moved.now_ns() - plain.now_ns() - 3 * 86_400 * 10**9) < 10**9
    assert trading_day(moved) != trading_day(plain)
    assert abs(moved.monotonic() - plain.monotonic()) < 5


@pytest.mark.parametrize("raw", ["abc", "nan", "inf", "1e12", "1 day"])
def test_a_malformed_offset_is_a_one_line_config_error(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        clock_offset_ns({"NEOPULSE_CLOCK_OFFSET_S": raw})
    assert "NEOPULSE_CLOCK_OFFSET_S must be a number of seconds" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_offset_is_refused_with_a_real_broker() -> None:
    cfg = load_config(env={"NEOPULSE_EXECUTION__BROKER": "kotak"})
    with pytest.raises(ConfigError, match="paper tests only"):
        check_clock_offset(cfg, {"NEOPULSE_CLOCK_OFFSET_S": "60"})
    assert check_clock_offset(load_config(env={}), {"NEOPULSE_CLOCK_OFFSET_S": "60"}) == 60 * 10**9
