"""Exits only reduce: execution judges an EXIT against its own position, as of the last fill
it processed, less the exits already working (the paper broker inline, as the service runs it)."""

from __future__ import annotations

from libs.common.messages import COMPLETE, OPEN, REJECTED
from services.execution.model import STOP
from tests.unit.test_engine import Harness, bracket_entry, execute, fills_sum, h, legs

__all__ = ["h"]  # the fixture

# Found by `make chaos` (seed 20261202): a bracket's stop filled, and 34 ms later the strategy,
# whose view still showed the position, sent its exit; execution placed it and the exit opened
# a naked short of the same size that stayed unprotected for 13.5 s.


def test_an_exit_after_the_stop_closed_the_position_is_refused_and_opens_nothing(h: Harness) -> None:
    bracket_entry(h)
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)  # entry fills: long 10, stop live
    h.tick("RELIANCE-EQ", 1279.0, bid=1278.9, ask=1279.1)  # through the stop: flat again
    assert h.position() == 0 and [x.status for x in legs(h, STOP)] == [COMPLETE]
    places = h.broker.places

    [res] = h.submit(execute(side="SELL", qty=10, price=None, order_type="MARKET", purpose="EXIT"))

    row = h.order(res.order_id)
    assert row.status == REJECTED and "nothing to exit" in row.reason and "+0" in row.reason
    assert h.broker.places == places and h.position() == 0 == fills_sum(h)


def test_an_exit_larger_than_the_position_is_cut_to_what_is_held(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    h.submit(execute(qty=4, price=None, order_type="MARKET"))
    assert h.position() == 4

    [res] = h.submit(execute(side="SELL", qty=10, price=None, order_type="MARKET", purpose="EXIT"))

    assert h.order(res.order_id).quantity == 4 and h.order(res.order_id).status == COMPLETE
    assert h.position() == 0 == fills_sum(h)


def test_a_second_exit_while_the_first_still_works_is_refused(h: Harness) -> None:
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    h.submit(execute(qty=6, price=None, order_type="MARKET"))
    [first] = h.submit(execute(side="SELL", qty=6, price="1300.00", purpose="EXIT"))  # rests
    assert h.order(first.order_id).status == OPEN

    [second] = h.submit(execute(side="SELL", qty=6, price=None, order_type="MARKET", purpose="EXIT"))

    row = h.order(second.order_id)
    assert row.status == REJECTED and "exits of 6 already working" in row.reason
    h.tick("RELIANCE-EQ", 1301.0, bid=1300.9, ask=1301.1)  # the first fills
    assert h.position() == 0 == fills_sum(h)
