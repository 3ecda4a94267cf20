"""Telegram Bot API channel (``sendMessage``, ``sendPhoto``) over httpx.

- A token bucket (``telegram.max_per_sec``, burst 1) keeps within Telegram's per-chat limit.
- A burst is aggregated: notices arriving within ``notifier.aggregate_ms`` of the first one,
  or while waiting for a token, become one message (50 fills in a second → one message).
  A CRITICAL notice cuts the wait short.
- tenacity retries 429 (sleeping the ``retry_after`` Telegram asks for) and 5xx and
  transport errors with exponential backoff; other 4xx are logged and dropped.
- The bot token is part of every URL: it never appears in a log line or an error here.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import tenacity

from libs.common.config import TelegramConfig
from services.notifier.channels.base import Channel, TokenBucket, merge
from services.notifier.monitor import Notice

MAX_TEXT = 4096
MAX_CAPTION = 1024


class Retryable(Exception):
    """A temporary failure: 429 (with ``retry_after``), 5xx, or the network."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


class Rejected(Exception):
    """Telegram refused the request for good (bad token, bad chat id, bad request)."""


class TelegramChannel(Channel):
    name = "telegram"

    def __init__(self, cfg: TelegramConfig, log: Any, aggregate_ms: int = 1000, *,
                 max_attempts: int = 6, timeout_s: float = 10.0, maxsize: int = 1000) -> None:
        super().__init__(log, maxsize)
        self.chat_id = cfg.chat_id
        self._token = cfg.token
        self._base = f"{cfg.api_url.rstrip('/')}/bot{cfg.token}"
        self.aggregate_s = aggregate_ms / 1000
        self.bucket = TokenBucket(cfg.max_per_sec, capacity=1)
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
        self.retries = 0
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Retryable),
            wait=self._wait,
            stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_after_delay(120),
            sleep=self.sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    # ----------------------------------------------------------------- batching
    def deliver(self, first: Notice) -> None:
        batch = [first]
        deadline = time.monotonic() + (0 if first.urgent else self.aggregate_s)
        while True:
            left = deadline - time.monotonic()
            more = self.pull(left)
            if more is None:
                if left <= 0:
                    break
                continue
            batch.append(more)
            if more.urgent:
                deadline = time.monotonic()
        while True:  # wait for a token, collecting what arrives meanwhile
            wait = self.bucket.wait_time()
            if wait <= 0:
                break
            more = self.pull(wait)
            if more is not None:
                batch.append(more)
        while (more := self.pull(0)) is not None:
            batch.append(more)
        texts = [n for n in batch if n.photo is None]
        photos = [n for n in batch if n.photo is not None]
        if texts:
            self.bucket.take()
            self._send("sendMessage", json={"chat_id": self.chat_id, "text": merge(texts, MAX_TEXT - 96),
                                            "disable_web_page_preview": True}, count=len(texts))
        for n in photos:
            self._throttle()
            caption = n.text if len(n.text) <= MAX_CAPTION else n.text[: MAX_CAPTION - 1] + "…"
            self._send("sendPhoto", data={"chat_id": self.chat_id, "caption": caption},
                       files={"photo": ("equity.png", n.photo or b"", "image/png")}, count=1)

    def _throttle(self) -> None:
        while (wait := self.bucket.wait_time()) > 0:
            self.sleep(wait)
        self.bucket.take()

    # ----------------------------------------------------------------- HTTP
    def _send(self, method: str, count: int, **kwargs: Any) -> None:
        try:
            self._retrying(self._call, method, **kwargs)
            self.sent += count
        except (Retryable, Rejected) as exc:
            self.failed += count
            self.last_error = self._clean(str(exc))
            self.log.error("telegram_send_failed", method=method, notices=count, error=self.last_error)

    def _call(self, method: str, **kwargs: Any) -> None:
        try:
            resp = self.http.post(f"{self._base}/{method}", **kwargs)
        except httpx.HTTPError as exc:
            raise Retryable(f"network: {type(exc).__name__}") from None
        if resp.status_code == 200:
            return
        try:
            body = resp.json()
        except ValueError:
            body = {}
        desc = self._clean(str(body.get("description", "")))[:200]
        if resp.status_code == 429:
            retry_after = (body.get("parameters") or {}).get("retry_after") or resp.headers.get("Retry-After")
            raise Retryable(f"429 {desc}", float(retry_after) if retry_after else None)
        if resp.status_code >= 500:
            raise Retryable(f"{resp.status_code} {desc}")
        raise Rejected(f"{resp.status_code} {desc}")

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            self.bucket.pause(exc.retry_after)
            return min(exc.retry_after, 60.0)
        return float(tenacity.wait_exponential(multiplier=0.5, max=15)(state))

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        self.log.warning("telegram_retry", attempt=state.attempt_number, wait_s=round(wait, 2),
                         error=self._clean(str(exc)))

    def _clean(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def close(self, timeout: float = 0.5) -> None:
        super().close(timeout)
        self.http.close()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "retries": self.retries}
