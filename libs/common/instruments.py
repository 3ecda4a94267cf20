"""MasterData: Kotak's scrip master loaded into dicts for symbol ↔ token lookups.

Kotak's CSV quirks handled here: header names with stray spaces (``dTickSize ``) or
punctuation (``dStrikePrice;``), tick size and strike in paise, ``pSymbol`` as the token,
``lLotSize`` as the lot, ``pOptionType`` ``XX`` for futures, and the expiry epoch of each
segment (``nse_fo``: seconds since 1980-01-01 IST; ``bse_fo``: Unix seconds). Freeze
quantities come from a separate CSV (``symbol,freeze_qty``) because Kotak's files lack them.

Paper mode has no Kotak file: ``MasterData.load()`` then adds the index derivatives live on
the trading day to the bundled cash sample (``libs.common.contracts``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import msgspec

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_MASTER = DATA_DIR / "sample_master.csv"
FREEZE_QTY = DATA_DIR / "freeze_qty.csv"
_PAISE = Decimal(100)
KOTAK_EPOCH_OFFSET = 315_513_000  # 1980-01-01 00:00 IST in Unix seconds: nse_fo expiries count from it


KEY_SEP = "|"


def instrument_key(segment: str, token: str) -> str:
    """The one name of an instrument across NeoPulse: ``segment|token`` (``nse_cm|2885``).

    Dicts of positions, ticks and subscriptions are keyed by it, and users may type it
    where a trading symbol is asked for. Where a key is built per tick the f-string is
    written inline (``# instrument_key, inlined: hot path``): a call costs more."""
    return f"{segment}|{token}"


def split_key(key: str) -> tuple[str, str]:
    """``"nse_cm|2885"`` → ``("nse_cm", "2885")``; a key without ``|`` is all segment."""
    segment, _, token = key.partition(KEY_SEP)
    return segment, token


class UnknownInstrument(KeyError):
    """A symbol or ``segment|token`` that the master does not know."""

    def __str__(self) -> str:
        return f"unknown instrument: {self.args[0]}"


# gc=False: an Instrument holds only strings, numbers and dates, so it can never be part of a
# reference cycle; untracked, a 100k-row master loads about 20% faster (no GC passes over it).
class Instrument(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One tradable (or index) instrument. Derivatives carry their contract: ``underlying``
    (``NIFTY``), ``expiry`` (the last trading day), ``strike`` and ``option_type`` (``CE`` or
    ``PE``; empty for futures and cash); ``inst_type`` is Kotak's (``EQ``, ``INDEX``,
    ``OPTIDX``, ``OPTSTK``, ``FUTIDX``, ``FUTSTK``)."""

    segment: str
    token: str
    symbol: str
    name: str = ""
    inst_type: str = ""
    lot_size: int = 1
    tick_size: Decimal = Decimal("0.05")
    freeze_qty: int = 0  # 0 = no freeze limit known
    expiry: dt.date | None = None
    strike: Decimal | None = None
    option_type: str = ""  # CE | PE | "" (futures, cash, index)
    underlying: str = ""  # derivatives: the underlying's name (NIFTY, RELIANCE); "" otherwise
    ref_price: float = 0.0  # sample master only: a starting price for the simulator

    @property
    def key(self) -> str:
        return f"{self.segment}|{self.token}"  # instrument_key, inlined: hot path

    @property
    def tradable(self) -> bool:
        return self.inst_type != "INDEX" and self.tick_size > 0


def _clean_header(name: str) -> str:
    return name.strip().rstrip(";").strip()


def _int(text: str, default: int = 0) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default


class MasterData:
    """In-memory instrument master: ``by_key`` (``segment|token``) and ``by_symbol``."""

    def __init__(self, instruments: Iterable[Instrument] = ()) -> None:
        self.by_key: dict[str, Instrument] = {}
        self.by_symbol: dict[str, Instrument] = {}
        self._generated: set[str] = set()  # symbols of the paper derivatives added
        self.add(instruments)

    def add(self, instruments: Iterable[Instrument]) -> None:
        for inst in instruments:
            self.by_key[inst.key] = inst
            self.by_symbol.setdefault(inst.symbol.upper(), inst)

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_key.values())

    def resolve(self, name: str) -> Instrument:
        """Find by ``segment|token`` or by trading symbol (case-insensitive)."""
        inst = self.by_key.get(name) if KEY_SEP in name else self.by_symbol.get(name.strip().upper())
        if inst is None and KEY_SEP in name:
            seg, tok = split_key(name)
            inst = self.by_key.get(instrument_key(seg.strip().lower(), tok.strip()))
        if inst is None:
            raise UnknownInstrument(name)
        return inst

    def get(self, segment: str, token: str) -> Instrument | None:
        return self.by_key.get(f"{segment}|{token}")  # instrument_key, inlined: hot path (replay)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, paths: Iterable[Path] | None = None, freeze_path: Path | None = FREEZE_QTY, *,
             today: dt.date | None = None) -> MasterData:
        """Load master CSVs plus the freeze-quantity table.

        Without ``paths`` (paper mode): the bundled cash sample and the index derivatives live
        on ``today`` (``libs.common.contracts.paper_derivatives``); ``today`` defaults to the
        trading day (IST) of a ``Clock()``, so ``NEOPULSE_CLOCK_OFFSET_S`` moves it too. With
        ``paths`` (a real master) exactly those files, nothing generated; an expiry outside a
        year before to eight years after ``today`` is left unknown (``expiry_window``)."""
        freeze = load_freeze_qty(freeze_path) if freeze_path and freeze_path.exists() else {}
        master = cls()
        if paths:
            day = today if today is not None else paper_today()
            for path in paths:
                master.add(parse_master_csv(path.read_text(encoding="utf-8-sig"), freeze, today=day))
            return master
        master.add(parse_master_csv(SAMPLE_MASTER.read_text(encoding="utf-8-sig"), freeze))
        master.add_paper_derivatives(today if today is not None else paper_today())
        return master

    def add_paper_derivatives(self, today: dt.date) -> None:
        """Add the generated index derivatives live on ``today`` (paper mode). Called for
        several days (a backtest over a multi-day recording), a contract already listed keeps
        its row: a contract's token is the same on every day."""
        from libs.common.calendar import load_contract_specs  # contracts imports this module
        from libs.common.contracts import index_prices_of, paper_derivatives

        specs = load_contract_specs()
        made = self._generated
        taken = {k for k, i in self.by_key.items() if i.symbol not in made}  # not an earlier day's
        fresh = paper_derivatives(today, specs=specs, index_prices=index_prices_of(self.by_symbol, specs),
                                  taken_tokens=taken)  # fmt: skip
        new = [i for i in fresh if i.symbol not in made]
        made.update(i.symbol for i in new)
        self.add(new)

    @classmethod
    def load_for_home(cls, home: Path, *, today: dt.date | None = None,
                      also: Iterable[dt.date] = ()) -> MasterData:  # fmt: skip
        """The cached master under ``$NEOPULSE_HOME/master/`` if any (a real master, loaded
        as it is), else the bundled sample with the paper derivatives of ``today`` and of each
        day in ``also`` (the other days of a multi-day recording)."""
        cached = sorted((home / "master").glob("*.csv")) if (home / "master").is_dir() else []
        cached = [p for p in cached if p.name != "freeze_qty.csv"]
        master = cls.load(cached or None, today=today)
        if not cached:
            for day in also:
                master.add_paper_derivatives(day)
        return master


def paper_today() -> dt.date:
    """The trading day (IST) of a ``Clock()``: the day the paper master's contracts are for."""
    from libs.common.clock import IST, Clock  # clock pulls in config: imported when needed

    return Clock().now(IST).date()


def load_freeze_qty(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for row in csv.DictReader(lines):
        out[row["symbol"].strip().upper()] = int(row["freeze_qty"])
    return out


# Expiry epochs differ by segment. nse_fo (and cde_fo) count seconds from 1980-01-01 00:00 IST,
# the NSE trading system's epoch; bse_fo and mcx_fo carry plain Unix seconds. The same split
# is what OpenAlgo's Kotak master import applies (it adds 315513000 for NFO and CDS only).
_EPOCH_1980_SEGMENTS = frozenset({"nse_fo", "cde_fo"})
_IST_OFFSET_S = 19_800
_MIN_EXPIRY, _MAX_EXPIRY = dt.date(2000, 1, 1), dt.date(2100, 12, 31)
_ANY_EXPIRY = (_MIN_EXPIRY, _MAX_EXPIRY)


def expiry_window(today: dt.date | None) -> tuple[dt.date, dt.date]:
    """The expiries a master may plausibly carry: from a year before ``today`` to eight years
    after it (2000..2100 when today is not known). The longest-dated index options run five
    years; a Unix-seconds value read on the 1980 epoch lands ten years late (the offset is
    315,513,000 s, a day short of ten calendar years), so eight keeps both apart."""
    if today is None:
        return _ANY_EXPIRY
    return today - dt.timedelta(days=366), today.replace(year=today.year + 8, day=min(today.day, 28))


def _expiry_of(raw: str, seg: str, window: tuple[dt.date, dt.date] = _ANY_EXPIRY) -> dt.date | None:
    """Kotak's ``lExpiryDate`` as the IST date of the last trading day; None when absent, not a
    finite number, or when it lands outside ``window`` (``expiry_window``: a file whose
    convention changed, e.g. a bse_fo value read as nse_fo lands ten years late; no date beats
    a wrong one, and risk then cannot refuse the contract as expired, which a wrong date would
    do)."""
    try:
        secs = int(float(raw))
    except (ValueError, OverflowError):  # "", "abc"; "inf", "nan"
        return None
    if secs <= 0:
        return None
    offset = KOTAK_EPOCH_OFFSET if seg in _EPOCH_1980_SEGMENTS else 0
    try:
        day = dt.datetime.fromtimestamp(secs + offset + _IST_OFFSET_S, dt.UTC).date()
    except (OverflowError, OSError, ValueError):
        return None
    return day if window[0] <= day <= window[1] else None


def parse_master_csv(  # noqa: PLR0915 - one hot loop, kept inline: a call per row costs 10%
    text: str, freeze: dict[str, int] | None = None, *, today: dt.date | None = None,
) -> list[Instrument]:
    """Parse one Kotak scrip-master CSV (any segment: cash, nse_fo, bse_fo).

    F&O rows (OPTIDX, OPTSTK, FUTIDX, FUTSTK) carry ``underlying`` from ``pSymbolName``, the
    strike (paise → rupees), ``CE``/``PE`` (``XX`` → ""), and the expiry date. Values that
    repeat across rows (tick sizes, lots, strikes, expiries) are converted once each and
    cached: a 100k-row F&O master loads in well under a second. With ``today`` an expiry
    outside ``expiry_window(today)`` is left unknown."""
    freeze = freeze or {}
    window = expiry_window(today)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [_clean_header(h) for h in next(reader)]
    except StopIteration:
        return []
    col = {name: i for i, name in enumerate(header)}
    needed = ("pSymbol", "pExchSeg", "pTrdSymbol")
    missing = [n for n in needed if n not in col]
    if missing:
        raise ValueError(f"scrip master is missing columns: {', '.join(missing)}")
    n = len(header)
    get = col.get
    i_tok, i_seg, i_sym = col["pSymbol"], col["pExchSeg"], col["pTrdSymbol"]
    # a missing optional column reads the padding cell at index n (always "")
    i_name, i_type = get("pSymbolName", n), get("pInstType", n)
    i_lot, i_tick = get("lLotSize", n), get("dTickSize", n)
    i_exp, i_strike, i_opt = get("lExpiryDate", n), get("dStrikePrice", n), get("pOptionType", n)
    i_freeze, i_ref = get("lFreezeQty", n), get("dRefPrice", n)
    # rows are padded to the header's width, plus the blank cell when a column is missing
    width = n + 1 if n in (i_name, i_type, i_lot, i_tick, i_exp, i_strike, i_opt, i_freeze, i_ref) else n
    pad = [""] * width
    ticks: dict[str, Decimal] = {}
    strikes: dict[str, Decimal | None] = {}
    expiries: dict[tuple[str, str], dt.date | None] = {}
    ints: dict[str, int] = {}
    segs: dict[str, str] = {}
    out: list[Instrument] = []
    append = out.append
    for row in reader:
        if len(row) < width:
            row.extend(pad[: width - len(row)])
        token, sym = row[i_tok].strip(), row[i_sym].strip()
        seg = segs.get(row[i_seg])
        if seg is None:
            seg = segs[row[i_seg]] = row[i_seg].strip().lower()
        if not token or not seg or not sym:
            continue
        name = row[i_name].strip()
        upper = name.upper()
        raw = row[i_tick]
        tick = ticks.get(raw)
        if tick is None:
            tick = ticks[raw] = _paise(raw) or Decimal(0)
        fo = seg.endswith("_fo")
        strike: Decimal | None = None
        expiry: dt.date | None = None
        if fo:
            raw = row[i_strike]
            if raw not in strikes:
                paise = _paise(raw)
                strikes[raw] = paise if paise is not None and paise > 0 else None
            strike = strikes[raw]
            ekey = (row[i_exp], seg)
            if ekey not in expiries:
                expiries[ekey] = _expiry_of(ekey[0], seg, window)
            expiry = expiries[ekey]
        raw = row[i_lot]
        lot = ints.get(raw)
        if lot is None:
            lot = ints[raw] = max(1, _int(raw, 1))
        fq = _int(row[i_freeze]) if row[i_freeze] else 0
        if not fq and fo:
            fq = freeze.get(upper, 0)
        opt = row[i_opt].strip()
        ref = row[i_ref]
        append(Instrument(
            segment=seg, token=token, symbol=sym, name=name, inst_type=row[i_type].strip(),
            lot_size=lot, tick_size=tick, freeze_qty=fq, expiry=expiry, strike=strike,
            option_type=opt if opt in {"CE", "PE"} else "",
            underlying=upper if fo else "",
            ref_price=_float(ref) if ref else 0.0,
        ))
    return out


def _paise(text: str) -> Decimal | None:
    """A Kotak paise figure (``"2400000.000000"``) in rupees (``24000``, ``0.05``, ``12.5``);
    None when blank, not a number or not positive."""
    try:
        value = Decimal(text.strip()) / _PAISE
    except InvalidOperation:
        return None
    if not value.is_finite() or value <= 0:
        return None
    whole = value.to_integral_value()
    return Decimal(int(whole)) if value == whole else value.normalize()


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
