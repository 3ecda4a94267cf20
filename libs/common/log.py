"""structlog, configured once per process.

JSON lines go to ``$NEOPULSE_HOME/log/<service>.log`` (rotated), with every field. The
console (stderr; honcho's stream under ``make up``) gets one short line per event an operator
acts on (``OPERATOR_LINES``: orders approved or refused, fills, brackets, risk and feed state,
alerts) and one line per warning or error, tracebacks included; other events stay in the
file. ``log.console_level`` (or a service's ``--verbose``) prints every line in full instead:
rich when stderr is a TTY, ``key=value`` otherwise. Every line carries ``service`` and
``pid``. Known secret values are replaced by ``***`` in every rendered line, tracebacks
included.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
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
    console_level: str = "",
) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``service``.

    ``console_level`` empty: the short operator console; a level name: every line at that
    level or above in full (``console`` True: rich, False: ``key=value``, None: rich on a
    TTY). ``NEOPULSE_CONSOLE_LEVEL`` in the environment overrides it."""
    secrets = list(secrets)
    _state.last_call = {
        "service": service, "home": home, "level": level, "secrets": secrets,
        "max_bytes": max_bytes, "backups": backups, "console": console, "console_level": console_level,
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

    full_level = os.environ.get("NEOPULSE_CONSOLE_LEVEL", console_level).upper()
    if console is None:
        console = sys.stderr.isatty()
    stream: logging.StreamHandler[Any]
    if not full_level:
        stream = _OperatorConsole(sys.stderr)
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(processors=[_operator_line], foreign_pre_chain=shared)
        )
    else:
        stream = logging.StreamHandler(sys.stderr)
        renderer: Any = (
            structlog.dev.ConsoleRenderer(colors=True)
            if console
            else structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)
        )
        stream.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
                foreign_pre_chain=shared,
            )
        )
        stream.setLevel(full_level)
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


# ---------------------------------------------------------------------- operator console
def _px(value: Any) -> str:
    return "market" if value is None else str(value)


def _opt(label: str, value: Any) -> str:
    return f" {label} {value}" if value not in (None, "", [], {}) else ""


def _order(e: Mapping[str, Any]) -> str:
    return f"{e['side']} {e['quantity']} {e['symbol']} @ {_px(e.get('price'))} [{e['strategy_id']}]"


def _fields(e: Mapping[str, Any]) -> str:
    """``k=v`` of the fields a reader needs (not the ones every line carries)."""
    parts = []
    for k, v in e.items():
        if k in _META or v is None:
            continue
        text = str(v).replace("\n", " ")
        parts.append(f"{k}={text!r}" if " " in text else f"{k}={text}")
    return " ".join(parts)


_META = frozenset({"event", "level", "ts", "timestamp", "service", "pid", "logger", "exc_info", "exception",
                   "stack", "_record", "_from_structlog"})

Line = Callable[[Mapping[str, Any]], str]

#: The events printed on the console below WARNING, each as one short line (a template that
#: needs a field the event lacks prints nothing: the strategy's own ``order_approved`` is left
#: to risk's, which names the order). Warnings and errors always print: with their line here,
#: or as ``event k=v…``. The JSON log file keeps every event with every field.
OPERATOR_LINES: dict[str, Line] = {
    # orders (risk decides, execution places, the strategy sees the fills)
    "order_approved": lambda e: f"APPROVED {_order(e)} → order {e['order_id']}",
    "order_rejected": lambda e: (
        f"REFUSED {_order(e)}: {e['reason']}" if "symbol" in e
        else f"order {e['request_id']} refused: {e['reason']}"
    ),
    "order_refused": lambda e: f"execution REFUSED order {e['order_id']}: {e['reason']}",
    "order_request_failed": lambda e: f"order {e['request_id']}: no answer from risk ({e['error']})",
    "fill": lambda e: (
        f"FILL {e['side']} {e['quantity']} {e['symbol']} @ {e['price']} (order {e['order_id']})"
    ),
    "bracket_armed": lambda e: f"BRACKET armed {_fields(e)}",
    "bracket_closed": lambda e: f"BRACKET closed {_fields(e)}",
    "entries_cancelled": lambda e: f"cancelled {e['count']} open entries: {e['reason']}",
    "flatten_requested": lambda e: (
        f"FLATTEN requested by {e['source']}: {e.get('symbol') or 'every position'}"
        f"{_opt('of', e.get('strategy_id'))}"
    ),
    "flatten_done": lambda e: (
        f"FLATTEN done: closing {e['closing']}, cancelled {e['cancelled']}, skipped {e['skipped']}"
    ),
    "carried_positions": lambda e: f"carried {e['count']} positions over from the broker",
    "execution_ready": lambda e: (
        f"ready: {e['broker']} broker{' (LIVE)' if e.get('live') else ''}, "
        f"{e['open_orders']} open orders, {e['positions']} positions"
    ),
    "kotak_login": lambda e: f"Kotak session opened{' (sandbox)' if e.get('sandbox') else ''}",
    "kotak_logout": lambda e: f"Kotak session closed ({e['day']})",
    "alert": lambda e: f"ALERT {e.get('code') or ''}: {e['text']}",
    # risk
    "risk_starting": lambda e: (
        f"limits: {e['max_qty']} qty, {e['max_notional']} notional, {e['max_daily_loss']} daily loss, "
        f"{e['max_orders_per_sec']} orders/s"
    ),
    "day_state_loaded": lambda e: (
        f"risk {e['state']} for {e['trading_day']}: net PnL {e['net_pnl']}, {e['positions']} positions, "
        f"kill switch {'ON' if e['kill_switch'] else 'off'}"
    ),
    "kill_switch": lambda e: (
        f"KILL SWITCH {'ON' if e['on'] else 'OFF'} ({e['source']})"
        f"{': ' + str(e['reason']) if e.get('reason') else ''}"
    ),
    "risk_alert": lambda e: f"RISK {e['code']}: {e['text']}",
    "risk_event_recorded": lambda e: f"risk event {e['risk_event']} ({e['source']}): {e['reason']}",
    "trading_day_changed": lambda e: f"trading day {e['today'] if 'today' in e else e['day']}",
    # feed
    "feed_started": lambda e: (
        f"feed {e['source']}: {e['subscribed']} instruments{', recording' if e.get('recording') else ''}"
    ),
    "feed_state": lambda e: f"feed {e['state']} ({e['source']}){_opt('—', e.get('detail'))}",
    "sfeed_connected": lambda e: (
        f"SFeed connected: {e['subscriptions']} subscriptions, {e['reconnects']} reconnects"
    ),
    "sfeed_connection_lost": lambda e: f"SFeed connection lost: {e['reason']}; retry in {e['retry_in_s']} s",
    "sfeed_stale": lambda e: f"SFeed silent for {e['silent_s']} s",
    "master_synced": lambda e: f"instrument master synced: {e['instruments']} instruments",
    "master_reloaded": lambda e: f"instrument master reloaded: {e['instruments']} instruments",
    # strategies
    "strategy_starting": lambda e: (
        f"strategy {e['strategy_id']} ({e['strategy']}) on {', '.join(map(str, e['instruments'])) or '-'}"
    ),
    "positions_restored": lambda e: f"positions restored: {_fields(e['positions']) or 'flat'}",
    "strategy_hook_failed": lambda e: (
        f"strategy {e['strategy_id']}: {e['hook']} raised {e['error']} "
        f"({e['errors']} errors so far, {e['action']})"
    ),
    "strategy_halted": lambda e: f"strategy {e['strategy_id']} HALTED: {e['reason']}",
    # every service
    "service_started": lambda _e: "started",
    "service_stopped": lambda e: f"stopped: {e['reason']} (exit {e['exit_code']})",
    "signal_received": lambda e: f"{e['signal']}: stopping",
}


def _operator_line(_logger: Any, _name: str, event_dict: Any) -> str:
    """One short console line, or "" for an event that stays in the log file."""
    record: logging.LogRecord = event_dict["_record"]
    event = str(event_dict.get("event", ""))
    line = OPERATOR_LINES.get(event)
    text = ""
    if line is not None:
        try:
            text = line(event_dict)
        except (KeyError, TypeError, AttributeError):
            text = ""
    if record.levelno < logging.WARNING and not text:
        return ""
    if not text:
        rest = _fields(event_dict)
        text = f"{event} {rest}" if rest else event
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    out = f"{stamp} {record.levelname:<8} {text}"
    if event_dict.get("exc_info") or record.exc_info:
        formatted = structlog.processors.format_exc_info(_logger, _name, dict(event_dict))
        if record.exc_info and "exception" not in formatted:
            formatted["exception"] = logging.Formatter().formatException(record.exc_info)
        if formatted.get("exception"):
            out += "\n" + str(formatted["exception"]).rstrip()
    return out


class _OperatorConsole(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the operator line of a record; skips records whose line is empty."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = record.msg
        return isinstance(msg, dict) and msg.get("event") in OPERATOR_LINES

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if text:
                self.stream.write(text + self.terminator)
                self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


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
