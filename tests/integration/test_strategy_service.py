"""A strategy process on real sockets: Subscribe to the feed, ticks in, OrderRequests to risk,
fills back, heartbeats out; a raising strategy is isolated; the supervisor runs every
configured instance and stops them all cleanly.

The peers (feed, risk, execution) are stand-ins on real ZeroMQ sockets built from our own
bus classes, in one thread: this tests the strategy process alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import zmq

from libs.common.bus import Bus, Responder, topic
from libs.common.config import Config, load_config
from libs.common.instruments import MasterData
from libs.common.messages import (
    Fill,
    GetPositions,
    Heartbeat,
    Message,
    OrderRequest,
    OrderUpdate,
    Reply,
    RiskVerdict,
    Subscribe,
    Tick,
)
from services.strategy.base import Strategy
from tests.helpers import eventually, stack_env

ROOT = Path(__file__).resolve().parents[2]
MASTER = MasterData.load()
INFY = MASTER.resolve("INFY-EQ")


class Raiser(Strategy):
    """Queues an order and then raises, on every tick after the fifth (loaded by dotted path)."""

    name = "raiser"

    def on_start(self) -> None:
        self.n = 0

    def on_tick(self, tick: Tick) -> None:
        self.n += 1
        if self.n > 5:
            self.buy(tick, 1)
            raise ZeroDivisionError("bad maths in on_tick")


class Peers(threading.Thread):
    """Feed (PUB + REP), risk (REP) and execution (REP + PUB) stand-ins, in one thread.

    The feed publishes INFY ticks rising 0.05 % per tick; risk approves every order and
    execution reports it COMPLETE with a fill at the last price."""

    def __init__(self, cfg: Config, tick_interval: float = 0.004) -> None:
        super().__init__(daemon=True)
        self.cfg = cfg
        self.tick_interval = tick_interval
        self.requests: list[OrderRequest] = []
        self.subscribes: list[Subscribe] = []
        self.position_queries = 0
        self.ticks = 0
        self.halt = threading.Event()
        self._outbox: list[tuple[bytes, Message]] = []

    def run(self) -> None:
        bus = Bus(self.cfg)
        ep = self.cfg.bus.endpoint
        feed_pub, exec_pub = bus.publisher(ep("feed_pub")), bus.publisher(ep("execution_pub"))
        servers = [bus.server(ep("feed_rep")), bus.server(ep("risk_rep")), bus.server(ep("execution_rep"))]
        servers[0].handler, servers[1].handler, servers[2].handler = self._feed, self._risk, self._execution
        poller = zmq.Poller()
        for s in servers:
            poller.register(s.sock, zmq.POLLIN)
        price = 1500.0
        next_tick = time.monotonic()
        try:
            while not self.halt.is_set():
                for sock, _ in poller.poll(1):
                    next(s for s in servers if s.sock is sock).drain()
                for tpc, msg in self._outbox:
                    exec_pub.publish(tpc, msg)
                self._outbox.clear()
                if time.monotonic() >= next_tick:
                    next_tick += self.tick_interval
                    price *= 1.0005
                    self.price = round(price, 1)
                    self.ticks += 1
                    feed_pub.publish(
                        topic("tick", INFY.segment, INFY.token),
                        Tick(segment=INFY.segment, token=INFY.token, ltp=self.price, symbol=INFY.symbol),
                    )
        finally:
            for s in servers:
                s.close()
            feed_pub.close()
            exec_pub.close()
            bus.close()

    def _feed(self, msg: Message, _r: Responder) -> Message:
        assert isinstance(msg, Subscribe)
        self.subscribes.append(msg)
        keys = [MASTER.resolve(n).key for n in msg.instruments]
        return Reply(ok=True, data={"subscribed": keys, "total": len(keys)})

    def _execution(self, msg: Message, _r: Responder) -> Message:
        assert isinstance(msg, GetPositions)
        self.position_queries += 1
        return Reply(ok=True, data=[])

    def _risk(self, msg: Message, _r: Responder) -> Message:
        assert isinstance(msg, OrderRequest)
        self.requests.append(msg)
        oid = f"o{len(self.requests)}"
        price = Decimal(str(self.price))
        common: dict[str, Any] = {
            "order_id": oid,
            "strategy_id": msg.strategy_id,
            "symbol": msg.symbol,
            "segment": msg.segment,
            "token": msg.token,
            "side": msg.side,
        }
        self._outbox.append(
            (
                topic("order", msg.strategy_id),
                OrderUpdate(
                    request_id=msg.request_id,
                    client_tag="np1",
                    quantity=msg.quantity,
                    status="COMPLETE",
                    filled_qty=msg.quantity,
                    avg_price=price,
                    purpose=msg.purpose,
                    **common,
                ),
            )
        )
        self._outbox.append(
            (
                topic("fill", msg.strategy_id),
                Fill(fill_id=f"f{len(self.requests)}", quantity=msg.quantity, price=price, **common),
            )
        )
        return RiskVerdict(request_id=msg.request_id, approved=True, order_id=oid, quantity=msg.quantity)


@pytest.fixture
def stack(tmp_path: Path, base_port: int) -> Iterator[tuple[dict[str, str], Config]]:
    home = tmp_path / "h"
    env = stack_env(
        home,
        base_port,
        NEOPULSE_FEED__INSTRUMENTS='["INFY-EQ"]',
        NEOPULSE_ENV_FILE=str(tmp_path / "none.env"),
    )
    cfg = load_config(env=env)
    yield env, cfg


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.strategy", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _log_lines(home: Path, name: str) -> list[dict[str, Any]]:
    path = home / "log" / f"{name}.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, within: float = 5.0) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=within + 2)
    return rc, time.monotonic() - t0


def test_strategy_process_trades_once_through_the_bus_and_heartbeats(
    stack: tuple[dict[str, str], Config],
) -> None:
    env, cfg = stack
    home = Path(env["NEOPULSE_HOME"])
    peers = Peers(cfg)
    peers.start()
    proc = _start(["momentum", "--id", "mom1"], env)
    bus = Bus(cfg)
    hb = bus.subscriber([f"ipc://{home}/run/strategy-mom1.pub"], [topic("hb", "strategy-mom1")])
    try:
        eventually(lambda: peers.requests, 15, message="an OrderRequest at risk")
        req = peers.requests[0]
        assert req.strategy_id == "mom1" and req.request_id.startswith("mom1-")
        assert (req.side, req.symbol, req.price, req.purpose) == ("BUY", "INFY-EQ", None, "ENTRY")
        assert req.stop_loss is not None and req.target is not None
        assert (
            peers.subscribes[0].instruments == ["INFY-EQ"]
            and peers.subscribes[0].requester == "strategy-mom1"
        )
        assert peers.position_queries >= 1

        def holding() -> dict[str, Any] | None:
            got = hb.recv(1500)
            if got is None or not isinstance(got[1], Heartbeat):
                return None
            info = got[1].info
            return info if info.get("positions") == {INFY.key: 1} else None

        info = eventually(holding, 10, message="a heartbeat showing the position")
        assert info["strategy_id"] == "mom1" and info["ticks"] > 0
        seen = peers.ticks
        eventually(lambda: peers.ticks > seen + 200, 10, message="more ticks")
        assert len(peers.requests) == 1  # the price keeps rising: no second entry while long
    finally:
        hb.close()
        bus.close()
        rc, took = _stop(proc)
        peers.halt.set()
        peers.join(5)
    assert rc == 0 and took < 5.0
    events = [line["event"] for line in _log_lines(home, "strategy-mom1")]
    assert "order_approved" in events and "fill" in events


def _write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "neopulse.toml"
    path.write_text(body)
    return path


def test_on_tick_raising_with_on_error_stop_exits_with_the_reason(
    tmp_path: Path, stack: tuple[dict[str, str], Config]
) -> None:
    env, cfg = stack
    home = Path(env["NEOPULSE_HOME"])
    env["NEOPULSE_CONFIG"] = str(
        _write_config(
            tmp_path,
            """
[[strategy]]
name = "tests.integration.test_strategy_service:Raiser"
id = "boom"
instruments = ["INFY-EQ"]
on_error = "stop"
""",
        )
    )
    peers = Peers(cfg)
    peers.start()
    proc = _start(["tests.integration.test_strategy_service:Raiser", "--id", "boom"], env)
    try:
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        peers.halt.set()
        peers.join(5)
    assert rc == 1
    assert peers.requests == []  # the order queued before the raise never left
    lines = _log_lines(home, "strategy-boom")
    failed = [ln for ln in lines if ln["event"] == "strategy_hook_failed"]
    assert failed and failed[0]["strategy_id"] == "boom" and "ZeroDivisionError" in failed[0]["error"]
    stopped = [ln for ln in lines if ln["event"] == "service_stopped"]
    assert stopped and stopped[-1]["reason"] == (
        "strategy boom stopped: on_tick raised ZeroDivisionError: bad maths in on_tick"
    )


def test_on_tick_raising_with_on_error_continue_keeps_running(
    tmp_path: Path, stack: tuple[dict[str, str], Config]
) -> None:
    env, cfg = stack
    home = Path(env["NEOPULSE_HOME"])
    env["NEOPULSE_CONFIG"] = str(
        _write_config(
            tmp_path,
            """
[[strategy]]
name = "tests.integration.test_strategy_service:Raiser"
id = "boom"
instruments = ["INFY-EQ"]
""",
        )
    )
    peers = Peers(cfg)
    peers.start()
    proc = _start(["tests.integration.test_strategy_service:Raiser", "--id", "boom"], env)
    try:
        # The first failure is logged with its traceback, the repeats as a counter line
        # at most every ERROR_REPEAT_S.
        eventually(
            lambda: (
                sum(ln["event"] == "strategy_hook_failed" for ln in _log_lines(home, "strategy-boom")) >= 2
            ),
            15,
            message="repeated, logged errors",
        )
        failed = [ln for ln in _log_lines(home, "strategy-boom") if ln["event"] == "strategy_hook_failed"]
        assert "exception" in failed[0] and "exception" not in failed[1]
        assert failed[1]["errors"] > 1 and failed[1]["action"] == "continue"
        assert proc.poll() is None
        assert peers.requests == []
    finally:
        rc, took = _stop(proc, signal.SIGTERM)
        peers.halt.set()
        peers.join(5)
    assert rc == 0 and took < 5.0


def test_unknown_strategy_or_bad_params_exit_2_with_one_line(stack: tuple[dict[str, str], Config]) -> None:
    env, _ = stack
    proc = _start(["nosuch", "--id", "x"], env)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and b"unknown strategy 'nosuch'" in err
    proc = _start(["momentum", "--id", "mom9", "--param", "lookback=-1"], env)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and b"lookback" in err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_supervisor_runs_every_instance_and_leaves_no_orphans(
    tmp_path: Path, stack: tuple[dict[str, str], Config], how: str
) -> None:
    env, _ = stack
    home = Path(env["NEOPULSE_HOME"])
    env["NEOPULSE_CONFIG"] = str(
        _write_config(
            tmp_path,
            """
[[strategy]]
name = "momentum"
id = "a1"
[[strategy]]
name = "macd"
id = "a2"
params = { fast = 5, slow = 13 }
""",
        )
    )
    proc = _start([], env)

    def run_files() -> list[dict[str, Any]] | None:
        files = [home / "run" / "strategy-a1.json", home / "run" / "strategy-a2.json"]
        if all(f.exists() for f in files):
            return [json.loads(f.read_text()) for f in files]
        return None

    try:
        pids = [r["pid"] for r in eventually(run_files, 20, message="both instances running")]
        if how == "sigint":
            rc, took = _stop(proc, signal.SIGINT)
            assert rc == 0 and took < 5.0
        else:
            proc.kill()
            proc.wait(5)
        eventually(lambda: not any(_alive(p) for p in pids), 5, message="children gone")
    finally:
        if proc.poll() is None:
            proc.kill()
