"""The one service lifecycle every NeoPulse process uses.

``Service`` owns: config, logging, the bus context, the reactor, a PUB socket with a
``Heartbeat`` every second, SIGINT/SIGTERM/SIGHUP handling, a stop when the supervisor that
started it dies (``libs.common.stack.SupervisorWatch``), a task registry, the run file under
``$NEOPULSE_HOME/run/`` and a clean exit within 5 s. Subclasses fill in ``on_start``,
``on_stop`` and ``status_info`` and register sockets with ``self.reactor``; the hops a service
measures (``self.latency``, ``libs.common.latency``) go in its heartbeat as ``info["latency"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libs.common import config as config_mod
from libs.common.bus import AsyncClient, Bus, Publisher, Reactor, Subscriber, topic
from libs.common.clock import OFFSET_ENV, check_clock_offset, clock_offset_ns
from libs.common.config import Config, ConfigError
from libs.common.latency import LatencyBook
from libs.common.log import setup_logging
from libs.common.messages import Heartbeat
from libs.common.stack import SupervisorWatch

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
SUPERVISOR_POLL_S = 0.5  # how often a service checks that its supervisor (honcho) still runs


class Service:
    """Base class for a NeoPulse process. Subclasses set ``name`` and override hooks."""

    name = "service"

    def __init__(self, cfg: Config, name: str | None = None, pub_endpoint: str | None = None) -> None:
        if name:
            self.name = name
        self.cfg = cfg
        self.home = config_mod.home_dir()
        self.log: Any = setup_logging(
            self.name, self.home, cfg.log.level, config_mod.secret_values(cfg),
            max_bytes=cfg.log.max_bytes, backups=cfg.log.backups, console_level=cfg.log.console_level,
        )
        self.started_ns = time.time_ns()
        offset_ns = clock_offset_ns()
        if offset_ns:
            self.log.warning("clock_offset_active", env=OFFSET_ENV, offset_s=offset_ns / 1e9)
        self.bus = Bus(cfg, self.log)
        if cfg.bus.curve:
            from libs.common.security import install_curve

            install_curve(self.bus, cfg, self.name)
        self.reactor = Reactor(self.bus.ctx, spin_us=cfg.bus.spin_us)
        self.reactor.error_handler = self._on_task_error
        self.pub: Publisher | None = None
        if pub_endpoint is not None:
            self.pub = self.bus.publisher(pub_endpoint)
        self.tasks: dict[str, int] = {}
        self.subscribers: list[Subscriber] = []
        self.clients: list[AsyncClient] = []
        self._hb_topic = topic("hb", self.name)
        self.exit_code = EXIT_OK
        self.stop_reason = ""
        # per-hop latency: services take their recorders with ``self.latency.hop(name)``
        self.latency = LatencyBook(enabled=cfg.bus.latency)

    # ----------------------------------------------------------------- hooks
    def on_start(self) -> None:
        """Bind/connect sockets, load state. Raise to refuse to start."""

    def on_stop(self) -> None:
        """Flush and release resources. Must finish quickly (the whole exit is ≤ 5 s)."""

    def status_info(self) -> dict[str, Any]:
        """Extra fields for the heartbeat and ``neopulse status``."""
        return {}

    def health(self) -> tuple[str, str]:
        """``(state, reason)`` for the heartbeat: ``("ok", "")``, or ``("degraded", why)`` while
        the service runs but cannot do its job (``neopulse status`` then exits 3)."""
        return "ok", ""

    # ----------------------------------------------------------------- helpers
    def add_task(self, name: str, interval: float, fn: Callable[[], Any]) -> None:
        """Register a periodic task; failures are logged and the task keeps its schedule."""
        self.tasks[name] = self.reactor.call_every(interval, fn)

    def subscribe(self, endpoints: list[str], topics: list[bytes],
                  handler: Callable[[bytes, Any], None]) -> Subscriber:
        sub = self.bus.subscriber(endpoints, topics)
        self.reactor.add_reader(sub.sock, lambda: sub.drain(handler))
        self.subscribers.append(sub)
        return sub

    def client(self, endpoint: str, timeout_ms: int | None = None) -> AsyncClient:
        cli = AsyncClient(self.bus, self.reactor, endpoint, timeout_ms)
        self.clients.append(cli)
        return cli

    def bus_stats(self) -> dict[str, Any]:
        totals = {"gaps": 0, "malformed": 0, "timeouts": 0}
        for s in self.subscribers:
            totals["gaps"] += s.stats.gaps
            totals["malformed"] += s.stats.malformed
        for c in self.clients:
            totals["timeouts"] += c.stats.timeouts
        return totals

    def heartbeat(self) -> None:
        if self.pub is None:
            return
        info = {**self.bus_stats(), **self.status_info()}
        if self.latency.hops:
            info["latency"] = self.latency.summary()
        state, reason = self.health()
        self.pub.publish(self._hb_topic, Heartbeat(service=self.name, pid=os.getpid(),
                                                   started_ns=self.started_ns, state=state,
                                                   reason=reason, info=info))

    def stop(self, reason: str = "", exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        self.stop_reason = reason or self.stop_reason
        self.reactor.stop()

    def _check_supervisor(self, watch: SupervisorWatch) -> None:
        if gone := watch.gone():
            self.log.warning("supervisor_gone", detail=f"{gone}; stopping")
            self.stop(gone)

    def _on_task_error(self, what: str, exc: BaseException) -> None:
        self.log.error("task_failed", where=what, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    def _write_run_file(self) -> Path:
        run_dir = self.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / f"{self.name}.json"
        path.write_text(json.dumps({
            "service": self.name, "pid": os.getpid(), "started_ns": self.started_ns,
            "pub": self.pub.endpoint if self.pub else "",
        }))
        return path

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> int:
        def _on_signal(signum: int, _frame: Any) -> None:
            self.log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)  # its terminal closed: stop cleanly, not die
        watch = SupervisorWatch()  # taken before on_start, so a death during it is seen too
        run_file: Path | None = None
        try:
            self.on_start()
            run_file = self._write_run_file()
            self.add_task("heartbeat", 1.0, self.heartbeat)
            if watch.chain:
                self.add_task("supervisor_watch", SUPERVISOR_POLL_S, lambda: self._check_supervisor(watch))
            self.heartbeat()
            self.log.info("service_started", pub=self.pub.endpoint if self.pub else None)
            self.reactor.run()
        except Exception as exc:
            self.log.exception("service_crashed", error=f"{type(exc).__name__}: {exc}")
            self.exit_code = EXIT_ERROR
            self.stop_reason = f"{type(exc).__name__}: {exc}"
        finally:
            t0 = time.monotonic()
            try:
                self.on_stop()
            except Exception:
                self.log.exception("on_stop_failed")
            for s in self.subscribers:
                s.close()
            for c in self.clients:
                c.close()
            if self.pub is not None:
                self.pub.close()
            self.reactor.close()
            self.bus.close()
            if run_file is not None:
                run_file.unlink(missing_ok=True)
            self.log.info("service_stopped", reason=self.stop_reason or "stopped",
                          exit_code=self.exit_code, stop_ms=round((time.monotonic() - t0) * 1000, 1))
        return self.exit_code


VERBOSE_HELP = "print every log line on the console, not only the operator lines (log.console_level=DEBUG)"


def load_config_or_exit(*, verbose: bool = False) -> Config:
    """Load config for a service entry point; a bad config (or a bad or misplaced
    ``NEOPULSE_CLOCK_OFFSET_S``) prints one line and exits 2. ``verbose`` (a service's
    ``--verbose``) sets ``log.console_level`` to DEBUG, for this process and its children."""
    if verbose:
        os.environ["NEOPULSE_LOG__CONSOLE_LEVEL"] = "DEBUG"
    try:
        cfg = config_mod.load_config()
        check_clock_offset(cfg)
        return cfg
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main_for(factory: Callable[[Config], Service]) -> None:
    """Standard ``__main__``: load config, build the service, run it, exit with its code."""
    parser = argparse.ArgumentParser(prog=f"python -m {factory.__module__.rsplit('.', 1)[0]}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args()
    cfg = load_config_or_exit(verbose=args.verbose)
    try:
        svc = factory(cfg)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    raise SystemExit(svc.run())
