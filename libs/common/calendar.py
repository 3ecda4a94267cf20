"""The exchange calendar: trading days, holidays and index-derivative expiry dates.

Two editable CSVs beside the bundled master (``libs/common/data``):

* ``holidays.csv`` (``exchange,date,description``): the NSE and BSE trading holidays.
  Saturdays and Sundays are closed without a row.
* ``contract_specs.csv``: per underlying its exchange, lot size, freeze quantity, strike
  step, tick sizes and expiry weekdays (``weekly_weekday`` empty = monthly contracts only).

Expiry rule: a weekly contract expires on its weekday every week, a monthly one on the last
such weekday of the month; an expiry that falls on a holiday moves to the previous trading
day (the last Tuesday of November 2026 is Guru Nanak Jayanti, so NIFTY's November contracts
expire on Monday 23 November). The weekly series includes the monthly date: in the week of
the monthly expiry the weekly and the monthly contracts expire together.

A year missing from ``holidays.csv`` is taken as weekends-only; ``covers(day)`` tells a caller
whether the file knows that year.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Mapping
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Literal

import msgspec

DATA_DIR = Path(__file__).parent / "data"
HOLIDAYS = DATA_DIR / "holidays.csv"
CONTRACT_SPECS = DATA_DIR / "contract_specs.csv"
EXCHANGES = ("NSE", "BSE")
WEEKDAYS = {"MON": 0, "TUE": 1, "WED": 2, "THU": 3, "FRI": 4, "SAT": 5, "SUN": 6}
_WEEKEND = frozenset({5, 6})
_DAY = dt.timedelta(days=1)
_MAX_SEARCH = 30  # days looked back for a trading day: beyond that the calendar is broken

ExpiryKind = Literal["weekly", "monthly"]


class CalendarError(ValueError):
    """A holiday or contract-spec file that cannot be read, or a rule that cannot apply."""


def _rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts, skipping ``#`` comment lines and blank lines."""
    text = path.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(lines)]


class TradingCalendar:
    """Which days each exchange trades: weekdays that are not listed holidays."""

    def __init__(self, holidays: Mapping[str, Mapping[dt.date, str]] | None = None) -> None:
        self._holidays: dict[str, dict[dt.date, str]] = {ex: {} for ex in EXCHANGES}
        for exchange, days in (holidays or {}).items():
            self._holidays.setdefault(exchange.upper(), {}).update(days)
        self._years = {day.year for days in self._holidays.values() for day in days}

    @classmethod
    def load(cls, path: Path = HOLIDAYS) -> TradingCalendar:
        """The calendar from a holiday CSV (default: the bundled ``holidays.csv``)."""
        holidays: dict[str, dict[dt.date, str]] = {}
        for n, row in enumerate(_rows(path), start=2):
            try:
                exchange, day = row["exchange"].upper(), dt.date.fromisoformat(row["date"])
            except (KeyError, ValueError):
                raise CalendarError(
                    f"{path.name}: row {n} needs exchange and an ISO date (2026-01-26)") from None
            if exchange not in EXCHANGES:
                raise CalendarError(f"{path.name}: row {n}: exchange {exchange!r} must be NSE or BSE")
            holidays.setdefault(exchange, {})[day] = row.get("description", "")
        return cls(holidays)

    def covers(self, day: dt.date) -> bool:
        """True when the holiday file lists that year (otherwise only weekends are closed)."""
        return day.year in self._years

    def holiday(self, exchange: str, day: dt.date) -> str:
        """The holiday's name ("" when the exchange is not closed for a holiday that day)."""
        return self._holidays.get(exchange.upper(), {}).get(day, "")

    def is_holiday(self, exchange: str, day: dt.date) -> bool:
        """True when ``day`` is a listed holiday of the exchange (weekends are not listed)."""
        return day in self._holidays.get(exchange.upper(), {})

    def is_trading_day(self, exchange: str, day: dt.date) -> bool:
        return day.weekday() not in _WEEKEND and day not in self._holidays.get(exchange.upper(), {})

    def trading_day_on_or_before(self, exchange: str, day: dt.date) -> dt.date:
        """``day`` itself when the exchange trades then, else the trading day before it."""
        for _ in range(_MAX_SEARCH):
            if self.is_trading_day(exchange, day):
                return day
            day -= _DAY
        raise CalendarError(f"no {exchange} trading day in the {_MAX_SEARCH} days up to {day}")

    def previous_trading_day(self, exchange: str, day: dt.date) -> dt.date:
        """The last trading day strictly before ``day``."""
        return self.trading_day_on_or_before(exchange, day - _DAY)

    def next_trading_day(self, exchange: str, day: dt.date) -> dt.date:
        """The first trading day strictly after ``day``."""
        for _ in range(_MAX_SEARCH):
            day += _DAY
            if self.is_trading_day(exchange, day):
                return day
        raise CalendarError(f"no {exchange} trading day in the {_MAX_SEARCH} days after {day}")

    def expiries(self, spec: ContractSpec, kind: ExpiryKind, start: dt.date, count: int) -> list[dt.date]:
        """The next ``count`` expiries of ``kind`` on or after ``start``, holiday-shifted."""
        if kind == "weekly":
            if spec.weekly_weekday is None:
                raise CalendarError(f"{spec.underlying} has no weekly expiries (monthly contracts only)")
            nominal = _weekly_dates(start, spec.weekly_weekday)
        elif kind == "monthly":
            nominal = _monthly_dates(start, spec.monthly_weekday)
        else:
            raise CalendarError(f"expiry kind must be weekly or monthly, got {kind!r}")
        out: list[dt.date] = []
        for day in nominal:
            if len(out) >= count:
                break
            shifted = self.trading_day_on_or_before(spec.exchange, day)
            if shifted >= start and (not out or shifted > out[-1]):
                out.append(shifted)
        return out

    def is_monthly_expiry(self, spec: ContractSpec, day: dt.date) -> bool:
        """True when ``day`` is the (holiday-shifted) monthly expiry of its month."""
        first = day.replace(day=1)
        return self.expiries(spec, "monthly", first, 1) == [day]


def _weekly_dates(start: dt.date, weekday: int) -> Iterable[dt.date]:
    day = start + dt.timedelta(days=(weekday - start.weekday()) % 7)
    while True:
        yield day
        day += dt.timedelta(days=7)


def _last_weekday(year: int, month: int, weekday: int) -> dt.date:
    nxt = dt.date(year + month // 12, month % 12 + 1, 1)
    last = nxt - _DAY
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def _monthly_dates(start: dt.date, weekday: int) -> Iterable[dt.date]:
    year, month = start.year, start.month
    while True:
        yield _last_weekday(year, month, weekday)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


class ContractSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One underlying's index-derivative contract: a row of ``contract_specs.csv``."""

    underlying: str  # NIFTY
    exchange: str  # NSE | BSE
    segment: str  # nse_fo | bse_fo
    index_segment: str  # nse_cm | bse_cm: where the index row lives
    index_symbol: str  # "Nifty 50": the index row's trading symbol
    lot_size: int
    freeze_qty: int
    strike_step: Decimal
    tick_size: Decimal
    future_tick_size: Decimal
    weekly_weekday: int | None  # Mon=0 .. Sun=6; None = monthly contracts only
    monthly_weekday: int
    futures: bool


def _weekday(text: str, what: str) -> int | None:
    if not text:
        return None
    try:
        return WEEKDAYS[text[:3].upper()]
    except KeyError:
        raise CalendarError(f"contract_specs.csv: {what} {text!r} must be a weekday (MON..SUN)") from None


@cache
def _load_specs_cached(path: Path) -> dict[str, ContractSpec]:
    specs: dict[str, ContractSpec] = {}
    for n, row in enumerate(_rows(path), start=2):
        try:
            monthly = _weekday(row["monthly_weekday"], "monthly_weekday")
            if monthly is None:
                raise CalendarError(f"{path.name}: row {n}: monthly_weekday is required")
            spec = ContractSpec(
                underlying=row["underlying"].upper(), exchange=row["exchange"].upper(),
                segment=row["segment"].lower(), index_segment=row["index_segment"].lower(),
                index_symbol=row["index_symbol"], lot_size=int(row["lot_size"]),
                freeze_qty=int(row["freeze_qty"]), strike_step=Decimal(row["strike_step"]),
                tick_size=Decimal(row["tick_size"]), future_tick_size=Decimal(row["future_tick_size"]),
                weekly_weekday=_weekday(row["weekly_weekday"], "weekly_weekday"),
                monthly_weekday=monthly, futures=row.get("futures", "0") in {"1", "yes", "true"},
            )
        except (KeyError, ValueError, ArithmeticError) as exc:
            if isinstance(exc, CalendarError):
                raise
            raise CalendarError(f"{path.name}: row {n} is not a valid contract spec ({exc})") from None
        if spec.exchange not in EXCHANGES or spec.lot_size <= 0 or spec.strike_step <= 0:
            raise CalendarError(f"{path.name}: row {n}: exchange NSE/BSE, positive lot size and strike step")
        specs[spec.underlying] = spec
    return specs


def load_contract_specs(path: Path = CONTRACT_SPECS) -> dict[str, ContractSpec]:
    """Underlying → its spec, from ``contract_specs.csv`` (read once per path)."""
    return dict(_load_specs_cached(path.resolve()))


@cache
def default_calendar() -> TradingCalendar:
    """The bundled calendar, read once per process."""
    return TradingCalendar.load()


def expiries(underlying: str, kind: ExpiryKind, start: dt.date, count: int, *,
             calendar: TradingCalendar | None = None,
             specs: Mapping[str, ContractSpec] | None = None) -> list[dt.date]:
    """The next ``count`` expiries of ``underlying`` (``weekly`` or ``monthly``) on or after
    ``start``, each moved to the previous trading day when it falls on a holiday."""
    specs = specs if specs is not None else load_contract_specs()
    spec = specs.get(underlying.upper())
    if spec is None:
        raise CalendarError(f"no contract spec for {underlying!r} (contract_specs.csv)")
    return (calendar or default_calendar()).expiries(spec, kind, start, count)
