"""Ledger outage with an external ``database.url``: execution as a real process on a PostgreSQL
server this test runs as its operator would (pgserver, in a directory of its own). The server is
frozen for 8 s (SIGSTOP of the postmaster and every backend), later killed with kill -9 and
started again by hand 8 s after.

While the server is away new orders are refused "ledger unavailable" and ``neopulse status``
exits 3 naming the ledger (after the kill even before any order meets the dead connection);
execution never starts an embedded server of its own (no ``embedded_pg_restarting``, no pgdata
under its home) and keeps retrying, its log rate-limited; intake resumes within 5 s of the
server returning; and no approved order is lost: every ``ok`` order is in the ledger and reached
the paper broker exactly once, and no refused one did."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from libs.common.bus import Subscriber
from libs.common.messages import Alert, GetStatus, Reply
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack
from tests.integration.test_ledger_outage import Orders

RESUME_S = 5.0  # intake must resume within this long of PostgreSQL returning
DOWN_S = 8.0  # how long each outage lasts


class ExternalPg:
    """A PostgreSQL server that is not execution's: started with pgserver, frozen, killed and
    started again from here, as the operator of an external ``database.url`` would.

    Its directory is outside pytest's tmp tree: pytest re-applies mode 0700 there at every
    session start, and postgres runs as the ``pgserver`` user when the tests run as root."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver
        self.parent = Path(tempfile.mkdtemp(prefix="neopulse-extpg-"))
        self.pgdata = (self.parent / "pgdata").resolve()
        self.server = pgserver.get_server(self.pgdata, cleanup_mode=None)  # stopped by close()
        info = self.server.get_postmaster_info()
        self.socket_dir = Path(info.socket_dir)
        self.url = self.server.get_uri()

    def postmaster(self) -> psutil.Process | None:
        """The running postmaster (None while the server is down)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
            proc = psutil.Process(pid)
            return proc if proc.status() != psutil.STATUS_ZOMBIE else None
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None

    def processes(self) -> list[psutil.Process]:
        pm = self.postmaster()
        return [pm, *pm.children(recursive=True)] if pm is not None else []

    def kill9(self) -> None:
        """The server crashes: kill -9 of the postmaster; its backends exit by themselves."""
        procs = self.processes()
        assert procs, "the external server is not running"
        procs[0].kill()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:  # a zombie postmaster counts as gone (nobody may reap it here)
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()

    def start(self) -> None:
        """Start the server again on the same socket (so the same URL), as its operator would:
        the crashed server's lock files are removed first, its processes are all gone."""
        from pgserver._commands import pg_ctl

        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
            Path(str(lock)[: -len(".lock")]).unlink(missing_ok=True)
        pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.pgdata / "log"), "start"],
            pgdata=self.pgdata, user=self.server.system_user, timeout=30,
        )  # fmt: skip

    def close(self) -> None:
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
                p.kill()
        with contextlib.suppress(Exception):
            self.server.cleanup()  # cleanup_mode=None: only forgets this process's handle
        shutil.rmtree(self.parent, ignore_errors=True)


@pytest.fixture
def external() -> Iterator[ExternalPg]:
    ext = ExternalPg()
    try:
        yield ext
    finally:
        ext.close()


@pytest.fixture
def stack(tmp_path: Path, external: ExternalPg) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", external.url)  # database.url: execution's ledger is external
    try:
        yield s
    finally:
        s.close()


def _alerts(sub: Subscriber) -> list[Alert]:
    out = []
    while (m := sub.recv(50)) is not None:  # recv(0) would not even poll
        if isinstance(m[1], Alert):
            out.append(m[1])
    return out


def _status(stack: ExecStack) -> Any:
    return stack.cli("status", "-s", "execution", "--listen", "3")


def _log_events(stack: ExecStack) -> list[str]:
    out = []
    for line in (stack.home / "log" / "execution.log").read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line).get("event", ""))
    return out


def _assert_ledger_down(stack: ExecStack, reply: Reply | None, status: Any) -> None:
    """The order refused clearly, status exit 3 naming the ledger, and no embedded server."""
    assert reply is not None, "execution gave no answer while the ledger was away"
    assert not reply.ok and "ledger unavailable" in reply.error, reply
    assert status.returncode == 3, (status.stdout, status.stderr)
    assert "execution" in status.stderr and "ledger unavailable" in status.stderr, status.stderr
    assert not (stack.home / "pgdata").exists(), "execution started an embedded PostgreSQL"
    assert "embedded_pg_restarting" not in _log_events(stack)


def test_external_ledger_outage_is_retried_then_resumes_and_loses_nothing(
    stack: ExecStack, external: ExternalPg
) -> None:
    # Arrange: execution on the external server, trading.
    stack.start()
    alerts = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    orders = Orders(stack)
    for _ in range(3):
        assert (r := orders.send()) is not None and r.ok, r
    assert _status(stack).returncode == 0
    info = stack.ok(GetStatus())
    assert info["db_embedded"] is False, info

    # Act 1: freeze the server (postmaster and every backend) for 8 s.
    frozen = external.processes()
    assert frozen
    for p in frozen:
        p.send_signal(signal.SIGSTOP)
    t_frozen = time.monotonic()
    try:
        first = orders.send(timeout_ms=2500)  # the frozen write fails at its deadline (1.5 s), not never
        assert first is not None, "execution gave no answer while the ledger was frozen"
        assert not first.ok and "ledger unavailable" in first.error, first
        _assert_ledger_down(stack, orders.send(timeout_ms=2000), _status(stack))
        assert time.monotonic() - t_frozen < DOWN_S, "the outage checks took longer than the freeze"
    finally:
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - t_frozen)))
        for p in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
    t_back = time.monotonic()

    # Assert 1: intake resumes by itself.
    resumed_freeze = orders.until_accepted(t_back, RESUME_S)
    assert resumed_freeze <= RESUME_S, f"intake resumed {resumed_freeze:.2f} s after PostgreSQL returned"

    # Act 2: kill -9 the server while no order is in flight; 8 s later its operator starts it again.
    old_pid = frozen[0].pid
    external.kill9()
    t_killed = time.monotonic()
    status = _status(stack)  # before any order: execution notices by itself that the server went away
    _assert_ledger_down(stack, orders.send(timeout_ms=2500), status)
    assert time.monotonic() - t_killed < DOWN_S, "the outage checks took longer than the outage"
    time.sleep(max(0.0, DOWN_S - (time.monotonic() - t_killed)))
    assert external.postmaster() is None, "something started the external server behind its operator"
    external.start()
    t_back = time.monotonic()
    new_pm = external.postmaster()
    assert new_pm is not None and new_pm.pid != old_pid

    # Assert 2: intake resumes by itself, no embedded server was ever started, nothing was lost.
    resumed_kill = orders.until_accepted(t_back, RESUME_S)
    assert resumed_kill <= RESUME_S, f"intake resumed {resumed_kill:.2f} s after PostgreSQL restarted"
    eventually(lambda: _status(stack).returncode == 0, timeout=10, interval=0.2, message="status ok again")
    info = stack.ok(GetStatus())
    assert info["db_embedded"] is False and info["ledger_restarts"] == 0, info
    assert not (stack.home / "pgdata").exists(), "execution started an embedded PostgreSQL"
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

    # The log: each outage seen, retried (rate-limited) and recovered; no embedded server.
    events = _log_events(stack)
    assert events.count("ledger_down") == 2, [e for e in events if e.startswith("ledger")]
    assert events.count("ledger_recovered") == 2, [e for e in events if e.startswith("ledger")]
    assert 2 <= events.count("ledger_reconnect_failed") <= 4, "reconnects not retried, or not rate-limited"
    assert events.count("ledger_write_failed") <= 10, "ledger_write_failed is not rate-limited"
    assert not {"embedded_pg_restarting", "embedded_pg_ready", "embedded_pg_start_retry"} & set(events)
    print(f"\nresumed {resumed_freeze:.2f} s after the freeze, {resumed_kill:.2f} s after the restart; "
          f"{len(orders.approved)} approved, {len(orders.refused)} refused")  # fmt: skip
