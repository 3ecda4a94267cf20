"""The Kotak broker's rate limiter (services/execution/brokers/ratelimit.py) under real threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from services.execution.brokers.ratelimit import RateLimiter
from tests.helpers import eventually


def max_in_window(stamps: list[float], window: float) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t - start < window) for i, start in enumerate(stamps))


def test_no_window_holds_more_calls_than_the_rate_and_bursts_leave_at_once() -> None:
    limiter = RateLimiter(5, period=0.2)
    starts: list[float] = []
    waits: list[float] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        waited = limiter.acquire()
        try:
            with lock:
                starts.append(time.monotonic())
                waits.append(waited)
            time.sleep(0.01 * (i % 3))  # calls of different lengths
        finally:
            limiter.release()

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(call, range(17)))

    assert max_in_window(starts, 0.2) <= 5
    assert sum(1 for w in waits if w < 0.1) >= 5  # a burst of five leaves at once
    assert max(starts) - min(starts) >= 0.6  # 17 calls at 5 per 0.2 s: at least three refills


def test_waiters_are_served_in_arrival_order() -> None:
    limiter = RateLimiter(1, period=0.05)
    order: list[int] = []
    limiter.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (limiter.acquire(), order.append(i), limiter.release()))
        t.start()
        threads.append(t)
        eventually(lambda i=i: limiter._next_ticket == i + 2, timeout=5)  # queued before the next
    limiter.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_fractional_rates_round_down_and_slow_rates_stretch_the_period() -> None:
    assert (RateLimiter(2.5).tokens, RateLimiter(2.5).period) == (2, 1.0)
    assert (RateLimiter(0.5).tokens, RateLimiter(0.5).period) == (1, 2.0)
