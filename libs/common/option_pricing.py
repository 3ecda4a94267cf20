"""Black-Scholes for European index and stock options: premium, delta, the sim's smile.

Pure functions on floats (no Decimal: the simulator prices thousands of options a second
and snaps the result to the option's tick itself). Time is in years, volatility and the
rate are annual and continuously compounded; the rate is a parameter so callers choose it
(``feed.sim_interest_rate`` for the simulator). NSE and BSE index options are European, so
the model fits them; stock options are too since 2011.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time

from libs.common.clock import IST

SECONDS_PER_YEAR = 365.0 * 86_400.0
EXPIRY_CLOSE = time(15, 30)  # an F&O contract's last trade: 15:30 IST on its expiry date
MIN_YEARS = 60.0 / SECONDS_PER_YEAR  # one minute: time to expiry never reaches 0 while priced
_SQRT2 = math.sqrt(2.0)


def norm_cdf(x: float) -> float:
    """The standard normal distribution function."""
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


def _d1_d2(spot: float, strike: float, years: float, vol: float, rate: float) -> tuple[float, float]:
    sd = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / sd
    return d1, d1 - sd


def bs_price(spot: float, strike: float, years: float, vol: float, *, rate: float = 0.0,
             call: bool = True) -> float:
    """The Black-Scholes premium of a European call (``call=True``) or put.

    At ``years <= 0`` or ``vol <= 0`` the option is worth its (discounted) intrinsic value."""
    if spot <= 0 or strike <= 0:
        raise ValueError(f"spot and strike must be positive, got {spot} and {strike}")
    if years <= 0 or vol <= 0:
        fwd_intrinsic = spot - strike * math.exp(-rate * max(years, 0.0))
        return max(fwd_intrinsic, 0.0) if call else max(-fwd_intrinsic, 0.0)
    d1, d2 = _d1_d2(spot, strike, years, vol, rate)
    disc = strike * math.exp(-rate * years)
    if call:
        return spot * norm_cdf(d1) - disc * norm_cdf(d2)
    return disc * norm_cdf(-d2) - spot * norm_cdf(-d1)


def bs_delta(spot: float, strike: float, years: float, vol: float, *, rate: float = 0.0,
             call: bool = True) -> float:
    """How much the premium moves per rupee of the underlying: 0..1 for a call, -1..0 for a put."""
    if spot <= 0 or strike <= 0:
        raise ValueError(f"spot and strike must be positive, got {spot} and {strike}")
    if years <= 0 or vol <= 0:
        itm = spot > strike if call else spot < strike
        return (1.0 if call else -1.0) if itm else 0.0
    d1, _ = _d1_d2(spot, strike, years, vol, rate)
    return norm_cdf(d1) if call else norm_cdf(d1) - 1.0


def smile_vol(base_vol: float, smile: float, spot: float, strike: float) -> float:
    """A simple symmetric smile: ``base_vol + smile * |ln(strike / spot)|``."""
    return base_vol + smile * abs(math.log(strike / spot))


def expiry_ns(expiry: date) -> int:
    """The moment a contract stops trading: 15:30 IST on its expiry date, in epoch ns."""
    return int(datetime.combine(expiry, EXPIRY_CLOSE, IST).timestamp()) * 1_000_000_000


def years_to_expiry(now_ns: int, expiry_at_ns: int, floor: float = MIN_YEARS) -> float:
    """Calendar time from ``now_ns`` to ``expiry_at_ns`` in years, never below ``floor``."""
    return max((expiry_at_ns - now_ns) / 1e9 / SECONDS_PER_YEAR, floor)
