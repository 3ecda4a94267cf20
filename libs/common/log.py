"""structlog, configured once per process.

JSON lines go to ``$NEOPULSE_HOME/log/<service>.log`` (rotated); a readable console
renderer is added when stderr is a TTY. Every line carries ``service`` and ``pid``.
Known secret values are replaced by ``***`` in every rendered line, tracebacks included.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog


@dataclass
class _LoggingState:
    configured: bool = False
    # The arguments of the last setup_logging call, which reapply_logging installs again.
    last_call: dict[str, Any] | None = None


_state = _LoggingState()


class _RedactingFormatter(logging.Formatter):
    """Wraps another formatter and replaces every known secret in its output with ``***``."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def setup_logging(
    service: str,
    home: Path,
    level: str = "INFO",
    secrets: Iterable[str] = (),
    *,
    max_bytes: int = 20_000_000,
    backups: int = 5,
    console: bool | None = None,
) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``service``."""
    secrets = list(secrets)
    _state.last_call = {
        "service": service, "home": home, "level": level, "secrets": secrets,
        "max_bytes": max_bytes, "backups": backups, "console": console,
    }
    log_dir = home / "log"
    log_dir.mkdir(parents=True, exist_ok=True)

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level.upper())

    pid = os.getpid()

    def add_identity(_logger: Any, _method: str, event_dict: Any) -> Any:
        # contextvars are per thread: lines logged from worker threads (broker pool, notifier
        # channels, the ZAP authenticator) would otherwise lack service and pid.
        event_dict.setdefault("service", service)
        event_dict.setdefault("pid", pid)
        return event_dict

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_identity,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.StackInfoRenderer(),
    ]

    file_handler = logging.handlers.RotatingFileHandler(
        log_dir / f"{service}.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    file_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=shared,
        )
    )
    _wrap_redaction(file_handler, secrets)
    root.addHandler(file_handler)

    if console is None:
        console = sys.stderr.isatty()
    stream = logging.StreamHandler(sys.stderr)
    if console:
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=True),
                ],
                foreign_pre_chain=shared,
            )
        )
        stream.setLevel(level.upper())
    else:
        # Under honcho (no TTY) keep the console terse: one key=value line per warning+.
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
                ],
                foreign_pre_chain=shared,
            )
        )
        stream.setLevel(os.environ.get("NEOPULSE_CONSOLE_LEVEL", "INFO").upper())
    _wrap_redaction(stream, secrets)
    root.addHandler(stream)

    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # The SDK and other libraries log through stdlib; keep them at WARNING in our files.
    for noisy in ("neo_api_client", "websocket", "urllib3", "httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state.configured = True
    log: structlog.stdlib.BoundLogger = structlog.get_logger(service)
    return log


def _wrap_redaction(handler: logging.Handler, secrets: list[str]) -> None:
    if not secrets:
        return
    inner = handler.formatter
    assert inner is not None
    handler.setFormatter(_RedactingFormatter(inner, secrets))


def reapply_logging() -> None:
    """Re-install our configuration (after a library replaced structlog's, as the Kotak SDK
    does on import)."""
    if _state.last_call is not None:
        setup_logging(**_state.last_call)


def get_logger(name: str = "neopulse") -> Any:
    return structlog.get_logger(name)
