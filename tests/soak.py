"""Soak: the whole paper pipeline for half an hour at 5,000 ticks/s, checked for leaks and drift.

    python -m tests.soak [--minutes 30] [--rate 5000] [--seed N] [--sample-s S] [--keep]
    make soak SOAK_ARGS="--minutes 30 --seed 7"

The five services run as ``make up`` runs them (paper broker, embedded PostgreSQL, simulated
feed, the tick recorder on), each its own process (``Stack.start_service``) in a fresh
``NEOPULSE_HOME`` on a free ``bus.base_port``:

* feed: ``feed.sim_rate`` = ``--rate`` / the number of instruments (5 by default: 1,000 ticks/s
  each), ``feed.sim_seed`` = ``--seed``; ``feed.sim_volatility`` is scaled by
  sqrt(20 / per-instrument rate), so prices move per second as much as at the default 20 ticks/s;
* strategy: one ``momentum`` instance, ``mom1``, from a config TOML written to the home
  (``NEOPULSE_CONFIG``), its windows in ticks scaled to the rate (lookback 1 s of ticks, cooldown
  2 s), so it trades a few orders a second, entries with OCO brackets;
* risk: ``max_daily_loss`` 10,000,000 and ``max_orders_per_sec`` 100, so the random walk's
  losses never latch REDUCING (checked) and the throttle does not shape the flow;
* ``log.max_bytes`` 1 MB x minutes / 60 (500 kB for 30 minutes; at most 1 MB, at least 16 kB)
  and ``log.backups`` 2: the busiest log (the strategy's, some 80 kB a minute) writes about 1.6
  times its cap of 3 files, so it rotates past its backups and the oldest file is deleted.

The run lasts ``--minutes`` from the moment every service answers. Warm-up is the first 20 %
of the run or 5 minutes, whichever is shorter. Every ``--sample-s`` seconds the harness takes
each process's RSS and CPU time (psutil; the strategy supervisor and its ``strategy-mom1``
child apart; postgres as the postmaster and its backends together), the disk use (allocated
blocks) of each part of ``NEOPULSE_HOME``, the log files, the feed's recorder counters and
execution's open orders.

What tick → ack means here. The harness subscribes to ``execution_pub`` ``order.`` and stamps
(``time.time_ns``, on a thread of its own) the first ``OrderUpdate`` of each request: the
``PENDING_BROKER`` one, which execution publishes once the row is committed and the paper
broker called. At the end the ledger (``order_events``, the PENDING payload) gives each
strategy request's ``OrderRequest.ts_ns``, which the strategy stamps in ``on_tick`` while
handling the tick that triggered it, and risk's ``ExecuteOrder.ts_ns``. Latency = receipt -
that stamp (strategy → risk → execution → commit → publish → a subscriber), shown with its
legs and with this harness's own receipt delay (execution heartbeats, publish → here). The
feed → strategy hop is not in it (no message carries the originating tick's stamp that far),
so the strategy's backlog is checked apart: ticks the feed published less ticks the strategy
handled (both from heartbeats) must not grow.

Checks (exit 1, each failure printed):

* RSS: each service's RSS at the end is less than 10 % above its RSS at the end of warm-up
  (the maximum is reported too). Execution and risk keep the trading day's orders (and risk
  the approved request ids) in memory until the day changes, so their RSS grows with the
  orders: the table gives the growth per ledger order, to tell that from a leak. Postgres is
  reported, not checked: its RSS counts the shared buffers its backends have touched, which
  grows legitimately up to ``shared_buffers``.
* tick → ack does not drift: p99 of the last window <= 1.5 x p99 of the first window + 2 ms,
  the windows being the first and last 5 minutes (1/6 of the run when shorter), each with at
  least 20 acks. On a short run a window holds some 70 acks, so its p99 is nearly its
  maximum and one stall of a shared machine moves it; p50/p99 by sixth of the run and the
  machine's load beside them tell a trend from noise.
* logs rotate: at least one service's log rotated more than ``log.backups`` times (rotations
  are counted as the current file shrinking between samples), and no service's log files
  exceed ``log.backups`` + 1 files of ``log.max_bytes`` each, at any sample.
* disk is bounded. Nothing in the home is capped by size except the logs; the rest must grow
  only with what the run did: the tick recorder by a steady number of bytes per tick
  (last window <= 1.25 x first window), every published tick recorded once and no recorder
  error; the paper journal (``run/paper-book.jsonl``) by at most 2 kB per ledger order; the
  rest of ``run/`` and the home outside ticks, pgdata, run and log by less than 1 MB. pgdata is
  reported (MB per minute and kB per order after warm-up, pg_wal apart), not checked: WAL
  segments of 16 MB are allocated ahead and recycled at checkpoints, so its growth comes in
  steps that a short run cannot tell from a trend. The ``*.out`` files are this harness's
  capture of each service's console (under ``make up`` it goes to the terminal): reported,
  not checked.
* steady trading: no service exited, orders were acked in the last window, risk is still
  ACTIVE at the end, execution's open orders never exceed an exit and two bracket legs per
  instrument, and the strategy kept up with the feed (its backlog grew by less than 1 s of
  ticks, no sequence gaps).

Every process and the embedded PostgreSQL are stopped at the end, after a failure or Ctrl-C
too, and the home is deleted (``--keep`` keeps the files and prints where).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import psutil

from libs.common.bus import Bus, RequestTimeout
from libs.common.config import Config, load_config
from libs.common.messages import Fill, GetStatus, Heartbeat, OrderUpdate, Reply
from tests.helpers import eventually, free_base_port
from tests.kit.processes import answers, ask
from tests.stack import Stack

SERVICES = ("execution", "feed", "risk", "strategy", "notifier")  # start order; stopped in reverse
STRATEGY_ID = "mom1"
CHECKED = ("feed", "strategy", f"strategy-{STRATEGY_ID}", "risk", "execution", "notifier")
RSS_GROWTH_MAX = 0.10
DRIFT_FACTOR, DRIFT_ALLOWANCE_MS = 1.5, 2.0
MIN_WINDOW_ACKS = 20
TICK_BYTES_DRIFT = 1.25
JOURNAL_BYTES_PER_ORDER = 2048
OTHER_GROWTH_MAX = 1_000_000
BACKLOG_MAX_S = 1.0
LOG_BACKUPS = 2
DEFAULT_VOLATILITY, DEFAULT_RATE = 0.0008, 20.0  # feed.sim_volatility and sim_rate defaults
INSTRUMENTS = 5
WORKING_MAX = 3 * INSTRUMENTS  # one position per instrument: its two bracket legs and an exit
MB = 1_000_000
_LOG_NAME = re.compile(r"^(?P<svc>.+)\.log(?:\.(?P<n>\d+))?$")

# Each strategy request execution accepted: the strategy's stamp, risk's ExecuteOrder stamp and
# the time execution created the row (before its commit), all time.time_ns() on this machine.
_LEDGER_REQUESTS = """
SELECT l.request_id, (e.payload->'request'->'order'->>'ts_ns')::bigint,
       (e.payload->'request'->>'ts_ns')::bigint, (extract(epoch FROM e.ts) * 1e6)::bigint * 1000
FROM order_events e JOIN order_ledger l ON l.internal_id = e.order_id
WHERE e.kind = 'PENDING' AND e.payload->'request'->'order' ? 'ts_ns'
"""


# ----------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Plan:
    minutes: float
    rate: float
    seed: int
    sample_s: float
    log_max_bytes: int

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup_s(self) -> float:
        return min(0.2 * self.duration_s, 300.0)

    @property
    def window_s(self) -> float:
        return min(300.0, self.duration_s / 6)

    @property
    def per_instrument(self) -> float:
        return self.rate / INSTRUMENTS


def config_toml(plan: Plan) -> str:
    """The soak's config file: the momentum instance, its windows in ticks scaled to the rate."""
    per_s = plan.per_instrument
    lookback = max(20, round(per_s))  # 1 s of ticks
    cooldown = max(20, round(2 * per_s))  # 2 s
    return (
        "[[strategy]]\n"
        f'name = "momentum"\nid = "{STRATEGY_ID}"\n'
        f"params = {{ lookback = {lookback}, entry_pct = 0.4, exit_pct = 0.25, stop_pct = 0.5, "
        f"target_pct = 0.8, cooldown_ticks = {cooldown}, quantity = 1 }}\n"
    )


def environment(plan: Plan) -> dict[str, Any]:
    volatility = DEFAULT_VOLATILITY * math.sqrt(DEFAULT_RATE / plan.per_instrument)
    return {
        "NEOPULSE_FEED__SIM_RATE": f"{plan.per_instrument:g}",
        "NEOPULSE_FEED__SIM_SEED": plan.seed,
        "NEOPULSE_FEED__SIM_VOLATILITY": f"{volatility:.6g}",
        "NEOPULSE_FEED__RECORD": "true",
        "NEOPULSE_RISK__MAX_DAILY_LOSS": "10000000",
        "NEOPULSE_RISK__MAX_ORDERS_PER_SEC": "100",
        "NEOPULSE_LOG__MAX_BYTES": plan.log_max_bytes,
        "NEOPULSE_LOG__BACKUPS": LOG_BACKUPS,
    }


# ----------------------------------------------------------------------------- the bus side


class Observer(threading.Thread):
    """Heartbeats, order updates and fills off every PUB, on a thread of its own so a receipt
    is stamped when it arrives, not when the sampler is free."""

    def __init__(self, cfg: Config, endpoints: list[str]) -> None:
        super().__init__(name="soak-observer", daemon=True)
        self.cfg = cfg
        self.endpoints = endpoints
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.heartbeats: dict[str, Heartbeat] = {}
        self.tick_counts: dict[str, list[tuple[int, int]]] = {"feed": [], f"strategy-{STRATEGY_ID}": []}
        self.acks: dict[str, int] = {}  # request_id → receipt (epoch ns) of its first OrderUpdate
        self.orders: set[str] = set()
        self.fills = 0
        self.hb_lag: list[float] = []  # execution heartbeats: receipt here - their stamp, seconds
        self.error = ""

    def run(self) -> None:
        bus = Bus(self.cfg)
        sub = bus.subscriber(self.endpoints, [b"hb.", b"order.", b"fill."])
        try:
            while not self.halt.is_set():
                if sub.sock.poll(200):
                    sub.drain(self._on)
        except Exception as exc:  # a dead observer must show in the report, not hang the run
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            sub.close()
            bus.close()

    def _on(self, _topic: bytes, msg: Any) -> None:
        now = time.time_ns()
        with self.lock:
            match msg:
                case OrderUpdate():
                    self.orders.add(msg.order_id)
                    self.acks.setdefault(msg.request_id, now)
                case Fill():
                    self.fills += 1
                case Heartbeat():
                    self.heartbeats[msg.service] = msg
                    if msg.service == "execution":
                        self.hb_lag.append((now - msg.ts_ns) / 1e9)
                    series = self.tick_counts.get(msg.service)
                    ticks = msg.info.get("ticks")
                    if series is not None and isinstance(ticks, int):
                        series.append((msg.ts_ns, ticks))

    def heartbeat(self, service: str) -> Heartbeat | None:
        with self.lock:
            return self.heartbeats.get(service)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


# ----------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # seconds since the run started
    rss: dict[str, int]
    cpu: dict[str, float]  # CPU seconds so far
    disk: dict[str, int]  # allocated bytes per part of the home
    logs: dict[str, list[int]]  # service → sizes of its log files (current first)
    feed_ticks: int
    recorded: int
    acks: int
    orders: int
    working: int  # execution's open orders (its last heartbeat)
    load: float  # the machine's 1-minute load average


class Processes:
    """The processes of the stack by name; postgres's backends are found again at each sample."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.main = {name: psutil.Process(proc.pid) for name, proc in stack.services.items()}
        self.others: dict[str, psutil.Process] = {"harness": psutil.Process()}
        for child in self.main["strategy"].children():  # the supervisor's one instance
            self.others[f"strategy-{STRATEGY_ID}"] = child

    def postgres(self) -> list[psutil.Process]:
        pidfile = self.stack.home / "pgdata" / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            master = psutil.Process(pid)
            return [master, *master.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return []

    def measure(self) -> tuple[dict[str, int], dict[str, float]]:
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name, proc in {**self.main, **self.others}.items():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                rss[name] = proc.memory_info().rss
                cpu[name] = times.user + times.system
        pg_rss, pg_cpu = 0, 0.0
        for i, proc in enumerate(self.postgres()):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                pg_rss += proc.memory_info().rss
                pg_cpu += times.user + times.system
                if i == 0:  # the postmaster: the CPU of backends that have exited
                    pg_cpu += times.children_user + times.children_system
        if pg_rss:
            rss["postgres"], cpu["postgres"] = pg_rss, pg_cpu
        return rss, cpu

    def exited(self) -> list[str]:
        return [f"{name} exited with {proc.returncode}" for name, proc in self.stack.services.items()
                if proc.poll() is not None]  # fmt: skip


def _tree_bytes(path: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:  # a file that went away meanwhile (postgres temp files)
            continue
    return total


def disk_use(home: Path) -> dict[str, int]:
    """Allocated bytes of each part of the home: ticks, pgdata (and pg_wal in it), run (and the
    paper journal in it), log, the console captures (``*.out``) and everything else."""
    parts = {"ticks": 0, "pgdata": 0, "pg_wal": 0, "run": 0, "paper-book.jsonl": 0, "log": 0,
             "console": 0, "other": 0}  # fmt: skip
    try:
        entries = list(os.scandir(home))
    except OSError:
        return parts
    for entry in entries:
        path = Path(entry.path)
        if entry.name in ("ticks", "pgdata", "run", "log") and entry.is_dir(follow_symlinks=False):
            parts[entry.name] = _tree_bytes(path)
        elif entry.name.endswith(".out"):
            parts["console"] += _file_bytes(path)
        elif entry.is_dir(follow_symlinks=False):
            parts["other"] += _tree_bytes(path)
        else:
            parts["other"] += _file_bytes(path)
    parts["pg_wal"] = _tree_bytes(home / "pgdata" / "pg_wal")
    parts["paper-book.jsonl"] = _file_bytes(home / "run" / "paper-book.jsonl")
    return parts


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def log_files(log_dir: Path) -> dict[str, list[int]]:
    """Service → the apparent sizes of its log files, the current one first, then .1, .2, ..."""
    found: dict[str, dict[int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(log_dir):
            m = _LOG_NAME.match(entry.name)
            if m is None:
                continue
            with contextlib.suppress(OSError):
                found.setdefault(m["svc"], {})[int(m["n"] or 0)] = entry.stat().st_size
    return {svc: [sizes[n] for n in sorted(sizes)] for svc, sizes in sorted(found.items())}


def feed_status(bus: Bus, cfg: Config) -> dict[str, Any]:
    try:
        reply = ask(bus, cfg, "feed_rep", GetStatus(), 2000)
    except RequestTimeout:
        return {}
    return reply.data if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict) else {}


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Stamps:
    """When a strategy request was made, sent on by risk, and written by execution (epoch ns)."""

    request_ns: int
    execute_ns: int
    row_ns: int


@dataclass
class Run:
    plan: Plan
    samples: list[Sample] = field(default_factory=list)
    acks: dict[str, int] = field(default_factory=dict)
    requests: dict[str, Stamps] = field(default_factory=dict)
    tick_counts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    orders: int = 0
    fills: int = 0
    hb_lag: list[float] = field(default_factory=list)
    t0_ns: int = 0
    risk: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    recorder: dict[str, Any] = field(default_factory=dict)
    source_stats: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what stopped the run early
    log_errors: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    leftover: list[int] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0


def start(stack: Stack, bus: Bus, cfg: Config, observer: Observer) -> None:
    """Start the services in order and wait until each answers (GetStatus, or a heartbeat for
    the strategy and the notifier, which serve no requests)."""
    for name in SERVICES:
        stack.start_service(name)
    for name, endpoint in (("execution", "execution_rep"), ("feed", "feed_rep"), ("risk", "risk_rep")):
        proc = stack.services[name]

        def up(p: Any = proc, n: str = name, e: str = endpoint) -> bool:
            return answers(p, stack.home, n, lambda m: ask(bus, cfg, e, m, 1000))

        eventually(up, timeout=90, interval=0.2, message=f"{name} up\n{stack.service_output(name)}")

    def beating() -> bool:
        for name, proc in stack.services.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{stack.service_output(name)}")
        risk, strat = observer.heartbeat("risk"), observer.heartbeat(f"strategy-{STRATEGY_ID}")
        return bool(observer.heartbeat("notifier") and risk and risk.info.get("day_loaded")
                    and strat and strat.info.get("ready"))  # fmt: skip

    eventually(beating, timeout=60, interval=0.2, message="heartbeats of notifier and strategy, risk's day")


def sample(run: Run, procs: Processes, observer: Observer, bus: Bus, cfg: Config, t: float) -> Sample:
    rss, cpu = procs.measure()
    status = feed_status(bus, cfg)
    recorder = status.get("recorder") or {}
    if recorder:
        run.recorder = recorder
        run.source_stats = status.get("source_stats") or {}
    with observer.lock:
        acks, orders = len(observer.acks), len(observer.orders)
        hb = observer.heartbeats.get("execution")
    home = procs.stack.home
    s = Sample(t=t, rss=rss, cpu=cpu, disk=disk_use(home), logs=log_files(home / "log"),
               feed_ticks=int(status.get("ticks", 0)), recorded=int(recorder.get("ticks", 0)),
               acks=acks, orders=orders, working=int(hb.info.get("open_orders", 0)) if hb else 0,
               load=os.getloadavg()[0])  # fmt: skip
    run.samples.append(s)
    return s


def ledger_requests(home: Path) -> dict[str, Stamps]:
    """request_id → the ``Stamps`` of every strategy request execution accepted."""
    import psycopg
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(home / "pgdata")
    if info is None:
        raise RuntimeError("no postmaster.pid in pgdata")
    with psycopg.connect(info.get_uri(), connect_timeout=5) as conn:
        rows = conn.execute(_LEDGER_REQUESTS).fetchall()
    return {str(rid): Stamps(int(req), int(ex or 0), int(row or 0)) for rid, req, ex, row in rows}


def log_error_lines(log_dir: Path) -> dict[str, int]:
    """Error-level lines per service in the log files still on disk (older ones rotated away)."""
    out: dict[str, int] = {}
    for path in sorted(log_dir.glob("*.log*")):
        m = _LOG_NAME.match(path.name)
        if m is None:
            continue
        with contextlib.suppress(OSError), path.open("rb") as fh:
            n = sum(1 for line in fh if b'"level": "error"' in line or b'"level":"error"' in line)
            out[m["svc"]] = out.get(m["svc"], 0) + n
    return out


def soak(plan: Plan, keep: bool = False) -> Run:
    """Start the stack, sample it for ``plan.minutes``, collect the figures, stop everything."""
    run = Run(plan, load_before=os.getloadavg()[0])
    stack = Stack(free_base_port(), **environment(plan))
    bus: Bus | None = None
    observer: Observer | None = None
    try:
        config = stack.home / "soak.toml"
        config.write_text(config_toml(plan))
        stack.env["NEOPULSE_CONFIG"] = str(config)
        cfg = load_config(env=stack.env)
        bus = Bus(cfg)
        endpoints = [cfg.bus.endpoint(n) for n in ("feed_pub", "risk_pub", "execution_pub", "notifier_pub")]
        endpoints.append(f"ipc://{stack.home}/run/strategy-{STRATEGY_ID}.pub")
        observer = Observer(cfg, endpoints)
        observer.start()
        start(stack, bus, cfg, observer)
        print(f"soak: services up in {stack.home}; running {plan.minutes:g} min", flush=True)
        measure(run, Processes(stack), observer, bus, cfg)
        collect(run, stack, observer)
    except KeyboardInterrupt:
        run.interrupted = True
        print("soak: interrupted; stopping the stack", file=sys.stderr, flush=True)
    except (AssertionError, RuntimeError, OSError) as exc:  # a service that did not start, or died
        run.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        shut_down(run, stack, bus, observer, keep)
    return run


def measure(run: Run, procs: Processes, observer: Observer, bus: Bus, cfg: Config) -> None:
    """Sample every ``plan.sample_s`` until the end of the run or the first problem."""
    plan = run.plan
    t0 = time.monotonic()
    run.t0_ns = time.time_ns()
    next_sample, next_line = t0, t0 + 60
    while True:
        s = sample(run, procs, observer, bus, cfg, time.monotonic() - t0)
        run.problems.extend(procs.exited())
        if observer.error:
            run.problems.append(f"the observer failed: {observer.error}")
        if run.problems or s.t >= plan.duration_s:
            return
        if time.monotonic() >= next_line:
            next_line += 60
            print(f"  {s.t / 60:4.1f} min: {s.feed_ticks} ticks, {s.acks} requests acked, "
                  f"{sum(s.disk.values()) / MB:.0f} MB on disk", flush=True)  # fmt: skip
        next_sample = min(next_sample + plan.sample_s, t0 + plan.duration_s)
        time.sleep(max(0.0, next_sample - time.monotonic()))


def shut_down(run: Run, stack: Stack, bus: Bus | None, observer: Observer | None, keep: bool) -> None:
    """Stop every service (execution last: its embedded PostgreSQL stops with it), kill what
    is left, delete the home unless ``keep``. Ctrl-C, SIGTERM and SIGHUP wait until it is done."""
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stopping}
    try:
        if observer is not None:
            observer.stop()
        for name in reversed(SERVICES):
            if name in stack.services:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    stack.stop_service(name, timeout=15)
        if bus is not None:
            bus.close()
    finally:
        if keep:
            stack.kill_all()
            print(f"soak: kept {stack.home}", flush=True)
        else:
            stack.remove()
        run.leftover = stack.member_pids()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        run.load_after = os.getloadavg()[0]


def collect(run: Run, stack: Stack, observer: Observer) -> None:
    """What the end of the run needs from the live stack: the ledger and the last heartbeats."""
    time.sleep(1.0)  # the last acks in flight
    with observer.lock:
        run.acks = dict(observer.acks)
        run.tick_counts = {k: list(v) for k, v in observer.tick_counts.items()}
        run.orders, run.fills, run.hb_lag = len(observer.orders), observer.fills, list(observer.hb_lag)
        risk = observer.heartbeats.get("risk")
        strat = observer.heartbeats.get(f"strategy-{STRATEGY_ID}")
    run.risk = dict(risk.info) if risk else {}
    run.strategy = dict(strat.info) if strat else {}
    try:
        run.requests = ledger_requests(stack.home)
    except Exception as exc:
        run.problems.append(f"cannot read the requests from the ledger: {type(exc).__name__}: {exc}")
    run.log_errors = log_error_lines(stack.home / "log")


# ----------------------------------------------------------------------------- analysis


@dataclass
class Check:
    ok: bool
    what: str


def _at(samples: list[Sample], t: float) -> Sample:
    """The first sample at or after ``t`` (the last one if none)."""
    return next((s for s in samples if s.t >= t), samples[-1])


@dataclass(frozen=True)
class Latency:
    t: float  # seconds since the start of the run, at receipt of the ack
    total: float  # tick → ack, seconds
    legs: tuple[float, float, float]  # strategy → risk's ExecuteOrder, → execution's row, → ack received


LEGS = ("  request -> risk sends ExecuteOrder", "  ExecuteOrder -> execution's row",
        "  row -> commit, place, publish, here")  # fmt: skip


def latencies(run: Run) -> list[Latency]:
    """Tick → ack of each acked strategy request, with its legs, in order of receipt."""
    out = []
    for rid, recv_ns in run.acks.items():
        st = run.requests.get(rid)
        if st is None:
            continue
        legs = ((st.execute_ns - st.request_ns) / 1e9, (st.row_ns - st.execute_ns) / 1e9,
                (recv_ns - st.row_ns) / 1e9)  # fmt: skip
        out.append(Latency((recv_ns - run.t0_ns) / 1e9, (recv_ns - st.request_ns) / 1e9, legs))
    out.sort(key=lambda x: x.t)
    return out


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    a = np.asarray(xs) * 1e3
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}  # fmt: skip


def backlog_growth(run: Run) -> float | None:
    """Growth from the end of warm-up to the end of (ticks the feed published - ticks the
    strategy handled), in seconds of ticks; None without enough heartbeats."""
    feed = run.tick_counts.get("feed", [])
    strat = run.tick_counts.get(f"strategy-{STRATEGY_ID}", [])
    if len(feed) < 2 or len(strat) < 2:
        return None
    f_ts = np.asarray([ts for ts, _ in feed], dtype=float)
    f_n = np.asarray([n for _, n in feed], dtype=float)
    warm_ns = run.t0_ns + run.plan.warmup_s * 1e9
    after = [(ts, n) for ts, n in strat if f_ts[0] <= ts <= f_ts[-1]]
    first = next(((ts, n) for ts, n in after if ts >= warm_ns), None)
    if first is None or len(after) < 2:
        return None
    last = after[-1]

    def backlog(point: tuple[int, int]) -> float:
        return float(np.interp(point[0], f_ts, f_n)) - point[1]

    return (backlog(last) - backlog(first)) / run.plan.rate


@dataclass
class Report:
    """The figures (lines to print) and the checks of a run."""

    run: Run
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.checks.append(Check(ok, what))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def analyse(run: Run) -> Report:
    plan, samples = run.plan, run.samples
    rep = Report(run)
    for problem in run.problems:
        rep.check(False, problem)
    if run.leftover:
        rep.check(False, f"processes left after the clean-up: {run.leftover}")
    rep.lines += [
        f"soak: {plan.minutes:g} min at {plan.rate:g} ticks/s ({plan.per_instrument:g}/s x {INSTRUMENTS} "
        f"instruments), seed {plan.seed}; warm-up {plan.warmup_s:.0f} s, windows {plan.window_s:.0f} s, "
        f"a sample every {plan.sample_s:g} s",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load avg (1 min) {run.load_before:.2f} before, {run.load_after:.2f} after",
    ]  # fmt: skip
    if len(samples) < 2:
        rep.check(False, "fewer than two samples: nothing to judge")
        return rep
    warm, end = _at(samples, plan.warmup_s), samples[-1]
    _processes(rep, warm, end)
    _logs(rep, end)
    _disk(rep, warm, end)
    if run.interrupted:  # the figures so far; the ledger was not read, so nothing more is judged
        rep.checks = [c for c in rep.checks if c.what.startswith("processes left")]
        rep.check(False, f"interrupted after {end.t / 60:.1f} of {plan.minutes:g} min: the figures so far")
        return rep
    last_acks = _latency(rep, end)
    _trading(rep, end, last_acks)
    return rep


def _processes(rep: Report, warm: Sample, end: Sample) -> None:
    samples, window = rep.run.samples, rep.run.plan.window_s
    first_end, last_start = _at(samples, window), _at(samples, end.t - window)
    orders = max(1, end.orders - warm.orders)

    def cpu(name: str, a: Sample, b: Sample) -> float:
        return (b.cpu[name] - a.cpu.get(name, 0.0)) / (b.t - a.t) * 100 if b.t > a.t else math.nan

    rep.lines += [
        "",
        f"{'':16} {'RSS MB':>29} {'growth after warm-up':>22} {'CPU % of a core':>24} {'logs':>12}",
        f"{'process':<16} {'warm':>9} {'end':>9} {'max':>9} {'%':>9} {'kB/order':>12} "
        f"{'first':>7} {'last':>7} {'all':>7} {'MB':>7} {'files':>5}",
    ]
    notes = {"postgres": "  postmaster + backends, not checked", "harness": "  this process, not checked"}
    for name in (*CHECKED, "postgres", "harness"):
        if name not in end.rss or name not in warm.rss:
            rep.lines.append(f"{name:<16} (not measured)")
            if name in CHECKED:
                rep.check(False, f"RSS of {name} not measured")
            continue
        w, e = warm.rss[name], end.rss[name]
        peak = max(s.rss.get(name, 0) for s in samples)
        growth = (e - w) / w
        logs = end.logs.get(name, [])
        rep.lines.append(
            f"{name:<16} {w / MB:>9.1f} {e / MB:>9.1f} {peak / MB:>9.1f} {growth * 100:>+9.1f} "
            f"{(e - w) / orders / 1e3:>12.2f} {cpu(name, samples[0], first_end):>7.1f} "
            f"{cpu(name, last_start, end):>7.1f} {cpu(name, samples[0], end):>7.1f} "
            f"{sum(logs) / MB:>7.2f} {len(logs):>5}{notes.get(name, '')}"
        )
        if name in CHECKED:
            rep.check(growth < RSS_GROWTH_MAX,
                      f"RSS of {name} {growth * 100:+.1f}% after warm-up ({w / MB:.1f} -> {e / MB:.1f} MB, "
                      f"max {peak / MB:.1f}; limit +{RSS_GROWTH_MAX * 100:.0f}%)")  # fmt: skip
    rep.lines.append("kB/order: RSS growth after warm-up per ledger order placed meanwhile; CPU: in the "
                     "first and the last window, and over the whole run")


def rotations(samples: list[Sample]) -> dict[str, int]:
    """Service → rotations seen: samples at which its current log file had shrunk (a lower
    bound: two rotations between samples count as one)."""
    seen: dict[str, int] = {}
    for before, after in itertools.pairwise(samples):
        for svc, sizes in after.logs.items():
            old = before.logs.get(svc)
            if old and sizes[0] < old[0]:
                seen[svc] = seen.get(svc, 0) + 1
    return seen


def _logs(rep: Report, end: Sample) -> None:
    max_bytes, files = rep.run.plan.log_max_bytes, LOG_BACKUPS + 1
    seen = rotations(rep.run.samples)
    deleted = sorted(svc for svc, n in seen.items() if n > LOG_BACKUPS)
    shown = ", ".join(f"{svc} {n}" for svc, n in sorted(seen.items())) or "none"
    rep.check(bool(deleted), f"logs rotate: rotations seen {shown}; past {LOG_BACKUPS} rotations (the oldest "
                             f"file deleted): {', '.join(deleted) or 'none'} (log.max_bytes {max_bytes})")
    over = sorted({f"{svc} ({len(sizes)} files, {sum(sizes)} bytes, largest {max(sizes)})"
                   for s in rep.run.samples for svc, sizes in s.logs.items()
                   if len(sizes) > files or max(sizes) > max_bytes})  # fmt: skip
    peak = max(s.disk["log"] for s in rep.run.samples)
    rep.check(not over, f"each service's logs within {files} x {max_bytes} bytes at every sample "
                        f"(log/ at most {peak / MB:.2f} MB)" + (f"; over: {'; '.join(over)}" if over else ""))


_PARTS = {"ticks": "ticks/", "pgdata": "pgdata/", "pg_wal": "  of which pg_wal/", "run": "run/",
          "paper-book.jsonl": "  of which paper-book", "log": "log/", "console": "*.out", "other": "other"}
_IN_OTHERS = ("pg_wal", "paper-book.jsonl")  # counted in pgdata and run already


def _disk(rep: Report, warm: Sample, end: Sample) -> None:
    plan, samples = rep.run.plan, rep.run.samples
    minutes = max(1e-9, (end.t - warm.t) / 60)
    orders = max(1, end.orders - warm.orders)
    ticks = max(1, end.recorded - warm.recorded)

    def grew(part: str) -> int:
        return end.disk[part] - warm.disk[part]

    per = {
        "ticks": f"{grew('ticks') / ticks:.0f} B per tick recorded",
        "pgdata": f"{grew('pgdata') / orders / 1e3:.1f} kB per ledger order",
        "pg_wal": f"{grew('pg_wal') / orders / 1e3:.1f} kB per ledger order",
        "paper-book.jsonl": f"{grew('paper-book.jsonl') / orders:.0f} B per ledger order",
        "console": "the harness's capture of the consoles (not checked)",
    }
    rep.lines += ["", f"{'NEOPULSE_HOME':<22} {'start MB':>8} {'warm MB':>8} {'end MB':>8} {'MB/min':>7}"
                      "  after warm-up"]  # fmt: skip
    for part, label in _PARTS.items():
        first, w, e = samples[0].disk[part], warm.disk[part], end.disk[part]
        rep.lines.append(f"{label:<22} {first / MB:>8.1f} {w / MB:>8.1f} {e / MB:>8.1f} "
                         f"{(e - w) / MB / minutes:>7.2f}  {per.get(part, '')}")  # fmt: skip
    tot = [sum(v for k, v in s.disk.items() if k not in _IN_OTHERS) for s in (samples[0], warm, end)]
    rep.lines.append(f"{'total':<22} {tot[0] / MB:>8.1f} {tot[1] / MB:>8.1f} {tot[2] / MB:>8.1f} "
                     f"{(tot[2] - tot[1]) / MB / minutes:>7.2f}")  # fmt: skip

    def per_tick(a: Sample, b: Sample) -> float:
        return (b.disk["ticks"] - a.disk["ticks"]) / max(1, b.recorded - a.recorded)

    first_bpt = per_tick(samples[0], _at(samples, plan.window_s))
    last_bpt = per_tick(_at(samples, end.t - plan.window_s), end)
    rep.check(first_bpt > 0 and last_bpt <= TICK_BYTES_DRIFT * first_bpt,
              f"the tick recorder grows with the ticks: {first_bpt:.0f} B/tick in the first window, "
              f"{last_bpt:.0f} in the last (limit {TICK_BYTES_DRIFT:g}x)")  # fmt: skip
    unrecorded = end.feed_ticks - end.recorded  # what the last flush (every 0.25 s) had not written yet
    errors = rep.run.recorder.get("errors", "?")
    rep.check(0 <= unrecorded <= plan.rate and errors == 0,
              f"every published tick recorded once: {end.feed_ticks} published, {end.recorded} recorded, "
              f"{errors} recorder errors")  # fmt: skip
    journal = grew("paper-book.jsonl")
    rep.check(journal <= JOURNAL_BYTES_PER_ORDER * orders + 65536,
              f"the paper journal grows with the orders: {journal / 1e3:.0f} kB for {orders} ledger orders "
              f"after warm-up ({journal / orders:.0f} B each, limit {JOURNAL_BYTES_PER_ORDER})")  # fmt: skip
    rest, other = grew("run") - journal, grew("other")
    rep.check(rest < OTHER_GROWTH_MAX and other < OTHER_GROWTH_MAX,
              f"nothing else grows: run/ without the journal {rest / 1e3:+.0f} kB, other files "
              f"{other / 1e3:+.0f} kB after warm-up (limit 1 MB each)")  # fmt: skip


def _latency(rep: Report, end: Sample) -> int:
    """The tick → ack table and the drift check; returns the acks in the last window."""
    plan = rep.run.plan
    lat = latencies(rep.run)
    in_first = [x for x in lat if 0 <= x.t <= plan.window_s]
    in_last = [x for x in lat if x.t >= end.t - plan.window_s]
    first, last, whole = (pct([x.total for x in xs]) for xs in (in_first, in_last, lat))
    w = f"{plan.window_s:.0f} s"
    rep.lines += [
        "",
        "tick -> ack, ms: OrderRequest.ts_ns (the strategy's stamp, on the tick) -> the PENDING_BROKER",
        "OrderUpdate received from execution_pub",
        f"{'':40} {'first ' + w:>15} {'last ' + w:>15} {'whole run':>23}",
        f"{'':40} {'p50':>7} {'p99':>7} {'p50':>7} {'p99':>7} {'p50':>7} {'p99':>7} {'max':>7}",
    ]
    rows = [("tick -> ack", first, last, whole)]
    for i, leg in enumerate(LEGS):
        a, b, c = (pct([x.legs[i] for x in xs]) for xs in (in_first, in_last, lat))
        rows.append((leg, a, b, c))
    for name, a, b, c in rows:
        rep.lines.append(f"{name:40} {a['p50']:>7.2f} {a['p99']:>7.2f} {b['p50']:>7.2f} {b['p99']:>7.2f} "
                         f"{c['p50']:>7.2f} {c['p99']:>7.2f} {c['max']:>7.2f}")  # fmt: skip
    rep.lines.append(f"{'acks':40} {first['n']:>15} {last['n']:>15} {whole['n']:>23}")
    hb = pct(rep.run.hb_lag)
    rep.lines.append(f"this harness's own receipt delay (execution heartbeats, publish -> here): p50 "
                     f"{hb['p50']:.2f} ms, p99 {hb['p99']:.2f} ms, max {hb['max']:.2f} ms, n {hb['n']}")
    sixth = end.t / 6
    slices = [pct([x.total for x in lat if i * sixth <= x.t < (i + 1) * sixth]) for i in range(6)]
    loads = [[s.load for s in rep.run.samples if i * sixth <= s.t < (i + 1) * sixth] for i in range(6)]
    rep.lines.append(f"{'by sixth of the run, p50/p99':<32}"
                     + "  ".join(f"{p['p50']:>5.1f}/{p['p99']:<5.1f}" for p in slices))
    rep.lines.append(f"{'  machine load avg (1 min)':<32}"
                     + "  ".join(f"{(sum(x) / len(x) if x else math.nan):>5.1f}      " for x in loads))
    limit = DRIFT_FACTOR * first["p99"] + DRIFT_ALLOWANCE_MS
    enough = first["n"] >= MIN_WINDOW_ACKS and last["n"] >= MIN_WINDOW_ACKS
    rep.check(enough and last["p99"] <= limit,
              f"tick -> ack p99 does not drift: last window {last['p99']:.2f} ms, limit {limit:.2f} ms "
              f"({DRIFT_FACTOR:g} x first {first['p99']:.2f} + {DRIFT_ALLOWANCE_MS:g}); {first['n']} and "
              f"{last['n']} acks (at least {MIN_WINDOW_ACKS} each)")  # fmt: skip
    return int(last["n"])


def _trading(rep: Report, end: Sample, last_acks: int) -> None:
    run = rep.run
    risk, strat, first = run.risk, run.strategy, run.samples[0]
    rate = (end.feed_ticks - first.feed_ticks) / max(1e-9, end.t - first.t)
    rep.lines += [
        "",
        f"orders: {len(run.requests)} {STRATEGY_ID} requests placed, {run.orders} ledger orders with the "
        f"bracket legs, {run.fills} fills; risk approved {risk.get('approved', '?')}, refused "
        f"{risk.get('rejected', '?')}, state {risk.get('state', '?')}, net PnL {risk.get('net_pnl', '?')}",
        f"feed: {end.feed_ticks} ticks published ({rate:.0f}/s), slipped rounds "
        f"{run.source_stats.get('slipped_rounds', '?')}; the strategy handled {strat.get('ticks', '?')}, "
        f"sent {strat.get('orders_sent', '?')}, refused {strat.get('rejected', '?')}",
    ]  # fmt: skip
    if run.log_errors:
        errors = ", ".join(f"{k} {v}" for k, v in run.log_errors.items())
        rep.lines.append(f"error lines in the log files still on disk: {errors}")
    rep.check(risk.get("state") == "ACTIVE", f"risk still ACTIVE at the end: {risk.get('state', '?')}")
    rep.check(last_acks > 0, f"orders acked in the last window: {last_acks}")
    working = [s.working for s in run.samples if s.t >= run.plan.warmup_s]
    rep.check(max(working, default=0) <= WORKING_MAX,
              f"working orders do not pile up: execution's open orders after warm-up at most "
              f"{max(working, default=0)}, at the end {end.working} (limit {WORKING_MAX}: an exit and two "
              f"bracket legs per instrument)")  # fmt: skip
    growth = backlog_growth(run)
    shown = "?" if growth is None else f"{growth:.2f}"
    rep.check(growth is not None and growth < BACKLOG_MAX_S and strat.get("gaps") == 0,
              f"the strategy keeps up with the feed: its backlog grew {shown} s of ticks after warm-up "
              f"(limit {BACKLOG_MAX_S:g} s), sequence gaps {strat.get('gaps', '?')}")  # fmt: skip


# ----------------------------------------------------------------------------- entry point


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # clean up as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=5000.0, help="ticks per second in total")
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "big"))
    ap.add_argument("--sample-s", type=float, default=0.0, help="default: 5 s, 2 s for runs under 10 min")
    ap.add_argument("--log-max-bytes", type=int, default=0,
                    help="log.max_bytes (default: 1 MB x minutes / 60, at most 1 MB, at least 16 kB)")
    ap.add_argument("--keep", action="store_true", help="keep NEOPULSE_HOME (logs, ticks, pgdata) for a look")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0:
        ap.error("--minutes and --rate must be above 0")
    short = args.minutes < 10
    log_max_bytes = args.log_max_bytes or max(16_000, round(1_000_000 * min(1.0, args.minutes / 60)))
    plan = Plan(minutes=args.minutes, rate=args.rate, seed=args.seed,
                sample_s=args.sample_s or (2.0 if short else 5.0), log_max_bytes=log_max_bytes)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    sys.setswitchinterval(0.0005)  # the observer thread stamps receipts: let it take the GIL soon
    run = soak(plan, keep=args.keep)
    rep = analyse(run)
    print("\n".join(rep.lines))
    print("\nchecks:")
    for c in rep.checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.what}")
    failed = rep.failed
    print(f"\nsoak {'FAILED' if failed else 'ok'}: {len(failed)} of {len(rep.checks)} checks failed, "
          f"seed {plan.seed}")  # fmt: skip
    if run.interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
