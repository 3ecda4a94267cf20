"""RiskSentinel judging a basket as one: every leg checked as an order, one failing leg
refuses the whole basket naming it, notional netted across the legs, every leg counted by
the throttle. Pure logic with a ManualClock on today's paper master (NIFTY weekly options)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common.chain import chain
from libs.common.clock import IST, ManualClock
from libs.common.config import RiskConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import BasketRequest, OrderRequest, Tick, VerdictCode, basket_leg_id
from services.admin.cmd_risk import LegError, parse_leg
from services.risk.sentinel import RiskSentinel
from services.strategy.base import Strategy, StrategyContext
from tests.kit import fill

MASTER = MasterData.load()
NOW_NS = time.time_ns()
TODAY = dt.datetime.fromtimestamp(NOW_NS / 1e9, IST).date()
WEEKLY = chain(MASTER, "NIFTY", "weekly", today=dt.datetime.fromtimestamp(NOW_NS / 1e9, IST))  # still trading
ATM = WEEKLY.strikes[len(WEEKLY.strikes) // 2]
CE = WEEKLY.call(ATM)
PE = WEEKLY.put(ATM)
CE_UP = WEEKLY.call(ATM + WEEKLY.step)
_ids = itertools.count(1)


def make(**risk: Any) -> tuple[RiskSentinel, ManualClock]:
    clock = ManualClock(NOW_NS)
    risk.setdefault("no_new_entries_after", "")  # (the expiry tests run late in the day)
    return RiskSentinel(RiskConfig(**risk), MASTER, clock), clock


def leg(side: str, inst: Instrument, qty: int, price: str, **kw: Any) -> OrderRequest:
    return OrderRequest(request_id="ignored", strategy_id="ignored", side=side, symbol=inst.symbol,
                        quantity=qty, price=Decimal(price), product="NRML", **kw)  # fmt: skip


def basket(*legs: OrderRequest, rid: str = "") -> BasketRequest:
    return BasketRequest(request_id=rid or f"bk{next(_ids)}", strategy_id="s1", legs=list(legs))


def test_one_invalid_leg_refuses_the_whole_basket_and_names_that_leg() -> None:
    s, _ = make()
    req = basket(leg("SELL", CE, 65, "120.05"), leg("SELL", PE, 50, "110.00"))

    verdict, execute = s.evaluate_basket(req)

    assert execute is None and not verdict.approved
    assert verdict.code == VerdictCode.LOT
    assert verdict.reason == (f"leg 2 SELL 50 {PE.symbol} @ 110.00: quantity 50 is not a multiple of "
                              f"lot size 65 for {PE.symbol}")  # fmt: skip
    assert [v.approved for v in verdict.legs] == [True, False]
    assert s._working == {} and len(s._approvals) == 0  # nothing of it counts as working


def test_every_failing_leg_is_named_in_the_request_order() -> None:
    s, _ = make()
    req = basket(leg("SELL", CE, 65, "120.03"), leg("BUY", PE, 65, "110.00"), leg("SELL", PE, 1, "110.00"))

    verdict, _ = s.evaluate_basket(req)

    assert verdict.reason.startswith(f"leg 1 SELL 65 {CE.symbol} @ 120.03: price 120.03 is not on tick size")
    assert f"; leg 3 SELL 1 {PE.symbol} @ 110.00: quantity 1 is not a multiple" in verdict.reason
    assert [v.code for v in verdict.legs] == [VerdictCode.TICK, "", VerdictCode.LOT]


def test_an_expired_contract_refuses_the_basket() -> None:
    s, clock = make()
    assert CE.expiry is not None
    after = dt.datetime.combine(CE.expiry + dt.timedelta(days=1), dt.time(10, 0), IST)
    clock._ns = int(after.timestamp() * 1e9)

    req = basket(leg("BUY", CE, 65, "120.00"), leg("SELL", CE_UP, 65, "90.00"))
    verdict, execute = s.evaluate_basket(req)

    assert execute is None
    assert verdict.code == VerdictCode.CONTRACT_EXPIRED
    expected = f"leg 1 BUY 65 {CE.symbol} @ 120.00: {CE.symbol} expired on {CE.expiry.isoformat()}"
    assert expected in verdict.reason


def test_a_hedged_spread_is_judged_on_its_net_notional() -> None:
    s, _ = make(max_notional=50_000.0, max_qty=1000)
    buy, sell = leg("BUY", CE, 650, "70.00"), leg("SELL", CE_UP, 650, "40.00")  # 45,500 and 26,000

    verdict, execute = s.evaluate_basket(basket(buy, sell))

    assert verdict.approved and execute is not None  # gross 71,500; net 19,500 is within the limit


def test_a_leg_over_max_notional_refuses_the_basket_even_when_its_hedge_nets_it() -> None:
    s, _ = make(max_notional=50_000.0, max_qty=1000)
    buy, sell = leg("BUY", CE, 650, "100.00"), leg("SELL", CE_UP, 650, "70.00")  # 65,000 and 45,500

    verdict, execute = s.evaluate_basket(basket(buy, sell))

    assert execute is None and verdict.code == VerdictCode.NOTIONAL  # the long may fill, the short rest
    assert verdict.reason == (f"leg 1 BUY 650 {CE.symbol} @ 100.00: notional 65000.00 exceeds "
                              "max_notional 50000.00")  # fmt: skip


def _future(underlying: str, n: int = 0) -> Instrument:
    futs = [i for i in MASTER.by_key.values() if i.underlying == underlying and i.inst_type == "FUTIDX"]
    return sorted(futs, key=lambda i: i.expiry or TODAY)[n]


def test_a_short_leg_in_another_underlying_counts_in_full_not_against_the_long() -> None:
    s, _ = make(max_notional=2_000_000.0)
    nifty, bank = _future("NIFTY"), _future("BANKNIFTY")
    req = basket(leg("BUY", nifty, nifty.lot_size, "25000.00"), leg("SELL", bank, bank.lot_size, "54000.00"))

    verdict, execute = s.evaluate_basket(req)

    assert execute is None and verdict.code == VerdictCode.NOTIONAL
    assert verdict.reason.startswith("basket net notional ")  # both legs in full, not their difference


def test_a_calendar_pair_is_not_a_hedge_for_the_notional() -> None:
    s, _ = make(max_notional=2_000_000.0)
    near, far = _future("NIFTY", 0), _future("NIFTY", 1)

    verdict, _ = s.evaluate_basket(basket(leg("BUY", near, 65, "25000.00"), leg("SELL", far, 65, "25100.00")))

    assert verdict.code == VerdictCode.NOTIONAL


def test_a_short_leg_larger_than_its_long_counts_the_uncovered_rest_in_full() -> None:
    s, _ = make(max_notional=27_000.0, max_qty=1000)
    # the long covers 65 of the 650 sold: 6,500 - 65 * 40 + 585 * 40 = 27,300 (netted alone: 19,500)
    req = basket(leg("BUY", CE, 65, "100.00"), leg("SELL", CE_UP, 650, "40.00"))

    verdict, _ = s.evaluate_basket(req)

    assert verdict.code == VerdictCode.NOTIONAL
    assert verdict.reason == "basket net notional 27300.00 exceeds max_notional 27000.00"


# ------------------------------------------------------------------ legs against one position


def test_two_sell_legs_cannot_both_reduce_the_same_long() -> None:
    s, _ = make()
    s.on_fill(fill(CE, "BUY", 65, "100.00", strategy="s1"))
    s.loss_breached = True  # REDUCING: only orders that close s1's position pass

    verdict, execute = s.evaluate_basket(basket(leg("SELL", CE, 65, "100.00"), leg("SELL", CE, 65, "100.00")))

    assert execute is None and verdict.code == VerdictCode.REDUCING
    assert [v.approved for v in verdict.legs] == [True, False]
    assert f"leg 2 SELL 65 {CE.symbol} @ 100.00: REDUCING" in verdict.reason
    assert s._working == {}  # the first leg's projection is not left behind


def test_two_reduce_only_legs_cannot_both_close_the_same_long() -> None:
    s, _ = make()
    s.on_fill(fill(CE, "BUY", 65, "100.00", strategy="s1"))

    verdict, _ = s.evaluate_basket(basket(leg("SELL", CE, 65, "100.00", reduce_only=True),
                                          leg("SELL", CE, 65, "100.00", reduce_only=True)))  # fmt: skip

    assert verdict.code == VerdictCode.REDUCE_ONLY
    assert "is more than the 0 that would close s1's position" in verdict.reason


def test_a_second_leg_in_a_position_the_first_closes_still_meets_the_open_positions_limit() -> None:
    s, _ = make(max_open_positions=1)
    s.on_fill(fill(CE, "BUY", 65, "100.00", strategy="s1"))

    # leg 1 closes the long; leg 2 would open a short in CE (not reducing) and leg 3 a new instrument
    verdict, _ = s.evaluate_basket(basket(leg("SELL", CE, 65, "100.00"), leg("SELL", CE, 65, "100.00"),
                                          leg("BUY", PE, 65, "80.00")))  # fmt: skip

    assert verdict.code == VerdictCode.POSITIONS
    assert [v.approved for v in verdict.legs] == [True, True, False]


def test_a_short_straddle_adds_up_its_premiums() -> None:
    s, _ = make(max_notional=50_000.0, max_qty=1000)

    verdict, _ = s.evaluate_basket(basket(leg("SELL", CE, 650, "40.00"), leg("SELL", PE, 650, "40.00")))

    assert verdict.code == VerdictCode.NOTIONAL
    assert verdict.reason == "basket net notional 52000.00 exceeds max_notional 50000.00"


def test_the_throttle_counts_every_leg() -> None:
    s, clock = make(max_orders_per_sec=3)
    three = basket(leg("BUY", CE, 65, "100.00"), leg("SELL", CE_UP, 65, "70.00"),
                   leg("SELL", PE, 65, "80.00"))

    first, _ = s.evaluate_basket(three)
    then, _ = s.evaluate(leg("BUY", PE, 65, "80.00"))
    clock.advance(1.0)
    four = basket(*[leg("BUY", CE, 65, "100.00")] * 2, *[leg("SELL", CE_UP, 65, "70.00")] * 2)
    too_many, _ = s.evaluate_basket(four)

    assert first.approved
    assert then.code == VerdictCode.THROTTLE
    assert too_many.code == VerdictCode.THROTTLE


def test_an_approved_basket_gives_each_leg_a_derived_id_and_a_repeat_the_same_answer() -> None:
    s, _ = make()
    req = basket(leg("BUY", CE, 65, "100.00"), leg("SELL", CE_UP, 65, "70.00"), rid="spread-1")

    verdict, execute = s.evaluate_basket(req)
    again, second = s.evaluate_basket(req)

    assert verdict.approved and execute is not None
    assert [x.request_id for x in execute.legs] == [basket_leg_id("spread-1", n) for n in (1, 2)]
    assert [x.order.strategy_id for x in execute.legs] == ["s1", "s1"]
    assert set(s._working) == {"spread-1:leg1", "spread-1:leg2"}
    assert again == verdict and second is None


def test_the_kill_switch_refuses_a_basket() -> None:
    s, _ = make()
    s.set_kill_switch(True, "manual")

    verdict, _ = s.evaluate_basket(basket(leg("BUY", CE, 65, "100.00"), leg("SELL", CE_UP, 65, "70.00")))

    assert verdict.code == VerdictCode.HALTED and verdict.reason.startswith("HALTED: kill switch is on")


def test_a_basket_of_one_leg_is_not_a_basket() -> None:
    s, _ = make()

    verdict, _ = s.evaluate_basket(basket(leg("BUY", CE, 65, "100.00")))

    assert verdict.code == VerdictCode.BASKET
    assert verdict.reason == "a basket has 2 to 4 legs, not 1"


def test_a_refused_execution_withdraws_every_leg() -> None:
    s, _ = make()
    req = basket(leg("BUY", CE, 65, "100.00"), leg("SELL", CE_UP, 65, "70.00"), rid="b9")
    s.evaluate_basket(req)

    verdict = s.basket_failed("b9", "execution refused: ledger unavailable")
    working_after = dict(s._working)
    retry, execute = s.evaluate_basket(req)

    assert not verdict.approved and working_after == {}
    assert [v.reason for v in verdict.legs] == ["execution refused: ledger unavailable"] * 2
    assert retry.approved and execute is not None  # judged again: nothing was placed


# ------------------------------------------------------------------ from a strategy


class _Straddle(Strategy):
    name = "straddle-test"

    def on_tick(self, tick: Tick) -> None:
        if self.is_flat(CE) and self.is_flat(PE):
            self.basket([self.leg("SELL", CE, 65, price=120), self.leg("SELL", PE, 50, price=110)])


def test_a_strategy_basket_reaches_risk_whole_and_each_leg_hears_its_own_verdict() -> None:
    s, clock = make()
    strat = _Straddle(StrategyContext("st1", clock=clock, master=MASTER, instruments=[],
                                      request_ids=StrategyContext.sequential_ids("st1")))  # fmt: skip
    rejected: list[tuple[str, str]] = []
    strat.on_reject = lambda req, reason: rejected.append((req.request_id, reason))  # type: ignore[method-assign]

    orders = strat.dispatch_tick(Tick(segment=CE.segment, token=CE.token, ltp=120.0))
    [sent] = strat.new_baskets
    verdict, _ = s.evaluate_basket(sent)
    strat.dispatch_basket_verdict(sent, verdict)

    assert orders == []  # the legs leave as the basket, never as orders of their own
    assert [x.request_id for x in sent.legs] == [f"{sent.request_id}:leg1", f"{sent.request_id}:leg2"]
    assert not verdict.approved
    assert [rid for rid, _ in rejected] == [f"{sent.request_id}:leg1", f"{sent.request_id}:leg2"]
    assert "leg 2 SELL 50" in rejected[0][1]  # the approved-alone leg hears why the basket failed
    assert strat.pending == {}


# ------------------------------------------------------------------ the CLI's --leg


def test_a_leg_quantity_too_large_to_send_is_a_usage_error_not_a_traceback() -> None:
    with pytest.raises(LegError, match=r"quantity 1{30} is more than 10,000,000 \(the most one order"):
        parse_leg("BUY INFY-EQ " + "1" * 30 + " @1500", MASTER, TODAY)
    ok = parse_leg("BUY INFY-EQ 10000000 @1500", MASTER, TODAY)
    assert ok.quantity == 10_000_000 and msgspec.msgpack.encode(ok)


# ------------------------------------------------------------------ the expiry day's close


def test_after_the_close_on_its_expiry_day_a_contract_is_expired_and_weekly_is_the_next() -> None:
    assert CE.expiry is not None
    s, clock = make()
    before = dt.datetime.combine(CE.expiry, dt.time(15, 29), IST)
    after = dt.datetime.combine(CE.expiry, dt.time(15, 30), IST)
    clock._ns = int(before.timestamp() * 1e9)
    open_, _ = s.evaluate(msgspec.structs.replace(leg("BUY", CE, 65, "100.00"), request_id="o1"))
    clock._ns = int(after.timestamp() * 1e9)
    closed, _ = s.evaluate(msgspec.structs.replace(leg("BUY", CE, 65, "100.00"), request_id="o2"))

    assert open_.approved
    assert closed.code == VerdictCode.CONTRACT_EXPIRED
    assert closed.reason == f"{CE.symbol} expired today ({CE.expiry.isoformat()}) at the 15:30 close"
    assert chain(MASTER, "NIFTY", "weekly", today=before).expiry == CE.expiry
    assert chain(MASTER, "NIFTY", "weekly", today=after).expiry > CE.expiry
    assert chain(MASTER, "NIFTY", "weekly", today=after.date()).expiry == CE.expiry  # a date has no time
