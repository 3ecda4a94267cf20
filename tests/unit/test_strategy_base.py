"""The Strategy API: complete orders, no double entry, own positions from execution's events,
isolation of a failing hook, typed params, the registry."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

import pytest

from libs.common.clock import ManualClock
from libs.common.messages import OrderRequest, Position, RiskVerdict, Sizing, Tick
from services.strategy import registry
from services.strategy.bars import Bar
from services.strategy.base import ERROR_REPEAT_S, ParamsError, Strategy, StrategyContext, StrategyParams
from tests.kit import MASTER, T0, S, fill_of, order_update, tick

REL = MASTER.resolve("RELIANCE-EQ")
KEY = REL.key


class RecordingLog:
    """Collects structured log calls (stands in for structlog)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **_kw: Any) -> RecordingLog:
        return self

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


class Probe(Strategy):
    """Buys on every tick (the base must stop the double entries)."""

    name = "probe"

    class Params(StrategyParams, frozen=True):
        quantity: int = 2
        stop_pct: float = 1.0

    def on_tick(self, tick: Tick) -> None:
        self.buy(tick, stop_loss=tick.ltp * (1 - self.params.stop_pct / 100), target=tick.ltp * 1.02)


class Exploding(Strategy):
    name = "exploding"

    def on_tick(self, tick: Tick) -> None:
        self.buy(tick, 1)  # queued, then the hook fails: it must never leave
        if tick.ltp > 100:
            raise RuntimeError("boom")


def _ctx(
    on_error: str = "continue", log: RecordingLog | None = None, clock: ManualClock | None = None
) -> StrategyContext:
    return StrategyContext(
        "s1",
        clock=clock or ManualClock(T0),
        master=MASTER,
        log=log or RecordingLog(),
        instruments=["RELIANCE-EQ"],
        on_error=on_error,
        request_ids=StrategyContext.sequential_ids("s1"),
    )


def _tick(ltp: float, ts: int = T0) -> Tick:
    return tick(REL, ltp, ts)


_update = order_update
_fill = fill_of


def test_buy_builds_a_complete_market_intent_bracket_order_snapped_to_tick() -> None:
    strat = Probe(_ctx())
    strat.dispatch_start()
    orders = strat.dispatch_tick(_tick(1290.53))
    assert len(orders) == 1
    req = orders[0]
    assert (req.side, req.quantity, req.price, req.purpose, req.reduce_only) == (
        "BUY",
        2,
        None,
        "ENTRY",
        False,
    )
    assert (req.symbol, req.segment, req.token, req.strategy_id) == ("RELIANCE-EQ", "nse_cm", "2885", "s1")
    assert req.stop_loss == Decimal("1277.6") and req.target == Decimal("1316.4")  # down / up to 0.1
    assert req.request_id == "s1-000001" and req.ts_ns == T0


def test_no_double_entry_while_an_order_is_in_flight_or_a_position_is_open() -> None:
    strat = Probe(_ctx())
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    assert strat.dispatch_tick(_tick(1291.0)) == ()  # pending at risk
    strat.dispatch_verdict(req, RiskVerdict(request_id=req.request_id, approved=True, order_id="o1"))
    strat.dispatch_order(_update(req, "OPEN"))
    assert strat.dispatch_tick(_tick(1292.0)) == ()  # open at the broker
    strat.dispatch_order(_update(req, "COMPLETE", 2, "1290.0"))
    strat.dispatch_fill(_fill(req, 2, "1290.0"))
    assert strat.position("RELIANCE-EQ") == 2
    assert strat.dispatch_tick(_tick(1293.0)) == ()  # holding


def test_an_on_order_hook_set_on_the_instance_is_called() -> None:
    # a plugin or wrapper may set the hook at start rather than in the class body
    seen: list[str] = []
    strat = Probe(_ctx())
    strat.dispatch_start()
    strat.on_order = lambda update: seen.append(update.status)  # type: ignore[method-assign]
    (req,) = strat.dispatch_tick(_tick(1290.0))
    strat.dispatch_verdict(req, RiskVerdict(request_id=req.request_id, approved=True, order_id="o1"))
    strat.dispatch_order(_update(req, "OPEN"))
    assert seen == ["OPEN"]


def test_a_rejected_order_frees_the_instrument_and_reaches_on_reject() -> None:
    seen: list[str] = []

    class Rejectable(Probe):
        def on_reject(self, request: OrderRequest, reason: str) -> None:
            seen.append(reason)

    clock = ManualClock(T0)
    strat = Rejectable(_ctx(clock=clock))
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    strat.dispatch_verdict(req, RiskVerdict(request_id=req.request_id, approved=False, reason="max_qty"))
    assert seen == ["max_qty"] and strat.pending == {}
    clock.advance(1.0)  # after the refusal back-off
    (again,) = strat.dispatch_tick(_tick(1290.0))
    assert again.request_id != req.request_id


@pytest.mark.parametrize("fill_first", [True, False])
def test_fill_and_order_update_in_either_order_are_booked_once(fill_first: bool) -> None:
    strat = Probe(_ctx())
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    fill, update = _fill(req, 2, "1290.0"), _update(req, "COMPLETE", 2, "1290.0")
    if fill_first:
        strat.dispatch_fill(fill)
        strat.dispatch_order(update)
    else:
        strat.dispatch_order(update)
        strat.dispatch_fill(fill)
    strat.dispatch_fill(_fill(req, 2, "1290.0"))  # a duplicate fill is ignored
    assert strat.position(KEY) == 2
    assert strat.positions[KEY].avg_price == 1290.0


def test_exit_closes_the_whole_position_once() -> None:
    strat = Probe(_ctx())
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    strat.dispatch_fill(_fill(req, 2, "1290.0"))
    ex = strat.exit(KEY)
    assert ex is not None and (ex.side, ex.quantity, ex.reduce_only, ex.purpose) == ("SELL", 2, True, "EXIT")
    assert strat.exit(KEY) is None  # already exiting
    strat._commit()
    strat.dispatch_fill(_fill(ex, 2, "1300.0", fid="f2", oid="o2"))
    assert strat.position(KEY) == 0
    assert strat.positions[KEY].realised == pytest.approx(20.0)
    assert strat.exit(KEY) is None  # flat


def test_on_tick_raising_is_isolated_and_nothing_half_built_leaves() -> None:
    log = RecordingLog()
    strat = Exploding(_ctx(log=log))
    strat.dispatch_start()
    assert strat.dispatch_tick(_tick(101.0)) == ()
    assert strat.pending == {} and strat.errors == 1 and not strat.halted
    errors = [kw for level, ev, kw in log.events if level == "error" and ev == "strategy_hook_failed"]
    assert errors and errors[0]["strategy_id"] == "s1" and errors[0]["hook"] == "on_tick"
    assert "boom" in errors[0]["error"] and errors[0]["action"] == "continue"
    (req,) = strat.dispatch_tick(_tick(99.0))  # keeps running
    assert req.quantity == 1


def test_on_error_stop_halts_with_a_clear_reason() -> None:
    strat = Exploding(_ctx(on_error="stop"))
    strat.dispatch_start()
    assert strat.dispatch_tick(_tick(101.0)) == ()
    assert strat.halted == "strategy s1 stopped: on_tick raised RuntimeError: boom"
    assert strat.dispatch_tick(_tick(99.0)) == ()  # nothing more runs


def test_params_are_typed_converted_and_unknown_keys_refused() -> None:
    strat = Probe(_ctx(), {"quantity": "7"})
    assert strat.params.quantity == 7
    with pytest.raises(ParamsError, match="unknown field `qty`"):
        Probe(_ctx(), {"qty": 1})
    with pytest.raises(ParamsError, match="quantity"):
        Probe(_ctx(), {"quantity": "many"})


def test_sizing_leaves_quantity_to_risk() -> None:
    class Sized(Strategy):
        name = "sized"

        def on_tick(self, tick: Tick) -> None:
            self.sell(
                tick, sizing=Sizing(capital=Decimal(100000), risk_pct=Decimal(1)), stop_loss=tick.ltp * 1.01
            )

    strat = Sized(_ctx())
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    assert req.quantity == 0 and req.sizing is not None and req.stop_loss == Decimal("1302.9")


def test_bars_reach_on_bar_only_for_strategies_that_want_them() -> None:
    got: list[Bar] = []

    class Barry(Strategy):
        name = "barry"

        def on_bar(self, bar: Bar) -> None:
            got.append(bar)

    strat = Barry(_ctx())
    strat.dispatch_start()
    for i in range(130):
        strat.dispatch_tick(_tick(100.0 + i, T0 + i * S))
    assert [b.start_ns for b in got] == [T0, T0 + 60 * S]
    assert got[0].open == 100.0 and got[0].close == 159.0
    strat.dispatch_timer(T0 + 183 * S)  # quiet instrument: the timer closes the bar (after the grace)
    assert len(got) == 3
    assert Probe(_ctx())._wants_bars is False


def test_unconfirmed_order_blocks_reentry_until_released(clock: ManualClock) -> None:
    strat = Probe(_ctx(clock=clock))
    strat.dispatch_start()
    (req,) = strat.dispatch_tick(_tick(1290.0))
    strat.dispatch_verdict(req, TimeoutError("no reply"))
    assert strat.dispatch_tick(_tick(1290.0)) == ()
    clock.advance(20)
    strat.dispatch_timer(clock.now_ns())
    assert len(strat.dispatch_tick(_tick(1290.0))) == 1


def test_restore_adopts_positions_from_execution() -> None:
    strat = Probe(_ctx())
    strat.restore(
        [
            Position(
                strategy_id="s1",
                symbol="RELIANCE-EQ",
                segment="nse_cm",
                token="2885",
                quantity=-3,
                avg_price=Decimal("1300"),
            )
        ]
    )
    strat.dispatch_start()
    assert strat.position(KEY) == -3
    assert strat.dispatch_tick(_tick(1290.0)) == ()
    ex = strat.exit(KEY)
    assert ex is not None and ex.side == "BUY" and ex.quantity == 3


def test_registry_finds_builtins_and_dotted_paths() -> None:
    assert registry.load("momentum").name == "momentum"
    assert registry.load("macd").name == "macd"
    assert registry.load("services.strategy.momentum:Momentum") is registry.load("momentum")
    with pytest.raises(registry.UnknownStrategy, match="unknown strategy 'nope'"):
        registry.load("nope")
    with pytest.raises(registry.UnknownStrategy, match="not a Strategy"):
        registry.load("services.strategy.base:StrategyContext")
    registry.register(Probe)
    assert registry.load("probe") is Probe


def test_refused_entries_back_off_and_an_approval_resets(clock: ManualClock) -> None:
    strat = Probe(_ctx(clock=clock))
    strat.dispatch_start()

    def refuse(req: OrderRequest) -> None:
        strat.dispatch_verdict(req, RiskVerdict(request_id=req.request_id, approved=False, reason="REDUCING"))

    (req,) = strat.dispatch_tick(_tick(1290.0))
    refuse(req)
    assert strat.dispatch_tick(_tick(1290.0)) == ()  # backing off 1 s
    clock.advance(1.0)
    (req,) = strat.dispatch_tick(_tick(1290.0))
    refuse(req)
    clock.advance(1.5)
    assert strat.dispatch_tick(_tick(1290.0)) == ()  # now 2 s
    clock.advance(0.5)
    (req,) = strat.dispatch_tick(_tick(1290.0))
    strat.dispatch_verdict(req, RiskVerdict(request_id=req.request_id, approved=True, order_id="o1"))
    assert strat._backoff == {}


class BarTrader(Strategy):
    """Uses every helper with the bar ``on_bar`` receives, as a new user would."""

    name = "bar_trader"
    seen: ClassVar[list[tuple[int, bool, bool]]] = []

    def on_bar(self, bar: Bar) -> None:
        self.seen.append((self.position(bar), self.is_flat(bar), self.has_orders(bar)))
        if self.position(bar) == 0:
            self.buy(bar, 3)
        else:
            self.exit(bar)


def test_helpers_accept_the_bar_on_bar_receives() -> None:
    BarTrader.seen = []
    strat = BarTrader(_ctx())
    strat.dispatch_start()
    strat.dispatch_tick(_tick(100.0, T0))

    (entry,) = strat.dispatch_tick(_tick(101.0, T0 + 60 * S))  # closes the first bar
    strat.dispatch_fill(_fill(entry, 3, "101.00"))
    strat.dispatch_order(_update(entry, "COMPLETE", 3, "101.00"))
    (leave,) = strat.dispatch_tick(_tick(102.0, T0 + 120 * S))

    assert (entry.side, entry.quantity, f"{entry.segment}|{entry.token}") == ("BUY", 3, KEY)
    assert (leave.side, leave.quantity, leave.purpose) == ("SELL", 3, "EXIT")
    assert BarTrader.seen == [(0, True, False), (3, False, False)]
    bar = Bar(key=KEY, start_ns=T0, end_ns=T0 + 60 * S, open=1, high=1, low=1, close=1)
    assert strat.key_of(bar) == KEY and strat.sell(bar, 1) is None  # a position is open


def test_a_hook_that_keeps_raising_logs_one_traceback_then_a_rate_limited_counter(clock: ManualClock) -> None:
    log = RecordingLog()
    strat = Exploding(_ctx(log=log, clock=clock))
    strat.dispatch_start()

    for _ in range(1000):  # a burst within one second: the first line only
        strat.dispatch_tick(_tick(101.0))
    clock.advance(ERROR_REPEAT_S)
    for _ in range(10):
        strat.dispatch_tick(_tick(101.0))

    lines = [kw for level, ev, kw in log.events if level == "error" and ev == "strategy_hook_failed"]
    assert strat.errors == 1010 and not strat.halted
    assert len(lines) == 2
    assert isinstance(lines[0]["exc_info"], RuntimeError) and lines[0]["errors"] == 1
    assert "exc_info" not in lines[1]
    assert (lines[1]["errors"], lines[1]["repeated"], lines[1]["action"]) == (1001, 999, "continue")


def test_a_new_kind_of_failure_gets_its_own_traceback_and_stop_always_logs() -> None:
    class Moody(Strategy):
        name = "moody"

        def on_tick(self, tick: Tick) -> None:
            raise (ValueError if tick.ltp > 100 else KeyError)("x")

    log = RecordingLog()
    strat = Moody(_ctx(log=log))
    strat.dispatch_start()
    for ltp in (101.0, 101.0, 99.0, 99.0):
        strat.dispatch_tick(_tick(ltp))
    stopper = Moody(_ctx(on_error="stop", log=log))
    stopper.dispatch_start()
    stopper.dispatch_tick(_tick(101.0))

    lines = [kw for level, ev, kw in log.events if ev == "strategy_hook_failed"]
    assert [(kw["errors"], type(kw.get("exc_info")).__name__) for kw in lines] == [
        (1, "ValueError"), (3, "KeyError"), (1, "ValueError"),
    ]
    assert lines[-1]["action"] == "stop" and stopper.halted
