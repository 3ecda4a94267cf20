"""Supervisor loss: a whole stack under honcho stops by itself when honcho dies, ``make up``'s
preflight refuses a second stack, and ``neopulse stop`` stops a running one."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from libs.common.stack import RunFile, running
from tests.helpers import eventually, free_base_port
from tests.stack import Stack

pytestmark = pytest.mark.e2e

SERVICES = {"feed", "risk", "execution", "notifier", "strategy", "strategy-mom1"}


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack(free_base_port(), NEOPULSE_SUPERVISED="1").start()
    try:
        yield s
    finally:
        s.remove()


def _started(stack: Stack) -> list[RunFile]:
    def every_run_file() -> list[RunFile]:
        entries = running(stack.home)
        return entries if {e.service for e in entries} >= SERVICES else []

    return eventually(every_run_file, timeout=40, interval=0.2,
                      message=f"every service started\n{stack.log()[-3000:]}")


def _stack_pids(stack: Stack, entries: list[RunFile]) -> set[int]:
    """The services and the embedded PostgreSQL (honcho's own helpers are not services)."""
    pgdata = str(stack.home / "pgdata")
    pids = {e.pid for e in entries}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if pgdata in " ".join(p.info["cmdline"] or []):
            pids.add(p.pid)
    return pids


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            continue
    return left


def _seconds_until_gone(pids: set[int], timeout: float = 8.0) -> float:
    t0 = time.monotonic()
    while _alive(pids) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return time.monotonic() - t0


def _stopped_cleanly(stack: Stack, services: set[str]) -> None:
    for name in services:
        log = (stack.home / "log" / f"{name}.log").read_text()
        assert "service_stopped" in log or "strategy_supervisor_stopped" in log, name
    assert not running(stack.home)


@pytest.mark.parametrize("how", ["sigkill", "sighup"])
def test_every_service_exits_cleanly_within_5s_when_honcho_dies(stack: Stack, how: str) -> None:
    # Arrange: the whole Procfile under honcho, every service started.
    entries = _started(stack)
    pids = _stack_pids(stack, entries)
    assert stack.proc is not None

    # Act: honcho killed outright, or its terminal closed (SIGHUP to its process group).
    if how == "sigkill":
        os.kill(stack.proc.pid, signal.SIGKILL)
    else:
        os.killpg(stack.proc.pid, signal.SIGHUP)

    # Assert: services and PostgreSQL gone within 5 s, each through its normal stop.
    took = _seconds_until_gone(pids)
    print(f"{how}: stack gone in {took:.2f}s")
    assert not _alive(pids), f"still running after {took:.1f}s: {_alive(pids)}\n{stack.service_output()}"
    assert took < 5.0, f"took {took:.1f}s"
    _stopped_cleanly(stack, SERVICES)
    assert "supervisor_gone" in (stack.home / "log" / "execution.log").read_text()


def test_preflight_refuses_a_second_stack_naming_port_and_pids_then_neopulse_stop_stops_it(
    stack: Stack,
) -> None:
    # Arrange
    entries = _started(stack)
    pids = _stack_pids(stack, entries)

    # Act: what `make up` runs before honcho, with this stack running.
    pre = stack.cli("preflight")

    # Assert: exit 2, one line naming a port of the stack and every service's pid.
    assert pre.returncode == 2, pre
    lines = pre.stderr.strip().splitlines()
    assert len(lines) == 1, pre.stderr
    assert str(stack.base_port + 1) in lines[0] and "neopulse stop" in lines[0]
    for e in entries:
        assert f"{e.service} pid {e.pid}" in lines[0]

    # Act: stop it from its run files.
    t0 = time.monotonic()
    res = stack.cli("stop")
    took = time.monotonic() - t0
    print(f"neopulse stop: {took:.2f}s: {res.stdout.strip()}")

    # Assert: every service and PostgreSQL stopped, honcho exits, and a second stop says so.
    assert res.returncode == 0, res
    assert res.stdout.startswith("stopped ") and "execution pid" in res.stdout, res.stdout
    _seconds_until_gone(pids, 5)
    assert not _alive(pids), _alive(pids)
    assert stack.proc is not None and stack.proc.wait(5) is not None
    _stopped_cleanly(stack, SERVICES)
    assert took < 8.0, f"neopulse stop took {took:.1f}s"
    again = stack.cli("stop")
    assert again.returncode == 0 and again.stdout.startswith("nothing is running in"), again
