"""Feed → one subscriber throughput, side by side with raw pyzmq PUB/SUB in the same run.

    python -m benchmarks.bench_feed [--ticks 500000] [--json]

1. raw pyzmq: a separate process sends N single frames (the same bytes the feed sends) from
   a PUB socket as fast as it can; this process receives them on a SUB (recv only, then
   again with a msgspec decode of each payload — the least a consumer of ticks must do).
2. feed: ``python -m services.feed`` replays a recording of N simulated ticks at ``max``;
   this process receives them through ``libs.common.bus.Subscriber`` — decode and per-topic
   gap check included, as a strategy would — and checks that nothing is missing. This runs in
   ``--pairs`` A/B pairs with the per-hop latency recorder on (``bus.latency``, the default)
   and off, alternating the order within each pair; the medians give its overhead, beside the
   2 % target (ticks/s on vs off; the feed's CPU per tick is shown too).

Throughput is counted at the subscriber, from the first message to the last. Both publishers
start only after the subscription is known to have arrived (raw: XPUB sees it; feed: a
heartbeat arrives, then a Subscribe request starts the replay), so no tick is lost to the
slow-joiner effect.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.bus import Bus, topic  # noqa: E402
from libs.common.clock import ManualClock  # noqa: E402
from libs.common.config import load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from libs.common.messages import Codec, GetStatus, Heartbeat, Reply, Subscribe, Tick  # noqa: E402
from services.feed.recorder import TickRecorder  # noqa: E402
from services.feed.sources.sim import Walk  # noqa: E402

SYMBOLS = ["RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "SBIN-EQ", "ICICIBANK-EQ", "ITC-EQ", "LT-EQ",
           "NIFTY", "BANKNIFTY"]  # the indices' front futures: the paper master's change monthly


def make_ticks(n: int) -> list[Tick]:
    master = MasterData.load()
    futures = {i.underlying: i for i in sorted((i for i in master if i.inst_type == "FUTIDX"),
                                               key=lambda i: i.expiry or dt.date.max, reverse=True)}
    insts = [futures[s] if s in futures else master.resolve(s) for s in SYMBOLS]
    walks = [Walk(inst, 42, 0.0008) for inst in insts]
    t0 = 1_795_000_000_000_000_000
    return [walks[i % len(walks)].step(t0 + i * 1000) for i in range(n)]


def write_recording(home: Path, ticks: list[Tick]) -> Path:
    rec = TickRecorder(home / "ticks", ManualClock(ticks[0].ts_ns))
    enc = Codec().encode
    for t in ticks:
        rec.append(enc(t), topic("tick", t.segment, t.token))
    rec.close()
    assert rec.path is not None
    return rec.path


# ----------------------------------------------------------------------------- raw pyzmq

_RAW_PUBLISHER = r"""
import sys, zmq
endpoint, path = sys.argv[1], sys.argv[2]
frames = []
data = open(path, "rb").read()
pos = 0
while pos < len(data):
    n = int.from_bytes(data[pos:pos + 4], "little")
    frames.append(data[pos + 4:pos + 4 + n])
    pos += 4 + n
ctx = zmq.Context()
pub = ctx.socket(zmq.XPUB)
pub.setsockopt(zmq.SNDHWM, 0)
pub.setsockopt(zmq.LINGER, -1)
pub.bind(endpoint)
pub.recv()  # a subscription arrived
send = pub.send
for f in frames:
    send(f)
send(b"END")
pub.close()
ctx.term()
"""


def raw_pubsub(frames: list[bytes], endpoint: str, decode: bool = False) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        for fr in frames:
            f.write(len(fr).to_bytes(4, "little") + fr)
        path = f.name
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    proc = subprocess.Popen([sys.executable, "-c", _RAW_PUBLISHER, endpoint, path])
    try:
        sub.connect(endpoint)
        recv = sub.recv
        dec = Codec().decode
        first = recv()
        t0 = time.perf_counter()
        n = 1
        while True:
            m = recv()
            if m == b"END":
                break
            if decode:
                dec(m[m.find(b"\0") + 13:])
            n += 1
        elapsed = time.perf_counter() - t0
        proc.wait(30)
    finally:
        sub.close(0)
        ctx.term()
        Path(path).unlink()
    del first
    return {"received": n, "sent": len(frames), "seconds": elapsed, "per_s": (n - 1) / elapsed}


# ----------------------------------------------------------------------------- feed


def feed_to_subscriber(n: int, home: Path, base_port: int, latency: bool = True) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOPULSE_")}
    env.update({
        "NEOPULSE_HOME": str(home), "NEOPULSE_BUS__BASE_PORT": str(base_port),
        "NEOPULSE_BUS__LATENCY": "true" if latency else "false",
        "NEOPULSE_ENV_FILE": str(home / "no.env"), "NEOPULSE_FEED__SOURCE": "replay",
        "NEOPULSE_FEED__REPLAY_SPEED": "max", "NEOPULSE_FEED__REPLAY_DELAY_S": "600",
        "NEOPULSE_CONSOLE_LEVEL": "WARNING",
    })
    cfg = load_config(env=env)
    bus = Bus(cfg)
    sub = bus.subscriber([cfg.bus.endpoint("feed_pub")], [b"tick.", b"hb.feed."])
    proc = subprocess.Popen([sys.executable, "-m", "services.feed"], cwd=ROOT, env=env)
    got = {"ticks": 0, "hb": 0}
    first_at = [0.0]

    def on_msg(_t: bytes, msg: Any) -> None:
        if type(msg) is Tick:
            if not got["ticks"]:
                first_at[0] = time.perf_counter()
            got["ticks"] += 1
        elif isinstance(msg, Heartbeat):
            got["hb"] += 1

    try:
        deadline = time.monotonic() + 20
        while not got["hb"]:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("feed did not come up")
            if sub.sock.poll(100):
                sub.drain(on_msg)
        client = bus.client(cfg.bus.endpoint("feed_rep"), 5000)
        cpu_feed0, cpu_sub0 = _proc_cpu(proc.pid), time.process_time()
        client.request(Subscribe(instruments=[], requester="bench"))
        last = time.perf_counter()
        drain = sub.drain
        poll = sub.sock.poll
        while got["ticks"] < n:
            if poll(2000):
                drain(on_msg, 100_000)
                last = time.perf_counter()
            else:
                break  # 2 s of silence: whatever is missing is lost
        elapsed = last - first_at[0]
        cpu_feed, cpu_sub = _proc_cpu(proc.pid) - cpu_feed0, time.process_time() - cpu_sub0
        status = client.request(GetStatus())
        assert isinstance(status, Reply)
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        sub.close()
        bus.close()
    return {"latency": latency, "received": got["ticks"], "sent": n, "gaps": sub.stats.gaps,
            "malformed": sub.stats.malformed,
            "seconds": elapsed, "per_s": (got["ticks"] - 1) / elapsed if elapsed > 0 else 0.0,
            "feed_published": status.data.get("ticks"),
            "feed_cpu_us_per_tick": cpu_feed / n * 1e6, "subscriber_cpu_us_per_tick": cpu_sub / n * 1e6}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LATENCY_TARGET = 0.02  # the latency recorder may cost at most 2 % of the feed's ticks/s


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def latency_overhead(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Recorder on vs off over alternating runs: the medians of each side, their ratio, and the
    overhead (1 - on/off; below 0 means the "on" runs happened to be faster: noise)."""
    on = [r for r in runs if r["latency"]]
    off = [r for r in runs if not r["latency"]]
    on_per_s, off_per_s = _median([r["per_s"] for r in on]), _median([r["per_s"] for r in off])
    on_cpu = _median([r["feed_cpu_us_per_tick"] for r in on])
    off_cpu = _median([r["feed_cpu_us_per_tick"] for r in off])
    ratio = on_per_s / off_per_s if off_per_s else 0.0
    overhead = 1.0 - ratio
    return {"pairs": min(len(on), len(off)), "on_per_s": on_per_s, "off_per_s": off_per_s,
            "on_runs_per_s": [round(r["per_s"]) for r in on],
            "off_runs_per_s": [round(r["per_s"]) for r in off],
            "ratio": ratio, "overhead": overhead, "on_cpu_us_per_tick": on_cpu,
            "off_cpu_us_per_tick": off_cpu,
            "cpu_ratio": on_cpu / off_cpu if off_cpu else 0.0, "target": LATENCY_TARGET,
            "meets_target": overhead <= LATENCY_TARGET}


def hot_path(ticks: list[Tick], home: Path, base_port: int, batch: int, pairs: int = 8) -> dict[str, Any]:
    """The feed's own publishing loop in this process: ``FeedService.publish_ticks`` over the
    ticks in batches of ``batch`` (stamped now, so every sample is recorded, none counted as
    out of range), ``pairs`` times with the recorder on and off, alternating. PUB with no
    subscriber: the send is cheaper than with one, so the overhead shown is an upper bound."""
    from services.feed.service import FeedService

    env = {"NEOPULSE_HOME": str(home), "NEOPULSE_BUS__BASE_PORT": str(base_port),
           "NEOPULSE_ENV_FILE": str(home / "no.env"), "NEOPULSE_FEED__RECORD": "false",
           "NEOPULSE_LOG__CONSOLE_LEVEL": "WARNING"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        svc = FeedService(load_config(env={**os.environ, **env}))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rec = svc._latency
    assert rec is not None
    now = time.time_ns()
    fresh = [msgspec.structs.replace(t, ts_ns=now) for t in ticks]
    batches = [fresh[i:i + batch] for i in range(0, len(fresh), batch)]
    per_s: dict[bool, list[float]] = {True: [], False: []}
    publish = svc.publish_ticks
    try:
        for b in batches:  # warm-up, not counted
            publish(b)
        for i in range(pairs):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                svc._latency = rec if on else None
                gc.collect()
                t0 = time.process_time()  # CPU time: the other work on a shared machine stays out
                for b in batches:
                    publish(b)
                per_s[on].append(len(fresh) / (time.process_time() - t0))
    finally:
        assert svc.pub is not None
        svc.pub.close()
        svc.bus.close()
    on_s, off_s = _median(per_s[True]), _median(per_s[False])
    recorded = rec.summary()["count"]
    return {"batch": batch, "pairs": pairs, "on_per_s": on_s, "off_per_s": off_s, "ratio": on_s / off_s,
            "overhead": 1.0 - on_s / off_s, "samples_recorded": recorded,
            "on_runs_per_s": [round(x) for x in per_s[True]],
            "off_runs_per_s": [round(x) for x in per_s[False]],
            "target": LATENCY_TARGET, "meets_target": 1.0 - on_s / off_s <= LATENCY_TARGET}


def run(n: int = 500_000, base_port: int | None = None, pairs: int = 3) -> dict[str, Any]:
    """Raw pyzmq twice, then ``pairs`` A/B pairs of feed runs with the latency recorder on and
    off, in the order on/off, off/on, on/off... so a drift of the machine favours neither side."""
    from tests.helpers import free_base_port

    base_port = base_port or free_base_port()
    ticks = make_ticks(n)
    enc = Codec().encode
    import struct

    hdr = struct.Struct("<IQ")
    frames = [topic("tick", t.segment, t.token) + b"\0" + hdr.pack(1, i) + enc(t)
              for i, t in enumerate(ticks)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        write_recording(home, ticks)
        raw = raw_pubsub(frames, f"tcp://127.0.0.1:{base_port + 50}")
        raw_dec = raw_pubsub(frames, f"tcp://127.0.0.1:{base_port + 51}", decode=True)
        runs = []
        for i in range(max(1, pairs)):
            for latency in ((True, False) if i % 2 == 0 else (False, True)):
                runs.append(feed_to_subscriber(n, home, base_port, latency=latency))
        hot = [hot_path(ticks, Path(tmp) / "hot", base_port + 60, batch) for batch in (2000, 20)]
    ab = latency_overhead(runs)
    on = sorted((r for r in runs if r["latency"]), key=lambda r: r["per_s"])
    feed = on[len(on) // 2]  # the median run as it ships (recorder on): the throughput figure
    ok = all(r["received"] == n and r["gaps"] == 0 for r in runs)
    return {"ticks": n, "frame_bytes": sum(map(len, frames)) // n, "raw_pyzmq": raw,
            "raw_pyzmq_decode": raw_dec, "feed": feed, "feed_runs": runs, "latency_overhead": ab,
            "latency_hot_path": hot,
            "feed_vs_raw": feed["per_s"] / raw["per_s"], "zero_gap": ok, "target_per_s": 200_000,
            "meets_target": ok and feed["per_s"] >= 200_000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=500_000)
    ap.add_argument("--pairs", type=int, default=3,
                    help="A/B pairs of feed runs with the latency recorder on and off (default 3)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.ticks, pairs=args.pairs)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    raw, feed = res["raw_pyzmq"], res["feed"]
    print(f"ticks: {res['ticks']}  (frame ~{res['frame_bytes']} bytes)")
    print(f"raw pyzmq PUB->SUB (recv only):           {raw['per_s']:>10,.0f} msgs/s")
    print(f"raw pyzmq PUB->SUB + msgspec decode:      {res['raw_pyzmq_decode']['per_s']:>10,.0f} msgs/s")
    print(f"feed (replay max) -> Subscriber (decode): {feed['per_s']:>10,.0f} ticks/s  "
          f"received {feed['received']}/{feed['sent']}, gaps {feed['gaps']}")
    print(f"CPU per tick: feed process {feed['feed_cpu_us_per_tick']:.2f} us (incl. zmq I/O thread), "
          f"subscriber {feed['subscriber_cpu_us_per_tick']:.2f} us")
    print(f"feed / raw: {res['feed_vs_raw']:.0%}   zero-gap: {res['zero_gap']}   "
          f">= 200k ticks/s: {res['meets_target']}")
    print("\n".join(latency_lines(res)))


def _spread(xs: list[float]) -> float:
    """Half the range of runs of one side, relative to their median: the noise between runs."""
    return (max(xs) - min(xs)) / 2 / _median(xs) if xs else 0.0


def latency_lines(res: dict[str, Any]) -> list[str]:
    """The recorder's cost beside its 2 % target (for this benchmark and ``run_all``): judged on
    the feed's publishing loop at the replay's batch size, where the difference is above the
    noise; the end-to-end A/B runs beside it with their run-to-run spread."""
    ab, hot = res["latency_overhead"], res["latency_hot_path"]
    main = hot[0]
    noise = max(_spread(ab["on_runs_per_s"]), _spread(ab["off_runs_per_s"]))
    lines = [
        f"latency recorder, feed publishing loop (batches of {main['batch']}): on {main['on_per_s']:,.0f} "
        f"vs off {main['off_per_s']:,.0f} ticks/s, on/off {main['ratio']:.3f} (medians of {main['pairs']} "
        f"A/B pairs): overhead {main['overhead']:+.1%}, target <= {main['target']:.0%}: "
        f"{'met' if main['meets_target'] else 'MISSED'}",
        f"latency recorder, feed -> subscriber end to end: on {ab['on_per_s']:,.0f} vs off "
        f"{ab['off_per_s']:,.0f} ticks/s, on/off {ab['ratio']:.3f} ({ab['pairs']} A/B pairs; runs of one "
        f"side differ by +/-{noise:.1%}, so a difference below that is noise)",
    ]
    lines += [f"   small batches of {h['batch']} (a slow sim or Kotak feed): overhead {h['overhead']:+.1%} "
              f"of {h['off_per_s']:,.0f} ticks/s" for h in hot[1:]]
    return lines


if __name__ == "__main__":
    main()
