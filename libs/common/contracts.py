"""The paper master's index derivatives, generated for the trading day so they never go stale.

``paper_derivatives(day)`` lists the contracts live on ``day`` (an expiry day is still live;
the day after, that contract is gone), from ``contract_specs.csv`` and the holiday calendar:

* NIFTY: the current and next weekly options, the current and next monthly options, the
  current and next monthly futures;
* BANKNIFTY, FINNIFTY, MIDCPNIFTY: the current and next monthly options and futures;
* SENSEX (BSE): the current and next weekly and monthly options.

Options are listed at ``strikes`` steps either side of the at-the-money strike of the index's
reference price (the ``dRefPrice`` of its row in the cash master), CE and PE for each.

Trading symbols follow the exchange's (and Kotak's ``pTrdSymbol``) style:

* monthly option ``NIFTY26DEC24000CE``: underlying, ``YY``, ``MON``, strike, CE/PE;
* weekly option ``NIFTY26D0124000CE``: underlying, ``YY``, one month letter (1-9 for
  January to September, O, N, D), ``DD``, strike, CE/PE — used for every expiry that is not
  the month's monthly expiry;
* future ``NIFTY26DECFUT``.

Tokens are synthetic and stable: the same contract gets the same token on every day and in
every process, so recordings keep their meaning. A token is 10 digits,
``1_000_000_000 + blake2b(segment|symbol) mod 9_000_000_000``; Kotak's own tokens are at most
six digits, so a paper token never collides with the cash master (a collision between two
generated contracts is resolved by hashing ``symbol#1``, ``symbol#2``, ...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal

import msgspec

from libs.common.calendar import ContractSpec, TradingCalendar, default_calendar, load_contract_specs
from libs.common.instruments import Instrument

DEFAULT_STRIKES = 20  # strikes listed each side of the at-the-money strike
TOKEN_BASE = 1_000_000_000
TOKEN_SPAN = 9_000_000_000
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKLY_MONTH = "123456789OND"


def paper_token(segment: str, symbol: str, salt: int = 0) -> str:
    """The synthetic token of a generated contract (see the module docstring)."""
    text = f"{segment}|{symbol}" + (f"#{salt}" if salt else "")
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return str(TOKEN_BASE + digest % TOKEN_SPAN)


def _strike_text(strike: Decimal) -> str:
    return format(strike.normalize(), "f")  # 24000, 24012.5


def option_symbol(underlying: str, expiry: dt.date, strike: Decimal, option_type: str, *,
                  monthly: bool) -> str:
    """``NIFTY26DEC24000CE`` (monthly) or ``NIFTY26D0124000CE`` (weekly)."""
    yy = f"{expiry.year % 100:02d}"
    when = _MONTHS[expiry.month - 1] if monthly else f"{_WEEKLY_MONTH[expiry.month - 1]}{expiry.day:02d}"
    return f"{underlying}{yy}{when}{_strike_text(strike)}{option_type}"


def future_symbol(underlying: str, expiry: dt.date) -> str:
    """``NIFTY26DECFUT``."""
    return f"{underlying}{expiry.year % 100:02d}{_MONTHS[expiry.month - 1]}FUT"


def atm_strike(price: float, step: Decimal) -> Decimal:
    """The listed strike nearest ``price`` (halves round up)."""
    units = (Decimal(repr(price)) / step).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return units * step


def _contracts_for(spec: ContractSpec, day: dt.date, calendar: TradingCalendar, ref: float,
                   strikes: int) -> list[Instrument]:
    monthly = calendar.expiries(spec, "monthly", day, 2)
    monthly_set = set(monthly)
    weekly = calendar.expiries(spec, "weekly", day, 2) if spec.weekly_weekday is not None else []
    out: list[Instrument] = []
    if spec.futures:
        out.extend(Instrument(
            segment=spec.segment, token="", symbol=future_symbol(spec.underlying, expiry),
            name=spec.underlying, inst_type="FUTIDX", lot_size=spec.lot_size,
            tick_size=spec.future_tick_size, freeze_qty=spec.freeze_qty, expiry=expiry,
            underlying=spec.underlying, ref_price=ref,
        ) for expiry in monthly)
    if ref <= 0:
        return out  # no reference price: no strikes to centre on
    atm = atm_strike(ref, spec.strike_step)
    ladder = [atm + spec.strike_step * i for i in range(-strikes, strikes + 1)]
    ladder = [k for k in ladder if k > 0]
    for expiry in sorted(monthly_set.union(weekly)):
        is_monthly = expiry in monthly_set
        for strike in ladder:
            for opt in ("CE", "PE"):
                out.append(Instrument(
                    segment=spec.segment, token="",
                    symbol=option_symbol(spec.underlying, expiry, strike, opt, monthly=is_monthly),
                    name=spec.underlying, inst_type="OPTIDX", lot_size=spec.lot_size,
                    tick_size=spec.tick_size, freeze_qty=spec.freeze_qty, expiry=expiry,
                    strike=strike, option_type=opt, underlying=spec.underlying,
                ))
    return out


def paper_derivatives(
    day: dt.date,
    *,
    calendar: TradingCalendar | None = None,
    specs: Mapping[str, ContractSpec] | None = None,
    index_prices: Mapping[str, float] | None = None,
    strikes: int = DEFAULT_STRIKES,
    taken_tokens: set[str] | None = None,
) -> list[Instrument]:
    """Every index derivative live on ``day`` (see the module docstring).

    ``index_prices`` maps an underlying (``NIFTY``) to its reference price; an underlying
    without one gets its futures only. ``taken_tokens`` are keys (``segment|token``) already
    in the master, never handed out again."""
    calendar = calendar or default_calendar()
    specs = specs if specs is not None else load_contract_specs()
    prices = index_prices or {}
    taken = set(taken_tokens or ())
    out: list[Instrument] = []
    for spec in specs.values():
        for inst in _contracts_for(spec, day, calendar, prices.get(spec.underlying, 0.0), strikes):
            salt = 0
            token = paper_token(inst.segment, inst.symbol)
            while f"{inst.segment}|{token}" in taken:
                salt += 1
                token = paper_token(inst.segment, inst.symbol, salt)
            taken.add(f"{inst.segment}|{token}")
            out.append(msgspec.structs.replace(inst, token=token))
    return out


def index_prices_of(instruments: Mapping[str, Instrument],
                    specs: Mapping[str, ContractSpec]) -> dict[str, float]:
    """Underlying → reference price, from the index rows (``by_symbol``) of a cash master."""
    out: dict[str, float] = {}
    for spec in specs.values():
        inst = instruments.get(spec.index_symbol.upper())
        if inst is not None and inst.segment == spec.index_segment and inst.ref_price > 0:
            out[spec.underlying] = inst.ref_price
    return out
