"""The intraday square-off (``execution.square_off_at``, default 15:15 IST): working MIS orders
that could add exposure are cancelled and every strategy's MIS position is closed by its own
flatten; NRML is left alone; a later fill is closed too; a start after the time squares off at
once; each square-off is announced and written to risk_events."""

from __future__ import annotations

from libs.common.messages import CANCELLED
from tests.unit.test_engine_faults import DAY0_NS, Hand, cancels, execute, places

S = 1_000_000_000
TO_1515 = (5 * 3600 + 5 * 60) * S  # DAY0 is 10:10 IST: 15:15 is 5 h 5 min later


def held(h: Hand, product: str = "MIS", qty: int = 10, rid: str = "") -> None:
    [r] = h.engine.submit([execute(qty=qty, product=product, **({"rid": rid} if rid else {}))])
    [p] = places(h.take())
    h.ack(p)
    h.trade(h.order(r.order_id), qty, "1290.00")


def at(h: Hand, ns: int) -> None:
    h.clock.set_ns(ns)
    h.engine.reconcile_if_due()
    h.engine.flush()


def test_nothing_happens_before_the_time() -> None:
    h = Hand()
    held(h)
    h.tick(1290.0)

    at(h, DAY0_NS + TO_1515 - S)

    assert not places(h.take()) and "square_off" not in h.codes()


def test_at_the_time_mis_positions_close_working_entries_are_cancelled_and_nrml_stays() -> None:
    h = Hand()
    held(h, "MIS", 10)
    held(h, "NRML", 5)
    [entry] = h.engine.submit([execute(qty=3, price="1200.00")])  # a working MIS entry
    h.ack(places(h.take())[0])
    h.tick(1290.0)

    at(h, DAY0_NS + TO_1515)

    [c] = cancels(h.take())
    assert c.order_id == entry.order_id
    h.answer(c, None)
    h.status(h.order(entry.order_id), CANCELLED)  # confirmed: now the close goes
    [close] = places(h.take())
    row = h.order(close.order_id)
    assert (row.side, row.quantity, row.product, row.purpose) == ("SELL", 10, "MIS", "FLATTEN")
    [alert] = [a for a in h.alerts if a.code == "square_off"]
    assert alert.text == "square-off at 15:15: closing MIS RELIANCE-EQ +10 (s1)"
    [ev] = [e for e in h.store.risk_events("2025-11-21") if e.event == "square_off"]
    assert ev.data["quantity"] == 10 and ev.data["product"] == "MIS"

    h.ack(close)
    h.trade(row, 10, "1289.00")
    at(h, DAY0_NS + TO_1515 + 5 * S)
    pos = h.engine.positions[("s1", row.key)]
    assert pos.by_product.get("MIS", 0) == 0 and pos.by_product.get("NRML") == 5
    assert not places(h.take()) and h.codes().count("square_off") == 1  # once, not every 0.25 s


def test_a_position_opened_after_the_square_off_is_closed_too() -> None:
    h = Hand()
    h.tick(1290.0)
    at(h, DAY0_NS + TO_1515 + S)
    held(h, "MIS", 4)  # a late fill (an order the broker filled as it was cancelled)

    at(h, DAY0_NS + TO_1515 + 2 * S)

    [close] = places(h.take())
    assert (h.order(close.order_id).side, h.order(close.order_id).quantity) == ("SELL", 4)


def test_a_start_after_the_time_with_an_open_mis_position_squares_it_off_at_once() -> None:
    h = Hand()
    held(h, "MIS", 10)
    h.clock.set_ns(DAY0_NS + TO_1515 + 60 * S)  # execution was down over the square-off

    again = Hand(store=h.store, clock=h.clock)
    again.tick(1291.0)
    again.engine.reconcile_if_due()

    [close] = places(again.take())
    assert (again.order(close.order_id).side, again.order(close.order_id).quantity) == ("SELL", 10)
    assert "square_off" in again.codes()


def test_an_empty_square_off_at_turns_it_off() -> None:
    import msgspec

    h = Hand()
    h.engine.cfg = msgspec.structs.replace(h.engine.cfg, square_off_at="")
    h.engine._square_off_ns = 0
    held(h)
    h.tick(1290.0)

    at(h, DAY0_NS + TO_1515 + S)

    assert not places(h.take())


def test_a_bad_square_off_setting_is_a_config_error() -> None:
    import pytest

    from libs.common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"execution\.square_off_at"):
        load_config(env={"NEOPULSE_EXECUTION__SQUARE_OFF_AT": "quarter past three"})
    with pytest.raises(ConfigError, match=r"execution\.square_off_products"):
        load_config(env={"NEOPULSE_EXECUTION__SQUARE_OFF_PRODUCTS": '["INTRADAY"]'})


def test_a_strategy_stopped_today_is_in_the_day_state_risk_rebuilds_from() -> None:
    from libs.common.messages import RecordRiskEvent

    h = Hand()
    why = "net MTM -2100.00 reached its max_loss -2000.00"
    h.engine.record_risk_event(RecordRiskEvent(event="strategy_stopped", reason=why,
                                               data={"strategy_id": "s1"},
                                               request_id="risk-stop-2025-11-21-s1"))  # fmt: skip

    assert h.engine.day_state().stopped == {"s1": "net MTM -2100.00 reached its max_loss -2000.00"}


def loop(h: Hand, seconds: float) -> None:
    """The service's loop for ``seconds``: periodic work, flush, finished flattens reported."""
    for _ in range(int(seconds / 0.25)):
        h.clock.advance(0.25)
        h.engine.reconcile_if_due()
        h.engine.flush()
        h.engine.finish_jobs()


def test_a_square_off_that_cannot_be_priced_is_not_started_again_every_loop() -> None:
    h = Hand()
    held(h, "MIS", 10)  # no tick seen: the close cannot be priced
    h.clock.set_ns(DAY0_NS + TO_1515)

    loop(h, 5.0)

    h.take()
    assert h.codes().count("square_off") == 1
    loop(h, 30.0)  # tried again after a while
    h.take()
    assert h.codes().count("square_off") == 2


def test_a_resting_square_off_close_is_left_to_fill_not_cancelled_by_the_next_round() -> None:
    h = Hand()
    held(h, "MIS", 10)
    h.tick(1290.0)
    h.clock.set_ns(DAY0_NS + TO_1515)
    loop(h, 0.5)
    [close] = places(h.take())
    h.ack(close)  # acknowledged, resting (not filled yet)

    loop(h, 40.0)

    assert not cancels(h.take()) and not places(h.take())
    assert h.codes().count("square_off") == 1
