"""Recorder file format, the tick reader (recordings, CSV, directories) and replay pacing."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import topic
from libs.common.clock import IST, ManualClock
from libs.common.config import ConfigError, load_config
from libs.common.instruments import MasterData
from libs.common.messages import Codec, Tick
from services.feed.recorder import MAGIC, ReadStats, TickRecorder, read_frame_batches, read_tick_file
from services.feed.sources.replay import ReplaySource, iter_ticks, parse_ts

MASTER = MasterData.load()
DAY1 = int(datetime(2026, 11, 18, 9, 15, tzinfo=IST).timestamp() * 1e9)


def _ticks(n: int, t0: int = DAY1, step_ns: int = 1_000_000) -> list[Tick]:
    return [Tick(segment="nse_cm", token=str(2885 + i % 3), ltp=1000 + i * 0.05, last_qty=i, volume=i * 10,
                 ts_ns=t0 + i * step_ns, exch_ts_ns=t0 + i * step_ns) for i in range(n)]


def _record(rec: TickRecorder, ticks: list[Tick]) -> None:
    enc = Codec().encode
    for t in ticks:
        rec.append(enc(t), topic("tick", t.segment, t.token))


def test_recorded_ticks_read_back_identically(tmp_path: Path) -> None:
    rec = TickRecorder(tmp_path, ManualClock(DAY1))
    ticks = _ticks(1000)
    _record(rec, ticks[:600])
    rec.flush()
    _record(rec, ticks[600:])
    rec.close()

    assert rec.path == tmp_path / "2026-11-18.ticks"
    assert list(read_tick_file(rec.path)) == ticks
    assert rec.stats()["ticks"] == 1000


def test_a_torn_record_costs_only_itself_and_later_sessions_survive(tmp_path: Path) -> None:
    clock = ManualClock(DAY1)
    rec = TickRecorder(tmp_path, clock)
    first, second = _ticks(10), _ticks(5, DAY1 + 10**9)
    _record(rec, first)
    rec.close()
    path = tmp_path / "2026-11-18.ticks"
    with path.open("ab") as f:  # a crash mid-record: length prefix and half a record
        record = b"tick.nse_cm.2885.\0" + Codec().encode(first[0])
        f.write(len(record).to_bytes(4, "little") + record[: len(record) // 2])
    rec2 = TickRecorder(tmp_path, clock)
    _record(rec2, second)
    rec2.close()

    stats = ReadStats()
    assert list(read_tick_file(path, stats)) == first + second
    assert stats.corrupt == 1


def test_recorder_switches_file_at_the_new_trading_day(tmp_path: Path) -> None:
    clock = ManualClock(DAY1)
    rec = TickRecorder(tmp_path, clock)
    _record(rec, _ticks(3))
    rec.flush()
    clock.advance(24 * 3600)
    _record(rec, _ticks(2, DAY1 + 24 * 3600 * 10**9))
    rec.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-11-18.ticks", "2026-11-19.ticks"]
    assert len(list(iter_ticks(tmp_path))) == 5  # a directory plays in day order


def test_a_file_that_is_not_a_recording_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.ticks"
    path.write_bytes(b"hello world, not ticks")
    with pytest.raises(ValueError, match="bad magic"):
        list(read_tick_file(path))
    assert MAGIC not in path.read_bytes()


def test_disk_errors_are_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "ticks"
    blocker.write_text("a file where the directory should be")
    rec = TickRecorder(blocker, ManualClock(DAY1))
    _record(rec, _ticks(3))
    rec.flush()
    assert rec.errors == 1 and rec.buf == []


@pytest.mark.parametrize(("text", "ns"), [
    ("1763437500", 1763437500 * 10**9),
    ("1763437500.25", 1763437500_250_000_000),
    ("1763437500250", 1763437500_250_000_000),
    ("1763437500250000", 1763437500_250_000_000),
    ("1763437500250000123", 1763437500_250_000_123),
    ("2026-11-18T09:15:00", DAY1),
    ("2026-11-18 03:45:00Z", DAY1),
])
def test_csv_timestamps_in_every_common_form(text: str, ns: int) -> None:
    assert parse_ts(text) == ns


def test_csv_without_header_and_with_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("1763437500,nse_cm,2885,1290.5,3\nnot,a,valid,row,x\n# comment\n\n"
                    "1763437501,NSE_CM,2885,1290.55,4\n")
    stats = ReadStats()
    ticks = list(iter_ticks(path, MASTER, stats=stats))
    assert [(t.segment, t.token, t.ltp, t.last_qty, t.volume, t.symbol) for t in ticks] == [
        ("nse_cm", "2885", 1290.5, 3, 3, "RELIANCE-EQ"), ("nse_cm", "2885", 1290.55, 4, 7, "RELIANCE-EQ")]
    assert stats.corrupt == 1


def test_csv_with_optional_columns(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("ts,segment,token,ltp,qty,bid,ask,volume\n1763437500,nse_cm,1594,1510.2,5,1510.1,1510.3,900\n")
    (tick,) = iter_ticks(path)
    assert (tick.bid, tick.ask, tick.volume) == (1510.1, 1510.3, 900)


def test_csv_header_missing_a_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("ts,segment,ltp,qty\n1,nse_cm,1,1\n")
    with pytest.raises(ValueError, match="token"):
        list(iter_ticks(path))


# ------------------------------------------------------------------ replay pacing


class FakeReactor:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []
        self.cancelled: set[int] = set()

    def call_later(self, delay: float, fn: Any) -> int:
        self.later.append((delay, fn))
        return len(self.later) - 1

    def cancel(self, tid: int) -> None:
        self.cancelled.add(tid)


class FakeSink:
    """The feed as a replay source sees it; the clock only moves when the test says."""

    def __init__(self, path: Path, speed: str, loop: bool = False) -> None:
        self.cfg = load_config(env={"NEOPULSE_FEED__REPLAY_PATH": str(path),
                                    "NEOPULSE_FEED__REPLAY_SPEED": speed,
                                    "NEOPULSE_FEED__REPLAY_LOOP": str(loop).lower()})
        self.reactor = FakeReactor()
        self.clock = ManualClock(DAY1)
        self.master = MASTER
        self.log = None
        self.published: list[tuple[float, Tick]] = []
        self.states: list[str] = []

    def publish_tick(self, tick: Tick) -> None:
        self.published.append((self.clock.monotonic(), tick))

    def publish_ticks(self, ticks: list[Tick]) -> None:
        for t in ticks:
            self.publish_tick(t)

    def publish_frames(self, topics: list[bytes], payloads: list[bytes]) -> None:
        decode = Codec().decode
        for tpc, p in zip(topics, payloads, strict=True):
            tick = decode(p)
            assert isinstance(tick, Tick) and tpc == topic("tick", tick.segment, tick.token)
            self.publish_tick(tick)

    def set_state(self, state: str, detail: str = "") -> None:
        self.states.append(state)

    def publish_status(self, detail: str) -> None:
        pass

    def run(self, limit: int = 10_000) -> None:
        """Run scheduled calls in order, moving the clock to each one's time."""
        for _ in range(limit):
            if not self.reactor.later:
                return
            delay, fn = self.reactor.later.pop(0)
            self.clock.advance(delay)
            fn()


def _write_recording(tmp_path: Path, ticks: list[Tick]) -> Path:
    rec = TickRecorder(tmp_path / "rec", ManualClock(DAY1))
    _record(rec, ticks)
    rec.close()
    assert rec.path is not None
    return rec.path


def test_replay_keeps_original_gaps_divided_by_speed(tmp_path: Path) -> None:
    ticks = [Tick(segment="nse_cm", token="2885", ltp=1.0, ts_ns=DAY1 + off) for off in
             (0, 500_000_000, 500_000_000, 2_000_000_000, 7_000_000_000)]
    sink = FakeSink(_write_recording(tmp_path, ticks), "10")
    src = ReplaySource(sink)
    src.start([])
    sink.reactor.later.clear()
    src.requested()
    sink.run()

    t0 = sink.published[0][0]
    assert [round(at - t0, 6) for at, _ in sink.published] == [0.0, 0.05, 0.05, 0.2, 0.7]
    assert [t for _, t in sink.published] == ticks
    assert sink.states == ["LIVE", "DOWN"]


def test_replay_at_max_plays_everything_in_bounded_batches(tmp_path: Path) -> None:
    ticks = _ticks(5000, step_ns=10**9)
    sink = FakeSink(_write_recording(tmp_path, ticks), "max")
    src = ReplaySource(sink)
    src.start([])
    src.requested()
    sink.run()
    assert [t for _, t in sink.published] == ticks
    assert {at for at, _ in sink.published} == {sink.published[0][0]}  # no waiting at max


def test_looped_replay_moves_time_forward(tmp_path: Path) -> None:
    ticks = _ticks(3, step_ns=10**9)
    sink = FakeSink(_write_recording(tmp_path, ticks), "max", loop=True)
    src = ReplaySource(sink)
    src.start([])
    src.requested()
    sink.run(limit=3)
    stamps = [t.ts_ns for _, t in sink.published]
    assert len(stamps) > 6 and stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert [t.ltp for _, t in sink.published[3:6]] == [t.ltp for t in ticks]


def test_replay_of_a_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replay_path"):
        ReplaySource(FakeSink(tmp_path / "nope", "1"))


def test_version_1_recordings_without_topics_still_read(tmp_path: Path) -> None:
    enc = Codec().encode
    ticks = _ticks(5)
    path = tmp_path / "old.ticks"
    path.write_bytes(b"NPTICKS1" + b"".join(len(p).to_bytes(4, "little") + p for p in map(enc, ticks)))
    assert list(read_tick_file(path)) == ticks
    assert [t for tpcs, _ in read_frame_batches(path) for t in tpcs] == [
        topic("tick", t.segment, t.token) for t in ticks]


def test_frames_come_back_exactly_as_recorded(tmp_path: Path) -> None:
    ticks = _ticks(50)
    rec = TickRecorder(tmp_path, ManualClock(DAY1))
    _record(rec, ticks)
    rec.close()
    assert rec.path is not None
    ((topics, payloads),) = read_frame_batches(rec.path)
    enc = Codec().encode
    assert payloads == [enc(t) for t in ticks]
    assert topics[0] == b"tick.nse_cm.2885."
