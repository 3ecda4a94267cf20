"""The execution service as a real process: real sockets, real PostgreSQL (one database per
stack), a stand-in feed publishing real ``Tick``s, and the real ``neopulse`` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import zmq

from libs.common.bus import Bus, RequestTimeout, topic
from libs.common.config import load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    CancelEntries,
    Codec,
    ExecuteOrder,
    GetDayState,
    GetFeedSession,
    GetOrders,
    GetPositions,
    GetStatus,
    Message,
    OrderUpdate,
    RecordRiskEvent,
    Reply,
    Subscribe,
    SyncMaster,
    Tick,
)
from tests.helpers import eventually, free_base_port, stack_env
from tests.integration.conftest import cloned_db
from tests.kit import execute_order, processes

ROOT = Path(__file__).resolve().parents[2]
MASTER = MasterData.load()
_SCRIPT = Path(sys.executable).parent / "neopulse"
NEOPULSE = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from services.admin.cli import main; main()"]
)


class FakeFeed:
    """Binds the feed's PUB endpoint and republishes the current quote of each instrument."""

    def __init__(self, bus: Bus, endpoint: str, quotes: dict[str, float]) -> None:
        self.pub = bus.publisher(endpoint)
        self.quotes = dict(quotes)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def set(self, symbol: str, ltp: float) -> None:
        with self.lock:
            self.quotes[symbol] = ltp

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self.lock:
                quotes = list(self.quotes.items())
            for sym, ltp in quotes:
                inst = MASTER.resolve(sym)
                self.pub.publish(
                    topic("tick", inst.segment, inst.token),
                    Tick(
                        segment=inst.segment,
                        token=inst.token,
                        ltp=ltp,
                        bid=round(ltp - 0.1, 2),
                        ask=round(ltp + 0.1, 2),
                        bid_qty=1000,
                        ask_qty=1000,
                        symbol=sym,
                    ),
                )

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.pub.close()


class ExecStack:
    """One NEOPULSE_HOME, one base port, one ledger database; execution run as a process."""

    def __init__(self, home: Path, pg_url: str, quotes: dict[str, float] | None = None, **env: Any) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = stack_env(
            home,
            free_base_port(),
            NEOPULSE_ENV_FILE=str(home / "no.env"),
            NEOPULSE_DATABASE__URL=pg_url,
            **env,
        )
        self.cfg = load_config(env=self.env)
        self.bus = Bus(self.cfg)
        self.feed = FakeFeed(
            self.bus,
            self.cfg.bus.endpoint("feed_pub"),
            quotes or {"RELIANCE-EQ": 1290.0, "INFY-EQ": 1510.0, "TCS-EQ": 3100.0},
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = 0

    def start(self, *args: str, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        self.proc = processes.spawn(self.home, "execution", {**self.env, **env}, *args)
        if wait:
            eventually(self._ready, timeout=30, message="execution to answer and see prices")
        return self.proc

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"execution exited {self.proc.returncode}: {self.output()[-3000:]}")
        try:
            reply = self.ask(GetStatus(), timeout_ms=300)
        except RequestTimeout:
            return False
        return isinstance(reply, Reply) and reply.ok and reply.data["last_prices"] >= len(self.feed.quotes)

    def output(self) -> str:
        return processes.output(self.home, "execution")

    def ask(self, msg: Message, timeout_ms: int = 5000) -> Message:
        return processes.ask_execution(self.bus, self.cfg, self.home, msg, timeout_ms)

    def ok(self, msg: Message, timeout_ms: int = 5000) -> Any:
        reply = self.ask(msg, timeout_ms)
        assert isinstance(reply, Reply) and reply.ok, reply
        return reply.data

    def order(
        self, symbol: str = "RELIANCE-EQ", side: str = "BUY", qty: int = 5, price: str | None = None,
        rid: str = "", **kw: Any,
    ) -> ExecuteOrder:  # fmt: skip
        """The kit's ``execute_order`` (5, market intent) with an id unique to this process:
        the ledger database outlives one test."""
        self._ids += 1
        return execute_order(symbol, side, qty, price, rid=rid or f"t-{os.getpid()}-{self._ids}", **kw)

    def orders(self) -> list[dict[str, Any]]:
        return list(self.ok(GetOrders(limit=10_000)))

    def find(self, order_id: str) -> dict[str, Any]:
        return next(o for o in self.orders() if o["order_id"] == order_id)

    def positions(self) -> dict[tuple[str, str], int]:
        return {(p["strategy_id"], p["symbol"]): p["quantity"] for p in self.ok(GetPositions())}

    def fills_sum(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for o in self.orders():
            for f in o["fills"]:
                k = (o["strategy_id"], o["symbol"])
                out[k] = out.get(k, 0) + (f["quantity"] if f["side"] == "BUY" else -f["quantity"])
        return out

    def journal_places(self) -> dict[str, int]:
        """How many times the paper broker received each client tag (duplicates would show here)."""
        path = self.home / "run" / "paper-book.jsonl"
        counts: dict[str, int] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec["op"] == "place":
                    counts[rec["tag"]] = counts.get(rec["tag"], 0) + 1
        return counts

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*NEOPULSE, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
            input=stdin if stdin is not None else "",
        )

    def kill9(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.feed.close()
        self.bus.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: Any) -> Iterator[ExecStack]:
    with cloned_db(pg_server, f"np_svc_{os.getpid()}") as url:
        s = ExecStack(tmp_path_factory.mktemp("exec-svc") / "home", url)
        try:
            s.start()
            yield s
        finally:
            s.close()


def test_execute_order_acks_after_the_pending_commit_is_idempotent_and_publishes(stack: ExecStack) -> None:
    sub = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [topic("order", "pub1")])
    cmd = stack.order(strategy="pub1")
    eventually(lambda: (stack.ok(GetStatus()), sub.recv(50) or True)[1], timeout=5)  # subscription settles
    first = stack.ok(cmd)
    again = stack.ok(cmd)
    assert first["status"] == "PENDING_BROKER" and first["client_tag"].startswith("np")
    assert again["order_id"] == first["order_id"]
    row = eventually(lambda: (o := stack.find(first["order_id"]))["status"] == "COMPLETE" and o, timeout=5)
    assert row["filled_qty"] == 5 and len(row["fills"]) == 1
    assert Decimal(row["price"]) == Decimal("1302.90")  # protected limit: last 1290 x 1.01, on the 0.10 tick
    seen: list[str] = []

    def got_complete() -> bool:
        m = sub.recv(100)
        if m is not None and isinstance(m[1], OrderUpdate) and m[1].order_id == first["order_id"]:
            seen.append(m[1].status)
        return "COMPLETE" in seen

    eventually(got_complete, timeout=5, message="a published COMPLETE OrderUpdate")
    sub.close()
    assert stack.journal_places()[first["client_tag"]] == 1


def test_malformed_bytes_are_answered_and_counted_and_the_service_keeps_running(stack: ExecStack) -> None:
    ctx = stack.bus.ctx
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.cfg.bus.endpoint("execution_rep"))
    before = stack.ok(GetStatus())["rep_malformed"]
    sock.send_multipart([b"", b"\x00" * 8, b"\xc1\xff garbage"])
    sock.send_multipart([b"only one frame"])
    sock.send_multipart([b"", b"\x01" * 8, Codec().encode(Tick(segment="x", token="1", ltp=1.0))[:5]])
    assert sock.poll(3000)
    reply = Codec().decode(sock.recv_multipart()[-1])
    assert isinstance(reply, Reply) and not reply.ok and reply.code == "malformed"
    sock.close()
    eventually(lambda: stack.ok(GetStatus())["rep_malformed"] >= before + 3, timeout=5)
    unsupported = stack.ask(Subscribe(instruments=["RELIANCE-EQ"]))
    assert isinstance(unsupported, Reply) and unsupported.code == "unsupported"


def test_paper_mode_has_no_feed_session_and_no_master_sync(stack: ExecStack) -> None:
    lease = stack.ask(GetFeedSession())
    assert isinstance(lease, Reply) and (lease.ok, lease.code) == (False, "no_session")
    assert "paper" in lease.error
    sync = stack.ask(SyncMaster())
    assert (
        isinstance(sync, Reply) and not sync.ok and sync.error == "sync-master needs execution.broker=kotak"
    )
    cli = stack.cli("sync-master", "--json")
    assert cli.returncode == 1 and "sync-master needs execution.broker=kotak" in cli.stderr


def test_risk_events_give_the_day_its_kill_switch_and_cancel_entries(stack: ExecStack) -> None:
    resting = stack.ok(stack.order(price="1000.00", strategy="ks"))
    stack.ok(
        RecordRiskEvent(event="kill_switch_on", reason="manual test", source="cli", request_id="ks-on-1")
    )
    stack.ok(
        RecordRiskEvent(event="kill_switch_on", reason="manual test", source="cli", request_id="ks-on-1")
    )
    day = stack.ask(GetDayState())
    assert day.kill_switch is True and day.kill_reason == "manual test" and day.risk_state == "HALTED"  # type: ignore[union-attr]
    res = stack.ok(CancelEntries(request_id="c1", reason="kill switch"))
    assert resting["order_id"] in res["order_ids"]
    eventually(lambda: stack.find(resting["order_id"])["status"] == "CANCELLED", timeout=5)
    stack.ok(RecordRiskEvent(event="kill_switch_off", reason="done", source="cli", request_id="ks-off-1"))
    assert stack.ask(GetDayState()).kill_switch is False  # type: ignore[union-attr]


def test_flatten_with_three_open_positions_via_the_cli(stack: ExecStack) -> None:
    for sym in ("RELIANCE-EQ", "INFY-EQ", "TCS-EQ"):
        stack.ok(stack.order(sym, qty=3, strategy="flat"))
    eventually(
        lambda: all(stack.positions().get(("flat", s)) == 3 for s in ("RELIANCE-EQ", "INFY-EQ", "TCS-EQ")),
        timeout=5,
        message="three open positions",
    )
    refused = stack.cli("flatten")  # no TTY, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    listed = stack.cli("positions", "--json")
    assert listed.returncode == 0 and {
        p["symbol"] for p in json.loads(listed.stdout) if p["strategy_id"] == "flat"
    } == {"RELIANCE-EQ", "INFY-EQ", "TCS-EQ"}

    out = stack.cli("flatten", "--strategy", "flat", "--yes", "--json")

    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["closing"]) == 3 and report["skipped"] == []
    eventually(
        lambda: all(stack.positions().get(("flat", s)) == 0 for s in ("RELIANCE-EQ", "INFY-EQ", "TCS-EQ")),
        timeout=5,
        message="every position flat",
    )
    assert {k: v for k, v in stack.fills_sum().items() if k[0] == "flat"} == {
        k: v for k, v in stack.positions().items() if k[0] == "flat"
    }
    ledger = [o for o in stack.orders() if o["strategy_id"] == "flat"]
    assert sorted(o["purpose"] for o in ledger) == ["ENTRY"] * 3 + ["FLATTEN"] * 3
    assert all(o["status"] == "COMPLETE" for o in ledger)


def test_neopulse_orders_json_lists_ledger_rows_with_fills(stack: ExecStack) -> None:
    placed = stack.ok(stack.order(strategy="cli1"))
    eventually(lambda: stack.find(placed["order_id"])["status"] == "COMPLETE", timeout=5)
    out = stack.cli("orders", "--strategy", "cli1", "--json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert (row["order_id"], row["status"], row["filled_qty"]) == (placed["order_id"], "COMPLETE", 5)
    assert row["fills"][0]["quantity"] == 5
    human = stack.cli("orders", "--status", "COMPLETE", "--symbol", "RELIANCE-EQ")
    assert human.returncode == 0 and placed["order_id"][:8] in human.stdout
    assert stack.cli("orders", "--status", "BOGUS").returncode == 2


def test_cli_exits_3_naming_execution_when_it_is_down(tmp_path: Path) -> None:
    env = stack_env(
        tmp_path / "home",
        free_base_port(),
        NEOPULSE_ENV_FILE=str(tmp_path / "no.env"),
        NEOPULSE_BUS__REQUEST_TIMEOUT_MS="300",
    )
    out = subprocess.run(
        [*NEOPULSE, "positions"], cwd=ROOT, env=env, capture_output=True, check=False, text=True, timeout=30
    )
    assert out.returncode == 3 and "execution is unreachable" in out.stderr


def test_kotak_broker_refuses_to_start_without_live(tmp_path: Path) -> None:
    env = stack_env(
        tmp_path / "home",
        free_base_port(),
        NEOPULSE_ENV_FILE=str(tmp_path / "no.env"),
        NEOPULSE_EXECUTION__BROKER="kotak",
    )
    out = subprocess.run(
        [sys.executable, "-m", "services.execution"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "execution.broker=kotak places REAL orders; pass --live or set NEOPULSE_LIVE=1" in out.stderr
