"""Order ids, client tags and the trading day of a trade, as the engine makes them per order."""

from __future__ import annotations

import datetime as dt
import re
import uuid

from libs.common.clock import IST, ManualClock
from libs.common.config import load_config
from libs.common.instruments import MasterData
from services.execution.brokers.paper import PaperBroker
from services.execution.engine import ExecutionEngine
from services.execution.model import new_client_tag, new_id
from services.execution.store import MemoryOrderStore


def test_order_ids_are_random_version_4_uuids_as_text() -> None:
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in list(ids)[:200]:
        u = uuid.UUID(text)
        assert str(u) == text
        assert u.version == 4
        assert u.variant == uuid.RFC_4122


def test_client_tags_are_np_and_ten_base32_characters() -> None:
    tags = [new_client_tag() for _ in range(2000)]
    assert all(re.fullmatch(r"np[a-z2-7]{10}", t) for t in tags)
    assert len(set(tags)) == 2000
    assert {c for t in tags for c in t[2:]} == set("abcdefghijklmnopqrstuvwxyz234567")


def test_the_trading_day_of_a_trade_is_its_ist_date_also_around_midnight() -> None:
    master = MasterData.load()
    clock = ManualClock(1_704_167_100_000_000_000)
    broker = PaperBroker(master, clock)
    engine = ExecutionEngine(MemoryOrderStore(), broker, master, clock, load_config(env={}).execution)
    midnight = int(dt.datetime(2024, 1, 3, tzinfo=IST).timestamp()) * 1_000_000_000
    for offset_ns in (-86_400 * 10**9, -10**9, -1000, -1, 0, 1, 10**6, 3600 * 10**9, -3600 * 10**9, 5):
        ts = midnight + offset_ns
        want = dt.datetime.fromtimestamp(ts / 1e9, IST).strftime("%Y-%m-%d")
        assert engine._day_of(ts) == want, offset_ns
    assert engine._day_of(midnight - 3600 * 10**9) == "2024-01-02"
    assert engine._day_of(midnight + 3600 * 10**9) == "2024-01-03"
    assert engine._day_of(0) == engine.day
