"""``PaperBroker``: a broker that fills against the live ticks, with a book that survives kill -9.

Fill rules
----------
* A LIMIT order that is marketable when it arrives (BUY limit ≥ ask, SELL limit ≤ bid; the
  last price when the touch is unknown) takes liquidity: it fills at the touch plus
  ``slippage_bps`` against the trader, snapped to tick, but never beyond its limit. Market
  intent reaches the broker as exactly such a protected limit.
* A resting LIMIT fills at its own price when a later tick crosses it.
* A stop-limit (``SL``) waits for its trigger (BUY: last ≥ trigger, SELL: last ≤ trigger),
  then behaves like a LIMIT that just arrived.
* With ``partial_fills`` a fill takes at most the quantity shown at the touch.
* With ``capital`` (``paper.capital`` in the service) an order whose margin is more than the
  account has free is rejected, as a real broker's RMS would (``paper_margin``): a basket's
  short legs can be refused after its long legs filled.

The book (orders, trades, cancels, modifications) is an append-only JSON-lines journal,
written before each call returns, so a restarted execution reconciles against it exactly
as against a real broker's order book and trade book. Like a real broker's, the books
hold today's orders only: open orders of earlier days have expired. Positions in NRML and
CNC are carried: when the journal is compacted at the start of a day, the net of earlier
days' trades in those products is written as ``carry`` records, and ``carried_positions()``
reports them as a real broker's positions call would.

Memory stays bounded over a day: an order that finished (filled or cancelled) more than
``SETTLED_AFTER_S`` ago leaves the in-memory books with its trades; the journal keeps it, and
execution, which settles its own rows sooner, never asks about it again.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from libs.common.clock import Clock, trading_day
from libs.common.instruments import MasterData, instrument_key
from libs.common.messages import Tick
from libs.common.money import MoneyError, snap
from services.execution.brokers.base import (
    BrokerAck,
    BrokerOrder,
    BrokerOrderStatus,
    BrokerPosition,
    BrokerRejected,
    BrokerTrade,
)
from services.execution.brokers.paper_margin import Margin

_OPEN, _PARTIAL, _COMPLETE, _CANCELLED = "OPEN", "PARTIAL", "COMPLETE", "CANCELLED"
_DONE = frozenset({_COMPLETE, _CANCELLED, "REJECTED"})
_CARRIED_PRODUCTS = frozenset({"NRML", "CNC"})  # MIS is squared off the same day
SETTLED_AFTER_S = 600.0  # a finished order leaves memory this long after it finished (twice execution's)
BrokerEvent = BrokerOrderStatus | BrokerTrade


@dataclass(slots=True)
class PaperOrder:
    oid: str
    tag: str
    segment: str
    token: str
    symbol: str
    side: str
    quantity: int
    price: Decimal
    order_type: str
    trigger: Decimal | None
    product: str
    day: str
    ts_ns: int
    fprice: float = 0.0
    ftrigger: float = 0.0
    triggered: bool = False
    filled: int = 0
    value: Decimal = Decimal(0)
    status: str = _OPEN
    reason: str = ""
    margin: float = 0.0  # reserved for its unfilled opening part

    @property
    def key(self) -> str:
        return f"{self.segment}|{self.token}"  # instrument_key, inlined: hot path


class PaperBroker:
    """Implements ``brokers.base.Broker``. Calls are fast and local: execution runs them inline."""

    name = "paper"
    inline = True  # execution calls it on the loop, no thread pool
    book_lag_s = 0.0  # its books are exact at once: absence means the order never arrived

    def __init__(
        self,
        master: MasterData,
        clock: Clock | None = None,
        *,
        slippage_bps: float = 2.0,
        journal: Path | None = None,
        partial_fills: bool = False,
        log: Any = None,
        capital: float | None = None,
    ) -> None:
        self.master = master
        self.clock = clock or Clock()
        self.slip = Decimal(str(slippage_bps)) / Decimal(10_000)
        self.partial_fills = partial_fills
        self.log = log
        self.orders: dict[str, PaperOrder] = {}
        self.trades: dict[str, BrokerTrade] = {}  # trade id → trade, in the order they traded
        self._order_trades: dict[str, list[str]] = {}  # broker order id → its trade ids
        self._finished: deque[tuple[int, str]] = deque()  # (when it finished, broker order id)
        self.resting: dict[str, list[PaperOrder]] = {}
        # per instrument with resting orders: the prices a tick must reach for any of them to
        # trigger or cross (``_quiet_band``); dropped whenever that book or an order in it changes
        self._band: dict[str, tuple[float, float, float, float]] = {}
        self.last: dict[str, Tick] = {}
        self.events: list[BrokerEvent] = []
        self.places = 0
        self._seq = 0
        self._tseq = 0
        self._day = trading_day(self.clock)
        self._journal_path = journal
        # (segment, token, product) → [symbol, signed quantity, average price]
        self.carried: dict[tuple[str, str, str], list[Any]] = {}
        self._fh: Any = None
        self.capital = capital
        self.margin = Margin(capital) if capital is not None else None
        self._carry_marked = False  # the carried positions are in ``margin``
        if journal is not None:
            self._load(journal)

    # ------------------------------------------------------------------ journal
    def _load(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        stale = False
        old_places: dict[str, dict[str, Any]] = {}
        if path.exists():
            with path.open("r", encoding="utf-8") as fh:
                for raw_line in fh:
                    line = raw_line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        stale = True  # a torn last line after a crash: drop it
                        continue
                    if rec.get("day") != self._day:
                        stale = True
                        self._bump_seq(rec)
                        self._carry_in(rec, old_places)
                        continue
                    self._apply(rec)
                    kept.append(line)
        self._settle_expired()
        if stale:  # compact: only today's book survives, with what earlier days carried into it
            carry = [
                json.dumps(
                    {"op": "carry", "seg": k[0], "tok": k[1], "product": k[2], "sym": v[0], "qty": v[1],
                     "avg": str(v[2]), "day": self._day},
                    separators=(",", ":"),
                )
                for k, v in self.carried.items()
                if v[1]
            ]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in carry + kept), encoding="utf-8")
            tmp.replace(path)
        if not self._carry_marked:
            self._mark_carried()
        self._fh = path.open("a", encoding="utf-8")
        now = self.clock.now_ns()
        self._band = {}
        for o in self.orders.values():
            if o.status not in _DONE:
                self.resting.setdefault(o.key, []).append(o)
            else:
                self._finished.append((now, o.oid))

    def _carry_in(self, rec: dict[str, Any], places: dict[str, dict[str, Any]]) -> None:
        """Fold one record of an earlier day into the carried positions."""
        op = rec.get("op")
        if op == "place":
            places[rec["id"]] = rec
        elif op == "carry":
            self._carry_rec(rec)
        elif op == "trade":
            p = places.get(rec.get("oid", ""))
            if p is None or p.get("product", "MIS") not in _CARRIED_PRODUCTS:
                return
            key = (p["seg"], p["tok"], p["product"])
            sym, held, avg = self.carried.get(key, [p["sym"], 0, Decimal(0)])
            qty = rec["qty"] if p["side"] == "BUY" else -rec["qty"]
            price = Decimal(rec["price"])
            if held == 0 or (held > 0) == (qty > 0):  # adds: average in
                avg = (avg * abs(held) + price * abs(qty)) / (abs(held) + abs(qty))
            elif abs(qty) > abs(held):  # flips: the rest opens at this price
                avg = price
            held += qty
            self.carried[key] = [sym, held, avg if held else Decimal(0)]

    def _settle_expired(self) -> None:
        """A carried derivative whose contract has expired is settled: it is no longer held
        (nor margined), like a position the exchange closed at expiry."""
        today = dt.date.fromisoformat(self._day)
        for k in list(self.carried):
            inst = self.master.get(k[0], k[1])
            gone = inst is None and k[0].endswith("_fo")  # an earlier day's contract, no longer listed
            if gone or (inst is not None and inst.expiry is not None and inst.expiry < today):
                sym, qty, _avg = self.carried.pop(k)
                if qty and self.log is not None:
                    self.log.info("paper_carry_expired", symbol=sym, quantity=qty)

    def _carry_rec(self, rec: dict[str, Any]) -> None:
        self.carried[(rec["seg"], rec["tok"], rec["product"])] = [rec["sym"], rec["qty"], Decimal(rec["avg"])]

    def carried_positions(self) -> list[BrokerPosition]:
        """Positions carried from earlier days (NRML/CNC), as of this trading day's start. Asked
        on a new trading day while running, the journal is rolled over first: yesterday's
        orders expire and its NRML/CNC trades become today's carry, as after a restart."""
        if trading_day(self.clock) != self._day and self._journal_path is not None:
            self.close()
            self.orders, self.trades, self.resting, self.carried = {}, {}, {}, {}
            self._order_trades, self._finished = {}, deque()
            self.margin = Margin(self.capital) if self.capital is not None else None
            self._carry_marked = False
            self._day = trading_day(self.clock)
            self._load(self._journal_path)
        return [
            BrokerPosition(segment=seg, token=tok, symbol=v[0], product=prod, quantity=v[1], avg_price=v[2])
            for (seg, tok, prod), v in self.carried.items()
            if v[1]
        ]

    def _bump_seq(self, rec: dict[str, Any]) -> None:
        ident = rec.get("id", "")
        if rec.get("op") == "place":
            self._seq = max(self._seq, int(ident[-9:] or 0))
        elif rec.get("op") == "trade":
            self._tseq = max(self._tseq, int(ident[-9:] or 0))

    def _apply(self, rec: dict[str, Any]) -> None:
        op = rec["op"]
        self._bump_seq(rec)
        if op != "carry" and not self._carry_marked:
            self._mark_carried()
        if op == "place":
            o = PaperOrder(
                oid=rec["id"],
                tag=rec["tag"],
                segment=rec["seg"],
                token=rec["tok"],
                symbol=rec["sym"],
                side=rec["side"],
                quantity=rec["qty"],
                price=Decimal(rec["price"]),
                order_type=rec["otype"],
                trigger=Decimal(rec["trig"]) if rec.get("trig") else None,
                product=rec.get("product", "MIS"),
                day=rec["day"],
                ts_ns=rec["ts"],
            )
            o.fprice = float(o.price)
            o.ftrigger = float(o.trigger) if o.trigger is not None else 0.0
            self.orders[o.oid] = o
            self._reserve(o, self._need(o, o.quantity))
        elif op == "trade":
            o = self.orders[rec["oid"]]
            qty, price = rec["qty"], Decimal(rec["price"])
            self._margin_trade(o, qty, price)
            o.filled += qty
            o.value += price * qty
            o.status = _COMPLETE if o.filled >= o.quantity else _PARTIAL
            self._add_trade(
                BrokerTrade(
                    trade_id=rec["id"],
                    broker_order_id=o.oid,
                    client_tag=o.tag,
                    side=o.side,
                    quantity=qty,
                    price=price,
                    ts_ns=rec["ts"],
                )
            )
        elif op == "cancel":
            o = self.orders[rec["oid"]]
            o.status = _CANCELLED
            o.reason = rec.get("reason", "")
            self._reserve(o, 0.0)
        elif op == "trigger":
            self.orders[rec["oid"]].triggered = True
        elif op == "carry":
            self._carry_rec(rec)
        elif op == "modify":
            o = self.orders[rec["oid"]]
            o.quantity = rec["qty"]
            o.price = Decimal(rec["price"])
            o.fprice = float(o.price)
            if rec.get("trig"):
                o.trigger = Decimal(rec["trig"])
                o.ftrigger = float(o.trigger)
            self._reserve(o, 0.0)
            self._reserve(o, self._need(o, o.quantity - o.filled))

    # ------------------------------------------------------------------ margin
    def _mark_carried(self) -> None:
        """The carried positions go into the margin once, before today's first record."""
        self._carry_marked = True
        self._settle_expired()
        if self.margin is None:
            return
        for (seg, tok, prod), (_sym, qty, avg) in self.carried.items():
            if qty:
                side = "BUY" if qty > 0 else "SELL"
                self.margin.trade(self.master.get(seg, tok), f"{seg}|{tok}", side, abs(qty), price=float(avg),
                                  product=prod)  # fmt: skip

    def _need(self, o: PaperOrder, qty: int, price: float | None = None) -> float:
        """The margin ``qty`` more of ``o`` would block at ``price`` (its own by default; 0
        without a margin check)."""
        if self.margin is None or qty <= 0:
            return 0.0
        inst = self.master.get(o.segment, o.token)
        return self.margin.required(inst, o.key, o.side, qty, price=o.fprice if price is None else price,
                                    product=o.product)  # fmt: skip

    def _reserve(self, o: PaperOrder, amount: float) -> None:
        """Set what ``o`` keeps reserved (0 releases it all)."""
        if self.margin is not None:
            self.margin.release(o.margin)
            o.margin = amount
            self.margin.reserve(amount)

    def _margin_trade(self, o: PaperOrder, qty: int, price: Decimal) -> None:
        """Before ``o.filled`` counts a trade of ``qty``: its share of the reservation goes,
        and the position it moves is re-margined."""
        m = self.margin
        if m is None:
            return
        rest = o.quantity - o.filled
        if o.margin and rest > 0:
            self._reserve(o, o.margin * max(0, rest - qty) / rest)
        inst = self.master.get(o.segment, o.token)
        m.trade(inst, o.key, o.side, qty, price=float(price), product=o.product)

    def _log(self, rec: dict[str, Any]) -> None:
        if self._fh is not None:
            rec["day"] = self._day
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._fh.flush()  # in the kernel before the call returns: survives kill -9

    # ------------------------------------------------------------------ Broker
    def place(self, order: BrokerOrder) -> BrokerAck:
        inst = self.master.get(order.segment, order.token)
        if inst is None:
            raise BrokerRejected(f"unknown instrument {instrument_key(order.segment, order.token)}")
        if order.quantity <= 0:
            raise BrokerRejected("quantity must be positive")
        if order.order_type not in ("LIMIT", "SL"):
            raise BrokerRejected(f"order type {order.order_type} is not accepted (LIMIT or SL only)")
        if order.price is None or order.price <= 0:
            raise BrokerRejected("a positive limit price is required")
        tick = inst.tick_size
        if tick <= 0 or order.price % tick != 0:
            raise BrokerRejected(f"price {order.price} is not a multiple of the tick size {tick}")
        if order.order_type == "SL":
            if order.trigger_price is None or order.trigger_price % tick != 0:
                raise BrokerRejected("stop-limit needs a trigger price on tick")
            if order.side == "SELL" and order.trigger_price < order.price:
                raise BrokerRejected("SELL stop-limit: trigger price must not be below the limit price")
            if order.side == "BUY" and order.trigger_price > order.price:
                raise BrokerRejected("BUY stop-limit: trigger price must not be above the limit price")
        need = 0.0
        if self.margin is not None:
            if not self._carry_marked:
                self._mark_carried()
            need = self.margin.required(inst, inst.key, order.side, order.quantity, price=float(order.price),
                                        product=order.product)  # fmt: skip
            refusal = self.margin.refusal(need)
            if refusal:
                raise BrokerRejected(refusal)
        self._seq += 1
        oid = f"{self._day.replace('-', '')[2:]}{self._seq:09d}"
        now = self.clock.now_ns()
        self._forget_settled(now)
        o = PaperOrder(
            oid=oid,
            tag=order.client_tag,
            segment=order.segment,
            token=order.token,
            symbol=order.symbol,
            side=order.side,
            quantity=order.quantity,
            price=order.price,
            order_type=order.order_type,
            trigger=order.trigger_price,
            product=order.product,
            day=self._day,
            ts_ns=now,
            fprice=float(order.price),
            ftrigger=float(order.trigger_price) if order.trigger_price is not None else 0.0,
        )
        if self._fh is not None:  # the journal; without one (backtests) no record is built
            self._log(
                {
                    "op": "place",
                    "id": oid,
                    "tag": o.tag,
                    "seg": o.segment,
                    "tok": o.token,
                    "sym": o.symbol,
                    "side": o.side,
                    "qty": o.quantity,
                    "price": str(o.price),
                    "otype": o.order_type,
                    "trig": str(o.trigger) if o.trigger is not None else None,
                    "product": o.product,
                    "ts": now,
                }
            )
        self.orders[oid] = o
        self._reserve(o, need)
        self.places += 1
        self.resting.setdefault(o.key, []).append(o)
        self._band.pop(o.key, None)
        self._status(o)
        last = self.last.get(o.key)
        if last is not None:
            self._match(o, last, arriving=True)
        return BrokerAck(broker_order_id=oid, raw={"nOrdNo": oid, "stat": "Ok"})

    def cancel(self, broker_order_id: str) -> None:
        o = self.orders.get(broker_order_id)
        if o is None:
            raise BrokerRejected(f"order {broker_order_id} not found")
        if o.status in _DONE:
            raise BrokerRejected(f"order {broker_order_id} is already {o.status}")
        o.status = _CANCELLED
        o.reason = "cancelled by user"
        self._reserve(o, 0.0)
        if self._fh is not None:
            self._log({"op": "cancel", "oid": o.oid, "reason": o.reason})
        self._finished.append((self.clock.now_ns(), o.oid))
        self._unrest(o)
        self._status(o)

    def modify(
        self,
        broker_order_id: str,
        *,
        quantity: int | None = None,
        price: Decimal | None = None,
        trigger_price: Decimal | None = None,
    ) -> None:
        o = self.orders.get(broker_order_id)
        if o is None:
            raise BrokerRejected(f"order {broker_order_id} not found")
        if o.status in _DONE:
            raise BrokerRejected(f"order {broker_order_id} is already {o.status}")
        qty = o.quantity if quantity is None else quantity
        if qty <= o.filled:
            raise BrokerRejected(f"quantity {qty} must exceed the filled quantity {o.filled}")
        was = o.margin
        self._reserve(o, 0.0)
        need = self._need(o, qty - o.filled, float(price) if price is not None else o.fprice)
        refusal = self.margin.refusal(need) if self.margin is not None else ""
        if refusal:
            self._reserve(o, was)
            raise BrokerRejected(refusal)
        self._reserve(o, need)
        o.quantity = qty
        if price is not None:
            o.price = price
            o.fprice = float(price)
        if trigger_price is not None:
            o.trigger = trigger_price
            o.ftrigger = float(trigger_price)
        self._band.pop(o.key, None)
        if self._fh is not None:
            self._log(
                {
                    "op": "modify",
                    "oid": o.oid,
                    "qty": o.quantity,
                    "price": str(o.price),
                    "trig": str(o.trigger) if o.trigger is not None else None,
                }
            )
        self._status(o)
        last = self.last.get(o.key)
        if last is not None:
            self._match(o, last, arriving=True)

    def order_book(self) -> list[BrokerOrderStatus]:
        self._forget_settled(self.clock.now_ns())
        return [self._as_status(o) for o in self.orders.values() if o.day == self._day]

    def trade_book(self) -> list[BrokerTrade]:
        return list(self.trades.values())

    def _add_trade(self, trade: BrokerTrade) -> None:
        self.trades[trade.trade_id] = trade
        self._order_trades.setdefault(trade.broker_order_id, []).append(trade.trade_id)

    def _forget_settled(self, now_ns: int) -> None:
        """Orders finished ``SETTLED_AFTER_S`` ago leave memory with their trades (the journal
        keeps them)."""
        q = self._finished
        cutoff = now_ns - int(SETTLED_AFTER_S * 1e9)
        while q and q[0][0] <= cutoff:
            oid = q.popleft()[1]
            o = self.orders.get(oid)
            if o is not None and o.status in _DONE:
                del self.orders[oid]
                for tid in self._order_trades.pop(oid, ()):
                    self.trades.pop(tid, None)

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError:
                pass
            self._fh.close()
            self._fh = None

    # ------------------------------------------------------------------ market data
    def on_tick(self, tick: Tick, key: str | None = None) -> None:
        """Remember the touch; fill resting orders this tick crosses. Cheap when nothing rests.
        A tick without a possible price (NaN, infinite, not positive, absurd) fills nothing.
        ``key`` (``segment|token``) may be passed when the caller already has it."""
        ltp = tick.ltp
        if not 0.0 < ltp <= 10_000_000.0:  # NaN fails both comparisons
            return
        if not (0.0 <= tick.bid <= 2 * ltp and 0.0 <= tick.ask <= 2 * ltp):
            # an impossible touch (NaN, negative, far from the last price) is no touch: the
            # last price stands in, so nothing fills at a price the market never showed
            tick = msgspec.structs.replace(tick, bid=0.0, ask=0.0, bid_qty=0, ask_qty=0)
        if key is None:
            key = f"{tick.segment}|{tick.token}"  # instrument_key, inlined: hot path
        self.last[key] = tick
        book = self.resting.get(key)
        if not book:
            return
        buy_touch = tick.ask if tick.ask > 0 else ltp
        sell_touch = tick.bid if tick.bid > 0 else ltp
        band = self._band.get(key)
        if band is None:
            band = self._band[key] = _quiet_band(book)
        if band[0] > ltp > band[1] and buy_touch > band[2] and sell_touch < band[3]:
            return  # inside the quiet band: no order of this book can trigger or cross
        # Hot path: only the orders this tick can trigger or cross go to ``_match`` (the same
        # tests as its early returns; a fill only touches its own order, so checking them all
        # first is the same as checking each in turn).
        hits = None
        for o in book:
            if o.order_type == "SL" and not o.triggered:
                hit = (o.side == "BUY" and ltp >= o.ftrigger) or (o.side == "SELL" and ltp <= o.ftrigger)
            elif o.side == "BUY":
                hit = not (buy_touch <= 0 or buy_touch > o.fprice)
            else:
                hit = not (sell_touch <= 0 or sell_touch < o.fprice)
            if hit:
                if hits is None:
                    hits = [o]
                else:
                    hits.append(o)
        if hits is not None:
            # what the touch shows, shared by every order on this tick (partial fills only)
            shown = {"BUY": tick.ask_qty, "SELL": tick.bid_qty} if self.partial_fills else None
            for o in hits:
                self._match(o, tick, arriving=False, shown=shown)

    def drain_events(self) -> list[BrokerEvent]:
        """Order-status and trade events since the last call (the paper 'order feed')."""
        events, self.events = self.events, []
        return events

    # ------------------------------------------------------------------ matching
    def _match(self, o: PaperOrder, t: Tick, arriving: bool, shown: dict[str, int] | None = None) -> None:
        if o.status in _DONE:
            return
        ltp = t.ltp
        if o.order_type == "SL" and not o.triggered:
            if (o.side == "BUY" and ltp >= o.ftrigger) or (o.side == "SELL" and ltp <= o.ftrigger):
                o.triggered = True
                self._band.pop(o.key, None)
                if self._fh is not None:
                    self._log({"op": "trigger", "oid": o.oid})
                arriving = True  # a triggered stop arrives at the book as a limit
            else:
                return
        if o.side == "BUY":
            touch = t.ask if t.ask > 0 else ltp
            if touch <= 0 or touch > o.fprice:
                return
            avail = t.ask_qty if t.ask > 0 else 0
        else:
            touch = t.bid if t.bid > 0 else ltp
            if touch <= 0 or touch < o.fprice:
                return
            avail = t.bid_qty if t.bid > 0 else 0
        qty = o.quantity - o.filled
        if self.partial_fills and avail > 0:
            if shown is not None:
                avail = shown[o.side]
                if avail <= 0:
                    return
            qty = min(qty, avail)
            if shown is not None:
                shown[o.side] = avail - qty
        # a resting order trades at its own price; an arriving one takes the touch
        price = self._taker_price(o, touch) if arriving else o.price
        self._fill(o, qty, price)

    def _taker_price(self, o: PaperOrder, touch: float) -> Decimal:
        inst = self.master.get(o.segment, o.token)
        tick = inst.tick_size if inst is not None else Decimal("0.05")
        base = Decimal(repr(touch))
        try:
            if o.side == "BUY":
                return min(snap(base * (1 + self.slip), tick, "up"), o.price)
            return max(snap(base * (1 - self.slip), tick, "down"), o.price)
        except MoneyError:
            return o.price

    def _fill(self, o: PaperOrder, qty: int, price: Decimal) -> None:
        self._tseq += 1
        tid = f"T{self._day.replace('-', '')[2:]}{self._tseq:09d}"
        now = self.clock.now_ns()
        if self._fh is not None:
            self._log({"op": "trade", "id": tid, "oid": o.oid, "qty": qty, "price": str(price), "ts": now})
        self._margin_trade(o, qty, price)
        o.filled += qty
        o.value += price * qty
        o.status = _COMPLETE if o.filled >= o.quantity else _PARTIAL
        trade = BrokerTrade(
            trade_id=tid,
            broker_order_id=o.oid,
            client_tag=o.tag,
            side=o.side,
            quantity=qty,
            price=price,
            ts_ns=now,
        )
        self._add_trade(trade)
        self.events.append(trade)
        if o.status == _COMPLETE:
            self._unrest(o)
            self._finished.append((now, o.oid))
        self._status(o)

    def _unrest(self, o: PaperOrder) -> None:
        self._band.pop(o.key, None)
        book = self.resting.get(o.key)
        if book and o in book:
            book.remove(o)
            if not book:
                del self.resting[o.key]

    def _as_status(self, o: PaperOrder) -> BrokerOrderStatus:
        avg = (o.value / o.filled) if o.filled else None
        return BrokerOrderStatus(
            broker_order_id=o.oid,
            client_tag=o.tag,
            status=o.status,
            quantity=o.quantity,
            filled_qty=o.filled,
            avg_price=avg,
            reason=o.reason,
        )

    def _status(self, o: PaperOrder) -> None:
        self.events.append(self._as_status(o))


def _quiet_band(book: list[PaperOrder]) -> tuple[float, float, float, float]:
    """(lowest BUY stop trigger, highest SELL stop trigger, highest BUY limit, lowest SELL limit)
    over ``book``, a triggered stop counting as the limit it has become: a tick whose last
    price lies strictly between the two triggers, whose buy touch is above every BUY limit and
    whose sell touch is below every SELL limit triggers or crosses none of them (the tests of
    ``on_tick``, negated). An order already done counts too: the band is only ever narrower.
    A price that is not a number makes the band empty (every tick takes the full test)."""
    buy_stop, sell_stop = math.inf, -math.inf
    buy_limit, sell_limit = -math.inf, math.inf
    for o in book:
        if math.isnan(o.fprice) or math.isnan(o.ftrigger):
            return math.nan, math.nan, math.nan, math.nan
        if o.order_type == "SL" and not o.triggered:
            if o.side == "BUY":
                buy_stop = min(buy_stop, o.ftrigger)
            elif o.side == "SELL":
                sell_stop = max(sell_stop, o.ftrigger)
        elif o.side == "BUY":
            buy_limit = max(buy_limit, o.fprice)
        else:
            sell_limit = min(sell_limit, o.fprice)
    return buy_stop, sell_stop, buy_limit, sell_limit
