"""Stack commands: ``stop`` (a running stack, from its run files) and ``preflight`` (the check
``make up`` runs before honcho starts)."""

from __future__ import annotations

import os
import signal
import time

import typer

from libs.common import config as config_mod
from libs.common.stack import describe, is_alive, preflight, running
from services.admin.cli import app
from services.admin.common import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, JSON_OPT, emit, fail, get_config

TIMEOUT_OPT = typer.Option(10.0, "--timeout", min=0.1, help="Seconds to wait for every service to exit.")


@app.command("stop")
def stop_cmd(timeout: float = TIMEOUT_OPT, as_json: bool = JSON_OPT) -> None:
    """Stop the stack running in this NEOPULSE_HOME: SIGTERM every service named by its run
    file ($NEOPULSE_HOME/run/), then wait for each to exit. Exit 0 when all stopped (or none
    was running), 1 when one is still running after --timeout or may not be signalled."""
    home = config_mod.home_dir()
    alive = running(home)
    if not alive:
        emit({"home": str(home), "stopped": [], "still_running": []}, as_json,
             f"nothing is running in {home}")  # fmt: skip
        raise typer.Exit(EXIT_OK)
    t0 = time.monotonic()
    refused = []
    for entry in alive:
        try:
            os.kill(entry.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError:
            refused.append(entry)
    deadline = t0 + timeout
    waiting = [e for e in alive if e not in refused]
    while waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        waiting = [e for e in waiting if is_alive(e)]
    took = time.monotonic() - t0
    stopped = [e for e in alive if e not in refused and e not in waiting]
    left = refused + waiting
    data = {"home": str(home), "seconds": round(took, 2),
            "stopped": [{"service": e.service, "pid": e.pid} for e in stopped],
            "still_running": [{"service": e.service, "pid": e.pid} for e in left]}  # fmt: skip
    if not left:
        emit(data, as_json, f"stopped {describe(stopped)} in {took:.1f} s")
        raise typer.Exit(EXIT_OK)
    why = (f"not allowed to signal {describe(refused)} (run as the user that runs the stack)" if refused
           else f"{describe(waiting)} still running after {timeout:g} s")  # fmt: skip
    if as_json:
        emit(data, as_json)
    fail(f"stopped {describe(stopped) or 'nothing'}; {why}", EXIT_REFUSED)


@app.command("preflight")
def preflight_cmd() -> None:
    """Check that a new stack may start here (``make up`` runs this first): exit 2 with one
    line naming the port in use and the running stack's pids, else exit 0 silently."""
    cfg = get_config()
    if reason := preflight(cfg, config_mod.home_dir()):
        fail(reason, EXIT_USAGE)
