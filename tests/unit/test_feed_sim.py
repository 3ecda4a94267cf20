"""The simulated market: seeded, on tick, independent per instrument."""

from __future__ import annotations

from decimal import Decimal

from libs.common.instruments import MasterData
from services.feed.sources.sim import Walk
from tests.kit.builders import front_future

MASTER = MasterData.load()


def _walk(symbol: str, seed: int = 42, vol: float = 0.0008) -> Walk:
    return Walk(MASTER.resolve(symbol), seed, vol)


def _prices(w: Walk, n: int) -> list[float]:
    return [w.step(i).ltp for i in range(n)]


def test_same_seed_gives_the_same_walk() -> None:
    assert _prices(_walk("RELIANCE-EQ"), 500) == _prices(_walk("RELIANCE-EQ"), 500)


def test_different_seeds_give_different_walks() -> None:
    assert _prices(_walk("RELIANCE-EQ", 1), 50) != _prices(_walk("RELIANCE-EQ", 2), 50)


def test_walk_starts_near_the_reference_price_and_stays_on_tick() -> None:
    inst = MASTER.resolve("HDFCBANK-EQ")  # tick 0.05, ref 985.40
    w = Walk(inst, 7, 0.0008)
    ticks = [w.step(i) for i in range(2000)]
    assert abs(ticks[0].ltp - 985.40) < 985.40 * 0.01
    for t in ticks:
        for price in (t.ltp, t.bid, t.ask):
            assert Decimal(repr(price)) % inst.tick_size == 0, price
        assert 0 < t.bid < t.ltp < t.ask
        assert t.low <= t.ltp <= t.high
        assert t.close == 985.40


def test_quantities_are_whole_lots_and_volume_accumulates() -> None:
    w = Walk(front_future("BANKNIFTY", MASTER), 42, 0.0008)  # lot 30
    ticks = [w.step(i) for i in range(200)]
    assert all(t.last_qty % 30 == 0 and t.last_qty > 0 for t in ticks)
    assert ticks[-1].volume == sum(t.last_qty for t in ticks)


def test_an_instruments_walk_does_not_depend_on_the_others() -> None:
    alone = _walk("TCS-EQ")
    mixed = _walk("TCS-EQ")
    other = _walk("INFY-EQ")
    a = []
    b = []
    for i in range(300):
        a.append(alone.step(i).ltp)
        other.step(i)
        b.append(mixed.step(i).ltp)
    assert a == b
