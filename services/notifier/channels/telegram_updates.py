"""Telegram commands in: ``getUpdates`` long polling on a thread of its own.

- One long poll at a time (``timeout=telegram.poll_timeout_s``); the HTTP read timeout is
  that plus a margin, so a black-holed server costs one poll, never a hung thread.
- The next ``offset`` (last ``update_id`` + 1) is written to ``OffsetStore`` — a temporary
  file, fsynced, renamed over the old one — *before* the updates are handed to the
  notifier's loop, so a restart (or a crash while a command runs) never obeys a command twice.
  Telegram also forgets an update once a later poll carries a higher offset.
- 409 (another poller or a webhook holds the bot), 429 (``retry_after``), 5xx, network errors
  and replies that are not the Bot API's JSON are one log line each and a backoff (tenacity:
  doubling from 1 s to 30 s, or what ``retry_after`` asks); nothing here can stop the notifier.
- The bot token is in every URL: it is never logged here (errors name the exception type or
  the HTTP status, with the token replaced in anything Telegram says).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tenacity

from libs.common.config import TelegramConfig
from services.notifier.channels.base import ChannelClosing
from services.notifier.channels.telegram import Rejected, Retryable
from services.notifier.commands import update_id_of

MAX_BODY = 8 * 1024 * 1024  # bytes: 100 updates of 4 KB text fit many times over
POLL_LIMIT = 100  # updates per poll (Telegram's maximum)


def bot_id(token: str) -> str:
    """The bot's public numeric id (the part of the token before ``:``); never the secret part."""
    head = token.split(":", 1)[0]
    return head if head.isdigit() else ""


class OffsetStore:
    """The next ``getUpdates`` offset of one bot, kept in ``path`` across restarts.

    ``{"bot": "<bot id>", "offset": N}``: an offset saved for another bot (a new token) is
    not used."""

    def __init__(self, path: Path, bot: str) -> None:
        self.path = path
        self.bot = bot

    def load(self) -> int | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("bot") != self.bot:
            return None
        offset = data.get("offset")
        return offset if type(offset) is int and offset >= 0 else None

    def save(self, offset: int) -> None:
        """Atomically: a reader (or a restart after a crash) sees the old offset or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"bot": self.bot, "offset": offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.path)
        with contextlib.suppress(OSError):  # the rename itself, durable
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


class UpdatePoller:
    """Polls ``getUpdates`` and hands each batch to ``deliver`` (from this thread: ``deliver``
    must be thread-safe, e.g. ``reactor.call_soon_threadsafe``)."""

    def __init__(self, cfg: TelegramConfig, log: Any, offsets: OffsetStore,
                 deliver: Callable[[list[dict[str, Any]]], None], *,
                 backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        self.log = log
        self.backoff_min_s, self.backoff_max_s = backoff_s
        self.offsets = offsets
        self.deliver = deliver
        self.poll_timeout_s = cfg.poll_timeout_s
        self._token = cfg.token
        self._url = f"{cfg.api_url.rstrip('/')}/bot{cfg.token}/getUpdates"
        self.http = httpx.Client(timeout=httpx.Timeout(cfg.poll_timeout_s + 10.0, connect=5.0))
        self.offset: int | None = offsets.load()
        self.polls = 0
        self.updates = 0
        self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telegram-updates", daemon=True)
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((Retryable, Rejected)),
            wait=self._wait,
            stop=tenacity.stop_never,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 0.5) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.http.close()  # ends a long poll in flight
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"polls": self.polls, "updates": self.updates, "errors": self.errors,
                "offset": self.offset}

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._retrying(self._poll)
            except ChannelClosing:
                return
            except Exception as exc:  # noqa: BLE001 - the poller logs and goes on, never dies
                if self._stop.is_set():
                    return
                self._note_error(f"{type(exc).__name__}: {self._clean(str(exc))}"[:200])
                if self._stop.wait(self.backoff_max_s / 6):
                    return
                continue
            self._hand_over(batch)

    def _hand_over(self, batch: list[Any]) -> None:
        ids = [uid for uid in (update_id_of(u) for u in batch) if uid is not None]
        if not ids:
            return
        if self._stop.is_set():
            return  # not handed over: not confirmed either, so not lost
        nxt = max(ids) + 1
        if self.offset is None or nxt > self.offset:
            try:
                self.offsets.save(nxt)  # before anything is obeyed: a restart never replays it
            except OSError as exc:
                # Obeying what could be replayed is worse than missing it: drop the batch.
                self._note_error(f"offset not saved ({type(exc).__name__}); {len(ids)} update(s) dropped")
                self.offset = nxt
                return
            self.offset = nxt
        self.updates += len(batch)
        self.deliver([u for u in batch if isinstance(u, dict)])

    def _poll(self) -> list[Any]:
        self.polls += 1
        params: dict[str, Any] = {"timeout": self.poll_timeout_s, "limit": POLL_LIMIT,
                                  "allowed_updates": ["message"]}
        if self.offset is not None:
            params["offset"] = self.offset
        try:
            resp = self.http.post(self._url, json=params)
        except httpx.HTTPError as exc:
            if self._stop.is_set():
                raise ChannelClosing from None
            raise Retryable(f"network: {type(exc).__name__}") from None
        except RuntimeError:  # the client was closed under us: we are stopping
            raise ChannelClosing from None
        if len(resp.content) > MAX_BODY:
            raise Retryable(f"reply of {len(resp.content)} bytes is too large")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Retryable(f"{resp.status_code} reply is not JSON")
        desc = self._clean(str(body.get("description", "")))[:200]
        if resp.status_code == 200 and body.get("ok") is True:
            result = body.get("result")
            if not isinstance(result, list):
                raise Retryable("200 reply without a result list")
            if result and all(update_id_of(u) is None for u in result):
                raise Retryable(f"{len(result)} update(s) without an update_id")
            return result
        if resp.status_code == 429:
            params_ = body.get("parameters")
            retry_after = params_.get("retry_after") if isinstance(params_, dict) else None
            after = float(retry_after) if isinstance(retry_after, int | float) else None
            raise Retryable(f"429 {desc}", after)
        if resp.status_code >= 500 or resp.status_code == 409:
            raise Retryable(f"{resp.status_code} {desc}")
        raise Rejected(f"{resp.status_code} {desc}")

    # ----------------------------------------------------------------- backoff
    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            return max(0.0, min(exc.retry_after, 300.0))
        return float(tenacity.wait_exponential(multiplier=self.backoff_min_s, min=self.backoff_min_s,
                                               max=self.backoff_max_s)(state))

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise ChannelClosing

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        self._note_error(self._clean(str(exc)), attempt=state.attempt_number, wait_s=round(wait, 2))

    def _note_error(self, error: str, **extra: Any) -> None:
        self.errors += 1
        self.last_error = error
        self.log.warning("telegram_poll_failed", error=error, **extra)

    def _clean(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text
