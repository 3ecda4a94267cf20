"""The ledger on real PostgreSQL: migrations, idempotency, unique keys, append-only events,
the same behaviour from the in-memory store, the engine on top of it, and the embedded
server surviving kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from libs.common.messages import COMPLETE, OPEN, PENDING_BROKER
from services.execution.ledger import PgOrderStore
from services.execution.model import (
    BasketRow,
    BracketRow,
    Changes,
    EventRow,
    FillRow,
    OrderQuery,
    OrderRow,
    RiskEventRow,
    new_client_tag,
    new_id,
)
from services.execution.store import LedgerError, MemoryOrderStore, OrderStore
from tests.helpers import eventually
from tests.unit.test_engine import NIFTY, Harness, execute, fills_sum, legs

DAY = "2025-11-21"
NS = 1_763_700_000_000_000_000


def order(rid: str, **kw: object) -> OrderRow:
    base = dict(
        order_id=new_id(),
        request_id=rid,
        client_tag=new_client_tag(),
        strategy_id="s1",
        segment="nse_cm",
        token="2885",
        symbol="RELIANCE-EQ",
        side="BUY",
        order_type="LIMIT",
        product="MIS",
        quantity=10,
        price=Decimal("1290.50"),
        status=PENDING_BROKER,
        trading_day=DAY,
        created_ns=NS,
        updated_ns=NS,
    )
    base.update(kw)
    return OrderRow(**base)  # type: ignore[arg-type]


def pending(o: OrderRow) -> Changes:
    return Changes(new_orders=[o], events=[EventRow(o.order_id, "PENDING", "", o.status, NS, {"p": 1})])


@pytest.fixture(params=["memory", "pg"])
def store(request: pytest.FixtureRequest) -> Iterator[OrderStore]:
    if request.param == "memory":
        yield MemoryOrderStore()
        return
    s = PgOrderStore(request.getfixturevalue("pg_url"))
    yield s
    s.close()


def test_migrations_are_applied_once_and_tracked(empty_pg_url: str) -> None:
    s = PgOrderStore(empty_pg_url)
    assert s.migrate() == ["0001_ledger", "0002_ledger_write", "0003_fills_segment", "0004_baskets",
                                 "0005_stop_moves", "0006_stop_pct", "0007_update_by_key"]
    assert s.migrate() == []
    with psycopg.connect(empty_pg_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert {
        "order_ledger",
        "order_events",
        "fills",
        "brackets",
        "instrument_master",
        "risk_events",
        "baskets",
        "schema_migrations",
    } <= tables
    assert versions == ["0001_ledger", "0002_ledger_write", "0003_fills_segment", "0004_baskets",
                                 "0005_stop_moves", "0006_stop_pct", "0007_update_by_key"]
    s.close()


def test_a_repeated_request_id_returns_the_existing_row_and_writes_nothing(store: OrderStore) -> None:
    first = order("req-1")
    assert store.write(pending(first)) == {}
    again = order("req-1", quantity=99)
    conflicts = store.write(pending(again))
    assert conflicts["req-1"].order_id == first.order_id and conflicts["req-1"].quantity == 10
    assert [e.kind for e in store.events_for(first.order_id)] == ["PENDING"]
    assert store.events_for(again.order_id) == []
    assert len(store.query_orders(OrderQuery())) == 1


def test_a_repeated_sliced_order_skips_its_children_and_events(store: OrderStore) -> None:
    parent = order("big", quantity=3750, sliced=True)
    store.write(pending(parent))
    again = order("big", quantity=3750, sliced=True)
    kids = [
        order(f"big#{n}", quantity=q, parent_id=again.order_id) for n, q in ((1, 1800), (2, 1800), (3, 150))
    ]
    ch = pending(again)
    ch.new_orders.extend(kids)
    ch.events.extend(EventRow(k.order_id, "PENDING", "", k.status, NS) for k in kids)
    conflicts = store.write(ch)
    assert list(conflicts) == ["big"] and conflicts["big"].order_id == parent.order_id
    assert [o.request_id for o, _ in store.query_orders(OrderQuery())] == ["big"]


def test_a_settled_group_is_read_back_by_its_order_ids_with_its_bracket(store: OrderStore) -> None:
    entry = order("e-1", bracket_id=new_id(), status="CANCELLED")
    leg = order("e-1:stop", parent_id=entry.order_id, bracket_id=entry.bracket_id, side="SELL",
                purpose="STOP", broker_order_id="251121000000042")  # fmt: skip
    b = BracketRow(bracket_id=entry.bracket_id, entry_id=entry.order_id, strategy_id="s1", segment="nse_cm",
                   token="2885", symbol="RELIANCE-EQ", side="BUY", product="MIS", stop_loss=Decimal("1280"),
                   target=Decimal("1300"), state="CANCELLED", trading_day=DAY, created_ns=NS,
                   updated_ns=NS)  # fmt: skip
    ch = pending(entry)
    ch.new_orders.append(leg)
    ch.brackets[b.bracket_id] = b
    store.write(ch)
    other = order("e-2")
    store.write(pending(other))

    rows = store.find_by_order_ids([entry.order_id, leg.order_id, new_id()])
    found = store.find_brackets([b.bracket_id, new_id()])

    assert sorted(rows) == sorted([entry.order_id, leg.order_id])
    assert rows[leg.order_id].parent_id == entry.order_id and rows[leg.order_id].purpose == "STOP"
    assert list(found) == [b.bracket_id] and found[b.bracket_id].state == "CANCELLED"
    assert found[b.bracket_id].entry_id == entry.order_id
    assert store.find_by_order_ids([]) == {} and store.find_brackets([]) == {}
    family = store.find_by_order_ids([entry.order_id], with_children=True)  # a root and its children
    assert sorted(family) == sorted([entry.order_id, leg.order_id])


def test_client_tag_is_unique(store: OrderStore) -> None:
    a = order("a")
    store.write(pending(a))
    with pytest.raises(LedgerError):
        store.write(pending(order("b", client_tag=a.client_tag)))
    assert [o.request_id for o, _ in store.query_orders(OrderQuery())] == ["a"]


def test_fills_are_unique_per_broker_trade_id_and_day(store: OrderStore) -> None:
    o = order("f")
    store.write(pending(o))
    fill = FillRow(
        trade_id="T1",
        order_id=o.order_id,
        broker_order_id="B1",
        strategy_id="s1",
        segment="nse_cm",
        token="2885",
        symbol="RELIANCE-EQ",
        side="BUY",
        quantity=4,
        price=Decimal("1290.45"),
        ts_ns=NS,
        trading_day=DAY,
    )
    store.write(Changes(fills=[fill]))
    store.write(Changes(fills=[fill]))
    [(_, fills)] = store.query_orders(OrderQuery())
    assert [(f.trade_id, f.quantity, f.price) for f in fills] == [("T1", 4, Decimal("1290.45"))]
    assert len(store.load_fills(DAY)) == 1


def test_updates_events_and_reload(store: OrderStore) -> None:
    o = order("u")
    store.write(pending(o))
    o.status, o.broker_order_id, o.filled_qty, o.avg_price = COMPLETE, "B9", 10, Decimal("1290.1234567")
    store.write(
        Changes(updated={o.order_id: o}, events=[EventRow(o.order_id, "COMPLETE", OPEN, COMPLETE, NS)])
    )
    [loaded] = store.load_orders(DAY)
    assert (loaded.status, loaded.broker_order_id, loaded.avg_price) == (
        COMPLETE,
        "B9",
        Decimal("1290.1234567"),
    )
    assert [e.kind for e in store.events_for(o.order_id)] == ["PENDING", "COMPLETE"]
    assert store.load_orders("2025-11-24") == []  # terminal rows of another day stay in the ledger
    assert (
        store.query_orders(OrderQuery(status="complete", symbol="reliance-eq"))[0][0].order_id == o.order_id
    )
    assert store.query_orders(OrderQuery(strategy_id="other")) == []


def test_open_baskets_and_todays_failed_baskets_with_closes_are_loaded_at_start(store: OrderStore) -> None:
    def basket(rid: str, state: str, day: str = DAY, closes: int = 0) -> BasketRow:
        return BasketRow(basket_id=str(uuid.uuid4()), request_id=rid, strategy_id="s1",
                         legs=[str(uuid.uuid4())], state=state, trading_day=day, created_ns=NS, updated_ns=NS,
                         closes=[str(uuid.uuid4()) for _ in range(closes)])  # fmt: skip

    rows = [basket("open", "PLACED"), basket("rolling", "ROLLING_BACK"), basket("done", "COMPLETE"),
            basket("failed-closing", "FAILED", closes=1), basket("failed-bare", "FAILED"),
            basket("failed-earlier", "FAILED", day="2026-01-02", closes=1)]  # fmt: skip
    store.write(Changes(baskets={k.basket_id: k for k in rows}))

    assert sorted(k.request_id for k in store.load_open_baskets(DAY)) == ["failed-closing", "open", "rolling"]
    assert sorted(k.request_id for k in store.load_open_baskets()) == ["open", "rolling"]


def test_entry_counts_are_the_days_entry_orders_per_strategy_and_instrument(store: OrderStore) -> None:
    parent = order("e1", purpose="ENTRY", sliced=True)
    rows = [parent, order("e1:1", purpose="ENTRY", parent_id=parent.order_id),  # a slice: not another entry
            order("e2", purpose="MANUAL"), order("x1", purpose="EXIT", side="SELL"),  # neither counts
            order("r1", purpose="ENTRY", status="REJECTED"),  # refused: not an entry
            order("e3", purpose="ENTRY", token="1594", symbol="INFY-EQ"),
            order("e4", purpose="ENTRY", strategy_id="s2"),
            order("y1", purpose="ENTRY", trading_day="2025-11-20")]  # fmt: skip
    for o in rows:
        store.write(pending(o))

    assert store.entry_counts(DAY) == {("s1", "nse_cm", "2885"): 1, ("s1", "nse_cm", "1594"): 1,
                                       ("s2", "nse_cm", "2885"): 1}  # fmt: skip


def test_risk_events_are_stored_once_per_request_id(store: OrderStore) -> None:
    ev = RiskEventRow(
        event="kill_switch_on",
        reason="manual",
        source="cli",
        ts_ns=NS,
        trading_day=DAY,
        data={"kill_switch": True},
        request_id="ks-1",
    )
    store.write(Changes(risk_events=[ev]))
    store.write(Changes(risk_events=[ev]))
    [got] = store.risk_events(DAY)
    assert (got.event, got.data) == ("kill_switch_on", {"kill_switch": True})


def test_order_events_are_append_only(pg_url: str) -> None:
    s = PgOrderStore(pg_url)
    o = order("e")
    s.write(pending(o))
    with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute("UPDATE order_events SET kind = 'X'")
    with psycopg.connect(pg_url) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM order_events")]
        types = conn.execute(
            "SELECT pg_typeof(price)::text, pg_typeof(internal_id)::text FROM order_ledger"
        ).fetchone()
    assert kinds == ["PENDING"] and types == ("numeric", "uuid")
    s.close()


def test_engine_on_postgres_lifecycle_slicing_and_bracket_restart(pg_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "paper.jsonl"
    store = PgOrderStore(pg_url)
    h = Harness(store=store, journal=journal)
    h.tick(NIFTY.symbol, 25950.0, bid=25949.9, ask=25950.1)
    [sliced] = h.submit(execute(NIFTY.symbol, qty=3900, price="25960.00"))  # 60 lots of 65
    h.tick("RELIANCE-EQ", 1300.0, bid=1299.9, ask=1300.1)
    [entry] = h.submit(
        execute(qty=10, price="1295.00", stop_loss=Decimal("1280.00"), target=Decimal("1320.00"))
    )
    h.tick("RELIANCE-EQ", 1294.0, bid=1293.9, ask=1294.0)
    assert [x.status for x in legs(h, "STOP")] == [OPEN]
    h.broker.close()
    store.close()

    store2 = PgOrderStore(pg_url)
    h2 = Harness(store=store2, journal=journal, clock=h.clock)
    h2.tick("RELIANCE-EQ", 1321.0, bid=1320.9, ask=1321.1)

    assert [x.status for x in legs(h2, "TARGET")] == [COMPLETE]
    assert [x.status for x in legs(h2, "STOP")] == ["CANCELLED"]
    assert h2.position() == 0 == fills_sum(h2)
    assert h2.position(NIFTY.symbol) == 3900 == fills_sum(h2, NIFTY.symbol)
    with psycopg.connect(pg_url) as conn:
        kids = conn.execute(
            "SELECT quantity FROM order_ledger WHERE parent_id = %s ORDER BY quantity DESC",
            (sliced.order_id,),
        ).fetchall()
        bracket = conn.execute("SELECT state, entry_filled, exit_filled FROM brackets").fetchone()
        dup_tags = conn.execute("SELECT count(*) - count(DISTINCT client_tag) FROM order_ledger").fetchone()
    assert [k[0] for k in kids] == [1755, 1755, 390]  # freeze 1,800 → 27 lots of 65
    assert bracket == ("CLOSED", 10, 10)
    assert dup_tags == (0,)
    assert h2.engine.orders[entry.order_id].status == COMPLETE
    store2.close()


def test_a_trailing_stop_on_postgres_resumes_from_the_stop_it_reached(pg_url: str, tmp_path: Path) -> None:
    # Arrange: a BUY with a 10-point trail; the price runs to 1310, the stop follows to 1300.
    journal = tmp_path / "paper.jsonl"
    store = PgOrderStore(pg_url)
    h = Harness(store=store, journal=journal)
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.0)
    [entry] = h.submit(execute(price="1290.00", stop_loss=Decimal("1280.00"), target=Decimal("1400.00"),
                               trail_points=Decimal("10")))  # fmt: skip
    h.tick("RELIANCE-EQ", 1289.0, bid=1288.9, ask=1289.0)
    h.clock.advance(1.1)
    h.tick("RELIANCE-EQ", 1310.0, bid=1309.9, ask=1310.0)
    h.engine.flush()
    h.broker.close()
    store.close()

    # Act: a restart on the same ledger; the price dips, then rises a little.
    store2 = PgOrderStore(pg_url)
    h2 = Harness(store=store2, journal=journal, clock=h.clock)
    h2.clock.advance(1.1)
    h2.tick("RELIANCE-EQ", 1305.0, bid=1304.9, ask=1305.0)
    h2.clock.advance(1.1)
    h2.tick("RELIANCE-EQ", 1312.0, bid=1311.9, ask=1312.0)

    # Assert: the stop was never loosened to its first level and moved on from 1300.
    [stop] = [x for x in legs(h2, "STOP") if not x.terminal]
    assert stop.trigger_price == Decimal("1302.00")
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT stop_loss, trail_points, trail_pct, trail_best FROM brackets "
                           "WHERE entry_id = %s", (entry.order_id,)).fetchone()  # fmt: skip
        trail_events = conn.execute("SELECT payload->>'trigger_price' FROM order_events WHERE order_id = %s "
                                    "AND kind = 'MODIFIED' ORDER BY id", (stop.order_id,)).fetchall()
    assert row == (Decimal("1302.00"), Decimal("10"), None, Decimal("1312.0"))
    assert [Decimal(r[0]) for r in trail_events] == [Decimal("1300"), Decimal("1302")]
    store2.close()


def test_a_stop_pct_waits_in_the_ledger_for_the_fill_across_a_restart(pg_url: str, tmp_path: Path) -> None:
    # Arrange: a SELL resting at 1300 with its stop 10 % above the fill (risk's estimate 1430).
    journal = tmp_path / "paper.jsonl"
    store = PgOrderStore(pg_url)
    h = Harness(store=store, journal=journal)
    h.tick("RELIANCE-EQ", 1290.0, bid=1289.9, ask=1290.1)
    [entry] = h.submit(execute(side="SELL", price="1300.00", stop_loss=Decimal("1430.00"),
                               stop_loss_pct=Decimal("10")))  # fmt: skip
    h.engine.flush()
    with psycopg.connect(pg_url) as conn:
        waiting = conn.execute("SELECT stop_loss, stop_pct FROM brackets WHERE entry_id = %s",
                               (entry.order_id,)).fetchone()  # fmt: skip
    assert waiting == (Decimal("1430.00"), Decimal("10"))
    h.broker.close()
    store.close()

    # Act: restarted before the fill; then the price rises through the entry, which fills.
    store2 = PgOrderStore(pg_url)
    h2 = Harness(store=store2, journal=journal, clock=h.clock)
    h2.tick("RELIANCE-EQ", 1301.0, bid=1300.9, ask=1301.1)
    h2.engine.flush()

    # Assert: the stop is 10 % above the fill, and the ledger says it is anchored.
    [stop] = [x for x in legs(h2, "STOP") if not x.terminal]
    avg = h2.engine.orders[entry.order_id].avg_price
    assert avg is not None and stop.trigger_price == (avg * Decimal("1.1")).quantize(Decimal("0.10"))
    with psycopg.connect(pg_url) as conn:
        anchored = conn.execute("SELECT stop_loss, stop_pct FROM brackets WHERE entry_id = %s",
                                (entry.order_id,)).fetchone()  # fmt: skip
    assert anchored == (stop.trigger_price, None)
    store2.close()


def test_a_ledger_outage_refuses_orders_instead_of_sending_them(pg_url: str) -> None:
    store = PgOrderStore(pg_url)
    h = Harness(store=store)
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    [res] = h.submit(execute(price="1290.00"))  # the broken connection fails this write
    if not res.ok:
        assert res.code == "ledger" and h.broker.places == 0
    [res2] = h.submit(execute(price="1290.00"))  # and the store reconnects for the next one
    assert res2.ok and h.engine.orders[res2.order_id].status == OPEN
    store.close()


def test_carried_nets_are_the_nrml_and_cnc_net_of_earlier_days_per_strategy(store: OrderStore) -> None:
    kinds = [("NRML", "s1"), ("MIS", "s1"), ("NRML", "s1"), ("CNC", "s2")]
    rows = [order(f"cn-{i}", product=prod, strategy_id=sid) for i, (prod, sid) in enumerate(kinds)]
    sides, qtys, prices = ["BUY", "BUY", "SELL", "BUY"], [30, 5, 10, 7], ["100", "100", "110", "50"]

    def fill(i: int, o: OrderRow) -> FillRow:
        return FillRow(f"T{i}", o.order_id, "", o.strategy_id, o.segment, o.token, o.symbol, sides[i],
                       qtys[i], Decimal(prices[i]), NS + i, DAY)  # fmt: skip

    fills = [fill(i, o) for i, o in enumerate(rows)]
    store.write(Changes(new_orders=rows, fills=fills))

    nets = sorted(
        (c.strategy_id, c.product, c.quantity, c.avg_price) for c in store.carried_nets("2025-11-24")
    )

    assert nets == [("s1", "NRML", 20, Decimal(100)), ("s2", "CNC", 7, Decimal(50))]
    assert store.carried_nets(DAY) == []  # nothing before the day itself


def test_nul_characters_are_stored_replaced_instead_of_failing_the_transaction(pg_url: str) -> None:
    # PostgreSQL's text and jsonb hold no NUL: a kill-switch reason or a broker reply carrying
    # one used to fail the whole change set, retried forever ("ledger unavailable")
    s = PgOrderStore(pg_url)
    o = order("nul-1", reason="broker said \x00 no")
    event = EventRow(o.order_id, "PENDING", "", o.status, NS, {"raw": "a\x00b"})
    risk = RiskEventRow("kill_switch_on", "halt \x00 now", "cli", NS, DAY, {"why": "x\x00y"}, "nul-ev-1")
    s.write(Changes(new_orders=[o], events=[event], risk_events=[risk]))
    [ev] = [r for r in s.risk_events(DAY) if r.request_id == "nul-ev-1"]
    assert ev.reason == "halt \ufffd now" and ev.data == {"why": "x\ufffdy"}
    assert s.events_for(o.order_id)[0].payload == {"raw": "a\ufffdb"}
    assert s.find_by_request_ids(["nul-1"])["nul-1"].reason == "broker said \ufffd no"
    s.close()


def test_an_order_the_ledger_refuses_is_set_aside_and_the_rest_of_the_batch_is_written(pg_url: str) -> None:
    store = PgOrderStore(pg_url)
    h = Harness(store=store)
    h.tick("RELIANCE-EQ", 1295.0, bid=1294.9, ask=1295.1)
    huge = execute(price="1200.00", qty=3_000_000_000)  # beyond the INTEGER quantity column

    bad, good = h.submit(huge, execute(price="1200.00"))

    assert not bad.ok and "the ledger refused the order" in bad.reason
    assert good.ok and h.engine.orders[good.order_id].status == OPEN
    assert h.broker.places == 1  # the refused order never reached the broker
    assert "ledger_quarantine" in {getattr(m, "code", "") for m in h.published}
    [res] = h.submit(execute(price="1200.00"))  # and nothing stays wedged
    assert res.ok and not h.engine.pending_writes()
    store.close()


# ---------------------------------------------------------------------------- embedded server

_EMBEDDED = """
import sys, time
from pathlib import Path
from services.execution.embedded_pg import start_embedded
db = start_embedded(Path(sys.argv[1]))
print("READY", db.server.get_pid(), round(db.startup_ms), flush=True)
if sys.argv[2] == "hang":
    time.sleep(60)
"""


def _run_embedded(pgdata: Path, mode: str) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[2]
    with (pgdata.parent / "owner.err").open("a") as err:
        return subprocess.Popen(
            [sys.executable, "-c", _EMBEDDED, str(pgdata), mode],
            cwd=root,
            text=True,
            stdout=subprocess.PIPE,
            stderr=err,
        )


def _ready(proc: subprocess.Popen[str], pgdata: Path) -> int:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            return int(line.split()[1])
    err = (pgdata.parent / "owner.err").read_text()[-3000:]
    raise AssertionError(f"embedded server did not start (rc={proc.wait()}): {err}")


@pytest.fixture
def pg_parent() -> Iterator[Path]:
    """Outside pytest's tmp tree, which a concurrent pytest run may chmod 0700 at any time:
    postgres runs as the `pgserver` user when the tests run as root and must reach its data."""
    parent = Path(tempfile.mkdtemp(prefix="neopulse-emb-"))
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def test_embedded_server_survives_kill_9_of_its_owner_and_of_postgres(pg_parent: Path) -> None:
    pgdata = pg_parent / "pgdata"
    owner = _run_embedded(pgdata, "hang")
    pid1 = _ready(owner, pgdata)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    again = _run_embedded(pgdata, "hang")
    assert _ready(again, pgdata) == pid1  # the server left running is reused
    os.kill(pid1, signal.SIGKILL)  # now postgres itself dies hard
    again.send_signal(signal.SIGKILL)
    again.wait()
    third = _run_embedded(pgdata, "exit")
    pid3 = _ready(third, pgdata)
    assert pid3 != pid1 and third.wait(timeout=30) == 0

    def stopped() -> bool:
        try:
            os.kill(pid3, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid3}/status").read_text().count("zombie") > 0

    eventually(stopped, timeout=10, message="the last owner's clean exit to stop the embedded server")


def test_settled_orders_on_postgres_answer_repeats_and_come_back_for_a_late_trade(pg_url: str) -> None:
    from libs.common.messages import CANCELLED
    from services.execution.model import STOP, TARGET
    from tests.unit.test_engine_eviction import book_row, is_settled, settle
    from tests.unit.test_engine_faults import Hand, places
    from tests.unit.test_engine_faults import execute as hand_execute

    store = PgOrderStore(pg_url)
    h = Hand(store=store)  # type: ignore[arg-type]
    cmd = hand_execute(stop_loss=Decimal("1280.00"), target=Decimal("1300.00"))
    [res] = h.engine.submit([cmd])
    h.ack(places(h.take())[0])
    entry = h.order(res.order_id)
    h.status(entry, CANCELLED, filled=0)  # closed unfilled: its bracket is CANCELLED
    settle(h, [book_row(entry, CANCELLED)])
    assert is_settled(h.engine, entry) and entry.bracket_id not in h.engine.brackets

    [again] = h.engine.submit([cmd])  # risk retries the old request id
    assert again.ok and again.order_id == entry.order_id and not places(h.take())

    tr = h.trade(entry, 10, "1290.00")  # a fill after the cancel
    h.engine.on_broker_event(tr)  # and the same trade once more
    h.engine.flush()

    assert h.position() == 10 and not is_settled(h.engine, entry)
    assert sorted(h.order(p.order_id).purpose for p in places(h.take())) == [STOP, TARGET]
    with psycopg.connect(pg_url) as conn:
        n = conn.execute("SELECT count(*), sum(quantity) FROM fills WHERE order_id = %s",
                         (entry.order_id,)).fetchone()  # fmt: skip
        rows = conn.execute("SELECT count(*) FROM order_ledger WHERE request_id = %s",
                            (cmd.request_id,)).fetchone()  # fmt: skip
    assert n == (1, 10) and rows == (1,)
    store.close()


def test_an_order_update_finds_its_row_by_key_in_a_table_of_any_size(pg_url: str) -> None:
    """np_ledger_write's UPDATE joined the updates (jsonb_to_recordset, which the planner always
    guesses at 100 rows) to order_ledger. With a few thousand rows, a hash join over the whole
    table looked cheaper than 100 key lookups, so every write read every order of the day: a soak
    saw tick -> ack p50 creep from 8 to 13 ms over 9,000 orders. The update must use the key
    (migration 0007)."""
    from services.execution.ledger import _WRITE, _write_args

    # Arrange: a day of 3,000 orders, analyzed (the statistics autovacuum would give the planner)
    s = PgOrderStore(pg_url)
    rows = [order(f"day-{i}") for i in range(3000)]
    s.write(Changes(new_orders=rows, events=[EventRow(o.order_id, "PENDING", "", o.status, NS, {})
                                             for o in rows]))  # fmt: skip
    s.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE order_ledger")

    # Act: the store's own write of one status change, several times (past the plan cache's
    # five custom plans), in one transaction, so that its scan counters can be read
    with psycopg.connect(pg_url) as conn:
        for i in range(8):
            row = rows[i]
            row.status, row.broker_order_id, row.updated_ns = OPEN, f"B{i}", NS + 1
            conn.execute(_WRITE, _write_args(Changes(updated={row.order_id: row})))
        seq_scans, idx_scans = conn.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                                            "WHERE relname = 'order_ledger'").fetchone()  # fmt: skip
        conn.rollback()

    # Assert
    assert (seq_scans, idx_scans) == (0, 8)
