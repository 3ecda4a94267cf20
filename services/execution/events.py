"""What the broker answers: intent results, order-status and trade events, fills and positions."""

from __future__ import annotations

from typing import Any

from libs.common.clock import IST
from libs.common.messages import (
    ACK,
    CANCELLED,
    COMPLETE,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    UNKNOWN,
    Fill,
    Tick,
)
from libs.common.positions import PositionState
from services.execution.base import (
    _CLOSES,
    _LEGS,
    CANCEL_CONFIRM_NS,
    MAX_TICK_PRICE,
    QTY_MAX,
    RETRY_ALERT_AFTER,
    _topic,
)
from services.execution.brackets import Brackets
from services.execution.brokers.base import (
    BrokerAck,
    BrokerIpBlocked,
    BrokerOrderStatus,
    BrokerRejected,
    BrokerTemporary,
    BrokerTrade,
    BrokerUnknown,
    error_reason,
)
from services.execution.intents import (
    CancelIntent,
    Intent,
    ModifyIntent,
    PlaceIntent,
    PositionsIntent,
)
from services.execution.model import (
    B_CANCELLED,
    BRACKET_OPEN,
    RANK,
    STOP,
    FillRow,
    OrderRow,
    tag_key,
)
from services.execution.settled import CodeSet
from services.execution.store import (
    LedgerError,
    fill_problem,
)


class BrokerEvents(Brackets):
    """What the broker answers: intent results, order-status and trade events, fills and positions."""

    def on_result(self, intent: Intent, result: Any) -> None:
        """The outcome of an intent: a return value, or the exception the broker raised."""
        if isinstance(intent, PlaceIntent):
            self._on_place(intent, result)
        elif isinstance(intent, CancelIntent):
            self._on_cancel(intent, result)
        elif isinstance(intent, ModifyIntent):
            self._on_modify(intent, result)
        elif isinstance(intent, PositionsIntent):
            self._on_carried(result)
        else:
            self._books_pending = False
            if isinstance(result, BaseException):
                if self.log is not None:
                    self.log.warning("reconcile_books_failed", error=f"{type(result).__name__}: {result}")
                self.reconcile_due_ns = self._now() + 5_000_000_000
            else:
                self.on_books(result[0], result[1], intent.started_ns)
        if self._active_jobs:
            self._advance_jobs()

    def _on_place(self, intent: PlaceIntent, result: Any) -> None:
        o = self.orders.get(intent.order_id)
        self.inflight.discard(intent.order_id)
        if o is None:
            return
        if isinstance(result, BrokerAck):
            if result.broker_order_id and not o.broker_order_id:
                o.broker_order_id = result.broker_order_id
                self.by_broker_id[result.broker_order_id] = o.order_id
            o.raw = result.raw
            if not self._transition(
                o, ACK, "ACK", {"ack": result.raw, "broker_order_id": result.broker_order_id}
            ):
                o.updated_ns = self._now()
                self._mark(o)
            self._pay_cancel(o)
            b = self._bracket_of(o)
            if b is not None:
                if o.purpose in _LEGS:
                    self.leg_retry.pop((b.bracket_id, o.purpose), None)
                self._sync_bracket(b)
            return
        if isinstance(result, BrokerRejected):
            self._transition(
                o, REJECTED, "REJECTED", {"error": result.reason, "raw": result.raw}, result.reason
            )
            return
        # Not placed; a bracket leg is placed again later (a static-IP block ends when the operator acts).
        if isinstance(result, (BrokerTemporary, BrokerIpBlocked)):
            if o.purpose in _LEGS and o.bracket_id:
                self._leg_not_placed(o, result.reason)
            self._transition(
                o,
                REJECTED,
                "REJECTED",
                {"error": result.reason, "raw": result.raw},
                f"not placed: {result.reason}",
            )
            return
        # BrokerUnknown, or anything unexpected: we cannot tell whether the broker has it
        why = result.reason if isinstance(result, BrokerUnknown) else f"{type(result).__name__}: {result}"
        self.stats["unknown"] += 1
        if RANK[o.status] >= RANK[ACK]:  # the broker's book already showed it: nothing is unknown
            o.updated_ns = self._now()
            self._event(o, "PLACE_REPLY_LOST", o.status, {"error": why})
            return
        self._transition(o, UNKNOWN, "UNKNOWN", {"error": why}, f"outcome unknown: {why}")
        self.alert(
            "WARNING",
            f"order {o.client_tag} ({o.side} {o.quantity} {o.symbol}): broker outcome unknown "
            f"({why}); reconciling by tag, not re-sending",
            "order_unknown",
        )
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now() + self.book_lag_ns)

    def _leg_not_placed(self, o: OrderRow, why: str) -> None:
        """A bracket leg did not reach the broker for a passing reason (rate limit, timeout,
        a book that lost it): place it again after a backoff; CRITICAL after a few failures."""
        key = (o.bracket_id, o.purpose)
        n = self.leg_retry.get(key, (0, 0))[0] + 1
        self.leg_retry[key] = (n, self._now() + self._backoff_ns(n))
        self._temp_refused.add(o.order_id)
        if n == RETRY_ALERT_AFTER:
            self.alert(
                "CRITICAL",
                f"{o.purpose.lower()} leg of {o.symbol} could not be placed {n} times ({why}); "
                "still retrying: the position is not protected by it meanwhile",
                "leg_place_failing",
            )

    def _on_cancel(self, intent: CancelIntent, result: Any) -> None:
        self.cancel_sent.discard(intent.order_id)
        o = self.orders.get(intent.order_id)
        if o is None or o.terminal:
            return
        now = self._now()
        if not isinstance(result, BaseException):
            # accepted: the broker's book confirms it; still working after a while → sent again
            o.cancel_due_ns = now + max(self._backoff_ns(o.cancel_failures + 1), CANCEL_CONFIRM_NS)
            return
        why = error_reason(result)
        o.cancel_failures += 1
        n = o.cancel_failures
        o.cancel_due_ns = now + self._backoff_ns(n)
        o.updated_ns = now
        self.stats["cancel_retries"] += 1
        self._event(o, "CANCEL_FAILED", o.status, {"error": why, "failures": n})
        if self.log is not None:
            self.log.warning("cancel_failed", order_id=o.order_id, error=why, failures=n)
        if n == RETRY_ALERT_AFTER:
            self.alert(
                "CRITICAL",
                f"cancel of {o.purpose.lower()} order {o.client_tag} ({o.side} {o.remaining} {o.symbol}) "
                f"failed {n} times ({why}); still retrying: check it at the broker",
                "cancel_failing",
            )
        # the order may have ended meanwhile (a fill, an expiry): the books tell
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, now + self._backoff_ns(n))

    def _on_modify(self, intent: ModifyIntent, result: Any) -> None:
        self._modifying.discard(intent.order_id)
        o = self.orders.get(intent.order_id)
        if o is None:
            return
        if intent.trail:
            self._on_trail_modify(o, intent, result)
            return
        if not isinstance(result, BaseException):
            self._oversized.pop(o.order_id, None)
            if (intent.trigger_price is not None and not o.terminal
                    and (o.trigger_price, o.price) != (intent.trigger_price, intent.price)):
                # the resize carried the stop the leg was still owed: the broker has it now
                was = o.trigger_price
                o.price, o.trigger_price = intent.price, intent.trigger_price
                o.updated_ns = self._now()
                self._mark(o)
                self._event(o, "MODIFIED", o.status, {
                    "trigger_price": str(intent.trigger_price), "price": str(intent.price), "was": str(was),
                    "reason": "resize with the stop owed"})  # fmt: skip
                self._publish_order(o)
            b = self._bracket_of(o)
            if b is not None:
                self._sync_bracket(b)  # a resize that waited for this one
            return
        why = error_reason(result)
        if not o.terminal and o.quantity == intent.quantity:
            o.quantity = intent.old_quantity
            o.updated_ns = self._now()
            self._mark(o)
        self._event(o, "MODIFY_FAILED", o.status, {"error": why, "quantity": intent.quantity})
        excess = o.open_qty - max(0, intent.quantity - o.filled_qty)
        if o.purpose not in _LEGS or o.terminal or excess <= 0:
            self.alert(
                "WARNING",
                f"could not resize {o.purpose.lower()} leg {o.client_tag} of {o.symbol} to "
                f"{intent.quantity}: {why}",
                "modify_failed",
            )
            return
        # A leg larger than what it protects: if it triggers it opens a reverse position of
        # ``excess``. CRITICAL once per size it should have; resized again soon, not at the
        # next periodic reconciliation.
        seen = self._oversized.get(o.order_id)
        n = (seen[1] if seen is not None and seen[0] == intent.quantity else 0) + 1
        self._oversized[o.order_id] = (intent.quantity, n)
        now = self._now()
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, now + self._backoff_ns(n))
        if n == 1:
            kind = "stop" if o.purpose == STOP else "target"
            self.alert(
                "CRITICAL",
                f"{kind} order {o.client_tag} ({o.side} {o.open_qty} {o.symbol}, broker order "
                f"{o.broker_order_id}) is {excess} larger than the position it protects and could not "
                f"be resized ({why}): if it executes it {o.side.lower()}s {excess} more than held — "
                f"reduce {kind} {o.client_tag} to {intent.quantity} at Kotak now; NeoPulse keeps retrying",
                "leg_oversized",
            )

    def _on_trail_modify(self, o: OrderRow, intent: ModifyIntent, result: Any) -> None:
        """A trailing stop's modify answered: the leg has the new stop, or keeps the one it had
        (still a stop) and the trailed one is sent again after a backoff."""
        now = self._now()
        if not isinstance(result, BaseException):
            was = o.trigger_price
            o.price, o.trigger_price = intent.price, intent.trigger_price
            o.updated_ns = now
            self._mark(o)
            self._event(o, "MODIFIED", o.status, {
                "trigger_price": str(intent.trigger_price), "price": str(intent.price), "was": str(was),
                "reason": "trailing stop"})  # fmt: skip
            self._publish_order(o)
            self._trail_failures.pop(o.order_id, None)
            if self.log is not None:
                self.log.info("stop_trailed", symbol=o.symbol, strategy_id=o.strategy_id,
                              client_tag=o.client_tag, trigger_price=str(intent.trigger_price),
                              was=str(was))  # fmt: skip
        else:
            why = error_reason(result)
            payload = {"error": why, "trigger_price": str(intent.trigger_price), "reason": "trailing stop"}
            self._event(o, "MODIFY_FAILED", o.status, payload)
            if not o.terminal and not o.broker_final:
                n = self._trail_failures.get(o.order_id, 0) + 1
                self._trail_failures[o.order_id] = n
                self._trail_next_ns[o.order_id] = now + self._backoff_ns(n)
                if n == 1:
                    self.alert(
                        "WARNING",
                        f"could not trail the stop {o.client_tag} of {o.symbol} to {intent.trigger_price} "
                        f"({why}): it stays at {o.trigger_price}; NeoPulse tries again",
                        "trail_failed",
                    )
        b = self._bracket_of(o)
        if b is not None:
            self._sync_bracket(b)  # a resize that waited for this modify

    def broker_accepts_again(self) -> None:
        """The broker takes order calls again (a static-IP block ended): place the legs and send
        the cancels that waited for it now, not after their backoff."""
        now = self._now()
        for key, (n, _due) in list(self.leg_retry.items()):
            self.leg_retry[key] = (n, now)
        for oid in self.owed_cancels:
            o = self.orders.get(oid)
            if o is not None:
                o.cancel_due_ns = min(o.cancel_due_ns, now)
        self._retry_owed()
        for b in list(self.brackets.values()):
            if b.state in BRACKET_OPEN:
                self._sync_bracket(b)
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, now)

    def on_broker_event(self, ev: BrokerOrderStatus | BrokerTrade) -> None:
        """An order-feed update or a trade, from the broker's push channel or a book poll."""
        o = self._find(ev.broker_order_id, ev.client_tag)
        if o is None:
            group = self._settled_id(ev.broker_order_id, ev.client_tag)
            if group < 0:
                self._orphan(ev.broker_order_id, ev.client_tag)
                return
            # a settled order: its status is known; only a trade not seen before matters, or a
            # status that says it works after all (the books then bring it back and adopt it)
            if not isinstance(ev, BrokerTrade):
                if ev.status.upper() in (ACK, OPEN, PARTIAL):
                    self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now())
                return
            if self._fill_known(ev, group):
                return
            o = self._load_settled(group, ev.broker_order_id, ev.client_tag)
            if o is None:
                return
        if isinstance(ev, BrokerTrade):
            self._on_trade(ev, o)
        else:
            self._on_status(ev, o)
        if self._active_jobs:
            self._advance_jobs()

    def _fill_seen(self, day: str, segment: str) -> CodeSet:
        """The trade ids already taken for ``day`` and ``segment`` (exchange trade numbers are
        unique per segment and day)."""
        seen = self.fill_keys.get((day, segment))
        if seen is None:
            seen = self.fill_keys[(day, segment)] = CodeSet()
        return seen

    def _find(self, broker_order_id: str, client_tag: str) -> OrderRow | None:
        """The order the broker names: by its order number first; by the tag only for an order
        whose number is not known yet (Kotak rewrites the tag on modify and cancel, so a tag
        match on an order with another number is not this order)."""
        oid = self.by_broker_id.get(broker_order_id) if broker_order_id else None
        if oid is None and client_tag:
            oid = self.by_tag.get(tag_key(client_tag))
            tagged = self.orders.get(oid) if oid else None
            if tagged is not None and broker_order_id and tagged.broker_order_id not in ("", broker_order_id):
                oid = None
        o = self.orders.get(oid) if oid else None
        if o is not None and broker_order_id and not o.broker_order_id:
            o.broker_order_id = broker_order_id
            self.by_broker_id[broker_order_id] = o.order_id
            self._mark(o)
            self._pay_cancel(o)  # a cancel asked for while its place was unanswered or UNKNOWN
        return o

    def _settled_id(self, broker_order_id: str, client_tag: str) -> int:
        """The settled (evicted) group holding the order the broker names, or -1."""
        return self.settled.group_of(broker_order_id, tag_key(client_tag) if client_tag else "")

    def _fill_known(self, tr: BrokerTrade, group: int) -> bool:
        """Whether this trade of a settled order was applied already."""
        seen = self.fill_keys.get((self._day_of(tr.ts_ns), self.settled.segment(group)))
        return seen is not None and tr.trade_id in seen

    def _load_settled(self, group: int, broker_order_id: str, client_tag: str) -> OrderRow | None:
        """A trade came for a settled order (a real broker may report one after a cancel), or a
        book shows it working: its group's rows come back from the ledger (by order id), with
        its bracket when that was closed unfilled (a late entry trade reopens it), so the trade
        is applied like any other. When the ledger cannot be read now, the next books bring
        the trade again. Returns the order the broker named."""
        s = self.settled
        ids = s.order_ids(group)
        try:
            rows = self.store.find_by_order_ids(ids, with_children=s.is_family(group))
            root = rows.get(ids[0])
            bid = root.bracket_id if root is not None else ""
            parked = self.store.find_brackets([bid]).get(bid) if bid and bid not in self.brackets else None
        except LedgerError as exc:
            if self.log is not None:
                self.log.warning("settled_reload_failed", broker_order_id=broker_order_id, error=str(exc))
            self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now() + 5_000_000_000)
            return None
        # root first (slices and legs find their parent), then the rest as they were made
        for row in sorted(rows.values(), key=lambda r: (r.order_id != ids[0], r.created_ns)):
            if row.order_id not in self.orders:
                self._index(row)
        s.forget(group)  # a row the ledger lost is not settled: unknown from here on
        if parked is not None and parked.state == B_CANCELLED:
            self.brackets[parked.bracket_id] = parked  # closed unfilled: the trade reopens it (``_sync_one``)
        o = self._find(broker_order_id, client_tag)
        if self.log is not None:
            self.log.info("settled_reloaded", order_id=o.order_id if o is not None else "", rows=len(rows),
                          broker_order_id=broker_order_id)  # fmt: skip
        if o is None:
            self.alert("CRITICAL", f"a trade came for broker order {broker_order_id or client_tag}, which "
                       "left memory as settled, but the ledger has no row for it: the trade is not applied — "
                       "check the broker's trade book", "settled_missing")  # fmt: skip
        return o

    def _orphan(self, broker_order_id: str, client_tag: str) -> None:
        if not client_tag.lower().startswith("np") or broker_order_id in self._orphans_alerted:
            return
        self._orphans_alerted.add(broker_order_id)
        self.stats["orphans"] += 1
        self.alert(
            "CRITICAL",
            f"broker order {broker_order_id} (tag {client_tag}) is not in the ledger",
            "orphan_order",
        )

    def _on_status(self, st: BrokerOrderStatus, o: OrderRow) -> None:
        raw = st.raw if st.raw is not None else {"status": st.status, "filled_qty": st.filled_qty}
        if not 0 <= st.filled_qty <= QTY_MAX or not 0 <= st.quantity <= QTY_MAX:
            self._bad_row(o, f"quantity {st.quantity} / filled {st.filled_qty} out of range", raw)
            return
        if (
            st.quantity
            and st.quantity != o.quantity
            and not o.terminal
            and st.status != REJECTED
            and st.quantity >= max(1, o.filled_qty)  # a modify never goes below what has traded
        ):
            old_q = o.quantity
            o.quantity = st.quantity
            o.updated_ns = self._now()
            self._mark(o)
            self._event(o, "MODIFIED", o.status, {"quantity": st.quantity, "was": old_q})
            self._publish_order(o)
        status = st.status.upper()
        if status in (OPEN, ACK, PARTIAL):
            if status == PARTIAL and o.filled_qty == 0:
                status = OPEN  # the trade itself moves it to PARTIAL
            if o.status in (PENDING_BROKER, UNKNOWN) and status != ACK:
                self._transition(o, ACK, "ACK", raw)
            self._transition(o, status, status, raw)
        elif status in (COMPLETE, CANCELLED):
            if o.status in (PENDING_BROKER, UNKNOWN):
                self._transition(o, ACK, "ACK", raw)
            # a filled quantity comes only from trades: the broker's book may call an order
            # COMPLETE before its trade is in the trade book
            traded = (st.filled_qty or o.quantity) if status == COMPLETE else st.filled_qty
            if o.filled_qty < traded:
                self._await_fills(o, status, traded, st.reason, raw)
                return
            reason = "" if status == COMPLETE else (st.reason or "cancelled")
            self._transition(o, status, status, raw, reason)
        elif status == REJECTED:
            self._transition(o, REJECTED, REJECTED, raw, st.reason or "rejected by the broker")

    def _bad_row(self, o: OrderRow, why: str, raw: Any) -> None:
        """A broker book row for ``o`` that cannot be true: ignored, recorded, alerted once."""
        if o.order_id not in self.recon.bad_rows:  # recorded and alerted once, not every snapshot
            self.recon.bad_rows.add(o.order_id)
            o.updated_ns = self._now()
            self._event(o, "BROKER_ROW_IGNORED", o.status, {"error": why, "raw": raw})
            self._mark(o)
            text = f"broker row for {o.client_tag} ({o.symbol}) ignored: {why}"
            self.alert("CRITICAL", text, "broker_row_bad")

    def _await_fills(self, o: OrderRow, status: str, traded: int, reason: str, raw: Any) -> None:
        """The broker says the order ended with ``traded`` filled, but fewer shares have arrived
        as trades: it stays working until they do (``_on_trade`` then closes it)."""
        if o.broker_final:
            o.broker_filled = max(o.broker_filled, traded)
            return
        o.broker_final, o.broker_filled, o.awaiting_since_ns = status, traded, self._now()
        if status == CANCELLED and reason:
            o.reason = reason
        self._transition(o, OPEN, OPEN, raw)
        o.updated_ns = self._now()
        self._event(o, "AWAITING_FILLS", o.status, {"broker_status": status, "traded": traded, "raw": raw})
        self.owed_cancels.discard(o.order_id)
        b = self._bracket_of(o)
        if b is not None:  # a leg announced as done: its OCO partner goes now
            self._sync_bracket(b)
        self._trim_exits(o)  # and an exit working beside it would now close too much

    def _on_trade(self, tr: BrokerTrade, o: OrderRow) -> None:
        day = self._day_of(tr.ts_ns)
        seen = self._fill_seen(day, o.segment)
        if tr.trade_id in seen:
            return
        seen.add(tr.trade_id)
        now = self._now()
        fill = FillRow(
            trade_id=tr.trade_id,
            order_id=o.order_id,
            broker_order_id=tr.broker_order_id,
            strategy_id=o.strategy_id,
            segment=o.segment,
            token=o.token,
            symbol=o.symbol,
            side=o.side,
            quantity=tr.quantity,
            price=tr.price,
            ts_ns=tr.ts_ns or now,
            trading_day=day,
            broker=self.broker_name,
            raw=tr.raw,
        )
        problem = fill_problem(fill)
        if problem is not None:  # the ledger could never store it, and the position must not take it
            self.stats["quarantined"] += 1
            self._event(o, "TRADE_QUARANTINED", o.status, {"trade_id": tr.trade_id, "error": problem,
                                                          "raw": tr.raw})  # fmt: skip
            self._mark(o)
            self.alert(
                "CRITICAL",
                f"broker trade {tr.trade_id} of {o.symbol} ({o.client_tag}) set aside: {problem}; "
                "the position ignores it — check the broker's trade book",
                "trade_quarantined",
            )
            return
        self._fills.append(fill)
        self.stats["fills"] += 1
        o.filled_qty += tr.quantity
        o.filled_value += tr.price * tr.quantity
        o.avg_price = o.filled_value / o.filled_qty
        o.updated_ns = now
        self._mark(o)
        self._event(
            o,
            "FILL",
            o.status,
            {"trade_id": tr.trade_id, "qty": tr.quantity, "price": str(tr.price), "raw": tr.raw},
        )
        if o.filled_qty > o.quantity:
            self.alert(
                "CRITICAL", f"order {o.client_tag} overfilled: {o.filled_qty} of {o.quantity}", "overfill"
            )
        self._held_msgs.append(
            (
                _topic("fill", o.strategy_id),
                Fill(
                    fill_id=tr.trade_id,
                    order_id=o.parent_id if o.parent_id and o.purpose not in _LEGS else o.order_id,
                    strategy_id=o.strategy_id,
                    symbol=o.symbol,
                    segment=o.segment,
                    token=o.token,
                    side=o.side,
                    quantity=tr.quantity,
                    price=tr.price,
                    ts_ns=fill.ts_ns,
                ),
            )
        )
        if day == self.day:
            pos = self._apply_position(fill)
            last = self.last.get(o.key)
            self._held_msgs.append(
                (_topic("position", o.strategy_id), pos.message(last.ltp if last else 0.0, now))
            )
        if not o.terminal:
            status = COMPLETE if o.filled_qty >= o.quantity else PARTIAL
            if o.broker_final and o.filled_qty >= o.broker_filled:
                status = o.broker_final  # the trades the broker's status announced are all here
            if o.status in (PENDING_BROKER, UNKNOWN):
                self._transition(o, ACK, "ACK", {"via": "trade"})
            if not self._transition(o, status, status, {"trade_id": tr.trade_id}):
                self._publish_order(o)
        else:
            self._publish_order(o)
        if o.parent_id and o.purpose not in _LEGS:
            self._refresh_parent(o.parent_id)
        b = self._bracket_of(o)
        if b is None:  # any fill moves the position that brackets of this instrument protect
            b = next(iter(self._open_brackets(o.strategy_id, o.segment, o.token)), None)
        if b is not None:
            self._sync_bracket(b)
        if day == self.day:
            self._overclosed(o)
            self._trim_exits(o)

    def _day_of(self, ts_ns: int) -> str:
        if not ts_ns:
            return self.day
        secs = ts_ns / 1e9
        lo, hi, day = self._day_span
        if lo < secs < hi:  # well inside the day of the previous answer
            return day
        import datetime as _dt

        when = _dt.datetime.fromtimestamp(secs, IST)
        day = when.strftime("%Y-%m-%d")
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
        start = midnight.timestamp()
        end = (midnight + _dt.timedelta(days=1)).timestamp()
        # a millisecond of margin at both ends keeps clear of fromtimestamp's rounding
        self._day_span = (start + 1e-3, end - 1e-3, day)
        return day

    def _apply_position(self, f: FillRow) -> PositionState:
        k = (f.strategy_id, f.key)
        pos = self.positions.get(k)
        if pos is None:
            pos = self.positions[k] = PositionState(f.strategy_id, f.segment, f.token, f.symbol)
        o = self.orders.get(f.order_id)
        before = pos.quantity
        pos.apply(f.side, f.quantity, f.price, o.product if o is not None else "MIS")
        self._note_stray(k, before, pos.quantity, o is not None and o.purpose in _CLOSES)
        self.turnover += f.price * f.quantity
        self.fill_count += 1
        return pos

    def _note_stray(self, k: tuple[str, str], before: int, after: int, closing: bool) -> None:
        """Keep ``_stray[k]``: the part of the position that closes (EXIT, stop, target, flatten
        close) made by filling past flat. A close that takes the position from flat, or through
        it, makes all of the new position stray; one that adds to a stray position adds to it;
        anything that shrinks the position shrinks the stray part first; an entry that turns it
        leaves none. Fills are replayed through here at a start, so a restart sees it too."""
        stray = self._stray.get(k, 0)
        if after == 0 or before == 0 or (after > 0) != (before > 0):
            stray = after if closing else 0
        elif abs(after) > abs(before):
            stray += (after - before) if closing else 0
        elif stray:
            left = max(0, abs(stray) - (abs(before) - abs(after)))
            stray = left if stray > 0 else -left
        if stray:
            self._stray[k] = stray
        else:
            self._stray.pop(k, None)
            self._stray_alerted.discard(k)

    def on_tick(self, tick: Tick, key: str | None = None) -> bool:
        """Remember the last price (market intent, flatten, marks). Hot path: one dict store.
        A tick whose price is not a possible price (NaN, infinite, not positive, above the
        price cap) is ignored: the last good one stays the reference for pricing. True when
        it moved a trailing stop (there is a modify to send: pump). ``key`` (``segment|token``)
        may be passed when the caller already has it."""
        if 0.0 < tick.ltp <= MAX_TICK_PRICE:  # NaN fails both comparisons
            if key is None:
                key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
            if key in self._trailing:
                prev = self.last.get(key)
                self.last[key] = tick
                return self._trail_on_tick(key, tick.ltp, prev.ltp if prev is not None else 0.0)
            self.last[key] = tick
        return False

    def drain_broker_events(self) -> None:
        for ev in self.broker.drain_events():
            self.on_broker_event(ev)
