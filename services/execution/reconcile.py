"""Reconciliation against the broker's books, and the positions it carries from earlier days."""

from __future__ import annotations

from typing import Any

from libs.common.instruments import instrument_key, split_key
from libs.common.messages import (
    ACK,
    CANCELLED,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    UNKNOWN,
)
from libs.common.positions import PositionState
from services.execution.base import (
    _LEGS,
    _ZERO,
    CARRIED,
    LOST_CLOSE_S,
    MISSING_RECHECK_NS,
    MISSING_SNAPSHOTS,
    QTY_MAX,
    _topic,
)
from services.execution.brokers.base import (
    BrokerOrderStatus,
    BrokerPosition,
    BrokerTrade,
    error_reason,
)
from services.execution.flatten import Flattening
from services.execution.intents import (
    BooksIntent,
    PositionsIntent,
)
from services.execution.model import (
    BRACKET_OPEN,
    TERMINAL,
    OrderRow,
    tag_key,
)

_BOOK_DONE = TERMINAL


class Reconciliation(Flattening):
    """Reconciliation against the broker's books, and the positions it carries from earlier days."""

    def request_reconcile(self, reason: str = "periodic") -> bool:
        """Queue a fetch of the broker's books (skipped while one is outstanding)."""
        if self._books_pending:
            return False
        self._books_pending = True
        self.reconcile_due_ns = 0
        if self.recon.carried_retry:
            self.recon.carried_retry = False
            self._held_intents.append(PositionsIntent(self._now()))
        self._held_intents.append(BooksIntent(self._now(), reason))
        return True

    def reconcile_if_due(self) -> None:
        """Periodic (the service calls it every 0.25 s): reconciliation when due, owed cancels
        and leg re-places whose backoff passed, flattens waiting on confirmations."""
        if self.reconcile_due_ns and self._now() >= self.reconcile_due_ns:
            self.request_reconcile("due")
        self._retry_owed()
        self.square_off_if_due()
        self.keep_stopped_flat()
        if self._active_jobs:
            self._advance_jobs()

    def on_books(
        self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade], started_ns: int
    ) -> None:
        """Match every non-terminal row and open bracket against the broker's books by tag.

        One snapshot is never trusted to close an order: a book that lags or answers "No Data"
        would otherwise close live orders and have fresh legs placed beside the old ones. The
        broker's day book keeps every order it acknowledged today, so a book without one of
        them (or without fills the ledger holds) is not whole and closes nothing; only an
        order missing from a book that shows others for ``LOST_CLOSE_S`` is taken as gone.
        From whole books, a row never acknowledged or an order of an earlier day is closed
        after ``MISSING_SNAPSHOTS`` consecutive books over ``book_lag_s`` without it. A row
        the ledger calls terminal that the broker shows working is adopted back, with a
        CRITICAL alert."""
        self.stats["reconciles"] += 1
        by_id = {s.broker_order_id: s for s in order_book if s.broker_order_id}
        by_tag = {tag_key(s.client_tag): s for s in order_book if s.client_tag}
        traded = self._apply_book_rows(order_book, trade_book, started_ns)
        cutoff = started_ns - self.book_lag_ns
        absent: list[OrderRow] = []
        lost: list[OrderRow] = []  # today's acknowledged orders the book does not show
        for o in list(self.working.values()):
            if o.terminal or o.sliced:  # (closed by an earlier row of this loop)
                continue
            found = by_id.get(o.broker_order_id) if o.broker_order_id else None
            if found is None and not o.broker_order_id:  # once acknowledged: its number (Kotak rewrites tags)
                found = by_tag.get(tag_key(o.client_tag))
            if found is not None:
                o.missing = 0
                self._on_status(found, o)
                if o.broker_final and not o.terminal:
                    self._alert_awaiting(o, started_ns)
                continue
            if o.order_id in self.inflight or o.created_ns > cutoff:
                continue
            acked = o.status not in (PENDING_BROKER, UNKNOWN)
            if (acked and o.trading_day == self.day) or (
                o.filled_qty and o.trading_day == self.day and o.order_id not in traded
            ):
                lost.append(o)
            else:
                absent.append(o)
        if lost and order_book:
            lost = [o for o in lost if not self._gone_for_good(o, started_ns)]
        if lost:
            # The broker's day book keeps every order it acknowledged today, filled or not, and
            # its trade book every trade: a snapshot without one of them is not whole ("No
            # Data", a lagging replica). Nothing is closed from it.
            self._book_incomplete(lost, started_ns)
            self._after_books(order_book, trade_book)
            return
        self.recon.incomplete_since_ns = 0
        if order_book:  # whole, and not "No Data": evidence that lets settled groups leave memory
            self._books_seen_ns = max(self._books_seen_ns, started_ns)
            self._book_done = {s.broker_order_id for s in order_book if s.broker_order_id
                               and s.status.upper() in _BOOK_DONE}  # fmt: skip
        for o in absent:  # never acknowledged, or of an earlier day (expired overnight)
            self._count_absent(o, started_ns)
        self._after_books(order_book, trade_book)

    def _apply_book_rows(
        self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade], started_ns: int
    ) -> set[str]:
        """Orphans, adoptions and the trade book's fills; returns the orders with a trade in it."""
        for st in order_book:
            o = self._find(st.broker_order_id, st.client_tag)
            if o is None:
                group = self._settled_id(st.broker_order_id, st.client_tag)
                if group < 0:
                    self._orphan(st.broker_order_id, st.client_tag)
                    continue
                if st.status.upper() not in (ACK, OPEN, PARTIAL):
                    continue  # a settled order shown closed: as known
                # settled, yet working at the broker: its group comes back, to be adopted below
                o = self._load_settled(group, st.broker_order_id, st.client_tag)
                if o is None:
                    continue
            if (
                o.terminal
                and not o.sliced
                and st.status.upper() in (ACK, OPEN, PARTIAL)
                and o.updated_ns < started_ns  # closed before this snapshot was asked for
                and o.filled_qty < o.quantity  # all its trades are in: a stale row, not a live order
            ):
                if started_ns - o.updated_ns >= self.book_lag_ns:
                    self._adopt(o, st)
                else:
                    # Asked for within book_lag of the close: a replica behind the order feed
                    # shows what the broker said before. Adopting it would cancel the live
                    # replacement (a stop, say) for a dead one: look again once the lag is over.
                    again = o.updated_ns + self.book_lag_ns + 1
                    self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, max(again, self._now() + 1))
        traded: set[str] = set()
        for tr in trade_book:
            o = self._find(tr.broker_order_id, tr.client_tag)
            if o is None:
                group = self._settled_id(tr.broker_order_id, tr.client_tag)
                if group < 0:
                    self._orphan(tr.broker_order_id, tr.client_tag)
                    continue
                if self._fill_known(tr, group):
                    continue
                o = self._load_settled(group, tr.broker_order_id, tr.client_tag)  # a late trade
                if o is None:
                    continue
            traded.add(o.order_id)
            self._on_trade(tr, o)
        return traded

    def _count_absent(self, o: OrderRow, started_ns: int) -> None:
        o.missing += 1
        if o.missing == 1:
            o.missing_since_ns = started_ns
        if o.missing < MISSING_SNAPSHOTS or started_ns - o.missing_since_ns < self.book_lag_ns:
            # look again soon: an order that is really gone is closed within about book_lag
            again = o.missing_since_ns + max(self.book_lag_ns, MISSING_RECHECK_NS)
            self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, max(again, self._now() + 1))
            return
        self._close_missing(o)

    def _after_books(self, order_book: list[BrokerOrderStatus], trade_book: list[BrokerTrade]) -> None:
        self._resume_flattens()  # a flatten that stopped with its process: not left half done
        for b in list(self.brackets.values()):
            if b.state in BRACKET_OPEN or self._has_working_leg(b):
                self._sync_bracket(b)
        if self.log is not None:
            self.log.info(
                "reconciled",
                broker_orders=len(order_book),
                broker_trades=len(trade_book),
                open_orders=self.open_count(),
            )

    def _gone_for_good(self, o: OrderRow, started_ns: int) -> bool:
        """An acknowledged order of today that the broker's book, while it shows other orders,
        has not shown for ``LOST_CLOSE_S`` (at least ten book lags): the book is working and
        this order is gone. It is closed with a CRITICAL alert, so one vanished order cannot
        stop reconciliation for the rest of the day."""
        if not o.missing:
            o.missing_since_ns = started_ns
        o.missing += 1
        if started_ns - o.missing_since_ns < max(10 * self.book_lag_ns, int(LOST_CLOSE_S * 1e9)):
            return False
        self.alert(
            "CRITICAL",
            f"{o.purpose.lower()} order {o.client_tag} ({o.side} {o.remaining} {o.symbol}) has been missing "
            f"from the broker's order book for {(started_ns - o.missing_since_ns) / 1e9:.0f} s while it "
            "showed other orders: closed as gone — check it at the broker",
            "order_vanished",
        )
        self._close_missing(o)
        return True

    def _book_incomplete(self, lost: list[OrderRow], started_ns: int) -> None:
        if not self.recon.incomplete_since_ns:
            self.recon.incomplete_since_ns = started_ns
            self.recon.incomplete_alerted = False
        self.reconcile_due_ns = min(self.reconcile_due_ns or 1 << 62, self._now() + MISSING_RECHECK_NS * 5)
        if self.log is not None:
            self.log.warning("broker_book_incomplete", missing=len(lost),
                             client_tags=[o.client_tag for o in lost[:10]])  # fmt: skip
        if self.recon.incomplete_alerted or started_ns - self.recon.incomplete_since_ns < max(
            self.book_lag_ns, 60_000_000_000
        ):
            return
        self.recon.incomplete_alerted = True
        names = ", ".join(
            f"{o.purpose.lower()} {o.side} {o.remaining} {o.symbol} ({o.client_tag})" for o in lost[:5]
        )
        self.alert(
            "CRITICAL",
            f"the broker's order book has not shown {len(lost)} of today's acknowledged orders for "
            f"{(started_ns - self.recon.incomplete_since_ns) / 1e9:.0f} s ({names}); nothing is closed from "
            "it — check them at the broker: a stop that is really gone leaves its position unprotected",
            "book_incomplete",
        )

    def _close_missing(self, o: OrderRow) -> None:
        """Consecutive books over ``book_lag_s`` agree the order is not at the broker."""
        if o.status in (PENDING_BROKER, UNKNOWN):
            if o.purpose in _LEGS and o.bracket_id:
                self._leg_not_placed(o, "never reached the broker")
                key = (o.bracket_id, o.purpose)
                self.leg_retry[key] = (self.leg_retry[key][0], self._now())  # place it again now
            self._transition(
                o,
                REJECTED,
                "RECONCILED",
                {"found": False, "snapshots": o.missing},
                "never reached the broker (not in its order book); not re-sent",
            )
            self.alert(
                "WARNING",
                f"order {o.client_tag} ({o.side} {o.quantity} {o.symbol}) never reached the "
                "broker; marked REJECTED, not re-sent",
                "order_not_sent",
            )
        else:
            self._transition(
                o,
                CANCELLED,
                "RECONCILED",
                {"found": False, "snapshots": o.missing},
                "no longer in the broker's order book (expired)",
            )

    def _adopt(self, o: OrderRow, st: BrokerOrderStatus) -> None:
        """The ledger closed ``o`` but the broker shows it working: take it back as working so
        its fills count, its bracket sees it and a cancel can reach it."""
        old = o.status
        o.status = PARTIAL if o.filled_qty else OPEN
        self.working[o.order_id] = o
        o.broker_final = ""
        o.missing = 0
        o.updated_ns = self._now()
        self.stats["adopted"] += 1
        if o.bracket_id and o.purpose in _LEGS:  # it protects after all: the bracket may size on it
            self.leg_failed.discard((o.bracket_id, o.purpose))
        self._mark(o)
        self._event(o, "ADOPTED", old, {"broker_status": st.status, "raw": st.raw})
        self._publish_order(o)
        if o.cancel_requested:
            self.owed_cancels.add(o.order_id)
            self._pay_cancel(o)
        self.alert(
            "CRITICAL",
            f"order {o.client_tag} ({o.purpose.lower()} {o.side} {o.quantity} {o.symbol}) was {old} in the "
            f"ledger but is working at the broker: adopted back as {o.status}",
            "order_adopted",
        )

    def _alert_awaiting(self, o: OrderRow, started_ns: int) -> None:
        if o.order_id in self._awaiting_alerted:
            return
        if started_ns - o.awaiting_since_ns < max(self.book_lag_ns, 60_000_000_000):
            return
        self._awaiting_alerted.add(o.order_id)
        self.alert(
            "CRITICAL",
            f"the broker reports order {o.client_tag} ({o.side} {o.symbol}) {o.broker_final} with "
            f"{o.broker_filled} traded, but its trade book shows {o.filled_qty}: the position counts "
            "only traded shares — check the broker's trade book",
            "fills_missing",
        )

    def _load_carries(self) -> None:
        """Each strategy's NRML/CNC net from the ledger's fills of earlier days: what it
        carries into today, so its position (and the legs sized to it) outlives midnight."""
        for c in self.store.carried_nets(self.day):
            k = (c.strategy_id, instrument_key(c.segment, c.token))
            pos = self.positions.get(k)
            if pos is None:
                pos = self.positions[k] = PositionState(c.strategy_id, c.segment, c.token, c.symbol)
            pos.carry(c.product, c.quantity, c.avg_price)

    def _on_carried(self, result: Any) -> None:
        """The broker's carried positions (NRML/CNC from earlier days) are the truth for the
        account; the ledger says which strategy holds them. What the ledger cannot attribute
        is held under the strategy id ``carried``, so risk limits, ``neopulse positions`` and
        flatten see it. When the ledger claims more than the broker carries (closed outside
        NeoPulse, a delivery settled), the broker's figure goes to ``carried`` and the
        strategies' carries are dropped, with a warning."""
        if isinstance(result, BaseException) or not isinstance(result, list):
            why = error_reason(result)
            self.recon.carried_retry = True  # asked again with the next reconciliation
            self.alert(
                "WARNING", f"carried positions could not be read from the broker: {why}", "carried_unread"
            )
            return
        self.recon.carried_retry = False
        broker: dict[tuple[str, str], BrokerPosition] = {}
        for cp in result:
            if isinstance(cp, BrokerPosition) and abs(cp.quantity) <= QTY_MAX:
                broker[(instrument_key(cp.segment, cp.token), cp.product)] = cp
        ledger: dict[tuple[str, str], int] = {}
        for (sid, key), pos in self.positions.items():
            if sid != CARRIED:
                for product, q in pos.carried.items():
                    ledger[(key, product)] = ledger.get((key, product), 0) + q
        for key, product in sorted(set(broker) | set(ledger)):
            cp = broker.get((key, product))
            held, known = (cp.quantity if cp is not None else 0), ledger.get((key, product), 0)
            if known and ((held > 0) != (known > 0) or abs(held) < abs(known)):
                self._carry_mismatch(key, product, held, known)
            if cp is not None or (CARRIED, key) in self.positions or held != known:
                seg, tok = split_key(key)
                rest = self.positions.get((CARRIED, key))
                if rest is None:
                    rest = self.positions[(CARRIED, key)] = PositionState(
                        CARRIED, seg, tok, cp.symbol if cp is not None else key
                    )
                rest.carry(product, held - known, cp.avg_price if cp is not None else _ZERO)
                last = self.last.get(key)
                msg = rest.message(last.ltp if last else 0.0, self._now())
                self._held_msgs.append((_topic("position", CARRIED), msg))
        if result and self.log is not None:
            self.log.info("carried_positions", count=len(result))

    def _carry_mismatch(self, key: str, product: str, held: int, known: int) -> None:
        """The ledger's strategies carry more than the broker reports (closed outside NeoPulse,
        a settlement, or a broker read before its start-of-day roll). One reading never takes
        a strategy's carry away (its legs are sized to it): the difference is held, negative,
        under ``carried`` so the account's net matches the broker, and the positions are read
        again with the next reconciliation."""
        self.recon.carried_retry = True
        if (key, product) in self.recon.carry_alerted:
            return
        self.recon.carry_alerted.add((key, product))
        self.alert(
            "CRITICAL",
            f"the broker carries {held:+d} {key} {product} into today but the ledger's strategies carry "
            f"{known:+d}: the difference is held as 'carried' until they agree — check the account",
            "carried_mismatch",
        )
