"""Telegram commands, as logic: no sockets, no HTTP, no threads.

What a trader away from the desk may send the bot (from the configured ``telegram.chat_id``
only): ``/status``, ``/positions``, ``/pnl``, ``/halt``, ``/resume``, ``/flatten`` and
``/help``. ``parse_update`` reads one ``getUpdates`` entry defensively (anything odd is
``None``), ``parse_command`` turns its text into a ``Command``, ``FlattenCode`` keeps the
single-use confirmation code of ``/flatten``, and the ``*_text`` functions write the short,
plain replies a phone shows well. The notifier service wires them to the bus.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from services.notifier.monitor import money

COMMANDS = ("status", "positions", "pnl", "halt", "resume", "flatten", "help")
HELP = ("Commands: /status (risk, kill switch, services) · /positions · /pnl · /halt (kill switch on) · "
        "/resume (kill switch off) · /flatten (asks for a code first)")
MAX_TEXT = 4096  # Telegram's own limit on a message's text
MAX_POSITION_LINES = 25
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CODE_DIGITS = 4


@dataclass(frozen=True)
class Update:
    """One ``message`` update: who sent it (the chat), when (Unix seconds) and its text."""

    update_id: int
    chat_id: str = ""
    date: int = 0
    text: str = ""
    kind: str = "message"  # message, or the update's other kind (edited_message, ...: never obeyed)


@dataclass(frozen=True)
class Command:
    name: str  # one of COMMANDS, or "unknown"
    arg: str = ""
    word: str = ""  # what was typed, cleaned (for the log and the reply)


def clean(text: Any, limit: int = 64) -> str:
    """``text`` as one printable line of at most ``limit`` characters (control characters and
    NUL bytes become ``?``), safe for a log line or a reply."""
    line = _CONTROL.sub("?", str(text))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def update_id_of(raw: Any) -> int | None:
    """The ``update_id`` of a raw update (a non-negative int), else None."""
    if not isinstance(raw, Mapping):
        return None
    uid = raw.get("update_id")
    return uid if type(uid) is int and uid >= 0 else None


def parse_update(raw: Any) -> Update | None:
    """A ``getUpdates`` result entry → ``Update``; None when it has no usable ``update_id``.
    An entry that is not a plain ``message`` (an edit, a channel post, a callback) keeps its
    kind and no text: it is never obeyed."""
    uid = update_id_of(raw)
    if uid is None:
        return None
    assert isinstance(raw, Mapping)
    msg = raw.get("message")
    if not isinstance(msg, Mapping):
        kind = next((str(k) for k in raw if k != "update_id"), "empty")
        return Update(uid, kind=clean(kind, 32))
    chat = msg.get("chat")
    chat_id = chat.get("id") if isinstance(chat, Mapping) else None
    date = msg.get("date")
    text = msg.get("text")
    return Update(
        uid,
        chat_id=str(chat_id) if type(chat_id) in (int, str) else "",
        date=date if type(date) is int else 0,
        text=text if isinstance(text, str) else "",
    )


def parse_command(text: str) -> Command | None:
    """``"/flatten 4821"`` → ``Command("flatten", "4821")``; ``/status@my_bot`` works as in a
    group. None for text that is not a command (no leading ``/``)."""
    body = text.strip()
    if not body.startswith("/"):
        return None
    head, _, rest = body.partition(" ")
    word = clean(head, 40)
    name = head[1:].split("@", 1)[0].lower()
    if name not in COMMANDS:
        return Command("unknown", word=word)
    return Command(name, clean(rest.strip(), 32), word)


def same_chat(update: Update, chat_id: str) -> bool:
    """True only for a message from the configured chat (both as text: ``-100123`` == -100123)."""
    return bool(chat_id) and update.chat_id == chat_id.strip()


class FlattenCode:
    """The confirmation ``/flatten`` asks for: a fresh random code, valid ``ttl_s`` seconds,
    good once. A wrong code spends the pending one too (ask again). Times are monotonic
    seconds, passed in, so the rules test without a clock."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._code = ""
        self._expires = 0.0

    def issue(self, now: float) -> str:
        """A new code (the old one, if any, is no longer good)."""
        self._code = f"{secrets.randbelow(10 ** _CODE_DIGITS):0{_CODE_DIGITS}d}"
        self._expires = now + self.ttl_s
        return self._code

    def redeem(self, code: str, now: float) -> str | None:
        """None when ``code`` is the pending one and still valid (it is spent), else why not."""
        pending, expires = self._code, self._expires
        self._code, self._expires = "", 0.0  # single use, right or wrong
        if not pending:
            return "no flatten code is pending"
        if now > expires:
            return f"code {clean(code, 8)} expired (codes last {self.ttl_s:.0f} s)"
        if not secrets.compare_digest(code.strip(), pending):
            return f"code {clean(code, 8)} is not the one sent"
        return None


# --------------------------------------------------------------------------- replies


def _f(value: Any) -> float:
    try:
        return float(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        return 0.0


def kill_switch_text(data: Mapping[str, Any]) -> str:
    """Risk's answer to ``KillSwitch`` (its state dict) in one line."""
    state = str(data.get("state", "?"))
    if data.get("kill_switch"):
        line = f"Kill switch ON ({clean(data.get('reason') or 'no reason given', 80)}) — risk {state}"
    else:
        line = f"Kill switch off — risk {state}"
        if state == "REDUCING":
            line += f" ({clean(data.get('reason') or 'daily loss limit breached', 80)})"
    return f"{line}; net PnL {money(_f(data.get('net_pnl', 0)))}"


@dataclass(frozen=True)
class Health:
    """One watched service as the notifier hears it."""

    service: str
    up: bool
    age_s: float | None = None  # seconds since its last heartbeat (None: never heard)
    state: str = "ok"
    reason: str = ""


def status_text(risk: Mapping[str, Any] | None, services: Iterable[Health], risk_error: str = "") -> str:
    """``/status``: the kill switch and risk state, then one line per service."""
    lines = ["NeoPulse status"]
    if risk is None:
        lines.append(f"Risk: no answer ({risk_error or 'unreachable'})")
    else:
        lines.append(kill_switch_text(risk))
        if risk.get("day_loaded") is False:
            lines.append("(risk is still loading the day)")
    for h in services:
        if not h.up:
            since = "never heard" if h.age_s is None else f"silent {h.age_s:.0f}s"
            lines.append(f"{h.service}: DOWN ({since})")
        elif h.age_s is None:
            lines.append(f"{h.service}: no heartbeat yet")
        elif h.state != "ok":
            lines.append(f"{h.service}: {h.state.upper()} ({clean(h.reason, 80)})")
        else:
            lines.append(f"{h.service}: ok ({h.age_s:.1f}s ago)")
    return "\n".join(lines)


def positions_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """``/positions``: one line per open position (execution's ``GetPositions`` rows)."""
    open_rows = [r for r in rows if int(r.get("quantity") or 0)]
    if not open_rows:
        return "No open positions"
    lines = [f"Open positions: {len(open_rows)}"]
    for r in open_rows[:MAX_POSITION_LINES]:
        qty = int(r.get("quantity") or 0)
        avg = _f(r.get("avg_price"))
        last = _f(r.get("last_price"))
        line = f"{clean(r.get('symbol', '?'), 40)} {qty:+d} @ {avg:,.2f}"
        if last:
            line += f", ltp {last:,.2f}, MTM {money((last - avg) * qty)}"
        lines.append(f"{line} [{clean(r.get('strategy_id', ''), 32)}]")
    if len(open_rows) > MAX_POSITION_LINES:
        lines.append(f"… and {len(open_rows) - MAX_POSITION_LINES} more (neopulse positions)")
    return "\n".join(lines)


def pnl_text(state: Any) -> str:
    """``/pnl``: risk's ``RiskState`` — net after costs first, then what it is made of."""
    return "\n".join([
        f"Net PnL (after costs): {money(state.net_pnl)}",
        f"Realised {money(state.realised_pnl)} · unrealised {money(state.unrealised_pnl)} · "
        f"costs {money(state.cost)}",
        f"Turnover {money(state.turnover)} · {state.open_positions} open · risk {state.state}"
        + (f" ({clean(state.reason, 80)})" if state.reason else ""),
    ])


def flatten_text(report: Mapping[str, Any]) -> str:
    """Execution's flatten report (as ``neopulse flatten`` prints it), shortened for a phone."""
    lines = [f"Flatten: cancelled {int(report.get('cancelled') or 0)} open order(s)"]
    for c in report.get("closing") or []:
        lines.append(f"close {c.get('side')} {c.get('quantity')} {clean(c.get('symbol'), 40)} "
                     f"@ {c.get('price')}: {c.get('status')}")
    for s in report.get("skipped") or []:
        lines.append(f"NOT closed {clean(s.get('symbol'), 40)}: {clean(s.get('reason'), 120)}")
    for u in report.get("unconfirmed") or []:
        lines.append(f"NOT confirmed cancelled: {u.get('side')} {u.get('remaining')} "
                     f"{clean(u.get('symbol'), 40)} — check it")
    if not report.get("closing") and not report.get("skipped"):
        lines.append("no open positions")
    text = "\n".join(lines)
    return text if len(text) <= MAX_TEXT - 100 else text[: MAX_TEXT - 101] + "…"
