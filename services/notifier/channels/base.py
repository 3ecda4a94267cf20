"""A notification channel: its own thread behind a bounded queue.

``submit`` never blocks: when the queue is full the oldest notice is dropped and counted,
so a channel whose far end is dead can never slow the bus or another channel.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from services.notifier.monitor import Notice


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up."""

    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()

    def wait_time(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1

    def pause(self, seconds: float) -> None:
        """The far end asked us to wait (429 retry_after): no token before then."""
        self.tokens = min(self.tokens, 1 - seconds * self.rate)
        self.stamp = time.monotonic()


class Channel:
    """Base class: subclasses implement ``deliver(first)`` (may pull more from the queue)."""

    name = "channel"

    def __init__(self, log: Any, maxsize: int = 1000) -> None:
        self.log = log
        self.queue: queue.Queue[Notice] = queue.Queue(maxsize)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"notify-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, notice: Notice) -> None:
        while True:
            try:
                self.queue.put_nowait(notice)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def pull(self, timeout: float) -> Notice | None:
        """Next queued notice within ``timeout`` seconds (0: only what is already queued)."""
        try:
            if timeout <= 0:
                return self.queue.get_nowait()
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self.pull(0.2)
            if first is None:
                continue
            try:
                self.deliver(first)
            except Exception as exc:  # noqa: BLE001 - a channel failure is logged and never spreads
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self.log.warning("notify_channel_failed", channel=self.name, error=self.last_error)

    def deliver(self, first: Notice) -> None:
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        """Interruptible sleep for retries: returns early when the channel is closing."""
        if self._stop.wait(seconds):
            raise ChannelClosing

    def close(self, timeout: float = 0.5) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped,
                "queued": self.queue.qsize()}


class ChannelClosing(Exception):
    """Raised out of a retry sleep when the service is stopping."""


def merge(notices: list[Notice], limit: int = 4000) -> str:
    """One message for a burst: fills are counted and listed, other notices follow."""
    if len(notices) == 1:
        return notices[0].text[:limit]
    fills = [n for n in notices if n.kind == "fill"]
    others = [n for n in notices if n.kind != "fill"]
    lines: list[str] = [n.text for n in others if n.level == "CRITICAL"]
    if fills:
        symbols = sorted({n.symbol for n in fills if n.symbol})
        head = f"{len(fills)} fills" if len(fills) > 1 else "1 fill"
        lines.append(f"{head}: {', '.join(symbols[:10])}{' …' if len(symbols) > 10 else ''}")
        lines.extend("  " + n.text for n in fills)
    lines.extend(n.text for n in others if n.level != "CRITICAL")
    text = ""
    for i, line in enumerate(lines):
        if len(text) + len(line) + 1 > limit - 40:
            text += f"… and {len(lines) - i} more lines"
            break
        text += line + "\n"
    return text.rstrip("\n")
