"""RiskSentinel: every pre-trade check, the day's PnL after costs, the kill switch.

Pure logic: no sockets, no database, time only from the injected ``Clock``. The service
(``services/risk/service.py``) feeds it requests, ticks, fills and order updates and sends
out the messages it returns.

Checks, in this fixed order (the first reason rejects the order, and the trader sees it):

 1. duplicate ``request_id`` — the id was already approved for a *different* order. An
    identical retry (Lazy Pirate) of an approved order gets the earlier verdict back
    instead, so a retried request never makes a second order; a rejected request may be
    sent again and is judged again (nothing was placed);
 2. kill switch — ``HALTED`` rejects everything ("HALTED: ...");
 3. order fields — side BUY/SELL, product MIS/CNC/NRML, a known order type;
 4. instrument — known to the master and tradable (not an index, tick size known);
 5. prices — price, trigger, stop loss and target positive, finite, at most ``MAX_PRICE``
    and on tick (price ``None`` is market intent); market intent needs a last traded price;
 6. bracket — BUY: stop loss < entry < target; SELL: target < entry < stop loss
    (entry is the last price for market intent);
    then sizing: a request with ``sizing`` and quantity 0 is sized to the risk budget;
 7. quantity — > 0, a multiple of the lot size, ≤ ``max_qty``;
 8. exposure — in ``REDUCING`` (or for ``reduce_only`` orders) only reducing orders pass.
    An order reduces when it closes part of the SENDING strategy's own position in the
    instrument (opposite side, not flipping it together with that strategy's closing orders
    already working). Per strategy, not netted across strategies, because execution sizes
    bracket legs per strategy: another strategy's SELL that nets the account flat leaves this
    strategy's long, and its stop, live — the stop then opens a short. A strategy closing its
    own position never leaves another's leg unprotected, so it passes even when it moves the
    account's net away from zero;
 9. notional — quantity * price (last price for market intent) ≤ ``max_notional``;
10. open positions — a new instrument must not take the count past ``max_open_positions``;
11. throttle — at most ``max_orders_per_sec`` approvals in any sliding one-second window.

PnL: gross = realised + marked to market on the latest tick; cost = turnover *
``cost_rate``; net = gross - cost. When net falls below -``max_daily_loss`` the state becomes
``REDUCING`` by itself and stays so for the day (the breach is latched: a bounce does not
re-open entries), with an ``Alert`` and a ``RecordRiskEvent`` for execution to store.
Kill switch on → ``HALTED``; off → ``ACTIVE``, or ``REDUCING`` while the loss stays breached.
``restore(DayState)`` rebuilds all of it after a restart; it never unlocks a tripped switch.
The kill switch outlives the trading day (it stays on until switched off); the loss breach
does not (each day has a fresh budget). ``backstop()``/``restore_backstop()`` are the local
copy the service keeps in ``$NEOPULSE_HOME/run/risk-day.json``, with the same rules.
``resync(DayState)`` periodically adopts execution's positions, realised PnL and turnover,
so a fill missed on the bus cannot leave risk's PnL wrong for long.

Positions are kept per strategy (as execution keeps them) and netted per instrument for the
account's exposure; a reducing order is judged on its own strategy's position (check 8).

Execution deadline: with ``exec_timeout_ms`` set, each ``ExecuteOrder`` carries
``expires_ns`` = send time + ``EXEC_ATTEMPTS`` attempts of it - ``EXEC_MARGIN`` of one;
execution does not place an order whose deadline passed before its row was committed, and
risk waits the whole budget (``exec_budget_ns``) before it gives up. So an order that
execution accepted is answered before risk gives up, and ``execution_timed_out`` may tell
the strategy truthfully that the order expires unplaced. That verdict is remembered like an
approval: a retry of the request id gets it again and never makes a second attempt.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import msgspec

from libs.common.clock import Clock
from libs.common.config import RiskConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import (
    ACTIVE,
    CANCELLED,
    HALTED,
    MAX_PRICE,
    MAX_TEXT,
    REDUCING,
    REJECTED,
    TERMINAL_STATES,
    Alert,
    CancelEntries,
    DayState,
    ExecuteOrder,
    Fill,
    OrderRequest,
    OrderUpdate,
    RecordRiskEvent,
    RiskState,
    RiskVerdict,
    Tick,
)

SIDES = ("BUY", "SELL")
PRODUCTS = ("MIS", "CNC", "NRML")
ORDER_TYPES = ("LIMIT", "MARKET", "SL", "SL-M")
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
_REMEMBERED_REQUESTS = 200_000  # request ids kept for duplicate detection (bounded memory)
_REMEMBERED_FILLS = 200_000
RESTORE_GUARD_S = 10.0  # after a restore, fills traded before the snapshot are taken as in it
EXEC_ATTEMPTS = 2  # attempts at ExecuteOrder (execution is idempotent on request_id)
EXEC_MARGIN = 0.2  # of one attempt: the deadline falls this much before risk gives up

Event = Alert | RecordRiskEvent | CancelEntries
_NO_EVENTS: tuple[Event, ...] = ()


# --------------------------------------------------------------------------- sizing


def calculate_size(  # noqa: PLR0917 - the positional signature DESIGN §7 names
    capital: Decimal | float, risk_pct: Decimal | float, entry: Decimal | float,
    stop: Decimal | float, lot_size: int = 1, max_qty: int = 1000,
) -> int:
    """Shares to trade so that a stop-out loses at most ``risk_pct`` % of ``capital``.

    Rounded down to a whole number of lots and capped at ``max_qty`` (itself rounded down
    to lots), so the result never exceeds the risk budget. Returns 0 when one lot is already
    too much, or when an input is not a positive finite number.
    """
    try:
        cap, pct, ent, stp = (v if isinstance(v, Decimal) else Decimal(repr(v))
                              for v in (capital, risk_pct, entry, stop))
    except (InvalidOperation, ValueError):
        return 0
    if not all(v.is_finite() for v in (cap, pct, ent, stp)):
        return 0
    if cap <= 0 or pct <= 0 or ent <= 0 or stp <= 0 or lot_size <= 0 or max_qty <= 0:
        return 0
    per_share = abs(ent - stp)
    if per_share == 0:
        return 0
    budget = cap * pct / _HUNDRED
    shares = int((budget / per_share).to_integral_value(rounding=ROUND_FLOOR))
    lots = min(shares // lot_size, max_qty // lot_size)
    return max(0, lots * lot_size)


# --------------------------------------------------------------------------- book-keeping


class _Position:
    """One strategy's net position in one instrument (average-cost method)."""

    __slots__ = ("avg", "qty", "realised")

    def __init__(self, qty: int = 0, avg: Decimal = _ZERO, realised: Decimal = _ZERO) -> None:
        self.qty = qty
        self.avg = avg
        self.realised = realised

    def apply(self, signed_qty: int, price: Decimal) -> Decimal:
        """Book a fill; returns the PnL it realised."""
        realised = _ZERO
        if self.qty == 0 or (self.qty > 0) == (signed_qty > 0):
            new_qty = self.qty + signed_qty
            self.avg = (self.avg * self.qty + price * signed_qty) / new_qty
            self.qty = new_qty
            return realised
        closing = min(abs(signed_qty), abs(self.qty))
        direction = 1 if self.qty > 0 else -1
        realised = (price - self.avg) * closing * direction
        self.realised += realised
        self.qty -= direction * closing
        rest = abs(signed_qty) - closing
        if rest:
            self.qty = rest if signed_qty > 0 else -rest
            self.avg = price
        elif self.qty == 0:
            self.avg = _ZERO
        return realised


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


def _fmt(value: Decimal | float) -> str:
    """Money for reason texts: 2 decimals, thousands unseparated (trader logs grep well)."""
    return f"{value:.2f}"


def _positive_finite(value: Decimal) -> bool:
    return value.is_finite() and value > 0


# --------------------------------------------------------------------------- the sentinel


class RiskSentinel:
    """Pre-trade checks and the day's risk state. See the module docstring for the order."""

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
        self._positions: dict[tuple[str, str], _Position] = {}
        self._by_key: dict[str, list[_Position]] = {}  # instrument key → every strategy's position
        self._cost_f: dict[str, float] = {}  # open instrument key → sum of qty x avg (for marking)
        self._net_qty: dict[str, int] = {}  # instrument key → account net quantity
        self._open_keys: set[str] = set()  # instruments with a non-zero position in any strategy
        self._marks: dict[str, float] = {}  # instrument key → last traded price
        self._realised = _ZERO
        self._turnover = _ZERO
        self._realised_f = 0.0  # float copies for per-tick marking (no Decimal on the tick path)
        self._turnover_f = 0.0
        self._working: dict[str, _Working] = {}  # request_id → working order
        self._order_ids: dict[str, str] = {}  # order_id → request_id
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()  # request ids reported "expires unplaced"
        self._fills_seen: OrderedDict[str, None] = OrderedDict()
        self._restored_upto_ns = 0  # fills traded at or before this are in the restored day...
        self._guard_until = 0.0  # ...when they arrive before this (clock.monotonic)
        self._approvals: deque[float] = deque()
        self.approved = 0
        self.rejected = 0

    # ------------------------------------------------------------------ state

    @property
    def current_state(self) -> str:
        if self.kill_switch:
            return HALTED
        return REDUCING if self.loss_breached else ACTIVE

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
        return RiskState(
            state=self.current_state, gross_pnl=gross, realised_pnl=realised,
            unrealised_pnl=unrealised, cost=cost, net_pnl=gross - cost, turnover=turnover,
            max_daily_loss=self.cfg.max_daily_loss, kill_switch=self.kill_switch, reason=reason,
            open_positions=len(self._open_keys), ts_ns=self.clock.now_ns(),
        )

    def position(self, key: str) -> int:
        """Account net quantity in an instrument (``segment|token``)."""
        return self._net_qty.get(key, 0)

    # ------------------------------------------------------------------ orders

    def check(self, req: OrderRequest) -> RiskVerdict:
        """Decide on one order request (sizing it when asked). Approval is recorded."""
        return self.evaluate(req)[0]

    def evaluate(self, req: OrderRequest) -> tuple[RiskVerdict, ExecuteOrder | None]:
        """Like ``check``, and for an approval also the ``ExecuteOrder`` to send execution."""
        reason: str | None
        norm = msgspec.structs.replace(req, ts_ns=0)
        seen = self._seen.get(req.request_id)
        if seen is not None:
            if seen.request == norm:
                return seen.verdict, None  # an identical retry: same answer, no second order
            reason = f"duplicate request_id {req.request_id}: already used for another order"
            return self._reject(req, reason), None
        if self.kill_switch:
            reason = f"HALTED: kill switch is on ({self.kill_reason or 'no reason given'})"
            return self._reject(req, reason), None
        reason = _check_fields(req)
        if reason:
            return self._reject(req, reason), None
        inst, reason = self._check_instrument(req)
        if inst is None:
            return self._reject(req, reason or "unknown instrument"), None
        reason = _check_prices(req, inst)
        if reason:
            return self._reject(req, reason), None
        entry = req.price if req.price is not None else self._last_price(inst)
        if entry is None:
            return self._reject(req, f"no last price for {inst.symbol} yet: give a limit price"), None
        reason = _check_bracket(req, entry)
        if reason:
            return self._reject(req, reason), None
        qty = req.quantity
        if req.sizing is not None and qty == 0:
            qty, reason = self._size(req, inst, entry)
            if reason:
                return self._reject(req, reason), None
        reason = self._check_quantity(qty, inst)
        if reason:
            return self._reject(req, reason), None
        not_reducing = self._why_not_reducing(req, qty, inst)
        reducing = not_reducing is None
        if not_reducing and (self.loss_breached or req.reduce_only):
            prefix = "REDUCING: daily loss limit breached; " if self.loss_breached else "reduce-only: "
            return self._reject(req, prefix + not_reducing), None
        reason = self._check_notional(qty, entry)
        if reason:
            return self._reject(req, reason), None
        if not reducing:
            reason = self._check_open_positions(inst)
            if reason:
                return self._reject(req, reason), None
        reason = self._check_throttle()
        if reason:
            return self._reject(req, reason), None
        return self._approve(req, norm, qty, inst)

    def _approve(self, req: OrderRequest, norm: OrderRequest, qty: int,
                 inst: Instrument) -> tuple[RiskVerdict, ExecuteOrder]:
        self._approvals.append(self.clock.monotonic())
        self._working[req.request_id] = _Working(inst.key, req.side, qty, req.strategy_id)
        now = self.clock.now_ns()
        verdict = RiskVerdict(request_id=req.request_id, approved=True, quantity=qty,
                              state=self.current_state, ts_ns=now)
        self._remember(req.request_id, _Seen(norm, verdict))
        self.approved += 1
        order = msgspec.structs.replace(req, quantity=qty, symbol=inst.symbol, segment=inst.segment,
                                        token=inst.token)
        expires = now + self._exec_deadline_ns if self._exec_deadline_ns else 0
        execute = ExecuteOrder(request_id=req.request_id, order=order, quantity=qty, segment=inst.segment,
                               token=inst.token, symbol=inst.symbol, expires_ns=expires, ts_ns=now)
        return verdict, execute

    def _reject(self, req: OrderRequest, reason: str) -> RiskVerdict:
        # Rejections are not remembered: nothing was placed, so a retry may simply be judged again
        # (a throttled order retried a second later can pass).
        self.rejected += 1
        return RiskVerdict(request_id=req.request_id, approved=False, reason=reason,
                           state=self.current_state, ts_ns=self.clock.now_ns())

    def _remember(self, request_id: str, seen: _Seen) -> None:
        self._seen[request_id] = seen
        if len(self._seen) > _REMEMBERED_REQUESTS:
            self._seen.popitem(last=False)

    def confirm(self, request_id: str, order_id: str) -> RiskVerdict | None:
        """Execution accepted the approved order: the final verdict carries its order id."""
        seen = self._seen.get(request_id)
        if seen is None:
            return None
        seen.verdict = msgspec.structs.replace(seen.verdict, order_id=order_id)
        if order_id and request_id in self._working:
            self._order_ids[order_id] = request_id
        return seen.verdict

    def execution_failed(self, request_id: str, reason: str) -> RiskVerdict:
        """Execution refused the order (it answered, and nothing was placed): the approval is
        withdrawn and forgotten, so a retry with the same request_id is judged again."""
        self._working.pop(request_id, None)
        if self._seen.pop(request_id, None) is not None:
            self.approved -= 1
        self.rejected += 1
        return RiskVerdict(request_id=request_id, approved=False, reason=reason,
                           state=self.current_state, ts_ns=self.clock.now_ns())

    def execution_timed_out(self, request_id: str, waited_ms: int) -> RiskVerdict:
        """Execution did not answer within the whole budget, so the order's deadline has
        passed and it will not be placed. The approval is withdrawn (it stops counting as a
        working order) and the verdict is remembered for the request id: a Lazy Pirate retry
        gets the same answer, never a second attempt. Call only with ``expires_ns`` set and
        the budget spent; without a deadline, execution may still place the order."""
        self._working.pop(request_id, None)
        reason = f"execution did not answer within {waited_ms} ms; the order expires unplaced"
        verdict = RiskVerdict(request_id=request_id, approved=False, reason=reason,
                              state=self.current_state, ts_ns=self.clock.now_ns())
        seen = self._seen.get(request_id)
        if seen is not None:
            if seen.verdict.approved:
                self.approved -= 1
            seen.verdict = verdict
        self.rejected += 1
        self._expired[request_id] = None
        if len(self._expired) > _REMEMBERED_REQUESTS:
            self._expired.popitem(last=False)
        return verdict

    # ------------------------------------------------------------------ checks

    def _check_instrument(self, req: OrderRequest) -> tuple[Instrument | None, str | None]:
        if req.segment and req.token:
            inst = self.master.get(req.segment, req.token)
            name = f"{req.segment}|{req.token}"
        elif req.symbol.strip():
            name = req.symbol.strip()
            try:
                inst = self.master.resolve(name)
            except KeyError:
                inst = None
        else:
            return None, "the order names no instrument (symbol, or segment and token)"
        if inst is None:
            return None, f"unknown instrument: {name}"
        if inst.inst_type == "INDEX":
            return None, f"{inst.symbol} is an index and cannot be traded"
        if not inst.tradable:
            return None, f"{inst.symbol} is not tradable: tick size unknown"
        return inst, None

    def _last_price(self, inst: Instrument) -> Decimal | None:
        last = self._marks.get(inst.key)
        if last is None or not (last > 0 and math.isfinite(last)):
            return None
        return Decimal(repr(last))

    def _size(self, req: OrderRequest, inst: Instrument, entry: Decimal) -> tuple[int, str | None]:
        sizing = req.sizing
        assert sizing is not None
        if req.stop_loss is None:
            return 0, "sizing needs a stop loss to measure the risk per share"
        if not _positive_finite(sizing.capital):
            return 0, f"sizing capital {sizing.capital} must be a positive finite number"
        if not (sizing.risk_pct.is_finite() and _ZERO < sizing.risk_pct <= _HUNDRED):
            return 0, f"sizing risk_pct {sizing.risk_pct} must be above 0 and at most 100"
        qty = calculate_size(sizing.capital, sizing.risk_pct, entry, req.stop_loss,
                             inst.lot_size, self.cfg.max_qty)
        if qty <= 0:
            budget = sizing.capital * sizing.risk_pct / _HUNDRED
            per_lot = abs(entry - req.stop_loss) * inst.lot_size
            return 0, (f"sized quantity is 0: risk budget {_fmt(budget)} is less than one lot of "
                       f"{inst.symbol} ({_fmt(per_lot)} at risk per lot)")
        return qty, None

    def _check_quantity(self, qty: int, inst: Instrument) -> str | None:
        if qty <= 0:
            return f"quantity {qty} must be greater than 0"
        if qty % inst.lot_size:
            return f"quantity {qty} is not a multiple of lot size {inst.lot_size} for {inst.symbol}"
        if qty > self.cfg.max_qty:
            return f"quantity {qty} exceeds max_qty {self.cfg.max_qty}"
        return None

    def _why_not_reducing(self, req: OrderRequest, qty: int, inst: Instrument) -> str | None:
        """None when the order reduces (check 8), else what it would do instead."""
        key, side, sid = inst.key, req.side, req.strategy_id
        what = f"{side} {qty} {inst.symbol}"
        pos = self._positions.get((sid, key))
        own = pos.qty if pos is not None else 0
        if own == 0 or (side == "SELL") != (own > 0):
            return (f"only orders that reduce the strategy's own position pass "
                    f"({what} would open or add for {sid})")
        same_side = [w for w in self._working.values() if w.key == key and w.side == side]
        own_closable = max(0, abs(own) - sum(w.remaining for w in same_side if w.strategy_id == sid))
        if qty > own_closable:
            return f"{what} is more than the {own_closable} that would close {sid}'s position"
        return None

    def _check_notional(self, qty: int, entry: Decimal) -> str | None:
        notional = entry * qty
        if notional > self._max_notional:
            return f"notional {_fmt(notional)} exceeds max_notional {_fmt(self._max_notional)}"
        return None

    def _check_open_positions(self, inst: Instrument) -> str | None:
        busy = set(self._open_keys)
        busy.update(w.key for w in self._working.values() if w.remaining)
        if inst.key in busy or len(busy) < self.cfg.max_open_positions:
            return None
        return (f"max_open_positions {self.cfg.max_open_positions} reached: {inst.symbol} "
                f"would be position {len(busy) + 1}")

    def _check_throttle(self) -> str | None:
        now = self.clock.monotonic()
        window = self._approvals
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.cfg.max_orders_per_sec:
            return (f"throttled: {len(window)} orders in the last second "
                    f"(max_orders_per_sec {self.cfg.max_orders_per_sec})")
        return None

    # ------------------------------------------------------------------ market and fills

    def on_tick(self, tick: Tick) -> Sequence[Event]:
        """Mark to market. Returns the loss-breach events when this tick trips the limit."""
        ltp = tick.ltp
        if not (ltp > 0 and math.isfinite(ltp)):
            return _NO_EVENTS
        key = f"{tick.segment}|{tick.token}"
        marks = self._marks
        marks[key] = ltp
        if key in self._open_keys and not self.loss_breached:
            # Hot path: ``net_pnl()`` inlined (the same sums in the same order, so the same
            # floats); the breach itself goes through ``_check_loss``.
            unrealised = 0.0
            net = self._net_qty
            for k, cost in self._cost_f.items():
                mark = marks.get(k)
                if mark is not None:
                    unrealised += net.get(k, 0) * mark - cost
            net_pnl = (self._realised_f + unrealised) - self._turnover_f * self._cost_rate
            if not net_pnl >= -self.cfg.max_daily_loss:  # written so that NaN breaches, as there
                return self._check_loss()
        return _NO_EVENTS

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
        key = f"{fill.segment}|{fill.token}"
        signed = fill.quantity if fill.side == "BUY" else -fill.quantity
        pos = self._positions.get((fill.strategy_id, key))
        if pos is None:
            pos = self._add_position(fill.strategy_id, key, _Position())
        self._realised += pos.apply(signed, fill.price)
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
        request_id = self._order_ids.get(fill.order_id)
        if request_id is not None:
            working = self._working.get(request_id)
            if working is not None:
                working.fill_qty += fill.quantity
                if working.remaining == 0:
                    self._forget_working(request_id)
        return self._check_loss() if not self.loss_breached else _NO_EVENTS

    def on_order_update(self, upd: OrderUpdate) -> Sequence[Event]:
        """Keep the working-order book: terminal orders stop counting as exposure. An order
        risk had reported as expired unplaced but that execution placed after all is taken
        back into the book, with a CRITICAL alert (the strategy was told it was not placed)."""
        working = self._working.get(upd.request_id)
        if working is None:
            if upd.request_id in self._expired and upd.status not in (REJECTED, CANCELLED):
                del self._expired[upd.request_id]
                working = _Working(f"{upd.segment}|{upd.token}", upd.side, upd.quantity, upd.strategy_id)
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

    def _add_position(self, strategy_id: str, key: str, pos: _Position) -> _Position:
        self._positions[(strategy_id, key)] = pos
        self._by_key.setdefault(key, []).append(pos)
        return pos

    def _refresh_open(self, key: str) -> None:
        cost = 0.0
        is_open = False
        for p in self._by_key.get(key, ()):
            if p.qty:
                is_open = True
                cost += p.qty * float(p.avg)
        if is_open:
            self._open_keys.add(key)
            self._cost_f[key] = cost
        else:
            self._open_keys.discard(key)
            self._cost_f.pop(key, None)

    def _check_loss(self) -> Sequence[Event]:
        net = self.net_pnl()
        limit = self.cfg.max_daily_loss
        if net >= -limit:
            return _NO_EVENTS
        self.loss_breached = True
        self.breach_reason = f"daily loss limit breached: net PnL {_fmt(net)} is below -{_fmt(limit)}"
        text = f"{self.breach_reason}; risk is REDUCING — only orders that reduce a position pass"
        data = {"net_pnl": round(net, 2), "max_daily_loss": limit, "risk_state": self.current_state,
                "kill_switch": self.kill_switch, "trading_day": self.trading_day}
        return (
            Alert(level="CRITICAL", source="risk", text=text, code="loss_breached",
                  ts_ns=self.clock.now_ns()),
            RecordRiskEvent(event="loss_breached", reason=self.breach_reason, data=data,
                            request_id=f"risk-loss-{self.trading_day or self.clock.now_ns()}",
                            ts_ns=self.clock.now_ns()),
        )

    # ------------------------------------------------------------------ kill switch and restore

    def set_kill_switch(self, on: bool, reason: str = "", source: str = "cli") -> Sequence[Event]:
        """Trip or reset the manual kill switch. Returns what to announce and record, and for
        ``on`` the request that makes execution cancel open entry orders."""
        now = self.clock.now_ns()
        reason = reason.strip() or ("manual kill switch" if on else "")
        if on == self.kill_switch and (not on or reason == self.kill_reason):
            return _NO_EVENTS
        self.kill_switch = on
        self.kill_reason = reason if on else ""
        state = self.current_state
        data = {"kill_switch": on, "risk_state": state, "net_pnl": round(self.net_pnl(), 2),
                "trading_day": self.trading_day}
        if on:
            text = f"kill switch ON ({reason}): risk is HALTED, open entry orders are being cancelled"
            return (
                Alert(level="CRITICAL", source="risk", text=text, code="kill_switch_on", ts_ns=now),
                RecordRiskEvent(event="kill_switch_on", reason=reason, source=source, data=data,
                                request_id=f"risk-ks-on-{now}", ts_ns=now),
                CancelEntries(request_id=f"risk-cancel-{now}", reason=f"kill switch: {reason}", ts_ns=now),
            )
        text = f"kill switch OFF: risk is {state}"
        if state == REDUCING:
            text += " (the daily loss limit is still breached)"
        return (
            Alert(level="WARNING", source="risk", text=text, code="kill_switch_off", ts_ns=now),
            RecordRiskEvent(event="kill_switch_off", reason=reason or "switched off", source=source,
                            data=data, request_id=f"risk-ks-off-{now}", ts_ns=now),
        )

    def new_day(self) -> None:
        """A new trading day began while running: a fresh loss budget (the kill switch stays;
        the positions and PnL come from the next ``restore``)."""
        self.loss_breached = False
        self.breach_reason = ""

    def restore(self, day: DayState) -> Sequence[Event]:
        """Rebuild the day from execution's ledger. A tripped kill switch or a latched loss
        breach stays tripped (also when it was tripped here while the day was loading)."""
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
        return self._check_loss() if not self.loss_breached else _NO_EVENTS

    def backstop(self, today: str) -> dict[str, Any]:
        """What the service keeps in its local file (``risk-day.json``)."""
        return {"trading_day": self.trading_day or today, "kill_switch": self.kill_switch,
                "kill_reason": self.kill_reason, "loss_breached": self.loss_breached}

    def restore_backstop(self, data: Mapping[str, Any], today: str) -> bool:
        """Take the local copy back at start, before the day is loaded from execution. The
        kill switch is restored whatever day wrote it (it stays on until switched off); the
        loss breach only on the day it happened. Returns whether the switch was restored."""
        if data.get("loss_breached") is True and data.get("trading_day") == today:
            self.loss_breached = True
            self.breach_reason = "daily loss limit breached earlier today"
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
        return (self._check_loss() if not self.loss_breached else _NO_EVENTS), drifted

    def _load_book(self, day: DayState) -> None:
        self._positions.clear()
        self._by_key.clear()
        self._net_qty.clear()
        self._open_keys.clear()
        self._cost_f.clear()
        for p in day.positions:
            key = f"{p.segment}|{p.token}"
            avg = p.avg_price if p.avg_price.is_finite() else _ZERO
            self._add_position(p.strategy_id, key, _Position(p.quantity, avg, p.realised_pnl))
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


# --------------------------------------------------------------------------- stateless checks


def _check_fields(req: OrderRequest) -> str | None:
    if req.side not in SIDES:
        return f"side {req.side!r} must be BUY or SELL"
    if req.product not in PRODUCTS:
        return f"product {req.product!r} must be MIS, CNC or NRML"
    if req.order_type not in ORDER_TYPES:
        return f"order type {req.order_type!r} must be LIMIT, MARKET, SL or SL-M"
    if req.order_type in ("SL", "SL-M") and req.trigger_price is None:
        return f"order type {req.order_type} needs a trigger price"
    return None


def _check_prices(req: OrderRequest, inst: Instrument) -> str | None:
    tick = inst.tick_size
    for label, value in (("price", req.price), ("trigger price", req.trigger_price),
                         ("stop loss", req.stop_loss), ("target", req.target)):
        if value is None:
            continue
        if not _positive_finite(value):
            return f"{label} {value} must be a positive finite number"
        if value > MAX_PRICE:
            return f"{label} {value} is above the {MAX_PRICE} cap on any price"
        try:
            off_tick = bool(value % tick)
        except InvalidOperation:  # absurdly large: the remainder is beyond Decimal precision
            return f"{label} {value} is not a usable price"
        if off_tick:
            return f"{label} {value} is not on tick size {tick} for {inst.symbol}"
    return None


def _check_bracket(req: OrderRequest, entry: Decimal) -> str | None:
    sl, target = req.stop_loss, req.target
    if req.side == "BUY":
        if sl is not None and not sl < entry:
            return f"BUY stop loss {sl} must be below entry {entry}"
        if target is not None and not target > entry:
            return f"BUY target {target} must be above entry {entry}"
    else:
        if sl is not None and not sl > entry:
            return f"SELL stop loss {sl} must be above entry {entry}"
        if target is not None and not target < entry:
            return f"SELL target {target} must be below entry {entry}"
    return None
