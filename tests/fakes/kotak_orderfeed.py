"""Protocol-level fake of Kotak's order feed (the ``/realtime`` websocket of SDK 3.0.9's
``create_order_feed()``), written from the SDK's source (facts: docs/kotak-rest.md "Order feed").

Wire, as the SDK speaks it:

* The client opens a plain websocket and sends one text frame that is not JSON:
  ``{type:cn,Authorization:<trade token>,Sid:<sid>,src:WEB}`` (the JSON spelling is accepted
  too). The server answers ``{"ak":"ok","type":"cn","task":"cn","msg":"connected"}``, or
  ``{"ak":"nk",...,"msg":"Authentication Failed"}`` and closes.
* Then the server pushes ``{"type":"order","data":{<order-report row>}}`` on every change of an
  order and ``{"type":"position","data":{...}}`` after a fill. Nothing else comes from the
  client (websocket pings are answered by the library; a legacy ``{type:hb}`` is ignored).

It runs on its own asyncio loop in a thread, inside the REST fake's process
(``python -m tests.fakes.kotak_rest --order-feed``), which calls ``push`` from
``FakeKotakBroker._transition`` and serves the URL through the SDK's dynamic-config call.
Controls (through the REST fake's ``/_control/order_feed...``): deliver at once, after a delay
or only on ``release`` (so a frame can come before or after the REST books show the change),
drop every connection, refuse new ones (the socket) or their session (``nk``), send no ack, and
resend every order's current row when a session connects (Kotak's documented behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

AUTH_RE = re.compile(r"^\{type:cn,Authorization:([^,]*),Sid:([^,]*),src:([^}]*)\}$")
ACK_OK = {"ak": "ok", "type": "cn", "task": "cn", "msg": "connected"}
ACK_NK = {"ak": "nk", "type": "cn", "task": "cn", "msg": "Authentication Failed"}
AUTH_WAIT_S = 10.0


def parse_auth(frame: str) -> tuple[str, str] | None:
    """(token, sid) from the client's connect frame, or None."""
    m = AUTH_RE.match(frame.strip())
    if m:
        return m[1], m[2]
    with contextlib.suppress(ValueError, AttributeError):
        d = json.loads(frame)
        if d.get("type") == "cn":
            return str(d.get("Authorization") or ""), str(d.get("Sid") or "")
    return None


@dataclass
class FeedControls:
    mode: str = "live"  # live | hold (until release)
    delay_s: float = 0.0  # live mode: each frame goes out this long after the change
    ack: bool = True
    refuse_auth: bool = False  # answer nk and close
    refuse_connections: bool = False  # answer the upgrade with 503
    resend: bool = True  # every order's current row right after a session connects


class FakeOrderFeed:
    """The server. ``check_session(token, sid)`` says whether a session may connect;
    ``snapshot()`` gives every order's current row (for the resend)."""

    def __init__(self, check_session: Callable[[str, str], bool],
                 snapshot: Callable[[], list[dict[str, Any]]]) -> None:  # fmt: skip
        self.check_session = check_session
        self.snapshot = snapshot
        self.controls = FeedControls()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._conns: set[ServerConnection] = set()
        self._held: list[str] = []
        self.stats = {"attempts": 0, "connections": 0, "sessions": 0, "refused": 0, "frames": 0, "dropped": 0}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-orderfeed", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime"

    def start(self, port: int = 0) -> FakeOrderFeed:
        self.port = port
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake order feed did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._listen())
        self.loop.run_forever()

    async def _listen(self) -> None:
        server = await serve(self._session, "127.0.0.1", self.port, process_request=self._upgrade,
                             compression=None)  # fmt: skip
        self.port = next(iter(server.sockets)).getsockname()[1]
        self._ready.set()

    # ---- called from the REST fake's threads ---------------------------------------------

    def push(self, kind: str, data: dict[str, Any]) -> None:
        """An order (or position) changed: send its frame as the controls say."""
        self.push_raw(json.dumps({"type": kind, "data": data}, separators=(",", ":")))

    def push_raw(self, text: str) -> None:
        self.loop.call_soon_threadsafe(self._deliver, text)

    def control(self, body: dict[str, Any]) -> dict[str, Any]:
        """Change controls (any field of ``FeedControls``); returns the controls and stats."""
        for key, value in body.items():
            if not hasattr(self.controls, key):
                raise ValueError(f"no order-feed control {key!r}")
            setattr(self.controls, key, type(getattr(self.controls, key))(value))
        if self.controls.mode not in {"live", "hold"}:
            raise ValueError("mode must be live or hold")
        return self.state()

    def state(self) -> dict[str, Any]:
        c = self.controls
        return {"url": self.url, "controls": c.__dict__.copy(), "stats": dict(self.stats),
                "held": len(self._held), "connected": len(self._conns)}  # fmt: skip

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._release)

    def drop(self) -> None:
        """Cut every connection without a close frame (as a network drop looks)."""
        self.loop.call_soon_threadsafe(self._drop)

    # ---- feed loop -----------------------------------------------------------------------

    def _upgrade(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0].rstrip("/") != "/realtime":
            return conn.respond(404, "not found\n")
        self.stats["attempts"] += 1
        if self.controls.refuse_connections:
            return conn.respond(503, "service unavailable\n")
        return None

    async def _session(self, ws: ServerConnection) -> None:
        self.stats["connections"] += 1
        try:
            first = await asyncio.wait_for(ws.recv(), AUTH_WAIT_S)
        except (TimeoutError, websockets.ConnectionClosed):
            return
        text = first if isinstance(first, str) else first.decode("utf-8", "replace")
        auth = parse_auth(text)
        if auth is None or self.controls.refuse_auth or not self.check_session(*auth):
            self.stats["refused"] += 1
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps(ACK_NK))
                await ws.close(1008, "authentication failed")
            return
        self.stats["sessions"] += 1
        if self.controls.ack:
            await ws.send(json.dumps(ACK_OK))
        self._conns.add(ws)  # before the resend: a change meanwhile may come twice, never not at all
        try:
            if self.controls.resend:
                for row in self.snapshot():
                    await ws.send(json.dumps({"type": "order", "data": row}, separators=(",", ":")))
            async for _frame in ws:  # 3.0.9 sends nothing more; a legacy {type:hb} is ignored
                pass
        except websockets.ConnectionClosed:
            pass
        finally:
            self._conns.discard(ws)

    def _deliver(self, text: str) -> None:
        c = self.controls
        if c.mode == "hold":
            self._held.append(text)
        elif c.delay_s > 0:
            self.loop.call_later(c.delay_s, self._send_all, text)
        else:
            self._send_all(text)

    def _send_all(self, text: str) -> None:
        for ws in list(self._conns):
            self.stats["frames"] += 1
            task = self.loop.create_task(ws.send(text))
            task.add_done_callback(lambda t: t.exception())

    def _release(self) -> None:
        held, self._held = self._held, []
        for text in held:
            self._send_all(text)

    def _drop(self) -> None:
        for ws in list(self._conns):
            self.stats["dropped"] += 1
            self._conns.discard(ws)
            ws.transport.abort()


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.01) -> Any:
    """Poll ``cond`` until it is truthy (returns its value) or ``timeout`` passes (returns it)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(step)
