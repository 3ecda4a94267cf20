"""OCO brackets: legs sized to what is really held, leg failures and re-places, and the owed
    cancels (also the kill switch's)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from libs.common.instruments import instrument_key
from libs.common.messages import (
    BASKET_MAX_LEGS,
    PENDING_BROKER,
    Tick,
    basket_leg_id,
    basket_of_leg,
)
from libs.common.money import pct_stop, protected_limit, snap, to_decimal
from services.execution.base import (
    _LEGS,
    RETRY_BASE_S,
    RETRY_MAX_S,
)
from services.execution.intents import (
    CancelIntent,
    ModifyIntent,
)
from services.execution.model import (
    B_ACTIVE,
    B_CANCELLED,
    B_CLOSED,
    B_PENDING,
    BRACKET_OPEN,
    EXIT,
    FLATTEN_P,
    STOP,
    TERMINAL,
    BracketRow,
    OrderRow,
    new_id,
)
from services.execution.orders import Orders
from services.execution.pricing import (
    freeze_step,
)
from services.execution.trail import improves, tighter, trailed_stop

TRAIL_JUMP = 0.10  # a tick this far (a fraction) from the one before it does not trail


class Brackets(Orders):
    """OCO brackets: legs sized to what is really held, leg failures and re-places, and the owed
    cancels (also the kill switch's)."""

    def _new_bracket(
        self, entry: OrderRow, stop_loss: Decimal | None, target: Decimal | None, stop_limit: Decimal | None,
        trail: tuple[Decimal | None, Decimal | None] = (None, None), *, stop_pct: Decimal | None = None,
    ) -> None:
        b = BracketRow(
            bracket_id=new_id(),
            entry_id=entry.order_id,
            strategy_id=entry.strategy_id,
            segment=entry.segment,
            token=entry.token,
            symbol=entry.symbol,
            side=entry.side,
            product=entry.product,
            stop_loss=stop_loss,
            target=target,
            state=B_PENDING,
            trading_day=entry.trading_day,
            created_ns=entry.created_ns,
            updated_ns=entry.created_ns,
            stop_limit=stop_limit,
            trail_points=trail[0],
            trail_pct=trail[1],
            stop_pct=stop_pct if stop_loss is not None else None,
        )
        entry.bracket_id = b.bracket_id
        self.brackets[b.bracket_id] = b
        self._bgroups.setdefault((b.strategy_id, b.segment, b.token), []).append(b)
        self._bdirty[b.bracket_id] = b

    def _sync_bracket(self, b: BracketRow) -> None:
        """Re-size the legs of every bracket of this strategy and instrument. Legs protect what
        is really held: each bracket's own exposure (entry fills - leg fills), capped by the
        strategy's position in the entry's direction, shared oldest bracket first. So an exit
        by other means (the strategy's own EXIT, a manual order) shrinks or cancels the legs
        instead of leaving a stop that would open a new position."""
        pos = self.positions.get((b.strategy_id, instrument_key(b.segment, b.token)))
        held = pos.quantity if pos is not None else 0
        avail = {"BUY": max(held, 0), "SELL": max(-held, 0)}
        group = self._open_brackets(b.strategy_id, b.segment, b.token)
        if self.brackets.get(b.bracket_id) is b and not any(x is b for x in group):
            group.append(b)  # a closed one still cancels what is left of its legs
        if len(group) > 1:
            group.sort(key=lambda y: (y.created_ns, y.bracket_id))
        for x in group:
            if x.state in BRACKET_OPEN or x is b:  # an earlier one's sync may have closed it
                avail[x.side] -= self._sync_one(x, avail[x.side])

    def _sync_one(self, b: BracketRow, avail: int) -> int:
        """Size one bracket's legs to min(own exposure, ``avail``); returns the size protected."""
        entry = self.orders.get(b.entry_id)
        if entry is None:
            return 0
        # one pass over the legs: their fills, and what has exited -- a leg the broker called
        # complete has, even before its trade is in: the other leg goes now (OCO), and no leg
        # is placed for those shares again (``exited_qty``, inlined)
        orders = self.orders
        legs: list[OrderRow] = []
        exit_filled = exited = 0
        for x in self.legs.get(b.bracket_id, ()):
            leg = orders.get(x)
            if leg is not None:
                legs.append(leg)
                filled = leg.filled_qty
                exit_filled += filled
                exited += max(filled, leg.broker_filled) if leg.broker_final else filled
        own = entry.filled_qty - exit_filled
        protect = max(0, min(entry.filled_qty - exited, avail))
        changed = entry.filled_qty != b.entry_filled or exit_filled != b.exit_filled
        b.entry_filled, b.exit_filled = entry.filled_qty, exit_filled
        if b.state == B_CANCELLED and own > 0:
            # closed as "entry ended unfilled", yet a trade of the entry arrived after all
            # (a status that came before its trade): the position it opened needs its legs
            b.state = B_ACTIVE
            changed = True
            self._bgroups.setdefault((b.strategy_id, b.segment, b.token), []).append(b)
            self.alert(
                "WARNING",
                f"bracket on {b.symbol} reopened: the entry filled {entry.filled_qty} after it was "
                "reported closed; placing its stop and target",
                "bracket_reopened",
            )
        state = b.state
        if state in BRACKET_OPEN:
            if own < 0:
                self.alert(
                    "CRITICAL",
                    f"bracket on {b.symbol} over-exited by {-own}: check the position",
                    "bracket_overexit",
                )
            if entry.filled_qty - exited <= 0 and exited > 0 and not entry.terminal:
                self._cancel_tree(entry)  # a leg ended the trade: drop the rest of the entry
            if b.stop_pct is not None and entry.filled_qty > 0 and not any(x.purpose == STOP for x in legs):
                changed = self._anchor_stop(b, entry) or changed
            if b.to_cost and exited > 0 and any(x.purpose == STOP and x.exited_qty for x in legs):
                self._siblings_to_cost(b, entry)
            for kind in _LEGS:
                price = b.stop_loss if kind == STOP else b.target
                if price is not None:
                    self._size_legs(b, kind, [x for x in legs if x.purpose == kind], protect)
            if entry.terminal and protect <= 0:
                state = B_CLOSED if entry.filled_qty > 0 else B_CANCELLED
            elif entry.filled_qty > 0:
                state = B_ACTIVE
        else:
            protect = 0
            for leg in legs:
                if not leg.terminal:
                    self._request_cancel(leg)
        if state == B_ACTIVE and b.state != B_ACTIVE and b.trails:
            self._trail_watch(b)
        if state != b.state and self.log is not None and state in (B_ACTIVE, B_CLOSED, B_CANCELLED):
            self.log.info(
                "bracket_armed" if state == B_ACTIVE else "bracket_closed",
                symbol=b.symbol, strategy_id=b.strategy_id, side=b.side, protected=protect,
                stop_loss=str(b.stop_loss) if b.stop_loss is not None else "",
                target=str(b.target) if b.target is not None else "", state=state,
            )  # fmt: skip
        if state != b.state or changed:
            b.state = state
            b.updated_ns = self._now()
            self._bdirty[b.bracket_id] = b
        return protect

    def _anchor_stop(self, b: BracketRow, entry: OrderRow) -> bool:
        """``stop_loss_pct``: the entry has its first fill and no stop leg is out yet, so the
        stop becomes that percent from the average fill price (risk's estimate from the last
        price stands in until now). True when the bracket changed."""
        pct, b.stop_pct = b.stop_pct, None
        inst = self.master.get(b.segment, b.token)
        avg = entry.avg_price
        if pct is None or inst is None or avg is None or not avg > 0:
            return pct is not None  # nothing to anchor to: the estimate stays
        tick = inst.tick_size if inst.tick_size > 0 else Decimal("0.05")
        stop = pct_stop(b.side, avg, pct, tick)
        if stop <= 0 or stop == b.stop_loss:
            return True
        exit_side = "SELL" if b.side == "BUY" else "BUY"
        was, b.stop_loss = b.stop_loss, stop
        b.stop_limit = protected_limit(exit_side, stop, self.protection_pct, tick)
        if self.log is not None:
            self.log.info("stop_anchored", symbol=b.symbol, strategy_id=b.strategy_id, stop_pct=str(pct),
                          avg_price=str(avg), estimate=str(was), stop_loss=str(stop))  # fmt: skip
        return True

    def _size_legs(self, b: BracketRow, kind: str, legs: list[OrderRow], want: int) -> None:
        live: list[OrderRow] = []
        have = 0
        for x in legs:
            if x.status in TERMINAL or x.cancel_requested:
                continue
            q = x.open_qty
            if q:
                live.append(x)
                have += q
        if have < want:
            if (b.bracket_id, kind) in self.leg_failed:
                return
            retry = self.leg_retry.get((b.bracket_id, kind))
            if retry is not None and self._now() < retry[1]:
                return  # placed again once the backoff has passed (``_retry_owed``)
            self._place_legs(b, kind, want - have, len(legs))
        elif have > want:
            excess = have - want
            for leg in sorted(live, key=lambda x: x.created_ns, reverse=True):
                if excess <= 0:
                    break
                busy = leg.order_id in self.inflight or leg.order_id in self._modifying
                if not leg.broker_order_id or busy:
                    continue  # resized once the broker has acknowledged it (or the last modify)
                if leg.open_qty <= excess:
                    excess -= leg.open_qty
                    self._request_cancel(leg)
                else:
                    self._modify_qty(leg, leg.quantity - excess)
                    excess = 0

    def _place_legs(self, b: BracketRow, kind: str, qty: int, seen: int) -> None:
        inst = self.master.get(b.segment, b.token)
        freeze = inst.freeze_qty if inst is not None else 0
        step = freeze_step(inst.lot_size, freeze) if inst is not None and freeze else qty
        now = self._now()
        exit_side = "SELL" if b.side == "BUY" else "BUY"
        n = seen
        while qty > 0:
            size = min(step, qty)
            qty -= size
            n += 1
            leg = OrderRow(
                order_id=new_id(),
                request_id=f"{b.bracket_id}:{kind}:{n}",
                client_tag=self._tag(),
                strategy_id=b.strategy_id,
                segment=b.segment,
                token=b.token,
                symbol=b.symbol,
                side=exit_side,
                order_type="SL" if kind == STOP else "LIMIT",
                product=b.product,
                quantity=size,
                price=b.stop_limit if kind == STOP else b.target,
                trigger_price=b.stop_loss if kind == STOP else None,
                status=PENDING_BROKER,
                trading_day=self.day,
                created_ns=now,
                updated_ns=now,
                parent_id=b.entry_id,
                bracket_id=b.bracket_id,
                purpose=kind,
                broker=self.broker_name,
            )
            self._add(leg, "PENDING", {"bracket_id": b.bracket_id, "leg": kind})
            self._queue_place(leg)

    def _modify_qty(self, o: OrderRow, qty: int) -> None:
        old = o.quantity
        o.quantity = qty
        o.updated_ns = self._now()
        self._mark(o)
        # the prices go too, as the broker last confirmed them: a broker that rebuilds the whole
        # order from a lagging book must not undo a trail. A stop leg still owed a tighter stop
        # (a trail or a move to cost whose modify timed out, and may have landed) gets that one:
        # a resize never puts a looser stop back at the broker.
        price, trigger = o.price, o.trigger_price
        b = self._bracket_of(o) if o.purpose == STOP else None
        if (b is not None and b.stop_loss is not None and b.stop_limit is not None
                and trigger is not None and tighter(b.side, b.stop_loss, trigger)):
            price, trigger = b.stop_limit, b.stop_loss
        payload: dict[str, Any] = {"quantity": qty, "was": old}
        if trigger != o.trigger_price:
            payload["trigger_price"] = str(trigger)
        self._event(o, "MODIFY_REQUESTED", o.status, payload)
        self._publish_order(o)
        self._modifying.add(o.order_id)
        self._held_intents.append(ModifyIntent(o.order_id, o.broker_order_id, qty, old, price, trigger))

    def _trim_exits(self, o: OrderRow) -> None:
        """After a fill of ``o``'s strategy and instrument, or a leg the broker announced as
        filled before its trade came: its working EXIT orders that now close more than is held
        (``_closable``: a stop filled while the strategy's exit was working) are cut back,
        newest first -- resized, or cancelled when not yet acknowledged -- so that the race of
        a close and a stop does not open the reverse position."""
        pos = self.positions.get((o.strategy_id, o.key))
        net = pos.quantity if pos is not None else 0
        for side in ("SELL", "BUY"):
            closing, exiting = self._closable(o.strategy_id, o.segment, o.token, side)
            excess = exiting - closing
            if excess <= 0:
                continue
            exits = [w for w in self.working.values()
                     if w.strategy_id == o.strategy_id and w.segment == o.segment and w.token == o.token
                     and w.side == side and w.purpose == EXIT and not w.sliced and not w.terminal
                     and not w.cancel_requested and w.open_qty]  # fmt: skip
            cut = 0
            for w in sorted(exits, key=lambda x: (x.created_ns, x.order_id), reverse=True):
                if excess <= 0:
                    break
                rest = w.open_qty
                busy = w.order_id in self.inflight or w.order_id in self._modifying
                if rest <= excess or not w.broker_order_id or busy:
                    self._request_cancel(w, "the position it closes is already smaller")
                    take = rest
                else:
                    self._modify_qty(w, w.quantity - excess)
                    take = excess
                excess -= take
                cut += take
            if cut:
                self.alert("WARNING", f"{o.strategy_id}'s exit of {o.symbol} was cut by {cut}: it holds "
                           f"{net:+d} after a fill, and an exit never opens the reverse position",
                           "exit_trimmed")  # fmt: skip

    def _overclosed(self, o: OrderRow) -> None:
        """After a fill of a close (the strategy's EXIT, a bracket leg): if closes have now made
        part of the position (``_stray``: an exit and its stop both filled, the trim came late),
        say so once, loudly. That part is nobody's intent and has no stop: when it is all of
        the position, ``keep_stray_flat`` closes it at once."""
        k = (o.strategy_id, o.key)
        stray = self._stray.get(k, 0)
        if not stray or k in self._stray_alerted:
            return
        self._stray_alerted.add(k)
        pos = self.positions.get(k)
        net = pos.quantity if pos is not None else 0
        what = "exit" if o.purpose == EXIT else f"{o.purpose.lower()}"
        if stray == net:
            self.alert("CRITICAL", f"{o.strategy_id}'s {what} {o.client_tag} of {o.symbol} closed more than "
                       f"was held (a close and a stop both filled): it held {net:+d} {o.symbol} with "
                       "no stop; closing it now", "exit_overclosed")  # fmt: skip
        else:
            self.alert("CRITICAL", f"{o.strategy_id}'s {what} {o.client_tag} of {o.symbol} closed more than "
                       f"was held: the strategy now holds {net:+d} {o.symbol}, {stray:+d} of it made by "
                       f"closes and unprotected; close that (neopulse flatten {o.symbol} --strategy "
                       f"{o.strategy_id} closes all of it) or it is squared off at the square-off time",
                       "exit_overclosed")  # fmt: skip

    # ----------------------------------------------------------------- trailing stops
    def _trail_watch(self, b: BracketRow) -> None:
        """Follow the ticks of an active trailing bracket's instrument; its stop legs are
        brought to the trailed stop (at a restart: to what the ledger says it had reached)."""
        ids = self._trailing.setdefault(instrument_key(b.segment, b.token), [])
        if b.bracket_id not in ids:
            ids.append(b.bracket_id)
        self._trail_owed.add(b.bracket_id)

    def _trail_on_tick(self, key: str, ltp: float, prev: float = 0.0) -> bool:
        """A tick of an instrument with trailing brackets: each one's best price, and its stop
        once that moved a tick or more in the position's favour (never back). True if a stop
        moved. A print more than TRAIL_JUMP from the tick before it (a fat finger, a stale or
        mis-scaled price) moves nothing: since a stop only ever tightens, one bad print would
        otherwise set it for good. A real jump trails from the tick after it."""
        if prev > 0 and abs(ltp - prev) > TRAIL_JUMP * prev:
            return False
        ids = self._trailing[key]
        price: Decimal | None = None
        moved = False
        for bid in list(ids):
            b = self.brackets.get(bid)
            if b is None or b.state != B_ACTIVE:
                ids.remove(bid)
                continue
            if price is None:
                price = to_decimal(ltp)
            if not improves(b.side, price, b.trail_best):
                continue
            b.trail_best = price  # in memory; written with the stop it moves
            inst = self.master.get(b.segment, b.token)
            if inst is None or inst.tick_size <= 0:
                continue
            stop = trailed_stop(b.side, price, b.trail_points, b.trail_pct, inst.tick_size)
            if stop is None or not tighter(b.side, stop, b.stop_loss):
                continue
            exit_side = "SELL" if b.side == "BUY" else "BUY"
            b.stop_loss = stop
            b.stop_limit = protected_limit(exit_side, stop, self.protection_pct, inst.tick_size)
            b.updated_ns = self._now()
            self._bdirty[bid] = b
            self._trail_owed.add(bid)
            self._trail_pay(b)
            moved = True
        if not ids:
            del self._trailing[key]
        return moved

    def _trail_pay(self, b: BracketRow) -> None:
        """Send the trailed stop to each working stop leg that does not have it yet, one modify
        at a time per leg and at most once per ``execution.trail_modify_every_s``. The leg's
        prices change only when the broker confirms, so a modify lost to a crash or a timeout
        is sent again (the same absolute prices: harmless if it had landed)."""
        now = self._now()
        stop, limit = b.stop_loss, b.stop_limit
        lagging = self._leg_lags(b, stop, limit)
        if not lagging:
            self._trail_owed.discard(b.bracket_id)
            return
        last = self._past_stop(b, stop)
        if last is not None and b.bracket_id not in self._unprotected:
            # the price came back through the stop it should have (the modify was late, or
            # execution was down): a stop there triggers at once or is refused; close now
            self._unprotected[b.bracket_id] = f"its stop is {stop}; the price {last.ltp} is past it"
            return
        for leg in lagging:
            lid = leg.order_id
            if not leg.broker_order_id or lid in self.inflight or lid in self._modifying:
                continue  # once the broker has acknowledged it (or answered the last modify)
            if now < self._trail_next_ns.get(lid, 0):
                continue
            self._modifying.add(lid)
            self._trail_next_ns[lid] = now + self.trail_every_ns
            self._event(leg, "MODIFY_REQUESTED", leg.status, {
                "trigger_price": str(stop), "price": str(limit), "was": str(leg.trigger_price),
                "reason": "trailing stop"})  # fmt: skip
            self._held_intents.append(ModifyIntent(lid, leg.broker_order_id, leg.quantity, leg.quantity,
                                                   limit, stop, trail=True))  # fmt: skip

    def _past_stop(self, b: BracketRow, stop: Decimal | None) -> Tick | None:
        """The last tick of ``b``'s instrument when its price is at or through ``stop`` (a stop
        there would trigger at once), else None."""
        last = self.last.get(instrument_key(b.segment, b.token))
        if stop is None or last is None or not last.ltp > 0:
            return None
        return last if (last.ltp <= stop if b.side == "BUY" else last.ltp >= stop) else None

    def _siblings_to_cost(self, b: BracketRow, entry: OrderRow) -> None:
        """``move_sl_to_cost``: a basket leg was stopped out, so the stop of every other leg
        still held moves to that leg's entry price (only ever tighter: a second call, or a
        restart, changes nothing). A leg whose price is already beyond its cost is closed."""
        basket = basket_of_leg(entry.request_id)
        if not basket:
            return
        for n in range(1, BASKET_MAX_LEGS + 1):
            oid = self.by_request.get(basket_leg_id(basket, n))
            sib = self.orders.get(oid) if oid else None
            if sib is None or sib is entry or not sib.bracket_id or sib.avg_price is None:
                continue
            sb = self.brackets.get(sib.bracket_id)
            inst = self.master.get(sib.segment, sib.token)
            if sb is None or sb.state != B_ACTIVE or sb.stop_loss is None or inst is None:
                continue
            # at cost or a part of a tick inside it: never a stop that loses on the move back
            cost = snap(sib.avg_price, inst.tick_size, "up" if sb.side == "BUY" else "down")
            if not tighter(sb.side, cost, sb.stop_loss):
                continue
            exit_side = "SELL" if sb.side == "BUY" else "BUY"
            was = sb.stop_loss
            sb.stop_loss = cost
            sb.stop_limit = protected_limit(exit_side, cost, self.protection_pct, inst.tick_size)
            sb.updated_ns = self._now()
            self._bdirty[sb.bracket_id] = sb
            self.alert("INFO", f"{b.symbol} was stopped out: the stop of {sb.symbol} ({sb.strategy_id}) "
                       f"moves from {was} to its entry price {cost}", "stop_to_cost")  # fmt: skip
            last = self._past_stop(sb, cost)
            if last is not None:  # a stop there triggers at once (or is refused): close now
                why = f"its stop moved to cost {cost}; the price {last.ltp} is past it"
                self._unprotected[sb.bracket_id] = why
            else:
                self._trail_owed.add(sb.bracket_id)
                self._trail_pay(sb)

    def _leg_lags(self, b: BracketRow, stop: Decimal | None, limit: Decimal | None) -> list[OrderRow]:
        """The bracket's working stop legs whose broker prices are not yet ``stop``/``limit``."""
        out = []
        for lid in self.legs.get(b.bracket_id, ()):
            leg = self.orders.get(lid)
            if leg is None or leg.purpose != STOP or leg.terminal or leg.cancel_requested or leg.broker_final:
                continue
            if leg.trigger_price != stop or leg.price != limit:
                out.append(leg)
        return out

    def _trail_due(self) -> None:
        for bid in list(self._trail_owed):
            b = self.brackets.get(bid)
            if b is None or b.state not in BRACKET_OPEN:
                self._trail_owed.discard(bid)
            else:
                self._trail_pay(b)

    def _has_working_leg(self, b: BracketRow) -> bool:
        orders = self.orders
        return any(x in orders and not orders[x].terminal for x in self.legs.get(b.bracket_id, ()))

    def _request_cancel(self, o: OrderRow, reason: str = "") -> bool:
        """Ask for ``o`` to be cancelled. The cancel is owed until the broker's book shows the
        order closed: sent now when its broker id is known, else once it is (ack, order feed or
        reconciliation), and sent again with backoff when it fails. True if newly requested."""
        if o.terminal or o.sliced or o.broker_final:  # done at the broker: nothing to cancel
            return False
        if o.cancel_requested:
            self._pay_cancel(o)
            return False
        o.cancel_requested = True
        o.updated_ns = self._now()
        self._mark(o)
        self._event(o, "CANCEL_REQUESTED", o.status, {"reason": reason} if reason else None)
        if self._withdraw(o, reason or "cancelled before it was sent"):  # not sent yet: never will be
            return True
        self.owed_cancels.add(o.order_id)
        self._pay_cancel(o)
        return True

    def _pay_cancel(self, o: OrderRow) -> None:
        """Send an owed cancel if it can go now: broker id known, place answered, no cancel of
        it in flight, and its backoff elapsed."""
        if (
            o.cancel_requested
            and not o.terminal
            and not o.broker_final
            and o.broker_order_id
            and o.order_id not in self.inflight
            and o.order_id not in self.cancel_sent
            and self._now() >= o.cancel_due_ns
        ):
            self._send_cancel(o)

    def _send_cancel(self, o: OrderRow) -> None:
        self.cancel_sent.add(o.order_id)
        self._held_intents.append(CancelIntent(o.order_id, o.broker_order_id))

    def _retry_owed(self) -> None:
        """Periodic: owed cancels whose backoff elapsed, legs whose re-place is due, and trailed
        stops still to send."""
        if self._trail_owed:
            self._trail_due()
        for oid in list(self.owed_cancels):
            o = self.orders.get(oid)
            if o is None or o.terminal or o.broker_final or not o.cancel_requested:
                self.owed_cancels.discard(oid)
                continue
            self._pay_cancel(o)
        if self.leg_retry:
            now = self._now()
            for (bid, _kind), (_n, due) in list(self.leg_retry.items()):
                b = self.brackets.get(bid)
                if b is None or b.state not in BRACKET_OPEN:
                    self.leg_retry.pop((bid, _kind), None)
                elif now >= due:
                    self._sync_bracket(b)

    @staticmethod
    def _backoff_ns(failures: int) -> int:
        return int(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, failures - 1)) * 1e9)

    def _cancel_tree(self, o: OrderRow, reason: str = "") -> list[str]:
        ids = []
        targets = [self.orders[c] for c in self.children.get(o.order_id, [])] if o.sliced else [o]
        for x in targets:
            if self._request_cancel(x, reason):
                ids.append(x.order_id)
        return ids

    def cancel_entries(self, reason: str = "kill switch") -> list[str]:
        """Kill-switch hook: cancel every working order that can add exposure — entries and
        manual orders, and an exit that would now open or flip its strategy's position.
        Bracket legs and flatten closes keep working: they only take exposure off."""
        ids = []
        for o in list(self.working.values()):
            if o.terminal or o.sliced or not self._can_add_exposure(o):
                continue
            if self._request_cancel(o, reason):
                ids.append(o.order_id)
        if ids and self.log is not None:
            self.log.info("entries_cancelled", count=len(ids), reason=reason)
        return ids

    def _can_add_exposure(self, o: OrderRow) -> bool:
        if o.purpose in _LEGS or o.purpose == FLATTEN_P:
            return False
        if o.purpose != EXIT:
            return True
        pos = self.positions.get((o.strategy_id, o.key))
        held = pos.quantity if pos is not None else 0
        reduces = (held > 0 and o.side == "SELL") or (held < 0 and o.side == "BUY")
        return not reduces or o.remaining > abs(held)
