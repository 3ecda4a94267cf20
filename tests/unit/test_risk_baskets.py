"""RiskSentinel judging a basket as one: every leg checked as an order, one failing leg
refuses the whole basket naming it, notional netted across the legs, every leg counted by
the throttle. Pure logic with a ManualClock on today's paper master (NIFTY weekly options)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from decimal import Decimal
from typing import Any

from libs.common.chain import chain
from libs.common.clock import IST, ManualClock
from libs.common.config import RiskConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import BasketRequest, OrderRequest, Tick, VerdictCode, basket_leg_id
from services.risk.sentinel import RiskSentinel
from services.strategy.base import Strategy, StrategyContext

MASTER = MasterData.load()
NOW_NS = time.time_ns()
TODAY = dt.datetime.fromtimestamp(NOW_NS / 1e9, IST).date()
WEEKLY = chain(MASTER, "NIFTY", "weekly", today=TODAY)
ATM = WEEKLY.strikes[len(WEEKLY.strikes) // 2]
CE = WEEKLY.call(ATM)
PE = WEEKLY.put(ATM)
CE_UP = WEEKLY.call(ATM + WEEKLY.step)
_ids = itertools.count(1)


def make(**risk: Any) -> tuple[RiskSentinel, ManualClock]:
    clock = ManualClock(NOW_NS)
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
    buy, sell = leg("BUY", CE, 650, "100.00"), leg("SELL", CE_UP, 650, "70.00")  # 65,000 and 45,500

    alone, _ = make(max_notional=50_000.0, max_qty=1000)[0].evaluate(buy)
    verdict, execute = s.evaluate_basket(basket(buy, sell))

    assert alone.code == VerdictCode.NOTIONAL  # the long leg alone is over the limit
    assert verdict.approved and execute is not None  # net 19,500 is within it


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
