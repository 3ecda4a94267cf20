"""Index options through execution (``execution.broker=kotak``, the real SDK) against the Kotak
REST fake: the order reaches Kotak in ``nse_fo`` under the option's own trading symbol and
token, an order above the freeze quantity arrives as legal slices, and a two-leg option basket
whose short leg the broker rejects ends with the long leg closed and an alert.

Execution runs in live mode on the fake's own scrip master, cached under
``$NEOPULSE_HOME/master/`` the way ``neopulse sync-master`` leaves it (``fetch_kotak_master``):
the paper master's option tokens are synthetic and not Kotak's. The stand-in feed and the
orders this test sends (it plays risk) resolve symbols in that same master. The fake serves its
sample master plus one more NIFTY call, so the basket can buy one call and sell another.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.integration.test_execution_service as exec_service
from libs.common.config import ExecutionConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import Alert, ExecuteBasket, ExecuteOrder, basket_leg_id
from services.execution.brokers.kotak import KotakBroker
from services.execution.master_sync import fetch_kotak_master
from tests.fakes.kotak_rest import KotakRestFake, default_instruments, scrip_master_csv
from tests.helpers import eventually
from tests.integration.test_execution_kotak_faults import kotak_env
from tests.integration.test_execution_service import ExecStack
from tests.integration.test_kotak_broker import kotak_config
from tests.kit import execute_order

SAMPLE_FO = [i for i in default_instruments() if i.segment == "nse_fo"]
SAMPLE_CE = next(i for i in SAMPLE_FO if i.option_type == "CE")
EXTRA_CE = dataclasses.replace(  # the next strike up: the basket's second call
    SAMPLE_CE, token="52203", trading_symbol=SAMPLE_CE.trading_symbol.replace("24000CE", "24100CE"),
    strike_paise="2410000",
)  # fmt: skip
NEAR_LTP, FAR_LTP, PUT_LTP = 120.0, 80.0, 95.0  # the calls' and the put's last prices on the stand-in feed
FREEZE, LOT = 1800, 65  # NIFTY's, as the fake's master has them


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[KotakRestFake]:
    """The fake, serving its sample nse_fo master with one more call strike."""
    csv = tmp_path / "nse_fo.csv"
    csv.write_text(scrip_master_csv([*SAMPLE_FO, EXTRA_CE]))
    args = ["--master-csv", f"nse_fo={csv}"]
    with KotakRestFake(tmp_path / "kotak-state.json", extra_args=args) as running:
        yield running


@pytest.fixture
def master(tmp_path: Path, fake: KotakRestFake) -> MasterData:
    """The fake's master, cached where execution loads it in live mode (as after sync-master)."""
    broker = KotakBroker(kotak_config(fake), ExecutionConfig())
    try:
        fetch_kotak_master(broker, tmp_path / "home")
    finally:
        broker.close()
    return MasterData.load_for_home(tmp_path / "home")


@pytest.fixture
def options(master: MasterData) -> dict[str, Instrument]:
    near = master.resolve(SAMPLE_CE.trading_symbol)
    put = master.resolve(SAMPLE_CE.trading_symbol.replace("CE", "PE"))
    far = master.resolve(EXTRA_CE.trading_symbol)
    return {"near": near, "far": far, "put": put}


@pytest.fixture
def stack(
    tmp_path: Path, pg_url: str, fake: KotakRestFake, master: MasterData, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ExecStack]:
    # The stand-in feed resolves its quotes in the fake's master: Kotak's tokens, not the paper ones.
    monkeypatch.setattr(exec_service, "MASTER", master)
    quotes = {SAMPLE_CE.trading_symbol: NEAR_LTP, EXTRA_CE.trading_symbol: FAR_LTP,
              SAMPLE_CE.trading_symbol.replace("CE", "PE"): PUT_LTP}  # fmt: skip
    s = ExecStack(tmp_path / "home", pg_url, quotes=quotes, **kotak_env(fake))
    try:
        s.start()
        yield s
    finally:
        s.close()


def rid(name: str) -> str:
    """A request id unique to this process (the ledger database outlives one test)."""
    return f"fno-{os.getpid()}-{name}"


def limit(inst: Instrument, side: str, qty: int, price: str, request_id: str, product: str) -> ExecuteOrder:
    """What risk sends execution for an approved LIMIT order in ``inst`` (Kotak's token)."""
    return execute_order(inst, side, qty, price, rid=request_id, order_type="LIMIT", product=product)


def book_row(fake: KotakRestFake, tag: str) -> dict[str, Any]:
    return next(o for o in fake.orders() if o["GuiOrdId"].lower() == tag.lower())


def tagged(fake: KotakRestFake, tag: str) -> list[dict[str, Any]]:
    return [r for r in fake.received_orders() if tag.lower() in str(r).lower()]


def test_an_option_order_reaches_kotak_in_nse_fo_with_its_trading_symbol_token_and_product(
    stack: ExecStack, fake: KotakRestFake, options: dict[str, Instrument]
) -> None:
    near, put = options["near"], options["put"]
    assert near.token == SAMPLE_CE.token and near.lot_size == LOT  # Kotak's token, the current lot

    nrml = stack.ok(limit(near, "BUY", LOT, "119.95", rid("a1"), "NRML"))
    mis = stack.ok(limit(put, "SELL", 2 * LOT, "95.10", rid("a2"), "MIS"))

    received = eventually(lambda: len(fake.received_orders()) == 2 and fake.received_orders(), timeout=10,
                          message="both orders at the broker")  # fmt: skip
    bodies = {r["tag"].lower(): r["body"] for r in received}
    fields = ("es", "ts", "pc", "qt", "tt", "pt", "pr")
    assert {k: bodies[nrml["client_tag"].lower()][k] for k in fields} == {
        "es": "nse_fo", "ts": near.symbol, "pc": "NRML", "qt": "65", "tt": "B", "pt": "L", "pr": "119.95",
    }  # fmt: skip
    assert {k: bodies[mis["client_tag"].lower()][k] for k in fields} == {
        "es": "nse_fo", "ts": put.symbol, "pc": "MIS", "qt": "130", "tt": "S", "pt": "L", "pr": "95.10",
    }  # fmt: skip
    for placed, inst, product in ((nrml, near, "NRML"), (mis, put, "MIS")):
        row = eventually(lambda p=placed: book_row(fake, p["client_tag"]), timeout=5)
        assert (row["exSeg"], row["trdSym"], row["tok"], row["prod"]) == ("nse_fo", inst.symbol, inst.token,
                                                                          product)  # fmt: skip
        assert row["ordSt"] == "open", row.get("rejRsn")  # a legal option order: working at the exchange
        ledger = eventually(lambda p=placed: (o := stack.find(p["order_id"]))["broker_order_id"] and o,
                            timeout=10)  # fmt: skip
        assert (ledger["segment"], ledger["token"], ledger["symbol"], ledger["product"]) == (
            "nse_fo", inst.token, inst.symbol, product)  # fmt: skip


def test_an_option_order_above_the_freeze_quantity_reaches_kotak_as_legal_slices_once_each(
    stack: ExecStack, fake: KotakRestFake, options: dict[str, Instrument]
) -> None:
    near = options["near"]
    assert near.freeze_qty == FREEZE
    total = 60 * LOT  # 3,900: more than two freezes

    parent = stack.ok(limit(near, "BUY", total, "119.95", rid("b1"), "NRML"))

    received = eventually(lambda: len(fake.received_orders()) >= 3 and fake.received_orders(), timeout=15,
                          message="the slices at the broker")  # fmt: skip
    bodies = [r["body"] for r in received]
    sizes = sorted(int(b["qt"]) for b in bodies)
    assert sizes == [390, 1755, 1755]  # 27 lots of 65 fit under 1,800
    assert all(q <= FREEZE and q % LOT == 0 for q in sizes) and sum(sizes) == total
    assert {(b["es"], b["ts"], b["pc"], b["tt"], b["pr"]) for b in bodies} == {
        ("nse_fo", near.symbol, "NRML", "B", "119.95")
    }
    tags = [r["tag"] for r in received]
    assert len(set(tags)) == 3 and parent["client_tag"] not in tags  # each slice once, the parent never
    assert {r["outcome"] for r in received} == {"ack"}
    rows = [eventually(lambda t=t: book_row(fake, t), timeout=5) for t in tags]
    assert {(r["ordSt"], r["tok"]) for r in rows} == {("open", near.token)}  # none rejected by the RMS

    for r in received:
        fake.fill(r["nOrdNo"])
    eventually(lambda: stack.find(parent["order_id"])["status"] == "COMPLETE", timeout=15,
               message="the parent complete from its slices' fills")  # fmt: skip
    assert stack.find(parent["order_id"])["filled_qty"] == total
    assert len(fake.received_orders()) == 3  # nothing was sent twice


def test_an_option_basket_whose_short_call_the_broker_rejects_ends_with_the_long_call_closed(
    stack: ExecStack, fake: KotakRestFake, options: dict[str, Instrument]
) -> None:
    near, far = options["near"], options["far"]
    alerts = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    bid = rid("basket")
    cmd = ExecuteBasket(request_id=bid, strategy_id="s1", legs=[
        limit(far, "BUY", LOT, "80.05", basket_leg_id(bid, 1), "NRML"),  # the hedge goes first
        limit(near, "SELL", LOT, "119.95", basket_leg_id(bid, 2), "NRML"),
    ])  # fmt: skip

    accepted = stack.ok(cmd)
    long_leg, short_leg = accepted["legs"]
    assert accepted["state"] == "PLACING_LONGS"
    row = eventually(lambda: (o := stack.find(long_leg["order_id"]))["broker_order_id"] and o, timeout=10)
    fake.fill(row["broker_order_id"])
    short = eventually(lambda: (o := stack.find(short_leg["order_id"]))["broker_order_id"] and o, timeout=10,
                       message="the short call placed once the long call was acked")  # fmt: skip
    first, second = fake.received_orders()
    assert long_leg["client_tag"].lower() in str(first).lower()  # the protective long went first
    assert (first["body"]["es"], first["body"]["ts"], first["body"]["tt"]) == ("nse_fo", far.symbol, "B")
    assert (second["body"]["es"], second["body"]["ts"], second["body"]["tt"]) == ("nse_fo", near.symbol, "S")
    eventually(lambda: stack.find(long_leg["order_id"])["status"] == "COMPLETE", timeout=10,
               message="the long call's fill")  # fmt: skip
    fake.reject(short["broker_order_id"], "RMS:Margin Exceeds,Required:512000.00, Available:100000.00")

    rejected = eventually(lambda: (o := stack.find(short_leg["order_id"]))["status"] == "REJECTED" and o,
                          timeout=15, message="the short call rejected after its ack")  # fmt: skip
    assert "Margin Exceeds" in rejected["reason"]
    close = eventually(lambda: next((o for o in stack.orders() if o["request_id"] == f"{bid}:undo1"), None),
                       timeout=15, message="the rollback close of the filled long call")  # fmt: skip
    assert (close["side"], close["quantity"], close["symbol"], close["purpose"], close["product"]) == (
        "SELL", LOT, far.symbol, "FLATTEN", "NRML")  # fmt: skip
    placed = eventually(lambda: tagged(fake, close["client_tag"]), timeout=10,
                        message="the close at the broker")  # fmt: skip
    assert len(placed) == 1
    body = placed[0]["body"]
    assert (body["es"], body["ts"], body["tt"], body["qt"], body["pc"]) == (
        "nse_fo", far.symbol, "S", "65", "NRML")  # fmt: skip
    assert book_row(fake, close["client_tag"])["tok"] == far.token
    seen: dict[str, Alert] = {}

    def alerted() -> bool:
        while (m := alerts.recv(100)) is not None:
            if isinstance(m[1], Alert) and bid in m[1].text:
                seen.setdefault(m[1].code, m[1])
        return {"basket_failed", "basket_rolled_back"} <= set(seen)

    eventually(alerted, timeout=10, message="the basket's alerts on execution's bus")
    alerts.close()
    assert seen["basket_failed"].level == "CRITICAL" and "Margin Exceeds" in seen["basket_failed"].text
    assert f"SELL {LOT} {far.symbol}" in seen["basket_rolled_back"].text
    assert stack.find(long_leg["order_id"])["status"] == "COMPLETE"

    again = stack.ok(cmd)  # a repeat of the basket is answered from the ledger: nothing placed twice
    assert again["basket_id"] == accepted["basket_id"] and len(fake.received_orders()) == 3
