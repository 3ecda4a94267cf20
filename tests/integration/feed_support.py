"""Helpers for the feed's integration tests: run ``python -m services.feed`` as a real
process with its own home and ports, ask its REP, and collect what it publishes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from libs.common.bus import Bus, Subscriber
from libs.common.config import load_config
from libs.common.messages import FeedStatus, Message, Reply, Tick
from tests.helpers import eventually, stack_env
from tests.kit import processes

ROOT = Path(__file__).resolve().parents[2]


class FeedProc:
    """One feed process. ``env`` entries are NEOPULSE_* overrides (values as strings/JSON)."""

    def __init__(self, home: Path, base_port: int, **env: Any) -> None:
        self.home = home
        self.base_port = base_port
        self.env = stack_env(home, base_port, NEOPULSE_ENV_FILE=str(home / "no.env"), **env)
        self.env.setdefault("NEOPULSE_CONSOLE_LEVEL", "WARNING")
        self.cfg = load_config(env=self.env)
        self.bus = Bus(self.cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self.out_path = home / f"feed-{base_port}.out"

    @property
    def pub(self) -> str:
        return self.cfg.bus.endpoint("feed_pub")

    @property
    def rep(self) -> str:
        return self.cfg.bus.endpoint("feed_rep")

    def subscriber(self, *topics: bytes) -> Subscriber:
        """Connect before ``start()`` to see everything from the first message on."""
        return self.bus.subscriber([self.pub], list(topics) or [b""])

    def start(self) -> FeedProc:
        self.home.mkdir(parents=True, exist_ok=True)
        out = self.out_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.feed"], cwd=ROOT, env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        return self

    def ask(self, msg: Message, timeout_ms: int = 3000) -> Message:
        return processes.ask(self.bus, self.cfg, "feed_rep", msg, timeout_ms)

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        from libs.common.messages import GetStatus

        def ready() -> dict[str, Any] | None:
            self.check_alive()
            try:
                reply = self.ask(GetStatus(), timeout_ms=500)
            except Exception:
                return None
            assert isinstance(reply, Reply)
            return reply.data  # type: ignore[no-any-return]

        return eventually(ready, timeout, message="feed answering GetStatus")

    def status(self) -> dict[str, Any]:
        from libs.common.messages import GetStatus

        reply = self.ask(GetStatus())
        assert isinstance(reply, Reply) and reply.ok
        return reply.data  # type: ignore[no-any-return]

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"feed exited with {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def log_lines(self) -> str:
        path = self.home / "log" / "feed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        rc = processes.stop(self.proc, timeout=timeout)
        self.bus.close()
        return rc


class Collector:
    """Drains a subscriber into lists of ticks and feed statuses."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.ticks: list[Tick] = []
        self.statuses: list[FeedStatus] = []
        self.other: list[Message] = []

    def _on(self, _topic: bytes, msg: Message) -> None:
        if isinstance(msg, Tick):
            self.ticks.append(msg)
        elif isinstance(msg, FeedStatus):
            self.statuses.append(msg)
        else:
            self.other.append(msg)

    def poll(self) -> Collector:
        if self.sub.sock.poll(20):
            self.sub.drain(self._on, 200_000)
        return self

    def states(self) -> list[str]:
        return [s.state for s in self.statuses]

    def wait_ticks(self, n: int, timeout: float = 15.0) -> list[Tick]:
        eventually(lambda: len(self.poll().ticks) >= n, timeout, message=f"{n} ticks")
        return self.ticks

    def wait_live(self, feed: FeedProc, timeout: float = 15.0) -> None:
        """The feed's first LIVE: from its status, then this subscription's own copy if it has
        one. A FeedStatus is published on a change only, and the first one can go out before a
        subscriber that connected ahead of the bind has its connection up (PUB/SUB's slow
        joiner); everything after the feed answered a request is seen."""
        eventually(lambda: feed.status()["state"] == "LIVE", timeout, message="the feed LIVE")
        self.poll()

    def wait_state(self, state: str, timeout: float = 15.0, after: int = 0) -> FeedStatus:
        def found() -> FeedStatus | None:
            self.poll()
            return next((s for s in self.statuses[after:] if s.state == state), None)

        return eventually(found, timeout, message=f"FeedStatus {state}")

    def wait_heartbeat(self, timeout: float = 10.0) -> None:
        from libs.common.messages import Heartbeat

        eventually(lambda: any(isinstance(m, Heartbeat) for m in self.poll().other), timeout,
                   message="a heartbeat from the feed (subscription live)")


def env_json(value: Any) -> str:
    import json

    return json.dumps(value)

