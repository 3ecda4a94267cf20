"""The stack one ``NEOPULSE_HOME`` runs: its run files, which of its services are alive,
which of its ports are taken, and the watch that stops a service whose supervisor died.

Every service writes ``$NEOPULSE_HOME/run/<name>.json`` (pid, start time) once started and
removes it on a clean exit; ``python -m services.strategy`` writes ``run/strategy.json``.
A run file left by a ``kill -9`` names a dead pid (or one reused by another program), so a
run file counts only while its pid is alive and started before the file's ``started_ns``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from libs.common.config import Config

# The endpoints a stack binds (the strategies' heartbeat PUBs are ipc paths under run/).
BOUND_ENDPOINTS = ("feed_pub", "feed_rep", "risk_rep", "risk_pub", "execution_rep", "execution_pub",
                   "notifier_pub")  # fmt: skip
_START_SLACK_S = 2.0  # process start time vs started_ns: clock granularity and boot-time drift


@dataclass(frozen=True)
class RunFile:
    """One ``run/<service>.json``."""

    service: str
    pid: int
    started_ns: int
    path: Path


def run_files(home: Path) -> list[RunFile]:
    """Every readable run file under ``home/run``, alive or not, by service name."""
    found = []
    for path in sorted((home / "run").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            found.append(RunFile(str(data["service"]), int(data["pid"]), int(data["started_ns"]), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a service's run file (risk-day.json) or half-written
    return found


def is_alive(entry: RunFile) -> bool:
    """True while the process that wrote ``entry`` still runs (not a zombie, not a reused pid)."""
    try:
        proc = psutil.Process(entry.pid)
        started_s = float(proc.create_time())
        return proc.status() != psutil.STATUS_ZOMBIE and started_s <= entry.started_ns / 1e9 + _START_SLACK_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def running(home: Path) -> list[RunFile]:
    """The services of the stack in ``home`` that are alive now."""
    return [e for e in run_files(home) if is_alive(e)]


def describe(entries: list[RunFile]) -> str:
    """``feed pid 101, risk pid 102``."""
    return ", ".join(f"{e.service} pid {e.pid}" for e in entries)


def _tcp_address(endpoint: str) -> tuple[str, int] | None:
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    return ("" if host in ("*", "0.0.0.0") else host), int(port)  # noqa: S104 - as the endpoint says


def port_in_use(endpoint: str) -> bool:
    """True when a ``tcp://`` endpoint cannot be bound now. SO_REUSEADDR as libzmq sets it, so
    connections in TIME_WAIT from a stack that just stopped do not count."""
    addr = _tcp_address(endpoint)
    if addr is None:
        return False
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError:
            return True
    return False


def port_holder(port: int) -> int | None:
    """The pid listening on ``port``, when this user may see it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


def busy_ports(cfg: Config) -> list[tuple[str, str]]:
    """``(endpoint name, endpoint)`` for each endpoint the stack binds that is taken."""
    return [(name, ep) for name in BOUND_ENDPOINTS if port_in_use(ep := cfg.bus.endpoint(name))]


def preflight(cfg: Config, home: Path) -> str | None:
    """Why a new stack must not start here, in one line, or None when it may."""
    alive = running(home)
    busy = busy_ports(cfg)
    ports = ", ".join(f"{ep.rpartition(':')[2]} ({name})" for name, ep in busy)
    if alive:
        held = f" and holds port {ports}" if busy else ""
        return (f"refused: a NeoPulse stack already runs in {home} ({describe(alive)}){held}; "
                f"stop it with: neopulse stop")  # fmt: skip
    if busy:
        pid = port_holder(int(busy[0][1].rpartition(":")[2]))
        by = f"pid {pid}" if pid else "another program"
        return (f"refused: port {ports} in use by {by}; stop it, or move the stack with "
                f"NEOPULSE_BUS__BASE_PORT (bus.base_port is {cfg.bus.base_port})")  # fmt: skip
    return None


SUPERVISED_ENV = "NEOPULSE_SUPERVISED"  # set to 1 by ``make up`` for the processes honcho starts


class SupervisorWatch:
    """Notices that the supervisor which started this process died, so the process can stop
    through its normal lifecycle instead of running on as an orphan that holds its ports.
    Only under ``make up`` (``NEOPULSE_SUPERVISED=1``): a service started any other way keeps
    running when whatever started it exits.

    Under honcho the chain is service → ``sh -c`` → honcho's per-process helper → honcho (→
    make): killing honcho leaves the shell and the helper alive, so neither the parent pid nor
    ``PR_SET_PDEATHSIG`` sees it. The watch therefore takes the ancestors in this process's own
    process group (the shell; the strategy supervisor) and those in the process group of the
    first ancestor outside it (honcho, its helpers, make), and reports when any of them is gone.
    Processes started by systemd or as a container's init have no such ancestors (pid 1 is
    never watched). An interactive shell that started a service directly is its supervisor:
    run a service that must outlive its shell under ``setsid``.
    """

    def __init__(self, pid: int | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.chain: list[psutil.Process] = []
        if (os.environ if environ is None else environ).get(SUPERVISED_ENV, "") != "1":
            return  # started by hand, by a test harness, by systemd or compose: nothing to watch
        with contextlib.suppress(psutil.Error, OSError):
            me = psutil.Process(pid or os.getpid())
            groups = [os.getpgid(me.pid)]
            parent = me.parent()
            while parent is not None and parent.pid > 1:
                pgid = os.getpgid(parent.pid)
                if pgid not in groups:
                    if len(groups) == 2:
                        break
                    groups.append(pgid)
                self.chain.append(parent)
                parent = parent.parent()

    def gone(self) -> str:
        """Which watched ancestor has exited ("" while all run)."""
        for proc in self.chain:
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"supervisor pid {proc.pid} exited"
        return ""
