"""What the trader should hear about, decided from bus messages. Pure: no sockets, no HTTP.

``Monitor.on_message`` turns fills, rejections, broker rejections, alerts, kill-switch and
risk-state changes and feed state changes into ``Notice``s. ``Monitor.check`` (called
twice a second) notices services whose heartbeat went missing for ``notifier.silence_s``
and says so once, then says so again when they come back. ``summary_due`` and
``build_summary`` produce the daily summary at ``notifier.summary_at`` (IST).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.common.clock import IST, Clock
from libs.common.config import NotifierConfig
from libs.common.messages import (
    Alert,
    BasketVerdict,
    DayState,
    FeedStatus,
    Fill,
    Heartbeat,
    OrderUpdate,
    RiskState,
    RiskVerdict,
)

INFO = "INFO"
WARNING = "WARNING"
CRITICAL = "CRITICAL"

# Feed states worth telling a human about (CONNECTING/RECONNECTING are transitions).
_FEED_ANNOUNCED = {"LIVE", "STALE", "DOWN"}
# Keep at most one equity point per this many seconds (a trading day is ~22k seconds).
EQUITY_STEP_S = 5.0


@dataclass(frozen=True)
class Notice:
    """One thing to tell the trader. ``kind`` groups notices when a burst is aggregated."""

    kind: str  # fill | rejection | order | alert | kill_switch | risk | feed | down | up | summary | info
    text: str
    level: str = INFO
    symbol: str = ""
    photo: bytes | None = None  # a PNG (the daily equity chart)
    attachment: str = ""  # where the PNG was saved, for the console
    ts_ns: int = 0

    @property
    def urgent(self) -> bool:
        return self.level == CRITICAL


@dataclass
class _Liveness:
    endpoint: str
    last_seen: float | None = None  # monotonic seconds
    pid: int = 0
    started_ns: int = 0
    down: bool = False
    down_since: float = 0.0
    state: str = "ok"  # the heartbeat's: ok | degraded
    reason: str = ""


@dataclass
class _Day:
    trading_day: str = ""
    fills: int = 0
    turnover: Decimal = Decimal(0)
    equity: list[tuple[int, float]] = field(default_factory=list)  # (ts_ns, net_pnl)
    summary_sent: bool = False


def parse_time_of_day(text: str) -> int:
    """``"15:45"`` or ``"15:45:30"`` → seconds after midnight."""
    parts = [int(p) for p in text.strip().split(":")]
    if len(parts) not in (2, 3) or not (0 <= parts[0] < 24 and 0 <= parts[1] < 60):
        raise ValueError(f"time of day must look like 15:45, got {text!r}")
    sec = parts[2] if len(parts) == 3 else 0
    return parts[0] * 3600 + parts[1] * 60 + sec


def money(value: float | Decimal) -> str:
    """``-1234.5`` → ``-₹1,234.50``."""
    v = float(value)
    return f"{'-' if v < 0 else ''}₹{abs(v):,.2f}"


def _verdict_strategy(topic: bytes) -> str:
    """`` [strategy]`` from a ``verdict.<strategy>.`` topic, or ""."""
    parts = topic.decode("ascii", "replace").split(".")
    return f" [{parts[1]}]" if len(parts) > 2 and parts[0] == "verdict" else ""


def _qty_price(qty: int, price: Decimal | float | None) -> str:
    return f"{qty} @ {price}" if price is not None else f"{qty} @ market"


class Monitor:
    """The notifier's judgement, fed with ``(source service, message)`` pairs."""

    def __init__(self, cfg: NotifierConfig, clock: Clock, watched: dict[str, str],
                 cost_rate: float = 0.00035) -> None:
        self.cfg = cfg
        self.clock = clock
        self.silence_s = cfg.silence_s
        # A service never heard from since we started gets a little longer (start-up order).
        self.startup_grace_s = max(cfg.silence_s * 2, 15.0)
        self.summary_at_s = parse_time_of_day(cfg.summary_at)
        self.cost_rate = cost_rate
        self.started = clock.monotonic()
        self.services = {name: _Liveness(endpoint) for name, endpoint in watched.items()}
        self.kill_switch: bool | None = None
        self.risk_state: str | None = None
        self.last_risk: RiskState | None = None
        self.feed_state: str | None = None
        self.day = _Day(trading_day=self._today())
        self._last_check_s: int | None = None

    # ----------------------------------------------------------------- bus input
    def on_message(self, source: str, msg: Any, topic: bytes = b"") -> list[Notice]:
        """React to one message published by ``source`` (the service whose PUB carried it)."""
        out: list[Notice] = []
        name = msg.service if isinstance(msg, Heartbeat) else source
        out.extend(self.seen(name, msg if isinstance(msg, Heartbeat) else None))
        self._roll_day()
        match msg:
            case Fill():
                out.append(self._on_fill(msg))
            case RiskVerdict(approved=False):
                symbol = getattr(msg, "symbol", "")
                what = f" {symbol}" if symbol else ""
                text = f"⛔ REJECTED{what}{_verdict_strategy(topic)} ({msg.request_id}): {msg.reason}"
                out.append(Notice("rejection", text, WARNING, symbol, ts_ns=msg.ts_ns))
            case BasketVerdict(approved=False):
                text = (f"⛔ BASKET REJECTED{_verdict_strategy(topic)} ({msg.request_id}, "
                        f"{len(msg.legs)} legs): {msg.reason}")  # fmt: skip
                out.append(Notice("rejection", text, WARNING, ts_ns=msg.ts_ns))
            case OrderUpdate(status="REJECTED"):
                text = (f"❌ Broker rejected {msg.side} {_qty_price(msg.quantity, msg.price)} {msg.symbol} "
                        f"[{msg.strategy_id}]: {msg.reason or 'no reason given'}")
                out.append(Notice("order", text, WARNING, msg.symbol, ts_ns=msg.ts_ns))
            case OrderUpdate(status="UNKNOWN"):
                text = (f"❓ Order state UNKNOWN for {msg.side} {msg.quantity} {msg.symbol} "
                        f"({msg.client_tag}); reconciling with the broker")
                out.append(Notice("order", text, WARNING, msg.symbol, ts_ns=msg.ts_ns))
            case Alert():
                icon = {"CRITICAL": "🚨", "WARNING": "⚠️"}.get(msg.level, "🔔")
                level = msg.level if msg.level in (INFO, WARNING, CRITICAL) else WARNING
                out.append(Notice("alert", f"{icon} [{msg.source}] {msg.text}", level, ts_ns=msg.ts_ns))
            case RiskState():
                out.extend(self._on_risk_state(msg))
            case FeedStatus():
                out.extend(self._on_feed_status(msg))
            case _:
                pass
        return out

    def _on_fill(self, fill: Fill) -> Notice:
        self.day.fills += 1
        self.day.turnover += fill.price * fill.quantity
        icon = "🟢" if fill.side == "BUY" else "🔴"
        return Notice("fill", f"{icon} FILL {fill.side} {fill.quantity} {fill.symbol} @ {fill.price} "
                              f"[{fill.strategy_id}]", INFO, fill.symbol, ts_ns=fill.ts_ns)

    def _on_risk_state(self, rs: RiskState) -> list[Notice]:
        out: list[Notice] = []
        first = self.last_risk is None
        self.last_risk = rs
        eq = self.day.equity
        if not eq or rs.ts_ns - eq[-1][0] >= EQUITY_STEP_S * 1e9:
            eq.append((rs.ts_ns, rs.net_pnl))
        if self.kill_switch is None or rs.kill_switch != self.kill_switch:
            if rs.kill_switch:
                why = f": {rs.reason}" if rs.reason else ""
                out.append(Notice("kill_switch", f"🛑 KILL SWITCH ON{why} — new orders are refused "
                                                 f"(net PnL {money(rs.net_pnl)})", CRITICAL, ts_ns=rs.ts_ns))
            elif not first:
                out.append(Notice("kill_switch", "✅ Kill switch OFF — trading allowed again",
                                  WARNING, ts_ns=rs.ts_ns))
            self.kill_switch = rs.kill_switch
        if self.risk_state is not None and rs.state != self.risk_state and not rs.kill_switch:
            level = WARNING if rs.state != "ACTIVE" else INFO
            why = f": {rs.reason}" if rs.reason else ""
            out.append(Notice("risk", f"Risk state {self.risk_state} → {rs.state}{why} "
                                      f"(net PnL {money(rs.net_pnl)})", level, ts_ns=rs.ts_ns))
        elif self.risk_state is None and rs.state == "REDUCING":
            out.append(Notice("risk", f"Risk state is REDUCING: {rs.reason or 'daily loss limit'} "
                                      f"(net PnL {money(rs.net_pnl)})", WARNING, ts_ns=rs.ts_ns))
        self.risk_state = rs.state
        return out

    def _on_feed_status(self, fs: FeedStatus) -> list[Notice]:
        if fs.state not in _FEED_ANNOUNCED or fs.state == self.feed_state:
            return []
        self.feed_state = fs.state
        detail = f" — {fs.detail}" if fs.detail else ""
        match fs.state:
            case "LIVE":
                text = f"📡 Feed LIVE ({fs.source}, {fs.subscribed} instruments){detail}"
                level = INFO
            case "STALE":
                text = f"⚠️ Feed STALE: no market data{detail}"
                level = WARNING
            case _:
                text = f"🚨 Feed DOWN{detail} (reconnects: {fs.reconnects})"
                level = CRITICAL
        return [Notice("feed", text, level, ts_ns=fs.ts_ns)]

    # ----------------------------------------------------------------- liveness
    def seen(self, service: str, hb: Heartbeat | None = None) -> list[Notice]:
        """Any traffic from ``service`` proves it alive; a heartbeat also tells its pid."""
        live = self.services.get(service)
        if live is None:
            return []
        now = self.clock.monotonic()
        out: list[Notice] = []
        if live.down:
            silent = now - (live.down_since if live.last_seen is None else live.last_seen)
            pid = f", pid {hb.pid}" if hb is not None else ""
            out.append(Notice("up", f"✅ {service} is back after {silent:.0f}s silence{pid}", WARNING))
            live.down = False
        elif hb is not None and live.pid and hb.pid != live.pid:
            out.append(Notice("up", f"🔄 {service} restarted (pid {live.pid} → {hb.pid})", WARNING))
        live.last_seen = now
        if hb is not None:
            live.pid, live.started_ns = hb.pid, hb.started_ns
            live.state, live.reason = hb.state or "ok", hb.reason
        return out

    def check(self) -> list[Notice]:
        """Services silent for too long (each announced once until it comes back)."""
        now = self.clock.monotonic()
        out: list[Notice] = []
        for name, live in self.services.items():
            if live.down:
                continue
            if live.last_seen is None:
                if now - self.started > self.startup_grace_s:
                    live.down, live.down_since = True, now
                    out.append(Notice("down", f"🚨 {name} is DOWN: no heartbeat since the notifier started "
                                              f"{now - self.started:.0f}s ago ({live.endpoint})", CRITICAL))
            elif now - live.last_seen > self.silence_s:
                live.down, live.down_since = True, now
                pid = f", last pid {live.pid}" if live.pid else ""
                out.append(Notice("down", f"🚨 {name} is DOWN: no heartbeat for {now - live.last_seen:.0f}s"
                                          f"{pid} ({live.endpoint})", CRITICAL))
        return out

    def down_services(self) -> list[str]:
        return [n for n, live in self.services.items() if live.down]

    def health(self) -> list[tuple[str, bool, float | None, str, str]]:
        """``(service, up, seconds since heard (None: never), state, reason)`` per watched service;
        ``up`` is this monitor's judgement (down once silent for ``silence_s``, or never heard
        within the start-up grace)."""
        now = self.clock.monotonic()
        out = []
        for name, live in self.services.items():
            age = None if live.last_seen is None else now - live.last_seen
            out.append((name, not live.down, age, live.state, live.reason))
        return out

    # ----------------------------------------------------------------- daily summary
    def _today(self) -> str:
        return self.clock.now(IST).strftime("%Y-%m-%d")

    def _roll_day(self) -> None:
        today = self._today()
        if today != self.day.trading_day:
            self.day = _Day(trading_day=today)

    def summary_due(self) -> bool:
        """True once per day, when the clock crosses ``summary_at`` while we are running."""
        self._roll_day()
        now = self.clock.now(IST)
        sec = now.hour * 3600 + now.minute * 60 + now.second
        last, self._last_check_s = self._last_check_s, sec
        if self.day.summary_sent or last is None or not (last < self.summary_at_s <= sec):
            return False
        idle = self.day.fills == 0 and not self.day.equity
        if now.weekday() >= 5 and idle:
            return False
        self.day.summary_sent = True
        return True

    def build_summary(self, day: DayState | None = None, chart: bytes | None = None,
                      attachment: str = "") -> Notice:
        """The end-of-day message. ``day`` (from execution) wins over what we counted ourselves."""
        rs = self.last_risk
        fills = day.fills if day is not None else self.day.fills
        turnover = float(day.turnover) if day is not None else float(self.day.turnover)
        if rs is not None:
            net, gross, cost = rs.net_pnl, rs.gross_pnl, rs.cost
        else:
            gross = float(day.realised_pnl) if day is not None else 0.0
            cost = turnover * self.cost_rate
            net = gross - cost
        kill = "ON" if (rs.kill_switch if rs is not None else (day.kill_switch if day else False)) else "off"
        state = rs.state if rs is not None else (day.risk_state if day is not None else "unknown")
        icon = "📈" if net >= 0 else "📉"
        lines = [
            f"{icon} NeoPulse daily summary {self.day.trading_day}",
            f"Net PnL: {money(net)} (gross {money(gross)}, costs {money(cost)})",
            f"Trades: {fills} fills, turnover {money(turnover)}",
            f"Risk: {state}, kill switch {kill}",
        ]
        down = self.down_services()
        if down:
            lines.append("Down now: " + ", ".join(down))
        return Notice("summary", "\n".join(lines), INFO, photo=chart, attachment=attachment)

    def equity_points(self) -> list[tuple[int, float]]:
        return list(self.day.equity)
