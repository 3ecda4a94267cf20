"""MasterData on Kotak's scrip-master CSV quirks, and its load time at 10k+ rows."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

from libs.common.instruments import MasterData, parse_master_csv

HEADER = ("pSymbol,pGroup,pExchSeg,pInstType,pSymbolName,pTrdSymbol,pOptionType,pScripRefKey,pISIN,"
          "pAssetCode,pExpiryDate,lLotSize,dTickSize ,lExpiryDate,dStrikePrice;,lFreezeQty,dRefPrice")


def synthetic_master(rows: int) -> str:
    """Kotak-shaped CSV: cash stocks plus NIFTY options, tick and strike in paise."""
    lines = [HEADER]
    for i in range(rows):
        if i % 2:
            strike = 20000 + (i // 2) % 400 * 50
            opt = "CE" if i % 4 == 1 else "PE"
            lines.append(f"{40000 + i},,nse_fo,OPTIDX,NIFTY,NIFTY26NOV{strike}{opt},{opt},NIFTY,,,,75,5,"
                         f"1480001400,{strike * 100}.000000,,")
        else:
            lines.append(f"{100 + i},EQ,nse_cm,,STOCK{i},STOCK{i}-EQ,XX,STOCK{i},INE{i:09d},,,1,10,-1,-1,,")
    return "\n".join(lines) + "\n"


def test_ten_thousand_rows_load_well_under_a_second(tmp_path: Path) -> None:
    path = tmp_path / "nse.csv"
    path.write_text(synthetic_master(10_000))

    t0 = time.perf_counter()
    master = MasterData.load([path])
    elapsed = time.perf_counter() - t0

    assert len(master) == 10_000
    assert elapsed < 0.5, f"10k-row master took {elapsed:.3f}s"


def test_symbol_and_token_lookups_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "nse.csv"
    path.write_text(synthetic_master(1000))
    master = MasterData.load([path])

    by_symbol = master.resolve("stock10-eq")
    assert by_symbol.key == "nse_cm|110"
    assert master.resolve("nse_cm|110") is by_symbol
    assert master.resolve(" NSE_CM | 110 ") is by_symbol
    assert master.get("nse_cm", "110") is by_symbol


def test_kotak_quirks_paise_spaced_headers_and_1980_expiry() -> None:
    text = synthetic_master(4)
    stock, option = parse_master_csv(text)[0], parse_master_csv(text)[1]
    assert stock.tick_size == Decimal("0.1") and stock.lot_size == 1 and stock.strike is None
    assert option.tick_size == Decimal("0.05") and option.lot_size == 75
    assert option.strike == Decimal("20000") and option.option_type == "CE"
    assert option.expiry == "2026-11-24"
    assert option.freeze_qty == 0  # no freeze table given here


def test_freeze_quantities_come_from_the_bundled_table() -> None:
    master = MasterData.load()
    assert master.resolve("NIFTY26NOVFUT").freeze_qty == 1800
    assert master.resolve("BANKNIFTY26NOVFUT").freeze_qty == 900


def test_cached_master_under_home_is_preferred_to_the_sample(tmp_path: Path) -> None:
    (tmp_path / "master").mkdir()
    (tmp_path / "master" / "nse_cm.csv").write_text(synthetic_master(10))
    assert len(MasterData.load_for_home(tmp_path)) == 10
    assert len(MasterData.load_for_home(tmp_path / "empty")) == len(MasterData.load())
