"""The broker contract execution talks to: paper and Kotak implement the same calls.

All calls are synchronous. Execution runs the Kotak ones in a thread pool, never on the
event loop. Errors decide control flow:

- ``BrokerRejected``  the broker refused the order (record it, notify); never retried.
- ``BrokerTemporary`` a call that may be retried with backoff (not ``place``).
- ``BrokerUnknown``   the outcome of ``place`` is unknown (timeout, unreadable reply): the
                      row becomes ``UNKNOWN`` and reconciliation finds it by ``client_tag``.
                      ``place`` is never re-sent blindly.
- ``BrokerIpBlocked`` operational: the broker refuses orders from this machine's IP (Kotak's
                      static-IP rule). Nothing was done; neither a retry nor a re-login helps
                      until the operator acts. Execution halts intake and alerts (``IpBlock``).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

if TYPE_CHECKING:
    import httpx

    from libs.common.instruments import MasterData
    from libs.common.messages import Tick


class BrokerError(Exception):
    def __init__(self, reason: str, raw: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def error_reason(exc: BaseException | object) -> str:
    """The broker's own words for a failure, or the exception's text."""
    return exc.reason if isinstance(exc, BrokerError) else str(exc)


class BrokerRejected(BrokerError):
    """The broker said no. The reason is the broker's own words."""


class BrokerTemporary(BrokerError):
    """Rate limited, session expired, network blip: safe to retry (except ``place``)."""


class BrokerUnknown(BrokerError):
    """We cannot tell whether the order reached the broker."""


class BrokerIpBlocked(BrokerError):
    """The broker refuses orders from this machine's IP: Kotak 100008 (the IP is not
    whitelisted) or 1037 (the session was created from another IP). Not a session expiry and
    not a passing error: the call was not carried out, and repeating it (or logging in again
    from the same IP) cannot help until the operator does what ``fix`` says."""

    def __init__(self, reason: str, *, code: int, fix: str, raw: Any = None) -> None:
        super().__init__(reason, raw)
        self.code = code
        self.fix = fix


class BrokerOrder(msgspec.Struct, frozen=True, kw_only=True):
    """One order as the broker receives it. ``order_type`` is ``LIMIT`` or ``SL`` (stop-limit):
    market intent has already been turned into a protected limit by execution."""

    client_tag: str
    segment: str
    token: str
    symbol: str
    side: str
    quantity: int
    price: Decimal
    order_type: str = "LIMIT"
    trigger_price: Decimal | None = None
    product: str = "MIS"
    validity: str = "DAY"


class BrokerAck(msgspec.Struct, frozen=True, kw_only=True):
    broker_order_id: str
    raw: Any = None


class BrokerOrderStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the broker's order book, mapped to our states."""

    broker_order_id: str
    client_tag: str
    status: str  # OPEN | PARTIAL | COMPLETE | REJECTED | CANCELLED | ACK
    quantity: int = 0
    filled_qty: int = 0
    avg_price: Decimal | None = None
    reason: str = ""
    raw: Any = None


class BrokerTrade(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the broker's trade book. ``trade_id`` is unique per broker."""

    trade_id: str
    broker_order_id: str
    client_tag: str
    side: str
    quantity: int
    price: Decimal
    ts_ns: int = 0
    raw: Any = None


class BrokerPosition(msgspec.Struct, frozen=True, kw_only=True):
    """A position the broker carries from an earlier day (NRML / CNC): signed quantity."""

    segment: str
    token: str
    symbol: str
    product: str
    quantity: int
    avg_price: Decimal = Decimal(0)
    raw: Any = None


class IpBlock(msgspec.Struct, frozen=True, kw_only=True):
    """An episode of the broker refusing orders from this machine's IP (``LiveBroker.ip_block``).

    While it exists, new orders are refused and no order call is sent (``refusing`` stays True: a
    login is no proof, Kotak never IP-checks one). The episode ends only when an order call --
    the one a probe login lets through -- passes the broker's IP check. ``episode`` changes with
    each new episode and when the code changes. ``note``: why the probe stopped, if it did (a
    login refused for the IP again and again, or for the credentials)."""

    episode: int
    code: int  # the broker's code: Kotak 100008 (IP not whitelisted) | 1037 (session from another IP)
    reason: str  # what the broker says, in the trader's words
    fix: str  # what the operator must do
    refusing: bool = True
    ip: str = ""  # this machine's public IP as the broker sees it, when known
    since_ns: int = 0
    note: str = ""

    @property
    def summary(self) -> str:
        """One line for a refusal, the heartbeat and ``neopulse status``."""
        note = f"; NeoPulse stopped trying: {self.note}" if self.note else ""
        return f"broker refuses orders from this machine's IP: {self.reason}; fix: {self.fix}{note}"


BrokerEvent = BrokerOrderStatus | BrokerTrade


class Broker(Protocol):
    """What execution asks of every broker. ``inline`` says how its calls run: on the event loop
    (paper: fast and local) or in execution's thread pool (a real broker's blocking HTTP).
    ``book_lag_s`` is how long a just-sent order may be missing from its order book."""

    name: str
    inline: bool
    book_lag_s: float

    def place(self, order: BrokerOrder) -> BrokerAck: ...

    def cancel(self, broker_order_id: str) -> None: ...

    def modify(self, broker_order_id: str, *, quantity: int | None = None, price: Decimal | None = None,
               trigger_price: Decimal | None = None) -> None: ...

    def order_book(self) -> list[BrokerOrderStatus]: ...

    def trade_book(self) -> list[BrokerTrade]: ...

    def drain_events(self) -> list[BrokerEvent]:
        """Order-status and trade events since the last call (its order feed, or a poll)."""
        ...

    def carried_positions(self) -> list[BrokerPosition]:
        """Positions carried from earlier days (NRML / CNC)."""
        ...

    def close(self) -> None: ...


class InlineBroker(Broker, Protocol):
    """A broker simulated in process (paper): it fills on the ticks execution hands it and
    queues the resulting events for ``drain_events``."""

    events: list[BrokerEvent]

    def on_tick(self, tick: Tick) -> None: ...


class LiveBroker(Broker, Protocol):
    """A real broker account: a login session the feed can lease, a daily logout, and the
    scrip master to download."""

    master: MasterData | None

    def feed_session(self) -> dict[str, str]: ...

    def logout_if_due(self) -> bool: ...

    def scrip_master_urls(self) -> list[str]: ...

    def http_client(self) -> httpx.Client:
        """An HTTP client on the broker's own transport (for the scrip-master download)."""
        ...

    def ip_block(self) -> IpBlock | None:
        """The broker refuses orders from this machine's IP (None: it does not, as far as known)."""
        ...

    def ip_probe_due(self) -> bool:
        """While refusing for ``ip_block``: whether the bounded probe may run now."""
        ...

    def probe_ip_block(self) -> bool:
        """Log in again and let one order call test the IP (blocking; at most once per probe
        interval). True when that call passed the broker's IP check: the episode is over."""
        ...

    on_login: list[Callable[[], None]]
    """Called after every successful login (on a pool thread: must not block)."""

    def login_if_due(self) -> bool:
        """The scheduled daily login, with backoff after a failure (blocking). True when it logged in."""
        ...

    def session_refusal(self) -> str:
        """Why new orders are refused for the login ("not logged in: ..."), or ""."""
        ...

    def session_info(self) -> dict[str, Any]:
        """The login session for the heartbeat (logged in, the IP the broker sees; no secret)."""
        ...

    def set_wake(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake`` (from any thread) when the broker's push channel has news: run
        ``drain_events`` soon."""
        ...

    def order_feed_status(self) -> dict[str, Any]:
        """The push channel's state: ``state`` LIVE / DOWN / polling, ``note`` (why not LIVE)."""
        ...
