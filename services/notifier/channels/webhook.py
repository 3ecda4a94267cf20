"""Optional webhook channel: POSTs JSON ``{"text", "notices": [...]}`` to ``notifier.webhook_url``.

Notices queued together go in one request. 5xx, 429 and network errors are retried with
backoff (tenacity); a webhook that stays down only fills and trims its own queue.
"""

from __future__ import annotations

from typing import Any

import httpx
import tenacity

from services.notifier.channels.base import Channel, merge
from services.notifier.channels.telegram import Rejected, Retryable
from services.notifier.monitor import Notice


class WebhookChannel(Channel):
    name = "webhook"

    def __init__(self, url: str, log: Any, timeout_s: float = 10.0, max_attempts: int = 4) -> None:
        super().__init__(log)
        self.url = url
        self.http = httpx.Client(timeout=timeout_s)
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Retryable),
            wait=tenacity.wait_exponential(multiplier=0.5, max=15),
            stop=tenacity.stop_after_attempt(max_attempts),
            sleep=self.sleep,
            reraise=True,
        )

    def deliver(self, first: Notice) -> None:
        batch = [first]
        while len(batch) < 200 and (more := self.pull(0)) is not None:
            batch.append(more)
        payload = {
            "text": merge(batch),
            "notices": [{"kind": n.kind, "level": n.level, "text": n.text, "symbol": n.symbol,
                         "ts_ns": n.ts_ns, "has_chart": n.photo is not None} for n in batch],
        }
        try:
            self._retrying(self._post, payload)
            self.sent += len(batch)
        except (Retryable, Rejected) as exc:
            self.failed += len(batch)
            self.last_error = str(exc)
            self.log.error("webhook_send_failed", notices=len(batch), error=self.last_error)

    def _post(self, payload: dict[str, Any]) -> None:
        try:
            resp = self.http.post(self.url, json=payload)
        except httpx.HTTPError as exc:
            raise Retryable(f"network: {type(exc).__name__}") from None
        if resp.status_code < 300:
            return
        if resp.status_code == 429 or resp.status_code >= 500:
            raise Retryable(str(resp.status_code))
        raise Rejected(str(resp.status_code))

    def close(self, timeout: float = 0.5) -> None:
        super().close(timeout)
        self.http.close()
