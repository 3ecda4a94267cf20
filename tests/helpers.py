"""Test helpers shared by every layer: polling waits, free ports, stack environments."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def eventually(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except AssertionError as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}") from last_exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_used_bases: set[int] = set()


def free_base_port() -> int:
    """A ``bus.base_port`` whose derived ports (+1..+499) are free right now."""
    offsets = (1, 2, 101, 102, 201, 202, 401)
    rng = (os.getpid() * 7919) % 200
    for i in range(400):
        base = 20000 + ((rng + i) % 400) * 100
        if base in _used_bases:
            continue
        if all(_port_free(base + o) for o in offsets):
            _used_bases.add(base)
            return base
    raise RuntimeError("no free base port")


# The suite and the benchmarks run at any hour: the late-entry cutoff, the intraday square-off
# and the daily Kotak logout (else the IP probe fails) are off unless a test sets them.
ANY_HOUR = {
    "NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER": "",
    "NEOPULSE_EXECUTION__SQUARE_OFF_AT": "",
    "NEOPULSE_EXECUTION__LOGOUT_AT": "",
}


def stack_env(home: Path, base_port: int, **extra: Any) -> dict[str, str]:
    """Environment for running services/CLI against one isolated stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOPULSE_")}
    env.update({
        "NEOPULSE_HOME": str(home),
        "NEOPULSE_BUS__BASE_PORT": str(base_port),
        "PYTHONUNBUFFERED": "1",
        **ANY_HOUR,
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env
