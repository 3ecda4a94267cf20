"""Execution on Kotak with the order feed: the REST fake started with ``--order-feed`` serves
``/realtime`` and the real SDK under execution connects to it by itself (the dynamic-config
call announces the URL). Fills with the feed LIVE, with it down (polling takes over), the
alerts and ``neopulse status``, and a reconnect's resent state."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Subscriber
from libs.common.messages import Alert, Fill, GetStatus
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack

POLL_S = 1.0  # service.STATUS_POLL_S


@pytest.fixture
def ofake(tmp_path: Path) -> Iterator[KotakRestFake]:
    with KotakRestFake(tmp_path / "kotak-state.json", extra_args=["--order-feed"]) as running:
        yield running


def kotak_env(fake: KotakRestFake) -> dict[str, str]:
    c = fake.credentials
    return {
        "NEOPULSE_EXECUTION__BROKER": "kotak", "NEOPULSE_EXECUTION__BROKER_TIMEOUT_S": "2",
        "NEOPULSE_LIVE": "1", "NEOPULSE_KOTAK__CONSUMER_KEY": c.consumer_key,
        "NEOPULSE_KOTAK__MOBILE": c.mobile_number, "NEOPULSE_KOTAK__UCC": c.ucc,
        "NEOPULSE_KOTAK__MPIN": c.mpin, "NEOPULSE_KOTAK__TOTP_SECRET": c.totp_secret,
        "NEOPULSE_KOTAK__BASE_URL": fake.base_url, "NEOPULSE_KOTAK__SFEED_URL": "ws://127.0.0.1:9/feed",
    }  # fmt: skip


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, ofake: KotakRestFake) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url, quotes={"RELIANCE-EQ": 1290.0}, **kotak_env(ofake))
    yield s
    s.close()


class Watch:
    """Fills and alerts execution publishes (what a strategy and the notifier receive)."""

    def __init__(self, stack: ExecStack) -> None:
        self.sub: Subscriber = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")],
                                                    [b"fill.", b"alert."])  # fmt: skip
        self.fills: dict[str, list[tuple[float, Fill]]] = {}
        self.alerts: list[Alert] = []

    def pump(self, wait_ms: int = 20) -> None:
        while (m := self.sub.recv(wait_ms)) is not None:
            wait_ms = 0
            if isinstance(m[1], Fill):
                self.fills.setdefault(m[1].order_id, []).append((time.monotonic(), m[1]))
            elif isinstance(m[1], Alert):
                self.alerts.append(m[1])

    def fill_of(self, order_id: str, timeout: float) -> float:
        """When the order's fill was published (monotonic)."""
        eventually(lambda: (self.pump(), order_id in self.fills)[1], timeout=timeout, interval=0.001,
                   message=f"the fill of {order_id}")  # fmt: skip
        return self.fills[order_id][0][0]

    def alert(self, code: str, timeout: float) -> Alert:
        def seen() -> Alert | None:
            self.pump()
            return next((a for a in self.alerts if a.code == code), None)

        found: Alert = eventually(seen, timeout=timeout, message=f"the {code} alert")
        return found


def feed(stack: ExecStack) -> str:
    return str(stack.ok(GetStatus()).get("order_feed", ""))


def resting(stack: ExecStack, n: int) -> list[dict[str, Any]]:
    """n BUY 1 orders far below the market, acknowledged at Kotak."""
    placed = [stack.ok(stack.order(qty=1, price="1200.00")) for _ in range(n)]
    ids = {p["order_id"] for p in placed}
    eventually(lambda: all(o["broker_order_id"] for o in stack.orders() if o["order_id"] in ids),
               timeout=10, message="the orders acknowledged")  # fmt: skip
    rows = {o["order_id"]: o for o in stack.orders()}
    return [rows[p["order_id"]] for p in placed]


def fill_latencies(stack: ExecStack, fake: KotakRestFake, watch: Watch, rows: list[dict[str, Any]],
                   timeout: float) -> list[float]:  # fmt: skip
    out = []
    for row in rows:
        t0 = time.monotonic()
        fake.fill(row["broker_order_id"])
        out.append(watch.fill_of(row["order_id"], timeout) - t0)
    return out


def figures(label: str, lat: list[float]) -> str:
    ms = sorted(x * 1000 for x in lat)
    return f"{label}: n={len(ms)} p50={statistics.median(ms):.0f} ms max={ms[-1]:.0f} ms"


def test_fills_arrive_live_from_the_feed_polling_takes_over_when_it_drops_and_a_resend_changes_nothing(
    stack: ExecStack, ofake: KotakRestFake
) -> None:
    # Arrange: execution up, its order feed LIVE, a strategy's view of fills and alerts open.
    stack.start()
    watch = Watch(stack)
    eventually(lambda: feed(stack) == "LIVE", timeout=10, message="the order feed LIVE")
    status = stack.cli("status", "-s", "execution", "--listen", "2")
    assert "order_feed=LIVE" in status.stdout, status.stdout
    live_rows, down_rows = resting(stack, 10), resting(stack, 3)

    # Act 1 / Assert: with the feed LIVE a fill is in the ledger and published within ~200 ms.
    live = fill_latencies(stack, ofake, watch, live_rows, timeout=5)
    print(figures("fill latency, order feed LIVE", live))
    assert statistics.median(live) < 0.5 and max(live) < 1.5  # generous: a busy 2-core VM
    done = {o["order_id"]: o for o in stack.orders()}
    assert all(done[r["order_id"]]["status"] == "COMPLETE" for r in live_rows)

    # Act 2: the feed drops and its server refuses new connections.
    ofake.order_feed(refuse_connections=True)
    ofake.order_feed_drop()
    eventually(lambda: feed(stack) == "DOWN", timeout=3, message="DOWN in status")
    down = fill_latencies(stack, ofake, watch, down_rows, timeout=POLL_S + 5)
    print(figures("fill latency, order feed down (polling)", down))
    assert max(down) < POLL_S + 5
    watch.alert("order_feed_down", timeout=6)

    # Act 3: the feed server takes connections again; the feed comes back and resends every
    # order's state, and an old OPEN frame of a filled order comes late.
    ofake.order_feed(refuse_connections=False)
    eventually(lambda: feed(stack) == "LIVE", timeout=12, message="the order feed back")
    watch.alert("order_feed_back", timeout=6)
    sessions = ofake.order_feed()["stats"]["sessions"]
    ofake.order_feed_drop()  # once more, to a server that takes it at once: a plain resend
    eventually(lambda: ofake.order_feed()["stats"]["sessions"] > sessions, timeout=5, message="reconnected")
    first = live_rows[0]
    stale = {**ofake.order(first["broker_order_id"]), "ordSt": "open", "fldQty": 0, "avgPrc": "0.00"}
    ofake.order_feed_push(json.dumps({"type": "order", "data": stale}))
    time.sleep(1.5)

    # Assert: one fill per order, every one COMPLETE, the position the sum of them.
    watch.pump()
    rows = {o["order_id"]: o for o in stack.orders()}
    for r in live_rows + down_rows:
        assert rows[r["order_id"]]["status"] == "COMPLETE" and len(rows[r["order_id"]]["fills"]) == 1
        assert len(watch.fills[r["order_id"]]) == 1
    assert stack.positions()[("s1", "RELIANCE-EQ")] == 13
    assert [a.code for a in watch.alerts].count("order_feed_down") == 1
