"""The stack's run files, the preflight line, and the supervisor watch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from libs.common.config import load_config
from libs.common.stack import SupervisorWatch, is_alive, preflight, run_files, running
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


def _write_run_file(home: Path, service: str, pid: int, started_ns: int) -> None:
    (home / "run").mkdir(parents=True, exist_ok=True)
    (home / "run" / f"{service}.json").write_text(
        json.dumps({"service": service, "pid": pid, "started_ns": started_ns, "pub": ""}))


def test_a_run_file_counts_only_while_the_process_that_wrote_it_runs(tmp_path: Path) -> None:
    # Arrange: this process, a dead pid, a pid that started after its file (reused), junk.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_run_file(tmp_path, "feed", os.getpid(), time.time_ns())
    _write_run_file(tmp_path, "risk", dead.pid, time.time_ns())
    _write_run_file(tmp_path, "notifier", os.getpid(), 1)
    (tmp_path / "run" / "risk-day.json").write_text('{"day": "2026-01-01"}')

    # Act
    entries = {e.service: e for e in run_files(tmp_path)}

    # Assert
    assert set(entries) == {"feed", "risk", "notifier"}
    assert [e.service for e in running(tmp_path)] == ["feed"]
    assert not is_alive(entries["risk"]) and not is_alive(entries["notifier"])


def test_preflight_passes_with_no_stack_and_free_ports(tmp_path: Path, base_port: int,
                                                        monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("NEOPULSE_BUS__BASE_PORT", str(base_port))

    assert preflight(load_config(), tmp_path) is None


def test_preflight_names_a_running_stack_its_pids_and_the_port_it_holds(
        tmp_path: Path, base_port: int, monkeypatch) -> None:  # fmt: skip
    # Arrange: a "feed" (this process) listening on feed_pub.
    monkeypatch.setenv("NEOPULSE_BUS__BASE_PORT", str(base_port))
    _write_run_file(tmp_path, "feed", os.getpid(), time.time_ns())
    with socket.socket() as s:
        s.bind(("127.0.0.1", base_port + 1))
        s.listen()

        # Act
        line = preflight(load_config(), tmp_path)

    # Assert
    assert line is not None and "\n" not in line
    assert f"feed pid {os.getpid()}" in line and f"port {base_port + 1} (feed_pub)" in line
    assert str(tmp_path) in line and "neopulse stop" in line


def test_preflight_names_the_port_and_the_program_holding_it_when_no_stack_runs(
        tmp_path: Path, base_port: int, monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("NEOPULSE_BUS__BASE_PORT", str(base_port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", base_port + 201))
        s.listen()

        line = preflight(load_config(), tmp_path)

    assert line is not None
    assert f"port {base_port + 201} (execution_rep) in use by pid {os.getpid()}" in line
    assert "NEOPULSE_BUS__BASE_PORT" in line


def test_a_port_in_time_wait_is_not_taken(tmp_path: Path, base_port: int, monkeypatch) -> None:
    # Arrange: a connection on feed_pub closed by the server first, leaving TIME_WAIT.
    monkeypatch.setenv("NEOPULSE_BUS__BASE_PORT", str(base_port))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", base_port + 1))
    srv.listen()
    cli = socket.create_connection(("127.0.0.1", base_port + 1))
    conn, _ = srv.accept()
    conn.close()
    srv.close()
    cli.close()

    assert preflight(load_config(), tmp_path) is None


def test_supervisor_watch_reports_the_death_of_an_ancestor_outside_the_own_session() -> None:
    # Arrange: like honcho → sh: a parent in its own group starts a child in a new session.
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(30)\n")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        watch = SupervisorWatch(child, {"NEOPULSE_SUPERVISED": "1"})
        assert [p.pid for p in watch.chain] == [parent.pid]
        assert watch.gone() == ""

        # Act
        parent.kill()

        # Assert: seen even while the killed parent is an unreaped zombie.
        assert eventually(watch.gone, timeout=2) == f"supervisor pid {parent.pid} exited"
    finally:
        parent.kill()
        parent.wait(5)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_a_process_started_by_pid_1_watches_nothing() -> None:
    assert SupervisorWatch(1, {"NEOPULSE_SUPERVISED": "1"}).chain == []


def test_a_process_not_started_by_make_up_watches_nothing() -> None:
    # a test harness, a shell script or a hand-started service keeps running when its starter exits
    assert SupervisorWatch(None, {}).chain == []


def test_make_up_runs_the_preflight_before_honcho() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nup:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("neopulse preflight") < recipe.index("honcho")
