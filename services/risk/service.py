"""The risk process: ``RiskSentinel`` wired to the bus.

ROUTER ``risk_rep``:
    ``BasketRequest`` → ``BasketVerdict``: 2 to 4 legs judged as one (``evaluate_basket``)
                        and sent as one ``ExecuteBasket``; answered like an order.
    ``OrderRequest``  → ``RiskVerdict``. An approved order goes to execution as
                        ``ExecuteOrder``; the verdict is sent once execution has committed
                        the PENDING row, carrying its ``order_id``. A rejection is answered
                        at once. Until the day is loaded from execution every order is
                        refused with "risk is starting: day state not loaded" (code
                        ``starting``).
    ``KillSwitch``    → ``Reply(data=RiskState dict + day_loaded)``; on/off or query.
    ``GetRiskState``  → ``RiskState``.   ``GetStatus`` → ``Reply(data={...})``.
PUB ``risk_pub``: ``risk.state.`` (on change and every second), ``verdict.<strategy_id>.``
    (every verdict), ``alert.risk.``, ``hb.risk.``.
SUB: feed ``tick.`` (marks); execution ``fill.`` and ``order.``.
Requests to execution (``execution_rep``, never blocking the loop): ``GetDayState`` at
start (retried every second until it answers) and every 30 s to resync positions, PnL and
turnover with the ledger and to notice a new trading day; ``ExecuteOrder``; the risk events
(``RecordRiskEvent``, ``CancelEntries``), which are delivered in order and retried until
execution answers, so a kill switch is recorded even if execution was briefly down.

``ExecuteOrder`` carries a deadline (``expires_ns``, see ``services.risk.sentinel``). Risk
re-sends it (execution is idempotent on ``request_id``) until execution answers or the
whole budget — two attempts of 0.4 x ``bus.request_timeout_ms`` — has passed; only then it
answers "execution did not answer within N ms; the order expires unplaced", and it gives a
retry of that request id the same answer.

The kill switch and the loss breach are also written to ``$NEOPULSE_HOME/run/risk-day.json``
so that a restart while execution is down still starts HALTED. A restart never unlocks a
tripped switch, also not on a later trading day; the loss breach is kept for its day only.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from libs.common.bus import RequestTimeout, Responder, Server, topic
from libs.common.clock import Clock, trading_day
from libs.common.config import Config
from libs.common.instruments import MasterData, instrument_key
from libs.common.messages import (
    Alert,
    BasketRequest,
    BasketVerdict,
    CancelEntries,
    DayState,
    ExecuteBasket,
    ExecuteOrder,
    Fill,
    Flatten,
    GetDayState,
    GetRiskState,
    GetStatus,
    KillSwitch,
    Message,
    OrderRequest,
    OrderUpdate,
    RecordRiskEvent,
    Reply,
    RiskEvent,
    RiskVerdict,
    Subscribe,
    Tick,
    VerdictCode,
    to_builtins,
)
from libs.common.security import UNAUTHORISED, OrderSourceCheck, present_credential
from libs.common.service import Service
from services.risk.book import Event
from services.risk.sentinel import RiskSentinel

STATE_TOPIC = topic("risk", "state")
ALERT_TOPIC = topic("alert", "risk")
STARTING_REASON = "risk is starting: day state not loaded"
# Execution's alerts (and its login announcement) after which risk asks for the day state at once:
# the broker's halt (static IP, no login) began or ended.
BROKER_HALT_CUES = frozenset({"broker_ip_blocked", "broker_ip_cleared", "broker_login_failed",
                              "broker_login_ok", "broker_login"})  # fmt: skip
_TOPIC_SAFE = re.compile(r"[^A-Za-z0-9_-]")
DAY_RETRY_S = 1.0
DELIVER_RETRY_S = 1.0
RESYNC_S = 30.0
EXEC_RETRY_PAUSE_S = 0.01  # before re-sending ExecuteOrder (a send refused at once must not spin)
PERMANENT_REFUSALS = frozenset({"unsupported", "malformed"})  # retrying these cannot help


def _safe(part: str) -> str:
    return _TOPIC_SAFE.sub("_", part) or "_"


class RiskService(Service):
    name = "risk"

    def __init__(self, cfg: Config, clock: Clock | None = None, master: MasterData | None = None) -> None:
        super().__init__(cfg, pub_endpoint=cfg.bus.endpoint("risk_pub"))
        self.clock = clock or Clock()
        self.master = master if master is not None else MasterData.load_for_home(self.home)
        # Two attempts at ExecuteOrder must fit inside a strategy's own request timeout.
        self._exec_timeout_ms = max(200, cfg.bus.request_timeout_ms * 2 // 5)
        self.sentinel = RiskSentinel(cfg.risk, self.master, self.clock, exec_timeout_ms=self._exec_timeout_ms)
        self.sentinel.set_strategy_limits({s.id: (s.max_loss, s.target_profit) for s in cfg.strategy})
        self.day_loaded = False
        self.day_attempts = 0
        self._day_pending = False
        self._halt_recheck = False  # a broker-halt cue came while a day state was on its way
        # Approved orders waiting for execution's acknowledgement: request_id → waiting replies.
        self._inflight: dict[str, list[Responder]] = {}
        self._events: deque[RecordRiskEvent | CancelEntries | Flatten] = deque()
        self._delivering = False
        self._early_fills: list[Fill] = []
        self._marked: set[str] = set()
        self._last_state: tuple[str, bool] | None = None
        self._state_file = self.home / "run" / "risk-day.json"
        self.server: Server | None = None
        self.order_sources = OrderSourceCheck(cfg)
        # the request's ts_ns (set by the strategy or CLI) → its verdict sent; None when off
        self._verdict_latency = self.latency.hop("request_to_verdict")

    # ----------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        bus = self.cfg.bus
        self.server = self.bus.server(bus.endpoint("risk_rep"))
        self.server.handler = self._on_request
        server = self.server
        self.reactor.add_reader(server.sock, server.drain)
        self.execution = self.client(bus.endpoint("execution_rep"), self._exec_timeout_ms)
        # ExecuteOrder and the risk events carry proof that they come from risk (the stack secret).
        present_credential(self.execution, self.cfg, self.home)
        self.feed = self.client(bus.endpoint("feed_rep"))
        self.subscribe([bus.endpoint("feed_pub")], [b"tick."], self._on_feed)
        self.subscribe([bus.endpoint("execution_pub")],
                       [b"fill.", b"order.", b"alert.execution.", b"session."],
                       self._on_execution)  # fmt: skip
        self._restore_local()
        self._load_day()
        self.add_task("risk_state", 1.0, self._publish_state)
        self.add_task("deliver_events", DELIVER_RETRY_S, self._deliver)
        self.add_task("resync", RESYNC_S, self._resync)
        self.log.info("risk_starting", rep=server.endpoint, execution=self.execution.endpoint,
                      max_qty=self.cfg.risk.max_qty, max_notional=self.cfg.risk.max_notional,
                      max_daily_loss=self.cfg.risk.max_daily_loss,
                      max_orders_per_sec=self.cfg.risk.max_orders_per_sec)

    def on_stop(self) -> None:
        if self.server is not None:
            self.reactor.remove_reader(self.server.sock)
            self.server.close()
        if self._events:
            self.log.warning("risk_events_undelivered", count=len(self._events),
                             events=[e.__class__.__name__ for e in self._events])

    def status_info(self) -> dict[str, Any]:
        st = self.sentinel.state()
        server = self.server.stats if self.server is not None else None
        return {
            "state": st.state, "net_pnl": round(st.net_pnl, 2), "kill_switch": st.kill_switch,
            "day_loaded": self.day_loaded, "trading_day": self.sentinel.trading_day,
            "approved": self.sentinel.approved, "rejected": self.sentinel.rejected,
            "inflight": len(self._inflight), "events_pending": len(self._events),
            "open_positions": st.open_positions,
            "requests": server.received if server else 0,
            "malformed_requests": server.malformed if server else 0,
        }

    # ----------------------------------------------------------------- requests
    def _on_request(self, msg: Message, responder: Responder) -> Message | None:
        if isinstance(msg, OrderRequest | BasketRequest) and (why := self.order_sources.reason(responder)):
            self.log.warning("sender_refused", kind=type(msg).__name__, reason=why,
                             request_id=msg.request_id)
            verdict = RiskVerdict if isinstance(msg, OrderRequest) else BasketVerdict
            self._verdict_sent(msg)
            return verdict(request_id=msg.request_id, approved=False, reason=why,
                           code=VerdictCode.UNAUTHORISED, state=self.sentinel.current_state)
        match msg:
            case OrderRequest():
                return self._on_order(msg, responder)
            case BasketRequest():
                return self._on_basket(msg, responder)
            case KillSwitch():
                return self._on_kill_switch(msg)
            case GetRiskState():
                return self.sentinel.state()
            case GetStatus():
                return Reply(ok=True, data={"service": self.name, **self.status_info(), **self.bus_stats()})
            case _:
                return Reply(ok=False, code="unsupported",
                             error=f"risk does not handle {type(msg).__name__} requests")

    def _on_order(self, req: OrderRequest, responder: Responder) -> RiskVerdict | None:
        waiting = self._inflight.get(req.request_id)
        if waiting is not None:  # a retry while execution is still answering the first one
            waiting.append(responder)
            return None
        if not self.day_loaded:
            verdict = RiskVerdict(request_id=req.request_id, approved=False, reason=STARTING_REASON,
                                  code=VerdictCode.STARTING, state=self.sentinel.current_state)
            self._announce(req, verdict)
            self._verdict_sent(req)
            return verdict
        verdict, execute = self.sentinel.evaluate(req)
        if execute is None:
            self._announce(req, verdict)
            self._verdict_sent(req)
            return verdict
        self._inflight[req.request_id] = [responder]
        self._send_execute(req, execute, attempt=1)
        self._ensure_marked(execute)
        return None

    def _on_basket(self, req: BasketRequest, responder: Responder) -> BasketVerdict | None:
        """A basket: judged as one, sent to execution as one ``ExecuteBasket`` (re-sent within
        the same budget as an order: execution is idempotent on the basket's request id)."""
        key = "basket " + req.request_id  # a space is in no request id
        waiting = self._inflight.get(key)
        if waiting is not None:
            waiting.append(responder)
            return None
        if not self.day_loaded:
            verdict = BasketVerdict(request_id=req.request_id, approved=False, reason=STARTING_REASON,
                                    code=VerdictCode.STARTING, state=self.sentinel.current_state)
            self._announce_basket(req, verdict)
            self._verdict_sent(req)
            return verdict
        verdict, execute = self.sentinel.evaluate_basket(req)
        if execute is None:
            self._announce_basket(req, verdict)
            self._verdict_sent(req)
            return verdict
        self._inflight[key] = [responder]
        self._send_basket(req, execute, attempt=1)
        for leg in execute.legs:
            self._ensure_marked(leg)
        return None

    def _send_basket(self, req: BasketRequest, execute: ExecuteBasket, attempt: int) -> None:
        def done(reply: Message | Exception) -> None:
            self._on_basket_reply(req, execute, attempt, reply)

        left_ms = self._budget_left_ms(execute)
        if attempt > 1 and left_ms <= 0:
            done(RequestTimeout(self.execution.endpoint, self._exec_timeout_ms))
            return
        self.execution.request(execute, done, timeout_ms=max(1, min(self._exec_timeout_ms, left_ms)))

    def _on_basket_reply(self, req: BasketRequest, execute: ExecuteBasket, attempt: int,
                         reply: Message | Exception) -> None:
        rid = req.request_id
        data = reply.data if isinstance(reply, Reply) and isinstance(reply.data, dict) else {}
        if isinstance(reply, Reply) and reply.ok:
            verdict = self.sentinel.confirm_basket(rid, data) or BasketVerdict(
                request_id=rid, approved=True, basket_id=str(data.get("basket_id", "")),
                state=self.sentinel.current_state)
        elif isinstance(reply, Exception) and self._budget_left_ms(execute) > 0:
            self.log.warning("execution_timeout_retrying", request_id=rid, attempt=attempt,
                             error=str(reply), left_ms=self._budget_left_ms(execute))
            self.reactor.call_later(EXEC_RETRY_PAUSE_S,
                                    lambda: self._send_basket(req, execute, attempt + 1))
            return
        elif isinstance(reply, Reply):
            # refused whole (a leg execution would not place, the ledger, credentials): no
            # leg of it works at the broker
            code = VerdictCode.UNAUTHORISED if reply.code == UNAUTHORISED else VerdictCode.EXECUTION
            why = f"execution refused: {reply.error or reply.code}"
            verdict = self.sentinel.basket_failed(rid, why, code)
        elif isinstance(reply, Exception):
            self.log.error("execution_timeout_gave_up", request_id=rid, attempts=attempt,
                           error=str(reply), expires_ns=execute.expires_ns)
            verdict = self.sentinel.basket_timed_out(rid, self.sentinel.exec_budget_ns // 1_000_000)
        else:
            verdict = self.sentinel.basket_failed(
                rid, f"execution answered with an unexpected {type(reply).__name__}")
        self._announce_basket(req, verdict)
        for responder in self._inflight.pop("basket " + rid, []):
            responder.send(verdict)
        self._verdict_sent(req)

    def _announce_basket(self, req: BasketRequest, verdict: BasketVerdict) -> None:
        self.log.info("basket_approved" if verdict.approved else "basket_rejected", request_id=req.request_id,
                      strategy_id=req.strategy_id, legs=len(req.legs), basket_id=verdict.basket_id,
                      reason=verdict.reason, code=verdict.code)  # fmt: skip
        assert self.pub is not None
        self.pub.publish(topic("verdict", _safe(req.strategy_id)), verdict)
        self._publish_state_if_changed()

    def _send_execute(self, req: OrderRequest, execute: ExecuteOrder, attempt: int) -> None:
        def done(reply: Message | Exception) -> None:
            self._on_execute_reply(req, execute, attempt, reply)

        left_ms = self._budget_left_ms(execute)
        if attempt > 1 and left_ms <= 0:  # the pause before this retry used up the budget
            done(RequestTimeout(self.execution.endpoint, self._exec_timeout_ms))
            return
        self.execution.request(execute, done, timeout_ms=max(1, min(self._exec_timeout_ms, left_ms)))

    def _budget_left_ms(self, execute: ExecuteOrder | ExecuteBasket) -> int:
        """What is left of the time risk waits for execution (wall clock, as ``expires_ns``)."""
        return (execute.ts_ns + self.sentinel.exec_budget_ns - self.clock.now_ns()) // 1_000_000

    def _on_execute_reply(self, req: OrderRequest, execute: ExecuteOrder, attempt: int,
                          reply: Message | Exception) -> None:
        rid = req.request_id
        if isinstance(reply, Reply) and reply.ok:
            data = reply.data if isinstance(reply.data, dict) else {}
            verdict = self.sentinel.confirm(rid, str(data.get("order_id", "")))
            if verdict is None:  # cannot happen unless the request was forgotten meanwhile
                verdict = RiskVerdict(request_id=rid, approved=True, quantity=execute.quantity,
                                      order_id=str(data.get("order_id", "")),
                                      state=self.sentinel.current_state)
        elif isinstance(reply, Exception) and self._budget_left_ms(execute) > 0:
            # No answer (or an unreadable one) yet, and the order's deadline is still ahead:
            # execution may yet place it, so ask again (it is idempotent on request_id). A
            # timeout of another request also fails this one early (Lazy Pirate).
            self.log.warning("execution_timeout_retrying", request_id=rid, attempt=attempt,
                             error=str(reply), left_ms=self._budget_left_ms(execute))
            self.reactor.call_later(EXEC_RETRY_PAUSE_S,
                                    lambda: self._send_execute(req, execute, attempt + 1))
            return
        elif isinstance(reply, Reply):
            code = VerdictCode.UNAUTHORISED if reply.code == UNAUTHORISED else VerdictCode.EXECUTION
            reason = f"execution refused: {reply.error or reply.code}"
            verdict = self.sentinel.execution_failed(rid, reason, code)
        elif isinstance(reply, Exception):
            # The budget is spent, so the deadline has passed: execution will not place it.
            self.log.error("execution_timeout_gave_up", request_id=rid, attempts=attempt,
                           error=str(reply), expires_ns=execute.expires_ns)
            verdict = self.sentinel.execution_timed_out(rid, self.sentinel.exec_budget_ns // 1_000_000)
        else:
            verdict = self.sentinel.execution_failed(
                rid, f"execution answered with an unexpected {type(reply).__name__}")
        # the strategy waits on this answer: it goes first, the log line and publication after
        for responder in self._inflight.pop(rid, []):
            responder.send(verdict)
        self._verdict_sent(req)
        self._announce(req, verdict)

    def _verdict_sent(self, req: OrderRequest | BasketRequest) -> None:
        """The request → verdict hop, from the request's own ``ts_ns`` (strategy to risk
        included) to the verdict's send."""
        if self._verdict_latency is not None:
            self._verdict_latency.record(req.ts_ns, time.time_ns())

    def _announce(self, req: OrderRequest, verdict: RiskVerdict) -> None:
        """Log and publish every verdict (the notifier announces rejections)."""
        if verdict.approved:
            self.log.info("order_approved", request_id=req.request_id, order_id=verdict.order_id,
                          strategy_id=req.strategy_id,
                          symbol=req.symbol or instrument_key(req.segment, req.token),
                          side=req.side, quantity=verdict.quantity,
                          price=str(req.price) if req.price is not None else "market")
        else:
            self.log.info("order_rejected", request_id=req.request_id, reason=verdict.reason,
                          code=verdict.code, strategy_id=req.strategy_id,
                          symbol=req.symbol or instrument_key(req.segment, req.token),
                          side=req.side, quantity=req.quantity,
                          price=str(req.price) if req.price is not None else "market")
        assert self.pub is not None
        self.pub.publish(topic("verdict", _safe(req.strategy_id)), verdict)
        self._publish_state_if_changed()

    def _ensure_marked(self, execute: ExecuteOrder) -> None:  # also each leg of a basket
        """Ask the feed for ticks of a traded instrument, so its position is marked to market."""
        key = instrument_key(execute.segment, execute.token)
        if key in self._marked:
            return
        self._marked.add(key)

        def done(reply: Message | Exception) -> None:
            if not (isinstance(reply, Reply) and reply.ok):
                self._marked.discard(key)  # try again with the next order

        self.feed.request(Subscribe(instruments=[key], requester=self.name), done)

    def _on_kill_switch(self, msg: KillSwitch) -> Reply:
        if not msg.query:
            events = self.sentinel.set_kill_switch(msg.on, msg.reason, source=msg.source or "cli")
            self.log.warning("kill_switch", on=msg.on, reason=msg.reason, source=msg.source,
                             request_id=msg.request_id, state=self.sentinel.current_state)
            self._dispatch(events)
            self._persist_local()
        return Reply(ok=True, data=self._state_data())

    def _state_data(self) -> dict[str, Any]:
        data: dict[str, Any] = to_builtins(self.sentinel.state())
        data["day_loaded"] = self.day_loaded
        data["trading_day"] = self.sentinel.trading_day
        return data

    # ----------------------------------------------------------------- subscriptions
    def _on_feed(self, _topic: bytes, msg: Any) -> None:
        if type(msg) is Tick:
            events = self.sentinel.on_tick(msg)
            if events:
                self._dispatch(events)

    def _on_execution(self, _topic: bytes, msg: Any) -> None:
        if isinstance(msg, Fill):
            if not self.day_loaded:
                self._early_fills.append(msg)  # applied after the day is restored
                return
            events = self.sentinel.on_fill(msg)
            if events:
                self._dispatch(events)
            self._publish_state_if_changed()
        elif isinstance(msg, OrderUpdate):
            events = self.sentinel.on_order_update(msg)
            if events:
                self._dispatch(events)
        elif isinstance(msg, Alert) and msg.code in BROKER_HALT_CUES and self.day_loaded:
            # the broker's state moved: execution's day state says how (asked again after one in flight)
            self._halt_recheck = self._day_pending
            self._load_day(periodic=True)

    # ----------------------------------------------------------------- events to execution
    def _dispatch(self, events: Sequence[Event]) -> None:
        for ev in events:
            if isinstance(ev, Alert):
                assert self.pub is not None
                self.pub.publish(ALERT_TOPIC, ev)
                self.log.warning("risk_alert", code=ev.code, text=ev.text)
            else:
                self._events.append(ev)
        self._persist_local()
        self._publish_state_if_changed(force=True)
        self._deliver()

    def _deliver(self) -> None:
        """Send the oldest undelivered risk event; retried every second until execution answers."""
        if self._delivering or not self._events:
            return
        ev = self._events[0]
        self._delivering = True

        def done(reply: Message | Exception) -> None:
            self._delivering = False
            retry = isinstance(reply, Exception) or (
                isinstance(reply, Reply) and not reply.ok and reply.code not in PERMANENT_REFUSALS)
            if retry and isinstance(ev, Flatten) and len(self._events) > 1 and self._events[0] is ev:
                self._events.rotate(-1)  # a refused flatten (e.g. broker IP block) waits behind the rest
            if retry:  # execution down, or its ledger briefly unavailable: the next attempt is in 1 s
                why = str(reply) if isinstance(reply, Exception) else getattr(reply, "error", "")
                self.log.warning("risk_event_not_delivered", kind=type(ev).__name__, error=why,
                                 pending=len(self._events))
                return
            if self._events and self._events[0] is ev:
                self._events.popleft()
            if isinstance(reply, Reply) and not reply.ok:
                self.log.error("risk_event_refused", kind=type(ev).__name__, error=reply.error,
                               code=reply.code)
            else:
                self.log.info("risk_event_delivered", kind=type(ev).__name__, request_id=ev.request_id)
                if isinstance(ev, RecordRiskEvent):
                    self._persist_local(recorded=True)
            self._deliver()

        self.execution.request(ev, done)

    # ----------------------------------------------------------------- day state
    def _load_day(self, periodic: bool = False) -> None:
        if self._day_pending:
            return
        self._day_pending = True
        self.day_attempts += 1

        def done(reply: Message | Exception) -> None:
            self._on_day_state(reply, periodic)

        self.execution.request(GetDayState(), done)

    def _on_day_state(self, reply: Message | Exception, periodic: bool = False) -> None:
        self._day_pending = False
        if not isinstance(reply, DayState):
            if not periodic and (self.day_attempts == 1 or self.day_attempts % 10 == 0):
                why = str(reply) if isinstance(reply, Exception) else getattr(reply, "error", "")
                self.log.warning("day_state_unavailable", attempts=self.day_attempts,
                                 error=why or type(reply).__name__, execution=self.execution.endpoint)
            if not periodic:  # a failed resync just waits for the next one
                self.reactor.call_later(DAY_RETRY_S, self._load_day)
            return
        self._on_broker_halt(reply.broker_halt)
        if self._halt_recheck:
            self._halt_recheck = False
            self.reactor.call_later(0.0, lambda: self._load_day(periodic=True))
        if periodic and reply.trading_day == self.sentinel.trading_day:
            events, drifted = self.sentinel.resync(reply)
            if drifted:
                self.log.warning("risk_resynced", trading_day=reply.trading_day, fills=reply.fills,
                                 turnover=str(reply.turnover), realised_pnl=str(reply.realised_pnl),
                                 positions=len(reply.positions))
            if events:
                self._dispatch(events)
            return
        if periodic:
            self.log.info("trading_day_changed", previous=self.sentinel.trading_day, today=reply.trading_day)
            self.sentinel.new_day()
        events = self.sentinel.restore(reply)
        early, self._early_fills = self._early_fills, []
        for f in early:
            events = (*events, *self.sentinel.on_fill(f))
        self.day_loaded = True
        st = self.sentinel.state()
        self.log.info("day_state_loaded", trading_day=reply.trading_day, positions=len(reply.positions),
                      fills=reply.fills, turnover=str(reply.turnover), realised_pnl=str(reply.realised_pnl),
                      kill_switch=st.kill_switch, state=st.state, net_pnl=round(st.net_pnl, 2),
                      attempts=self.day_attempts)
        if st.kill_switch and not reply.kill_switch:
            # Tripped here (while loading, or before a restart) but not in execution's records yet.
            events = (*events, *self._record_kill_switch())
        self._dispatch(events)

    def _on_broker_halt(self, reason: str) -> None:
        """HALTED while execution's broker takes no orders (static IP, no login); ACTIVE again
        (or what risk's own switches say) once it does."""
        if not self.sentinel.set_broker_halt(reason):
            return
        st = self.sentinel.current_state
        if reason:
            self.log.error("risk_broker_halt", reason=reason, state=st)
        else:
            self.log.warning("risk_broker_halt_cleared", state=st)
        self._publish_state_if_changed(force=True)

    def _record_kill_switch(self) -> tuple[Event, ...]:
        now = self.clock.now_ns()
        s = self.sentinel
        return (
            RecordRiskEvent(event=RiskEvent.KILL_SWITCH_ON, reason=s.kill_reason, source="risk",
                            data={"kill_switch": True, "risk_state": s.recorded_state,
                                  "trading_day": s.trading_day},
                            request_id=f"risk-ks-on-{now}", ts_ns=now),
            CancelEntries(request_id=f"risk-cancel-{now}", reason=f"kill switch: {s.kill_reason}", ts_ns=now),
        )

    def _resync(self) -> None:
        """Every RESYNC_S: take positions, PnL and turnover from execution's ledger (heals a
        fill missed on the bus) and notice a new trading day (a fresh loss budget)."""
        if self.day_loaded:
            self._load_day(periodic=True)

    # ----------------------------------------------------------------- local backstop
    def _persist_local(self, recorded: bool = False) -> None:
        data = {**self.sentinel.backstop(trading_day(self.clock)), "recorded": recorded or not self._events}
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self._state_file)
        except OSError as exc:
            self.log.error("risk_state_file_failed", path=str(self._state_file), error=str(exc))

    def _restore_local(self) -> None:
        data = _read_json(self._state_file)
        if not data:
            return
        if self.sentinel.restore_backstop(data, trading_day(self.clock)):
            self.log.warning("kill_switch_restored_locally", reason=self.sentinel.kill_reason,
                             tripped_on=data.get("trading_day"))

    # ----------------------------------------------------------------- state publication
    def _publish_state(self) -> None:
        assert self.pub is not None
        st = self.sentinel.state()
        self._last_state = (st.state, st.kill_switch)
        self.pub.publish(STATE_TOPIC, st)

    def _publish_state_if_changed(self, force: bool = False) -> None:
        s = self.sentinel
        if force or self._last_state != (s.current_state, s.kill_switch):
            self._publish_state()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

