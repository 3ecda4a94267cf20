"""Tick sources. Each runs inside the feed's reactor and hands ticks to a ``FeedSink``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from libs.common.bus import AsyncClient, Reactor, Subscriber
from libs.common.clock import Clock
from libs.common.config import Config
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Tick

# Connection states published as FeedStatus.
CONNECTING = "CONNECTING"
LIVE = "LIVE"
STALE = "STALE"
RECONNECTING = "RECONNECTING"
DOWN = "DOWN"


class FeedSink(Protocol):
    """What a source may use of the feed service."""

    cfg: Config
    reactor: Reactor
    clock: Clock
    master: MasterData
    log: Any

    def publish_tick(self, tick: Tick) -> None: ...

    def publish_ticks(self, ticks: list[Tick]) -> None: ...

    def publish_frames(self, topics: list[bytes], payloads: list[bytes]) -> None: ...

    def set_state(self, state: str, detail: str = "") -> None: ...

    def publish_status(self, detail: str) -> None: ...

    def client(self, endpoint: str, timeout_ms: int | None = None) -> AsyncClient: ...

    def subscribe(self, endpoints: list[str], topics: list[bytes],
                  handler: Callable[[bytes, Any], None]) -> Subscriber: ...  # fmt: skip


class Source:
    """Base class: ``start``, ``add_instruments`` (the subscription set grew), ``stop``."""

    name = "source"

    def __init__(self, sink: FeedSink) -> None:
        self.sink = sink

    def start(self, instruments: list[Instrument]) -> None:
        raise NotImplementedError

    def add_instruments(self, instruments: list[Instrument]) -> None:
        """New subscriptions (already de-duplicated and within the limit)."""

    def requested(self) -> None:
        """A client sent a Subscribe request (whether or not it added anything)."""

    def stop(self) -> None:
        """Release sockets and threads; must be quick."""

    def stats(self) -> dict[str, Any]:
        return {}
