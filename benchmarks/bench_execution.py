"""Execution: durable PENDING_BROKER latency and paper orders/s, beside raw psycopg, same run.

    python -m benchmarks.bench_execution [--orders 5000] [--window 64] [--json]

1. raw psycopg: one single-row INSERT + COMMIT per round (autocommit off, unix socket,
   fsync on) into a plain table — the floor for any durable write.
2. ledger: ``PgOrderStore.write`` of one PENDING_BROKER row with its ``order_events`` row
   (one transaction), and ``ExecutionEngine.submit`` of one order (pricing, tag, row, event,
   commit) — what execution does before it acknowledges an order.
3. service: ``python -m services.execution`` (paper broker, same PostgreSQL) fed by a
   stand-in feed; a DEALER client
   * sends orders one at a time: ExecuteOrder → Reply round trip (PENDING committed), p50/p99;
   * keeps ``--window`` orders in flight: acknowledged orders/s, then the time until every
     order is COMPLETE with its fill in the ledger (the whole paper lifecycle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libs.common.bus import Bus, RequestTimeout, topic  # noqa: E402
from libs.common.clock import Clock  # noqa: E402
from libs.common.config import load_config  # noqa: E402
from libs.common.instruments import MasterData  # noqa: E402
from libs.common.messages import Codec, ExecuteOrder, GetStatus, OrderRequest, Reply, Tick  # noqa: E402
from libs.common.stack_secret import StackSecret  # noqa: E402
from services.execution.brokers.paper import PaperBroker  # noqa: E402
from services.execution.embedded_pg import start_embedded  # noqa: E402
from services.execution.engine import ExecutionEngine  # noqa: E402
from services.execution.ledger import PgOrderStore  # noqa: E402
from services.execution.model import Changes, EventRow, OrderRow, new_client_tag, new_id  # noqa: E402

MASTER = MasterData.load()
SYMBOLS = ["RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "SBIN-EQ"]


def pct(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p90_ms": round(xs[int(len(xs) * 0.9)] * 1e3, 3),
        "max_ms": round(xs[-1] * 1e3, 3),
        "p50_ms": round(xs[len(xs) // 2] * 1e3, 3),
        "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3, 3),
        "mean_ms": round(statistics.fmean(xs) * 1e3, 3),
        "n": len(xs),
    }


def with_db(url: str, name: str) -> str:
    head, _, query = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def create_db(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return with_db(admin_url, name)


def bench_raw(url: str, n: int) -> dict[str, float]:
    import psycopg

    conn = psycopg.connect(url, autocommit=False)
    conn.execute(
        "CREATE TABLE raw_insert (id uuid PRIMARY KEY, request_id text UNIQUE, price numeric, "
        "created_at timestamptz NOT NULL DEFAULT now())"
    )
    conn.commit()
    lat = []
    for i in range(n + 200):
        t = time.perf_counter()
        conn.execute(
            "INSERT INTO raw_insert (id, request_id, price) VALUES (%s, %s, %s)",
            (uuid.uuid4(), f"r{i}", Decimal("1290.50")),
        )
        conn.commit()
        if i >= 200:  # warm-up (prepared statements, caches)
            lat.append(time.perf_counter() - t)
    conn.close()
    return pct(lat)


def bench_ledger(url: str, n: int) -> dict[str, Any]:
    store = PgOrderStore(url)
    store.migrate()
    now = time.time_ns()
    lat = []
    for i in range(n + 200):
        o = OrderRow(
            order_id=new_id(),
            request_id=f"b{i}",
            client_tag=new_client_tag(),
            strategy_id="bench",
            segment="nse_cm",
            token="2885",
            symbol="RELIANCE-EQ",
            side="BUY",
            order_type="LIMIT",
            product="MIS",
            quantity=1,
            price=Decimal("1290.50"),
            status="PENDING_BROKER",
            trading_day="2025-11-21",
            created_ns=now,
            updated_ns=now,
        )
        ch = Changes(new_orders=[o], events=[EventRow(o.order_id, "PENDING", "", o.status, now, {"i": i})])
        t = time.perf_counter()
        store.write(ch)
        if i >= 200:
            lat.append(time.perf_counter() - t)
    write = pct(lat)
    cfg = load_config(env={})
    broker = PaperBroker(MASTER, Clock())
    engine = ExecutionEngine(store, broker, MASTER, Clock(), cfg.execution)
    engine.start()
    engine.pump()
    inst = MASTER.resolve("RELIANCE-EQ")
    lat = []
    for i in range(n + 200):
        rid = f"e{i}"
        req = OrderRequest(
            request_id=rid, strategy_id="bench", side="BUY", quantity=1, price=Decimal("1000.00")
        )
        cmd = ExecuteOrder(
            request_id=rid, order=req, quantity=1, segment=inst.segment, token=inst.token, symbol=inst.symbol
        )
        t = time.perf_counter()
        [res] = engine.submit([cmd])
        if i >= 200:
            lat.append(time.perf_counter() - t)
        assert res.ok, res
        engine.pump()  # broker call + ACK/OPEN commit, outside the timed part
    store.close()
    return {"store_write": write, "engine_submit": pct(lat)}


class Feed:
    def __init__(self, bus: Bus, endpoint: str) -> None:
        self.pub = bus.publisher(endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            for sym in SYMBOLS:
                i = MASTER.resolve(sym)
                ltp = i.ref_price or 1000.0
                self.pub.publish(
                    topic("tick", i.segment, i.token),
                    Tick(
                        segment=i.segment,
                        token=i.token,
                        ltp=ltp,
                        bid=ltp - 0.1,
                        ask=ltp + 0.1,
                        bid_qty=10**6,
                        ask_qty=10**6,
                    ),
                )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.pub.close()


def order(i: int, prefix: str) -> ExecuteOrder:
    inst = MASTER.resolve(SYMBOLS[i % len(SYMBOLS)])
    rid = f"{prefix}{i}"
    side = "BUY" if (i // len(SYMBOLS)) % 2 == 0 else "SELL"
    req = OrderRequest(request_id=rid, strategy_id="bench", side=side, quantity=1, order_type="MARKET")
    return ExecuteOrder(
        request_id=rid, order=req, quantity=1, segment=inst.segment, token=inst.token, symbol=inst.symbol
    )


_ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart())
"""


def bench_raw_zmq(n: int) -> dict[str, Any]:
    """Raw pyzmq DEALER→ROUTER echo over tcp, back-to-back and paced like the service runs."""
    from tests.helpers import free_port

    ep = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, ep])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    try:
        sock.send_multipart([b"", b"warm"])
        if not sock.poll(10_000):
            raise RuntimeError("echo server did not answer")
        sock.recv_multipart()

        def run(count: int, gap: float) -> dict[str, float]:
            lat = []
            for _ in range(count):
                if gap:
                    time.sleep(gap)
                t = time.perf_counter()
                sock.send_multipart([b"", b"x" * 200])
                sock.recv_multipart()
                lat.append(time.perf_counter() - t)
            return pct(lat)

        return {"back_to_back": run(n, 0.0), "paced": run(n // 3, 0.005)}
    finally:
        sock.close()
        ctx.term()
        proc.kill()
        proc.wait()


def bench_service(url: str, home: Path, n: int, window: int, n_single: int) -> dict[str, Any]:
    from tests.helpers import free_base_port, stack_env

    env = stack_env(
        home,
        free_base_port(),
        NEOPULSE_DATABASE__URL=url,
        NEOPULSE_ENV_FILE=str(home / "no.env"),
        NEOPULSE_LOG__LEVEL="WARNING",
        NEOPULSE_EXECUTION__RECONCILE_S="3600",
    )
    cfg = load_config(env=env)
    bus = Bus(cfg)
    feed = Feed(bus, cfg.bus.endpoint("feed_pub"))
    home.mkdir(parents=True, exist_ok=True)
    out = (home / "execution.out").open("ab")
    prof = os.environ.get("BENCH_PROFILE")  # a path: run execution under cProfile
    cmd = [sys.executable, *(["-m", "cProfile", "-o", prof] if prof else []), "-m", "services.execution"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    rep = cfg.bus.endpoint("execution_rep")
    client = bus.client(rep, 500)
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"execution exited {proc.returncode}: {(home / 'execution.out').read_text()[-2000:]}"
            )
        try:
            r = client.request(GetStatus())
            if isinstance(r, Reply) and r.ok and r.data["last_prices"] >= len(SYMBOLS):
                break
        except RequestTimeout:
            pass
        if time.monotonic() - t0 > 60:
            raise RuntimeError("execution did not come up")
    ready_s = time.monotonic() - t0
    client.close()
    try:
        # one at a time: the durable ack round trip
        single = bus.client(rep, 5000)
        secret = StackSecret(home, create=True)  # the benchmark plays risk: it presents the stack secret
        single.credential = secret
        lat = []
        for i in range(n_single + 100):
            t = time.perf_counter()
            r = single.request(order(i, "s"))
            if i >= 100:
                lat.append(time.perf_counter() - t)
            assert isinstance(r, Reply) and r.ok, r
        # paced (like live trading, where orders are far apart): the service is idle when each arrives
        paced = []
        for i in range(n_single // 3):
            time.sleep(0.005)
            t = time.perf_counter()
            r = single.request(order(i, "p"))
            paced.append(time.perf_counter() - t)
            assert isinstance(r, Reply) and r.ok, r
        single.close()
        # a window of orders in flight
        codec = Codec()
        sock = bus.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rep)
        payloads = [codec.encode(order(i, "w")) for i in range(n)]
        sent = acked = 0
        t = time.perf_counter()
        while acked < n:
            while sent < n and sent - acked < window:
                sock.send_multipart([b"", sent.to_bytes(8, "little"), payloads[sent], secret()])
                sent += 1
            if sock.poll(10_000):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = codec.decode(frames[-1])
                    assert isinstance(reply, Reply) and reply.ok, reply
                    acked += 1
            else:
                raise RuntimeError("no reply within 10 s")
        ack_s = time.perf_counter() - t
        sock.close()
        status = bus.client(rep, 5000)
        total_fills = n + n_single + 100 + n_single // 3
        while True:
            r = status.request(GetStatus())
            assert isinstance(r, Reply)
            if r.data["fills"] >= total_fills and r.data["open_orders"] == 0:
                break
            if time.perf_counter() - t > 120:
                raise RuntimeError(f"orders not complete: {r.data}")
            time.sleep(0.005)
        done_s = time.perf_counter() - t
        info = r.data
        status.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        feed.close()
        bus.close()
    return {
        "ready_s": round(ready_s, 2),
        "ack_round_trip": pct(lat),
        "ack_round_trip_paced": pct(paced),
        "window": window,
        "orders": n,
        "acked_per_s": round(n / ack_s),
        "complete_per_s": round(n / done_s),
        "ledger_flushes": info["flushes"],
        "fills": info["fills"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--inserts", type=int, default=2000)
    ap.add_argument("--single", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="neopulse-bench-exec-"))
    try:
        db = start_embedded(tmp / "pgdata", cleanup_mode="delete")
        result: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "embedded_pg_startup_ms": round(db.startup_ms),
        }
        result["raw_psycopg_insert_commit"] = bench_raw(create_db(db.url, "bench_raw"), args.inserts)
        result["ledger_pending"] = bench_ledger(create_db(db.url, "bench_ledger"), args.inserts)
        result["raw_zmq_round_trip"] = bench_raw_zmq(args.single)
        result["service"] = bench_service(
            create_db(db.url, "bench_svc"), tmp / "home", args.orders, args.window, args.single
        )
        db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    raw, led, svc = result["raw_psycopg_insert_commit"], result["ledger_pending"], result["service"]
    print(f"machine: {result['machine']}; embedded PostgreSQL startup {result['embedded_pg_startup_ms']} ms")
    print(f"raw psycopg INSERT+COMMIT          p50 {raw['p50_ms']:.3f} ms  p99 {raw['p99_ms']:.3f} ms")
    w, s = led["store_write"], led["engine_submit"]
    print(f"ledger PENDING row+event (1 tx)    p50 {w['p50_ms']:.3f} ms  p99 {w['p99_ms']:.3f} ms")
    print(f"engine.submit (price+row+commit)   p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms")
    z = result["raw_zmq_round_trip"]
    print(
        f"raw pyzmq round trip back-to-back   p50 {z['back_to_back']['p50_ms']:.3f} ms  "
        f"p99 {z['back_to_back']['p99_ms']:.3f} ms; paced 5 ms p50 {z['paced']['p50_ms']:.3f} ms  "
        f"p99 {z['paced']['p99_ms']:.3f} ms"
    )
    a = svc["ack_round_trip"]
    print(f"REP ExecuteOrder→Reply back-to-back p50 {a['p50_ms']:.3f} ms  p99 {a['p99_ms']:.3f} ms")
    a = svc["ack_round_trip_paced"]
    print(f"REP ExecuteOrder→Reply paced 5 ms   p50 {a['p50_ms']:.3f} ms  p99 {a['p99_ms']:.3f} ms")
    print(
        f"paper orders through the REP, window {svc['window']}: {svc['acked_per_s']} acked/s, "
        f"{svc['complete_per_s']} complete/s ({svc['orders']} orders, {svc['ledger_flushes']} ledger commits)"
    )


if __name__ == "__main__":
    main()
