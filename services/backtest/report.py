"""Backtest bookkeeping and report: trades, PnL after costs, drawdown, exposure, equity curve.

The ``Book`` is fed the same ``Fill``s the strategy receives and every tick's price. Money
is exact (``Decimal``) for the totals, so the report is internally consistent to the paisa:

- ``net_pnl = gross_pnl - turnover x cost_rate`` (cost rate 0.00035 by default);
- the trades' PnLs add up to ``gross_pnl`` (a position still open at the end is one trade,
  marked at the last price and flagged ``open``);
- the equity curve (net, after costs, marked to market) ends at ``net_pnl``.

Nothing time- or run-dependent (wall clock, random ids) goes into the report, so two runs
over the same input give byte-identical JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from libs.common.clock import IST
from libs.common.instruments import instrument_key, split_key
from libs.common.messages import Fill
from libs.common.money import to_decimal
from libs.common.positions import FloatPositionState

ZERO = Decimal(0)
CURVE_POINTS = 1000  # at most this many points of the equity curve go into the report
TEXT_TRADES = 20  # trades listed in the human summary (all of them are in the JSON)


@dataclass(slots=True)
class Trade:
    """One round trip in one instrument: from flat, back to flat (or still open at the end)."""

    symbol: str
    key: str
    direction: str  # LONG | SHORT
    entry_ns: int
    quantity: int = 0  # largest absolute position during the trade
    exit_ns: int = 0
    buy_qty: int = 0
    sell_qty: int = 0
    buy_value: Decimal = ZERO
    sell_value: Decimal = ZERO
    fills: int = 0
    open: bool = False
    mark: Decimal = ZERO  # price an open trade is marked at
    exit_reason: str = ""  # the purpose of the order whose fill closed it: STOP, TARGET, EXIT, FLATTEN

    @property
    def pnl(self) -> Decimal:
        """Gross PnL: sells - buys, with any open quantity marked at ``mark``."""
        held = self.buy_qty - self.sell_qty
        return self.sell_value - self.buy_value + held * self.mark

    @property
    def turnover(self) -> Decimal:
        return self.buy_value + self.sell_value

    def as_dict(self, cost_rate: Decimal) -> dict[str, Any]:
        entry_qty = self.buy_qty if self.direction == "LONG" else self.sell_qty
        exit_qty = self.sell_qty if self.direction == "LONG" else self.buy_qty
        entry_val = self.buy_value if self.direction == "LONG" else self.sell_value
        exit_val = self.sell_value if self.direction == "LONG" else self.buy_value
        cost = self.turnover * cost_rate
        return {
            "symbol": self.symbol,
            "direction": self.direction,
            "quantity": self.quantity,
            "entry_time": _iso(self.entry_ns),
            "exit_time": _iso(self.exit_ns) if self.exit_ns else None,
            "entry_price": _num(entry_val / entry_qty) if entry_qty else None,
            "exit_price": _num(exit_val / exit_qty) if exit_qty else None,
            "pnl": _num(self.pnl),
            "cost": _num(cost),
            "net_pnl": _num(self.pnl - cost),
            "exit_reason": self.exit_reason or None,
            "fills": self.fills,
            "open": self.open,
        }


@dataclass
class Book:
    """Fills and marks → trades, exact totals and a marked-to-market equity curve."""

    cost_rate: Decimal = Decimal("0.00035")
    sample_ns: int = 1_000_000_000  # equity curve resolution while exposed (plus every fill)
    trades: list[Trade] = field(default_factory=list)
    turnover: Decimal = ZERO
    fills: int = 0
    first_ns: int = 0
    last_ns: int = 0
    max_drawdown: float = 0.0
    peak: float = 0.0
    exposure_ns: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    # per instrument: the float position behind the equity curve (marked at ``last_price``)
    # and the trade it is in, if any
    _positions: dict[str, FloatPositionState] = field(default_factory=dict)
    _open: dict[str, Trade] = field(default_factory=dict)
    _realised: float = 0.0  # float mirror of realised gross, for the curve
    _unreal: float = 0.0
    _cost: float = 0.0
    _open_count: int = 0
    _open_since: int = 0
    _next_sample: int = 0

    def __post_init__(self) -> None:
        self._rate_f = float(self.cost_rate)

    # ------------------------------------------------------------------ feeding
    def on_tick(self, key: str, ts_ns: int, price: float) -> None:
        """A traded price: update the mark and, while exposed, the equity curve/drawdown."""
        if not self.first_ns:
            self.first_ns = ts_ns
            self._next_sample = ts_ns
        self.last_ns = ts_ns
        pos = self._positions.get(key)
        if pos is None:
            return
        if pos.quantity:
            self._unreal += pos.quantity * (price - pos.last_price)
        pos.last_price = price
        if self._open_count:  # ``_observe(ts_ns)``, inlined: hot path
            eq = self._realised + self._unreal - self._cost
            if eq > self.peak:
                self.peak = eq
            elif self.peak - eq > self.max_drawdown:
                self.max_drawdown = self.peak - eq
            if ts_ns >= self._next_sample:
                self.curve.append((ts_ns, eq))
                self._next_sample = ts_ns + self.sample_ns

    def mark(self, key: str, symbol: str, price: float) -> None:
        """Register an instrument's price before any fill (so open trades mark correctly)."""
        pos = self._positions.get(key)
        if pos is None:
            segment, token = split_key(key)
            self._positions[key] = FloatPositionState("", segment, token, symbol, last_price=price)
        else:
            pos.last_price = price

    def on_fill(self, fill: Fill, ts_ns: int, purpose: str = "") -> None:  # noqa: PLR0915 - one fill, one pass
        """Book a fill (exact money) into its instrument's current trade; ``purpose``, that of
        the fill's order, names why a trade it closes was closed."""
        key = instrument_key(fill.segment, fill.token)
        pos = self._positions.get(key)
        if pos is None:
            pos = self._positions[key] = FloatPositionState(
                "", fill.segment, fill.token, fill.symbol, last_price=float(fill.price)
            )
        if not self.first_ns:
            self.first_ns = self._next_sample = ts_ns
        self.last_ns = max(self.last_ns, ts_ns)
        self.fills += 1
        price = fill.price
        pf = float(price)
        remaining = fill.quantity
        side = fill.side
        buy = side == "BUY"
        while remaining:
            trade = self._open.get(key)
            if trade is None:
                trade = self._open[key] = Trade(
                    symbol=pos.symbol or fill.symbol,
                    key=key,
                    direction="LONG" if buy else "SHORT",
                    entry_ns=ts_ns,
                )
                self.trades.append(trade)
                if self._open_count == 0:
                    self._open_since = ts_ns
                self._open_count += 1
            # the part of this fill that belongs to the current trade (a reversal splits it)
            q = pos.quantity
            opening = q == 0 or (q > 0) == buy
            part = remaining if opening else min(remaining, abs(q))
            signed = part if buy else -part
            value = price * part
            if buy:
                trade.buy_qty += part
                trade.buy_value += value
            else:
                trade.sell_qty += part
                trade.sell_value += value
            trade.fills += 1
            self.turnover += value
            self._cost += float(value) * self._rate_f
            # float mirror for the curve, booked part by part: a reversal is a close and then
            # an open from flat (in floats that open's average is pf x part / part, not pf)
            if opening:
                self._unreal += signed * (pos.last_price - pf)
                pos.apply(side, part, pf)
            else:
                self._unreal += signed * (pos.last_price - pos.avg_price)
                self._realised += pos.apply(side, part, pf)
            trade.quantity = max(trade.quantity, abs(pos.quantity))
            remaining -= part
            if pos.quantity == 0:
                trade.exit_ns = ts_ns
                trade.exit_reason = purpose
                del self._open[key]
                self._open_count -= 1
                if self._open_count == 0:
                    self.exposure_ns += ts_ns - self._open_since
        self._observe(ts_ns, force=True)

    def _observe(self, ts_ns: int, force: bool = False) -> None:
        eq = self._realised + self._unreal - self._cost
        if eq > self.peak:
            self.peak = eq
        elif self.peak - eq > self.max_drawdown:
            self.max_drawdown = self.peak - eq
        if force or ts_ns >= self._next_sample:
            self.curve.append((ts_ns, eq))
            self._next_sample = ts_ns + self.sample_ns

    # ------------------------------------------------------------------ results
    def finish(self) -> None:
        """Mark open trades at the last price and close the exposure window."""
        for key, trade in self._open.items():
            trade.open = True
            trade.mark = to_decimal(self._positions[key].last_price)
        if self._open_count:
            self.exposure_ns += self.last_ns - self._open_since
            self._open_since = self.last_ns

    @property
    def gross(self) -> Decimal:
        return sum((t.pnl for t in self.trades), ZERO)

    @property
    def cost(self) -> Decimal:
        return self.turnover * self.cost_rate

    @property
    def net(self) -> Decimal:
        return self.gross - self.cost

    def equity_curve(self) -> list[tuple[int, float]]:
        """At most ``CURVE_POINTS`` points (evenly thinned), starting at 0 and ending exactly at net."""
        pts = [(self.first_ns, 0.0), *self.curve]
        if len(pts) > CURVE_POINTS:
            step = len(pts) / (CURVE_POINTS - 1)
            pts = [pts[int(i * step)] for i in range(CURVE_POINTS - 1)]
        pts.append((self.last_ns, float(self.net)))
        return pts

    def summary(self) -> dict[str, Any]:
        closed = [t for t in self.trades if not t.open]
        wins = sum(1 for t in closed if t.pnl > 0)
        span = max(0, self.last_ns - self.first_ns)
        net = self.net
        # the drawdown of the final mark can exceed the sampled one: include the end point
        final = float(net)
        max_dd = max(self.max_drawdown, self.peak - final)
        return {
            "trades": len(self.trades),
            "closed_trades": len(closed),
            "open_trades": len(self.trades) - len(closed),
            "wins": wins,
            "losses": sum(1 for t in closed if t.pnl < 0),
            "win_rate": round(wins / len(closed), 4) if closed else 0.0,
            "gross_pnl": _num(self.gross),
            "turnover": _num(self.turnover),
            "cost_rate": _num(self.cost_rate),
            "cost": _num(self.cost),
            "net_pnl": _num(net),
            "max_drawdown": round(max_dd, 2),
            "exposure_s": round(self.exposure_ns / 1e9, 3),
            "exposure_pct": round(100.0 * self.exposure_ns / span, 2) if span else 0.0,
            "fills": self.fills,
        }


def _num(d: Decimal) -> float:
    return float(d)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, IST).isoformat(timespec="milliseconds")


def to_json(report: dict[str, Any]) -> str:
    """Stable JSON: sorted keys, fixed separators (byte-identical for identical reports)."""
    return json.dumps(report, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def render_text(report: dict[str, Any]) -> str:
    """The human summary."""
    s = report["summary"]
    orders = report["orders"]
    lines = [
        f"backtest  {report['strategy']}  ({report['ticks']} ticks, {report['start']} → {report['end']})",
        f"  trades        {s['trades']}  (closed {s['closed_trades']}, open {s['open_trades']}, "
        f"wins {s['wins']}, losses {s['losses']}, win rate {s['win_rate'] * 100:.1f} %)",
        f"  gross PnL     {s['gross_pnl']:,.2f}",
        f"  cost          {s['cost']:,.2f}  (turnover {s['turnover']:,.2f} x {s['cost_rate']})",
        f"  net PnL       {s['net_pnl']:,.2f}",
        f"  max drawdown  {s['max_drawdown']:,.2f}",
        f"  exposure      {s['exposure_s']:,.0f} s  ({s['exposure_pct']} % of the time)",
        f"  orders        {orders['requested']} requested, {orders['approved']} approved, "
        f"{orders['rejected']} rejected; strategy errors {report['errors']}",
    ]
    for reason, n in sorted(report["rejections"].items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"    rejected x{n}: {reason}")
    trades = report["trade_list"]
    if trades:
        # one line per trade, so each leg of a basket shows on its own: entry, exit, PnL
        one_day = bool(report["start"]) and report["start"][:10] == (report["end"] or "")[:10]
        lines.append("  trades (entry → exit, PnL, cost, net)")
        lines.extend(f"    {_trade_line(t, one_day)}" for t in trades[:TEXT_TRADES])
        if len(trades) > TEXT_TRADES:
            lines.append(f"    … and {len(trades) - TEXT_TRADES} more (see --json)")
    events = report.get("events") or []
    if events:
        lines.append("  execution (stops moved, square-offs, refusals)")
        lines.extend(f"    {e['time'][11:19]} {e['level']:<8} {e['text']}" for e in events[:TEXT_TRADES])
        more = len(events) - TEXT_TRADES + report.get("events_dropped", 0)
        if more > 0:
            lines.append(f"    … and {more} more (see --json)")
    return "\n".join(lines)


def _trade_line(t: dict[str, Any], one_day: bool) -> str:
    def when(iso: str | None) -> str:
        if not iso:
            return "-"
        return iso[11:19] if one_day else f"{iso[:10]} {iso[11:19]}"

    def price(p: float | None) -> str:
        return "-" if p is None else f"{p:,.2f}"

    why = f" ({t['exit_reason'].lower()})" if t.get("exit_reason") else ""
    end = "open, marked" if t["open"] else f"{price(t['exit_price'])} {when(t['exit_time'])}{why}"
    return (
        f"{t['direction']:<5} {t['quantity']} {t['symbol']}  {price(t['entry_price'])} "
        f"{when(t['entry_time'])} → {end}  PnL {t['pnl']:,.2f}  cost {t['cost']:,.2f}  "
        f"net {t['net_pnl']:,.2f}"
    )


def write_equity_png(report: dict[str, Any], path: Path) -> Path:
    """Plot the net equity curve (after costs) to ``path`` (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    curve = report["equity_curve"]
    xs: Any = [datetime.fromisoformat(when) for when, _ in curve]
    ys = [eq for _, eq in curve]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    try:
        ax.plot(xs, ys, color="#1f6feb", linewidth=1.2, drawstyle="steps-post")
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.fill_between(xs, ys, 0, step="post", alpha=0.15, color="#1f6feb")
        s = report["summary"]
        ax.set_title(
            f"{report['strategy']}: net PnL {s['net_pnl']:,.2f} after costs "
            f"({s['trades']} trades, max drawdown {s['max_drawdown']:,.2f})"
        )
        ax.set_ylabel("net equity (₹)")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M", tz=IST))  # type: ignore[no-untyped-call]
        ax.grid(True, alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
