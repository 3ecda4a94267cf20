"""The notifier process on the bus.

Binds ``notifier_pub`` (heartbeats only). Subscribes to risk (``risk.state.``,
``verdict.``, ``alert.``, ``hb.``), execution (``fill.``, ``order.``, ``alert.``, ``hb.``),
the feed (``feedstatus.``, ``alert.``, ``hb.`` — never ticks) and every configured strategy
instance's PUB (``hb.``). ``Monitor`` decides what to say; each channel says it from its
own thread, so nothing here waits on the network.

With ``telegram.commands`` (and a token) the trader steers from the chat ``telegram.chat_id``:
``UpdatePoller`` long-polls ``getUpdates`` on its own thread and hands each batch to this loop
(``call_soon_threadsafe``) after the next offset is on disk; ``_on_updates`` obeys the
configured chat only, through the same bus requests the ``neopulse`` CLI sends (risk:
``KillSwitch``, ``GetRiskState``; execution: ``GetPositions``, and ``Flatten`` signed with the
notifier's own credential, which execution takes for nothing else). The rules of each command
are in ``services.notifier.commands``.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from libs.common import config as config_mod
from libs.common.clock import IST, Clock
from libs.common.config import Config, ConfigError
from libs.common.messages import (
    DayState,
    Flatten,
    GetDayState,
    GetPositions,
    GetRiskState,
    KillSwitch,
    Message,
    Reply,
    RiskState,
)
from libs.common.security import present_credential
from libs.common.service import Service, main_for
from libs.common.stack_secret import NOTIFIER_FILE
from services.notifier import commands as cmd
from services.notifier.channels.base import Channel
from services.notifier.channels.console import ConsoleChannel
from services.notifier.channels.telegram import TelegramChannel
from services.notifier.channels.telegram_updates import OffsetStore, UpdatePoller, bot_id
from services.notifier.channels.webhook import WebhookChannel
from services.notifier.monitor import CRITICAL, WARNING, Monitor, Notice, parse_time_of_day

FLATTEN_TIMEOUT_MS = 30_000  # execution answers once cancels are confirmed and closes answered
FOREIGN_LOG_EVERY_S = 10.0  # one telegram_foreign_chat line per chat this often (a stranger may flood)


def strategy_pub_endpoint(strategy_id: str) -> str:
    return f"ipc://{config_mod.home_dir()}/run/strategy-{strategy_id}.pub"


def watched_services(cfg: Config) -> dict[str, str]:
    """Service name → the PUB endpoint its heartbeats come from."""
    out = {
        "feed": cfg.bus.endpoint("feed_pub"),
        "risk": cfg.bus.endpoint("risk_pub"),
        "execution": cfg.bus.endpoint("execution_pub"),
    }
    for inst in cfg.strategy:
        out[f"strategy-{inst.id}"] = strategy_pub_endpoint(inst.id)
    return out


class NotifierService(Service):
    name = "notifier"

    def __init__(self, cfg: Config, clock: Clock | None = None) -> None:
        try:
            parse_time_of_day(cfg.notifier.summary_at)
        except ValueError as exc:
            raise ConfigError(f"config error: `notifier.summary_at` {exc}") from None
        if bool(cfg.telegram.token) != bool(cfg.telegram.chat_id):
            raise ConfigError("config error: `telegram.chat_id` and `telegram.token` must be set together")
        super().__init__(cfg, pub_endpoint=cfg.bus.endpoint("notifier_pub"))
        self.clock = clock or Clock()
        self.watched = watched_services(cfg)
        self.monitor = Monitor(cfg.notifier, self.clock, self.watched, cost_rate=cfg.risk.cost_rate)
        self.channels: list[Channel] = [ConsoleChannel(self.log)]
        self.telegram: TelegramChannel | None = None
        if cfg.telegram.token:
            self.telegram = TelegramChannel(cfg.telegram, self.log, cfg.notifier.aggregate_ms)
            self.channels.append(self.telegram)
        if cfg.notifier.webhook_url:
            self.channels.append(WebhookChannel(cfg.notifier.webhook_url, self.log))
        self.notices = 0
        self.poller: UpdatePoller | None = None
        self.flatten_code = cmd.FlattenCode(cfg.telegram.confirm_s)
        self.commands_obeyed = 0
        self.commands_ignored = 0
        self._foreign_logged: dict[str, float] = {}
        if cfg.telegram.token and cfg.telegram.commands:
            offsets = OffsetStore(self.home / "state" / "telegram-offset.json", bot_id(cfg.telegram.token))
            self.poller = UpdatePoller(cfg.telegram, self.log, offsets, self._updates_from_thread)

    # ----------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        for ch in self.channels:
            ch.start()
        subs: list[tuple[str, list[bytes]]] = [
            ("risk", [b"risk.state.", b"verdict.", b"alert.", b"hb."]),
            ("execution", [b"fill.", b"order.", b"alert.", b"hb."]),
            ("feed", [b"feedstatus.", b"alert.", b"hb."]),
        ]
        subs += [(name, [b"hb."]) for name in self.watched if name.startswith("strategy-")]
        for source, topics in subs:
            self.subscribe([self.watched[source]], topics, partial(self._on_bus, source))
        self.execution = self.client(self.cfg.bus.endpoint("execution_rep"), timeout_ms=3000)
        self.add_task("watch", 0.5, self._check)
        commands = " (commands: /status /positions /pnl /halt /resume /flatten)" if self.poller else ""
        self.dispatch(Notice("info", "NeoPulse notifier started; channels: "
                                     + ", ".join(ch.name for ch in self.channels) + commands))
        if self.poller is not None:
            bus = self.cfg.bus
            self.risk = self.client(bus.endpoint("risk_rep"), timeout_ms=3000)
            # Its own client: a flatten waits up to 30 s, and a timeout fails the client's other requests.
            self.flattener = self.client(bus.endpoint("execution_rep"), timeout_ms=FLATTEN_TIMEOUT_MS)
            present_credential(self.flattener, self.cfg, self.home, name=NOTIFIER_FILE)
            self.poller.start()

    def on_stop(self) -> None:
        if self.poller is not None:
            self.poller.close(timeout=0.5)
        for ch in self.channels:
            ch.close(timeout=0.5)

    def status_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "notices": self.notices,
            "channels": {ch.name: ch.stats() for ch in self.channels},
            "down": self.monitor.down_services(),
        }
        if self.poller is not None:
            info["commands"] = {**self.poller.stats(), "obeyed": self.commands_obeyed,
                                "ignored": self.commands_ignored}
        return info

    # ----------------------------------------------------------------- flow
    def _on_bus(self, source: str, topic: bytes, msg: Message) -> None:
        for notice in self.monitor.on_message(source, msg, topic):
            self.dispatch(notice)

    def _check(self) -> None:
        for notice in self.monitor.check():
            self.dispatch(notice)
        if self.monitor.summary_due():
            self.log.info("daily_summary_due")
            self.execution.request(GetDayState(), self._on_day_state)

    def _on_day_state(self, reply: Message | Exception) -> None:
        day = reply if isinstance(reply, DayState) else None
        if day is None:
            self.log.warning("daily_summary_without_execution", error=str(reply)[:200])
        points = self.monitor.equity_points()
        trading_day = self.monitor.day.trading_day
        # matplotlib takes a moment: render off the event loop, then hand the notice back.
        threading.Thread(target=self._render_summary, args=(day, points, trading_day),
                         name="notify-summary", daemon=True).start()

    def _render_summary(self, day: DayState | None, points: list[tuple[int, float]],
                        trading_day: str) -> None:
        chart: bytes | None = None
        path = ""
        try:
            from services.notifier.chart import equity_png

            chart = equity_png(points, f"NeoPulse net PnL {trading_day}")
            out = Path(self.home) / "reports" / f"summary-{trading_day}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(chart)
            path = str(out)
        except Exception as exc:  # noqa: BLE001 - a chart failure must not lose the summary text
            self.log.error("equity_chart_failed", error=f"{type(exc).__name__}: {exc}")
        notice = self.monitor.build_summary(day, chart, path)
        self.reactor.call_soon_threadsafe(lambda: self.dispatch(notice))

    def dispatch(self, notice: Notice) -> None:
        """Log the notice and hand it to every channel (never blocks)."""
        self.notices += 1
        extra = {"symbol": notice.symbol} if notice.symbol else {}
        self.log.info("notice", kind=notice.kind, notice_level=notice.level, text=notice.text, **extra)
        for ch in self.channels:
            ch.submit(notice)

    # ----------------------------------------------------------------- Telegram commands
    def _updates_from_thread(self, batch: list[dict[str, Any]]) -> None:
        """Called on the poller's thread, after the offset is saved: on to the loop."""
        self.reactor.call_soon_threadsafe(lambda: self._on_updates(batch))

    def _on_updates(self, batch: list[dict[str, Any]]) -> None:
        for raw in batch:
            try:
                self._on_update(raw)
            except Exception as exc:  # noqa: BLE001 - one odd update never stops the others
                self.log.error("telegram_command_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def _on_update(self, raw: dict[str, Any]) -> None:
        update = cmd.parse_update(raw)
        if update is None:
            return
        if update.kind != "message":
            self.commands_ignored += 1
            self.log.info("telegram_update_ignored", update_id=update.update_id, kind=update.kind)
            return
        if not cmd.same_chat(update, self.cfg.telegram.chat_id):
            self._foreign(update)  # nothing is done and nothing is said to that chat
            return
        command = cmd.parse_command(update.text)
        if update.date < self.started_ns // 1_000_000_000:
            self.commands_ignored += 1
            if command is not None:  # old chatter is let go quietly; an old command is answered
                sent = datetime.fromtimestamp(update.date, IST).strftime("%H:%M:%S IST")
                self.log.warning("telegram_command_stale", update_id=update.update_id,
                                 command=command.word, sent=update.date)
                self._reply(f"Ignored {command.word}: sent at {sent}, before the notifier started. "
                            f"Send it again if you still mean it.")
            return
        if command is None:
            self._reply(cmd.HELP)
            return
        self.commands_obeyed += 1
        self.log.info("telegram_command", update_id=update.update_id, command=command.name,
                      arg_given=bool(command.arg))
        match command.name:
            case "status":
                self.risk.request(KillSwitch(query=True, source="telegram"), self._status_reply)
            case "pnl":
                self.risk.request(GetRiskState(), self._pnl_reply)
            case "positions":
                self.execution.request(GetPositions(), self._positions_reply)
            case "halt":
                msg = KillSwitch(on=True, reason="telegram /halt", source="telegram",
                                 request_id=f"tg-ks-{uuid.uuid4().hex[:12]}")
                self.risk.request(msg, partial(self._kill_switch_reply, True))
            case "resume":
                msg = KillSwitch(on=False, source="telegram", request_id=f"tg-ks-{uuid.uuid4().hex[:12]}")
                self.risk.request(msg, partial(self._kill_switch_reply, False))
            case "flatten":
                self._flatten(command.arg)
            case "help":
                self._reply(cmd.HELP)
            case _:
                self._reply(f"Unknown command {command.word}. {cmd.HELP}")

    def _foreign(self, update: cmd.Update) -> None:
        """One log line per foreign chat per ``FOREIGN_LOG_EVERY_S`` (with how many were ignored)."""
        self.commands_ignored += 1
        now = self.clock.monotonic()
        chat = cmd.clean(update.chat_id, 24)
        if now - self._foreign_logged.get(chat, -FOREIGN_LOG_EVERY_S) < FOREIGN_LOG_EVERY_S:
            return
        if len(self._foreign_logged) > 1000:
            self._foreign_logged.clear()
        self._foreign_logged[chat] = now
        self.log.warning("telegram_foreign_chat", update_id=update.update_id, chat_id=chat,
                         text=cmd.clean(update.text, 40), ignored_total=self.commands_ignored)

    def _reply(self, text: str, level: str = "INFO") -> None:
        """A reply goes to the Telegram chat only (the console and the log have the command)."""
        if self.telegram is not None:
            self.telegram.submit(Notice("reply", text[: cmd.MAX_TEXT - 100], level,
                                        ts_ns=time.time_ns()))

    def _no_answer(self, service: str, reply: Message | Exception) -> str:
        if isinstance(reply, Exception):
            return f"{service} did not answer ({type(reply).__name__})"
        if isinstance(reply, Reply):
            return f"{service} refused: {cmd.clean(reply.error, 200)}"
        return f"{service} answered {type(reply).__name__}"

    def _status_reply(self, reply: Message | Exception) -> None:
        risk = reply.data if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict) else None
        health = [cmd.Health(name, up, age, state, reason)
                  for name, up, age, state, reason in self.monitor.health()]
        self._reply(cmd.status_text(risk, health, "" if risk else self._no_answer("risk", reply)))

    def _pnl_reply(self, reply: Message | Exception) -> None:
        if isinstance(reply, RiskState):
            self._reply(cmd.pnl_text(reply))
        else:
            self._reply(f"PnL unknown: {self._no_answer('risk', reply)}", WARNING)

    def _positions_reply(self, reply: Message | Exception) -> None:
        if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, list):
            self._reply(cmd.positions_text(r for r in reply.data if isinstance(r, dict)))
        else:
            self._reply(f"Positions unknown: {self._no_answer('execution', reply)}", WARNING)

    def _kill_switch_reply(self, on: bool, reply: Message | Exception) -> None:
        if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict):
            self.log.warning("telegram_kill_switch", on=on, state=reply.data.get("state"))
            self._reply(cmd.kill_switch_text(reply.data), CRITICAL if on else WARNING)
            return
        what = "NOT set" if on else "NOT reset"
        hint = (" No order passes risk while it is down; at the desk: neopulse kill-switch on"
                if on else "")
        self.log.error("telegram_kill_switch_failed", on=on, error=self._no_answer("risk", reply))
        self._reply(f"Kill switch {what}: {self._no_answer('risk', reply)}.{hint}", CRITICAL)

    def _flatten(self, code: str) -> None:
        now = self.clock.monotonic()
        if not code:
            new = self.flatten_code.issue(now)
            risk = self.monitor.last_risk
            warn = (" Risk is ACTIVE: running strategies may enter again — /halt first to stop them."
                    if risk is not None and risk.state == "ACTIVE" and not risk.kill_switch else "")
            self._reply(f"Flatten ALL: cancel open orders and close every position. To confirm, send "
                        f"/flatten {new} within {self.flatten_code.ttl_s:.0f} s.{warn}", WARNING)
            return
        refused = self.flatten_code.redeem(code, now)
        if refused is not None:
            self.log.warning("telegram_flatten_refused", reason=refused)
            self._reply(f"Nothing done: {refused}. Send /flatten for a new code.", WARNING)
            return
        request_id = f"tg-flatten-{uuid.uuid4().hex[:12]}"
        self.log.warning("telegram_flatten", request_id=request_id)
        self._reply("Flattening: cancelling open orders, then closing every position…", WARNING)
        self.flattener.request(Flatten(request_id=request_id, source="telegram"), self._flatten_reply)

    def _flatten_reply(self, reply: Message | Exception) -> None:
        if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, dict):
            self.log.warning("telegram_flatten_done", cancelled=reply.data.get("cancelled"),
                             closing=len(reply.data.get("closing") or []))
            self._reply(cmd.flatten_text(reply.data), WARNING)
            return
        error = self._no_answer("execution", reply)
        self.log.error("telegram_flatten_failed", error=error)
        self._reply(f"Flatten FAILED: {error}. Check at the desk: neopulse positions", CRITICAL)


def main() -> None:
    main_for(NotifierService)
