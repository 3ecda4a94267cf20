"""Chaos: SIGKILL random processes of a trading paper stack, then prove nothing was lost.

    python -m tests.chaos [--kills 100] [--seconds 420] [--seed N]

The stack is every service as its own process (feed on the sim source, risk, execution with
the paper broker on its embedded PostgreSQL, the notifier) plus two order-heavy momentum
strategies with brackets, while a manual trader sends bracketed orders through risk. Every
few seconds one of feed, a strategy, risk, execution or the embedded PostgreSQL postmaster
gets SIGKILL. Services are started again at once, as a supervisor would; PostgreSQL must be
brought back by execution itself.

After every recovery each open bracketed position must have a live stop at the broker
(within ``PROTECT_GRACE_S``: a stop is placed right after its entry fills). At the end the
kill switch is tripped, the book is flattened, and the ledger is compared with the broker's
own book (the paper broker's journal):

* no client tag placed twice;
* no broker order without a ledger row, and no ledger row claiming a broker order that does
  not exist;
* ledger fills equal broker fills per order;
* positions equal the net of fills per strategy and instrument (and per instrument at the
  broker);
* every order a trader saw approved is in the ledger;
* all flat and nothing working after kill switch plus flatten;
* every service up, and no handler failure in any log.

It prints a table (kills per target, recovery mean and max, orders, fills, each invariant's
count) and the seed, and exits 1 on any violation. ``run()`` is the same for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, Protocol

import psutil

from libs.common.bus import Bus, RequestTimeout
from libs.common.config import Config, load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    Alert,
    GetPositions,
    GetStatus,
    Heartbeat,
    OrderRequest,
    Reply,
    RiskVerdict,
    Tick,
)
from libs.common.security import present_credential
from tests.helpers import free_base_port, stack_env
from tests.kit.processes import OwnHome, spawn, stop

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("feed", "strategy", "risk", "execution", "postgres")
STRATEGIES = ("chaos1", "chaos2")
RECOVER_S = 45.0  # a kill not recovered from within this long is a violation
PROTECT_GRACE_S = 10.0  # an unprotected bracket must get its live stop within this long
FLAT_WITHIN_S = 60.0
MANUAL_EVERY_S = 1.5
TERMINAL = ("COMPLETE", "CANCELLED", "REJECTED")
MANUAL_SYMBOL = "RELIANCE-EQ"
HANDLER_FAILURES = ('"task_failed"', '"request_handler_failed"', "Traceback (most recent call last)")
INVARIANTS = (
    "tag placed twice",
    "broker order without ledger row",
    "ledger row without broker order",
    "fills differ from broker",
    "position differs from fills",
    "broker net differs from ledger",
    "approved order not in ledger",
    "bracket without live stop",
    "not flat after flatten",
    "still working after flatten",
    "service not recovered",
    "service down at the end",
    "handler failure in a log",
    "ip block retry storm",  # --broker kotak: the static-IP episodes
    "ip block without alert",
    "ip block without refusal",
)

CONFIG = """
[feed]
sim_rate = 20.0
record = false

[risk]
max_daily_loss = 1000000000.0
max_orders_per_sec = 50
max_open_positions = 50
max_notional = 100000000.0

[execution]
reconcile_s = 5.0

[[strategy]]
name = "momentum"
id = "chaos1"
[strategy.params]
lookback = 5
entry_pct = 0.03
exit_pct = 0.03
cooldown_ticks = 30
stop_pct = 0.15
target_pct = 0.15
quantity = 2

[[strategy]]
name = "momentum"
id = "chaos2"
[strategy.params]
lookback = 8
entry_pct = 0.05
exit_pct = 0.08
cooldown_ticks = 40
stop_pct = 0.25
target_pct = 0.2
quantity = 3
"""


# --------------------------------------------------------------------------- the broker's book
@dataclass
class BookOrder:
    oid: str
    tag: str
    key: str  # segment|token
    side: str
    quantity: int
    filled: int = 0
    done: bool = False


@dataclass
class Book:
    orders: dict[str, BookOrder] = field(default_factory=dict)
    places: Counter[str] = field(default_factory=Counter)  # client tag → times received
    trades: dict[str, int] = field(default_factory=dict)  # broker order id → filled quantity

    def net(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for o in self.orders.values():
            out[o.key] += o.filled if o.side == "BUY" else -o.filled
        return {k: v for k, v in out.items() if v}

    def working(self) -> list[BookOrder]:
        return [o for o in self.orders.values() if not o.done]


class BookSource(Protocol):
    def read(self) -> Book: ...


class PaperJournal:
    """The paper broker's own book: its append-only JSON-lines journal."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Book:
        book = Book()
        if not self.path.exists():
            return book
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            op = rec.get("op")
            if op == "place":
                book.places[rec["tag"]] += 1
                book.orders[rec["id"]] = BookOrder(rec["id"], rec["tag"], f"{rec['seg']}|{rec['tok']}",
                                                   rec["side"], int(rec["qty"]))  # fmt: skip
            elif op in ("trade", "cancel", "modify") and rec.get("oid") in book.orders:
                o = book.orders[rec["oid"]]
                if op == "trade":
                    o.filled += int(rec["qty"])
                    book.trades[o.oid] = book.trades.get(o.oid, 0) + int(rec["qty"])
                    o.done = o.filled >= o.quantity
                elif op == "cancel":
                    o.done = True
                else:
                    o.quantity = int(rec["qty"])
                    o.done = o.filled >= o.quantity
        return book


# --------------------------------------------------------------------------- the ledger
class Ledger:
    """Read-only queries on execution's PostgreSQL (the embedded server's unix socket)."""

    def __init__(self, pgdata: Path) -> None:
        self.url = f"postgresql://postgres:@/postgres?host={pgdata}"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
            return list(conn.execute(sql).fetchall())

    def orders(self) -> list[dict[str, Any]]:
        cols = ("internal_id", "request_id", "client_tag", "exchange_id", "exchange_segment", "token",
                "transaction_type", "quantity", "status", "filled_qty", "strategy_id", "purpose",
                "bracket_id", "sliced")  # fmt: skip
        rows = self.query(f"SELECT {', '.join(cols)} FROM order_ledger")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def fills(self) -> list[dict[str, Any]]:
        cols = ("order_id", "trade_id", "strategy_id", "exchange_segment", "token", "transaction_type",
                "quantity")  # fmt: skip
        rows = self.query(f"SELECT {', '.join(cols)} FROM fills")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def open_brackets(self) -> list[dict[str, Any]]:
        cols = ("bracket_id", "strategy_id", "trading_symbol", "state", "entry_filled", "exit_filled")
        rows = self.query(f"SELECT {', '.join(cols)} FROM brackets "
                          "WHERE state IN ('PENDING_ENTRY', 'ACTIVE') AND entry_filled > exit_filled")
        return [dict(zip(cols, r, strict=True)) for r in rows]


# --------------------------------------------------------------------------- the stack
@dataclass
class Service:
    name: str  # as in heartbeats: feed, risk, execution, notifier, strategy-<id>
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None


class ChaosStack:
    def __init__(self, config: str = CONFIG, strategies: tuple[str, ...] = STRATEGIES, **env: Any) -> None:
        self.own = OwnHome("neopulse-chaos-")
        self.home = self.own.path
        self.strategies = strategies
        (self.home / "chaos.toml").write_text(config)
        self.env = stack_env(self.home, free_base_port(), NEOPULSE_ENV_FILE=str(self.home / "no.env"),
                             NEOPULSE_CONFIG=str(self.home / "chaos.toml"), **env)  # fmt: skip
        self.cfg: Config = load_config(env=self.env)
        self.bus = Bus(self.cfg)
        self.pgdata = self.home / "pgdata"
        self.services: dict[str, Service] = {
            "execution": Service("execution", ("services.execution",)),
            "risk": Service("risk", ("services.risk",)),
            "feed": Service("feed", ("services.feed",)),
            "notifier": Service("notifier", ("services.notifier",)),
        }
        for sid in strategies:
            self.services[f"strategy-{sid}"] = Service(f"strategy-{sid}", ("services.strategy", "momentum",
                                                                            "--id", sid))  # fmt: skip
        self.beats: dict[str, Heartbeat] = {}
        self._beat_lock = threading.Lock()
        self._stop = threading.Event()
        self.prices: dict[str, float] = {}  # symbol → last price
        self.prices_by_key: dict[str, float] = {}  # segment|token → last price
        self.alerts: list[tuple[float, Alert]] = []  # (time.time(), alert)
        self.ip_degraded_at = 0.0  # time.time() of execution's last heartbeat degraded for the IP
        self.starts: dict[str, list[float]] = defaultdict(list)  # service → time.time() of each start
        self._listener = threading.Thread(target=self._listen, daemon=True)

    # ------------------------------------------------------------ processes
    def spawn(self, name: str) -> None:
        svc = self.services[name]
        svc.proc = spawn(self.home, name, self.env, *svc.args[1:], module=svc.args[0])
        self.starts[name].append(time.time())

    def start(self) -> None:
        self.spawn("execution")
        self._listener.start()
        if self.wait_up("execution", 0, RECOVER_S) is None:
            raise RuntimeError(f"execution did not come up:\n{self.output('execution')}")
        for name in self.services:
            if name != "execution":
                self.spawn(name)
        for name in self.services:
            if self.wait_up(name, 0, RECOVER_S) is None:
                raise RuntimeError(f"{name} did not come up:\n{self.output(name)}")

    def output(self, name: str) -> str:
        path = self.home / f"{name}.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def pid(self, name: str) -> int:
        proc = self.services[name].proc
        return proc.pid if proc is not None else 0

    def kill(self, name: str) -> int:
        """SIGKILL one service and start it again at once; the old pid."""
        svc = self.services[name]
        assert svc.proc is not None
        old = svc.proc.pid
        svc.proc.kill()
        svc.proc.wait(10)
        self.spawn(name)
        return old

    def postmaster(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(int((self.pgdata / "postmaster.pid").read_text().splitlines()[0]))
            return proc if proc.status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None

    def close(self, keep: bool = False) -> None:
        """Stop everything; delete the home unless ``keep`` (its logs explain a failed run)."""
        self._stop.set()
        for svc in self.services.values():
            if svc.proc is not None:
                stop(svc.proc, timeout=5)
        pm = self.postmaster()
        if pm is not None:
            for p in [pm, *pm.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        with contextlib.suppress(RuntimeError):
            self._listener.join(2)
        self.bus.close()
        if not keep:
            self.own.remove()

    # ------------------------------------------------------------ health
    def _listen(self) -> None:
        eps = [self.cfg.bus.endpoint(e) for e in ("feed_pub", "risk_pub", "execution_pub", "notifier_pub")]
        eps += [f"ipc://{self.home}/run/strategy-{sid}.pub" for sid in self.strategies]
        sub = self.bus.subscriber(eps, [b"hb.", b"tick.", b"alert."])
        master = MasterData.load()
        names: dict[tuple[str, str], str] = {}
        try:
            while not self._stop.is_set():
                got = sub.recv(200)
                if got is None:
                    continue
                msg = got[1]
                if isinstance(msg, Heartbeat):
                    with self._beat_lock:
                        self.beats[msg.service] = msg
                    if msg.service == "execution" and msg.state == "degraded" and "IP" in msg.reason:
                        self.ip_degraded_at = time.time()
                elif isinstance(msg, Tick):
                    key = (msg.segment, msg.token)
                    if key not in names:
                        inst = master.get(msg.segment, msg.token)
                        names[key] = inst.symbol if inst is not None else ""
                    self.prices[names[key]] = msg.ltp
                    self.prices_by_key[f"{msg.segment}|{msg.token}"] = msg.ltp
                elif isinstance(msg, Alert):
                    self.alerts.append((time.time(), msg))
        finally:
            sub.close()

    def ask(self, endpoint: str, msg: Any, timeout_ms: int = 1000) -> Any:
        client = self.bus.client(self.cfg.bus.endpoint(endpoint), timeout_ms)
        present_credential(client, self.cfg, self.home)
        try:
            return client.request(msg)
        finally:
            client.close()

    def is_up(self, name: str, pid: int) -> bool:
        """``name`` runs as ``pid`` (any pid when 0), says it is healthy in its heartbeat, and
        answers a request when it serves any."""
        svc = self.services[name]
        if svc.proc is None or svc.proc.poll() is not None:
            return False
        with self._beat_lock:
            beat = self.beats.get(name)
        if beat is None or (pid and beat.pid != pid):
            return False
        # degraded for the broker's IP block is up and refusing as it should; for the ledger, not
        if beat.state != "ok" and (beat.state != "degraded" or beat.reason.startswith("ledger")):
            return False
        if name in ("feed", "risk", "execution"):
            try:
                reply = self.ask(f"{name}_rep", GetStatus(), 500)
            except RequestTimeout:
                return False
            return isinstance(reply, Reply) and reply.ok
        return True

    def wait_up(self, name: str, pid: int, timeout: float) -> float | None:
        """Seconds until ``name`` is up (as ``pid``), or None after ``timeout``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            svc = self.services[name]
            if svc.proc is not None and svc.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {svc.proc.returncode} while starting:\n"
                                   f"{self.output(name)}")
            if self.is_up(name, pid or self.pid(name)):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def ledger_restarts(self) -> int:
        """How often this execution process restarted its embedded PostgreSQL (-1: no answer)."""
        try:
            reply = self.ask("execution_rep", GetStatus(), 500)
        except RequestTimeout:
            return -1
        return int(reply.data.get("ledger_restarts", 0)) if isinstance(reply, Reply) and reply.ok else -1

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.admin.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip


# --------------------------------------------------------------------------- a manual trader
class ManualTrader(threading.Thread):
    """Sends a bracketed manual BUY or SELL through risk every ``MANUAL_EVERY_S``, as the CLI's
    ``neopulse trade`` does, and remembers every approval."""

    def __init__(self, stack: ChaosStack, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.rng = random.Random(rng.random())
        self.approved: dict[str, str] = {}  # request id → order id
        self.refused: Counter[str] = Counter()
        self.refusals: list[tuple[float, str, str]] = []  # (time.time(), code, reason)
        self.unanswered = 0
        self.halt = threading.Event()
        inst = MasterData.load().resolve(MANUAL_SYMBOL)
        self.tick = inst.tick_size

    def _snap(self, price: float, rounding: str) -> Decimal:
        return (Decimal(str(price)) / self.tick).quantize(Decimal(1), rounding=rounding) * self.tick

    def run(self) -> None:
        bus = Bus(self.stack.cfg)
        try:
            while not self.halt.wait(MANUAL_EVERY_S):
                ltp = self.stack.prices.get(MANUAL_SYMBOL)
                if not ltp:
                    continue
                side = self.rng.choice(("BUY", "SELL"))
                down, up = self._snap(ltp * 0.997, ROUND_FLOOR), self._snap(ltp * 1.003, ROUND_CEILING)
                sl, target = (down, up) if side == "BUY" else (up, down)
                req = OrderRequest(request_id=f"cli-{uuid.uuid4().hex[:16]}", strategy_id="manual", side=side,
                                   symbol=MANUAL_SYMBOL, quantity=1, stop_loss=sl, target=target,
                                   product="MIS", purpose="MANUAL")  # fmt: skip
                client = bus.client(self.stack.cfg.bus.endpoint("risk_rep"), 6000)
                present_credential(client, self.stack.cfg, self.stack.home)
                try:
                    verdict = client.request(req)
                except RequestTimeout:
                    self.unanswered += 1
                    continue
                finally:
                    client.close()
                if isinstance(verdict, RiskVerdict) and verdict.approved:
                    self.approved[req.request_id] = verdict.order_id
                else:
                    ours = isinstance(verdict, RiskVerdict)
                    code = verdict.code if ours else getattr(verdict, "code", "?")
                    reason = verdict.reason if ours else getattr(verdict, "error", "")
                    self.refused[code or "?"] += 1
                    self.refusals.append((time.time(), code or "?", reason))
        finally:
            bus.close()


# --------------------------------------------------------------------------- the run
@dataclass
class Report:
    seed: int
    kills: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    violations: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    orders: int = 0
    fills: int = 0
    approved_manual: int = 0
    refused_manual: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    protect_checks: int = 0
    protect_skipped: int = 0  # --broker kotak: checks skipped while the broker refused every order
    broker: str = "paper"
    faults: dict[str, int] = field(default_factory=dict)  # --broker kotak: what was injected
    home: str = ""  # kept for a failed run (or with --keep): its logs and the ledger's pgdata

    def violate(self, what: str, detail: str) -> None:
        assert what in INVARIANTS, what
        self.violations[what] += 1
        if len(self.samples) < 40:
            self.samples.append(f"{what}: {detail}")

    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        lines = [f"{'target':12s} {'kills':>6s} {'recovery mean s':>16s} {'max s':>8s}"]
        for t in TARGETS:
            rec = self.recovery.get(t, [])
            mean = f"{sum(rec) / len(rec):.2f}" if rec else "-"
            top = f"{max(rec):.2f}" if rec else "-"
            lines.append(f"{t:12s} {self.kills[t]:6d} {mean:>16s} {top:>8s}")
        lines.append(f"{'total':12s} {sum(self.kills.values()):6d}")
        lines.append(f"orders {self.orders}, fills {self.fills}, manual approved {self.approved_manual}, "
                     f"manual refused {dict(self.refused_manual)}, "
                     f"protection checks {self.protect_checks} "
                     f"(skipped during IP blocks {self.protect_skipped})")  # fmt: skip
        if self.faults:
            lines.append("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        lines.append("invariant                              violations")
        lines.extend(f"  {name:36s} {self.violations[name]:6d}" for name in INVARIANTS)
        lines.extend(f"  ! {s}" for s in self.samples)
        return "\n".join(lines)


def protection_gaps(orders: list[dict[str, Any]], book: Book) -> dict[str, str]:
    """What is unprotected, or over-protected, at the broker right now: ``{where: what}``.

    Exposure comes from the broker's own book, not from the ledger's bracket states: per
    bracket, the fills of its entry at the broker minus the fills of its legs, capped by the
    strategy's net position at the broker in that direction (an exit or a flatten may have
    closed it). The ledger only says which broker order belongs to which strategy and bracket
    (by client tag, written before the order reached the broker). Each strategy's live stops
    on an instrument must cover that exposure, and must not exceed its position there (a stop
    larger than the position would open a reverse one)."""
    by_tag = {o.tag: o for o in book.orders.values()}
    net: dict[tuple[str, str], int] = defaultdict(int)  # (strategy, instrument) at the broker
    entry: dict[str, int] = defaultdict(int)
    legs: dict[str, int] = defaultdict(int)
    live: dict[str, int] = defaultdict(int)
    where: dict[str, tuple[str, str, str]] = {}  # bracket → (strategy, instrument, entry side)
    for o in orders:
        b = by_tag.get(o["client_tag"])
        if b is None:
            continue
        net[(o["strategy_id"], b.key)] += b.filled if b.side == "BUY" else -b.filled
        if o["bracket_id"] is None:
            continue
        bid = str(o["bracket_id"])
        if o["purpose"] in ("STOP", "TARGET"):
            legs[bid] += b.filled
            if o["purpose"] == "STOP" and not b.done:
                live[bid] += b.quantity - b.filled
        else:  # the entry, or one slice of it
            entry[bid] += b.filled
            where[bid] = (o["strategy_id"], b.key, b.side)
    need: dict[tuple[str, str, str], int] = defaultdict(int)
    have: dict[tuple[str, str, str], int] = defaultdict(int)
    for bid, at in where.items():
        need[at] += max(0, entry[bid] - legs[bid])
        have[at] += live[bid]
    gaps: dict[str, str] = {}
    for at in set(need) | set(have):
        sid, key, side = at
        held = max(0, net[(sid, key)] if side == "BUY" else -net[(sid, key)])
        want = min(need[at], held)
        if have[at] < want:
            gaps[f"{sid} {key} {side}"] = (f"position {held} at the broker, bracketed {want}, "
                                           f"live stop {have[at]}")  # fmt: skip
        elif have[at] > held:
            gaps[f"{sid} {key} {side} oversize"] = f"live stop {have[at]} > position {held} at the broker"
    return gaps


def explain_gap(orders: list[dict[str, Any]], book: Book, at: str) -> str:
    """The brackets behind a gap at ``at`` (``strategy key side``), each as the ledger and the
    broker see its entry and legs, so a violation can be traced without re-running."""
    sid, key, side = at.split()[:3]
    by_tag = {o.tag: o for o in book.orders.values()}
    rows: dict[str, list[str]] = defaultdict(list)
    exposed: dict[str, int] = defaultdict(int)  # bracket → entry fills - leg fills at the broker
    entries = {str(o["bracket_id"]) for o in orders if o["bracket_id"] is not None
               and o["purpose"] not in ("STOP", "TARGET") and o["strategy_id"] == sid
               and f"{o['exchange_segment']}|{o['token']}" == key
               and o["transaction_type"] == side}  # fmt: skip
    for o in orders:
        bid = str(o["bracket_id"]) if o["bracket_id"] is not None else ""
        if bid not in entries:
            continue
        b = by_tag.get(o["client_tag"])
        seen = "absent" if b is None else f"{'done' if b.done else 'live'} {b.filled}/{b.quantity}"
        if b is not None:
            exposed[bid] += -b.filled if o["purpose"] in ("STOP", "TARGET") else b.filled
        rows[bid].append(f"{o['purpose'] or 'ENTRY'} {o['status']} {o['filled_qty']}/{o['quantity']} "
                         f"(broker {seen})")  # fmt: skip
    shown = [f"[{bid[:8]}: {', '.join(v)}]" for bid, v in rows.items() if exposed[bid] > 0]
    return "; ".join(shown)


def check_protection(stack: ChaosStack, ledger: Ledger, journal: BookSource, report: Report,
                     refusing: Any = None, after: str = "") -> None:  # fmt: skip
    """``protection_gaps`` is empty, or each gap closes within ``PROTECT_GRACE_S`` (an entry
    may have filled a moment ago; a closed position's stop is being cancelled). Skipped while
    ``refusing()`` says the broker refuses every order (a static-IP episode)."""
    if refusing is not None and refusing():
        report.protect_skipped += 1
        return
    report.protect_checks += 1
    deadline = time.monotonic() + PROTECT_GRACE_S
    suspects: dict[str, str] | None = None
    while True:
        try:  # the server (or the fake) may be restarting or busy: try again until the deadline
            book = journal.read()
            orders = ledger.orders()  # after the book: a ledger row precedes its broker order
        except Exception as exc:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            report.violate("bracket without live stop", f"could not check: {type(exc).__name__}: {exc}")
            return
        now_bad = protection_gaps(orders, book)
        suspects = now_bad if suspects is None else {k: now_bad[k] for k in suspects if k in now_bad}
        if not suspects:
            return
        if time.monotonic() >= deadline:
            for at, what in suspects.items():
                why = explain_gap(orders, book, at)
                report.violate("bracket without live stop", f"{at}: {what}{after} {why}")
            return
        time.sleep(0.2)


def final_checks(stack: ChaosStack, ledger: Ledger, journal: BookSource, trader: ManualTrader,
                 report: Report) -> None:  # fmt: skip
    book = journal.read()  # first: a ledger row is written before its order reaches the broker
    orders = ledger.orders()
    fills = ledger.fills()
    report.orders, report.fills = len(orders), len(fills)
    for tag, n in book.places.items():
        if n > 1:
            report.violate("tag placed twice", f"{tag} x{n}")
    by_tag = {o["client_tag"]: o for o in orders}
    by_oid = {o.oid: o for o in book.orders.values()}
    for o in book.orders.values():
        row = by_tag.get(o.tag)
        if row is None:
            report.violate("broker order without ledger row", f"{o.oid} tag {o.tag}")
        elif row["exchange_id"] != o.oid:
            report.violate("broker order without ledger row", f"{o.tag}: ledger says {row['exchange_id']}, "
                           f"broker {o.oid}")  # fmt: skip
    for row in orders:
        if row["exchange_id"] and row["exchange_id"] not in by_oid:
            report.violate("ledger row without broker order",
                           f"{row['client_tag']} claims {row['exchange_id']}")  # fmt: skip
    filled: dict[str, int] = defaultdict(int)
    for f in fills:
        filled[str(f["order_id"])] += f["quantity"]
    for row in orders:
        broker = book.trades.get(row["exchange_id"] or "", 0)
        mine = filled.get(str(row["internal_id"]), 0)
        if broker != mine or row["filled_qty"] != mine:
            report.violate("fills differ from broker", f"{row['client_tag']}: broker {broker}, ledger fills "
                           f"{mine}, row filled_qty {row['filled_qty']}")  # fmt: skip
    net: dict[tuple[str, str], int] = defaultdict(int)
    per_key: dict[str, int] = defaultdict(int)
    for f in fills:
        q = f["quantity"] if f["transaction_type"] == "BUY" else -f["quantity"]
        net[(f["strategy_id"], f"{f['exchange_segment']}|{f['token']}")] += q
        per_key[f"{f['exchange_segment']}|{f['token']}"] += q
    reply = stack.ask("execution_rep", GetPositions(), 5000)
    held = {(p["strategy_id"], f"{p['segment']}|{p['token']}"): p["quantity"]
            for p in (reply.data if isinstance(reply, Reply) and reply.ok else [])}  # fmt: skip
    for k in set(net) | set(held):
        if net.get(k, 0) != held.get(k, 0):
            report.violate("position differs from fills",
                           f"{k}: execution {held.get(k, 0)}, fills {net.get(k, 0)}")  # fmt: skip
    per_key = {k: v for k, v in per_key.items() if v}
    if per_key != book.net():
        report.violate("broker net differs from ledger", f"ledger {per_key}, broker {book.net()}")
    for rid, oid in trader.approved.items():
        row = next((o for o in orders if o["request_id"] == rid), None)
        if row is None or str(row["internal_id"]) != oid:
            report.violate("approved order not in ledger", f"{rid} → {oid}")
    if any(held.values()) or per_key or book.net():
        report.violate("not flat after flatten", f"positions {({k: v for k, v in held.items() if v})}, "
                       f"broker {book.net()}")  # fmt: skip
    working = [o for o in orders if o["status"] not in TERMINAL and not o["sliced"]]
    if working or book.working():
        report.violate("still working after flatten", f"ledger {[o['client_tag'] for o in working][:5]}, "
                       f"broker {[o.tag for o in book.working()][:5]}")  # fmt: skip
    for name in stack.services:
        if not stack.is_up(name, 0):
            report.violate("service down at the end", name)
    for log in sorted((stack.home / "log").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(m in line for m in HANDLER_FAILURES):
                report.violate("handler failure in a log", f"{log.name}: {line[:300]}")


def _settle_flat(stack: ChaosStack, ledger: Ledger, journal: BookSource) -> None:
    """Wait until the broker's book and the ledger say flat and idle (or the deadline passes)."""
    deadline = time.monotonic() + FLAT_WITHIN_S
    while time.monotonic() < deadline:
        book = journal.read()
        with contextlib.suppress(Exception):
            working = [o for o in ledger.orders() if o["status"] not in TERMINAL and not o["sliced"]]
            if not book.working() and not book.net() and not working:
                return
        time.sleep(0.5)


def run(kills: int = 100, seconds: float = 420.0, seed: int | None = None, log: Any = print,
        keep: bool = False, broker: str = "paper", fault_rate: float = 0.2) -> Report:  # fmt: skip
    """One chaos run: ``broker`` "paper" (the paper broker's journal is the broker's book) or
    "kotak" (the real SDK against the Kotak REST fake, with faults at ``fault_rate`` per second;
    see ``tests.chaos_kotak``)."""
    seed = int.from_bytes(os.urandom(3), "big") if seed is None else seed
    rng = random.Random(seed)
    report = Report(seed=seed, broker=broker)
    t_start = time.monotonic()
    kotak: Any = None
    fake_home: OwnHome | None = None
    threads: list[Any] = []
    if broker == "kotak":
        from tests import chaos_kotak as kotak

        fake_home = OwnHome("neopulse-kotak-fake-")
        fake = kotak.start_fake(fake_home.path)
        stack = ChaosStack(kotak.CONFIG, kotak.STRATEGIES, **kotak.kotak_env(fake))
    else:
        stack = ChaosStack()
    try:
        stack.start()
        ledger = Ledger(stack.pgdata)
        book: BookSource = PaperJournal(stack.home / "run" / "paper-book.jsonl")
        if kotak is not None:
            book = kotak.FakeBook(fake)
            faults = kotak.Faults()
            exchange = kotak.Exchange(fake, stack.prices_by_key, random.Random(rng.random()), fault_rate,
                                      faults)  # fmt: skip
            injector = kotak.Injector(fake, random.Random(rng.random()), fault_rate, faults)
            threads = [exchange, injector]
            for t in threads:
                t.start()
        trader = ManualTrader(stack, rng)
        trader.start()
        t0 = time.monotonic()
        gap = seconds / max(kills, 1)
        for i in range(kills):
            time.sleep(max(0.0, t0 + gap * (i + rng.uniform(0.3, 1.0)) - time.monotonic()))
            target = rng.choice(TARGETS)
            report.kills[target] += 1
            t_kill = time.monotonic()
            if target == "postgres":
                pm = stack.postmaster()
                if pm is None:
                    report.violate("service not recovered", "no postmaster to kill")
                    continue
                restarts = stack.ledger_restarts()
                pm.kill()
                took = _wait_postgres(stack, pm.pid, restarts, t_kill)
                name = "execution"
            else:
                name = target if target != "strategy" else f"strategy-{rng.choice(stack.strategies)}"
                stack.kill(name)
                took = stack.wait_up(name, stack.pid(name), RECOVER_S)
            if took is None:
                report.violate("service not recovered", f"{target} ({name}) kill {i + 1}")
                continue
            took = time.monotonic() - t_kill
            report.recovery[target].append(took)
            _say(log, f"kill {i + 1:3d}/{kills}: {target:9s} {name:18s} back in {took:5.2f} s")
            refusing = (lambda: injector.refusing(stack.ip_degraded_at)) if kotak is not None else None
            check_protection(stack, ledger, book, report, refusing, f" (after kill {i + 1}, {target})")
        _say(log, "kills done: stopping the manual trader" + (" and the faults" if threads else ""))
        trader.halt.set()
        trader.join(10)
        if kotak is not None:
            injector.halt.set()
            injector.join(10)
            fake.clear_faults()  # held-back trades appear, no fault is left armed
        report.approved_manual, report.refused_manual = len(trader.approved), trader.refused
        for name in stack.services:  # the last kill may have just recovered: every service answers
            if stack.wait_up(name, 0, RECOVER_S) is None:
                report.violate("service down at the end", f"{name} before the kill switch")
        _say(log, "every service up: kill switch on, then flatten")
        on = stack.cli("kill-switch", "on", "--reason", "chaos run ends")
        if on.returncode != 0:
            report.samples.append(f"kill on exited {on.returncode}: {on.stderr.strip()[:200]}")
        flat = stack.cli("flatten", "--yes", timeout=120)
        if flat.returncode != 0:
            said = (flat.stderr.strip() or flat.stdout.strip())[-600:]
            report.samples.append(f"flatten exited {flat.returncode}: {said}")
        _say(log, f"flatten exited {flat.returncode}: waiting for the book to settle")
        _settle_flat(stack, ledger, book)
        _say(log, "checking the invariants")
        final_checks(stack, ledger, book, trader, report)
        if kotak is not None:
            for what, detail in kotak.check_episodes(fake, faults, stack.alerts, trader.refusals,
                                                     stack.starts["execution"]):  # fmt: skip
                report.violate(what, detail)
            report.faults = dict(faults.injected)
            report.faults["exchange fills"] = faults.fills
            report.faults["ip episodes"] = len(faults.episodes)
        return report
    finally:
        for t in threads:
            t.halt.set()
        report.seconds = time.monotonic() - t_start
        keep = keep or not report.ok() or sys.exc_info()[0] is not None
        stack.close(keep=keep)
        if keep:
            report.home = str(stack.home)
        if kotak is not None:
            fake.stop()
            if fake_home is not None and not keep:
                fake_home.remove()


def _say(log: Any, text: str) -> None:
    if log is not None:
        log(text)


def _wait_postgres(stack: ChaosStack, old_pid: int, restarts: int, t_kill: float) -> float | None:
    """Until execution has started a new postmaster itself and says its ledger is healthy."""
    while time.monotonic() - t_kill < RECOVER_S:
        pm = stack.postmaster()
        if (pm is not None and pm.pid != old_pid and stack.ledger_restarts() > restarts
                and stack.is_up("execution", 0)):  # fmt: skip
            return time.monotonic() - t_kill
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="how many SIGKILLs (default 100)")
    ap.add_argument("--seconds", type=float, default=420.0,
                    help="spread the kills over about this long (default 420)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=None, help="replay a run (printed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the stack's home (always kept on failure)")
    ap.add_argument("--broker", choices=("paper", "kotak"), default="paper",
                    help="paper, or the real Kotak SDK against the Kotak REST fake with faults")  # fmt: skip
    ap.add_argument("--fault-rate", type=float, default=0.2,
                    help="--broker kotak: faults armed per second (default 0.2)")  # fmt: skip
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args.kills, args.seconds, args.seed, keep=args.keep, broker=args.broker,
                 fault_rate=args.fault_rate)  # fmt: skip
    print(report.table())
    if report.home:
        print(f"logs, journal and pgdata kept in {report.home}")
    print(f"{sum(report.kills.values())} kills in {report.seconds:.0f} s, seed {report.seed}: "
          f"{'ok' if report.ok() else 'FAILED'}")  # fmt: skip
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
