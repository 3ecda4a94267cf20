"""MasterData: Kotak's scrip master loaded into dicts for symbol ↔ token lookups.

Kotak's CSV quirks handled here: header names with stray spaces (``dTickSize ``) or
punctuation (``dStrikePrice;``), tick size and strike in paise, ``pSymbol`` as the token,
``lLotSize`` as the lot, expiry as seconds since 1980 for derivatives. Freeze quantities
come from a separate CSV (``symbol,freeze_qty``) because Kotak's files lack them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import msgspec

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_MASTER = DATA_DIR / "sample_master.csv"
FREEZE_QTY = DATA_DIR / "freeze_qty.csv"
_PAISE = Decimal(100)
_KOTAK_EPOCH_OFFSET = 315513000  # Kotak derivative expiries count from 1980-01-01 IST


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


class Instrument(msgspec.Struct, frozen=True, kw_only=True):
    segment: str
    token: str
    symbol: str
    name: str = ""
    inst_type: str = ""
    lot_size: int = 1
    tick_size: Decimal = Decimal("0.05")
    freeze_qty: int = 0  # 0 = no freeze limit known
    expiry: str = ""
    strike: Decimal | None = None
    option_type: str = ""
    ref_price: float = 0.0  # sample master only: a starting price for the simulator

    @property
    def key(self) -> str:
        return f"{self.segment}|{self.token}"  # instrument_key, inlined: hot path

    @property
    def tradable(self) -> bool:
        return self.inst_type != "INDEX" and self.tick_size > 0


def _clean_header(name: str) -> str:
    return name.strip().rstrip(";").strip()


def _dec(text: str) -> Decimal | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


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
    def load(cls, paths: Iterable[Path] | None = None, freeze_path: Path | None = FREEZE_QTY) -> MasterData:
        """Load master CSVs (default: the bundled sample) plus the freeze-quantity table."""
        freeze = load_freeze_qty(freeze_path) if freeze_path and freeze_path.exists() else {}
        master = cls()
        for path in (list(paths) if paths else [SAMPLE_MASTER]):
            master.add(parse_master_csv(path.read_text(encoding="utf-8-sig"), freeze))
        return master

    @classmethod
    def load_for_home(cls, home: Path) -> MasterData:
        """The cached master under ``$NEOPULSE_HOME/master/`` if any, else the bundled sample."""
        cached = sorted((home / "master").glob("*.csv")) if (home / "master").is_dir() else []
        cached = [p for p in cached if p.name != "freeze_qty.csv"]
        return cls.load(cached or None)


def load_freeze_qty(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for row in csv.DictReader(lines):
        out[row["symbol"].strip().upper()] = int(row["freeze_qty"])
    return out


def parse_master_csv(text: str, freeze: dict[str, int] | None = None) -> list[Instrument]:
    """Parse one Kotak scrip-master CSV (any segment)."""
    freeze = freeze or {}
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
    i_tok, i_seg, i_sym = col["pSymbol"], col["pExchSeg"], col["pTrdSymbol"]
    i_name, i_type = col.get("pSymbolName"), col.get("pInstType")
    i_lot, i_tick = col.get("lLotSize"), col.get("dTickSize")
    i_exp, i_strike, i_opt = col.get("lExpiryDate"), col.get("dStrikePrice"), col.get("pOptionType")
    i_freeze, i_ref = col.get("lFreezeQty"), col.get("dRefPrice")
    n = len(header)
    out: list[Instrument] = []
    for row in reader:
        if len(row) < n:
            row.extend([""] * (n - len(row)))
        token, seg, sym = row[i_tok].strip(), row[i_seg].strip().lower(), row[i_sym].strip()
        if not token or not seg or not sym:
            continue
        name = row[i_name].strip() if i_name is not None else ""
        tick_paise = _dec(row[i_tick]) if i_tick is not None else None
        tick = (tick_paise / _PAISE).normalize() if tick_paise and tick_paise > 0 else Decimal(0)
        strike_paise = _dec(row[i_strike]) if i_strike is not None else None
        strike = (strike_paise / _PAISE) if strike_paise is not None and strike_paise > 0 else None
        expiry = ""
        if i_exp is not None:
            raw = _int(row[i_exp], -1)
            if raw > 0:
                import datetime as _dt

                secs = raw + _KOTAK_EPOCH_OFFSET if seg.endswith("_fo") else raw
                expiry = _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%d")
        fq = _int(row[i_freeze]) if i_freeze is not None else 0
        if not fq:
            fq = freeze.get(name.upper(), 0) if seg.endswith("_fo") else 0
        opt = row[i_opt].strip() if i_opt is not None else ""
        out.append(Instrument(
            segment=seg, token=token, symbol=sym, name=name,
            inst_type=row[i_type].strip() if i_type is not None else "",
            lot_size=max(1, _int(row[i_lot], 1)) if i_lot is not None else 1,
            tick_size=tick, freeze_qty=fq, expiry=expiry, strike=strike,
            option_type=opt if opt in ("CE", "PE") else "",
            ref_price=float(row[i_ref] or 0) if i_ref is not None else 0.0,
        ))
    return out
