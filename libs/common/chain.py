"""Option chains over the instrument master: which expiry, which strike, which contract.

Pure functions over a ``MasterData`` and an explicit ``today`` (callers pass their injectable
clock's trading day), so tests choose the date. The option contracts of a master are indexed
once, on first use, by (underlying, expiry) and the index is cached per ``MasterData`` (and
rebuilt if instruments were added since), so a chain over a 100k-row F&O master costs one
pass, not one per call.

Expiry specs (``resolve_expiry``):

``"weekly"``
    the nearest expiry on or after ``today`` among the underlying's listed options, of
    whichever kind (for an underlying with monthly options only, that is the monthly). A
    ``today`` given as a ``datetime`` at or after 15:30 IST counts from the next day
    (``live_from``): on an expiry day after the close that expiry no longer trades;
``"next-weekly"``
    the listed expiry after that one;
``"monthly"``
    the nearest expiry on or after ``today`` that is its calendar month's last listed expiry
    (a holiday-shifted monthly, listed on its shifted day, is still its month's last);
a ``date`` (or an ISO ``"YYYY-MM-DD"`` string)
    that expiry, which must be listed.

Strikes are the listed ones: ``Chain.atm(spot)`` is the listed strike nearest ``spot`` (a
tie goes to the lower strike), ``Chain.strike(n, spot)`` the listed strike ``n`` places above
ATM (``n < 0``: below), so a chain whose grid widens away from the money still steps by
what the exchange lists.
"""

from __future__ import annotations

import bisect
import datetime as dt
import weakref
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

from libs.common.instruments import Instrument, MasterData, UnknownInstrument

__all__ = [
    "EXPIRY_CLOSE",
    "EXPIRY_SPECS",
    "Chain",
    "ChainError",
    "chain",
    "expiries",
    "find_option",
    "live_from",
    "resolve_expiry",
    "spot_instrument",
    "underlyings",
]

EXPIRY_SPECS = ("weekly", "next-weekly", "monthly")
OPTION_TYPES = ("CE", "PE")

# The cash-segment index row of each index underlying, by trading symbol, for masters whose
# index rows do not carry the underlying's name (Kotak's nse_cm/bse_cm index rows).
INDEX_SYMBOLS = {
    "NIFTY": "Nifty 50",
    "BANKNIFTY": "Nifty Bank",
    "FINNIFTY": "Nifty Fin Service",
    "MIDCPNIFTY": "NIFTY MID SELECT",
    "NIFTYNXT50": "Nifty Next 50",
    "SENSEX": "SENSEX",
    "BANKEX": "BANKEX",
    "SENSEX50": "SENSEX50",
}

StrikeLike = Decimal | int | float | str


class ChainError(UnknownInstrument):
    """An option, expiry or underlying the master does not list; the message says which."""

    def __str__(self) -> str:
        return str(self.args[0])


def _strike(value: StrikeLike) -> Decimal:
    if isinstance(value, Decimal):
        return value
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ChainError(f"not a strike price: {value!r}") from None


def _fmt(strike: Decimal) -> str:
    """``24000`` for ``Decimal("24000.00")``, ``24012.5`` for a half strike."""
    return format(strike.normalize(), "f")


# ---------------------------------------------------------------------- the index
class _Contracts:
    """One underlying's option contracts: expiry → (strike, type) → Instrument."""

    __slots__ = ("by_expiry", "chains", "expiries", "monthly")

    def __init__(self) -> None:
        self.by_expiry: dict[dt.date, dict[tuple[Decimal, str], Instrument]] = {}
        self.expiries: list[dt.date] = []
        self.monthly: list[dt.date] = []
        self.chains: dict[dt.date, Chain] = {}  # built on first use

    def seal(self) -> None:
        self.expiries = sorted(self.by_expiry)
        last_in_month: dict[tuple[int, int], dt.date] = {}
        for day in self.expiries:
            last_in_month[(day.year, day.month)] = day  # sorted: the last one wins
        self.monthly = sorted(last_in_month.values())


class _OptionIndex:
    __slots__ = ("size", "spots", "underlyings")

    def __init__(self, master: MasterData) -> None:
        self.size = len(master)
        self.underlyings: dict[str, _Contracts] = {}
        self.spots: dict[str, Instrument] = {}  # index rows by the underlying's name (NIFTY)
        for inst in master.by_key.values():
            if inst.inst_type == "INDEX" and inst.name:
                self.spots.setdefault(inst.name.upper(), inst)
                continue
            if inst.expiry is None or inst.strike is None or inst.option_type not in OPTION_TYPES:
                continue
            name = (inst.underlying or inst.name).upper()
            if not name:
                continue
            contracts = self.underlyings.get(name)
            if contracts is None:
                contracts = self.underlyings[name] = _Contracts()
            # The first listing wins when two segments list the same contract.
            contracts.by_expiry.setdefault(inst.expiry, {}).setdefault((inst.strike, inst.option_type), inst)
        for contracts in self.underlyings.values():
            contracts.seal()


_INDEXES: weakref.WeakKeyDictionary[MasterData, _OptionIndex] = weakref.WeakKeyDictionary()


def _index(master: MasterData) -> _OptionIndex:
    index = _INDEXES.get(master)
    if index is None or index.size != len(master):
        index = _INDEXES[master] = _OptionIndex(master)
    return index


def _contracts(master: MasterData, underlying: str) -> tuple[str, _Contracts]:
    name = underlying.strip().upper()
    contracts = _index(master).underlyings.get(name)
    if contracts is None or not contracts.expiries:
        known = sorted(_index(master).underlyings)
        hint = (
            f" (options are listed on {', '.join(known[:12])}{', ...' if len(known) > 12 else ''})"
            if known
            else " (the master lists no options at all: run `neopulse sync-master` with a Kotak login)"
        )
        raise ChainError(f"no options on {underlying!r} in the instrument master{hint}")
    return name, contracts


def underlyings(master: MasterData) -> list[str]:
    """The underlyings with listed options, sorted."""
    return sorted(_index(master).underlyings)


EXPIRY_CLOSE = dt.time(15, 30)  # an index or stock option's last trade on its expiry day, IST
_IST = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")


def live_from(today: dt.date) -> dt.date:
    """The first expiry date still trading on ``today``. A ``date`` is itself; a ``datetime``
    (naive = IST) at or after 15:30 IST is the next day: on an expiry day after the close,
    that expiry is over and ``"weekly"`` is the next one."""
    if isinstance(today, dt.datetime):
        local = today.astimezone(_IST) if today.tzinfo is not None else today
        return local.date() + dt.timedelta(days=1) if local.time() >= EXPIRY_CLOSE else local.date()
    return today


def _now() -> dt.datetime:
    from libs.common.clock import IST, Clock  # clock pulls in config: imported when needed

    return Clock().now(IST)


def expiries(master: MasterData, underlying: str, today: dt.date | None = None) -> list[dt.date]:
    """The listed option expiries of ``underlying`` (still trading on ``today`` if given:
    ``live_from``)."""
    _, contracts = _contracts(master, underlying)
    days = contracts.expiries
    return days[bisect.bisect_left(days, live_from(today)) :] if today is not None else list(days)


# ---------------------------------------------------------------------- expiry
def resolve_expiry(master: MasterData, underlying: str, spec: str | dt.date, today: dt.date) -> dt.date:
    """The expiry date ``spec`` names for ``underlying`` on ``today`` (see the module doc; a
    ``datetime`` after 15:30 IST counts from the next day, ``live_from``); ``ChainError`` when
    the master lists none."""
    today = live_from(today)
    name, contracts = _contracts(master, underlying)
    if isinstance(spec, str) and spec.strip().lower() not in EXPIRY_SPECS:
        try:
            spec = dt.date.fromisoformat(spec.strip())
        except ValueError:
            raise ChainError(
                f"unknown expiry {spec!r}: use weekly, next-weekly, monthly or a date (YYYY-MM-DD)"
            ) from None
    if isinstance(spec, dt.date):
        if spec in contracts.by_expiry:
            return spec
        ahead = contracts.expiries[bisect.bisect_left(contracts.expiries, today) :]
        listed = ", ".join(d.isoformat() for d in ahead[:6]) or "none"
        raise ChainError(
            f"no {name} options expire on {spec.isoformat()} (listed from {today.isoformat()}: {listed})"
        )
    kind = spec.strip().lower()
    days = contracts.monthly if kind == "monthly" else contracts.expiries
    i = bisect.bisect_left(days, today) + (1 if kind == "next-weekly" else 0)
    if i >= len(days):
        last = contracts.expiries[-1].isoformat()
        raise ChainError(
            f"no {kind} {name} expiry on or after {today.isoformat()} in the instrument master "
            f"(its last {name} option expiry is {last}; is the master stale?)"
        )
    return days[i]


# ---------------------------------------------------------------------- the chain
class Chain:
    """The listed options of one underlying and expiry (built once per master and expiry, and
    shared: treat it as read-only).

    ``strikes`` (a tuple) are sorted and hold every strike with a call or a put; ``step`` is the most
    common gap between neighbouring strikes (the smaller on a tie), 0 for a single strike."""

    __slots__ = ("_by", "expiry", "step", "strikes", "underlying")

    def __init__(
        self, underlying: str, expiry: dt.date, contracts: dict[tuple[Decimal, str], Instrument]
    ) -> None:
        self.underlying = underlying
        self.expiry = expiry
        self._by = contracts
        self.strikes: tuple[Decimal, ...] = tuple(sorted({strike for strike, _ in contracts}))
        gaps = Counter(b - a for a, b in zip(self.strikes, self.strikes[1:], strict=False))
        self.step: Decimal = min(gaps, key=lambda g: (-gaps[g], g)) if gaps else Decimal(0)

    def __repr__(self) -> str:
        lo, hi = (_fmt(self.strikes[0]), _fmt(self.strikes[-1])) if self.strikes else ("-", "-")
        return f"Chain({self.underlying} {self.expiry.isoformat()}, {len(self.strikes)} strikes {lo}..{hi})"

    def __len__(self) -> int:
        return len(self.strikes)

    def atm(self, spot: float | Decimal) -> Decimal:
        """The listed strike nearest ``spot``; a tie goes to the lower strike. A spot that is
        not a positive finite number (no index tick yet: 0, NaN, inf) raises ``ChainError``
        rather than picking an edge strike."""
        strikes = self.strikes
        price = _strike(spot)
        if not (price.is_finite() and price > 0):
            raise ChainError(f"{self.underlying}: spot {spot!r} is not a positive finite price")
        i = bisect.bisect_left(strikes, price)
        if i == 0:
            return strikes[0]
        if i == len(strikes):
            return strikes[-1]
        below, above = strikes[i - 1], strikes[i]
        return above if above - price < price - below else below

    def strike(self, n: int, spot: float | Decimal) -> Decimal:
        """The listed strike ``n`` places from ATM (``n`` > 0 above, < 0 below, 0 = ATM)."""
        i = bisect.bisect_left(self.strikes, self.atm(spot)) + n
        if not 0 <= i < len(self.strikes):
            raise ChainError(
                f"{self.underlying} {self.expiry.isoformat()}: {n:+d} strikes from ATM "
                f"{_fmt(self.atm(spot))} is beyond the listed strikes {_fmt(self.strikes[0])}.."
                f"{_fmt(self.strikes[-1])}"
            )
        return self.strikes[i]

    def near(self, spot: float | Decimal, strikes: int) -> list[Decimal]:
        """ATM and up to ``strikes`` listed strikes either side of it, low to high."""
        i = bisect.bisect_left(self.strikes, self.atm(spot))
        return list(self.strikes[max(0, i - strikes) : i + strikes + 1])

    def call(self, strike: StrikeLike) -> Instrument:
        """The call (CE) at ``strike``."""
        return self.option(strike, "CE")

    def put(self, strike: StrikeLike) -> Instrument:
        """The put (PE) at ``strike``."""
        return self.option(strike, "PE")

    def get(self, strike: StrikeLike, option_type: str) -> Instrument | None:
        """The ``CE`` or ``PE`` at ``strike``, None if not listed."""
        return self._by.get((_strike(strike), option_type.strip().upper()))

    def option(self, strike: StrikeLike, option_type: str) -> Instrument:
        """The ``CE`` or ``PE`` at ``strike``; ``ChainError`` naming the contract if not listed."""
        kind = option_type.strip().upper()
        price = _strike(strike)
        inst = self._by.get((price, kind))
        if inst is None:
            if kind not in OPTION_TYPES:
                raise ChainError(f"option type must be CE or PE, got {option_type!r}")
            where = (
                (
                    f"listed strikes {_fmt(self.strikes[0])}..{_fmt(self.strikes[-1])}"
                    + (f", step {_fmt(self.step)}" if self.step else "")
                )
                if self.strikes
                else "no strikes listed"
            )
            raise ChainError(
                f"no {self.underlying} {_fmt(price)} {kind} expiring {self.expiry.isoformat()} "
                f"in the instrument master ({where})"
            )
        return inst

    def instruments(self, strikes: Iterable[Decimal] | None = None) -> list[Instrument]:
        """The listed options (of ``strikes`` if given, else all), by strike, CE before PE."""
        out: list[Instrument] = []
        for strike in self.strikes if strikes is None else strikes:
            for kind in OPTION_TYPES:
                inst = self._by.get((strike, kind))
                if inst is not None:
                    out.append(inst)
        return out


def chain(
    master: MasterData, underlying: str, expiry: str | dt.date = "weekly", today: dt.date | None = None
) -> Chain:
    """The option chain of ``underlying`` at the expiry ``expiry`` names on ``today``
    (default: the time, IST, of a ``Clock()``, so after 15:30 on an expiry day ``"weekly"`` is
    the next expiry; strategies and tests pass their own day or time)."""
    day = today if today is not None else _now()
    name, contracts = _contracts(master, underlying)
    when = resolve_expiry(master, name, expiry, day)
    built = contracts.chains.get(when)
    if built is None:
        built = contracts.chains[when] = Chain(name, when, contracts.by_expiry[when])
    return built


def find_option(  # noqa: PLR0917 - the agreed interface: a contract's four coordinates, positional
    master: MasterData,
    underlying: str,
    strike: StrikeLike,
    option_type: str,
    expiry_spec: str | dt.date,
    today: dt.date,
) -> Instrument:
    """One option, e.g. ``find_option(m, "NIFTY", 24000, "CE", "weekly", today)``;
    ``ChainError`` (an ``UnknownInstrument``) naming what is not listed."""
    return chain(master, underlying, expiry_spec, today).option(strike, option_type)


def spot_instrument(master: MasterData, underlying: str) -> Instrument | None:
    """The cash-market instrument of ``underlying``: its index row (``Nifty 50`` for NIFTY)
    or its ``-EQ`` stock; None when the master has neither."""
    name = underlying.strip().upper()
    inst = _index(master).spots.get(name)
    if inst is not None:
        return inst
    symbol = INDEX_SYMBOLS.get(name)
    if symbol is not None:
        inst = master.by_symbol.get(symbol.upper())
        if inst is not None:
            return inst
    for candidate in (f"{name}-EQ", name):
        inst = master.by_symbol.get(candidate)
        if inst is not None and not inst.segment.endswith("_fo"):
            return inst
    return None
