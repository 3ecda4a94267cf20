"""Incremental indicators agree with straightforward batch computations."""

from __future__ import annotations

import math
import random

import pytest

from services.strategy.indicators import ATR, EMA, MACD, RSI, SMA


def _series(n: int = 400, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    out, p = [], 100.0
    for _ in range(n):
        p *= 1 + rng.gauss(0, 0.01)
        out.append(p)
    return out


# ---------------------------------------------------------------- batch definitions


def batch_sma(xs: list[float], n: int) -> list[float | None]:
    return [None if i + 1 < n else sum(xs[i + 1 - n : i + 1]) / n for i in range(len(xs))]


def batch_ema(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = [None] * len(xs)
    if len(xs) < n:
        return out
    value = sum(xs[:n]) / n
    out[n - 1] = value
    alpha = 2 / (n + 1)
    for i in range(n, len(xs)):
        value = alpha * xs[i] + (1 - alpha) * value
        out[i] = value
    return out


def batch_macd(xs: list[float], fast: int, slow: int, signal: int) -> tuple[list, list, list]:
    f, s = batch_ema(xs, fast), batch_ema(xs, slow)
    macd = [None if a is None or b is None else a - b for a, b in zip(f, s, strict=True)]
    start = next(i for i, m in enumerate(macd) if m is not None)
    sig_tail = batch_ema([m for m in macd[start:] if m is not None], signal)
    sig = [None] * start + sig_tail
    hist = [None if m is None or g is None else m - g for m, g in zip(macd, sig, strict=True)]
    return macd, sig, hist


def batch_rsi(xs: list[float], n: int) -> list[float | None]:
    out: list[float | None] = [None] * len(xs)
    changes = [xs[i] - xs[i - 1] for i in range(1, len(xs))]
    if len(changes) < n:
        return out
    gains = [max(c, 0.0) for c in changes]
    losses = [max(-c, 0.0) for c in changes]
    ag, al = sum(gains[:n]) / n, sum(losses[:n]) / n
    for i in range(n - 1, len(changes)):
        if i >= n:
            ag = (ag * (n - 1) + gains[i]) / n
            al = (al * (n - 1) + losses[i]) / n
        out[i + 1] = 100.0 if al == 0 else 100 - 100 / (1 + ag / al)
    return out


def batch_atr(bars: list[tuple[float, float, float]], n: int) -> list[float | None]:
    trs = []
    for i, (h, lo, _c) in enumerate(bars):
        if i == 0:
            trs.append(h - lo)
        else:
            pc = bars[i - 1][2]
            trs.append(max(h - lo, abs(h - pc), abs(lo - pc)))
    out: list[float | None] = [None] * len(bars)
    if len(trs) < n:
        return out
    value = sum(trs[:n]) / n
    out[n - 1] = value
    for i in range(n, len(trs)):
        value = (value * (n - 1) + trs[i]) / n
        out[i] = value
    return out


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("period", [1, 5, 20])
def test_sma_matches_batch(period: int) -> None:
    xs = _series()
    ind = SMA(period)
    got = [ind.update(x) for x in xs]
    assert all(_close(a, b) for a, b in zip(got, batch_sma(xs, period), strict=True))


def test_sma_stays_exact_over_long_runs() -> None:
    xs = _series(20_000)
    ind = SMA(50)
    for x in xs:
        ind.update(x)
    assert math.isclose(ind.value or 0, sum(xs[-50:]) / 50, rel_tol=1e-12)


@pytest.mark.parametrize("period", [1, 3, 12, 26])
def test_ema_matches_batch(period: int) -> None:
    xs = _series()
    ind = EMA(period)
    got = [ind.update(x) for x in xs]
    assert all(_close(a, b) for a, b in zip(got, batch_ema(xs, period), strict=True))
    assert ind.ready


def test_macd_line_signal_and_histogram_match_batch() -> None:
    xs = _series()
    ind = MACD(12, 26, 9)
    got_m, got_s, got_h = [], [], []
    for x in xs:
        ind.update(x)
        got_m.append(ind.macd)
        got_s.append(ind.signal)
        got_h.append(ind.histogram)
    macd, sig, hist = batch_macd(xs, 12, 26, 9)
    assert all(_close(a, b) for a, b in zip(got_m, macd, strict=True))
    assert all(_close(a, b) for a, b in zip(got_s, sig, strict=True))
    assert all(_close(a, b) for a, b in zip(got_h, hist, strict=True))
    assert got_s.index(next(s for s in got_s if s is not None)) == 26 + 9 - 2


@pytest.mark.parametrize("period", [2, 14])
def test_rsi_matches_batch_and_stays_in_range(period: int) -> None:
    xs = _series()
    ind = RSI(period)
    got = [ind.update(x) for x in xs]
    assert all(_close(a, b) for a, b in zip(got, batch_rsi(xs, period), strict=True))
    assert all(0 <= v <= 100 for v in got if v is not None)


def test_rsi_of_a_rising_series_is_100() -> None:
    ind = RSI(3)
    for x in range(1, 10):
        ind.update(float(x))
    assert ind.value == 100.0


def test_atr_matches_batch() -> None:
    rng = random.Random(3)
    bars = []
    c = 100.0
    for _ in range(200):
        o = c
        c = o * (1 + rng.gauss(0, 0.01))
        bars.append((max(o, c) * (1 + rng.random() * 0.005), min(o, c) * (1 - rng.random() * 0.005), c))
    ind = ATR(14)
    got = [ind.update(h, lo, cl) for h, lo, cl in bars]
    assert all(_close(a, b) for a, b in zip(got, batch_atr(bars, 14), strict=True))


def test_bad_periods_are_refused() -> None:
    for make in (lambda: SMA(0), lambda: EMA(0), lambda: RSI(0), lambda: ATR(0), lambda: MACD(26, 12, 9)):
        with pytest.raises(ValueError):
            make()
