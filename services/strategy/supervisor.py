"""Run every ``[[strategy]]`` instance of the config, each as its own child process.

This is the Procfile's ``strategy: python -m services.strategy``. It forwards SIGINT and
SIGTERM to the children, kills what is still alive 4.5 s later (so the whole exit stays
within 5 s), and exits once every child has exited, with the worst exit code. Children
die with the supervisor even if it is killed (``PR_SET_PDEATHSIG`` on Linux). SIGHUP, and
the death of its own supervisor (honcho; ``libs.common.stack.SupervisorWatch``), stop it as
SIGTERM does. ``run/strategy.json`` names its pid for ``neopulse stop`` and ``make up``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from libs.common import config as config_mod
from libs.common.config import Config
from libs.common.log import setup_logging
from libs.common.stack import SupervisorWatch

KILL_AFTER_S = 4.5
WATCH_EVERY_S = 0.5
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _write_run_file(home: Path) -> Path:
    path = home / "run" / "strategy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"service": "strategy", "pid": os.getpid(), "started_ns": time.time_ns(),
                                "pub": ""}))  # fmt: skip
    return path


def run_all(cfg: Config) -> int:
    """Start every configured instance and supervise them until they have all exited."""
    home = config_mod.home_dir()
    log: Any = setup_logging(
        "strategy",
        home,
        cfg.log.level,
        config_mod.secret_values(cfg),
        max_bytes=cfg.log.max_bytes,
        backups=cfg.log.backups,
        console_level=cfg.log.console_level,
    )
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: Any) -> None:
        if not stopping:
            log.info("signal_received", signal=signal.Signals(signum).name)
        stopping.append(signum)
        for proc in children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    children: dict[str, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    watch = SupervisorWatch()
    next_watch = time.monotonic() + WATCH_EVERY_S
    run_file = _write_run_file(home)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    for inst in cfg.strategy:
        cmd = [sys.executable, "-m", "services.strategy", inst.name, "--id", inst.id]
        children[inst.id] = subprocess.Popen(cmd, preexec_fn=preexec)  # noqa: S603, PLW1509 - our own module; prctl only
        log.info("strategy_child_started", strategy_id=inst.id, strategy=inst.name, pid=children[inst.id].pid)
    if not children:
        log.warning("no_strategies_configured", detail="add [[strategy]] entries to neopulse.toml")

    codes: dict[str, int] = {}
    stop_at: float | None = None
    while True:
        for sid, proc in children.items():
            if sid not in codes and (rc := proc.poll()) is not None:
                codes[sid] = rc
                log.log(
                    20 if rc == 0 or stopping else 40, "strategy_child_exited", strategy_id=sid, exit_code=rc
                )
        if len(codes) == len(children) and (children or stopping):
            break
        if not stopping and watch.chain and time.monotonic() >= next_watch:
            next_watch = time.monotonic() + WATCH_EVERY_S
            if gone := watch.gone():
                log.warning("supervisor_gone", detail=f"{gone}; stopping")
                _on_signal(signal.SIGTERM, None)
        if stopping and stop_at is None:
            stop_at = time.monotonic() + KILL_AFTER_S
        if stop_at is not None and time.monotonic() >= stop_at:
            for sid, proc in children.items():
                if sid not in codes:
                    log.error("strategy_child_killed", strategy_id=sid, pid=proc.pid)
                    proc.kill()
                    codes[sid] = proc.wait()
            break
        time.sleep(0.05)
    # A child killed by our forwarded signal is a clean stop, not a failure.
    worst = max((rc for rc in codes.values() if rc > 0), default=0)
    run_file.unlink(missing_ok=True)
    log.info("strategy_supervisor_stopped", exit_codes=codes)
    return worst
