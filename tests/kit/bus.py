"""Bus stand-ins for tests: a ROUTER server with a handler, on its own reactor thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from libs.common.bus import Bus, Reactor, Responder
from libs.common.messages import Message


@contextmanager
def served(endpoint: str, handler: Callable[[Message, Responder], Message | None]) -> Iterator[Any]:
    """A ROUTER server on ``endpoint`` answering with ``handler`` in its own reactor thread;
    yields the server, stops it on exit."""
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        sbus = Bus()
        reactor = Reactor(sbus.ctx)
        server = sbus.server(endpoint)
        server.handler = handler
        reactor.add_reader(server.sock, server.drain)
        holder.update(bus=sbus, reactor=reactor, server=server)
        ready.set()
        reactor.run()
        server.close()
        reactor.close()
        sbus.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield holder["server"]
    finally:
        holder["reactor"].call_soon_threadsafe(holder["reactor"].stop)
        t.join(5)
