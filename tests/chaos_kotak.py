"""The Kotak side of ``tests.chaos --broker kotak``: execution runs the real SDK against the
Kotak REST fake, the harness plays the exchange (fills by the sim feed's prices) and injects
the faults a trading day at Kotak brings, at ``--fault-rate`` per second:

* place timeouts (the order is placed, the reply comes after execution's broker timeout) and
  lost places (a late 504, nothing placed);
* 503 and 429 on the order book and the trade book;
* status before trade (the order row says complete, the trade book shows it two polls later);
* rejection after acknowledgement;
* an empty "No Data" order or trade book while the orders really stay live;
* session expiry;
* episodes of the static-IP errors 100008 (IP not whitelisted) and 1037 (session IP mismatch),
  each lifted after a few seconds as an operator would.

The broker's own book is the fake's control view (``/_control/orders`` and ``/trades``).
For each IP episode the run also checks: no retry storm (refused order calls stay bounded),
a CRITICAL ``broker_ip_blocked`` alert, and new orders refused with that reason.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.fakes.kotak_rest import KotakRestFake, default_instruments, scrip_master_csv

if TYPE_CHECKING:
    from tests.chaos import Book

BROKER_TIMEOUT_S = 2.0
LIVE = frozenset({"open", "trigger pending", "open pending", "validation pending", "put order req received",
                  "partially filled"})  # fmt: skip
IP_CODES = (100008, 1037)
IP_EPISODE_S = ((4.0, 8.0), (70.0, 100.0))  # how long an operator takes: quickly, or past two probes
PROBE_S = 30.0
PROTECT_AFTER_IP_S = 15.0  # once execution accepts orders again, waiting legs go at once
LATE_S = 1.0  # an order call arriving this long after the first IP refusal was sent after it was known

CONFIG = """
[feed]
sim_rate = 10.0
record = false

[risk]
max_daily_loss = 1000000000.0
max_orders_per_sec = 50
max_open_positions = 50
max_notional = 100000000.0

[[strategy]]
name = "momentum"
id = "chaos1"
[strategy.params]
lookback = 8
entry_pct = 0.05
exit_pct = 0.08
cooldown_ticks = 40
stop_pct = 0.2
target_pct = 0.2
quantity = 2
"""
STRATEGIES = ("chaos1",)


def kotak_env(fake: KotakRestFake) -> dict[str, str]:
    """The Kotak-fault integration tests' environment, with this run's broker timeout."""
    from tests.integration.test_execution_kotak_faults import kotak_env as faults_env

    return {**faults_env(fake), "NEOPULSE_EXECUTION__BROKER_TIMEOUT_S": str(BROKER_TIMEOUT_S)}


class FakeBook:
    """The broker's own book: the fake's control view, never subject to an injected fault."""

    def __init__(self, fake: KotakRestFake) -> None:
        self.fake = fake

    def read(self) -> Book:
        from tests.chaos import Book, BookOrder

        book = Book()
        for row in self.fake.orders():
            oid, tag = str(row["nOrdNo"]), str(row["GuiOrdId"])
            book.places[tag] += 1
            book.orders[oid] = BookOrder(oid, tag, f"{row['exSeg']}|{row['tok']}",
                                         "BUY" if row["trnsTp"] == "B" else "SELL", int(row["qty"]),
                                         int(row["fldQty"]), row["ordSt"] not in LIVE)  # fmt: skip
        for t in self.fake.trades():
            oid = str(t["nOrdNo"])
            book.trades[oid] = book.trades.get(oid, 0) + int(t["fldQty"])
        return book


@dataclass
class Episode:
    code: int
    start: float  # time.time()
    end: float = 0.0


@dataclass
class Faults:
    injected: Counter[str] = field(default_factory=Counter)
    episodes: list[Episode] = field(default_factory=list)
    fills: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # control calls that failed (fake busy)


class Exchange(threading.Thread):
    """Fills the fake's live orders by the sim feed's last prices (a limit when the market
    reaches it, a stop-limit once triggered), sometimes with the trade reported late."""

    def __init__(self, fake: KotakRestFake, prices: dict[str, float], rng: random.Random, fault_rate: float,
                 faults: Faults) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.fake, self.prices, self.rng, self.rate, self.faults = fake, prices, rng, fault_rate, faults
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                rows = self.fake.orders()
            except Exception as exc:
                self.faults.errors[type(exc).__name__] += 1
                continue
            for row in rows:
                if row["ordSt"] not in ("open", "trigger pending"):
                    continue
                ltp = self.prices.get(f"{row['exSeg']}|{row['tok']}")
                if not ltp:
                    continue
                buy = row["trnsTp"] == "B"
                limit = Decimal(str(row["prc"]))
                if row["ordSt"] == "trigger pending":
                    trigger = Decimal(str(row["trgPrc"]))
                    if not (ltp >= trigger if buy else ltp <= trigger):
                        continue
                elif not (limit >= Decimal(str(ltp)) if buy else limit <= Decimal(str(ltp))):
                    continue
                late = self.rng.random() < self.rate
                try:
                    self.fake.fill(str(row["nOrdNo"]), price=limit, trade_after_polls=2 if late else 0)
                except Exception as exc:
                    self.faults.errors[type(exc).__name__] += 1
                    continue
                self.faults.fills += 1
                if late:
                    self.faults.injected["status before trade"] += 1


class Injector(threading.Thread):
    """Arms one fault at the fake now and then (``fault_rate`` per second), and runs IP
    episodes: the block is armed, then lifted after ``IP_EPISODE_S``."""

    KINDS = ("place timeout", "place lost", "order book 503", "trade book 429", "reject after ack",
             "empty order book", "empty trade book", "session expiry", "ip block")  # fmt: skip

    def __init__(self, fake: KotakRestFake, rng: random.Random, fault_rate: float, faults: Faults) -> None:
        super().__init__(daemon=True)
        self.fake, self.rng, self.rate, self.faults = fake, rng, fault_rate, faults
        self.halt = threading.Event()
        self._ep_lock = threading.Lock()
        self._ip_until = 0.0
        self._next_ip = time.monotonic() + 15.0  # episodes at least a probe interval apart

    def run(self) -> None:
        while not self.halt.wait(1.0):
            try:
                self._step()
            except Exception as exc:
                self.faults.errors[type(exc).__name__] += 1
        self.lift()

    def _step(self) -> None:
        now = time.monotonic()
        if self._ip_until and now >= self._ip_until:
            self.lift()
        if self.rng.random() >= self.rate:
            return
        kind = self.rng.choice(self.KINDS)
        if kind == "ip block":
            if self._ip_until or now < self._next_ip:
                return
            code = self.rng.choice(IP_CODES)
            with self._ep_lock:
                self.faults.episodes.append(Episode(code, time.time()))
            self.fake.ip_block(code)
            self._ip_until = now + self.rng.uniform(*self.rng.choice(IP_EPISODE_S))
            self._next_ip = self._ip_until + PROBE_S * 2
        elif kind == "place timeout":
            self.fake.hang_next_place(BROKER_TIMEOUT_S + 1.5)
        elif kind == "place lost":
            self.fake.hang_next_place(BROKER_TIMEOUT_S + 1.5, placed=False)
        elif kind == "order book 503":
            self.fake.fail_next("order_book", 503, "<html>503 Service Unavailable</html>")
        elif kind == "trade book 429":
            self.fake.fail_next("trade_book", 429, {"stat": "Not_Ok", "emsg": "Too many requests"})
        elif kind == "reject after ack":
            self.fake.reject_next_place("RMS:Margin Exceeds", delay_s=0.2)
        elif kind == "empty order book":
            self.fake.empty_books(order_book=1)
        elif kind == "empty trade book":
            self.fake.empty_books(order_book=0, trade_book=1)
        else:
            self.fake.expire_session()
        self.faults.injected[kind] += 1

    def refusing(self, ip_degraded_at: float) -> bool:
        """True while an IP episode runs, and while execution still says it is blocked (its
        probe notices the end only at its next step) plus ``PROTECT_AFTER_IP_S``: the broker
        refuses every order meanwhile, so no stop can be placed, which the CRITICAL alert
        tells the trader. ``ip_degraded_at``: the last heartbeat execution sent degraded for
        the IP (time.time())."""
        with self._ep_lock:
            last = self.faults.episodes[-1] if self.faults.episodes else None
        active = last is not None and not last.end
        return active or time.time() - ip_degraded_at < PROTECT_AFTER_IP_S

    def lift(self) -> None:
        """End a running IP episode (the operator fixed the whitelist)."""
        if self._ip_until:
            for attempt in range(5):  # a busy fake must not leave the block armed for the rest
                try:
                    self.fake.ip_block(None)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(1.0)
            self.faults.episodes[-1].end = time.time()
            self.faults.injected["ip block"] += 1
            self._ip_until = 0.0


ORDER_APIS = frozenset({"place_order", "modify_order", "cancel_order"})


def check_episodes(fake: KotakRestFake, faults: Faults, alerts: list[tuple[float, Any]],
                   refusals: list[tuple[float, str, str]],
                   starts: list[float]) -> list[tuple[str, str]]:  # fmt: skip
    """Violations of the static-IP promise, per episode: ``(invariant, detail)``.

    Storm: after the first IP refusal of a run (calls already in flight then are refused too),
    an order call (place, modify or cancel) refused for the IP must follow a login (a probe) or
    a restart of execution.
    Each episode that refused an order call must have raised a CRITICAL ``broker_ip_blocked``
    alert (one per execution process) and refused a new order naming the IP. An episode's
    window ends at the next episode's start, so one episode's evidence never counts for another."""
    out: list[tuple[str, str]] = []
    reqs = fake.requests()
    logins = [r["ts"] for r in reqs if r["api"] == "totp_login"]
    for i, ep in enumerate(faults.episodes):
        nxt = faults.episodes[i + 1].start if i + 1 < len(faults.episodes) else float("inf")
        window = (ep.start, min((ep.end or time.time()) + PROBE_S * 4 + 5, nxt))
        refused = sorted(r["ts"] for r in reqs if r.get("fault") == "ip_block" and r["api"] in ORDER_APIS
                         and window[0] <= r["ts"] < window[1])  # fmt: skip
        if not refused:
            continue  # no order call while blocked: nothing to notice
        markers = sorted(t for t in [*logins, *starts] if window[0] <= t < window[1])
        worst, first, prev = 0, refused[0], window[0]
        late = 0  # refused calls sent after the block was known, since the last login or restart
        for t in refused:
            if any(prev < m <= t for m in markers):
                first, late = t, 0
            elif t - first > LATE_S:
                late += 1
            worst, prev = max(worst, late), t
        if worst:
            out.append(("ip block retry storm", f"{ep.code}: {worst} IP-refused order calls sent after "
                        "the block was known, without a login or restart between"))  # fmt: skip
        restarts = sum(1 for t in starts if window[0] <= t < window[1])
        crit = [a for t, a in alerts if window[0] <= t < window[1] and a.code == "broker_ip_blocked"
                and a.level == "CRITICAL"]  # fmt: skip
        if not crit:
            when = time.strftime("%X", time.gmtime(ep.start))
            out.append(("ip block without alert", f"{ep.code} at {when} UTC"))
        elif len(crit) > 1 + restarts:
            out.append(("ip block retry storm",
                        f"{ep.code}: {len(crit)} CRITICAL alerts, {restarts} restarts"))  # fmt: skip
        said = [r for t, code, r in refusals if window[0] <= t < window[1] and "IP" in r]
        if not said:
            out.append(("ip block without refusal", f"{ep.code}: no order refused naming the IP"))
    return out


def start_fake(directory: Path) -> KotakRestFake:
    """The fake, listing the stack's instruments as the stack's master has them: in production
    the master is the broker's own (``neopulse sync-master``), so tick sizes agree. (With the
    fake's own ticks, 0.10 for RELIANCE and HDFCBANK against the sample master's 0.05, the
    broker rejected stops priced on a 0.05 tick and the run counted that as unprotected.)"""
    from libs.common.instruments import MasterData

    master = MasterData.load()
    listed = []
    for inst in default_instruments():
        if inst.segment != "nse_cm":
            continue
        ours = master.get(inst.segment, inst.token)
        tick = ours.tick_size * 100 if ours is not None else inst.tick_paise
        listed.append(dataclasses.replace(inst, tick_paise=tick))
    csv_path = directory / "nse_cm.csv"
    csv_path.write_text(scrip_master_csv(listed), encoding="utf-8")
    fake = KotakRestFake(directory / "kotak.json", extra_args=["--master-csv", f"nse_cm={csv_path}"]).start()
    fake.control_timeout_s = 30.0  # the fake rewrites its whole book per change: slow under load
    return fake
