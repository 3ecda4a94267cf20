"""A simulated trading day with options, for a backtest when there is no recording.

``sim_day_ticks`` makes one session (``feed.market_hours``, 09:15-15:30 IST by default) of
ticks for an index and the CE and PE of the listed strikes around its open, priced by the same
models the paper feed uses (``services.feed.sources.sim``): the index walks in whole ticks, and
each option is its Black-Scholes premium from the index, the underlying's ``feed.sim_iv`` plus
``feed.sim_smile`` and the time left to 15:30 on its expiry, so premiums follow the index and
decay through the day. The contracts are the paper master's for that day, so the weekly expiry
is the one a trader would have traded.

The index either walks at random (seeded: ``feed.sim_seed``; its one-second move sized from
the underlying's implied volatility over a 252-day year of 22,500-second sessions), or follows
a scripted ``path``: waypoints ``HH:MM=percent from the open``, joined by straight lines and
held flat after the last, e.g. ``09:15=0,10:30=+0.8,15:30=+0.8`` (a rally that holds). A
scripted day is how a test or a trader asks "what does my straddle do if NIFTY rallies 0.8 %
by 10:30?". The same inputs give the same ticks, byte for byte.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from libs.common.calendar import TradingCalendar
from libs.common.chain import ChainError, chain, spot_instrument
from libs.common.clock import IST
from libs.common.config import SIM_IV_DEFAULTS, FeedConfig, hhmm_minutes
from libs.common.instruments import MasterData
from libs.common.messages import Tick
from services.feed.sources.sim import DEFAULT_IV, OptionWalk, Walk

NS = 1_000_000_000
SESSION_SECONDS = 22_500  # 09:15-15:30
YEAR_SESSIONS = 252
MAX_PATH_PCT = 50.0  # a scripted move beyond this from the open is a typo, not a scenario
MAX_STRIKES = 40


class SimDayError(ValueError):
    """Bad input for a simulated day (not a trading day, a malformed path, no such chain)."""


@dataclass(frozen=True)
class SimDay:
    """What to simulate: ``day`` (IST), the index, and how finely."""

    day: dt.date
    underlying: str = "NIFTY"
    expiry: str = "weekly"
    every_s: float = 1.0  # one round of ticks (the index, then every option) per this many seconds
    strikes: int = 8  # listed strikes either side of the open's ATM (CE and PE of each)
    path: tuple[tuple[int, float], ...] = ()  # (second of the day IST, % from the open), ascending


def parse_path(text: str) -> tuple[tuple[int, float], ...]:
    """``"09:15=0,10:30=+0.8,15:30=+0.8"`` → ``((33300, 0.0), (37800, 0.8), (55800, 0.8))``.
    Empty text: no path (a random walk)."""
    points: list[tuple[int, float]] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        at, sep, pct = part.partition("=")
        minutes = hhmm_minutes(at)
        if not sep or minutes is None:
            raise SimDayError(f"--sim-path: {part!r} must look like HH:MM=percent, e.g. 10:30=+0.8")
        try:
            move = float(pct)
        except ValueError:
            raise SimDayError(f"--sim-path: {part!r}: {pct.strip()!r} is not a percent") from None
        if not math.isfinite(move) or abs(move) > MAX_PATH_PCT:
            raise SimDayError(f"--sim-path: {part!r}: the move must be within ±{MAX_PATH_PCT:g}% of the open")
        second = minutes * 60
        if points and second <= points[-1][0]:
            raise SimDayError(f"--sim-path: {part!r}: the times must increase")
        points.append((second, move))
    return tuple(points)


def _session(feed: FeedConfig) -> tuple[int, int]:
    start, _, end = feed.market_hours.partition("-")
    a, b = hhmm_minutes(start), hhmm_minutes(end)
    if a is None or b is None or a >= b:
        raise SimDayError(f"feed.market_hours {feed.market_hours!r} must look like 09:15-15:30")
    return a * 60, b * 60


def _pct_at(path: tuple[tuple[int, float], ...], second: float) -> float:
    """The scripted move from the open at ``second``: linear between waypoints, flat outside."""
    if second <= path[0][0]:
        return path[0][1]
    for (s0, p0), (s1, p1) in itertools.pairwise(path):
        if second <= s1:
            return p0 + (p1 - p0) * (second - s0) / (s1 - s0)
    return path[-1][1]


def check_day(spec: SimDay, calendar: TradingCalendar | None = None) -> None:
    cal = calendar or TradingCalendar.load()
    if not cal.is_trading_day("NSE", spec.day):
        why = cal.holiday("NSE", spec.day) or spec.day.strftime("%A")
        raise SimDayError(f"{spec.day.isoformat()} is not an NSE trading day ({why})")


def sim_day_ticks(spec: SimDay, master: MasterData, feed: FeedConfig) -> Iterator[Tick]:
    """The day's ticks in exchange-time order (``master`` must hold that day's contracts:
    ``MasterData.load(today=spec.day)``). Bad input raises ``SimDayError`` here, before the
    first tick is asked for."""
    if not 0.05 <= spec.every_s <= 60:
        raise SimDayError(f"--sim-every must be 0.05 to 60 seconds, got {spec.every_s:g}")
    if not 1 <= spec.strikes <= MAX_STRIKES:
        raise SimDayError(f"the simulated chain takes 1 to {MAX_STRIKES} strikes either side, "
                          f"got {spec.strikes}")  # fmt: skip
    check_day(spec)
    name = spec.underlying.strip().upper()
    index = spot_instrument(master, name)
    if index is None or index.ref_price <= 0:
        raise SimDayError(f"no index row with a reference price for {name!r} in the instrument master")
    try:
        options = chain(master, name, spec.expiry, today=spec.day)
    except ChainError as exc:
        raise SimDayError(str(exc)) from None
    ivs = {**SIM_IV_DEFAULTS, **{k.upper(): v for k, v in feed.sim_iv.items()}}
    iv = ivs.get(name, DEFAULT_IV)
    # one round's standard deviation as a fraction of the price (Walk sizes its step from it)
    volatility = iv * math.sqrt(spec.every_s / (YEAR_SESSIONS * SESSION_SECONDS))
    walk = Walk(index, feed.sim_seed, volatility)
    if spec.path:
        walk.step_sd = 0.0  # the path sets the price; the walk still draws quantities and spreads
    contracts = options.instruments(options.near(walk.units * walk.tick, spec.strikes))
    legs = [OptionWalk(inst, walk, feed.sim_seed, feed.sim_interest_rate, iv=iv, smile=feed.sim_smile,
                       spread_pct=feed.sim_spread_pct) for inst in contracts]  # fmt: skip
    start_s, end_s = _session(feed)
    return _rounds(spec, walk, legs, start_s, end_s)


def _rounds(spec: SimDay, walk: Walk, legs: list[OptionWalk], start_s: int, end_s: int) -> Iterator[Tick]:
    """Every ``spec.every_s`` from ``start_s`` to ``end_s`` (seconds of the day, IST): the
    index's tick, then each option's, priced from it."""
    midnight = dt.datetime.combine(spec.day, dt.time(), IST)
    base_ns = int(midnight.timestamp()) * NS
    every_ns = round(spec.every_s * NS)
    open_units = walk.units
    ts = base_ns + start_s * NS
    end_ns = base_ns + end_s * NS
    while ts <= end_ns:
        if spec.path:
            pct = _pct_at(spec.path, (ts - base_ns) / NS)
            walk.units = max(1, round(open_units * (1 + pct / 100)))
        yield walk.step(ts)
        for leg in legs:
            yield leg.step(ts)
        ts += every_ns
