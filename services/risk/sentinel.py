"""RiskSentinel: every pre-trade check, the day's PnL after costs, the kill switch.

Pure logic: no sockets, no database, time only from the injected ``Clock``. The service
(``services/risk/service.py``) feeds it requests, ticks, fills and order updates and sends
out the messages it returns.

Checks, in this fixed order (the first reason rejects the order, and the trader sees it).
A failing check returns a ``Refusal``: the reason and its ``VerdictCode`` (in brackets
below), which the verdict carries as ``code`` for code to match on:

 1. duplicate ``request_id`` [duplicate] — the id was already approved for a *different* order. An
    identical retry (Lazy Pirate) of an approved order gets the earlier verdict back
    instead, so a retried request never makes a second order; a rejected request may be
    sent again and is judged again (nothing was placed);
 2. kill switch [halted] — ``HALTED`` rejects everything ("HALTED: ...");
 3. order fields [fields] — side BUY/SELL, product MIS/CNC/NRML, a known order type;
 4. instrument [instrument, contract_expired] — known to the master and tradable (not an index,
    tick size known), and not a contract whose expiry day is past ("NIFTY26NOVFUT expired on
    2026-11-24"; entries and exits alike: the exchange no longer trades it), nor one expiring
    today once it is 15:30 IST ("... expired today (2026-12-08) at the 15:30 close"). Today is
    the clock's date in IST;
 5. prices [price, tick, last_price] — price, trigger, stop loss and target positive, finite,
    at most ``MAX_PRICE`` and on tick (price ``None`` is market intent); market intent needs
    a last traded price;
 6. bracket [bracket] — BUY: stop loss < entry < target; SELL: target < entry < stop loss
    (entry is the last price for market intent);
    then sizing [sizing]: a request with ``sizing`` and quantity 0 is sized to the risk budget;
 7. quantity [quantity, lot] — > 0, a multiple of the lot size, ≤ ``max_qty``;
 8. exposure [reducing, reduce_only] — in ``REDUCING`` (or for ``reduce_only`` orders) only
    reducing orders pass.
    An order reduces when it closes part of the SENDING strategy's own position in the
    instrument (opposite side, not flipping it together with that strategy's closing orders
    already working). Per strategy, not netted across strategies, because execution sizes
    bracket legs per strategy: another strategy's SELL that nets the account flat leaves this
    strategy's long, and its stop, live — the stop then opens a short. A strategy closing its
    own position never leaves another's leg unprotected, so it passes even when it moves the
    account's net away from zero. With ``risk.expiry_day_cutoff`` set (``"15:00"``), an order
    that does not reduce, in a contract expiring today, is refused from that time on
    [expiry_cutoff]; closing orders still pass, so a position can always be taken off. From
    ``risk.no_new_entries_after`` (default ``"15:00"`` IST) any order that does not reduce is
    refused [late_entry];
 9. notional [notional] — quantity * price (last price for market intent) ≤ ``max_notional``;
10. open positions [positions] — a new instrument must not take the count past ``max_open_positions``;
11. throttle [throttle] — at most ``max_orders_per_sec`` approvals in any sliding one-second window.

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
the strategy truthfully that the order expires unplaced [expired]. That verdict is
remembered like an approval: a retry of the request id gets it again and never makes a
second attempt. ``execution_failed`` withdraws an approval execution refused [execution, or
unauthorised when the service was refused for its credentials].
"""

from __future__ import annotations

import math
from collections import OrderedDict
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, NamedTuple

import msgspec

from libs.common.chain import live_from
from libs.common.clock import IST
from libs.common.config import hhmm_minutes
from libs.common.instruments import Instrument, instrument_key
from libs.common.messages import (
    BASKET_MAX_LEGS,
    BASKET_MIN_LEGS,
    MAX_PRICE,
    BasketRequest,
    BasketVerdict,
    ExecuteBasket,
    ExecuteOrder,
    OrderRequest,
    RiskVerdict,
    VerdictCode,
    basket_leg_id,
)
from libs.common.money import pct_stop
from services.risk.book import (
    _HUNDRED,
    _REMEMBERED_REQUESTS,
    _ZERO,
    ORDER_TYPES,
    PRODUCTS,
    SIDES,
    RiskBook,
    _fmt,
    _positive_finite,
    _Seen,
    _Working,
)


class _Judged(NamedTuple):
    """A basket leg that passed its checks."""

    quantity: int
    inst: Instrument
    entry: Decimal
    reducing: bool
    order: OrderRequest  # the leg as judged (a ``stop_loss_pct`` made a ``stop_loss`` estimate)


class Refusal(NamedTuple):
    """What a failed check returns: the machine code and the reason the trader sees."""

    code: VerdictCode
    reason: str


# --------------------------------------------------------------------------- sizing


def calculate_size(  # noqa: PLR0917 - the classic positional sizing formula, kept as specified
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










# --------------------------------------------------------------------------- the sentinel


class RiskSentinel(RiskBook):
    """Pre-trade checks and the day's risk state. See the module docstring for the order."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # basket request id → (the request, ts zeroed; its verdict), like ``_seen`` for orders
        self._seen_baskets: OrderedDict[str, tuple[BasketRequest, BasketVerdict]] = OrderedDict()


    # ------------------------------------------------------------------ state






    # ------------------------------------------------------------------ orders

    def check(self, req: OrderRequest) -> RiskVerdict:
        """Decide on one order request (sizing it when asked). Approval is recorded."""
        return self.evaluate(req)[0]

    def evaluate(self, req: OrderRequest) -> tuple[RiskVerdict, ExecuteOrder | None]:
        """Like ``check``, and for an approval also the ``ExecuteOrder`` to send execution."""
        refusal: Refusal | None
        norm = msgspec.structs.replace(req, ts_ns=0)
        seen = self._seen.get(req.request_id)
        if seen is not None:
            if seen.request == norm:
                return seen.verdict, None  # an identical retry: same answer, no second order
            reason = f"duplicate request_id {req.request_id}: already used for another order"
            return self._reject(req, Refusal(VerdictCode.DUPLICATE, reason)), None
        if self.kill_switch:
            reason = f"HALTED: kill switch is on ({self.kill_reason or 'no reason given'})"
            return self._reject(req, Refusal(VerdictCode.HALTED, reason)), None
        if self.broker_halt:
            return self._reject(req, Refusal(VerdictCode.HALTED, f"HALTED: {self.broker_halt}")), None
        refusal = _check_fields(req)
        if refusal:
            return self._reject(req, refusal), None
        inst, refusal = self._check_instrument(req)
        if inst is None:
            return self._reject(req, refusal or Refusal(VerdictCode.INSTRUMENT, "unknown instrument")), None
        refusal = _check_prices(req, inst)
        if refusal:
            return self._reject(req, refusal), None
        entry = req.price if req.price is not None else self._last_price(inst)
        if entry is None:
            reason = f"no last price for {inst.symbol} yet: give a limit price"
            return self._reject(req, Refusal(VerdictCode.LAST_PRICE, reason)), None
        anchored = _stop_from_pct(req, entry, inst)
        if isinstance(anchored, Refusal):
            return self._reject(req, anchored), None
        req = anchored
        refusal = _check_bracket(req, entry)
        if refusal:
            return self._reject(req, refusal), None
        qty = req.quantity
        if req.sizing is not None and qty == 0:
            qty, refusal = self._size(req, inst, entry)
            if refusal:
                return self._reject(req, refusal), None
        refusal = self._check_quantity(qty, inst)
        if refusal:
            return self._reject(req, refusal), None
        not_reducing = self._why_not_reducing(req, qty, inst)
        reducing = not_reducing is None
        if not_reducing and (self.loss_breached or req.reduce_only):
            if self.loss_breached:
                reason = "REDUCING: daily loss limit breached; " + not_reducing
                refusal = Refusal(VerdictCode.REDUCING, reason)
            else:
                refusal = Refusal(VerdictCode.REDUCE_ONLY, "reduce-only: " + not_reducing)
            return self._reject(req, refusal), None
        if not reducing:
            refusal = (self._check_stopped(req.strategy_id) or self._check_late_entry(inst)
                       or self._check_expiry_cutoff(inst))  # fmt: skip
            if refusal:
                return self._reject(req, refusal), None
        refusal = self._check_notional(qty, entry)
        if refusal:
            return self._reject(req, refusal), None
        if not reducing:
            refusal = self._check_open_positions(inst) or self._check_entries(req.strategy_id, inst)
            if refusal:
                return self._reject(req, refusal), None
        refusal = self._check_throttle()
        if refusal:
            return self._reject(req, refusal), None
        if not reducing and req.purpose == "ENTRY":
            self._count_entry(req.request_id, req.strategy_id, inst.key)
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

    def _reject(self, req: OrderRequest, refusal: Refusal) -> RiskVerdict:
        # Rejections are not remembered: nothing was placed, so a retry may simply be judged again
        # (a throttled order retried a second later can pass).
        self.rejected += 1
        return RiskVerdict(request_id=req.request_id, approved=False, reason=refusal.reason,
                           code=refusal.code, state=self.current_state, ts_ns=self.clock.now_ns())

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

    def execution_failed(self, request_id: str, reason: str,
                         code: VerdictCode = VerdictCode.EXECUTION) -> RiskVerdict:
        """Execution refused the order (it answered, and nothing was placed): the approval is
        withdrawn and forgotten, so a retry with the same request_id is judged again."""
        self._working.pop(request_id, None)
        self._uncount_entry(request_id)
        if self._seen.pop(request_id, None) is not None:
            self.approved -= 1
        self.rejected += 1
        return RiskVerdict(request_id=request_id, approved=False, reason=reason, code=code,
                           state=self.current_state, ts_ns=self.clock.now_ns())

    def execution_timed_out(self, request_id: str, waited_ms: int) -> RiskVerdict:
        """Execution did not answer within the whole budget, so the order's deadline has
        passed and it will not be placed. The approval is withdrawn (it stops counting as a
        working order) and the verdict is remembered for the request id: a Lazy Pirate retry
        gets the same answer, never a second attempt. Call only with ``expires_ns`` set and
        the budget spent; without a deadline, execution may still place the order."""
        self._working.pop(request_id, None)
        self._uncount_entry(request_id)
        reason = f"execution did not answer within {waited_ms} ms; the order expires unplaced"
        verdict = RiskVerdict(request_id=request_id, approved=False, reason=reason,
                              code=VerdictCode.EXPIRED, state=self.current_state,
                              ts_ns=self.clock.now_ns())
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

    # ------------------------------------------------------------------ baskets

    def evaluate_basket(self, req: BasketRequest) -> tuple[BasketVerdict, ExecuteBasket | None]:
        """Judge a basket as one: every leg is checked as an order would be (``_leg_checks``,
        the order checks 3-10 above), and if any leg fails the whole basket is refused, the
        reason naming each failing leg. Each leg is judged with the legs before it counted as
        working orders, so two legs never both close (or "reduce") the same position. Every leg
        is within ``max_notional`` on its own (a leg may fill while its hedge rests), and the
        basket as a whole too: a long leg adds its value, a short leg takes its value off only
        for the quantity a long leg of the same underlying, expiry and kind covers (a hedged
        spread counts its net premium), and adds the rest in full. The throttle counts every
        leg. Leg ``n`` gets the request id
        ``basket_leg_id(request_id, n)`` and the basket's strategy id."""
        norm = msgspec.structs.replace(req, ts_ns=0,
                                       legs=[msgspec.structs.replace(x, ts_ns=0) for x in req.legs])
        seen = self._seen_baskets.get(req.request_id)
        if seen is not None:
            if seen[0] == norm:
                return seen[1], None  # an identical retry: same answer, never a second basket
            return self._refuse_basket(req, Refusal(VerdictCode.DUPLICATE, (
                f"duplicate request_id {req.request_id}: already used for another basket"))), None
        if not BASKET_MIN_LEGS <= len(req.legs) <= BASKET_MAX_LEGS:
            return self._refuse_basket(req, Refusal(VerdictCode.BASKET, (
                f"a basket has {BASKET_MIN_LEGS} to {BASKET_MAX_LEGS} legs, not {len(req.legs)}"))), None
        if self.kill_switch:
            reason = f"HALTED: kill switch is on ({self.kill_reason or 'no reason given'})"
            return self._refuse_basket(req, Refusal(VerdictCode.HALTED, reason)), None
        if self.broker_halt:
            return self._refuse_basket(req, Refusal(VerdictCode.HALTED, f"HALTED: {self.broker_halt}")), None
        legs = [msgspec.structs.replace(x, request_id=basket_leg_id(req.request_id, n),
                                        strategy_id=req.strategy_id)
                for n, x in enumerate(req.legs, 1)]  # fmt: skip
        judged: list[_Judged] = []
        verdicts: list[RiskVerdict] = []
        failing: list[tuple[int, OrderRequest, Refusal]] = []
        new_keys: set[str] = set()
        projected: list[str] = []
        try:
            for n, leg in enumerate(legs, 1):
                if leg.request_id in self._seen:
                    why = f"duplicate request_id {leg.request_id}: already used for an order"
                    result: Refusal | _Judged = Refusal(VerdictCode.DUPLICATE, why)
                else:
                    result = self._leg_checks(leg, new_keys)
                if isinstance(result, Refusal):
                    failing.append((n, leg, result))
                    verdicts.append(RiskVerdict(request_id=leg.request_id, approved=False,
                                                reason=result.reason, code=result.code,
                                                state=self.current_state))  # fmt: skip
                    continue
                judged.append(result)
                # the next leg is judged against the position with this one working: two legs
                # cannot each close the same long, nor each count as "reducing" it
                self._working[leg.request_id] = _Working(result.inst.key, leg.side, result.quantity,
                                                         leg.strategy_id)  # fmt: skip
                projected.append(leg.request_id)
                if not result.reducing:
                    new_keys.add(result.inst.key)
                verdicts.append(RiskVerdict(request_id=leg.request_id, approved=True,
                                            quantity=result.quantity, state=self.current_state))  # fmt: skip
        finally:
            for rid in projected:  # _approve_basket records them for good
                self._working.pop(rid, None)
        if failing:
            reason = "; ".join(f"{_leg_name(n, leg)}: {r.reason}" for n, leg, r in failing)
            return self._refuse_basket(req, Refusal(failing[0][2].code, reason), verdicts), None
        net = _basket_notional(legs, judged)
        if net > self._max_notional:
            reason = (f"basket net notional {_fmt(net)} exceeds max_notional {_fmt(self._max_notional)}")
            return self._refuse_basket(req, Refusal(VerdictCode.NOTIONAL, reason), verdicts), None
        refusal = self._check_throttle(len(legs))
        if refusal:
            return self._refuse_basket(req, refusal, verdicts), None
        return self._approve_basket(req, norm, legs, judged)

    def _leg_checks(self, req: OrderRequest, basket_keys: set[str]) -> Refusal | _Judged:
        """One leg's checks, in ``evaluate``'s order (keep the two in step): fields,
        instrument (and expiry), prices, last price, bracket, sizing, quantity, exposure
        (against the position with the basket's earlier legs working), the expiry-day cutoff,
        notional, open positions (counting the basket's other new instruments).
        Returns (quantity, instrument, entry, reducing) when it passes."""
        refusal = _check_fields(req)
        if refusal:
            return refusal
        inst, refusal = self._check_instrument(req)
        if inst is None:
            return refusal or Refusal(VerdictCode.INSTRUMENT, "unknown instrument")
        refusal = _check_prices(req, inst)
        if refusal:
            return refusal
        entry = req.price if req.price is not None else self._last_price(inst)
        if entry is None:
            return Refusal(VerdictCode.LAST_PRICE, f"no last price for {inst.symbol} yet: give a limit price")
        anchored = _stop_from_pct(req, entry, inst)
        if isinstance(anchored, Refusal):
            return anchored
        req = anchored
        refusal = _check_bracket(req, entry)
        if refusal:
            return refusal
        qty = req.quantity
        if req.sizing is not None and qty == 0:
            qty, refusal = self._size(req, inst, entry)
            if refusal:
                return refusal
        refusal = self._check_quantity(qty, inst)
        if refusal:
            return refusal
        not_reducing = self._why_not_reducing(req, qty, inst)
        if not_reducing and self.loss_breached:
            return Refusal(VerdictCode.REDUCING, "REDUCING: daily loss limit breached; " + not_reducing)
        if not_reducing and req.reduce_only:
            return Refusal(VerdictCode.REDUCE_ONLY, "reduce-only: " + not_reducing)
        if not_reducing:
            refusal = (self._check_stopped(req.strategy_id) or self._check_late_entry(inst)
                       or self._check_expiry_cutoff(inst))  # fmt: skip
            if refusal:
                return refusal
        # a leg may fill while its hedge rests (or never fills): no leg is larger than an
        # order alone could be
        refusal = self._check_notional(qty, entry)
        if refusal:
            return refusal
        if not_reducing:
            refusal = (self._check_open_positions(inst, basket_keys)
                       or self._check_entries(req.strategy_id, inst))  # fmt: skip
            if refusal:
                return refusal
        return _Judged(qty, inst, entry, not_reducing is None, req)

    def _approve_basket(self, req: BasketRequest, norm: BasketRequest, legs: list[OrderRequest],
                        judged: list[_Judged]) -> tuple[BasketVerdict, ExecuteBasket]:
        now = self.clock.now_ns()
        self._approvals.extend([self.clock.monotonic()] * len(legs))
        expires = now + self._exec_deadline_ns if self._exec_deadline_ns else 0
        executes: list[ExecuteOrder] = []
        verdicts: list[RiskVerdict] = []
        for leg, (qty, inst, _entry, reducing, judged_leg) in zip(legs, judged, strict=True):
            self._working[leg.request_id] = _Working(inst.key, leg.side, qty, leg.strategy_id)
            if not reducing and leg.purpose == "ENTRY":
                self._count_entry(leg.request_id, leg.strategy_id, inst.key)
            leg_verdict = RiskVerdict(request_id=leg.request_id, approved=True, quantity=qty,
                                      state=self.current_state, ts_ns=now)
            self._remember(leg.request_id, _Seen(msgspec.structs.replace(leg, ts_ns=0), leg_verdict))
            order = msgspec.structs.replace(judged_leg, quantity=qty, symbol=inst.symbol,
                                            segment=inst.segment, token=inst.token)  # fmt: skip
            executes.append(ExecuteOrder(request_id=leg.request_id, order=order, quantity=qty,
                                         segment=inst.segment, token=inst.token, symbol=inst.symbol,
                                         expires_ns=expires, ts_ns=now))
            verdicts.append(leg_verdict)
        self.approved += 1
        verdict = BasketVerdict(request_id=req.request_id, approved=True, legs=verdicts,
                                state=self.current_state, ts_ns=now)
        self._remember_basket(req.request_id, norm, verdict)
        execute = ExecuteBasket(request_id=req.request_id, strategy_id=req.strategy_id, legs=executes,
                                expires_ns=expires, move_sl_to_cost=req.move_sl_to_cost, ts_ns=now)
        return verdict, execute

    def _refuse_basket(self, req: BasketRequest, refusal: Refusal,
                       legs: list[RiskVerdict] | None = None) -> BasketVerdict:
        self.rejected += 1  # not remembered: nothing was placed
        return BasketVerdict(request_id=req.request_id, approved=False, reason=refusal.reason,
                             code=refusal.code, legs=legs or [], state=self.current_state,
                             ts_ns=self.clock.now_ns())

    def _remember_basket(self, request_id: str, norm: BasketRequest, verdict: BasketVerdict) -> None:
        self._seen_baskets[request_id] = (norm, verdict)
        if len(self._seen_baskets) > _REMEMBERED_REQUESTS:
            self._seen_baskets.popitem(last=False)

    def confirm_basket(self, request_id: str, data: dict[str, Any]) -> BasketVerdict | None:
        """Execution accepted the basket: the verdict carries the basket's and each leg's order id."""
        seen = self._seen_baskets.get(request_id)
        if seen is None:
            return None
        order_ids = {str(x.get("request_id", "")): str(x.get("order_id", ""))
                     for x in data.get("legs", []) if isinstance(x, dict)}  # fmt: skip
        legs = [self.confirm(v.request_id, order_ids.get(v.request_id, "")) or v for v in seen[1].legs]
        verdict = msgspec.structs.replace(seen[1], legs=legs, basket_id=str(data.get("basket_id", "")))
        self._seen_baskets[request_id] = (seen[0], verdict)
        return verdict

    def basket_failed(self, request_id: str, reason: str,
                      code: VerdictCode = VerdictCode.EXECUTION) -> BasketVerdict:
        """Execution refused the basket (nothing of it placed): the approval is withdrawn and
        forgotten, so a retry with the same request id is judged again."""
        seen = self._seen_baskets.pop(request_id, None)
        legs = seen[1].legs if seen is not None else []
        out = [self.execution_failed(v.request_id, reason, code) for v in legs]
        if seen is not None:
            self.approved -= 1
            self.rejected -= len(out) - 1  # one basket, one rejection
        return BasketVerdict(request_id=request_id, approved=False, reason=reason, code=code, legs=out,
                             state=self.current_state, ts_ns=self.clock.now_ns())

    def basket_timed_out(self, request_id: str, waited_ms: int) -> BasketVerdict:
        """Execution did not answer within the whole budget: no leg will be placed (each
        carried the deadline). Remembered, like ``execution_timed_out``."""
        seen = self._seen_baskets.get(request_id)
        legs = [self.execution_timed_out(v.request_id, waited_ms) for v in (seen[1].legs if seen else [])]
        reason = f"execution did not answer within {waited_ms} ms; the basket expires unplaced"
        verdict = BasketVerdict(request_id=request_id, approved=False, reason=reason,
                                code=VerdictCode.EXPIRED, legs=legs, state=self.current_state,
                                ts_ns=self.clock.now_ns())
        if seen is not None:
            self.approved -= 1
            self.rejected -= len(legs) - 1
            self._seen_baskets[request_id] = (seen[0], verdict)
        return verdict

    # ------------------------------------------------------------------ checks

    def _check_instrument(self, req: OrderRequest) -> tuple[Instrument | None, Refusal | None]:
        if req.segment and req.token:
            inst = self.master.get(req.segment, req.token)
            name = instrument_key(req.segment, req.token)
        elif req.symbol.strip():
            name = req.symbol.strip()
            try:
                inst = self.master.resolve(name)
            except KeyError:
                inst = None
        else:
            return None, Refusal(VerdictCode.INSTRUMENT,
                                 "the order names no instrument (symbol, or segment and token)")
        if inst is None:
            return None, Refusal(VerdictCode.INSTRUMENT, f"unknown instrument: {name}")
        if inst.inst_type == "INDEX":
            return None, Refusal(VerdictCode.INSTRUMENT, f"{inst.symbol} is an index and cannot be traded")
        if not inst.tradable:
            return None, Refusal(VerdictCode.INSTRUMENT, f"{inst.symbol} is not tradable: tick size unknown")
        if inst.expiry is not None and inst.expiry < live_from(self.clock.now(IST)):
            day = inst.expiry.isoformat()
            today = inst.expiry == self.clock.now(IST).date()
            when = f"today ({day}) at the 15:30 close" if today else f"on {day}"
            return None, Refusal(VerdictCode.CONTRACT_EXPIRED, f"{inst.symbol} expired {when}")
        return inst, None

    def _check_stopped(self, strategy_id: str) -> Refusal | None:
        """A strategy stopped for the day by its ``max_loss`` or ``target_profit``."""
        why = self.stopped.get(strategy_id)
        if why is None:
            return None
        return Refusal(VerdictCode.STRATEGY_STOPPED,
                       f"strategy {strategy_id} is stopped for the day ({why}); orders that close a "
                       "position still pass")

    def _check_entries(self, strategy_id: str, inst: Instrument) -> Refusal | None:
        """``risk.max_entries_per_day`` entries of this strategy in this instrument already
        (its ``ENTRY`` orders that opened or added; a manual order is not counted)."""
        limit = self.cfg.max_entries_per_day
        done = self._entries.get((strategy_id, inst.key), 0) if limit else 0
        if not limit or done < limit:
            return None
        return Refusal(VerdictCode.MAX_ENTRIES,
                       f"max_entries_per_day {limit} reached: {strategy_id} has entered {inst.symbol} "
                       f"{done} time(s) today; orders that close a position still pass")

    def _count_entry(self, request_id: str, strategy_id: str, key: str) -> None:
        k = (strategy_id, key)
        self._entries[k] = self._entries.get(k, 0) + 1
        self._entry_of[request_id] = k

    def _uncount_entry(self, request_id: str) -> None:
        k = self._entry_of.pop(request_id, None)
        if k is not None and self._entries.get(k, 0) > 0:
            self._entries[k] -= 1

    def _check_late_entry(self, inst: Instrument) -> Refusal | None:
        """A new entry at or after ``risk.no_new_entries_after`` (IST) on any day."""
        cutoff = self.cfg.no_new_entries_after
        limit = hhmm_minutes(cutoff) if cutoff else None
        if limit is None:
            return None
        now = self.clock.now(IST)
        if now.hour * 60 + now.minute < limit:
            return None
        return Refusal(VerdictCode.LATE_ENTRY,
                       f"new entries are refused from {cutoff} (risk.no_new_entries_after): {inst.symbol} "
                       "would open or add; orders that close a position still pass")

    def _check_expiry_cutoff(self, inst: Instrument) -> Refusal | None:
        """A new entry in a contract expiring today, at or after ``risk.expiry_day_cutoff``."""
        cutoff = self.cfg.expiry_day_cutoff
        if not cutoff or inst.expiry is None:
            return None
        now = self.clock.now(IST)
        limit = hhmm_minutes(cutoff)
        if inst.expiry != now.date() or limit is None or now.hour * 60 + now.minute < limit:
            return None
        return Refusal(VerdictCode.EXPIRY_CUTOFF,
                       f"{inst.symbol} expires today: new entries are refused from {cutoff} "
                       f"(risk.expiry_day_cutoff); orders that close a position still pass")

    def _last_price(self, inst: Instrument) -> Decimal | None:
        last = self._marks.get(inst.key)
        if last is None or not (last > 0 and math.isfinite(last)):
            return None
        return Decimal(repr(last))

    def _size(self, req: OrderRequest, inst: Instrument, entry: Decimal) -> tuple[int, Refusal | None]:
        sizing = req.sizing
        assert sizing is not None
        if req.stop_loss is None:
            return 0, Refusal(VerdictCode.SIZING, "sizing needs a stop loss to measure the risk per share")
        if not _positive_finite(sizing.capital):
            return 0, Refusal(VerdictCode.SIZING,
                              f"sizing capital {sizing.capital} must be a positive finite number")
        if not (sizing.risk_pct.is_finite() and _ZERO < sizing.risk_pct <= _HUNDRED):
            return 0, Refusal(VerdictCode.SIZING,
                              f"sizing risk_pct {sizing.risk_pct} must be above 0 and at most 100")
        qty = calculate_size(sizing.capital, sizing.risk_pct, entry, req.stop_loss,
                             inst.lot_size, self.cfg.max_qty)
        if qty <= 0:
            budget = sizing.capital * sizing.risk_pct / _HUNDRED
            per_lot = abs(entry - req.stop_loss) * inst.lot_size
            return 0, Refusal(VerdictCode.SIZING,
                              f"sized quantity is 0: risk budget {_fmt(budget)} is less than one lot of "
                              f"{inst.symbol} ({_fmt(per_lot)} at risk per lot)")
        return qty, None

    def _check_quantity(self, qty: int, inst: Instrument) -> Refusal | None:
        if qty <= 0:
            return Refusal(VerdictCode.QUANTITY, f"quantity {qty} must be greater than 0")
        if qty % inst.lot_size:
            return Refusal(VerdictCode.LOT,
                           f"quantity {qty} is not a multiple of lot size {inst.lot_size} for {inst.symbol}")
        if qty > self.cfg.max_qty:
            return Refusal(VerdictCode.QUANTITY, f"quantity {qty} exceeds max_qty {self.cfg.max_qty}")
        return None

    def _why_not_reducing(self, req: OrderRequest, qty: int, inst: Instrument) -> str | None:
        """None when the order reduces (check 8), else what it would do instead."""
        key, side, sid = inst.key, req.side, req.strategy_id
        what = f"{side} {qty} {inst.symbol}"
        pos = self._positions.get((sid, key))
        own = pos.quantity if pos is not None else 0
        if own == 0 or (side == "SELL") != (own > 0):
            return (f"only orders that reduce the strategy's own position pass "
                    f"({what} would open or add for {sid})")
        same_side = [w for w in self._working.values() if w.key == key and w.side == side]
        own_closable = max(0, abs(own) - sum(w.remaining for w in same_side if w.strategy_id == sid))
        if qty > own_closable:
            return f"{what} is more than the {own_closable} that would close {sid}'s position"
        return None

    def _check_notional(self, qty: int, entry: Decimal) -> Refusal | None:
        notional = entry * qty
        if notional > self._max_notional:
            return Refusal(VerdictCode.NOTIONAL,
                           f"notional {_fmt(notional)} exceeds max_notional {_fmt(self._max_notional)}")
        return None

    def _check_open_positions(self, inst: Instrument, also: set[str] | None = None) -> Refusal | None:
        busy = set(self._open_keys)
        busy.update(w.key for w in self._working.values() if w.remaining)
        if also:  # a basket's other legs in new instruments
            busy.update(also)
        if inst.key in busy or len(busy) < self.cfg.max_open_positions:
            return None
        return Refusal(VerdictCode.POSITIONS,
                       f"max_open_positions {self.cfg.max_open_positions} reached: {inst.symbol} "
                       f"would be position {len(busy) + 1}")

    def _check_throttle(self, orders: int = 1) -> Refusal | None:
        now = self.clock.monotonic()
        window = self._approvals
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) + orders > self.cfg.max_orders_per_sec:
            return Refusal(VerdictCode.THROTTLE,
                           f"throttled: {len(window)} orders in the last second "
                           f"(max_orders_per_sec {self.cfg.max_orders_per_sec})")
        return None

    # ------------------------------------------------------------------ market and fills








    # ------------------------------------------------------------------ kill switch and restore









# --------------------------------------------------------------------------- stateless checks


def _covers(long: Instrument, short: Instrument) -> bool:
    """A long leg that hedges a short one: the same underlying and expiry, the same kind of
    contract (a call for a call, a put for a put, a future for a future), another contract."""
    return (bool(long.underlying) and long.underlying == short.underlying and long.expiry == short.expiry
            and long.option_type == short.option_type and long.inst_type == short.inst_type
            and long.key != short.key)  # fmt: skip


def _basket_notional(legs: list[OrderRequest], judged: list[_Judged]) -> Decimal:
    """The basket's notional for ``max_notional``: every long leg in full; a short leg takes
    its value off only for the quantity a long leg of the basket covers (``_covers``, each
    long's quantity used once); the rest of a short leg counts in full, as an order would."""
    cover = {n: j.quantity for n, (leg, j) in enumerate(zip(legs, judged, strict=True)) if leg.side == "BUY"}
    total = _ZERO
    for leg, j in zip(legs, judged, strict=True):
        if leg.side == "BUY":
            total += j.entry * j.quantity
            continue
        left = j.quantity
        for n, free in cover.items():
            if left and free and _covers(judged[n].inst, j.inst):
                used = min(left, free)
                cover[n] -= used
                left -= used
                total -= j.entry * used
        total += j.entry * left
    return abs(total)


def _leg_name(n: int, leg: OrderRequest) -> str:
    price = f" @ {leg.price}" if leg.price is not None else ""
    return f"leg {n} {leg.side} {leg.quantity} {leg.symbol or instrument_key(leg.segment, leg.token)}{price}"



def _check_fields(req: OrderRequest) -> Refusal | None:
    if req.side not in SIDES:
        return Refusal(VerdictCode.FIELDS, f"side {req.side!r} must be BUY or SELL")
    if req.product not in PRODUCTS:
        return Refusal(VerdictCode.FIELDS, f"product {req.product!r} must be MIS, CNC or NRML")
    if req.order_type not in ORDER_TYPES:
        return Refusal(VerdictCode.FIELDS, f"order type {req.order_type!r} must be LIMIT, MARKET, SL or SL-M")
    if req.order_type in ("SL", "SL-M") and req.trigger_price is None:
        return Refusal(VerdictCode.FIELDS, f"order type {req.order_type} needs a trigger price")
    return None


def _check_prices(req: OrderRequest, inst: Instrument) -> Refusal | None:
    tick = inst.tick_size
    for label, value in (("price", req.price), ("trigger price", req.trigger_price),
                         ("stop loss", req.stop_loss), ("target", req.target)):
        if value is None:
            continue
        if not _positive_finite(value):
            return Refusal(VerdictCode.PRICE, f"{label} {value} must be a positive finite number")
        if value > MAX_PRICE:
            return Refusal(VerdictCode.PRICE, f"{label} {value} is above the {MAX_PRICE} cap on any price")
        try:
            off_tick = bool(value % tick)
        except InvalidOperation:  # absurdly large: the remainder is beyond Decimal precision
            return Refusal(VerdictCode.PRICE, f"{label} {value} is not a usable price")
        if off_tick:
            return Refusal(VerdictCode.TICK, f"{label} {value} is not on tick size {tick} for {inst.symbol}")
    return None


def _stop_from_pct(req: OrderRequest, entry: Decimal, inst: Instrument) -> OrderRequest | Refusal:
    """A ``stop_loss_pct`` as a ``stop_loss`` estimated from ``entry`` (the limit or last
    price), on the tick and outward (lower for a BUY, higher for a SELL). Execution moves it
    to the same percent of the entry's average fill price when the entry fills."""
    pct = req.stop_loss_pct
    if pct is None:
        return req
    if req.stop_loss is not None:
        return Refusal(VerdictCode.BRACKET, "give stop_loss or stop_loss_pct, not both")
    buy = req.side == "BUY"
    if buy and not pct < _HUNDRED:
        return Refusal(VerdictCode.BRACKET, f"BUY stop_loss_pct {pct} must be below 100")
    tick = inst.tick_size if inst.tick_size > 0 else Decimal("0.05")
    stop = pct_stop(req.side, entry, pct, tick)
    if stop <= 0:
        return Refusal(VerdictCode.BRACKET, f"BUY stop_loss_pct {pct} of {entry} leaves no stop above 0")
    return msgspec.structs.replace(req, stop_loss=stop)


def _check_bracket(req: OrderRequest, entry: Decimal) -> Refusal | None:
    sl, target = req.stop_loss, req.target
    if req.trail_points is not None or req.trail_pct is not None:
        if req.trail_points is not None and req.trail_pct is not None:
            return Refusal(VerdictCode.BRACKET, "give trail_points or trail_pct, not both")
        if sl is None:
            return Refusal(VerdictCode.BRACKET, "a trailing stop needs a stop_loss to start from")
    if req.side == "BUY":
        if sl is not None and not sl < entry:
            return Refusal(VerdictCode.BRACKET, f"BUY stop loss {sl} must be below entry {entry}")
        if target is not None and not target > entry:
            return Refusal(VerdictCode.BRACKET, f"BUY target {target} must be above entry {entry}")
    else:
        if sl is not None and not sl > entry:
            return Refusal(VerdictCode.BRACKET, f"SELL stop loss {sl} must be above entry {entry}")
        if target is not None and not target < entry:
            return Refusal(VerdictCode.BRACKET, f"SELL target {target} must be below entry {entry}")
    return None
