"""Latency per hop over the last minute, in microseconds: the one recorder every service uses.

A service keeps one ``HopRecorder`` per hop it sees (``HOPS`` names them) in its
``LatencyBook``; its heartbeat carries ``LatencyBook.summary()`` under ``info["latency"]``
and ``neopulse status --latency`` shows it. A hop is measured between two epoch-nanosecond
times (a message's ``ts_ns`` or a local ``time.time_ns()``, and ``time.time_ns()`` when the
hop ends), so hops that cross processes rely on one host clock.

The window: values go into one HdrHistogram per ``SLOT_S`` (5 s) slot, kept in a ring of
``WINDOW_S / SLOT_S + 1`` slots; ``summary`` merges the slots of the last minute (60 to 65 s,
in 5 s steps). The hot path is ``record``: an integer compare (has the slot ended?), a
subtraction, and ``record_value`` on a histogram allocated at start. It never raises: a
negative value (clock skew, a sender's clock ahead), one above ``HIGHEST_US`` (60 s: a stale
or made-up ``ts_ns``) and anything that is not a number are counted, not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hdrh.histogram import HdrHistogram

UNITS = "us"  # every figure is in microseconds
HIGHEST_US = 60_000_000  # 60 s: anything slower is counted as over_range, not recorded
SIGNIFICANT_FIGURES = 2  # percentiles within 1 %
WINDOW_S = 60
SLOT_S = 5

# hop id → what it measures, in the order `neopulse status --latency` lists them
HOPS: dict[str, str] = {
    "feed_publish": "feed receive -> publish",
    "tick_to_strategy": "tick -> strategy on_tick",
    "request_to_verdict": "request -> risk verdict",
    "risk_to_ack": "risk -> execution ack",
    "broker_place": "broker call -> broker ack",
    "fill_to_strategy": "broker fill -> strategy on_fill",
}


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, HIGHEST_US, SIGNIFICANT_FIGURES)


class HopRecorder:
    """One hop's rolling window. ``clock`` (epoch ns) is read only by ``summary``; ``record``
    takes the time the hop ended, which also moves the window on."""

    __slots__ = ("_clock", "_hist", "_i", "_keys", "_merged", "_n", "_rejects", "_ring", "_slot_end",
                 "_slot_ns", "hop")

    def __init__(self, hop: str, *, window_s: int = WINDOW_S, slot_s: int = SLOT_S,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if slot_s <= 0 or window_s < slot_s:
            raise ValueError(f"latency window {window_s} s must hold at least one slot of {slot_s} s")
        self.hop = hop
        self._clock = clock
        self._slot_ns = slot_s * 1_000_000_000
        self._n = window_s // slot_s + 1  # the slot being filled plus a whole window before it
        self._ring = [_histogram() for _ in range(self._n)]
        self._keys = [-1] * self._n  # the slot number (epoch ns // slot_ns) each histogram holds
        # per slot: [negative, over_range, invalid]
        self._rejects = [[0, 0, 0] for _ in range(self._n)]
        self._merged = _histogram()
        self._i = 0
        self._hist = self._ring[0]
        self._slot_end = 0
        self._advance(clock())  # a slot from the start, so even a first bad value is counted

    def record(self, start_ns: Any, end_ns: int) -> None:
        """Record the hop from ``start_ns`` to ``end_ns`` (epoch ns). Never raises."""
        try:
            if end_ns >= self._slot_end:
                self._advance(end_ns)
            us = (end_ns - start_ns) // 1000
            if us < 0:
                self._rejects[self._i][0] += 1
            elif us > HIGHEST_US:
                self._rejects[self._i][1] += 1
            else:
                self._hist.record_value(us)
        except Exception:  # noqa: BLE001 - a bad value is counted; the hot path must go on
            self._rejects[self._i][2] += 1

    def _advance(self, now_ns: int) -> None:
        key = now_ns // self._slot_ns
        i = key % self._n
        if self._keys[i] != key:  # a slot from a minute ago (or never used): start it afresh
            self._ring[i].reset()
            self._rejects[i] = [0, 0, 0]
            self._keys[i] = key
        self._i = i
        self._hist = self._ring[i]
        self._slot_end = (key + 1) * self._slot_ns

    def summary(self, now_ns: int | None = None) -> dict[str, Any]:
        """Count, p50, p99 and max (µs) over the last minute, and what was counted, not recorded."""
        now = self._clock() if now_ns is None else now_ns
        current = now // self._slot_ns
        merged = self._merged
        merged.reset()
        negative = over = invalid = 0
        for key, hist, rejects in zip(self._keys, self._ring, self._rejects, strict=True):
            if current - self._n < key <= current:
                if hist.get_total_count():
                    merged.add(hist)
                negative += rejects[0]
                over += rejects[1]
                invalid += rejects[2]
        count = merged.get_total_count()
        pct = merged.get_percentile_to_value_dict([50.0, 99.0]) if count else {50.0: 0, 99.0: 0}
        return {"count": count, "p50_us": pct[50.0], "p99_us": pct[99.0],
                "max_us": merged.get_max_value() if count else 0,
                "negative": negative, "over_range": over, "invalid": invalid}


class LatencyBook:
    """A service's hops. With ``enabled`` False ``hop`` returns None, so a call site that checks
    for None costs nothing at all (``bus.latency = false``, the benchmark's "off" runs)."""

    def __init__(self, enabled: bool = True, clock: Callable[[], int] = time.time_ns) -> None:
        self.enabled = enabled
        self._clock = clock
        self.hops: dict[str, HopRecorder] = {}

    def hop(self, name: str) -> HopRecorder | None:
        """The recorder of hop ``name`` (one of ``HOPS``), made on first use; None when off."""
        if not self.enabled:
            return None
        if name not in HOPS:
            raise ValueError(f"unknown latency hop {name!r} (known: {', '.join(HOPS)})")
        rec = self.hops.get(name)
        if rec is None:
            rec = self.hops[name] = HopRecorder(name, clock=self._clock)
        return rec

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{hop: {count, p50_us, p99_us, max_us, negative, over_range, invalid}}`` for the
        heartbeat; a hop whose summary fails says why (``error``) rather than stop the heartbeat."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, rec in self.hops.items():
            try:
                out[name] = rec.summary(now)
            except Exception as exc:  # noqa: BLE001 - latency figures must never cost the heartbeat
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return out


def rows(service: str, latency: Any) -> list[dict[str, Any]]:
    """One row per hop of a heartbeat's ``info["latency"]`` (anything unreadable skipped), in
    ``HOPS`` order: service, hop, what it measures, count, p50, p99, max and units."""
    if not isinstance(latency, dict):
        return []
    out = []
    order = list(HOPS)
    for hop in sorted(latency, key=lambda h: (order.index(h) if h in order else len(order), str(h))):
        s = latency[hop]
        if not isinstance(s, dict):
            continue
        out.append({"service": service, "hop": str(hop), "what": HOPS.get(str(hop), str(hop)),
                    "count": _int(s.get("count")), "p50": _int(s.get("p50_us")),
                    "p99": _int(s.get("p99_us")), "max": _int(s.get("max_us")), "units": UNITS,
                    "negative": _int(s.get("negative")), "over_range": _int(s.get("over_range")),
                    "invalid": _int(s.get("invalid")), "error": str(s.get("error", ""))})
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
