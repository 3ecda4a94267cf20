"""The feed process with the sim and replay sources: requests, recording, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import zmq

from libs.common.messages import GetLastTicks, GetOrders, Reply, Subscribe, Tick
from services.feed.recorder import ReadStats
from services.feed.sources.replay import iter_ticks
from tests.helpers import eventually
from tests.integration.feed_support import Collector, FeedProc, env_json
from tests.kit.builders import NIFTY_FUT


def _sim(home: Path, base_port: int, **env: str) -> FeedProc:
    env.setdefault("NEOPULSE_FEED__SIM_RATE", "50")
    return FeedProc(home, base_port, **env)


def test_subscribe_by_symbol_and_by_segment_token_streams_both(tmp_path: Path,
                                                               base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port, NEOPULSE_FEED__INSTRUMENTS=env_json(["RELIANCE-EQ"]))
    col = Collector(feed.subscriber(b"tick."))
    try:
        feed.start().wait_ready()

        reply = feed.ask(Subscribe(instruments=["infy-eq", "nse_cm|11536", "RELIANCE-EQ"], requester="t"))

        assert isinstance(reply, Reply) and reply.ok, reply
        assert reply.data["subscribed"] == ["nse_cm|1594", "nse_cm|11536", "nse_cm|2885"]
        assert reply.data["total"] == 3
        eventually(lambda: {t.token for t in col.poll().ticks} >= {"2885", "1594", "11536"}, 10,
                   message="ticks for all three instruments")
        tick = next(t for t in col.ticks if t.token == "1594")
        assert tick.segment == "nse_cm" and tick.symbol == "INFY-EQ"
        assert tick.bid < tick.ltp < tick.ask
        assert Decimal(repr(tick.ltp)) % Decimal("0.1") == 0  # on INFY's tick size
        assert col.sub.stats.gaps == 0
    finally:
        feed.stop()


def test_unknown_symbol_is_refused_naming_it_and_nothing_is_added(tmp_path: Path, base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port)
    try:
        feed.start().wait_ready()
        before = feed.status()["subscribed"]

        reply = feed.ask(Subscribe(instruments=["TCS-EQ", "NOSUCHCO-EQ", "nse_cm|424242"]))

        assert isinstance(reply, Reply) and not reply.ok
        assert reply.code == "unknown_instrument"
        assert "NOSUCHCO-EQ" in reply.error and "nse_cm|424242" in reply.error
        assert feed.status()["subscribed"] == before
    finally:
        feed.stop()


def test_subscriptions_are_capped_at_max_subscriptions(tmp_path: Path, base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port, NEOPULSE_FEED__MAX_SUBSCRIPTIONS="6")
    try:
        feed.start().wait_ready()

        reply = feed.ask(Subscribe(instruments=["ITC-EQ", "LT-EQ"]))

        assert isinstance(reply, Reply) and not reply.ok and reply.code == "subscription_limit"
        assert "6" in reply.error
        ok = feed.ask(Subscribe(instruments=["ITC-EQ"]))
        assert isinstance(ok, Reply) and ok.ok and ok.data["total"] == 6
    finally:
        feed.stop()


def test_malformed_bytes_and_unknown_requests_are_answered_and_counted(tmp_path: Path,
                                                                        base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port)
    try:
        feed.start().wait_ready()
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(feed.rep)

        dealer.send_multipart([b"", b"\x01" * 8, b"\xc1\xff garbage"])  # undecodable payload
        dealer.send_multipart([b"junk"])  # bad envelope
        assert dealer.poll(3000)
        answer = dealer.recv_multipart()
        dealer.close()
        wrong = feed.ask(GetOrders())

        assert answer[1] == b"\x01" * 8 and b"malformed" in answer[2]
        assert isinstance(wrong, Reply) and not wrong.ok and wrong.code == "unsupported"
        status = feed.status()
        assert status["requests"]["malformed"] >= 2
        assert status["state"] == "LIVE"
    finally:
        feed.stop()


def test_last_ticks_returns_the_latest_tick_per_instrument(tmp_path: Path, base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port)
    try:
        feed.start().wait_ready()
        eventually(lambda: feed.status()["ticks"] > 20, 10, message="ticks flowing")

        reply = feed.ask(GetLastTicks(instruments=["SBIN-EQ"]))
        every = feed.ask(GetLastTicks())
        bad = feed.ask(GetLastTicks(instruments=["NOPE"]))

        assert isinstance(reply, Reply) and reply.ok and len(reply.data) == 1
        assert reply.data[0]["token"] == "3045" and reply.data[0]["ltp"] > 0
        assert isinstance(every, Reply) and len(every.data) == 5
        assert isinstance(bad, Reply) and bad.code == "unknown_instrument" and "NOPE" in bad.error
    finally:
        feed.stop()


def test_recorded_sim_session_replays_at_max_as_the_same_tick_sequence(tmp_path: Path,
                                                                       base_port: int) -> None:
    home = tmp_path / "home"
    sim = _sim(home, base_port, NEOPULSE_FEED__SIM_RATE="400")
    live = Collector(sim.subscriber(b"tick."))
    try:
        sim.start()
        live.wait_ticks(3000)
    finally:
        assert sim.stop() == 0
    stats = ReadStats()
    recorded = list(iter_ticks(home / "ticks", stats=stats))
    assert stats.corrupt == 0 and len(recorded) >= len(live.ticks)
    start = recorded.index(live.ticks[0])
    assert recorded[start: start + len(live.ticks)] == live.ticks  # recorder saw what the bus saw

    replay = FeedProc(home, base_port, NEOPULSE_FEED__SOURCE="replay", NEOPULSE_FEED__REPLAY_SPEED="max",
                      NEOPULSE_FEED__REPLAY_DELAY_S="60")
    col = Collector(replay.subscriber(b""))
    try:
        replay.start().wait_ready()
        col.wait_heartbeat()  # our subscription reached the publisher
        replay.ask(Subscribe(instruments=[]))  # starts the replay
        col.wait_ticks(len(recorded), timeout=30)
        col.wait_state("DOWN")
    finally:
        replay.stop()

    assert col.ticks == recorded
    assert col.sub.stats.gaps == 0
    assert col.statuses[-1].detail.startswith(f"replay finished: {len(recorded)} ticks")
    assert len(list((home / "ticks").iterdir())) == 1  # the replay did not record itself


def test_csv_file_replays_with_original_gaps_scaled_by_speed(tmp_path: Path, base_port: int) -> None:
    csv_path = tmp_path / "history.csv"
    csv_path.write_text(
        "ts,segment,token,ltp,qty\n"
        "2026-11-20T09:15:00,nse_cm,2885,1290.50,10\n"
        "2026-11-20T09:15:00.5,nse_cm,1594,1510.20,5\n"
        "2026-11-20T09:15:01,nse_cm,2885,1290.60,20\n"
        "2026-11-20T09:15:03,nse_cm,2885,1290.40,1\n"
    )
    feed = FeedProc(tmp_path / "home", base_port, NEOPULSE_FEED__SOURCE="replay",
                    NEOPULSE_FEED__REPLAY_PATH=str(csv_path), NEOPULSE_FEED__REPLAY_SPEED="10",
                    NEOPULSE_FEED__REPLAY_DELAY_S="60")
    col = Collector(feed.subscriber(b""))
    try:
        feed.start().wait_ready()
        col.wait_heartbeat()
        feed.ask(Subscribe(instruments=["RELIANCE-EQ"]))
        ticks = col.wait_ticks(4)
    finally:
        feed.stop()

    assert [(t.token, t.ltp, t.last_qty, t.volume) for t in ticks] == [
        ("2885", 1290.5, 10, 10), ("1594", 1510.2, 5, 5), ("2885", 1290.6, 20, 30), ("2885", 1290.4, 1, 31),
    ]
    assert ticks[0].symbol == "RELIANCE-EQ"
    assert ticks[3].ts_ns - ticks[0].ts_ns == 3_000_000_000  # original time kept on the tick


def test_bad_instrument_in_config_exits_2_naming_it(tmp_path: Path, base_port: int) -> None:
    feed = FeedProc(tmp_path / "home", base_port,
                    NEOPULSE_FEED__INSTRUMENTS=env_json(["RELIANCE-EQ", "ZZZ-EQ"]))
    feed.start()
    assert feed.proc is not None
    assert feed.proc.wait(20) == 2
    assert "feed.instruments" in feed.output() and "ZZZ-EQ" in feed.output()
    feed.stop()


def test_tick_fields_round_trip_through_the_bus(tmp_path: Path, base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port, NEOPULSE_FEED__INSTRUMENTS=env_json([NIFTY_FUT.symbol]))
    col = Collector(feed.subscriber(f"tick.nse_fo.{NIFTY_FUT.token}.".encode()))
    try:
        feed.start()
        ticks = col.wait_ticks(5)
    finally:
        feed.stop()
    assert all(isinstance(t, Tick) and t.token == NIFTY_FUT.token for t in ticks)
    assert all(t.last_qty % NIFTY_FUT.lot_size == 0 for t in ticks)  # whole lots
    assert [t.volume for t in ticks] == sorted(t.volume for t in ticks)


def _neopulse(feed: FeedProc, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "neopulse"
    env = {**feed.env, "NEOPULSE_BUS__REQUEST_TIMEOUT_MS": "1000"}
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=30, check=False)


def test_cli_feed_commands(tmp_path: Path, base_port: int) -> None:
    feed = _sim(tmp_path / "home", base_port)
    try:
        feed.start().wait_ready()
        eventually(lambda: feed.status()["ticks"] > 10, 10, message="ticks flowing")

        status = _neopulse(feed, "feed", "status", "--json")
        added = _neopulse(feed, "feed", "subscribe", "ITC-EQ", f"nse_fo|{NIFTY_FUT.token}")
        refused = _neopulse(feed, "feed", "subscribe", "NOSUCH-EQ")
        last = _neopulse(feed, "feed", "last", "SBIN-EQ", "--json")
    finally:
        feed.stop()
    inspect = _neopulse(feed, "feed", "inspect", str(tmp_path / "home" / "ticks"), "--json")
    down = _neopulse(feed, "feed", "status")

    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "LIVE"
    assert added.returncode == 0 and "2 new, 7 in total" in added.stdout
    assert refused.returncode == 1 and "unknown instrument: NOSUCH-EQ" in refused.stderr
    assert last.returncode == 0 and json.loads(last.stdout)[0]["symbol"] == "SBIN-EQ"
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["ticks"] > 10
    assert down.returncode == 3 and "feed is unreachable" in down.stderr


def test_an_instrument_from_a_newer_master_cache_is_found_without_a_restart(tmp_path: Path,
                                                                             base_port: int) -> None:
    home = tmp_path / "home"
    feed = _sim(home, base_port)
    col = Collector(feed.subscriber(b"tick.nse_cm.99001."))
    try:
        feed.start().wait_ready()
        before = feed.ask(Subscribe(instruments=["NEWCO-EQ"]))
        sample = (Path(__file__).resolve().parents[2] / "libs/common/data/sample_master.csv").read_text()
        (home / "master").mkdir()
        newco = "99001,EQ,nse_cm,,NEWCO,NEWCO-EQ,XX,NEWCO,INE999A01018,,,1,5,-1,-1,,123.45"
        (home / "master" / "nse_cm.csv").write_text(sample.rstrip("\n") + "\n" + newco + "\n")

        after = feed.ask(Subscribe(instruments=["NEWCO-EQ"]))
        tick = col.wait_ticks(1)[0]
    finally:
        feed.stop()
    assert isinstance(before, Reply) and before.code == "unknown_instrument"
    assert isinstance(after, Reply) and after.ok and after.data["subscribed"] == ["nse_cm|99001"]
    assert tick.symbol == "NEWCO-EQ" and abs(tick.ltp - 123.45) < 5
