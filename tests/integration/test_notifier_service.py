"""The notifier as a real process: real sockets in, a fake Telegram Bot API server out.

Messages are published on PUB sockets bound at the endpoints risk, execution and the feed
would bind (the notifier cannot tell the difference).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Bus, Publisher, topic
from libs.common.clock import IST
from libs.common.config import Config, load_config
from libs.common.messages import (
    Alert,
    DayState,
    Fill,
    Heartbeat,
    RiskState,
    RiskVerdict,
)
from tests.fakes.telegram_server import TelegramFake
from tests.helpers import eventually, stack_env
from tests.kit.bus import served

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "424242:FAKE-telegram-TOKEN-xyz"
CHAT = "-1001234"


class Proc:
    """A service process whose stdout is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.p = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 10) -> str:
        def found() -> str | None:
            if self.p.poll() is not None and needle not in self.output():
                raise RuntimeError(f"process exited {self.p.returncode}: {self.err[-5:]}")
            return next((ln for ln in self.lines if needle in ln), None)
        return eventually(found, timeout, message=f"{needle!r} on stdout")

    def stop(self, timeout: float = 5) -> float:
        t0 = time.monotonic()
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return time.monotonic() - t0


@pytest.fixture
def telegram() -> Iterator[TelegramFake]:
    with TelegramFake(TOKEN) as fake:
        yield fake


@pytest.fixture
def stack(tmp_path: Path, base_port: int) -> dict[str, Any]:
    home = tmp_path / "home"
    toml = tmp_path / "neopulse.toml"
    toml.write_text("strategy = []\n")
    env = stack_env(home, base_port, NEOPULSE_CONFIG=str(toml), NEOPULSE_ENV_FILE=str(tmp_path / "none.env"))
    cfg = load_config(env=env)
    return {"home": home, "env": env, "cfg": cfg, "tmp": tmp_path}


def start_notifier(stack: dict[str, Any], telegram: TelegramFake | None = None, **extra: str) -> Proc:
    env = dict(stack["env"])
    if telegram is not None:
        env.update(NEOPULSE_TELEGRAM__TOKEN=telegram.token, NEOPULSE_TELEGRAM__CHAT_ID=CHAT,
                   NEOPULSE_TELEGRAM__API_URL=telegram.api_url)
    env.update(extra)
    proc = Proc([sys.executable, "-m", "services.notifier"], env, ROOT)
    proc.wait_for("notifier started", 15)
    return proc


class Pubs:
    """PUB sockets bound where risk, execution and the feed would bind theirs."""

    def __init__(self, cfg: Config) -> None:
        self.bus = Bus(cfg)
        self.cfg = cfg
        self.pubs: dict[str, Publisher] = {}

    def pub(self, name: str) -> Publisher:
        if name not in self.pubs:
            self.pubs[name] = self.bus.publisher(self.cfg.bus.endpoint(f"{name}_pub"))
        return self.pubs[name]

    def close(self, name: str) -> None:
        self.pubs.pop(name).close()

    def join(self, proc: Proc, name: str) -> None:
        """Publish an alert until the notifier prints it: the subscription is live."""
        n = 0

        def heard() -> bool:
            nonlocal n
            n += 1
            hello = Alert(level="INFO", source=name, text=f"hello-{name}-{n}")
            self.pub(name).publish(topic("alert", name), hello)
            return f"hello-{name}-" in proc.output()
        eventually(heard, 10, 0.1, f"notifier subscribed to {name}")

    def shutdown(self) -> None:
        for p in self.pubs.values():
            p.close()
        self.bus.close()


@pytest.fixture
def pubs(stack: dict[str, Any]) -> Iterator[Pubs]:
    p = Pubs(stack["cfg"])
    yield p
    p.shutdown()


def fill(symbol: str, i: int = 0, side: str = "BUY") -> Fill:
    return Fill(fill_id=f"T{i}", order_id=f"O{i}", strategy_id="mom1", symbol=symbol, segment="nse_cm",
                token="11536", side=side, quantity=1 + i % 5, price=Decimal("3850.40"))


def fills_represented(texts: list[str]) -> int:
    total = 0
    for text in texts:
        m = re.search(r"^(\d+) fills?:", text, re.M)
        if m:
            total += int(m.group(1))
        elif "FILL " in text:
            total += 1
    return total


# --------------------------------------------------------------------------- tests


def test_a_fill_and_a_rejection_reach_telegram_within_5s(stack: dict[str, Any], telegram: TelegramFake,
                                                              pubs: Pubs) -> None:
    proc = start_notifier(stack, telegram)
    pubs.join(proc, "execution")
    t0 = time.monotonic()

    pubs.pub("execution").publish(topic("fill", "mom1"), fill("TCS-EQ"))

    eventually(lambda: any("TCS-EQ" in t for t in telegram.texts()), 5, message="fill on Telegram")
    assert time.monotonic() - t0 < 5
    msg = next(m for m in telegram.messages if "TCS-EQ" in m.text)
    assert msg.chat_id == CHAT and msg.method == "sendMessage"
    assert "FILL BUY 1 TCS-EQ @ 3850.40" in msg.text
    proc.wait_for("TCS-EQ")  # console too

    pubs.join(proc, "risk")
    pubs.pub("risk").publish(topic("verdict", "mom1"), RiskVerdict(
        request_id="req-77", approved=False, reason="SBIN-EQ: quantity 5000 exceeds max_qty 1000"))
    proc.wait_for("REJECTED", 5)
    eventually(lambda: any("req-77" in t and "max_qty" in t for t in telegram.texts()), 5)
    assert proc.stop() < 5


def test_429_retry_after_is_honoured(stack: dict[str, Any], telegram: TelegramFake, pubs: Pubs) -> None:
    proc = start_notifier(stack, telegram)
    pubs.join(proc, "execution")
    eventually(lambda: telegram.messages, 5, message="startup messages delivered")
    before = len(telegram.attempts)
    telegram.fail_next(1, status=429, retry_after=1)

    pubs.pub("execution").publish(topic("fill", "mom1"), fill("WIPRO-EQ"))

    eventually(lambda: any("WIPRO-EQ" in t for t in telegram.texts()), 10, message="delivery after 429")
    attempts = telegram.attempts[before:]
    refused = next(a for a in attempts if a.status == 429)
    delivered = next(a for a in attempts if a.status == 200 and a.mono > refused.mono)
    assert delivered.mono - refused.mono >= 0.95
    assert "telegram_retry" in (stack["home"] / "log" / "notifier.log").read_text()
    proc.stop()


def test_5xx_is_retried_and_the_token_never_reaches_logs_or_console(
    stack: dict[str, Any], telegram: TelegramFake, pubs: Pubs
) -> None:
    proc = start_notifier(stack, telegram)
    pubs.join(proc, "execution")
    telegram.fail_next(2, status=502)

    pubs.pub("execution").publish(topic("fill", "mom1"), fill("ITC-EQ"))

    eventually(lambda: any("ITC-EQ" in t for t in telegram.texts()), 10, message="delivery after 502s")
    assert sum(1 for a in telegram.attempts if a.status == 502) == 2
    proc.stop()
    logs = "".join(p.read_text() for p in (stack["home"] / "log").glob("*.log*"))
    assert "telegram_retry" in logs
    for text in (logs, proc.output(), "\n".join(proc.err)):
        assert TOKEN not in text
        assert TOKEN.split(":")[1] not in text


def test_100_fills_in_one_second_make_at_most_3_messages(stack: dict[str, Any], telegram: TelegramFake,
                                                          pubs: Pubs) -> None:
    proc = start_notifier(stack, telegram)
    pubs.join(proc, "execution")
    eventually(lambda: telegram.messages, 5, message="startup messages delivered")
    pub = pubs.pub("execution")

    t0 = time.monotonic()
    for i in range(100):
        pub.publish(topic("fill", "mom1"), fill(f"SYM{i % 7}-EQ", i))
        time.sleep(max(0.0, t0 + (i + 1) * 0.0095 - time.monotonic()))  # spread over ~1 s
    assert time.monotonic() - t0 < 1.2

    eventually(lambda: fills_represented(telegram.texts()) >= 100, 10, message="all 100 fills on Telegram")
    fill_msgs = [t for t in telegram.texts() if "FILL " in t]
    assert len(fill_msgs) <= 3, fill_msgs
    assert fills_represented(telegram.texts()) == 100
    assert all(len(t) <= 4096 for t in telegram.texts())
    eventually(lambda: proc.output().count("FILL ") >= 100, 5, message="every fill on the console")
    proc.stop()


def test_dead_telegram_does_not_slow_the_console_or_the_bus(stack: dict[str, Any], telegram: TelegramFake,
                                                            pubs: Pubs) -> None:
    proc = start_notifier(stack, telegram)
    pubs.join(proc, "execution")
    telegram.dead = True
    hb_bus = Bus(stack["cfg"])
    hb_sub = hb_bus.subscriber([stack["cfg"].bus.endpoint("notifier_pub")], [b"hb.notifier."])
    pub = pubs.pub("execution")

    t0 = time.monotonic()
    pub.publish(topic("fill", "mom1"), fill("HDFCBANK-EQ"))
    proc.wait_for("HDFCBANK-EQ", 2)
    first_latency = time.monotonic() - t0
    for i in range(500):
        pub.publish(topic("fill", "mom1"), fill("LT-EQ", i))
    eventually(lambda: proc.output().count("LT-EQ") >= 500, 3, message="500 fills on the console")
    burst_latency = time.monotonic() - t0
    hb = hb_sub.recv(3000)

    assert first_latency < 1.0
    assert burst_latency < 3.0
    assert hb is not None and isinstance(hb[1], Heartbeat)  # the event loop keeps beating
    assert proc.stop() < 5  # a blocked HTTP call does not hold up the exit
    hb_bus.close()


def test_silent_service_is_named_and_its_recovery_announced(
    stack: dict[str, Any], telegram: TelegramFake, pubs: Pubs
) -> None:
    # notifier.silence_s = 2 here to keep the test short; test_cli_ops stops a real risk
    # process with the default 5 s and asserts the 7 s bound.
    proc = start_notifier(stack, telegram, NEOPULSE_NOTIFIER__SILENCE_S="2")
    pubs.join(proc, "risk")
    beating = threading.Event()
    beating.set()
    pid = {"value": 5001}

    def beat() -> None:
        while beating.is_set():
            p = pubs.pubs.get("risk")
            if p is not None:
                p.publish(b"hb.risk.", Heartbeat(service="risk", pid=pid["value"]))
            time.sleep(0.2)

    pubs_lock_thread = threading.Thread(target=beat, daemon=True)
    pubs_lock_thread.start()
    eventually(lambda: pubs.pubs["risk"].stats.sent > 5, 5)

    beating.clear()  # risk "stops"
    pubs_lock_thread.join()
    pubs.close("risk")
    stopped = time.monotonic()

    line = proc.wait_for("risk is DOWN", 6)
    assert time.monotonic() - stopped <= 4.0
    assert pubs.cfg.bus.endpoint("risk_pub") in line
    eventually(lambda: any("risk is DOWN" in t for t in telegram.texts()), 5)

    pid["value"] = 5002  # risk "restarts"
    pubs.pub("risk")
    beating.set()
    restarted = threading.Thread(target=beat, daemon=True)
    restarted.start()
    proc.wait_for("risk is back", 8)
    eventually(lambda: any("risk is back" in t and "5002" in t for t in telegram.texts()), 5)
    beating.clear()
    restarted.join()
    proc.stop()


def test_daily_summary_with_equity_chart_at_summary_at(stack: dict[str, Any], telegram: TelegramFake,
                                                      pubs: Pubs) -> None:
    now = datetime.now(IST)
    # The notifier must be running, with the risk states, before the clock crosses summary_at;
    # starting a Python process alone can take several seconds on a loaded machine.
    at = now + timedelta(seconds=8)
    if at.date() != now.date():
        pytest.skip("too close to midnight IST for a same-day summary")
    day = DayState(trading_day=at.strftime("%Y-%m-%d"), fills=17, turnover=Decimal("250000"),
                   realised_pnl=Decimal("812.5"))
    with served(stack["cfg"].bus.endpoint("execution_rep"), lambda _m, _r: day):
        proc = start_notifier(stack, telegram, NEOPULSE_NOTIFIER__SUMMARY_AT=at.strftime("%H:%M:%S"))
        pubs.join(proc, "risk")
        for i in range(3):
            state = RiskState(state="ACTIVE", net_pnl=700.0 + i, gross_pnl=800.0, cost=99.0)
            pubs.pub("risk").publish(b"risk.state.", state)
        setup_s = (datetime.now(IST) - now).total_seconds()
        assert datetime.now(IST) < at - timedelta(seconds=1), f"set-up took {setup_s:.1f}s, past summary_at"

        # The summary fetches the day from execution and renders the chart (matplotlib) off the loop.
        eventually(lambda: any(m.method == "sendPhoto" for m in telegram.messages), 30,
                   message="summary photo")
        photo = next(m for m in telegram.messages if m.method == "sendPhoto")
        assert photo.photo.startswith(b"\x89PNG")
        assert "daily summary" in photo.text and "Net PnL: ₹702.00" in photo.text
        assert "17 fills" in photo.text
        proc.wait_for("daily summary")
        assert list((stack["home"] / "reports").glob("summary-*.png"))
        proc.stop()


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("NEOPULSE_NOTIFIER__SILENCE_S", "-1", "NEOPULSE_NOTIFIER__SILENCE_S"),
        ("NEOPULSE_NOTIFIER__SUMMARY_AT", "25:99", "notifier.summary_at"),
        ("NEOPULSE_NOTIFIER__SILENCE", "5", "unknown key `notifier.silence`"),
    ],
)
def test_bad_config_exits_2_with_one_line(stack: dict[str, Any], var: str, value: str, needle: str) -> None:
    env = {**stack["env"], var: value}

    res = subprocess.run([sys.executable, "-m", "services.notifier"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=False)

    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and needle in lines[0]


@pytest.mark.skipif(os.environ.get("CI") == "true" and sys.platform != "linux", reason="posix signals")
def test_sigint_stops_the_notifier_cleanly(stack: dict[str, Any]) -> None:
    proc = start_notifier(stack)
    proc.p.send_signal(signal.SIGINT)
    assert proc.p.wait(5) == 0
    assert "service_stopped" in (stack["home"] / "log" / "notifier.log").read_text()
