"""The console channel: always on, one readable line per notice on stdout."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from services.notifier.channels.base import Channel
from services.notifier.monitor import Notice


class ConsoleChannel(Channel):
    name = "console"

    def __init__(self, log: Any, stream: TextIO | None = None, maxsize: int = 10_000) -> None:
        super().__init__(log, maxsize)
        self.stream = stream or sys.stdout

    def deliver(self, first: Notice) -> None:
        batch = [first]
        while len(batch) < 500:  # write what is queued in one go
            more = self.pull(0)
            if more is None:
                break
            batch.append(more)
        out = []
        for n in batch:
            stamp = time.strftime("%H:%M:%S", time.localtime((n.ts_ns or time.time_ns()) / 1e9))
            text = n.text.replace("\n", "\n" + " " * 19)
            if n.attachment:
                text += f"\n{' ' * 19}chart: {n.attachment}"
            out.append(f"{stamp} {n.level:<8} {text}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self.sent += len(batch)
