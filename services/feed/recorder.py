"""Tick recorder: every published tick, appended to ``$NEOPULSE_HOME/ticks/<YYYY-MM-DD>.ticks``.

File format (one file per trading day, append-only):

* ``MAGIC`` (8 bytes, ``b"NPTICKS1"``) at the start of the file and again at the start of
  every recording session that appends to it;
* then records, each a little-endian ``uint32`` length followed by that many bytes: one
  msgpack-encoded ``Tick`` exactly as it went out on the bus (``kind`` tag included).

A process killed mid-write leaves a torn record at the end of the file. The next session
starts with ``MAGIC`` again, and the reader resynchronises on it, so a crash costs at most
the ticks of the last flush interval and never the rest of the day.

The hot path only appends the already-encoded payload to a list; framing and the write
happen in ``flush()``, which the feed calls at least once a second.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import struct
from collections.abc import Iterator
from datetime import tzinfo
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from libs.common.clock import IST, Clock
from libs.common.messages import Tick

MAGIC = b"NPTICKS1"
SUFFIX = ".ticks"
MAX_RECORD = 64 * 1024  # a Tick is ~150 bytes; anything larger is corruption
_LEN = struct.Struct("<I")
FLUSH_EVERY = 50_000  # buffered ticks that force a flush before the timer does


class TickRecorder:
    """Appends encoded ticks to the day's file. Never raises into the feed: disk errors are
    counted, logged once a second at most, and the buffered ticks are dropped."""

    def __init__(self, directory: Path, clock: Clock | None = None, tz: tzinfo = IST,
                 log: Any = None) -> None:
        self.directory = directory
        self.clock = clock or Clock()
        self.tz = tz
        self.log = log
        self.buf: list[bytes] = []
        self._file: BinaryIO | None = None
        self._day = ""
        self.path: Path | None = None
        self.ticks = 0
        self.bytes = 0
        self.errors = 0
        self.last_error = ""

    def append(self, payload: bytes) -> None:
        """Hot path: remember one encoded tick (framing happens at flush)."""
        self.buf.append(payload)

    def _open(self, day: str) -> BinaryIO:
        if self._file is not None:
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{day}{SUFFIX}"
        f = self.path.open("ab")
        f.write(MAGIC)  # session marker: the reader resyncs here after a torn record
        self._file = f
        self._day = day
        return f

    def flush(self) -> None:
        """Frame and write what is buffered, switch files at a new trading day, flush to the OS."""
        buf = self.buf
        day = self.clock.now(self.tz).strftime("%Y-%m-%d")
        try:
            f = self._file if (self._file is not None and day == self._day) else self._open(day)
            if buf:
                pack = _LEN.pack
                data = b"".join(itertools.chain.from_iterable((pack(len(p)), p) for p in buf))
                n = len(buf)
                buf.clear()  # the same list object: the feed holds its bound ``append``
                f.write(data)
                self.ticks += n
                self.bytes += len(data)
            f.flush()
        except OSError as exc:
            buf.clear()
            self.errors += 1
            self.last_error = str(exc)
            if self.log is not None and (self.errors in (1, 10, 100) or self.errors % 1000 == 0):
                self.log.error("recorder_write_failed", error=str(exc), errors=self.errors)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path or ""), "ticks": self.ticks, "bytes": self.bytes,
                "errors": self.errors, "buffered": len(self.buf)}


class ReadStats(msgspec.Struct):
    records: int = 0
    corrupt: int = 0


def read_tick_file(path: Path, stats: ReadStats | None = None) -> Iterator[Tick]:
    """Iterate the ticks of one recorder file, in order, skipping torn or corrupt records."""
    for ticks, _ in read_tick_batches(path, stats):
        yield from ticks


def read_tick_batches(path: Path, stats: ReadStats | None = None,
                      batch: int = 4096) -> Iterator[tuple[list[Tick], list[bytes]]]:
    """The ticks of one recorder file in batches, each with the ticks' encoded bytes
    (replay republishes those bytes instead of encoding again)."""
    stats = stats if stats is not None else ReadStats()
    decode = msgspec.msgpack.Decoder(Tick).decode
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[: len(MAGIC)] != MAGIC:
                raise ValueError(f"{path} is not a NeoPulse tick recording (bad magic)")
            unpack = _LEN.unpack_from
            mlen = len(MAGIC)
            pos = 0
            ticks: list[Tick] = []
            payloads: list[bytes] = []
            while pos < size:
                if pos + 4 <= size:
                    (n,) = unpack(mm, pos)
                    end = pos + 4 + n
                    if 0 < n <= MAX_RECORD and end <= size:
                        payload = mm[pos + 4: end]
                        try:
                            tick = decode(payload)
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            pass
                        else:
                            ticks.append(tick)
                            payloads.append(payload)
                            pos = end
                            if len(ticks) >= batch:
                                stats.records += len(ticks)
                                yield ticks, payloads
                                ticks, payloads = [], []
                            continue
                    # A session marker reads as a length far above MAX_RECORD.
                    if mm[pos: pos + mlen] == MAGIC:
                        pos += mlen
                        continue
                # torn or corrupt record: skip to the next session marker
                stats.corrupt += 1
                nxt = mm.find(MAGIC, pos + 1)
                if nxt < 0:
                    break
                pos = nxt
            if ticks:
                stats.records += len(ticks)
                yield ticks, payloads
