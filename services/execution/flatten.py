"""Flatten: cancel what works, wait until the broker confirms, then close what is held."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from libs.common.clock import IST
from libs.common.config import hhmm_minutes
from libs.common.instruments import instrument_key
from libs.common.messages import (
    BASKET_MAX_LEGS,
    PENDING_BROKER,
    Flatten,
    FlattenPhase,
    RiskEvent,
    basket_leg_id,
    basket_of_leg,
)
from libs.common.money import protected_limit
from services.execution.base import (
    _LEGS,
    FLATTEN_CANCEL_WAIT_S,
    FlattenJob,
)
from services.execution.events import BrokerEvents
from services.execution.model import (
    B_FLATTENED,
    BRACKET_OPEN,
    FLATTEN_P,
    BracketRow,
    OrderRow,
    RiskEventRow,
    new_id,
)

SQUARE_OFF_RETRY_NS = 30_000_000_000  # a square-off whose position has not moved is tried again after this
STRAY_RETRY_NS = 5_000_000_000  # a stray position a round left unchanged is closed again after this
STOPPED_GRACE_NS = 5_000_000_000  # after a strategy_stopped record, risk's own flatten comes first


class Flattening(BrokerEvents):
    """Flatten: cancel, wait for the broker's confirmations, close what is then held."""

    def flatten(self, req: Flatten, done: Callable[[dict[str, Any]], None]) -> None:
        """Cancel open orders; once the broker confirms each of them closed (a leg's fill may
        still be on its way, an order in flight or UNKNOWN may still turn up), close the
        positions as they then stand, each in its own product, with protected limits;
        ``done(report)`` once every close has its broker answer. If confirmations take longer
        than ``FLATTEN_CANCEL_WAIT_S`` the close goes out anyway and the report names the orders
        still working. Idempotent on ``request_id``."""
        job = self.flatten_jobs.get(req.request_id)
        if job is not None:
            if job.report is not None:
                done(job.report)
            else:
                job.waiters.append(done)
            return
        job = FlattenJob(
            request=req, waiters=[done], deadline_ns=self._now() + int(FLATTEN_CANCEL_WAIT_S * 1e9)
        )
        self.flatten_jobs[req.request_id] = job
        self._active_jobs.add(req.request_id)
        match_key = self._match_symbol(req.symbol) if req.symbol else None
        if req.symbol and match_key is None:
            job.skipped.append({"symbol": req.symbol, "reason": f"unknown instrument: {req.symbol}"})
        for b in self.brackets.values():
            if b.state in BRACKET_OPEN and self._matches(
                b.strategy_id, instrument_key(b.segment, b.token), req, match_key, b.product
            ):
                b.state = B_FLATTENED
                b.reason = f"flatten {req.request_id}"
                b.updated_ns = self._now()
                self._bdirty[b.bracket_id] = b
        for o in list(self.working.values()):
            if o.terminal or o.sliced or not self._matches(o.strategy_id, o.key, req, match_key, o.product):
                continue
            if req.symbol and match_key is None:
                continue
            if self._request_cancel(o, f"flatten {req.request_id}"):
                job.cancelled.append(o.order_id)
            if not o.terminal:
                job.waiting.add(o.order_id)
        try:
            self._advance_job(job)
        except Exception:
            # a job that could not be built must not hold its request id: a retry starts afresh
            # instead of waiting for a report that never comes
            self.flatten_jobs.pop(req.request_id, None)
            self._active_jobs.discard(req.request_id)
            raise

    def flush(self) -> bool:
        if self._unprotected:
            self._close_unprotected()
        if self._stray:
            self.keep_stray_flat()
        return super().flush()

    def keep_stray_flat(self) -> None:
        """A position that closes alone made (``_stray`` is all of it: an exit and a stop that
        both filled) is closed by a flatten of its strategy and instrument, once no flatten of
        it runs and no close of it works; again ``STRAY_RETRY_NS`` after a round that left it
        unchanged (a close the broker refused or never got). Checked at every flush, and the
        fills replayed at a start rebuild ``_stray``, so a restart closes it too. A stray part
        beside a position the strategy meant is only alerted (``_overclosed``)."""
        now = self._now()
        for k, stray in list(self._stray.items()):
            sid, key = k
            pos = self.positions.get(k)
            if pos is None or pos.quantity != stray:
                continue
            last = self._stray_jobs.get(k)
            if last is not None and (last[0] in self._active_jobs or (
                    stray == last[1] and now - last[2] < STRAY_RETRY_NS)):  # fmt: skip
                continue
            tick = self.last.get(key)
            if tick is None or not tick.ltp > 0:
                continue  # a close cannot be priced yet (a restart): at the first tick
            products = pos.by_product or {"MIS": pos.quantity}
            if self._flattening(sid, key) or any(self._close_working(sid, key, p) for p in products):
                continue
            n = self._stray_rounds.get(k, 0)
            while True:  # a round id no close in the ledger has (a restart within the same instant)
                n += 1
                rid = f"overclosed:{self.day}:{self._started_ns}:{sid}:{key}:{n}"
                if f"flatten:{rid}:{sid}:{key}" not in self.by_request:
                    break
            self._stray_rounds[k] = n
            self._stray_jobs[k] = (rid, stray, now)
            if self.log is not None:
                self.log.warning("overclosed_closed", strategy_id=sid, instrument=key, held=stray, round=n)
            self.flatten(Flatten(request_id=rid, symbol=key, strategy_id=sid, source="execution"),
                         lambda _report: None)  # fmt: skip

    def _close_unprotected(self) -> None:
        """Positions whose stop the broker rejected are closed: a flatten of the bracket's
        strategy and instrument (cancel its target and orders there, confirm, then close),
        which a restart resumes like any flatten (``_resume_flattens``)."""
        owed, self._unprotected = self._unprotected, {}
        for bid, why in owed.items():
            b = self.brackets.get(bid)
            if b is None or b.state not in BRACKET_OPEN:
                continue
            key = instrument_key(b.segment, b.token)
            pos = self.positions.get((b.strategy_id, key))
            held = pos.quantity if pos is not None else 0
            if not ((b.side == "BUY" and held > 0) or (b.side == "SELL" and held < 0)):
                continue  # nothing of it is held (yet): the entry's fill syncs the bracket again
            hedged = self._hedges_a_short(b)
            if hedged:
                self.alert("CRITICAL", f"{b.symbol} ({b.strategy_id}, {held:+d}) has no stop (rejected: "
                           f"{why}) but is not closed: it hedges {hedged}, which closing it would leave "
                           "naked; close the basket, or set a stop by hand", "unprotected_kept")  # fmt: skip
                continue
            last = self.last.get(key)
            if last is None or not last.ltp > 0:
                # a close cannot be priced yet: nothing is cancelled until it can (the target
                # keeps working); tried again at every flush, so at the first tick
                if bid not in self._unpriced:
                    self._unpriced.add(bid)
                    self.alert("CRITICAL", f"{b.symbol} ({b.strategy_id}, {held:+d}) has no stop (rejected: "
                               f"{why}) and no price yet to close it at: it is closed at its first tick",
                               "unprotected_unpriced")  # fmt: skip
                self._unprotected[bid] = why
                continue
            self._unpriced.discard(bid)
            if self.log is not None:
                self.log.warning("unprotected_closed", symbol=b.symbol, strategy_id=b.strategy_id,
                                 held=held, reason=why)  # fmt: skip
            req = Flatten(request_id=f"{bid}:stop-rejected", symbol=key, strategy_id=b.strategy_id,
                          source="execution")  # fmt: skip
            self.flatten(req, lambda _report: None)

    def square_off_if_due(self) -> None:
        """From ``execution.square_off_at`` (IST) on the trading day: working orders in the
        square-off products that could add exposure are cancelled, and each strategy's
        position in them is closed by its own flatten (strategy, instrument, product), started
        again whenever such a position is held and no square-off of it is running (a late
        fill, a restart after the time). Each one is announced and written to risk_events."""
        at = self._square_off_ns
        if at < 0:
            return
        if at == 0 or self._square_day != self.day:
            at = self._square_off_ns = self._square_off_time()
            self._square_day = self.day
            if at < 0:
                return
        now = self._now()
        if now < at:
            return
        products = self._square_products
        for o in list(self.working.values()):
            if (o.product in products and not o.terminal and not o.sliced and not o.cancel_requested
                    and self._can_add_exposure(o)):  # fmt: skip
                self._request_cancel(o, f"square-off at {self.cfg.square_off_at}")
        for (sid, key), pos in list(self.positions.items()):
            if pos.quantity == 0:
                continue
            by_product = pos.by_product or {"MIS": pos.quantity}
            for product in products:
                held = by_product.get(product, 0)
                k = (sid, key, product)
                last = self._square_jobs.get(k)
                if not held or (last is not None and (last[0] in self._active_jobs or (
                        held == last[1] and now - last[2] < SQUARE_OFF_RETRY_NS))):  # fmt: skip
                    continue  # running, or its close still works / could not be placed: not again yet
                if self._close_working(sid, key, product):
                    continue  # a close of it is working (an earlier round's, resting): let it fill
                n = self._square_rounds.get(k, 0) + 1
                self._square_rounds[k] = n
                rid = f"squareoff:{self.day}:{self._started_ns}:{sid}:{key}:{product}:{n}"
                self._square_jobs[k] = (rid, held, now)
                why = ""
                if n > 1:
                    again = last is not None and held == last[1]
                    why = f", round {n} " + ("(its last close did not take it off)" if again
                                             else "(a fill after the square-off)")  # fmt: skip
                text = (f"square-off at {self.cfg.square_off_at}: closing {product} {pos.symbol} {held:+d} "
                        f"({sid}){why}")
                self.alert("WARNING", text, "square_off")
                data = {"strategy_id": sid, "instrument": key, "product": product, "quantity": held,
                        "round": n}  # fmt: skip
                self._risk.append(RiskEventRow(event=RiskEvent.SQUARE_OFF, reason=text, source="execution",
                                               ts_ns=now, trading_day=self.day, request_id=rid,
                                               data=data))  # fmt: skip
                self.flatten(Flatten(request_id=rid, symbol=key, strategy_id=sid, product=product,
                                     source="execution"), lambda _report: None)  # fmt: skip

    def keep_stopped_flat(self) -> None:
        """A strategy risk stopped for the day (``max_loss``/``target_profit``) holds nothing:
        risk's own flatten closes what it held at the stop; what it holds later — a fill that
        came after that flatten, a flatten risk could not deliver, one cut short by a restart —
        is closed here by a flatten of its own (strategy, instrument), once no flatten of it is
        running and no close of it works, at most every 30 s while the position is unchanged.
        Risk's flatten is given ``STOPPED_GRACE_NS`` after the record to arrive first."""
        if not self.stopped:
            return
        now = self._now()
        for (sid, key), pos in list(self.positions.items()):
            since = self.stopped.get(sid)
            if since is None or pos.quantity == 0 or now - since < STOPPED_GRACE_NS:
                continue
            k = (sid, key)
            last = self._stop_jobs.get(k)
            if last is not None and (last[0] in self._active_jobs or (
                    pos.quantity == last[1] and now - last[2] < SQUARE_OFF_RETRY_NS)):  # fmt: skip
                continue
            products = pos.by_product or {"MIS": pos.quantity}
            if self._flattening(sid, key) or any(self._close_working(sid, key, p) for p in products):
                continue
            n = self._stop_rounds.get(k, 0) + 1
            self._stop_rounds[k] = n
            rid = f"stopped:{self.day}:{self._started_ns}:{sid}:{key}:{n}"
            self._stop_jobs[k] = (rid, pos.quantity, now)
            self.alert("WARNING", f"strategy {sid} is stopped for the day but holds {pos.symbol} "
                       f"{pos.quantity:+d}: closing it", "stopped_position_closed")  # fmt: skip
            self.flatten(Flatten(request_id=rid, symbol=key, strategy_id=sid, source="execution"),
                         lambda _report: None)  # fmt: skip

    def _flattening(self, strategy_id: str, key: str) -> bool:
        """A flatten that covers this strategy and instrument is still at work."""
        for rid in self._active_jobs:
            job = self.flatten_jobs.get(rid)
            if job is None or (job.phase == FlattenPhase.DONE and not job.unconfirmed):
                continue
            req = job.request
            if self._matches(strategy_id, key, req, self._match_symbol(req.symbol) if req.symbol else None):
                return True
        return False

    def _close_working(self, strategy_id: str, key: str, product: str) -> bool:
        """A flatten close of this strategy, instrument and product is still working."""
        return any(o.purpose == FLATTEN_P and o.strategy_id == strategy_id and o.key == key
                   and o.product == product and not o.terminal and o.unsettled_qty
                   for o in self.working.values())  # fmt: skip

    def _square_off_time(self) -> int:
        """Today's square-off instant (ns), or -1 when it is off."""
        minutes = hhmm_minutes(self.cfg.square_off_at) if self.cfg.square_off_at else None
        if minutes is None:
            return -1
        day = dt.date.fromisoformat(self.day)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=IST)
        return int((start + dt.timedelta(minutes=minutes)).timestamp()) * 1_000_000_000

    def _hedges_a_short(self, b: BracketRow) -> str:
        """The short legs a BUY bracket's entry hedges as a leg of the same basket ("" if
        none): selling the hedge would leave them naked."""
        entry = self.orders.get(b.entry_id)
        if b.side != "BUY" or entry is None:
            return ""
        rid = basket_of_leg(entry.request_id)
        if not rid:
            return ""
        shorts = []
        for i in range(1, BASKET_MAX_LEGS + 1):
            o = self.orders.get(self.by_request.get(basket_leg_id(rid, i), ""))
            if o is not None and o.side == "SELL" and (o.filled_qty or not o.terminal):
                shorts.append(f"leg {i} SELL {o.quantity} {o.symbol}")
        return f"basket {rid}'s " + ", ".join(shorts) if shorts else ""

    def _resume_flattens(self) -> None:
        """A bracket a flatten took over (``FLATTENED``) whose flatten is not in this process (it
        lived only in the memory of one that stopped) while its strategy still holds the position:
        its owed cancels would remove the stop and nothing would close the position. Resume that
        flatten for the instrument and strategy (the same cancel-confirm-close path) and say so."""
        for b in list(self.brackets.values()):
            rid = b.reason.removeprefix("flatten ") if b.state == B_FLATTENED else ""
            if not rid or rid == b.reason or rid in self.flatten_jobs:
                continue
            pos = self.positions.get((b.strategy_id, instrument_key(b.segment, b.token)))
            held = pos.quantity if pos is not None else 0
            if not ((b.side == "BUY" and held > 0) or (b.side == "SELL" and held < 0)):
                continue
            again = f"{rid}:r"  # a new request id: the closes of the first one may be in the ledger
            b.reason, b.updated_ns = f"flatten {again}", self._now()
            self._bdirty[b.bracket_id] = b  # a restart during this one resumes it again
            self.alert(
                "CRITICAL",
                f"{b.symbol} ({b.strategy_id}, {held:+d}) was being flattened ({rid}) when execution "
                "restarted, and is still held: that flatten is resumed (its stop and target are "
                "cancelled, then the position is closed) — check the position at the broker",
                "flatten_resumed",
            )
            req = Flatten(request_id=again, symbol=instrument_key(b.segment, b.token),
                          strategy_id=b.strategy_id, source="execution")  # fmt: skip
            self.flatten(req, lambda _report: None)

    def _match_symbol(self, symbol: str) -> str | None:
        try:
            return self.master.resolve(symbol).key
        except KeyError:
            return None

    @staticmethod
    def _matches(strategy_id: str, key: str, req: Flatten, match_key: str | None,
                 product: str = "") -> bool:  # fmt: skip
        if req.strategy_id and strategy_id != req.strategy_id:
            return False
        if req.product and product and product != req.product:
            return False
        return not (req.symbol and key != match_key)

    def _flatten_close(self, job: FlattenJob) -> None:
        """Close what is held, less what working orders on the closing side (still waiting for
        a cancel the broker has not confirmed, or this job's own earlier closes) may still
        take off: never sell what an unconfirmed stop might also sell."""
        job.phase = FlattenPhase.CLOSE
        job.rounds += 1
        req = job.request
        match_key = self._match_symbol(req.symbol) if req.symbol else None
        now = self._now()
        for (sid, key), pos in sorted(self.positions.items()):
            if pos.quantity == 0 or not self._matches(sid, key, req, match_key):
                continue
            if req.symbol and match_key is None:
                continue
            if req.product and not (pos.by_product or {"MIS": pos.quantity}).get(req.product):
                continue  # nothing held in that product
            inst = self.master.get(pos.segment, pos.token)
            last = self.last.get(key)
            if inst is None or inst.tick_size <= 0:
                job.skipped.append(
                    {"symbol": pos.symbol, "reason": "tick size unknown: cannot price the close"}
                )
                continue
            if last is None or last.ltp <= 0:
                job.skipped.append({"symbol": pos.symbol, "reason": "no last price: cannot price the close"})
                continue
            by_product = pos.by_product or {"MIS": pos.quantity}
            for product, held in sorted(by_product.items()):
                if not held or (req.product and product != req.product):
                    continue
                side = "SELL" if held > 0 else "BUY"
                qty = abs(held) - self._closing_qty(sid, key, product, side)
                if qty <= 0:
                    continue
                price = protected_limit(side, last.ltp, self.protection_pct, inst.tick_size)
                rid = f"flatten:{req.request_id}:{sid}:{key}"
                if len(by_product) > 1:
                    rid += f":{product}"
                if job.rounds > 1:
                    rid += f":{job.rounds}"
                row = OrderRow(
                    order_id=new_id(),
                    request_id=rid,
                    client_tag=self._tag(),
                    strategy_id=sid,
                    segment=pos.segment,
                    token=pos.token,
                    symbol=pos.symbol,
                    side=side,
                    order_type="LIMIT",
                    product=product,
                    quantity=qty,
                    price=price,
                    status=PENDING_BROKER,
                    trading_day=self.day,
                    created_ns=now,
                    updated_ns=now,
                    purpose=FLATTEN_P,
                    broker=self.broker_name,
                )
                if self.request_known(row.request_id):  # (settled: the ledger says)
                    continue
                self._add(row, "PENDING", {"flatten": req.request_id, "position": held, "product": product})
                kids = self._slice_and_place(row, inst)
                job.closing.append(row.order_id)
                for x in kids or [row]:
                    job.pending_places.add(x.order_id)
        self._advance_job(job)

    def _closing_qty(self, strategy_id: str, key: str, product: str, side: str) -> int:
        """What working orders of this strategy, instrument and product on ``side`` may still
        move the position by (their open rest, or trades a final status announced that are
        still on their way); the two legs of one bracket protect the same shares (OCO), so
        count once."""
        total, per_bracket = 0, dict[tuple[str, str], int]()
        for o in self.working.values():
            if (
                o.terminal or o.sliced or o.side != side or o.strategy_id != strategy_id
                or o.product != product or o.key != key or not o.unsettled_qty
            ):  # fmt: skip
                continue
            if o.bracket_id and o.purpose in _LEGS:
                leg = (o.bracket_id, o.purpose)
                per_bracket[leg] = per_bracket.get(leg, 0) + o.unsettled_qty
            else:
                total += o.unsettled_qty
        legs: dict[str, int] = {}
        for (bid, _kind), q in per_bracket.items():
            legs[bid] = max(legs.get(bid, 0), q)
        return total + sum(legs.values())

    def _unconfirmed(self, order_id: str) -> dict[str, Any]:
        o = self.orders[order_id]
        return {"order_id": o.order_id, "symbol": o.symbol, "side": o.side, "purpose": o.purpose,
                "status": o.status, "remaining": o.remaining}  # fmt: skip

    def _advance_job(self, job: FlattenJob) -> None:
        if job.phase == FlattenPhase.CANCEL:
            job.waiting = {oid for oid in job.waiting if oid in self.orders and not self.orders[oid].terminal}
            if job.waiting and self._now() < job.deadline_ns:
                return
            if job.waiting:
                job.unconfirmed = sorted(job.waiting)
                self.alert(
                    "WARNING",
                    f"flatten {job.request.request_id}: {len(job.waiting)} order(s) still working at the "
                    f"broker after {FLATTEN_CANCEL_WAIT_S:.0f} s (cancel not confirmed); closing the "
                    "positions as they stand — check those orders",
                    "flatten_unconfirmed",
                )
            self._flatten_close(job)
        if job.phase == FlattenPhase.CLOSE and not any(oid in self.inflight for oid in job.pending_places):
            job.phase = FlattenPhase.READY
        if job.phase in (FlattenPhase.READY, FlattenPhase.DONE) and job.unconfirmed:
            # answered already; an order that was still working has ended since: close what
            # it did not take off
            still = [x for x in job.unconfirmed if x in self.orders and not self.orders[x].terminal]
            if len(still) != len(job.unconfirmed):
                job.unconfirmed = still
                self._flatten_close(job)

    def _advance_jobs(self) -> None:
        """Move every flatten on: cancels confirmed (or waited out), closes answered, and the
        follow-up closes of a flatten that had to go ahead with orders still working."""
        for rid in list(self._active_jobs):
            job = self.flatten_jobs.get(rid)
            if job is None or (job.phase == FlattenPhase.DONE and not job.unconfirmed):
                self._active_jobs.discard(rid)
                continue
            self._advance_job(job)

    def finish_jobs(self) -> None:
        """Answer flatten requests whose orders are all placed (after the pump settled)."""
        for job in self.flatten_jobs.values():
            if job.phase != FlattenPhase.READY:
                continue
            job.phase = FlattenPhase.DONE
            closing = []
            for oid in job.closing:
                o = self.orders.get(oid)
                if o is not None:
                    closing.append(
                        {
                            "order_id": o.order_id,
                            "symbol": o.symbol,
                            "strategy_id": o.strategy_id,
                            "side": o.side,
                            "quantity": o.quantity,
                            "price": str(o.price),
                            "status": o.status,
                            "filled_qty": o.filled_qty,
                            "reason": o.reason,
                        }
                    )
            req = job.request
            left = [
                p
                for (sid, key), p in self.positions.items()
                if p.quantity != 0
                and self._matches(sid, key, req, self._match_symbol(req.symbol) if req.symbol else None)
                and (not req.product or (p.by_product or {"MIS": p.quantity}).get(req.product))
            ]
            job.report = {
                "request_id": req.request_id,
                "cancelled": len(job.cancelled),
                "cancelled_ids": job.cancelled,
                "unconfirmed": [self._unconfirmed(x) for x in job.unconfirmed if x in self.orders],
                "closing": closing,
                "skipped": job.skipped,
                "open_positions": [
                    {"strategy_id": p.strategy_id, "symbol": p.symbol, "quantity": p.quantity} for p in left
                ],
            }
            for w in job.waiters:
                w(job.report)
            job.waiters = []
        if len(self.flatten_jobs) > 100:  # keep recent reports for idempotent retries
            for rid in [r for r, j in self.flatten_jobs.items() if j.phase == FlattenPhase.DONE][:-50]:
                del self.flatten_jobs[rid]
