"""A local HTTP server speaking the Telegram Bot API, for the notifier's tests.

It answers ``POST /bot<token>/sendMessage`` (JSON or form body) and
``POST /bot<token>/sendPhoto`` (multipart/form-data with a ``photo`` file) exactly as the
Bot API does: ``{"ok": true, "result": {...}}`` on success, and on failure
``{"ok": false, "error_code": 429, "description": "Too Many Requests: retry after N",
"parameters": {"retry_after": N}}``, a 5xx, or 401 for a wrong token.

Controls for tests (thread-safe):

* ``fail_next(count, status=429, retry_after=1)`` — the next ``count`` calls fail;
* ``dead = True`` — accept connections but never answer (until ``dead = False``);
* ``messages`` — every delivered message/photo, in order; ``attempts`` — every call,
  including failed ones, with its monotonic arrival time.

Commands in (``getUpdates``, JSON body or query string, as the Bot API takes them):

* ``inject(text, chat_id, date=None)`` — a user sends ``text`` from ``chat_id`` (``date`` in
  Unix seconds, default now); returns its ``update_id``. ``inject_raw(update)`` queues any
  dict (malformed updates);
* ``getUpdates(offset, timeout, limit)`` returns the queued updates with ``update_id >=
  offset`` (at most ``limit``), waiting up to ``timeout`` seconds for one when there is none;
  an offset forgets every update below it, as Telegram confirms them (unless
  ``keep_confirmed``);
* ``fail_polls(count, status=409, body=None)`` — the next ``count`` polls fail with that
  status (``body``: raw bytes instead of the Bot API's JSON, e.g. b"<html>"); ``polls`` —
  every poll's ``(offset, timeout, status, mono)``. Polls are neither in ``attempts`` nor
  taken by ``fail_next``, which stay about sending.

Use it in-process (``with TelegramFake() as tg: ... tg.api_url``) or run it alone:
``python -m tests.fakes.telegram_server --port 8081 --token 123:ABC``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


@dataclass
class Sent:
    """One message the fake accepted."""

    method: str  # sendMessage | sendPhoto
    chat_id: str
    text: str  # message text, or the photo caption
    photo: bytes = b""
    mono: float = field(default_factory=time.monotonic)


@dataclass
class Attempt:
    method: str
    status: int
    mono: float


@dataclass
class Poll:
    """One ``getUpdates`` call as the fake received it."""

    offset: int | None
    timeout: float
    status: int = 200
    mono: float = field(default_factory=time.monotonic)


class TelegramFake:
    """The fake Bot API server. ``token`` is the only bot token it accepts."""

    def __init__(self, token: str = "123456:TEST-TOKEN", host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.messages: list[Sent] = []
        self.attempts: list[Attempt] = []
        self.dead = False
        self._lock = threading.Lock()
        self._failures: list[tuple[int, int]] = []  # (status, retry_after)
        self._release = threading.Event()
        self._next_id = 1
        self.updates: list[dict[str, Any]] = []  # queued, not yet confirmed by an offset
        self.polls: list[Poll] = []
        self._poll_failures: list[tuple[int, bytes | None]] = []
        self._arrived = threading.Condition(self._lock)
        self._next_update = 7000
        self._stopping = False
        self.keep_confirmed = False  # True: never forget an update (only offsets filter them)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_GET(self) -> None:
                fake._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fake._handle(self, self.rfile.read(length) if length else b"")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- controls
    @property
    def api_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, count: int = 1, status: int = 429, retry_after: int = 1) -> None:
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def texts(self) -> list[str]:
        with self._lock:
            return [m.text for m in self.messages]

    def inject(self, text: str, chat_id: str | int, date: int | None = None) -> int:
        """A message ``text`` from chat ``chat_id``, as a user would send it; its update_id."""
        with self._lock:
            uid = self._next_update
        chat = int(chat_id) if str(chat_id).lstrip("-").isdigit() else chat_id
        return self.inject_raw({"update_id": uid, "message": {
            "message_id": uid - 6000, "date": int(time.time()) if date is None else date,
            "chat": {"id": chat, "type": "private"}, "from": {"id": 99, "is_bot": False, "first_name": "T"},
            "text": text}})

    def inject_raw(self, update: dict[str, Any]) -> int:
        """Queue any update (its ``update_id`` as given; the next ones count on from it)."""
        with self._arrived:
            uid = update.get("update_id")
            if isinstance(uid, int):
                self._next_update = max(self._next_update, uid + 1)
            else:
                uid = self._next_update
                self._next_update += 1
            self.updates.append(update)
            self._arrived.notify_all()
        return uid

    def fail_polls(self, count: int = 1, status: int = 409, body: bytes | None = None) -> None:
        with self._lock:
            self._poll_failures.extend([(status, body)] * count)

    def replies_to(self, chat_id: str) -> list[str]:
        with self._lock:
            return [m.text for m in self.messages if m.chat_id == str(chat_id)]

    def start(self) -> TelegramFake:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.dead = False
        self._release.set()
        with self._arrived:
            self._stopping = True
            self._arrived.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> TelegramFake:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- protocol
    def _handle(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        parts = req.path.split("?")[0].strip("/").split("/")
        method = parts[1] if len(parts) == 2 else ""
        if self.dead:
            # Hold the connection open without answering, like a black-holed host.
            while self.dead and not self._release.wait(0.05):
                pass
            return
        if len(parts) != 2 or not parts[0].startswith("bot"):
            self._reply(req, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return
        if parts[0][3:] != self.token:
            self._record(method, 401)
            self._reply(req, 401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        if method == "getUpdates":  # its own failures (fail_polls) and records (polls)
            self._get_updates(req, body)
            return
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            status, retry_after = failure
            self._record(method, status)
            if status == 429:
                self._reply(req, 429, {"ok": False, "error_code": 429,
                                       "description": f"Too Many Requests: retry after {retry_after}",
                                       "parameters": {"retry_after": retry_after}})
            else:
                self._reply(req, status, {"ok": False, "error_code": status,
                                          "description": "Internal Server Error"})
            return
        if method == "getMe":
            self._record(method, 200)
            self._reply(req, 200, {"ok": True, "result": {"id": 1, "is_bot": True, "username": "fake_bot"}})
            return
        if method not in ("sendMessage", "sendPhoto"):
            self._record(method, 404)
            self._reply(req, 404, {"ok": False, "error_code": 404,
                                   "description": "Not Found: method not found"})
            return
        fields, photo = _parse_body(req.headers.get("Content-Type", ""), body)
        chat_id = str(fields.get("chat_id", ""))
        text = str(fields.get("text" if method == "sendMessage" else "caption", ""))
        if not chat_id or (method == "sendMessage" and not text) or (method == "sendPhoto" and not photo):
            self._record(method, 400)
            self._reply(req, 400, {"ok": False, "error_code": 400,
                                   "description": "Bad Request: message text is empty"})
            return
        if len(text) > (4096 if method == "sendMessage" else 1024):
            self._record(method, 400)
            self._reply(req, 400, {"ok": False, "error_code": 400,
                                   "description": "Bad Request: message is too long"})
            return
        with self._lock:
            self.messages.append(Sent(method, chat_id, text, photo))
            self.attempts.append(Attempt(method, 200, time.monotonic()))
            message_id = self._next_id
            self._next_id += 1
        result: dict[str, Any] = {"message_id": message_id, "date": int(time.time()),
                                  "chat": {"id": chat_id, "type": "private"}}
        if method == "sendMessage":
            result["text"] = text
        else:
            result["photo"] = [{"file_id": f"photo{message_id}", "file_size": len(photo)}]
            result["caption"] = text
        self._reply(req, 200, {"ok": True, "result": result})

    def _get_updates(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        fields, _ = _parse_body(req.headers.get("Content-Type", ""), body)
        query = req.path.partition("?")[2]
        fields = {**{k: v[0] for k, v in parse_qs(query).items()}, **fields}
        try:
            offset = int(fields["offset"]) if fields.get("offset") is not None else None
            timeout = min(float(fields.get("timeout") or 0), 50.0)
            limit = max(1, min(int(fields.get("limit") or 100), 100))
        except (TypeError, ValueError):
            with self._lock:
                self.polls.append(Poll(None, 0, 400))
            self._reply(req, 400, {"ok": False, "error_code": 400, "description": "Bad Request: bad offset"})
            return
        with self._lock:
            failure = self._poll_failures.pop(0) if self._poll_failures else None
            self.polls.append(Poll(offset, timeout, failure[0] if failure else 200))
        if failure is not None:
            status, raw = failure
            if raw is not None:
                req.send_response(status)
                req.send_header("Content-Type", "text/html")
                req.send_header("Content-Length", str(len(raw)))
                req.end_headers()
                req.wfile.write(raw)
                return
            desc = {409: "Conflict: terminated by other getUpdates request; make sure that only one "
                         "bot instance is running", 429: "Too Many Requests: retry after 1"}
            payload: dict[str, Any] = {"ok": False, "error_code": status,
                                       "description": desc.get(status, "Internal Server Error")}
            if status == 429:
                payload["parameters"] = {"retry_after": 1}
            self._reply(req, status, payload)
            return
        deadline = time.monotonic() + timeout
        with self._arrived:
            if offset is not None and not self.keep_confirmed:  # confirmed: Telegram forgets them
                self.updates = [u for u in self.updates if not _below(u, offset)]
            while True:
                ready = [u for u in self.updates if offset is None or not _below(u, offset)][:limit]
                left = deadline - time.monotonic()
                if ready or left <= 0 or self._stopping:
                    break
                self._arrived.wait(min(left, 0.5))
        self._reply(req, 200, {"ok": True, "result": ready})

    def _record(self, method: str, status: int) -> None:
        with self._lock:
            self.attempts.append(Attempt(method, status, time.monotonic()))

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            req.wfile.write(data)


def _below(update: dict[str, Any], offset: int) -> bool:
    """Confirmed by ``offset`` (an update with no usable id goes with the first offset)."""
    uid = update.get("update_id")
    return not isinstance(uid, int) or uid < offset


def _parse_body(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
    """Fields and the ``photo`` file of a JSON, urlencoded or multipart request."""
    if content_type.startswith("application/json"):
        return json.loads(body or b"{}"), b""
    if content_type.startswith("application/x-www-form-urlencoded"):
        return {k: v[0] for k, v in parse_qs(body.decode()).items()}, b""
    if content_type.startswith("multipart/form-data"):
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields: dict[str, Any] = {}
        photo = b""
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if name == "photo":
                photo = payload
            elif name:
                fields[str(name)] = payload.decode()
        return fields, photo
    return {}, b""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--token", default="123456:TEST-TOKEN")
    args = ap.parse_args()
    fake = TelegramFake(args.token, port=args.port)
    print(f"fake Telegram Bot API on {fake.api_url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        fake.server.serve_forever()


if __name__ == "__main__":
    main()
