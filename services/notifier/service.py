"""The notifier process on the bus.

Binds ``notifier_pub`` (heartbeats only). Subscribes to risk (``risk.state.``,
``verdict.``, ``alert.``, ``hb.``), execution (``fill.``, ``order.``, ``alert.``, ``hb.``),
the feed (``feedstatus.``, ``alert.``, ``hb.`` — never ticks) and every configured strategy
instance's PUB (``hb.``). ``Monitor`` decides what to say; each channel says it from its
own thread, so nothing here waits on the network.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

from libs.common import config as config_mod
from libs.common.clock import Clock
from libs.common.config import Config, ConfigError
from libs.common.messages import DayState, GetDayState, Message
from libs.common.service import Service, main_for
from services.notifier.channels.base import Channel
from services.notifier.channels.console import ConsoleChannel
from services.notifier.channels.telegram import TelegramChannel
from services.notifier.channels.webhook import WebhookChannel
from services.notifier.monitor import Monitor, Notice, parse_time_of_day


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
        if cfg.telegram.token:
            self.channels.append(TelegramChannel(cfg.telegram, self.log, cfg.notifier.aggregate_ms))
        if cfg.notifier.webhook_url:
            self.channels.append(WebhookChannel(cfg.notifier.webhook_url, self.log))
        self.notices = 0

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
        self.dispatch(Notice("info", "NeoPulse notifier started; channels: "
                                     + ", ".join(ch.name for ch in self.channels)))

    def on_stop(self) -> None:
        for ch in self.channels:
            ch.close(timeout=0.5)

    def status_info(self) -> dict[str, Any]:
        return {
            "notices": self.notices,
            "channels": {ch.name: ch.stats() for ch in self.channels},
            "down": self.monitor.down_services(),
        }

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


def main() -> None:
    main_for(NotifierService)
