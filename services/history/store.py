"""Candles under ``$NEOPULSE_HOME/history/``: which chunks to fetch, and Parquet files of them.

Layout: ``history/<segment>_<token>/<interval>/<chunk start>.parquet``, one file per chunk of
a fixed calendar grid (so a later, wider fetch finds the chunks an earlier one stored):

* ``1m``, ``5m``: half months (1st-15th, 16th-end), within Kotak's 30 days a request;
* ``15m``, ``1h``: calendar months (60 and 90 days allowed);
* ``1d``: calendar quarters (180 days allowed).

A chunk is fetched for the part of it the asked range covers. Its file holds what Kotak sent
for those days and records them (``from``/``to``) and whether they were all in the past when
fetched (``complete``): a complete file covering the days asked for is not fetched again
(resume); any other is fetched again and replaced. An empty file is a real answer (a holiday
fortnight). Writes go to a temporary file in the same directory, then ``os.replace``: a
process killed mid-write leaves the old file or none, never half of one.

Schema: ``ts`` ``timestamp[ns, tz=Asia/Kolkata]`` (the candle's start; stored as UTC epoch
nanoseconds, shown in IST), ``open``/``high``/``low``/``close`` ``float64`` (rupees),
``volume``/``oi`` ``int64`` (Kotak leaves ``oi`` empty for now: 0). pyarrow is imported only
by the functions that read or write files: no service imports it.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
INTERVALS = ("1m", "5m", "15m", "1h", "1d")
INTERVAL_S = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "1d": 86400}
WIRE_INTERVAL = {"1m": "1min", "5m": "5min", "15m": "15min", "1h": "60min", "1d": "D"}
EARLIEST = dt.date(2015, 1, 1)  # older requests are a typo (Kotak's history goes back to about 2021)
COLUMNS = ("ts", "open", "high", "low", "close", "volume", "oi")


class HistoryInputError(ValueError):
    """Bad input for a fetch or a backtest (one line for the operator)."""


@dataclass(frozen=True)
class Chunk:
    """The days ``first..last`` of the grid chunk starting ``start``."""

    start: dt.date
    first: dt.date
    last: dt.date


def parse_day(text: str, what: str) -> dt.date:
    try:
        day = dt.date.fromisoformat(text.strip())
    except ValueError:
        raise HistoryInputError(f"{what} {text!r} is not a date YYYY-MM-DD") from None
    if day < EARLIEST:
        raise HistoryInputError(f"{what} {day} is before {EARLIEST}")
    return day


def check_range(first: dt.date, last: dt.date, today: dt.date) -> None:
    if last < first:
        raise HistoryInputError(f"--to {last} is before --from {first}")
    if first > today:
        raise HistoryInputError(f"--from {first} is in the future (today is {today} IST)")


def _grid_start(day: dt.date, interval: str) -> dt.date:
    if interval in ("1m", "5m"):
        return day.replace(day=1 if day.day <= 15 else 16)
    if interval in ("15m", "1h"):
        return day.replace(day=1)
    return dt.date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)


def _grid_next(start: dt.date, interval: str) -> dt.date:
    if interval in ("1m", "5m") and start.day == 1:
        return start.replace(day=16)
    months = 3 if interval == "1d" else 1
    month = start.month - 1 + months
    return dt.date(start.year + month // 12, month % 12 + 1, 1)


def chunks(first: dt.date, last: dt.date, interval: str) -> list[Chunk]:
    """The grid chunks that cover ``first..last``, each cut to that range."""
    if interval not in INTERVALS:
        raise HistoryInputError(f"--interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    out: list[Chunk] = []
    start = _grid_start(first, interval)
    while start <= last:
        nxt = _grid_next(start, interval)
        out.append(Chunk(start, max(first, start), min(last, nxt - dt.timedelta(days=1))))
        start = nxt
    return out


def instrument_dir(home: Path, key: str) -> str:
    seg, _, tok = key.partition("|")
    return f"{seg}_{tok}"


def chunk_path(home: Path, key: str, interval: str, start: dt.date) -> Path:
    return home / "history" / instrument_dir(home, key) / interval / f"{start.isoformat()}.parquet"


def stored_range(path: Path) -> tuple[dt.date, dt.date, bool] | None:
    """The days the file at ``path`` holds (first, last) and whether they are complete (all
    before the day they were fetched); None when there is no readable file."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):  # a damaged file: fetch again (pyarrow's errors are both)
        return None
    try:
        first = dt.date.fromisoformat(meta.get(b"from", b"").decode())
        last = dt.date.fromisoformat(meta.get(b"to", b"").decode())
    except ValueError:
        return None
    return first, last, meta.get(b"complete") == b"1"


def stored_covers(path: Path, chunk: Chunk) -> bool:
    """The file at ``path`` is complete and holds at least the days of ``chunk``."""
    held = stored_range(path)
    return held is not None and held[2] and held[0] <= chunk.first and held[1] >= chunk.last


def widened(path: Path, chunk: Chunk) -> Chunk:
    """``chunk`` stretched over the days its stored file holds: a fetch rewrites the whole file,
    so one that only overlaps (or leaves a gap to) what an earlier fetch stored must fetch those
    days again rather than drop them."""
    held = stored_range(path)
    if held is None:
        return chunk
    return Chunk(chunk.start, min(chunk.first, held[0]), max(chunk.last, held[1]))


def _schema(pa: Any) -> Any:
    return pa.schema([("ts", pa.timestamp("ns", tz="Asia/Kolkata")), ("open", pa.float64()),
                      ("high", pa.float64()), ("low", pa.float64()), ("close", pa.float64()),
                      ("volume", pa.int64()), ("oi", pa.int64())])  # fmt: skip


def write_chunk(path: Path, chunk: Chunk, candles: list[list[Any]], today: dt.date, symbol: str = "") -> None:
    """Store ``candles`` (``[ts_ns, o, h, l, c, v, oi]``, ascending) for ``chunk``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*candles, strict=True)) if candles else [()] * len(COLUMNS)
    schema = _schema(pa).with_metadata({
        "from": chunk.first.isoformat(), "to": chunk.last.isoformat(),
        "complete": "1" if chunk.last < today else "0", "symbol": symbol,
    })  # fmt: skip
    table = pa.table([pa.array(c, type=f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_candles(home: Path, key: str, interval: str, first: dt.date, last: dt.date) -> list[tuple[Any, ...]]:
    """The stored candles of ``key`` whose IST day is in ``first..last``: ``(ts_ns, o, h, l, c,
    v, oi)`` tuples, ascending, one per start time."""
    import pyarrow.parquet as pq

    lo = int(dt.datetime.combine(first, dt.time(), IST).timestamp()) * 10**9
    hi = int(dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), IST).timestamp()) * 10**9
    rows: dict[int, tuple[Any, ...]] = {}
    for chunk in chunks(first, last, interval):
        path = chunk_path(home, key, interval, chunk.start)
        if not path.is_file():
            continue
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            raise HistoryInputError(f"{path}: unreadable ({exc}); fetch it again") from None
        ts = table.column("ts").cast("int64").to_pylist()
        values = [table.column(c).to_pylist() for c in COLUMNS[1:]]
        for i, t in enumerate(ts):
            if lo <= t < hi:
                rows[t] = (t, *(v[i] for v in values))
    return [rows[t] for t in sorted(rows)]
