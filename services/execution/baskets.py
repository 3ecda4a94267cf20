"""Multi-leg (basket) orders: every leg committed first, long legs before short ones, and a
rollback when a leg fails.

* ``submit_basket`` builds every leg as an order of its own (checks, slicing, the leg's own
  bracket) and commits all of them, with the ``baskets`` row, in ONE unit of work before any
  place intent is released. Long (BUY) legs go out at once; short (SELL) legs are held — their
  rows ``PENDING_BROKER``, their ids in ``inflight`` so reconciliation leaves them alone —
  until every long leg is filled in full; a long leg not filled within
  ``execution.basket_fill_timeout_s`` fails the basket. A basket with no long leg (a short
  straddle) goes out whole.
* A leg fails when the broker rejects it (before or after its ack), when it could not be
  placed, or when it is cancelled before it filled (the kill switch, an expiry); a sliced leg
  when any one of its slices does. Then no held leg is ever placed. With
  ``execution.basket_rollback`` the working legs (and the legs' own brackets) are cancelled,
  and once the broker confirms every one of them closed, what the legs filled (less what a
  leg's own stop or target closed) is closed with protected limits (``purpose=FLATTEN``,
  request id ``<basket>:undo<n>``), capped by what the strategy still holds and by the
  closing orders already working (a flatten's). Without it the basket only stops placing. Either way a
  CRITICAL (something was filled) or WARNING alert names the failed leg and what was done.
* A flatten that touches a basket takes it over: held legs are never placed, the basket
  ends ``FAILED`` and the flatten alone closes the positions.
* Durability: the basket's state is written in the same flush that releases what the state
  allows, so after a kill -9 a basket still ``PLACING_LONGS`` has never sent a short leg;
  ``start`` holds those again and the reconciliations move the long legs on, which either
  release the shorts or roll back. The rollback's closes are written with the
  ``FAILED`` state, so a restart never places them twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from libs.common.messages import (
    ACK,
    BASKET_MAX_LEGS,
    BASKET_MIN_LEGS,
    BASKET_OPEN,
    CANCELLED,
    PENDING_BROKER,
    REJECTED,
    BasketState,
    ExecuteBasket,
    Flatten,
    basket_leg_id,
)
from libs.common.money import MoneyError, protected_limit
from services.execution.base import SubmitResult
from services.execution.brokers.base import BrokerOrderStatus, BrokerTrade
from services.execution.intents import Intent, PlaceIntent
from services.execution.model import (
    B_FLATTENED,
    BRACKET_OPEN,
    FLATTEN_P,
    RANK,
    BasketRow,
    OrderRow,
    new_id,
)
from services.execution.reconcile import Reconciliation


@dataclass(slots=True)
class BasketResult:
    """Execution's answer to an ``ExecuteBasket``: the basket and one result per leg."""

    request_id: str
    ok: bool
    basket_id: str = ""
    state: str = ""
    reason: str = ""
    code: str = ""
    legs: list[SubmitResult] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {
            "basket_id": self.basket_id,
            "state": self.state,
            "reason": self.reason,
            "legs": [{"request_id": x.request_id, "ok": x.ok, "code": x.code, **x.data()} for x in self.legs],
        }


def _filled(o: OrderRow) -> bool:
    """The leg is filled in full (a sliced leg: all its slices together)."""
    return o.filled_qty >= o.quantity


def _failed(o: OrderRow) -> bool:
    return o.status == REJECTED or (o.status == CANCELLED and o.filled_qty < o.quantity)


ROLLBACK_CHASE_S = 10.0  # a rollback close not filled by then is re-priced
ROLLBACK_CHASES = 3  # re-prices at most; then a CRITICAL alert: close it by hand


@dataclass(slots=True)
class _Chase:
    """A rollback close being chased: its basket, how many re-prices came before it, and
    whether execution has asked for it to be cancelled (to re-price it)."""

    basket_id: str
    close_id: str  # the first close's request id (``<basket>:undo<n>``); re-prices add ``:r<m>``
    attempt: int
    cancelling: bool = False


def _describe(n: int, o: OrderRow) -> str:
    return f"leg {n} {o.side} {o.quantity} {o.symbol}"


class Baskets(Reconciliation):
    """Multi-leg orders on top of every other part (see the module docstring)."""

    _baskets: dict[str, BasketRow]
    _kby_request: dict[str, str]  # basket request id → basket id
    _kleg: dict[str, str]  # leg order id → basket id
    _kheld: set[str]  # rows of short legs not released to the broker yet
    _kpending: set[str]  # baskets to move on once the current transition is done
    _kadvancing: bool

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._baskets, self._kby_request, self._kleg = {}, {}, {}
        self._kheld, self._kpending, self._kadvancing = set(), set(), False
        self._kchase: dict[str, _Chase] = {}  # rollback close order id → its chase
        self._kbooks_read = False  # the fill deadline counts only once the books were read
        self.basket_rollback = self.cfg.basket_rollback
        self.basket_fill_timeout_s = self.cfg.basket_fill_timeout_s

    # ------------------------------------------------------------------ restart
    def _load_baskets(self) -> None:
        """At start (before the first books are read): open baskets and their held legs, and
        today's failed baskets whose rollback closes may still be working (chased again)."""
        for k in self.store.load_open_baskets(self.day):
            if k.state == BasketState.FAILED:
                self._resume_chase(k)
                continue
            if k.trading_day != self.day:
                # its legs are not today's rows and expired at the broker overnight: the
                # basket can never move on, so it ends here (what it filled is a position)
                left = k.state
                self._dirty_basket(k, BasketState.FAILED,
                                   f"still {left} at the end of trading day {k.trading_day}; "
                                   "its orders expired at the broker")  # fmt: skip
                self.alert("WARNING", f"basket {k.request_id} of {k.trading_day} was left {left}: ended "
                           "FAILED (its orders expired overnight); check the positions it left",
                           "basket_failed")  # fmt: skip
                continue
            self._register(k)
            if k.state == BasketState.PLACING_LONGS:
                # the PLACED state was never durable, so no short leg was ever sent
                for leg in self._leg_rows(k):
                    if leg.side == "SELL":
                        for x in self._place_rows(leg):
                            if x.status == PENDING_BROKER:
                                self._kheld.add(x.order_id)
                                self.inflight.add(x.order_id)
            self._kpending.add(k.basket_id)
        self._advance_pending()

    # ------------------------------------------------------------------ submit
    def submit_basket(self, cmd: ExecuteBasket) -> BasketResult:
        """Accept an approved basket: every leg's row (``PENDING_BROKER``, or ``REJECTED``) and
        the basket's row are committed in one transaction, then the long legs' place intents
        are released. If execution refuses any leg (its own checks, an expired deadline) no
        leg is placed. A repeat of a known basket is answered with its current state."""
        known = self._kby_request.get(cmd.request_id)
        if known is not None or basket_leg_id(cmd.request_id, 1) in self.by_request:
            self.stats["duplicates"] += 1
            changed = self._changed_repeat(cmd)
            if changed:  # risk forgot the id (a restart) and approved other legs under it
                if self.log is not None:
                    self.log.warning("basket_id_reused", request_id=cmd.request_id, change=changed)
                return BasketResult(cmd.request_id, False, reason=f"basket id reused with different legs: "
                                    f"{changed}; nothing placed", code="refused")  # fmt: skip
            return self._answer(cmd.request_id, known)
        why = self._shape_problem(cmd)
        if why:
            return BasketResult(cmd.request_id, False, reason=why, code="refused")
        mark = self._uow_mark()
        now = self._now()
        expired = bool(cmd.expires_ns) and now > cmd.expires_ns
        created: list[OrderRow] = []
        for leg_cmd in cmd.legs:
            try:
                created.extend(self._build(leg_cmd, expired=expired))
            except Exception as exc:  # noqa: BLE001 - one odd leg refuses the basket, never half-builds it
                self._uow_rollback(mark, created)
                if self.log is not None:
                    self.log.error("basket_build_failed", request_id=cmd.request_id, error=repr(exc))
                return BasketResult(cmd.request_id, False, reason=f"basket could not be built: {exc}",
                                    code="refused")  # fmt: skip
        legs = [self.orders[self.by_request[c.request_id]] for c in cmd.legs]
        if cmd.move_sl_to_cost:
            for x in legs:
                b = self.brackets.get(x.bracket_id) if x.bracket_id else None
                if b is not None:
                    b.to_cost = True
        k = BasketRow(
            basket_id=new_id(), request_id=cmd.request_id, strategy_id=cmd.strategy_id,
            legs=[x.order_id for x in legs], state=BasketState.PLACING_LONGS, trading_day=self.day,
            created_ns=now, updated_ns=now, rollback=self.basket_rollback,
        )  # fmt: skip
        self._register(k)
        self._kdirty[k.basket_id] = k
        refused = [(n, x) for n, x in enumerate(legs, 1) if x.status == REJECTED]
        if refused:
            self._refuse_rest(k, legs, refused)
        else:
            longs = [x for x in legs if x.side == "BUY"]
            for leg in legs:
                if longs and leg.side == "SELL":
                    self._hold(leg)
            if not longs or len(longs) == len(legs):
                k.state = BasketState.PLACED
        if not self.flush():
            self._uow_rollback(mark, created)
            self._forget(k)
            return BasketResult(cmd.request_id, False, reason="ledger unavailable", code="ledger")
        self.stats["submitted"] += len(legs)
        if cmd.expires_ns and self._now() > cmd.expires_ns and k.state != BasketState.FAILED:
            # the commit outlasted risk's deadline: risk tells the strategy it expired unplaced
            why = f"expired {(self._now() - cmd.expires_ns) / 1e6:.0f} ms before it could be sent; not placed"
            for leg in legs:
                for x in self._place_rows(leg):
                    self._withdraw(x, why, REJECTED)
            self.flush()
        if self.log is not None:
            self.log.info("basket_accepted", request_id=k.request_id, basket_id=k.basket_id, state=k.state,
                          legs=len(legs), held=sum(1 for x in legs if x.side == "SELL" and self._is_held(x)))
        return self._answer(k.request_id, k.basket_id)

    def _changed_repeat(self, cmd: ExecuteBasket) -> str:
        """How a repeat of a known basket's request id differs from the stored legs (side,
        instrument, quantity, product, limit price), or "" for a true repeat."""
        rows = [self.orders.get(self.by_request.get(basket_leg_id(cmd.request_id, n), ""))
                for n in range(1, BASKET_MAX_LEGS + 1)]  # fmt: skip
        stored = [x for x in rows if x is not None]
        if len(stored) != len(cmd.legs):
            return f"{len(cmd.legs)} legs, not the {len(stored)} of the basket already placed"
        for n, (leg, o) in enumerate(zip(cmd.legs, stored, strict=True), 1):
            want = (leg.order.side, leg.segment, leg.token, leg.quantity, leg.order.product)
            if want != (o.side, o.segment, o.token, o.quantity, o.product) or (
                leg.order.price is not None and o.order_type == "LIMIT" and leg.order.price != o.price
            ):
                price = f" @ {leg.order.price}" if leg.order.price is not None else ""
                now = f"{leg.order.side} {leg.quantity} {leg.symbol}{price}"
                return f"leg {n} is {now}, not {_describe(n, o)}"
        return ""

    def _shape_problem(self, cmd: ExecuteBasket) -> str:
        if not BASKET_MIN_LEGS <= len(cmd.legs) <= BASKET_MAX_LEGS:
            return f"a basket has {BASKET_MIN_LEGS} to {BASKET_MAX_LEGS} legs, not {len(cmd.legs)}"
        for n, leg in enumerate(cmd.legs, 1):
            if leg.request_id != basket_leg_id(cmd.request_id, n):
                return f"leg {n} request_id {leg.request_id} is not {basket_leg_id(cmd.request_id, n)}"
            if leg.order.strategy_id != cmd.strategy_id:
                return f"leg {n} belongs to {leg.order.strategy_id}, not the basket's {cmd.strategy_id}"
            if leg.request_id in self.by_request:
                return f"leg {n} request_id {leg.request_id} is already an order"
        return ""

    def _answer(self, request_id: str, basket_id: str | None) -> BasketResult:
        k = self._baskets.get(basket_id or "")
        if k is not None:
            leg_ids = list(k.legs)
        else:  # a finished basket from before a restart: its legs are today's rows
            leg_ids = [self.by_request[r] for r in (basket_leg_id(request_id, n) for n in range(1, 5))
                       if r in self.by_request]  # fmt: skip
        results = []
        for oid in leg_ids:
            o = self.orders.get(oid)
            if o is None:
                continue
            ok = o.status != REJECTED
            results.append(SubmitResult(o.request_id, ok, o.order_id, o.status, o.client_tag, o.reason,
                                        "" if ok else "rejected"))  # fmt: skip
        # refused only when no leg ever reached the broker: once one did, the basket was
        # accepted and its rollback (if any) is reported by alerts and the legs' updates
        reached = any(self.orders[x].broker_order_id or self.orders[x].filled_qty
                      or (RANK[self.orders[x].status] >= RANK[ACK] and self.orders[x].status != REJECTED)
                      for x in leg_ids if x in self.orders)  # fmt: skip
        failed = not reached and (k.state == BasketState.FAILED if k is not None
                                  else not all(r.ok for r in results))
        reason = (k.reason if k else "") or next((r.reason for r in results if not r.ok), "")
        return BasketResult(request_id, not failed, k.basket_id if k else "", k.state if k else "", reason,
                            "rejected" if failed else "", results)  # fmt: skip

    # ------------------------------------------------------------------ bookkeeping
    def _register(self, k: BasketRow) -> None:
        self._baskets[k.basket_id] = k
        self._kby_request[k.request_id] = k.basket_id
        for oid in k.legs:
            self._kleg[oid] = k.basket_id

    def _forget(self, k: BasketRow) -> None:
        self._baskets.pop(k.basket_id, None)
        self._kby_request.pop(k.request_id, None)
        self._kdirty.pop(k.basket_id, None)
        for oid in k.legs:
            self._kleg.pop(oid, None)
            self._kheld.discard(oid)
            for c in self.children.get(oid, []):
                self._kheld.discard(c)

    def _leg_rows(self, k: BasketRow) -> list[OrderRow]:
        return [self.orders[x] for x in k.legs if x in self.orders]

    def _place_rows(self, leg: OrderRow) -> list[OrderRow]:
        """The rows of a leg that reach the broker: its slices, or itself."""
        if leg.sliced:
            return [self.orders[c] for c in self.children.get(leg.order_id, []) if c in self.orders]
        return [leg]

    def _leg_failed(self, leg: OrderRow) -> bool:
        """A leg fails as soon as any row of it does: one rejected slice (or one cancelled
        short of its quantity) fails the whole leg, whatever its other slices do."""
        return _failed(leg) or (leg.sliced and any(_failed(x) for x in self._place_rows(leg)))

    def _is_held(self, leg: OrderRow) -> bool:
        return any(x.order_id in self._kheld for x in self._place_rows(leg))

    def _hold(self, leg: OrderRow) -> None:
        """Take a short leg's place intents back before they are released: it goes out once
        every long leg is filled. It stays in ``inflight`` so no book closes it meanwhile."""
        rows = self._place_rows(leg)
        for x in rows:
            # the deadline guards the answer to risk, which comes right after the commit: a
            # held leg goes once the longs are filled (``basket_fill_timeout_s`` bounds that)
            x.expires_ns = 0
        ids = {x.order_id for x in rows}
        kept: list[Intent] = []
        for i in self._held_intents:
            if isinstance(i, PlaceIntent) and i.order_id in ids:
                self._kheld.add(i.order_id)
                continue
            kept.append(i)
        self._held_intents = kept

    def _release(self, k: BasketRow) -> None:
        for leg in self._leg_rows(k):
            for x in self._place_rows(leg):
                if x.order_id in self._kheld:
                    self._kheld.discard(x.order_id)
                    self._queue_place(x)

    def _dirty_basket(self, k: BasketRow, state: str, reason: str = "") -> None:
        k.state = state
        if reason:
            k.reason = reason[:500]
        k.updated_ns = self._now()
        self._kdirty[k.basket_id] = k

    # ------------------------------------------------------------------ hooks into the other parts
    def _withdraw(self, o: OrderRow, reason: str, status: str = CANCELLED) -> bool:
        if o.order_id in self._kheld:  # a held short leg: it never reached the broker
            self._kheld.discard(o.order_id)
            self.inflight.discard(o.order_id)
            self._transition(o, status, status, {"reason": reason}, reason)
            return True
        return super()._withdraw(o, reason, status)

    def _transition(self, o: OrderRow, status: str, kind: str, payload: Any = None, reason: str = "") -> bool:
        moved = super()._transition(o, status, kind, payload, reason)
        if moved and o.terminal and o.order_id in self._kchase:
            self._rechase(o, self._kchase.pop(o.order_id))
        if moved and self._baskets:
            bid = self._kleg.get(o.order_id)
            if bid is None and o.parent_id:  # a leg's slice: one rejected slice fails the leg
                bid = self._kleg.get(o.parent_id)
            if bid is None and o.bracket_id:  # a leg's own stop or target ended (rollback waits on it)
                b = self.brackets.get(o.bracket_id)
                bid = self._kleg.get(b.entry_id) if b is not None else None
            if bid is not None:
                self._kpending.add(bid)
                self._advance_pending()
        return moved

    def flatten(self, req: Flatten, done: Any) -> None:
        """A flatten takes over every open basket it touches: no held leg is placed and the
        flatten alone closes the positions it covers (the basket does not close them a second
        time). Legs it does not cover (a flatten of one instrument) stop too: their working
        orders are cancelled, since the hedge they were placed beside may be gone, and what they
        filled is left as a position with a CRITICAL alert naming it."""
        if req.request_id not in self.flatten_jobs:
            match_key = self._match_symbol(req.symbol) if req.symbol else None
            for k in list(self._baskets.values()):
                if k.state not in BASKET_OPEN:
                    continue
                legs = self._leg_rows(k)
                if not any(self._matches(x.strategy_id, x.key, req, match_key) for x in legs):
                    continue
                self._dirty_basket(k, BasketState.FAILED, f"flatten {req.request_id} took over")
                for leg in legs:
                    for x in self._place_rows(leg):
                        if x.order_id in self._kheld:
                            self._withdraw(x, f"not placed: flatten {req.request_id} took over the basket")
                outside = [(n, x) for n, x in enumerate(legs, 1)
                           if not self._matches(x.strategy_id, x.key, req, match_key)]  # fmt: skip
                for _n, x in outside:
                    if not x.terminal:
                        self._cancel_tree(x, f"flatten {req.request_id} took over basket {k.request_id}")
                if outside:
                    left = ", ".join(f"{_describe(n, x)} filled {x.filled_qty}" for n, x in outside)
                    self.alert("CRITICAL", f"basket {k.request_id}: flatten {req.request_id} closes only "
                               "some of its legs; the others are stopped (working orders cancelled) and "
                               f"what they filled stays open: {left} — flatten those too if the basket "
                               "should go", "basket_failed")  # fmt: skip
        super().flatten(req, done)

    # ------------------------------------------------------------------ moving a basket on
    def _advance_pending(self) -> None:
        if self._kadvancing:
            return
        self._kadvancing = True
        try:
            while self._kpending:
                k = self._baskets.get(self._kpending.pop())
                if k is not None:
                    self._advance(k)
        finally:
            self._kadvancing = False

    def _advance(self, k: BasketRow) -> None:
        legs = self._leg_rows(k)
        if len(legs) != len(k.legs):  # cannot happen: the legs are today's rows
            return
        if k.state in (BasketState.PLACING_LONGS, BasketState.PLACED):
            failed = [(n, x) for n, x in enumerate(legs, 1) if self._leg_failed(x)]
            if failed:
                self._fail(k, legs, "; ".join(self._failure(n, x) for n, x in failed))
                return
            if k.state == BasketState.PLACING_LONGS:
                unfilled = [(n, x) for n, x in enumerate(legs, 1) if x.side == "BUY" and not _filled(x)]
                if not unfilled:
                    self._dirty_basket(k, BasketState.PLACED)
                    self._release(k)  # held until the flush has written PLACED
                    if self.log is not None:
                        self.log.info("basket_shorts_released", request_id=k.request_id,
                                      basket_id=k.basket_id)  # fmt: skip
                elif self._kbooks_read and self._now() - k.created_ns >= self.basket_fill_timeout_s * 1e9:
                    self._fail(k, legs, "; ".join(
                        f"{_describe(n, x)} filled {x.filled_qty} of {x.quantity} within "
                        f"{self.basket_fill_timeout_s:g} s (execution.basket_fill_timeout_s)"
                        for n, x in unfilled))  # fmt: skip
                    return
            if k.state == BasketState.PLACED and all(x.terminal for x in legs):
                self._dirty_basket(k, BasketState.COMPLETE)
                self._done(k)
        if k.state == BasketState.ROLLING_BACK:
            self._roll_back(k, legs)

    def _refuse_rest(self, k: BasketRow, legs: list[OrderRow], refused: list[tuple[int, OrderRow]]) -> None:
        """Execution refused a leg while building: no leg of the basket is placed."""
        why = "; ".join(f"{_describe(n, x)}: {x.reason}" for n, x in refused)
        for leg in legs:
            if leg.status == REJECTED:
                continue
            for x in self._place_rows(leg):
                self._withdraw(x, f"not placed: basket refused ({why})"[:500], REJECTED)
        self._dirty_basket(k, BasketState.FAILED, why)
        self._done(k)

    def _failure(self, n: int, leg: OrderRow) -> str:
        """What went wrong with a failed leg: its own status, or its first failed slice's."""
        x = leg if _failed(leg) else next(y for y in self._place_rows(leg) if _failed(y))
        slice_of = "" if x is leg else f" (slice {x.quantity} of {leg.quantity})"
        return (f"{_describe(n, leg)}{slice_of} {'rejected' if x.status == REJECTED else 'cancelled'} "
                f"({x.reason or x.status.lower()})")

    def _after_books(self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade]) -> None:
        super()._after_books(order_book, trade_book)
        if not self._kbooks_read:  # after a restart: what the longs filled meanwhile is known now
            self._kbooks_read = True
            self._kpending.update(k.basket_id for k in self._baskets.values()
                                  if k.state == BasketState.PLACING_LONGS)  # fmt: skip
            self._advance_pending()

    def reconcile_if_due(self) -> None:
        """Periodic: also fails the baskets whose long legs were not filled in time."""
        super().reconcile_if_due()
        limit = self._now() - int(self.basket_fill_timeout_s * 1e9)
        for k in self._baskets.values():
            if k.state == BasketState.PLACING_LONGS and k.created_ns <= limit:
                self._kpending.add(k.basket_id)
        self._advance_pending()
        if self._kchase:
            self._chase_closes()

    def _fail(self, k: BasketRow, legs: list[OrderRow], what: str) -> None:
        for leg in legs:  # a failed basket never places another leg
            for x in self._place_rows(leg):
                if x.order_id in self._kheld:
                    self._withdraw(x, f"not placed: {what}"[:500])
        filled = [(n, x) for n, x in enumerate(legs, 1) if x.filled_qty]
        working = [x for x in legs if not x.terminal]
        if not k.rollback:
            self._dirty_basket(k, BasketState.FAILED, what)
            left = ", ".join(f"{_describe(n, x)} filled {x.filled_qty}" for n, x in filled)
            left = left or "nothing filled"
            self.alert("CRITICAL" if filled or working else "WARNING",
                       f"basket {k.request_id}: {what}; basket_rollback is off: no further leg placed, "
                       f"{len(working)} working leg(s) and the fills left as they are ({left})",
                       "basket_failed")  # fmt: skip
            self._done(k)
            return
        self._dirty_basket(k, BasketState.ROLLING_BACK, what)
        for leg in working:
            self._cancel_tree(leg, f"basket {k.request_id} rollback")
        for leg in legs:
            b = self._bracket_of(leg)
            if b is not None and b.state in BRACKET_OPEN:
                b.state = B_FLATTENED  # its stop and target go: the rollback closes the leg
                b.reason = f"basket {k.request_id} rollback"
                b.updated_ns = self._now()
                self._bdirty[b.bracket_id] = b
                self._sync_bracket(b)
        self.alert(
            "CRITICAL" if filled or working else "WARNING",
            f"basket {k.request_id}: {what}; rolling back: cancelling {len(working)} working leg(s), "
            + ("closing " + ", ".join(f"{_describe(n, x)} filled {x.filled_qty}" for n, x in filled)
               if filled else "nothing filled to close"),
            "basket_failed",
        )  # fmt: skip
        self._roll_back(k, legs)

    def _roll_back(self, k: BasketRow, legs: list[OrderRow]) -> None:
        """Once the broker confirms every leg (and every leg's stop and target) closed — a
        fill may still be on its way — close what the legs filled, netted per instrument and
        product, capped by what the strategy holds less the closing orders already working."""
        bracket_legs = [
            self.orders[y] for x in legs if x.bracket_id
            for y in self.legs.get(x.bracket_id, []) if y in self.orders
        ]  # fmt: skip
        if any(not x.terminal for x in (*legs, *bracket_legs)):
            return
        net: dict[tuple[str, str], int] = {}
        first: dict[tuple[str, str], OrderRow] = {}
        for x in legs:
            undo = x.filled_qty - self._bracket_exits(x)  # what the leg's own stop or target closed is gone
            if undo > 0:
                kp = (x.key, x.product)
                net[kp] = net.get(kp, 0) + (undo if x.side == "BUY" else -undo)
                first.setdefault(kp, x)
        done: list[str] = []
        for n, ((key, product), held) in enumerate(sorted(net.items()), 1):
            leg = first[(key, product)]
            side = "SELL" if held > 0 else "BUY"
            row = self._place_close(k, leg, side, abs(held), f"{k.request_id}:undo{n}", ref=None, attempt=0)
            if row is not None:
                done.append(f"{side} {row.quantity} {leg.symbol} @ {row.price}")
        self._dirty_basket(k, BasketState.FAILED)
        if done:
            self.alert("WARNING", f"basket {k.request_id} rolled back: closing " + ", ".join(done),
                       "basket_rolled_back")
        self._done(k)

    def _place_close(self, k: BasketRow, like: OrderRow, side: str, want: int, rid: str, *,
                     ref: Decimal | None, attempt: int, close_id: str = "") -> OrderRow | None:  # fmt: skip
        """One rollback close of up to ``want`` of ``like``'s instrument and product: capped by
        what the strategy still holds less the closing orders already working, priced as a
        protected limit off the last price (``ref`` when there is none), and chased."""
        key, product = like.key, like.product
        pos = self.positions.get((like.strategy_id, key))
        now_held = 0
        if pos is not None:
            now_held = pos.by_product.get(product, pos.quantity) if pos.by_product else pos.quantity
        own = max(0, now_held) if side == "SELL" else max(0, -now_held)
        qty = min(want, own) - self._closing_qty(like.strategy_id, key, product, side)
        if qty <= 0 or self.request_known(rid):
            return None
        inst = self.master.get(like.segment, like.token)
        last = self.last.get(key)
        ref = Decimal(repr(last.ltp)) if last is not None else (ref or like.avg_price)
        try:
            if inst is None or ref is None:
                raise MoneyError("no instrument or price")
            price = protected_limit(side, ref, self.protection_pct, inst.tick_size)
        except MoneyError as exc:
            self.alert("CRITICAL", f"basket {k.request_id}: cannot price the close of {qty} {like.symbol} "
                       f"({exc}); close it by hand", "basket_close_failed")  # fmt: skip
            return None
        now = self._now()
        row = OrderRow(
            order_id=new_id(), request_id=rid, client_tag=self._tag(), strategy_id=like.strategy_id,
            segment=like.segment, token=like.token, symbol=like.symbol, side=side, order_type="LIMIT",
            product=product, quantity=qty, price=price, status=PENDING_BROKER, trading_day=self.day,
            created_ns=now, updated_ns=now, purpose=FLATTEN_P, broker=self.broker_name,
        )  # fmt: skip
        self._add(row, "PENDING", {"basket": k.request_id, "rollback": True, "attempt": attempt})
        self._slice_and_place(row, inst)
        k.closes.append(row.order_id)
        self._kdirty[k.basket_id] = k
        self._kchase[row.order_id] = _Chase(k.basket_id, close_id or rid, attempt)
        return row

    def _resume_chase(self, k: BasketRow) -> None:
        """A failed basket's rollback closes still working after a restart are chased again:
        the attempt is in the close's request id (``<basket>:undo<n>`` then ``:r<m>``)."""
        for oid in k.closes:
            o = self.orders.get(oid)
            if o is None or o.terminal:
                continue
            close_id, _, attempt = o.request_id.partition(":undo")
            n, _, again = attempt.partition(":r")
            self._baskets[k.basket_id] = k  # (no legs registered: the basket never moves on)
            tries = int(again) if again.isdigit() else 0
            self._kchase[oid] = _Chase(k.basket_id, f"{close_id}:undo{n}", tries)

    def _chase_closes(self) -> None:
        """A rollback close still open ``ROLLBACK_CHASE_S`` after it was placed is cancelled
        and (``_rechase``) placed again at the new protected price, ``ROLLBACK_CHASES`` times
        at most; one still open after that raises a CRITICAL alert."""
        now = self._now()
        for oid, c in list(self._kchase.items()):
            o = self.orders.get(oid)
            if o is None or o.terminal or c.cancelling or now - o.created_ns < ROLLBACK_CHASE_S * 1e9:
                continue
            k = self._baskets.get(c.basket_id)
            if c.attempt >= ROLLBACK_CHASES or k is None:
                del self._kchase[oid]
                self.alert("CRITICAL", f"basket {k.request_id if k else c.basket_id}: rollback close "
                           f"{o.side} {o.quantity - o.filled_qty} {o.symbol} @ {o.price} still open after "
                           f"{c.attempt} re-price(s); close it by hand", "basket_close_failed")  # fmt: skip
                continue
            c.cancelling = True
            self._cancel_tree(o, f"basket {k.request_id}: rollback close not filled in "
                                 f"{ROLLBACK_CHASE_S:g} s, re-pricing")  # fmt: skip

    def _rechase(self, o: OrderRow, c: _Chase) -> None:
        """A chased close ended: what it left open is placed again (we cancelled it), or a
        CRITICAL alert says it ended unfilled for another reason."""
        left = o.quantity - o.filled_qty
        k = self._baskets.get(c.basket_id)
        if left <= 0 or k is None:
            return
        if not c.cancelling:
            self.alert("CRITICAL", f"basket {k.request_id}: rollback close {o.side} {left} {o.symbol} "
                       f"ended {o.status.lower()} ({o.reason or 'no reason'}); close it by hand",
                       "basket_close_failed")  # fmt: skip
            return
        rid = f"{c.close_id}:r{c.attempt + 1}"
        row = self._place_close(k, o, o.side, left, rid, ref=o.price, attempt=c.attempt + 1,
                               close_id=c.close_id)  # fmt: skip
        if row is not None:
            self.alert("WARNING", f"basket {k.request_id}: rollback close re-priced: {o.side} {row.quantity} "
                       f"{o.symbol} @ {row.price} (was {o.price})", "basket_rolled_back")  # fmt: skip

    def _bracket_exits(self, leg: OrderRow) -> int:
        """What the leg's own stop and target filled (a sliced exit counted once, by its parent)."""
        if not leg.bracket_id:
            return 0
        ids = set(self.legs.get(leg.bracket_id, []))
        rows = [self.orders[y] for y in ids if y in self.orders]
        return sum(y.filled_qty for y in rows if y.side != leg.side and y.parent_id not in ids)

    def _done(self, k: BasketRow) -> None:
        if self.log is not None:
            self.log.info("basket_done", request_id=k.request_id, basket_id=k.basket_id, state=k.state,
                          reason=k.reason, closes=len(k.closes))

    def basket_list(self) -> list[dict[str, Any]]:
        return [k.as_dict() for k in self._baskets.values()]
