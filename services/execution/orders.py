"""Submitting orders, slicing them within the freeze quantity, and the order state machine."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from libs.common.instruments import Instrument, instrument_key
from libs.common.messages import (
    CANCELLED,
    COMPLETE,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    TERMINAL_STATES,
    UNKNOWN,
    ExecuteOrder,
    to_builtins,
)
from libs.common.money import MoneyError, protected_limit
from services.execution.base import (
    _LEGS,
    _ZERO,
    SubmitResult,
)
from services.execution.brokers.base import (
    BrokerOrder,
)
from services.execution.intents import (
    PlaceIntent,
)
from services.execution.model import (
    ENTRY,
    EXIT,
    FLATTEN_P,
    RANK,
    REQUEST_PURPOSES,
    STOP,
    EventRow,
    OrderRow,
    new_client_tag,
    new_id,
    next_status,
)
from services.execution.pricing import (
    bracket_reason,
    freeze_step,
    price_order,
    refusal,
)
from services.execution.store import LedgerError
from services.execution.unit_of_work import UnitOfWork


class Orders(UnitOfWork):
    """Submitting orders, slicing them within the freeze quantity, and the order state machine."""

    def submit(self, cmds: Iterable[ExecuteOrder]) -> list[SubmitResult]:
        """Accept approved orders: their ``PENDING_BROKER`` rows are committed in ONE transaction
        (together with any changes still waiting for a flush — group commit), then their place
        intents are released. A refused order is written as ``REJECTED``. When the ledger
        cannot write, nothing of this batch is kept and every order is refused.

        An order whose ``expires_ns`` passed before its row was committed is never sent: risk
        has told the strategy by then that it was not placed (it gave up waiting)."""
        cmds = list(cmds)
        settled = self._settled_rows(cmds)  # repeats of settled requests: the ledger's rows
        mark = self._uow_mark()
        created: list[OrderRow] = []
        now = self._now()
        for cmd in cmds:
            if cmd.request_id in self.by_request or cmd.request_id in settled:
                self.stats["duplicates"] += 1
                continue
            one = self._uow_mark()
            try:
                created.extend(self._build(cmd, expired=bool(cmd.expires_ns) and now > cmd.expires_ns))
            except Exception as exc:  # noqa: BLE001 - one odd command must not leave a half-built row
                self._uow_rollback(one, [o for k, o in self._new.items() if k not in one[3]])
                self._refused[cmd.request_id] = f"order could not be built: {type(exc).__name__}: {exc}"
                if self.log is not None:
                    self.log.error("order_build_failed", request_id=cmd.request_id, error=repr(exc))
        if not self.flush():
            self._uow_rollback(mark, created)
            return [
                SubmitResult(c.request_id, False, reason="ledger unavailable", code="ledger") for c in cmds
            ]
        self._expire_late(cmds)
        out: list[SubmitResult] = []
        for cmd in cmds:
            row = self.orders.get(self.by_request.get(cmd.request_id, ""))
            if row is None and cmd.request_id in settled:
                row = settled[cmd.request_id]
                if row is None:
                    out.append(SubmitResult(cmd.request_id, False, reason="ledger unavailable",
                                            code="ledger"))  # fmt: skip
                    continue
            if row is None:
                why = self._refused.pop(cmd.request_id, "order lost")
                out.append(SubmitResult(cmd.request_id, False, reason=why, code="refused"))
                continue
            ok = row.status != REJECTED
            code = "" if ok else "rejected"
            out.append(
                SubmitResult(cmd.request_id, ok, row.order_id, row.status, row.client_tag, row.reason, code)
            )
        self.stats["submitted"] += len(cmds)
        return out

    def _settled_rows(self, cmds: list[ExecuteOrder]) -> dict[str, OrderRow | None]:
        """Repeats of requests whose rows have left memory (settled): their rows as the ledger
        holds them now (None for each when the ledger cannot be read). Memory keeps only a hash
        of a settled request id, so a match is a maybe: the ledger, where each request id is
        UNIQUE, decides, and a request it does not hold is a new one."""
        maybe = self.settled.maybe_request
        rids = [c.request_id for c in cmds if c.request_id not in self.by_request and maybe(c.request_id)]
        if not rids:
            return {}
        try:
            found = self.store.find_by_request_ids(rids)
        except LedgerError as exc:
            if self.log is not None:
                self.log.warning("settled_lookup_failed", error=str(exc), requests=len(rids))
            return dict.fromkeys(rids)
        return {rid: found[rid] for rid in rids if rid in found}

    def _expire_late(self, cmds: list[ExecuteOrder]) -> None:
        """Orders whose deadline passed while their rows were being committed: their place
        intents are withdrawn and the rows closed as not placed."""
        now = self._now()
        for cmd in cmds:
            if not cmd.expires_ns or now <= cmd.expires_ns:
                continue
            row = self.orders.get(self.by_request.get(cmd.request_id, ""))
            if row is None or row.status != PENDING_BROKER:
                continue
            late_ms = (now - cmd.expires_ns) / 1e6
            for x in [self.orders[c] for c in self.children.get(row.order_id, [])] or [row]:
                self._withdraw(x, f"expired {late_ms:.0f} ms before it could be sent; not placed", REJECTED)

    def _withdraw(self, o: OrderRow, reason: str, status: str = CANCELLED) -> bool:
        """Take back a place intent that has not reached the broker; the row ends ``status``."""
        for queue in (self._held_intents, self.intents):
            for i in list(queue):
                if isinstance(i, PlaceIntent) and i.order_id == o.order_id:
                    queue.remove(i)
                    self.inflight.discard(o.order_id)
                    self._transition(o, status, status, {"reason": reason}, reason)
                    return True
        return False

    def _instrument(self, cmd: ExecuteOrder) -> Instrument | None:
        inst = self.master.get(cmd.segment, cmd.token) if cmd.segment and cmd.token else None
        if inst is None and (cmd.symbol or cmd.order.symbol):
            try:
                inst = self.master.resolve(cmd.symbol or cmd.order.symbol)
            except KeyError:
                inst = None
        return inst

    def _build(self, cmd: ExecuteOrder, expired: bool = False) -> list[OrderRow]:
        """The rows of one command. Every check (prices, bracket, stop limit) runs before the
        first row is added, so a refusal is one REJECTED row and never a half-built order."""
        o = cmd.order
        now = self._now()
        side = (o.side or "").upper()
        purpose = (o.purpose or ENTRY).upper()
        inst = self._instrument(cmd)
        qty = int(cmd.quantity)
        otype, price, trig = "LIMIT", None, None
        stop_limit: Decimal | None = None
        reason = refusal(cmd, side, purpose, inst, qty, expired_at=now if expired else 0)
        if not reason and purpose == EXIT:
            assert inst is not None
            reason, qty = self._exit_size(o.strategy_id, inst, side, qty)
        if not reason:
            assert inst is not None
            try:
                last = self.last.get(inst.key)
                otype, price, trig = price_order(cmd, inst, side, last, self.protection_pct)
                reason = bracket_reason(cmd, inst, side, price, last) or ""
                if not reason and o.stop_loss is not None:
                    exit_side = "SELL" if side == "BUY" else "BUY"
                    stop_limit = protected_limit(exit_side, o.stop_loss, self.protection_pct, inst.tick_size)
            except MoneyError as exc:
                reason = str(exc)
            except ArithmeticError:  # decimal.InvalidOperation / Overflow on absurd values
                reason = "price, trigger, stop loss or target is out of range"
        seg = inst.segment if inst else cmd.segment
        tok = inst.token if inst else cmd.token
        sym = inst.symbol if inst else (cmd.symbol or o.symbol)
        row = OrderRow(
            order_id=new_id(),
            request_id=cmd.request_id,
            client_tag=self._tag(),
            strategy_id=o.strategy_id,
            segment=seg,
            token=tok,
            symbol=sym,
            side=side or "BUY",
            order_type=otype,
            product=o.product or "MIS",
            quantity=max(qty, 0),
            price=price,
            trigger_price=trig,
            status=REJECTED if reason else PENDING_BROKER,
            trading_day=self.day,
            created_ns=now,
            updated_ns=now,
            purpose=purpose if purpose in REQUEST_PURPOSES else ENTRY,
            broker=self.broker_name,
            reason=reason,
            expires_ns=cmd.expires_ns,
        )
        payload = {"request": to_builtins(cmd)}
        rows = [row]
        self._add(row, "REJECTED" if reason else "PENDING", payload)
        if reason:
            self.stats["rejected"] += 1
            return rows
        assert inst is not None
        if o.stop_loss is not None or o.target is not None:
            self._new_bracket(row, o.stop_loss, o.target, stop_limit, (o.trail_points, o.trail_pct),
                              stop_pct=o.stop_loss_pct)  # fmt: skip
        rows.extend(self._slice_and_place(row, inst))
        return rows

    def _exit_size(self, strategy: str, inst: Instrument, side: str, qty: int) -> tuple[str, int]:
        """An exit only reduces: (why not, "") or ("", the quantity to send). The position is
        execution's own (``_closable``), less the exits already working; a strategy whose view
        lags (its stop filled a moment ago) must not open the reverse position. An exit larger
        than what is left is cut to it."""
        closing, working = self._closable(strategy, inst.segment, inst.token, side)
        left = closing - working
        left -= left % max(1, inst.lot_size)
        if left <= 0:
            held = self.positions.get((strategy, inst.key))
            net = held.quantity if held is not None else 0
            more = f" and exits of {working} already working" if working else ""
            side_net = net if side == "SELL" else -net  # what this side would close, by trades alone
            gone = " (less fills the broker has announced)" if closing < side_net else ""
            return (f"nothing to exit: {strategy} holds {net:+d} {inst.symbol}{gone}{more}; an exit only "
                    "reduces a position, so this one was not placed"), qty  # fmt: skip
        return "", min(qty, left)

    def _closable(self, strategy: str, segment: str, token: str, side: str) -> tuple[int, int]:
        """(what an order on ``side`` can still close, what exits on that side already close).

        The first is the position from trades less the fills the broker has announced on that
        side whose trades are still on their way: a stop the order book calls complete before
        the trade book shows its trade has closed the position as far as a new exit goes. The
        second counts the working exits and flatten closes, each with what it may still fill."""
        pos = self.positions.get((strategy, instrument_key(segment, token)))
        net = pos.quantity if pos is not None else 0
        closing = net if side == "SELL" else -net
        announced = exiting = 0
        for w in self.working.values():
            if (w.strategy_id != strategy or w.segment != segment or w.token != token or w.side != side
                    or w.sliced or w.status in TERMINAL_STATES):  # fmt: skip
                continue
            if w.purpose in (EXIT, FLATTEN_P):
                exiting += w.unsettled_qty
            elif w.broker_final:
                announced += w.unsettled_qty
        return max(0, closing - announced), exiting

    def _tag(self) -> str:
        while True:
            tag = new_client_tag()
            if tag not in self.by_tag and not self.settled.has_tag(tag):
                return tag

    def _add(self, row: OrderRow, kind: str, payload: Any) -> None:
        self._index(row)
        self._new[row.order_id] = row
        self._events.append(
            EventRow(
                order_id=row.order_id,
                kind=kind,
                from_status="",
                to_status=row.status,
                ts_ns=row.created_ns,
                payload=payload,
            )
        )
        self._publish_order(row)

    def _slice_and_place(self, row: OrderRow, inst: Instrument) -> list[OrderRow]:
        """Queue the place intent(s): one order, or slices within the freeze quantity."""
        freeze = inst.freeze_qty
        if not freeze or row.quantity <= freeze:
            self._queue_place(row)
            return []
        step = freeze_step(inst.lot_size, freeze)
        row.sliced = True
        sizes = [step] * (row.quantity // step)
        if row.quantity % step:
            sizes.append(row.quantity % step)
        kids = []
        for n, size in enumerate(sizes, 1):
            kid = OrderRow(
                order_id=new_id(),
                request_id=f"{row.request_id}#{n}",
                client_tag=self._tag(),
                strategy_id=row.strategy_id,
                segment=row.segment,
                token=row.token,
                symbol=row.symbol,
                side=row.side,
                order_type=row.order_type,
                product=row.product,
                quantity=size,
                price=row.price,
                trigger_price=row.trigger_price,
                status=PENDING_BROKER,
                trading_day=row.trading_day,
                created_ns=row.created_ns,
                updated_ns=row.created_ns,
                parent_id=row.order_id,
                purpose=row.purpose,
                broker=row.broker,
                expires_ns=row.expires_ns,
            )
            self._add(kid, "PENDING", {"slice": n, "of": len(sizes), "freeze_qty": freeze})
            self._queue_place(kid)
            kids.append(kid)
        return kids

    def _queue_place(self, o: OrderRow) -> None:
        self.inflight.add(o.order_id)
        self._held_intents.append(
            PlaceIntent(
                o.order_id,
                expires_ns=o.expires_ns,
                order=BrokerOrder(
                    client_tag=o.client_tag,
                    segment=o.segment,
                    token=o.token,
                    symbol=o.symbol,
                    side=o.side,
                    quantity=o.quantity,
                    price=o.price if o.price is not None else _ZERO,
                    order_type=o.order_type,
                    trigger_price=o.trigger_price,
                    product=o.product,
                ),
            )
        )

    def _transition(self, o: OrderRow, status: str, kind: str, payload: Any = None, reason: str = "") -> bool:
        if next_status(o.status, status) is None:  # terminal is final; never back down the ranks
            return False
        old = o.status
        o.status = status
        if reason:
            o.reason = reason
        o.updated_ns = self._now()
        if status in TERMINAL_STATES:  # ``o.terminal``
            self.working.pop(o.order_id, None)
            self._settle_later(o)
        else:
            self.working[o.order_id] = o
        self._mark(o)
        self._event(o, kind, old, payload)
        self._publish_order(o)
        if o.parent_id and o.purpose not in _LEGS:
            self._refresh_parent(o.parent_id)
        if o.terminal:
            self._on_terminal(o)
        return True

    def _on_terminal(self, o: OrderRow) -> None:
        self.inflight.discard(o.order_id)
        self.cancel_sent.discard(o.order_id)
        self.owed_cancels.discard(o.order_id)
        b = self._bracket_of(o)
        if b is not None:
            if o.order_id in self._temp_refused:  # not placed for a passing reason: re-placed later
                self._temp_refused.discard(o.order_id)
            elif o.status == REJECTED and o.purpose in _LEGS:
                self.leg_failed.add((b.bracket_id, o.purpose))
                closing = o.purpose == STOP and self.cfg.close_unprotected
                self.alert(
                    "CRITICAL",
                    f"{o.purpose.lower()} leg of {o.symbol} rejected by the broker ({o.reason}); "
                    + ("the position is closed, as it has no stop" if closing
                       else "the position is not protected by it"),
                    "leg_rejected",
                )  # fmt: skip
                if closing:
                    self._unprotected[b.bracket_id] = o.reason  # closed at the next flush
            self._sync_bracket(b)

    def _refresh_parent(self, parent_id: str) -> None:
        p = self.orders.get(parent_id)
        if p is None or not p.sliced:
            return
        kids = [self.orders[c] for c in self.children.get(parent_id, []) if c in self.orders]
        if not kids:
            return
        filled = sum(k.filled_qty for k in kids)
        value = sum((k.filled_value for k in kids), _ZERO)
        if filled != p.filled_qty:
            p.filled_qty = filled
            p.filled_value = value
            p.avg_price = value / filled if filled else None
            p.updated_ns = self._now()
            self._mark(p)
            self._publish_order(p)
        statuses = [k.status for k in kids]
        if all(s in TERMINAL_STATES for s in statuses):
            if filled >= p.quantity:
                status = COMPLETE
            elif all(s == REJECTED for s in statuses):
                status = REJECTED
            else:
                status = CANCELLED
        elif filled > 0:
            status = PARTIAL
        elif UNKNOWN in statuses:
            status = UNKNOWN
        else:
            status = min(statuses, key=lambda s: RANK[s])
        if status != p.status:
            reason = next((k.reason for k in kids if k.status == REJECTED and k.reason), "")
            self._transition(
                p,
                status,
                "SLICES",
                {"slices": {k.order_id: k.status for k in kids}},
                reason if status in (REJECTED, CANCELLED) else "",
            )
        b = self._bracket_of(p)
        if b is not None:
            self._sync_bracket(b)
