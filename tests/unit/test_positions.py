"""The one position model (average cost): Decimal for the ledger, and its float twin proven equal."""

from __future__ import annotations

import math
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.messages import Position
from libs.common.positions import FloatPositionState, PositionState

prices = st.decimals(min_value=Decimal("0.05"), max_value=Decimal("50000"), places=2)
fills = st.lists(
    st.tuples(
        st.sampled_from(["BUY", "SELL"]), st.integers(1, 500), prices, st.sampled_from(["MIS", "NRML", "CNC"])
    ),
    min_size=1,
    max_size=40,
)
Fills = list[tuple[str, int, Decimal, str]]
TOLERANCE = Decimal("1e-12")  # Decimal keeps 28 digits: an average that does not divide evenly rounds


def _close(a: float, b: Decimal) -> bool:
    return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-6)


@settings(max_examples=300, deadline=None)
@given(fills=fills)
def test_the_float_twin_takes_the_decimal_models_branches_and_agrees_on_the_money(fills: Fills) -> None:
    exact, fast = PositionState("s1", "NSE", "2885", "RELIANCE-EQ"), FloatPositionState("s1", "NSE", "2885")

    for side, qty, price, product in fills:
        adds = exact.quantity == 0 or (exact.quantity > 0) == (side == "BUY")
        gain = exact.apply(side, qty, price, product)
        gain_f = fast.apply(side, qty, float(price), product)

        # quantities decide every branch: they are equal exactly, fill by fill
        assert (fast.quantity, fast.buy_qty, fast.sell_qty) == (exact.quantity, exact.buy_qty, exact.sell_qty)
        assert fast.by_product == exact.by_product
        if adds:
            assert gain == 0 and gain_f == 0.0
        # the money differs by float rounding only
        assert _close(gain_f, gain)
        assert _close(fast.avg_price, exact.avg_price)
        assert _close(fast.realised, exact.realised)
        assert _close(fast.buy_value, exact.buy_value)
        assert _close(fast.sell_value, exact.sell_value)
        assert (fast.avg_price == 0.0) == (exact.avg_price == 0) == (exact.quantity == 0)


@settings(max_examples=300, deadline=None)
@given(fills=fills, mark=prices)
def test_realised_pnl_sums_and_marked_pnl_is_the_cash_flow(fills: Fills, mark: Decimal) -> None:
    pos = PositionState("s1", "NSE", "2885", "RELIANCE-EQ")

    gains = [pos.apply(side, qty, price, product) for side, qty, price, product in fills]

    assert sum(gains, Decimal(0)) == pos.realised
    assert pos.quantity == pos.buy_qty - pos.sell_qty == sum(pos.by_product.values())
    marked = pos.realised + pos.quantity * (mark - pos.avg_price)
    cash = pos.sell_value - pos.buy_value + pos.quantity * mark
    assert abs(marked - cash) < TOLERANCE
    if pos.quantity == 0:
        assert pos.avg_price == 0 and str(pos.avg_price) == "0"  # the ledger's 0, not 0E-28


@settings(max_examples=300, deadline=None)
@given(fills=fills)
def test_a_short_is_the_mirror_image_of_a_long(fills: Fills) -> None:
    long, short = PositionState(), PositionState()

    for side, qty, price, _ in fills:
        long.apply(side, qty, price)
        short.apply("SELL" if side == "BUY" else "BUY", qty, price)

    assert short.quantity == -long.quantity
    assert str(short.avg_price) == str(long.avg_price)
    assert short.realised == -long.realised


@settings(max_examples=300, deadline=None)
@given(held=st.integers(1, 500), extra=st.integers(1, 500), open_at=prices, close_at=prices)
def test_a_fill_through_zero_books_like_a_close_then_an_open(
    held: int, extra: int, open_at: Decimal, close_at: Decimal
) -> None:
    whole, split = PositionState(), PositionState()
    whole.apply("BUY", held, open_at)
    split.apply("BUY", held, open_at)

    gain = whole.apply("SELL", held + extra, close_at)
    gain_split = split.apply("SELL", held, close_at) + split.apply("SELL", extra, close_at)

    assert gain == gain_split == (close_at - open_at) * held
    assert (whole.quantity, whole.avg_price, whole.realised) == (-extra, close_at, gain)
    assert (split.quantity, split.avg_price, split.realised) == (-extra, close_at, gain)
    assert whole.by_product == split.by_product == {"MIS": -extra}


def test_a_reversal_realises_the_closed_part_and_opens_the_rest_at_the_fill_price() -> None:
    pos = PositionState("s1", "NSE", "2885", "RELIANCE-EQ")
    pos.apply("BUY", 10, Decimal("100.00"))
    pos.apply("BUY", 10, Decimal("102.00"))

    gain = pos.apply("SELL", 25, Decimal("110.00"))

    assert gain == Decimal("180.00")
    assert (pos.quantity, pos.avg_price, pos.realised) == (-5, Decimal("110.00"), Decimal("180.00"))
    assert (pos.buy_qty, pos.buy_value) == (20, Decimal("2020.00"))
    assert (pos.sell_qty, pos.sell_value) == (25, Decimal("2750.00"))


def test_adding_re_averages_and_reducing_keeps_the_average() -> None:
    pos = FloatPositionState("s1", "NSE", "2885")
    pos.apply("SELL", 2, 100.0)
    pos.apply("SELL", 2, 104.0)

    gain = pos.apply("BUY", 1, 101.0)

    assert (pos.quantity, pos.avg_price, gain, pos.realised) == (-3, 102.0, 1.0, 1.0)


def test_fills_per_product_net_separately_and_a_flat_product_disappears() -> None:
    pos = PositionState()
    pos.apply("BUY", 10, Decimal("100"), "NRML")
    pos.apply("BUY", 5, Decimal("100"), "MIS")

    pos.apply("SELL", 5, Decimal("101"), "MIS")

    assert pos.by_product == {"NRML": 10}
    assert pos.quantity == 10


def test_carry_is_idempotent_and_todays_fills_stay_on_top_of_it() -> None:
    pos = PositionState("s1", "NSE", "2885", "RELIANCE-EQ")
    pos.carry("NRML", 20, Decimal("95.50"))
    pos.carry("NRML", 20, Decimal("95.50"))  # the same report again changes nothing
    pos.apply("BUY", 5, Decimal("100.00"), "NRML")

    pos.carry("NRML", 15, Decimal("95.50"))  # the broker now carries less: only the difference moves

    assert pos.carried == {"NRML": 15}
    assert pos.quantity == 20
    assert pos.by_product == {"NRML": 20}
    assert pos.avg_price == (Decimal("95.50") * 20 + Decimal("100.00") * 5) / 25
    assert (pos.buy_qty, pos.buy_value) == (5, Decimal("500.00"))  # a carry is not a fill of today


def test_a_carry_into_a_flat_position_sets_its_average_and_a_carry_back_to_zero_empties_it() -> None:
    pos = PositionState(strategy_id="carried")
    pos.carry("CNC", -7, Decimal("250"))

    assert (pos.quantity, pos.avg_price, pos.by_product) == (-7, Decimal("250"), {"CNC": -7})
    pos.carry("CNC", 0, Decimal(0))
    assert (pos.quantity, pos.by_product, pos.carried) == (0, {}, {"CNC": 0})


def test_message_publishes_the_exact_money() -> None:
    pos = PositionState("s1", "NSE", "2885", "RELIANCE-EQ")
    pos.apply("BUY", 3, Decimal("100.05"))
    pos.apply("SELL", 1, Decimal("101.10"))

    msg = pos.message(101.2, 42)

    assert msg == Position(
        strategy_id="s1", symbol="RELIANCE-EQ", segment="NSE", token="2885", quantity=2,
        avg_price=Decimal("100.05"), realised_pnl=Decimal("1.05"), buy_qty=3, sell_qty=1,
        buy_value=Decimal("300.15"), sell_value=Decimal("101.10"), last_price=101.2, ts_ns=42,
    )


def test_an_empty_position_starts_at_the_zero_of_its_money() -> None:
    exact, fast = PositionState(), FloatPositionState()

    assert (exact.avg_price, exact.realised, exact.buy_value) == (Decimal(0),) * 3
    assert str(exact.avg_price) == "0"
    assert all(type(v) is float for v in (fast.avg_price, fast.realised, fast.sell_value))


def test_unrealised_is_marked_at_the_last_price_and_zero_while_flat_or_unmarked() -> None:
    pos = FloatPositionState("s1", "NSE", "2885")
    pos.apply("SELL", 4, 100.0)
    assert pos.unrealised == 0.0  # not marked yet

    pos.last_price = 98.5

    assert pos.unrealised == 6.0
    assert pos.key == "NSE|2885"
    pos.apply("BUY", 4, 98.5)
    assert pos.unrealised == 0.0
