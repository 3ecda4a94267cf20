"""Thread-safe rate limiting for broker calls: callers block until a token is free.

Kotak counts calls per second at its end (about 10 orders/s and 25 requests/s per API). A
classic token bucket (capacity ``n``, refilled continuously at ``n``/s) lets up to ``2n - 1``
calls into one second, and even evenly spaced sends can arrive bunched after network jitter.
So each of the ``n`` tokens here is held for the whole call and comes back ``period`` seconds
after the call *finished*. The broker received a call before we got its answer, and the next
call on that token is sent after the token came back, so the broker never sees more than
``n`` calls in any ``period`` window, whatever the jitter. Bursts of up to ``n`` still leave
at once (the first slices of a split order are not delayed).

Waiters are served in arrival order, so orders leave in the order the engine sent them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator


class RateLimiter:
    """At most ``rate`` calls per ``period`` seconds as the far end counts them."""

    def __init__(self, rate: float, *, period: float = 1.0, name: str = "") -> None:
        if rate <= 0 or period <= 0:
            raise ValueError("rate and period must be positive")
        # Whole tokens: a fractional rate rounds down (2.5/s allows 2 per period), and a rate
        # below one stretches the period instead (0.5/s allows 1 per two periods).
        self.tokens = max(1, int(rate))
        self.period = period if rate >= 1 else period / rate
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._free: deque[float] = deque([float("-inf")] * self.tokens)  # when each comes back
        self._next_ticket = 0
        self._serving = 0

    def acquire(self, count: int = 1) -> float:
        """Block until ``count`` tokens are free (first come, first served); returns the seconds
        waited. Pair it with ``release(count)`` once the call has ended, or use ``hold``."""
        count = min(max(count, 1), self.tokens)
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            started = time.monotonic()
            while True:
                if ticket == self._serving and len(self._free) >= count:
                    wait = self._free[count - 1] - time.monotonic()  # sorted: the count-th is last
                    if wait <= 0:
                        for _ in range(count):
                            self._free.popleft()
                        self._serving += 1
                        self._cond.notify_all()
                        return time.monotonic() - started
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def release(self, count: int = 1) -> None:
        """The call is over: its tokens are free again one ``period`` from now."""
        count = min(max(count, 1), self.tokens)
        with self._cond:
            back = time.monotonic() + self.period
            self._free.extend([back] * count)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, count: int = 1) -> Iterator[None]:
        """Hold ``count`` tokens for the duration of one call (a login validate makes two requests)."""
        self.acquire(count)
        try:
            yield
        finally:
            self.release(count)
