"""Instrument-master load time: a 100k-row Kotak-format F&O CSV, and the paper master.

    python -m benchmarks.bench_master [--rows 100000] [--repeat 5] [--json]

The CSV is generated here in Kotak's nse_fo layout (spaced headers, ``dStrikePrice;``, tick and
strike in paise, expiries in seconds since 1980 IST): index and stock options over several
expiries and a ladder of strikes, plus futures, about what the real file holds. Then, best of
``--repeat`` runs each:

1. baseline: read the file and one ``csv.reader`` pass over it, each row dropped (the floor any
   CSV parser pays);
2. ``MasterData.load([path])``: read the file, parse every row into an ``Instrument``, index it;
3. the paper master: ``MasterData.load(today=...)`` (the cash sample plus the generated index
   derivatives of the day).

Target: the 100k-row load under 1 s on a 2-core machine. Wall and CPU time are both given (on a
busy machine the wall time stretches, the CPU time much less); the ratio (of CPU times) to the
baseline shows what the conversion to instruments costs over bare CSV splitting.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.instruments import KOTAK_EPOCH_OFFSET, MasterData  # noqa: E402

HEADER = ("pSymbol,pGroup,pExchSeg,pInstType,pSymbolName,pTrdSymbol,pOptionType,pScripRefKey,pISIN,"
          "pAssetCode,pSubGroup,pCombinedSymbol,pDesc,pAmcCode,pContractId,dTickSize ,lLotSize,"
          "lExpiryDate ,lMultiplier ,lPrecision,dStrikePrice;,pExchange,pInstName,pExpiryDate,"
          "iPermittedToTrade,iBoardLotQty ")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def fo_master_csv(rows: int, first_expiry: dt.date = dt.date(2026, 12, 8)) -> str:
    """``rows`` Kotak nse_fo rows: 4 index underlyings with 8 expiries, 200 stocks with 3."""
    out = [HEADER]
    underlyings = [("NIFTY", "OPTIDX", 65, 50, 25_900), ("BANKNIFTY", "OPTIDX", 30, 100, 58_500),
                   ("FINNIFTY", "OPTIDX", 60, 50, 27_500), ("MIDCPNIFTY", "OPTIDX", 120, 25, 13_500)]
    underlyings += [(f"STOCK{k:03d}", "OPTSTK", 250 + k, 10, 500 + 10 * k) for k in range(200)]
    token = 35_000
    while len(out) <= rows:
        for name, kind, lot, step, ref in underlyings:
            expiries = 8 if kind == "OPTIDX" else 3
            for e in range(expiries):
                day = first_expiry + dt.timedelta(days=7 * e)
                close = dt.datetime(day.year, day.month, day.day, 10, 0, tzinfo=dt.UTC)  # 15:30 IST
                epoch = int(close.timestamp()) - KOTAK_EPOCH_OFFSET
                tag = f"{day:%y}{_MONTHS[day.month - 1]}"
                fut = "FUTIDX" if kind == "OPTIDX" else "FUTSTK"
                out.append(f"{token},,nse_fo,{fut},{name},{name}{tag}{e}FUT,XX,{name},,{name},,,{name},,,"
                           f"10.000000,{lot},{epoch},1,2,-1.000000,NSE,{fut},{day:%d%b%Y},1,{lot}")
                token += 1
                for k in range(-20, 21):
                    strike = ref + k * step
                    for opt in ("CE", "PE"):
                        out.append(f"{token},,nse_fo,{kind},{name},{name}{tag}{e}{strike}{opt},{opt},{name},,"
                                   f"{name},,,{name},,,5.000000,{lot},{epoch},1,2,{strike * 100}.000000,NSE,"
                                   f"{kind},{day:%d%b%Y},1,{lot}")
                        token += 1
                    if len(out) > rows:
                        return "\n".join(out[: rows + 1]) + "\n"
    return "\n".join(out[: rows + 1]) + "\n"


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float, Any]:
    """The best wall time, the best CPU time (of this process) and the last result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, result


def run(rows: int, repeat: int) -> dict[str, Any]:
    text = fo_master_csv(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nse_fo.csv"
        path.write_text(text)
        def csv_pass() -> int:
            return sum(1 for _ in csv.reader(io.StringIO(path.read_text())))

        raw_s, raw_cpu, raw_rows = best_of(repeat, csv_pass)
        load_s, load_cpu, master = best_of(repeat, lambda: MasterData.load([path]))
    paper_s, _, paper = best_of(repeat, lambda: MasterData.load(today=dt.date(2026, 12, 2)))
    assert raw_rows == rows + 1 and len(master) == rows
    return {
        "rows": rows,
        "csv_reader_s": round(raw_s, 4),
        "csv_reader_cpu_s": round(raw_cpu, 4),
        "load_s": round(load_s, 4),
        "load_cpu_s": round(load_cpu, 4),
        "ratio_to_csv_reader": round(load_cpu / raw_cpu, 2),
        "rows_per_s": round(rows / load_s),
        "meets_target": load_s < 1.0,
        "paper_master_instruments": len(paper),
        "paper_master_s": round(paper_s, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.rows, args.repeat)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['rows']:,}-row Kotak nse_fo master (best of {args.repeat}):")
    print(f"  csv.reader pass (baseline):   {res['csv_reader_s'] * 1000:8.1f} ms wall, "
          f"{res['csv_reader_cpu_s'] * 1000:.1f} ms CPU")
    print(f"  MasterData.load:              {res['load_s'] * 1000:8.1f} ms wall, "
          f"{res['load_cpu_s'] * 1000:.1f} ms CPU ({res['ratio_to_csv_reader']}x the baseline's CPU, "
          f"{res['rows_per_s']:,} rows/s)")
    print(f"  target < 1 s: {'ok' if res['meets_target'] else 'MISSED'}")
    print(f"paper master ({res['paper_master_instruments']:,} instruments): "
          f"{res['paper_master_s'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
