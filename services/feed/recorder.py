"""Tick recorder: every published tick, appended to ``$NEOPULSE_HOME/ticks/<YYYY-MM-DD>.ticks``.

File format (one file per trading day, append-only):

* ``MAGIC`` (8 bytes, ``b"NPTICKS3"``) at the start of the file and again at the start of
  every recording session that appends to it;
* then blocks, each a little-endian ``uint32`` length followed by one msgpack value
  ``[[topic, ...], [tick, ...]]``: up to ``BLOCK`` bus topics (``tick.nse_cm.2885.``) and the
  ticks as they went out on the bus (msgpack-encoded ``Tick``, ``kind`` tag included), each
  stored as a msgpack ``bin``. A block decodes in one C call, so a replay at ``max``
  republishes records without touching them in Python, and a backtest decodes ticks in bulk.
  (``NPTICKS1`` sessions — one ``uint32``-framed tick per record, no topic — are still read.)

A process killed mid-write leaves a torn block at the end of the file. It fails to decode;
the reader skips to the next session marker, so a crash costs at most the ticks of the last
flush interval and never the rest of the day.

The hot path only appends ``(topic, payload)`` to a list; framing and the write happen in
``flush()``, which the feed calls every 0.25 s.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Iterator
from datetime import tzinfo
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from libs.common.clock import IST, Clock
from libs.common.messages import Tick

MAGIC = b"NPTICKS3"
MAGIC_V1 = b"NPTICKS1"  # one tick per record, no topic
SUFFIX = ".ticks"
BLOCK = 4096  # ticks per block
MAX_RECORD = 64 * 1024  # v1: a Tick is ~250 bytes; anything larger is corruption
MAX_BLOCK = 64 * 1024 * 1024
_BLOCK_ENCODE = msgspec.msgpack.Encoder().encode
_BLOCK_DECODE = msgspec.msgpack.Decoder(tuple[list[bytes], list[bytes]]).decode
_LEN = struct.Struct("<I")
_DECODE_TICK = msgspec.msgpack.Decoder(Tick).decode
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
        self.buf: list[tuple[bytes, bytes]] = []
        self._file: BinaryIO | None = None
        self._day = ""
        self.path: Path | None = None
        self.ticks = 0
        self.bytes = 0
        self.errors = 0
        self.last_error = ""

    def append(self, payload: bytes, topic: bytes | None = None) -> None:
        """Record one encoded ``Tick`` (its bus topic is derived when not given). The feed's
        hot path skips this method and appends ``(topic, payload)`` to ``buf`` itself."""
        if topic is None:
            tick = _DECODE_TICK(payload)
            topic = f"tick.{tick.segment}.{tick.token}.".encode()
        self.buf.append((topic, payload))

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
                parts: list[bytes] = []
                for i in range(0, len(buf), BLOCK):
                    topics, payloads = zip(*buf[i: i + BLOCK], strict=True)
                    block = _BLOCK_ENCODE((topics, payloads))
                    parts += (_LEN.pack(len(block)), block)
                data = b"".join(parts)
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
    """The ticks of one recorder file in batches, each with the ticks' encoded bytes."""
    stats = stats if stats is not None else ReadStats()
    decode = msgspec.msgpack.Decoder(Tick).decode
    for _, payloads in read_frame_batches(path, stats, batch):
        try:
            yield [decode(p) for p in payloads], payloads
        except (msgspec.DecodeError, msgspec.ValidationError):
            ticks, good = [], []
            for p in payloads:
                try:
                    ticks.append(decode(p))
                    good.append(p)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    stats.corrupt += 1
                    stats.records -= 1
            if ticks:
                yield ticks, good


def read_frame_batches(path: Path, stats: ReadStats | None = None,
                       batch: int = BLOCK) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """Raw ``(topics, encoded ticks)`` batches of one recorder file, to republish without a
    decode. Torn or corrupt blocks are counted in ``stats.corrupt`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    with path.open("rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            head = mm[: len(MAGIC)]
            if head not in (MAGIC, MAGIC_V1):
                raise ValueError(f"{path} is not a NeoPulse tick recording (bad magic)")
            pos = len(MAGIC)
            v1 = head == MAGIC_V1
            while pos < size:
                if v1:
                    pos, topics, payloads, v1 = _read_v1(mm, pos, size, batch, stats)
                    if topics:
                        yield topics, payloads
                    continue
                if pos + 4 <= size:
                    (n,) = _LEN.unpack_from(mm, pos)
                    end = pos + 4 + n
                    if 0 < n <= MAX_BLOCK and end <= size:
                        try:
                            topics, payloads = _BLOCK_DECODE(mm[pos + 4: end])
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            pass
                        else:
                            if len(topics) == len(payloads):
                                stats.records += len(topics)
                                yield topics, payloads
                                pos = end
                                continue
                    marker = mm[pos: pos + len(MAGIC)]  # reads as a length far above MAX_BLOCK
                    if marker in (MAGIC, MAGIC_V1):
                        v1 = marker == MAGIC_V1
                        pos += len(MAGIC)
                        continue
                # torn or corrupt block: skip to the next session marker
                stats.corrupt += 1
                nxt = _next_marker(mm, pos + 1)
                if nxt < 0:
                    break
                pos = nxt


def _read_v1(mm: mmap.mmap, pos: int, size: int, batch: int,
             stats: ReadStats) -> tuple[int, list[bytes], list[bytes], bool]:
    """Up to ``batch`` records of an ``NPTICKS1`` session: ``(pos, topics, payloads, still_v1)``."""
    topics: list[bytes] = []
    payloads: list[bytes] = []
    while pos < size and len(topics) < batch:
        if pos + 4 <= size:
            (n,) = _LEN.unpack_from(mm, pos)
            end = pos + 4 + n
            if 0 < n <= MAX_RECORD and end <= size:
                payload = mm[pos + 4: end]
                try:
                    t = _DECODE_TICK(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass
                else:
                    topics.append(f"tick.{t.segment}.{t.token}.".encode())
                    payloads.append(payload)
                    pos = end
                    continue
            marker = mm[pos: pos + len(MAGIC)]
            if marker in (MAGIC, MAGIC_V1):
                pos += len(MAGIC)
                if marker == MAGIC:
                    break
                continue
        stats.corrupt += 1
        nxt = _next_marker(mm, pos + 1)
        pos = size if nxt < 0 else nxt
        if mm[pos: pos + len(MAGIC)] == MAGIC:
            pos += len(MAGIC)
            break
    stats.records += len(topics)
    still_v1 = not (pos >= len(MAGIC) and mm[pos - len(MAGIC): pos] == MAGIC)
    return pos, topics, payloads, still_v1


def _next_marker(mm: mmap.mmap, start: int) -> int:
    found = [i for i in (mm.find(MAGIC, start), mm.find(MAGIC_V1, start)) if i >= 0]
    return min(found) if found else -1
