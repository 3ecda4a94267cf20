"""The risk book: positions, working orders, PnL after costs, the loss breach and the kill
switch, and how they are restored after a restart. ``RiskSentinel`` adds the checks."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from libs.common.clock import Clock, trading_day
from libs.common.config import RiskConfig
from libs.common.instruments import MasterData, instrument_key
from libs.common.messages import (
    ACTIVE,
    CANCELLED,
    HALTED,
    MAX_TEXT,
    REDUCING,
    REJECTED,
    TERMINAL_STATES,
    Alert,
    CancelEntries,
    DayState,
    Fill,
    Flatten,
    OrderRequest,
    OrderType,
    OrderUpdate,
    Product,
    RecordRiskEvent,
    RiskEvent,
    RiskState,
    RiskVerdict,
    Side,
    Tick,
)
from libs.common.positions import PositionState

SIDES = tuple(Side)
PRODUCTS = tuple(Product)
ORDER_TYPES = tuple(OrderType)
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
_REMEMBERED_REQUESTS = 200_000  # request ids kept for duplicate detection (bounded memory)
_REMEMBERED_FILLS = 200_000
RESTORE_GUARD_S = 10.0  # after a restore, fills traded before the snapshot are taken as in it
EXEC_ATTEMPTS = 2  # attempts at ExecuteOrder (execution is idempotent on request_id)
EXEC_MARGIN = 0.2  # of one attempt: the deadline falls this much before risk gives up
Event = Alert | RecordRiskEvent | CancelEntries | Flatten
_NO_EVENTS: tuple[Event, ...] = ()
class _Working:
    """An order risk approved that has not reached a terminal state yet."""

    __slots__ = ("fill_qty", "key", "qty", "side", "strategy_id", "update_filled")

    def __init__(self, key: str, side: str, qty: int, strategy_id: str) -> None:
        self.key = key
        self.side = side
        self.qty = qty
        self.strategy_id = strategy_id
        self.update_filled = 0  # filled_qty from the latest OrderUpdate
        self.fill_qty = 0  # sum of Fill messages seen

    @property
    def remaining(self) -> int:
        return max(0, self.qty - max(self.update_filled, self.fill_qty))


class _Seen(msgspec.Struct):
    request: OrderRequest  # with ts_ns zeroed, for comparing retries
    verdict: RiskVerdict
    shared: bool = False  # its strings and prices are the ones other remembered requests use


_SHARED_MAX = 20_000  # distinct strings and prices the remembered requests share (then it restarts)


def _fmt(value: Decimal | float) -> str:
    """Money for reason texts: 2 decimals, thousands unseparated (trader logs grep well)."""
    return f"{value:.2f}"


def _positive_finite(value: Decimal) -> bool:
    return value.is_finite() and value > 0




class RiskBook:
    """State and bookkeeping of risk; no pre-trade checks (those are ``RiskSentinel``'s)."""

    def __init__(self, cfg: RiskConfig, master: MasterData, clock: Clock, exec_timeout_ms: int = 0) -> None:
        self.cfg = cfg
        self.master = master
        self.clock = clock
        # The time risk waits for execution, and the deadline it gives it (0: no deadline,
        # e.g. a backtest, where execution answers at once).
        self.exec_budget_ns = EXEC_ATTEMPTS * exec_timeout_ms * 1_000_000
        self._exec_deadline_ns = round((EXEC_ATTEMPTS - EXEC_MARGIN) * exec_timeout_ms * 1_000_000)
        self._max_notional = Decimal(repr(cfg.max_notional))
        self._cost_rate = cfg.cost_rate
        self.trading_day = ""
        self.kill_switch = False
        self.kill_reason = ""
        self.loss_breached = False
        self.breach_reason = ""
        # Execution's broker takes no orders (static IP, no login): HALTED while set, from
        # execution's day state; live only, never recorded as risk state (``recorded_state``).
        self.broker_halt = ""
        self._positions: dict[tuple[str, str], PositionState] = {}
        self._by_key: dict[str, list[PositionState]] = {}  # instrument key → every strategy's position
        self._cost_f: dict[str, float] = {}  # open instrument key → sum of qty x avg (for marking)
        self._net_qty: dict[str, int] = {}  # instrument key → account net quantity
        self._open_keys: set[str] = set()  # instruments with a non-zero position in any strategy
        self._marks: dict[str, float] = {}  # instrument key → last traded price
        # per open key, in ``_cost_f``'s order: net qty x mark - cost, the terms ``pnl()`` sums
        # (0.0 without a mark, which adds nothing); None when a fill or a load changed them
        self._mtm: dict[str, float] | None = None
        self._realised = _ZERO
        self._turnover = _ZERO
        self._realised_f = 0.0  # float copies for per-tick marking (no Decimal on the tick path)
        self._turnover_f = 0.0
        self._working: dict[str, _Working] = {}  # request_id → working order
        self._order_ids: dict[str, str] = {}  # order_id → request_id
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()  # request ids reported "expires unplaced"
        self._fills_seen: OrderedDict[str, None] = OrderedDict()
        self._shared: dict[Any, Any] = {}  # one object per equal string or price of ``_seen``
        self._restored_upto_ns = 0  # fills traded at or before this are in the restored day...
        self._guard_until = 0.0  # ...when they arrive before this (clock.monotonic)
        self._approvals: deque[float] = deque()
        # entries approved today per (strategy, instrument key), and which request counted where
        # (withdrawn if execution refuses it); ``max_entries_per_day``
        self._entries: dict[tuple[str, str], int] = {}
        self._entry_of: dict[str, tuple[str, str]] = {}
        # per-strategy MTM limits (``[[strategy]] max_loss`` / ``target_profit``): strategy id →
        # (max loss, target profit), and the strategies stopped today with why
        self._limits: dict[str, tuple[float, float]] = {}
        self.stopped: dict[str, str] = {}
        self.approved = 0
        self.rejected = 0

    @property
    def current_state(self) -> str:
        if self.kill_switch or self.broker_halt:
            return HALTED
        return REDUCING if self.loss_breached else ACTIVE

    @property
    def recorded_state(self) -> str:
        """The state risk's own switches make (kill switch, loss breach): what risk events record.
        A broker halt is left out: it ends with the broker's problem, and a restart restoring it
        as HALTED would read it as a kill switch."""
        if self.kill_switch:
            return HALTED
        return REDUCING if self.loss_breached else ACTIVE

    def set_broker_halt(self, reason: str) -> bool:
        """Execution's broker takes no orders (``reason``) or does again (""). True when it changed."""
        reason = reason.strip()
        if reason == self.broker_halt:
            return False
        self.broker_halt = reason
        return True

    def pnl(self) -> tuple[float, float, float, float]:
        """(realised, unrealised, cost, turnover) — gross is realised + unrealised."""
        unrealised = 0.0
        marks, net = self._marks, self._net_qty
        for key, cost in self._cost_f.items():
            mark = marks.get(key)
            if mark is not None:  # sum over strategies of qty x (mark - avg)
                unrealised += net.get(key, 0) * mark - cost
        turnover = self._turnover_f
        return self._realised_f, unrealised, turnover * self._cost_rate, turnover

    def net_pnl(self) -> float:
        realised, unrealised, cost, _ = self.pnl()
        return (realised + unrealised) - cost

    def state(self) -> RiskState:
        realised, unrealised, cost, turnover = self.pnl()
        gross = realised + unrealised
        reason = self.kill_reason if self.kill_switch else (self.breach_reason if self.loss_breached else "")
        if self.broker_halt and not self.kill_switch:
            reason = f"broker: {self.broker_halt}"
        return RiskState(
            state=self.current_state, gross_pnl=gross, realised_pnl=realised,
            unrealised_pnl=unrealised, cost=cost, net_pnl=gross - cost, turnover=turnover,
            max_daily_loss=self.cfg.max_daily_loss, kill_switch=self.kill_switch, reason=reason,
            open_positions=len(self._open_keys), ts_ns=self.clock.now_ns(),
        )

    def position(self, key: str) -> int:
        """Account net quantity in an instrument (``segment|token``)."""
        return self._net_qty.get(key, 0)

    def on_tick(self, tick: Tick, key: str | None = None) -> Sequence[Event]:
        """Mark to market. Returns the loss-breach events when this tick trips the limit.
        ``key`` (``segment|token``) may be passed when the caller already has it."""
        ltp = tick.ltp
        if not (ltp > 0 and math.isfinite(ltp)):
            return _NO_EVENTS
        if key is None:
            key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
        marks = self._marks
        marks[key] = ltp
        if key not in self._open_keys:
            return _NO_EVENTS
        mtm = self._mtm
        if mtm is not None:
            mtm[key] = self._net_qty.get(key, 0) * ltp - self._cost_f[key]
        if not self.loss_breached:
            # Hot path: ``net_pnl()`` inlined -- the same terms summed in the same order, so the
            # same floats -- with each term kept between ticks: a tick recomputes only its own
            # instrument's. The breach itself goes through ``_check_loss``.
            if mtm is None:
                mtm = self._mtm_terms()
            unrealised = 0.0
            for term in mtm.values():
                unrealised += term
            net_pnl = (self._realised_f + unrealised) - self._turnover_f * self._cost_rate
            if not net_pnl >= -self.cfg.max_daily_loss:  # written so that NaN breaches, as there
                return (*self._check_loss(), *self._check_strategies(key))
        if self._limits:
            return self._check_strategies(key)
        return _NO_EVENTS

    def _mtm_terms(self) -> dict[str, float]:
        """``pnl()``'s unrealised terms, afresh (adding 0.0 for an unmarked key changes no sum:
        the running sum starts at +0.0 and so is never -0.0)."""
        marks, net = self._marks, self._net_qty
        terms: dict[str, float] = {}
        for k, cost in self._cost_f.items():
            mark = marks.get(k)
            terms[k] = net.get(k, 0) * mark - cost if mark is not None else 0.0
        self._mtm = terms
        return terms

    def on_fill(self, fill: Fill) -> Sequence[Event]:
        """Book a fill (idempotent on ``fill_id``); returns loss-breach events if any."""
        if fill.ts_ns and fill.ts_ns <= self._restored_upto_ns and self.clock.monotonic() < self._guard_until:
            return _NO_EVENTS  # already counted in the restored day
        if fill.fill_id in self._fills_seen:
            return _NO_EVENTS
        self._fills_seen[fill.fill_id] = None
        if len(self._fills_seen) > _REMEMBERED_FILLS:
            self._fills_seen.popitem(last=False)
        if fill.quantity <= 0 or not _positive_finite(fill.price) or fill.side not in SIDES:
            return _NO_EVENTS
        key = instrument_key(fill.segment, fill.token)
        signed = fill.quantity if fill.side == "BUY" else -fill.quantity
        pos = self._positions.get((fill.strategy_id, key))
        if pos is None:
            pos = PositionState(fill.strategy_id, fill.segment, fill.token, fill.symbol)
            self._add_position(key, pos)
        self._realised += pos.apply(fill.side, fill.quantity, fill.price)
        self._turnover += fill.price * fill.quantity
        self._realised_f = float(self._realised)
        self._turnover_f = float(self._turnover)
        net = self._net_qty.get(key, 0) + signed
        if net:
            self._net_qty[key] = net
        else:
            self._net_qty.pop(key, None)
        self._refresh_open(key)
        if key not in self._marks:
            self._marks[key] = float(fill.price)
        self._mtm = None
        request_id = self._order_ids.get(fill.order_id)
        if request_id is not None:
            working = self._working.get(request_id)
            if working is not None:
                working.fill_qty += fill.quantity
                if working.remaining == 0:
                    self._forget_working(request_id)
        events = self._check_loss() if not self.loss_breached else _NO_EVENTS
        if self._limits:
            events = (*events, *self._check_strategies(strategy_id=fill.strategy_id))
        return events

    def on_order_update(self, upd: OrderUpdate) -> Sequence[Event]:
        """Keep the working-order book: terminal orders stop counting as exposure. An order
        risk had reported as expired unplaced but that execution placed after all is taken
        back into the book, with a CRITICAL alert (the strategy was told it was not placed)."""
        working = self._working.get(upd.request_id)
        if working is None:
            if upd.request_id in self._expired and upd.status not in (REJECTED, CANCELLED):
                del self._expired[upd.request_id]
                key = instrument_key(upd.segment, upd.token)
                working = _Working(key, upd.side, upd.quantity, upd.strategy_id)
                self._working[upd.request_id] = working
                text = (f"order {upd.order_id} ({upd.request_id}: {upd.side} {upd.quantity} {upd.symbol}) "
                        f"is {upd.status} at execution although risk told {upd.strategy_id} it expired "
                        f"unplaced; it counts as working again")
                alert = Alert(level="CRITICAL", source="risk", text=text, code="expired_order_placed",
                              ts_ns=self.clock.now_ns())
                self.on_order_update(upd)
                return (alert,)
            return _NO_EVENTS
        if upd.order_id and upd.order_id not in self._order_ids:
            self._order_ids[upd.order_id] = upd.request_id
        if upd.status in TERMINAL_STATES:
            self._forget_working(upd.request_id)
        else:
            working.update_filled = max(working.update_filled, upd.filled_qty)
        return _NO_EVENTS

    def _forget_working(self, request_id: str) -> None:
        self._working.pop(request_id, None)
        for oid in [o for o, r in self._order_ids.items() if r == request_id]:
            del self._order_ids[oid]
        self._share_seen(request_id)

    def _share_seen(self, request_id: str) -> None:
        """A finished order's request stays remembered for the day (an identical retry gets the
        same verdict, a different order under its id is refused), but every decoded message
        brings its own copies of the same symbol, side, product and prices: its remembered copy
        takes the objects equal values of other remembered requests use, so a day of finished
        orders costs little more than their ids."""
        seen = self._seen.get(request_id)
        if seen is None or seen.shared:
            return
        if len(self._shared) > _SHARED_MAX:
            self._shared = {}
        one = self._one
        r, v = seen.request, seen.verdict
        seen.request = msgspec.structs.replace(
            r, strategy_id=one(r.strategy_id), side=one(r.side), symbol=one(r.symbol), segment=one(r.segment),
            token=one(r.token), order_type=one(r.order_type), product=one(r.product), purpose=one(r.purpose),
            price=one(r.price), trigger_price=one(r.trigger_price), stop_loss=one(r.stop_loss),
            target=one(r.target),
        )  # fmt: skip
        seen.verdict = msgspec.structs.replace(v, request_id=seen.request.request_id, state=one(v.state),
                                               reason=one(v.reason))  # fmt: skip
        seen.shared = True

    def _one(self, value: Any) -> Any:
        """The shared object equal to ``value`` (a string, a finite price; anything else as is)."""
        if value is None or (isinstance(value, Decimal) and not value.is_finite()):
            return value
        return self._shared.setdefault(value, value)

    def _add_position(self, key: str, pos: PositionState) -> None:
        self._positions[(pos.strategy_id, key)] = pos
        self._by_key.setdefault(key, []).append(pos)

    def _refresh_open(self, key: str) -> None:
        self._mtm = None
        cost = 0.0
        is_open = False
        for p in self._by_key.get(key, ()):
            if p.quantity:
                is_open = True
                cost += p.quantity * float(p.avg_price)
        if is_open:
            self._open_keys.add(key)
            self._cost_f[key] = cost
        else:
            self._open_keys.discard(key)
            self._cost_f.pop(key, None)

    def set_strategy_limits(self, limits: dict[str, tuple[float, float]]) -> None:
        """``{strategy id: (max_loss, target_profit)}`` in rupees of net MTM (0: none)."""
        self._limits = {sid: lim for sid, lim in limits.items() if lim[0] > 0 or lim[1] > 0}

    def strategy_net(self, strategy_id: str) -> float:
        """One strategy's net PnL today: realised + marked to the last price - costs."""
        net = 0.0
        rate = self._cost_rate
        for (sid, key), p in self._positions.items():
            if sid != strategy_id:
                continue
            net += float(p.realised) - rate * float(p.buy_value + p.sell_value)
            if p.quantity:
                mark = self._marks.get(key)
                if mark is not None:
                    net += p.quantity * (mark - float(p.avg_price))
        return net

    def _check_strategies(self, key: str = "", strategy_id: str = "") -> Sequence[Event]:
        """Stop a limited strategy whose net MTM crossed its limit (those holding ``key``, or
        ``strategy_id``): announce, record, and have execution square off its positions."""
        limits = self._limits
        if not limits:
            return _NO_EVENTS
        held = self._by_key.get(key, ())
        sids = {strategy_id} if strategy_id else {p.strategy_id for p in held if p.quantity}
        out: list[Event] = []
        for sid in sids:
            lim = limits.get(sid)
            if lim is None or sid in self.stopped:
                continue
            net = self.strategy_net(sid)
            max_loss, target = lim
            if max_loss and not net > -max_loss:  # (NaN stops it)
                why = f"net MTM {_fmt(net)} reached its max_loss -{_fmt(max_loss)}"
            elif target and net >= target:
                why = f"net MTM {_fmt(net)} reached its target_profit {_fmt(target)}"
            else:
                continue
            self.stopped[sid] = why
            now = self.clock.now_ns()
            out += [
                Alert(level="CRITICAL", source="risk", code="strategy_stopped", ts_ns=now,
                      text=f"strategy {sid} stopped for the day: {why}; its positions are squared off and "
                           "its new entries refused (exits pass); other strategies trade on"),
                *self._stop_events(sid, why, {"net_pnl": round(net, 2)}),
            ]  # fmt: skip
        return out

    def _check_all_strategies(self) -> Sequence[Event]:
        """Every limited strategy not stopped yet (after a restore or a resync: one may have
        crossed while risk was down, or by a fill the bus lost)."""
        out: list[Event] = []
        for sid in self._limits:
            out += self._check_strategies(strategy_id=sid)
        return out

    def _stop_events(self, sid: str, why: str, data: Mapping[str, Any] | None = None) -> list[Event]:
        """The stop's record and its square-off. Their request ids are fixed per day and
        strategy, so sending them again (after a restart) never records or closes twice."""
        now = self.clock.now_ns()
        day = self.trading_day or trading_day(self.clock)
        return [
            RecordRiskEvent(event=RiskEvent.STRATEGY_STOPPED, reason=why, ts_ns=now,
                            data={"strategy_id": sid, **(data or {}), "trading_day": day},
                            request_id=f"risk-stop-{day}-{sid}"),
            Flatten(request_id=f"risk-stop-{day}-{sid}-flatten", strategy_id=sid, source="risk"),
        ]  # fmt: skip

    def _check_loss(self) -> Sequence[Event]:
        net = self.net_pnl()
        limit = self.cfg.max_daily_loss
        if net >= -limit:
            return _NO_EVENTS
        self.loss_breached = True
        self.breach_reason = f"daily loss limit breached: net PnL {_fmt(net)} is below -{_fmt(limit)}"
        text = f"{self.breach_reason}; risk is REDUCING — only orders that reduce a position pass"
        data = {"net_pnl": round(net, 2), "max_daily_loss": limit, "risk_state": self.recorded_state,
                "kill_switch": self.kill_switch, "trading_day": self.trading_day}
        return (
            Alert(level="CRITICAL", source="risk", text=text, code="loss_breached",
                  ts_ns=self.clock.now_ns()),
            RecordRiskEvent(event=RiskEvent.LOSS_BREACHED, reason=self.breach_reason, data=data,
                            request_id=f"risk-loss-{self.trading_day or self.clock.now_ns()}",
                            ts_ns=self.clock.now_ns()),
        )

    def set_kill_switch(self, on: bool, reason: str = "", source: str = "cli") -> Sequence[Event]:
        """Trip or reset the manual kill switch. Returns what to announce and record, and for
        ``on`` the request that makes execution cancel open entry orders."""
        now = self.clock.now_ns()
        reason = reason.strip() or ("manual kill switch" if on else "")
        if on == self.kill_switch and (not on or reason == self.kill_reason):
            return _NO_EVENTS
        self.kill_switch = on
        self.kill_reason = reason if on else ""
        state = self.recorded_state
        data = {"kill_switch": on, "risk_state": state, "net_pnl": round(self.net_pnl(), 2),
                "trading_day": self.trading_day}
        if on:
            text = f"kill switch ON ({reason}): risk is HALTED, open entry orders are being cancelled"
            return (
                Alert(level="CRITICAL", source="risk", text=text, code="kill_switch_on", ts_ns=now),
                RecordRiskEvent(event=RiskEvent.KILL_SWITCH_ON, reason=reason, source=source, data=data,
                                request_id=f"risk-ks-on-{now}", ts_ns=now),
                CancelEntries(request_id=f"risk-cancel-{now}", reason=f"kill switch: {reason}", ts_ns=now),
            )
        text = f"kill switch OFF: risk is {state}"
        if state == REDUCING:
            text += " (the daily loss limit is still breached)"
        return (
            Alert(level="WARNING", source="risk", text=text, code="kill_switch_off", ts_ns=now),
            RecordRiskEvent(event=RiskEvent.KILL_SWITCH_OFF, reason=reason or "switched off", source=source,
                            data=data, request_id=f"risk-ks-off-{now}", ts_ns=now),
        )

    def new_day(self) -> None:
        """A new trading day began while running: a fresh loss budget (the kill switch stays;
        the positions and PnL come from the next ``restore``), no entries counted, no
        strategy stopped."""
        self.loss_breached = False
        self.breach_reason = ""
        self._entries, self._entry_of, self.stopped = {}, {}, {}

    def restore(self, day: DayState) -> Sequence[Event]:
        """Rebuild the day from execution's ledger. A tripped kill switch or a latched loss
        breach stays tripped (also when it was tripped here while the day was loading). The
        day's entry counts are the ledger's, or what was approved here if more. A strategy
        stopped here (the backstop) that the ledger has no record of gets its record and its
        square-off sent again, under the same request ids; a limited strategy that crossed its
        limit while risk was down is stopped now."""
        if self.trading_day and day.trading_day != self.trading_day:  # a new day (not the first load)
            self._entries, self._entry_of, self.stopped = {}, {}, {}
        # stopped here (the local backstop) but not in execution's records: risk stopped before
        # its record and square-off were delivered
        unrecorded = {sid: why for sid, why in self.stopped.items() if sid not in day.stopped}
        self.stopped.update(day.stopped)
        for e in day.entries:
            k = (e.strategy_id, instrument_key(e.segment, e.token))
            self._entries[k] = max(self._entries.get(k, 0), e.count)
        self.trading_day = day.trading_day
        self._load_book(day)
        if day.kill_switch or day.risk_state == HALTED:
            if not self.kill_switch:
                self.kill_reason = day.kill_reason or "kill switch recorded before restart"
            self.kill_switch = True
        if day.loss_breached or day.risk_state == REDUCING:
            if not self.loss_breached:
                self.breach_reason = "daily loss limit breached earlier today"
            self.loss_breached = True
        events = [*(self._check_loss() if not self.loss_breached else _NO_EVENTS)]
        for sid, why in unrecorded.items():
            text = (f"strategy {sid} was stopped before risk restarted ({why}) but execution has no "
                    "record of it: the record and the square-off are sent again")
            events.append(Alert(level="WARNING", source="risk", code="strategy_stop_resent", text=text,
                                ts_ns=self.clock.now_ns()))  # fmt: skip
            events += self._stop_events(sid, why, {"resent": True})
        return (*events, *self._check_all_strategies())

    def backstop(self, today: str) -> dict[str, Any]:
        """What the service keeps in its local file (``risk-day.json``)."""
        return {"trading_day": self.trading_day or today, "kill_switch": self.kill_switch,
                "kill_reason": self.kill_reason, "loss_breached": self.loss_breached,
                "stopped": dict(self.stopped)}

    def restore_backstop(self, data: Mapping[str, Any], today: str) -> bool:
        """Take the local copy back at start, before the day is loaded from execution. The
        kill switch is restored whatever day wrote it (it stays on until switched off); the
        loss breach only on the day it happened. Returns whether the switch was restored."""
        if data.get("loss_breached") is True and data.get("trading_day") == today:
            self.loss_breached = True
            self.breach_reason = "daily loss limit breached earlier today"
        stopped = data.get("stopped")
        if isinstance(stopped, dict) and data.get("trading_day") == today:
            self.stopped.update({str(k): str(v)[:MAX_TEXT] for k, v in stopped.items()})
        if data.get("kill_switch") is not True or self.kill_switch:
            return False
        reason = str(data.get("kill_reason") or "kill switch tripped before restart")[:MAX_TEXT]
        self.kill_switch = True
        self.kill_reason = reason
        return True

    def resync(self, day: DayState) -> tuple[Sequence[Event], bool]:
        """Periodic self-correction from execution's ledger: adopt its positions, realised
        PnL and turnover (a fill missed on the bus is healed here). The kill switch and the
        loss latch are not taken from it: a switch-off may be on its way to execution.
        Returns the loss-breach events and whether anything had drifted."""
        before = (dict(self._net_qty), self._turnover, self._realised)
        self._load_book(day)
        drifted = before != (dict(self._net_qty), self._turnover, self._realised)
        events = self._check_loss() if not self.loss_breached else _NO_EVENTS
        return (*events, *self._check_all_strategies()), drifted

    def _load_book(self, day: DayState) -> None:
        self._mtm = None
        self._positions.clear()
        self._by_key.clear()
        self._net_qty.clear()
        self._open_keys.clear()
        self._cost_f.clear()
        for p in day.positions:
            key = instrument_key(p.segment, p.token)
            avg = p.avg_price if p.avg_price.is_finite() else _ZERO
            pos = PositionState(p.strategy_id, p.segment, p.token, p.symbol,
                                quantity=p.quantity, avg_price=avg, realised=p.realised_pnl,
                                buy_qty=p.buy_qty, sell_qty=p.sell_qty, buy_value=p.buy_value,
                                sell_value=p.sell_value)  # fmt: skip
            self._add_position(key, pos)
            if p.quantity:
                self._net_qty[key] = self._net_qty.get(key, 0) + p.quantity
            if p.last_price > 0 and math.isfinite(p.last_price):
                self._marks.setdefault(key, p.last_price)
        for key in self._by_key:
            self._refresh_open(key)
        self._net_qty = {k: q for k, q in self._net_qty.items() if q}
        self._realised = day.realised_pnl if day.realised_pnl.is_finite() else _ZERO
        self._turnover = day.turnover if day.turnover.is_finite() else _ZERO
        self._realised_f = float(self._realised)
        self._turnover_f = float(self._turnover)
        # Fills reach us by trade time; those traded before the snapshot and arriving soon
        # after it are already in it. (A later resync heals the rare one that was not.)
        self._restored_upto_ns = day.ts_ns
        self._guard_until = self.clock.monotonic() + RESTORE_GUARD_S

