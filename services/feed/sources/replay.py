"""Replay recorded ticks (recorder files or plain CSV) at a speed factor.

``iter_ticks(path)`` is the reusable reader (backtests import it): a recorder file, a CSV
file, or a directory of them (taken in name order, so day files play chronologically).

CSV files carry ``ts,segment,token,ltp,qty`` (a header row is optional; extra columns
``bid``, ``ask``, ``volume``, ``symbol`` are read when the header names them). ``ts`` is
epoch seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude), or an
ISO-8601 time (naive times are in ``feed.timezone``). ``qty`` is the traded quantity of
that tick; ``volume`` accumulates it per instrument unless the file has a volume column.

``ReplaySource`` keeps the original gaps between ticks, divided by the speed factor, on a
schedule anchored at the first tick (no drift); ``max`` plays as fast as the bus takes it.
Ticks are republished exactly as recorded, original timestamps included.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import datetime, tzinfo
from decimal import Decimal, InvalidOperation
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec

from libs.common.bus import topic
from libs.common.clock import IST
from libs.common.config import ConfigError
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Codec, Tick
from services.feed.recorder import SUFFIX, ReadStats, read_frame_batches, read_tick_batches
from services.feed.sources import DOWN, LIVE, FeedSink, Source

BATCH = 2000  # ticks per reactor turn at most, so requests and heartbeats still get served


def replay_files(path: Path) -> list[Path]:
    """The files a replay path stands for: itself, or a directory's ``*.ticks``/``*.csv``."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (SUFFIX, ".csv"))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no such file or directory: {path}")


Frames = tuple[list[bytes], list[bytes], list[Tick] | None]  # topics, payloads, ticks


def iter_frame_batches(path: str | Path, master: MasterData | None = None, tz: tzinfo = IST,
                       stats: ReadStats | None = None, *, with_ticks: bool = True,
                       batch: int = 4096) -> Iterator[Frames]:
    """Batches of ``(topics, encoded ticks, ticks)`` ready to publish. Recordings come back
    as stored (no encode, and no decode either when ``with_ticks`` is false)."""
    stats = stats if stats is not None else ReadStats()
    encode = Codec().encode
    for f in replay_files(Path(path)):
        if f.suffix == ".csv":
            rows = read_csv_ticks(f, master, tz, stats)
            while chunk := list(islice(rows, batch)):
                yield ([topic("tick", t.segment, t.token) for t in chunk], [encode(t) for t in chunk], chunk)
        elif with_ticks:
            for ticks, payloads in read_tick_batches(f, stats, batch):
                yield [topic("tick", t.segment, t.token) for t in ticks], payloads, ticks
        else:
            for topics, payloads in read_frame_batches(f, stats, batch):
                yield topics, payloads, None


def iter_tick_batches(path: str | Path, master: MasterData | None = None, tz: tzinfo = IST,
                      stats: ReadStats | None = None, batch: int = 4096) -> Iterator[list[Tick]]:
    """Like ``iter_ticks``, in lists (cheaper per tick for bulk consumers such as backtests)."""
    stats = stats if stats is not None else ReadStats()
    for f in replay_files(Path(path)):
        if f.suffix == ".csv":
            rows = read_csv_ticks(f, master, tz, stats)
            while chunk := list(islice(rows, batch)):
                yield chunk
        else:
            for ticks, _ in read_tick_batches(f, stats, batch):
                yield ticks


def iter_ticks(path: str | Path, master: MasterData | None = None, tz: tzinfo = IST,
               stats: ReadStats | None = None) -> Iterator[Tick]:
    """Every tick stored at ``path`` (recorder file, CSV, or a directory of them), in order.

    ``master`` fills in trading symbols for CSV rows; ``stats`` counts records and skipped
    corrupt ones.
    """
    for ticks in iter_tick_batches(path, master, tz, stats):
        yield from ticks


def parse_ts(text: str, tz: tzinfo = IST) -> int:
    """A CSV timestamp → epoch nanoseconds (integers exactly; seconds may have a fraction)."""
    text = text.strip()
    if text.isdigit():
        n = int(text)
        for limit, scale in ((10**17, 1), (10**14, 1_000), (10**11, 1_000_000)):
            if n >= limit:
                return n * scale
        return n * 1_000_000_000
    try:
        return int(Decimal(text) * 1_000_000_000)
    except InvalidOperation:
        pass
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1_000_000) * 1000


_CSV_COLUMNS = ("ts", "segment", "token", "ltp", "qty")


def read_csv_ticks(path: Path, master: MasterData | None = None, tz: tzinfo = IST,
                   stats: ReadStats | None = None) -> Iterator[Tick]:
    """Ticks from a ``ts,segment,token,ltp,qty`` CSV. Bad rows are counted and skipped."""
    stats = stats if stats is not None else ReadStats()
    volume: dict[tuple[str, str], int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        col = dict(zip(_CSV_COLUMNS, range(5), strict=True))
        for lineno, row in enumerate(reader, 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() == "ts":
                col = {name.strip().lower(): i for i, name in enumerate(row)}
                missing = [c for c in _CSV_COLUMNS if c not in col]
                if missing:
                    raise ValueError(f"{path}: CSV header lacks {', '.join(missing)}")
                continue
            try:
                ts = parse_ts(row[col["ts"]], tz)
                seg = row[col["segment"]].strip().lower()
                token = row[col["token"]].strip()
                ltp = float(row[col["ltp"]])
                qty = int(float(row[col["qty"]] or 0))
                key = (seg, token)
                if "volume" in col and row[col["volume"]].strip():
                    vol = int(float(row[col["volume"]]))
                else:
                    vol = volume.get(key, 0) + qty
                volume[key] = vol
                symbol = row[col["symbol"]].strip() if "symbol" in col else ""
                if not symbol and master is not None:
                    inst = master.get(seg, token)
                    symbol = inst.symbol if inst is not None else ""
                tick = Tick(
                    segment=seg, token=token, symbol=symbol, ltp=ltp, last_qty=qty, volume=vol,
                    bid=float(row[col["bid"]]) if "bid" in col and row[col["bid"]].strip() else 0.0,
                    ask=float(row[col["ask"]]) if "ask" in col and row[col["ask"]].strip() else 0.0,
                    exch_ts_ns=ts, ts_ns=ts,
                )
            except (ValueError, IndexError):
                stats.corrupt += 1
                continue
            stats.records += 1
            yield tick


class ReplaySource(Source):
    """Plays ``feed.replay_path`` (default ``$NEOPULSE_HOME/ticks``) at ``feed.replay_speed``."""

    name = "replay"

    def __init__(self, sink: FeedSink, path: Path | None = None, speed: str | None = None) -> None:
        super().__init__(sink)
        feed = sink.cfg.feed
        self.path = path or (Path(feed.replay_path) if feed.replay_path else sink.cfg.home / "ticks")
        try:
            self.files = replay_files(self.path)
        except FileNotFoundError:
            raise ConfigError(
                f"config error: `feed.replay_path`: no such file or directory: {self.path}") from None
        if not self.files:
            raise ConfigError(f"config error: `feed.replay_path`: no .ticks or .csv files in {self.path}")
        speed = speed or feed.replay_speed
        self.speed: float | None = None if speed == "max" else float(speed)
        self.loop = feed.replay_loop
        self.tz = _zone(feed.timezone)
        self.read_stats = ReadStats()
        self._it: Iterator[Frames] | None = None
        self._topics: list[bytes] = []
        self._payloads: list[bytes] = []
        self._ticks: list[Tick] | None = None
        self._i = 0  # next unplayed entry of the current batch
        self._t0 = 0.0
        self._ts0 = 0
        self._shift = 0  # added to timestamps on each loop so time keeps moving forward
        self._last_ts = 0
        self.loops = 0
        self.played = 0
        self.finished = False
        self._timer: int | None = None
        self._encode = Codec().encode

    def _open(self) -> Iterator[Frames]:
        # At ``max`` without looping, records are republished as stored: no decode at all.
        with_ticks = self.speed is not None or self.loop
        return iter_frame_batches(self.path, self.sink.master, self.tz, self.read_stats,
                                  with_ticks=with_ticks)

    def start(self, instruments: list[Instrument]) -> None:
        # Subscribers connect after the feed binds; ticks sent before that are lost (PUB/SUB).
        # So the replay begins at the first Subscribe request (a strategy's or the CLI's),
        # or after ``feed.replay_delay_s`` when nobody asks.
        self._timer = self.sink.reactor.call_later(self.sink.cfg.feed.replay_delay_s, self.begin)

    def requested(self) -> None:
        self.begin()

    def begin(self) -> None:
        if self._it is not None:
            return
        if self._timer is not None:
            self.sink.reactor.cancel(self._timer)
        self._it = self._open()
        speed = "max" if self.speed is None else f"{self.speed:g}x"
        self.sink.set_state(LIVE, f"replaying {self.path} at {speed}")
        self._timer = self.sink.reactor.call_later(0, self.pump)

    def _fill(self) -> bool:
        """Make sure the current batch has an unplayed tick; False at the end of the replay."""
        assert self._it is not None
        while self._i >= len(self._topics):
            nxt = next(self._it, None)
            if nxt is None:
                if not (self.loop and self.played):
                    return False
                self.loops += 1
                self._shift += self._last_ts - self._ts0 + 1_000_000
                self._it = self._open()
                continue
            topics, payloads, ticks = nxt
            if self._shift and ticks is not None:
                shift = self._shift
                ticks = [msgspec.structs.replace(t, ts_ns=t.ts_ns + shift,
                                                 exch_ts_ns=t.exch_ts_ns + shift if t.exch_ts_ns else 0)
                         for t in ticks]
                payloads = [self._encode(t) for t in ticks]
            self._topics, self._payloads, self._ticks, self._i = topics, payloads, ticks, 0
        return True

    def _due_in(self, tick: Tick) -> float:
        """Seconds until ``tick`` is due (original gap from the first tick, over the speed)."""
        assert self.speed is not None
        return (tick.ts_ns - self._ts0) / 1e9 / self.speed - (self.sink.clock.monotonic() - self._t0)

    def pump(self) -> None:
        self._timer = None
        sent = 0
        while sent < BATCH and self._fill():
            i, ticks = self._i, self._ticks
            if self.played == 0 and i == 0 and ticks is not None:
                self._ts0 = ticks[0].ts_ns
                self._t0 = self.sink.clock.monotonic()
            j = min(len(self._topics), i + BATCH - sent)
            if self.speed is not None:
                assert ticks is not None
                k = i
                while k < j and self._due_in(ticks[k]) <= 1e-6:
                    k += 1
                j = k
            if j == i:
                break  # the next tick is not due yet
            self.sink.publish_frames(self._topics[i:j], self._payloads[i:j])
            self.played += j - i
            sent += j - i
            self._i = j
            if ticks is not None:
                self._last_ts = ticks[j - 1].ts_ns - self._shift
        if not self._fill():
            self.finished = True
            self.sink.set_state(DOWN, f"replay finished: {self.played} ticks from {self.path}")
        elif self.speed is None:
            self._timer = self.sink.reactor.call_later(0, self.pump)
        else:
            assert self._ticks is not None
            wait = self._due_in(self._ticks[self._i])
            self._timer = self.sink.reactor.call_later(max(0.0, wait), self.pump)

    def stop(self) -> None:
        if self._timer is not None:
            self.sink.reactor.cancel(self._timer)
            self._timer = None

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "played": self.played, "loops": self.loops,
                "finished": self.finished, "corrupt_records": self.read_stats.corrupt}


def _zone(name: str) -> tzinfo:
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(name)
    except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        raise ConfigError(f"config error: `feed.timezone` is not a known timezone: {name!r}") from None

