"""Notifier channels on their own, against local HTTP servers: photos, refusals, webhooks,
and a dead far end that never holds up the caller."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from libs.common.config import TelegramConfig
from services.notifier.channels.console import ConsoleChannel
from services.notifier.channels.telegram import TelegramChannel
from services.notifier.channels.webhook import WebhookChannel
from services.notifier.monitor import CRITICAL, Notice
from tests.fakes.telegram_server import TelegramFake
from tests.helpers import eventually

TOKEN = "5150:CHANNEL-test-token"


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))


@pytest.fixture
def telegram() -> Iterator[TelegramFake]:
    with TelegramFake(TOKEN) as fake:
        yield fake


def _channel(fake: TelegramFake, log: _Log, token: str = TOKEN, **kw: Any) -> TelegramChannel:
    cfg = TelegramConfig(token=token, chat_id="42", api_url=fake.api_url, max_per_sec=20)
    ch = TelegramChannel(cfg, log, kw.pop("aggregate_ms", 50), **kw)
    ch.start()
    return ch


def test_photo_is_sent_as_multipart_with_its_caption(telegram: TelegramFake) -> None:
    ch = _channel(telegram, _Log())
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8

    ch.submit(Notice("summary", "📈 NeoPulse daily summary\nNet PnL: ₹12.00", photo=png))

    eventually(lambda: telegram.messages, 5)
    sent = telegram.messages[0]
    assert sent.method == "sendPhoto" and sent.photo == png and sent.chat_id == "42"
    assert sent.text.startswith("📈 NeoPulse daily summary")
    ch.close()


def test_a_wrong_token_is_refused_once_and_not_retried(telegram: TelegramFake) -> None:
    log = _Log()
    ch = _channel(telegram, log, token="1:WRONG-token-value")

    ch.submit(Notice("fill", "FILL BUY 1 X @ 1"))

    eventually(lambda: ch.failed == 1, 5)
    assert [a.status for a in telegram.attempts] == [401]
    failed = next(kw for ev, kw in log.events if ev == "telegram_send_failed")
    assert "401" in failed["error"] and "WRONG-token-value" not in json.dumps(log.events)
    ch.close()


def test_critical_notice_cuts_the_aggregation_window_short(telegram: TelegramFake) -> None:
    ch = _channel(telegram, _Log(), aggregate_ms=5000)
    t0 = time.monotonic()

    ch.submit(Notice("fill", "FILL BUY 1 X @ 1", symbol="X"))
    ch.submit(Notice("down", "risk is DOWN", CRITICAL))

    eventually(lambda: telegram.messages, 3)
    assert time.monotonic() - t0 < 2
    assert telegram.messages[0].text.startswith("risk is DOWN\n1 fill")
    ch.close()


def test_dead_telegram_neither_blocks_submit_nor_close(telegram: TelegramFake) -> None:
    telegram.dead = True
    ch = _channel(telegram, _Log(), timeout_s=30, maxsize=10)

    t0 = time.monotonic()
    for i in range(100):
        ch.submit(Notice("fill", f"FILL BUY {i} X @ 1"))
    submitted = time.monotonic() - t0
    eventually(lambda: telegram.attempts or ch.queue.qsize() < 10, 3)
    t1 = time.monotonic()
    ch.close(timeout=0.5)

    assert submitted < 0.1
    assert ch.dropped >= 80  # the bounded queue keeps the newest
    assert time.monotonic() - t1 < 1.0


def test_console_prints_every_notice_with_time_and_level() -> None:
    out = io.StringIO()
    ch = ConsoleChannel(_Log(), stream=out)
    ch.start()

    ch.submit(Notice("fill", "FILL SELL 5 INFY-EQ @ 1500.10", ts_ns=1_700_000_000_000_000_000))
    ch.submit(Notice("summary", "line one\nline two", attachment="/tmp/summary.png"))

    eventually(lambda: ch.sent == 2, 3)
    text = out.getvalue()
    assert "INFO     FILL SELL 5 INFY-EQ @ 1500.10" in text
    assert "line two" in text and "chart: /tmp/summary.png" in text
    ch.close()


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    fail_first: list[int]

    def log_message(self, *_: Any) -> None:
        return

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.fail_first:
            self.fail_first.pop()
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()


def test_webhook_posts_json_and_retries_a_503() -> None:
    handler = type("Hook", (_Hook,), {"received": [], "fail_first": [1]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ch = WebhookChannel(f"http://127.0.0.1:{server.server_address[1]}/hook", _Log())
    ch.start()

    ch.submit(Notice("fill", "FILL BUY 2 TCS-EQ @ 3850", symbol="TCS-EQ"))

    eventually(lambda: handler.received, 10)
    payload = handler.received[0]
    assert payload["text"] == "FILL BUY 2 TCS-EQ @ 3850"
    assert payload["notices"][0]["symbol"] == "TCS-EQ" and payload["notices"][0]["kind"] == "fill"
    eventually(lambda: ch.sent == 1, 5)  # counted once the 204 is back
    ch.close()
    server.shutdown()
    server.server_close()
