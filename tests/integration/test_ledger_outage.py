"""Ledger outage: execution as a real process on its own embedded PostgreSQL, which is frozen
for 10 s (SIGSTOP of the postmaster and every backend) and later killed with kill -9.

While the ledger is away new orders are refused "ledger unavailable" (and an alert says so),
``neopulse status`` exits 3 naming the ledger and ``neopulse flatten`` gets a clear refusal;
execution restarts the killed server itself; intake resumes within 5 s of PostgreSQL returning;
and no approved order is lost: every ``ok`` order is in the ledger and reached the paper broker
exactly once, and no refused one did."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from libs.common.bus import RequestTimeout, Subscriber
from libs.common.messages import Alert, Reply
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack
from tests.kit.processes import OwnHome

RESUME_S = 5.0  # intake must resume within this long of PostgreSQL returning
FREEZE_S = 10.0


@pytest.fixture
def stack() -> Iterator[ExecStack]:
    own = OwnHome("neopulse-outage-")  # embedded PostgreSQL: its pgdata outside pytest's tmp tree
    s = ExecStack(own.path, "")  # empty database.url: execution runs its own embedded server
    try:
        yield s
    finally:
        s.close()
        _stop_postgres(own.path / "pgdata")
        own.remove()


def _postmaster(pgdata: Path) -> psutil.Process | None:
    pidfile = pgdata / "postmaster.pid"
    try:
        proc = psutil.Process(int(pidfile.read_text().splitlines()[0]))
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return None


def _stop_postgres(pgdata: Path) -> None:
    pm = _postmaster(pgdata)
    if pm is not None:
        for p in [pm, *pm.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
                p.kill()


class Orders:
    """Sends orders and remembers every answer: approved ones must all end in the ledger."""

    def __init__(self, stack: ExecStack) -> None:
        self.stack = stack
        self.approved: dict[str, str] = {}  # request id → order id
        self.refused: dict[str, str] = {}  # request id → error

    def send(self, timeout_ms: int = 8000) -> Reply | None:
        cmd = self.stack.order(qty=1)
        try:
            reply = self.stack.ask(cmd, timeout_ms=timeout_ms)
        except RequestTimeout:
            return None
        assert isinstance(reply, Reply)
        if reply.ok:
            self.approved[cmd.request_id] = reply.data["order_id"]
        else:
            self.refused[cmd.request_id] = reply.error
        return reply

    def until_accepted(self, since: float, within: float, back: Any = None) -> float:
        """Seconds from ``since`` until an order is approved again once ``back()`` holds (fails
        after ``within`` + slack)."""
        deadline = since + within + 10
        while time.monotonic() < deadline:
            ready = back is None or back()
            reply = self.send(timeout_ms=3000)
            if ready and reply is not None and reply.ok:
                return time.monotonic() - since
            time.sleep(0.1)
        raise AssertionError(f"intake did not resume; last refusals {list(self.refused.values())[-3:]}")


def _alerts(sub: Subscriber) -> list[Alert]:
    out = []
    while (m := sub.recv(50)) is not None:  # recv(0) would not even poll
        if isinstance(m[1], Alert):
            out.append(m[1])
    return out


def _status(stack: ExecStack) -> Any:
    return stack.cli("status", "-s", "execution", "--listen", "3")


def test_ledger_outage_refuses_then_resumes_and_loses_nothing(stack: ExecStack) -> None:
    # Arrange: execution on its own embedded PostgreSQL, trading.
    pgdata = stack.home / "pgdata"
    stack.start()
    alerts = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    orders = Orders(stack)
    for _ in range(3):
        assert (r := orders.send()) is not None and r.ok, r
    assert _status(stack).returncode == 0
    pm = _postmaster(pgdata)
    assert pm is not None

    # Act 1: freeze PostgreSQL (postmaster and every backend) for 10 s.
    frozen = [pm, *pm.children(recursive=True)]
    for p in frozen:
        p.send_signal(signal.SIGSTOP)
    t_frozen = time.monotonic()
    try:
        first = orders.send(timeout_ms=2500)  # the frozen write fails at its deadline (1.5 s), not never
        assert first is not None, "execution gave no answer while the ledger was frozen"
        assert not first.ok and "ledger unavailable" in first.error, first
        second = orders.send(timeout_ms=2000)
        assert second is not None and not second.ok and "ledger unavailable" in second.error
        status = _status(stack)
        flat = stack.cli("flatten", "--yes")
        assert time.monotonic() - t_frozen < FREEZE_S, "the outage checks took longer than the freeze"
    finally:
        time.sleep(max(0.0, FREEZE_S - (time.monotonic() - t_frozen)))
        for p in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
    t_back = time.monotonic()

    # Assert 1: status names the degraded ledger, flatten was refused clearly, intake resumes.
    assert status.returncode == 3, (status.stdout, status.stderr)
    assert "execution" in status.stderr and "ledger unavailable" in status.stderr, status.stderr
    assert flat.returncode == 1 and "ledger unavailable" in flat.stderr, (flat.stdout, flat.stderr)
    resumed_freeze = orders.until_accepted(t_back, RESUME_S)
    assert resumed_freeze <= RESUME_S, f"intake resumed {resumed_freeze:.2f} s after PostgreSQL returned"

    # Act 2: kill -9 the postmaster; execution must start PostgreSQL again by itself.
    pm2 = _postmaster(pgdata)
    assert pm2 is not None
    pm2.kill()
    t_killed = time.monotonic()
    def restarted() -> bool:  # until then a backend may still commit for a moment
        new_pm = _postmaster(pgdata)
        return new_pm is not None and new_pm.pid != pm2.pid

    resumed_kill = orders.until_accepted(t_killed, RESUME_S, back=restarted)
    assert resumed_kill <= RESUME_S, f"intake resumed {resumed_kill:.2f} s after kill -9 of postgres"

    # Assert 2: healthy again, nothing approved was lost, nothing refused was sent.
    eventually(lambda: _status(stack).returncode == 0, timeout=10, interval=0.2, message="status ok again")
    ledger = {o["request_id"]: o for o in stack.orders()}
    missing = {rid: oid for rid, oid in orders.approved.items() if ledger.get(rid, {}).get("order_id") != oid}
    assert not missing, f"approved orders missing from the ledger: {missing}"
    assert not set(orders.refused) & set(ledger), "a refused order reached the ledger"
    places = eventually(
        lambda: (p := stack.journal_places())
        and all(ledger[rid]["client_tag"] in p for rid in orders.approved) and p,
        timeout=10, message="every approved order at the paper broker",
    )  # fmt: skip
    assert all(n == 1 for n in places.values()), f"an order reached the broker twice: {places}"
    assert set(places) == {ledger[rid]["client_tag"] for rid in orders.approved}
    codes = {a.code for a in _alerts(alerts)}
    assert {"ledger_unavailable", "ledger_recovered"} <= codes, codes
    log = (stack.home / "log" / "execution.log").read_text()
    assert log.count("ledger_write_failed") <= 10, "ledger_write_failed is not rate-limited"
    assert "embedded_pg_restarting" in log
    print(f"\nresumed {resumed_freeze:.2f} s after the freeze, {resumed_kill:.2f} s after kill -9; "
          f"{len(orders.approved)} approved, {len(orders.refused)} refused")  # fmt: skip
