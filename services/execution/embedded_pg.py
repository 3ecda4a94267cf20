"""The ledger's PostgreSQL: ``database.url`` when set, else an embedded server (``pgserver``).

The embedded server lives in ``$NEOPULSE_HOME/pgdata`` and listens only on a unix socket.
When this process runs as root, pgserver runs postgres as the ``pgserver`` system user.

Robust to a previous ``kill -9``:

* of execution: postgres keeps running and is reused; the dead pid is dropped from
  pgserver's handle list (otherwise the server would never be stopped again);
* of postgres itself: a ``postmaster.pid`` naming a dead (or reused, non-postgres) pid,
  or a half-written one, is removed before starting; a start that fails because the old
  backends still hold the shared memory is retried while they exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STALE_WAIT_S = 5.0


class DatabaseError(RuntimeError):
    """The ledger database cannot be reached or started; the message says why."""


@dataclass
class Database:
    """Where the ledger lives and how long it took to get there."""

    url: str
    embedded: bool
    startup_ms: float
    server: Any = None  # the pgserver handle when embedded

    def close(self) -> None:
        """Drop this process's handle; the server stops when it was the last one."""
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None

    def postmaster_pid(self) -> int:
        """The embedded server's postmaster pid (0 for an external ``database.url``)."""
        if self.server is None:
            return 0
        with contextlib.suppress(Exception):
            return int(self.server.get_pid() or 0)
        return 0

    def postmaster_gone(self) -> bool:
        """True when the embedded server's postmaster exited (killed, or stopped by someone):
        only then may it be started again. A stopped (SIGSTOP) or busy one is not gone."""
        pid = self.postmaster_pid()
        if not pid:
            return False
        import psutil

        try:
            return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False

    def restart(self, log: Any = None) -> None:
        """Start the embedded server again after its postmaster exited, with the same robust
        start as at startup (stale ``postmaster.pid``, socket lock, shared memory still held).
        The old handle is forgotten without stopping anything (there is nothing left to stop)."""
        assert self.embedded and self.server is not None
        old = self.server
        _, pgs = _pgserver()
        pgdata = Path(old.pgdata)
        with pgs.PostgresServer._lock:
            if pgs.PostgresServer._instances.get(pgdata) is old:
                del pgs.PostgresServer._instances[pgdata]
        atexit.unregister(old._cleanup)
        fresh = start_embedded(pgdata, log, cleanup_mode=old.cleanup_mode)
        self.url, self.server, self.startup_ms = fresh.url, fresh.server, fresh.startup_ms


def _pgserver() -> Any:
    import logging

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver
        import pgserver.postgres_server as pgs
    return pgserver, pgs


def _is_postgres(pid: int, pgdata: Path) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return name.startswith("postgres") and str(pgdata) in cmdline


def _clear_stale_state(pgdata: Path, log: Any = None) -> None:
    """Remove what a killed execution or a killed postgres left behind."""
    import json

    import psutil

    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        try:
            pids = [int(p) for p in json.loads(handles.read_text() or "[]")]
        except (ValueError, TypeError):
            pids = []
        alive = [p for p in pids if p != os.getpid() and psutil.pid_exists(p)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
            if log is not None:
                log.info("embedded_pg_pruned_handles", dead=sorted(set(pids) - set(alive)))

    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return
    lines = pidfile.read_text(errors="replace").splitlines()
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        pid = 0
    running = pid > 0 and _is_postgres(pid, pgdata)
    if running and len(lines) >= 8:
        return  # a live server: reuse it
    if running:
        # postgres is still starting (half-written file): give it a moment
        deadline = time.monotonic() + STALE_WAIT_S
        while time.monotonic() < deadline and len(pidfile.read_text(errors="replace").splitlines()) < 8:
            time.sleep(0.05)
        return
    # The socket lock names the dead postmaster too; a not-yet-reaped zombie of it would make
    # postgres refuse to start ("lock file already exists"), so clear it as well.
    socket_dirs = {pgdata}
    if len(lines) >= 5 and lines[4].strip():
        socket_dirs.add(Path(lines[4].strip()))
    for sdir in socket_dirs:
        for lock in sdir.glob(".s.PGSQL.*.lock"):
            with contextlib.suppress(OSError):
                lock_pid = int(lock.read_text(errors="replace").splitlines()[0].strip())
                if not _is_postgres(lock_pid, pgdata):
                    lock.unlink(missing_ok=True)
                    Path(str(lock)[: -len(".lock")]).unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)
    if log is not None:
        log.warning("embedded_pg_stale_pidfile_removed", pid=pid)


def _wait_connectable(url: str, timeout_s: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.05)
    raise DatabaseError(f"embedded PostgreSQL is not accepting connections: {last}")


def start_embedded(pgdata: Path, log: Any = None, cleanup_mode: str | None = "stop") -> Database:
    """Start (or attach to) the embedded server in ``pgdata``; returns its URL."""
    t0 = time.perf_counter()
    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgserver, pgs = _pgserver()
    attempts = 0
    while True:
        attempts += 1
        if pgdata.exists():
            with pgs.PostgresServer._lock:
                _clear_stale_state(pgdata, log)
        try:
            server = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
            break
        except Exception as exc:
            # After postgres was killed, its backends may still hold the shared memory for a
            # moment ("pre-existing shared memory block is still in use"): retry shortly.
            pgs.PostgresServer._instances.pop(pgdata, None)
            if attempts >= 3:
                tail = ""
                logfile = pgdata / "log"
                if logfile.exists():
                    tail = " | ".join(logfile.read_text(errors="replace").splitlines()[-3:])
                raise DatabaseError(
                    f"cannot start embedded PostgreSQL in {pgdata}: "
                    f"{type(exc).__name__}: {exc} {tail}".strip()
                ) from exc
            if log is not None:
                log.warning("embedded_pg_start_retry", attempt=attempts, error=f"{type(exc).__name__}: {exc}")
            time.sleep(1.0)
    url = server.get_uri()
    _wait_connectable(url, 10.0)
    ms = (time.perf_counter() - t0) * 1000
    if log is not None:
        log.info(
            "embedded_pg_ready", pgdata=str(pgdata), startup_ms=round(ms, 1), postgres_pid=server.get_pid()
        )
    return Database(url=url, embedded=True, startup_ms=ms, server=server)


def open_database(cfg: Any, home: Path, log: Any = None) -> Database:
    """``cfg.database.url`` when set, else the embedded server under ``home/pgdata``."""
    url = cfg.database.url
    if url:
        t0 = time.perf_counter()
        try:
            _wait_connectable(url, 5.0)
        except DatabaseError as exc:
            raise DatabaseError(f"database.url is not reachable: {str(exc).split(': ', 1)[-1]}") from None
        return Database(url=url, embedded=False, startup_ms=(time.perf_counter() - t0) * 1000)
    return start_embedded(home / "pgdata", log)
