"""Execution keeps a strategy risk stopped for the day (max_loss, target_profit) flat: risk's own
flatten closes what it held at the stop; a fill after that, or a position a restart finds, is
closed by a flatten of execution's own; and a stop belongs to the trading day it happened on."""

from __future__ import annotations

from libs.common.messages import CANCELLED, Flatten, RecordRiskEvent
from tests.unit.test_engine_faults import DAY0_NS, Hand, cancels, execute, places
from tests.unit.test_square_off import held, loop

DAY0 = "2025-11-21"


def stop(h: Hand, day: str = DAY0, sid: str = "s1") -> None:
    h.engine.record_risk_event(RecordRiskEvent(
        event="strategy_stopped", reason="net MTM -2100.00 reached its max_loss -2000.00",
        data={"strategy_id": sid, "trading_day": day}, request_id=f"risk-stop-{day}-{sid}",
        ts_ns=h.clock.now_ns()))  # fmt: skip
    h.engine.flush()


def closes(h: Hand) -> list[tuple[str, int, str]]:
    return [(h.order(p.order_id).side, h.order(p.order_id).quantity, h.order(p.order_id).purpose)
            for p in places(h.take())]  # fmt: skip


def test_a_fill_after_the_stop_is_closed_once_risks_flatten_has_had_its_time() -> None:
    h = Hand()
    h.tick(1290.0)
    stop(h)
    held(h, qty=4)  # a late fill: risk's flatten had already found the strategy flat

    loop(h, 4.0)
    assert closes(h) == []  # risk's own flatten comes first
    loop(h, 1.5)

    [close] = places(h.take())
    row = h.order(close.order_id)
    assert (row.side, row.quantity, row.purpose, row.strategy_id) == ("SELL", 4, "FLATTEN", "s1")
    texts = [a.text for a in h.alerts]
    assert "strategy s1 is stopped for the day but holds RELIANCE-EQ +4: closing it" in texts
    h.ack(close)
    h.trade(row, 4, "1289.00")
    loop(h, 40.0)
    assert closes(h) == [] and h.codes().count("stopped_position_closed") == 1


def test_a_strategy_that_is_not_stopped_keeps_its_position() -> None:
    h = Hand()
    h.tick(1290.0)
    stop(h, sid="other")
    held(h, qty=4)

    loop(h, 10.0)

    assert closes(h) == []


def test_after_a_restart_a_stopped_strategy_still_holding_is_closed() -> None:
    h = Hand()
    h.tick(1290.0)
    held(h, qty=10)
    stop(h)  # ... and execution stopped before risk's flatten reached it
    h.clock.set_ns(DAY0_NS + 60 * 1_000_000_000)

    again = Hand(store=h.store, clock=h.clock)
    again.tick(1290.0)
    loop(again, 0.5)

    assert closes(again) == [("SELL", 10, "FLATTEN")]


def test_a_stop_delivered_after_midnight_belongs_to_the_day_before() -> None:
    h = Hand()
    h.tick(1290.0)
    held(h, qty=10)

    stop(h, day="2025-11-20")  # risk queued it yesterday; execution was down over midnight

    assert h.engine.day_state().stopped == {}
    assert [r.request_id for r in h.store.risk_events("2025-11-20")] == ["risk-stop-2025-11-20-s1"]
    loop(h, 10.0)
    assert closes(h) == []


def test_a_fill_racing_risks_square_off_is_closed_by_it_once_and_not_by_a_second_flatten() -> None:
    h = Hand()
    h.tick(1290.0)
    held(h, qty=10)
    [r] = h.engine.submit([execute(qty=8, price="1289.00")])  # an entry still working at the stop
    h.ack(places(h.take())[0])
    entry = h.order(r.order_id)
    stop(h)
    h.engine.flatten(Flatten(request_id=f"risk-stop-{DAY0}-s1-flatten", strategy_id="s1", source="risk"),
                     lambda _report: None)  # fmt: skip
    [c] = cancels(h.take())
    h.answer(c, None)

    h.trade(entry, 5, "1289.00")  # part of it fills as its cancel goes out
    loop(h, 6.0)  # past the grace, the cancel still unconfirmed: risk's flatten is at work
    assert closes(h) == []
    h.status(entry, CANCELLED, filled=5)
    loop(h, 0.5)

    [close] = places(h.take())  # the whole position, in one close: risk's
    row = h.order(close.order_id)
    assert (row.side, row.quantity) == ("SELL", 15)
    assert row.request_id == f"flatten:risk-stop-{DAY0}-s1-flatten:s1:{row.key}"
    assert "stopped_position_closed" not in h.codes()
