"""Properties of the risk math: PnL after costs, sizing, and that nothing unusable is approved."""

from __future__ import annotations

import itertools
from decimal import Decimal

from hypothesis import event, given, settings
from hypothesis import strategies as st

from libs.common.clock import ManualClock
from libs.common.config import RiskConfig
from libs.common.instruments import MasterData
from libs.common.messages import OrderRequest, Sizing, Tick
from services.risk.sentinel import RiskSentinel, calculate_size
from tests.kit import fill
from tests.kit.builders import NIFTY_FUT

MASTER = MasterData.load()
_ids = itertools.count(1)

prices = st.decimals(min_value=Decimal("0.05"), max_value=Decimal("50000"), places=2)
fills = st.lists(st.tuples(st.sampled_from(["BUY", "SELL"]), st.integers(1, 500), prices), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    fills=fills,
    mark=st.floats(min_value=0.05, max_value=50_000, allow_nan=False),
    rate=st.floats(min_value=0, max_value=0.01),
)
def test_net_is_gross_minus_turnover_times_rate(
    fills: list[tuple[str, int, Decimal]], mark: float, rate: float
) -> None:
    s = RiskSentinel(RiskConfig(cost_rate=rate, max_daily_loss=1e12), MASTER, ManualClock())
    cash = Decimal(0)
    qty = 0
    turnover = Decimal(0)
    for i, (side, q, price) in enumerate(fills):
        s.on_fill(fill("RELIANCE-EQ", side, q, price, order_id="o", fill_id=f"f{i}"))
        sign = 1 if side == "BUY" else -1
        cash -= sign * q * price
        qty += sign * q
        turnover += q * price
    s.on_tick(Tick(segment="nse_cm", token="2885", ltp=mark))
    state = s.state()
    mark_used = mark if fills else 0.0
    expected_gross = float(cash) + qty * mark_used
    tol = 1e-6 * (1 + float(turnover))
    assert abs(state.gross_pnl - expected_gross) <= tol
    assert abs(state.turnover - float(turnover)) <= tol
    assert abs(state.net_pnl - (state.gross_pnl - state.turnover * rate)) <= tol
    assert state.gross_pnl == state.realised_pnl + state.unrealised_pnl


@settings(max_examples=500, deadline=None)
@given(
    capital=st.decimals(min_value=Decimal(1), max_value=Decimal(10**9), places=2),
    risk_pct=st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100), places=2),
    entry=prices,
    stop=prices,
    lot=st.sampled_from([1, 15, 25, 35, 50, 65, 75, 1800]),
    max_qty=st.integers(1, 100_000),
)
def test_sizing_respects_budget_max_qty_and_lots(
    capital: Decimal, risk_pct: Decimal, entry: Decimal, stop: Decimal, lot: int, max_qty: int
) -> None:
    qty = calculate_size(capital, risk_pct, entry, stop, lot, max_qty)
    assert qty >= 0
    assert qty % lot == 0
    assert qty <= max_qty
    assert qty * abs(entry - stop) <= capital * risk_pct / 100
    if entry == stop:
        assert qty == 0


@given(bad=st.sampled_from([float("nan"), float("inf"), -1.0, 0.0]))
def test_sizing_with_unusable_inputs_is_zero(bad: float) -> None:
    assert calculate_size(bad, 1, 100, 90, 1, 1000) == 0
    assert calculate_size(100000, bad, 100, 90, 1, 1000) == 0
    assert calculate_size(100000, 1, bad, 90, 1, 1000) == 0
    assert calculate_size(100000, 1, 100, bad, 1, 1000) == 0


valid_price = st.integers(1, 40_000).map(lambda n: Decimal(n) / 10)  # on every sample tick size
bad_price = st.one_of(
    st.sampled_from(
        [
            Decimal("NaN"),
            Decimal("sNaN"),
            Decimal("Infinity"),
            Decimal("-Infinity"),
            Decimal(0),
            Decimal("-0"),
            Decimal("-1290.5"),
            Decimal("1E+40"),
            Decimal("1E-30"),
        ]
    ),
    st.decimals(min_value=Decimal(-2000), max_value=Decimal(2000), places=2),
    st.decimals(allow_nan=True, allow_infinity=True),
)
any_quantity = st.one_of(st.integers(-(10**6), 10**6), st.sampled_from([0, -1, 1001, 2**63 - 1, -(2**63)]))
CORRUPTIBLE = ("quantity", "price", "stop_loss", "target", "trigger_price", "capital", "risk_pct", "last")


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_nothing_unusable_is_ever_approved(data: st.DataObject) -> None:
    """A usable order with zero to three of its values replaced by unusable ones."""
    symbol, ref, lot = data.draw(
        st.sampled_from(
            [("RELIANCE-EQ", 1290.5, 1), ("HDFCBANK-EQ", 985.4, 1),
             (NIFTY_FUT.symbol, 25950.0, NIFTY_FUT.lot_size)]
        )
    )
    side = data.draw(st.sampled_from(["BUY", "SELL"]))
    values: dict[str, object] = {
        "quantity": lot * data.draw(st.integers(1, 1000 // lot)),
        "price": data.draw(st.one_of(st.none(), st.just(Decimal(repr(ref))))),
        "stop_loss": None,
        "target": None,
        "trigger_price": None,
        "capital": None,
        "risk_pct": None,
        "last": ref,
    }
    if data.draw(st.booleans()):
        away = Decimal(data.draw(st.integers(1, 100))) / 10
        below, above = Decimal(repr(ref)) - away, Decimal(repr(ref)) + away
        values["stop_loss"], values["target"] = (below, above) if side == "BUY" else (above, below)
    if data.draw(st.booleans()):
        values.update(
            quantity=0,
            capital=Decimal(data.draw(st.integers(1_000, 10**7))),
            risk_pct=Decimal(data.draw(st.integers(1, 500))) / 100,
        )
    for name in data.draw(st.lists(st.sampled_from(CORRUPTIBLE), max_size=3, unique=True)):
        if name == "quantity":
            values[name] = data.draw(any_quantity)
        elif name == "last":
            values[name] = data.draw(st.one_of(st.none(), st.floats()))
        else:
            values[name] = data.draw(bad_price)
    s = RiskSentinel(RiskConfig(max_notional=1e12), MASTER, ManualClock())
    last = values.pop("last")
    if last is not None:
        seg_tok = MASTER.resolve(symbol)
        s.on_tick(Tick(segment=seg_tok.segment, token=seg_tok.token, ltp=last))  # type: ignore[arg-type]
    capital, risk_pct = values.pop("capital"), values.pop("risk_pct")
    sizing = (
        Sizing(capital=capital, risk_pct=risk_pct) if capital is not None and risk_pct is not None else None
    )  # type: ignore[arg-type]
    req = OrderRequest(
        request_id=f"p{next(_ids)}", strategy_id="s1", side=side, symbol=symbol, sizing=sizing, **values
    )  # type: ignore[arg-type]

    verdict, execute = s.evaluate(req)

    event("approved" if verdict.approved else "rejected")
    if not verdict.approved:
        assert verdict.reason and execute is None
        return
    assert execute is not None
    assert 0 < verdict.quantity == execute.quantity == execute.order.quantity <= 1000
    assert verdict.quantity % lot == 0
    for value in (
        execute.order.price,
        execute.order.stop_loss,
        execute.order.target,
        execute.order.trigger_price,
    ):
        assert value is None or (value.is_finite() and value > 0)
    if execute.order.price is None:
        assert last is not None and last > 0
