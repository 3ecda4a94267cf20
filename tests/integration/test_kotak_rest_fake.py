"""The real Kotak Neo SDK (neo_api_client) against the protocol-level REST fake.

These tests pin down what our broker adapter can rely on: the exact shapes the SDK hands back
for success, broker errors, transport timeouts and expired sessions.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

# The SDK configures logging when it is imported: a rotating file under ./logs and a stdout
# handler. Keep both out of the test run (the adapter does the same, see docs/kotak-rest.md).
os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")
os.environ.setdefault("NEO_LOG_LEVEL", "NOLOG")

from neo_api_client.exceptions import ApiException
from neo_api_client.neo_api import NeoAPI

from tests.fakes.kotak_rest import KotakRestFake, default_instruments, pinned_origin_transport

T = TypeVar("T")

# The NIFTY future in the fake's sample master (its month follows the calendar).
NIFTY_FUT = next(i.trading_symbol for i in default_instruments() if i.inst_type == "FUTIDX")


def eventually(condition: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        time.sleep(interval)


def new_client(fake: KotakRestFake, timeout: float = 5.0) -> NeoAPI:
    return NeoAPI(
        consumer_key=fake.credentials.consumer_key,
        environment="prod",
        transport=pinned_origin_transport(fake.base_url),
        timeout=timeout,
    )


def login(client: NeoAPI, fake: KotakRestFake) -> None:
    creds = fake.credentials
    view = client.totp_login(mobile_number=creds.mobile_number, ucc=creds.ucc, totp=fake.totp_now())
    assert view["data"]["kType"] == "View", view
    trade = client.totp_validate(mpin=creds.mpin)
    assert trade["data"]["kType"] == "Trade", trade


@pytest.fixture
def client(fake: KotakRestFake) -> NeoAPI:
    c = new_client(fake)
    login(c, fake)
    return c


def place_limit(client: NeoAPI, tag: str, *, symbol: str = "RELIANCE-EQ", segment: str = "nse_cm",
                qty: str = "5", price: str = "2500.10", side: str = "B") -> dict[str, Any]:  # fmt: skip
    return client.place_order(
        exchange_segment=segment, product="MIS", price=price, order_type="L", quantity=qty,
        validity="DAY", trading_symbol=symbol, transaction_type=side, tag=tag,
    )  # fmt: skip


def book_row(client: NeoAPI, order_no: str) -> dict[str, Any] | None:
    book = client.order_report()
    return next((r for r in book.get("data", []) if r["nOrdNo"] == order_no), None)


def wait_row(client: NeoAPI, order_no: str, **expected: Any) -> dict[str, Any]:
    """Poll the SDK's order book until the order's row has every ``expected`` field value."""

    def matching() -> dict[str, Any] | None:
        row = book_row(client, order_no)
        if row is not None and all(row.get(k) == v for k, v in expected.items()):
            return row
        return None

    return eventually(matching)


# ---------------------------------------------------------------------------------------------


def test_totp_login_and_mpin_validate(fake: KotakRestFake) -> None:
    client = new_client(fake)
    creds = fake.credentials

    wrong_totp = f"{(int(fake.totp_now()) + 1) % 1_000_000:06d}"
    bad = client.totp_login(mobile_number=creds.mobile_number, ucc=creds.ucc, totp=wrong_totp)
    assert "error" in bad and client.configuration.view_token is None

    view = client.totp_login(mobile_number=creds.mobile_number, ucc=creds.ucc, totp=fake.totp_now())
    assert view["data"]["status"] == "success"
    assert view["data"]["token"].count(".") == 2  # a JWT, like the real view token

    assert "error" in client.totp_validate(mpin="000000")
    assert client.configuration.edit_token is None

    trade = client.totp_validate(mpin=creds.mpin)
    assert trade["data"]["kType"] == "Trade"
    # The base-URL seam: the validate response's baseUrl routes every trading call.
    assert client.configuration.base_url == fake.base_url
    assert client.configuration.edit_token and client.configuration.edit_sid

    paths = {r["api"]: r["path"] for r in fake.requests()}
    assert paths["totp_login"] == "/login/1.0/tradeApiLogin"
    assert paths["totp_validate"] == "/login/1.0/tradeApiValidate"
    assert paths["config"] == "/5config/config"  # the SDK's dynamic-config lookup, pinned too


def test_limit_order_with_tag_is_echoed_as_gui_ord_id(fake: KotakRestFake, client: NeoAPI) -> None:
    assert client.order_report() == {"stCode": 5203, "errMsg": "No Data", "stat": "Not_Ok"}

    placed = place_limit(client, "np0001")
    assert placed["stat"] == "Ok" and placed["stCode"] == 200
    order_no = placed["nOrdNo"]

    row = wait_row(client, order_no)
    assert row["GuiOrdId"] == "np0001"
    assert row["ordSt"] == "open"
    assert (row["trdSym"], row["tok"], row["exSeg"]) == ("RELIANCE-EQ", "2885", "nse_cm")
    assert (row["qty"], row["fldQty"], row["unFldSz"], row["prc"]) == (5, 0, 5, "2500.10")
    assert (row["trnsTp"], row["prcTp"], row["prod"], row["vldt"]) == ("B", "L", "MIS", "DAY")

    single = client.order_report(order_id=order_no)
    assert [r["nOrdNo"] for r in single["data"]] == [order_no]

    history = client.order_history(order_id=order_no)  # the SDK wraps the body in {"data": ...}
    statuses = [r["ordSt"] for r in history["data"]["data"]]
    assert statuses == ["open", "open pending", "validation pending", "put order req received"]

    received = fake.received_orders()
    assert [(r["tag"], r["outcome"], r["nOrdNo"]) for r in received] == [("np0001", "ack", order_no)]
    body = received[0]["body"]
    assert (body["pt"], body["tt"], body["es"], body["ts"], body["os"]) == (
        "L",
        "B",
        "nse_cm",
        "RELIANCE-EQ",
        "NEOTRADEAPI",
    )


def test_partial_and_full_fill_show_in_trade_report(fake: KotakRestFake, client: NeoAPI) -> None:
    assert client.trade_report()["stCode"] == 5203  # empty trade book is "No Data"
    order_no = place_limit(client, "np0002", symbol=NIFTY_FUT,
                           segment="nse_fo", qty="130", price="24100.10")["nOrdNo"]  # fmt: skip

    fake.fill(order_no, qty=65, price="24100.00")
    row = wait_row(client, order_no, fldQty=65)
    assert row["ordSt"] == "open" and row["unFldSz"] == 65 and row["avgPrc"] == "24100.00"

    fake.fill(order_no, price="24100.10")
    row = wait_row(client, order_no, ordSt="complete")
    assert (row["fldQty"], row["unFldSz"], row["avgPrc"]) == (130, 0, "24100.05")

    trades = client.trade_report()["data"]
    assert [(t["nOrdNo"], t["fldQty"], t["avgPrc"], t["GuiOrdId"]) for t in trades] == [
        (order_no, 65, "24100.00", "np0002"),
        (order_no, 65, "24100.10", "np0002"),
    ]
    assert len({t["flId"] for t in trades}) == 2  # unique broker trade ids

    positions = client.positions()["data"]
    assert [(p["trdSym"], p["flBuyQty"], p["flSellQty"], p["buyAmt"]) for p in positions] == [
        (NIFTY_FUT, "130", "0", "3133006.50")
    ]


def test_market_and_sl_m_orders_are_rejected(fake: KotakRestFake, client: NeoAPI) -> None:
    for order_type, trigger in (("MKT", "0"), ("SL-M", "2490.00")):
        reply = client.place_order(
            exchange_segment="nse_cm", product="MIS", price="0", order_type=order_type,
            quantity="1", validity="DAY", trading_symbol="RELIANCE-EQ", transaction_type="S",
            trigger_price=trigger, tag=f"np{order_type}",
        )  # fmt: skip
        assert reply == {"stCode": 100021, "errMsg": "invalid  access type", "stat": "Not_Ok"}
    assert client.order_report()["stCode"] == 5203  # nothing reached the book
    assert [r["outcome"] for r in fake.received_orders()] == ["rejected", "rejected"]


def test_session_expiry_then_relogin(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0003")["nOrdNo"]
    fake.expire_session()

    expired = {"stCode": 100022, "errMsg": "invalid session token", "stat": "Not_Ok"}
    assert client.order_report() == expired
    assert client.positions() == expired
    assert place_limit(client, "np0004") == expired  # an explicit refusal: nothing was placed
    assert [r["outcome"] for r in fake.received_orders()] == ["ack", "auth_error"]

    login(client, fake)
    assert book_row(client, order_no) is not None
    assert place_limit(client, "np0004")["stat"] == "Ok"


def test_place_order_timeout_still_records_exactly_one_order(fake: KotakRestFake) -> None:
    client = new_client(fake, timeout=1.0)
    login(client, fake)
    fake.hang_next_place(seconds=2.5)

    reply = place_limit(client, "np0005")
    # A transport timeout comes back as {"error": ApiException}, lower-case key, never raised.
    assert set(reply) == {"error"} and isinstance(reply["error"], ApiException)
    assert "timeout" in str(reply["error"].reason).lower()

    # The broker did take the order: reconciliation by tag finds it, once.
    def tagged() -> list[dict[str, Any]]:
        return [r for r in client.order_report().get("data", []) if r["GuiOrdId"] == "np0005"]

    rows = eventually(tagged)
    assert len(rows) == 1 and rows[0]["ordSt"] == "open"
    assert [r["tag"] for r in fake.received_orders()] == ["np0005"]


def test_gateway_error_after_the_order_was_taken(fake: KotakRestFake, client: NeoAPI) -> None:
    fake.fail_next("place_order", 502, "<html>502 Bad Gateway</html>", after_handling=True)
    reply = place_limit(client, "np0013")
    # A non-JSON body after the request was sent: {"Error": JSONDecodeError}, same key as a
    # client-side validation error -- only the exception type tells them apart.
    assert set(reply) == {"Error"} and isinstance(reply["Error"], ValueError)
    assert [(r["tag"], r["outcome"]) for r in fake.received_orders()] == [("np0013", "ack")]

    refused = client.place_order(
        exchange_segment="NSE", product="MIS", price="1", order_type="L", quantity="1",
        validity="DAY", trading_symbol="RELIANCE-EQ", transaction_type="B", tag="np0014",
    )  # fmt: skip
    assert type(refused["Error"]).__name__ == "ApiValueError"  # never left the process
    assert len(fake.received_orders()) == 1


def test_rate_limit_answers_429(fake: KotakRestFake, client: NeoAPI) -> None:
    fake.set_rate_limit(orders_per_s=2)
    codes = [place_limit(client, f"np003{i}").get("stCode") for i in range(3)]
    assert codes == [200, 200, 429]
    assert [r["outcome"] for r in fake.received_orders()] == ["ack", "ack", "rate_limited"]


def test_ack_then_rejected_later_with_reason(fake: KotakRestFake, client: NeoAPI) -> None:
    reason = "RMS:Margin Exceeds,Cash Available:0.00,Additional margin required:12500.50"
    fake.reject_next_place(reason, delay_s=0.3)
    placed = place_limit(client, "np0006")
    assert placed["stat"] == "Ok"  # the receipt
    order_no = placed["nOrdNo"]

    row = wait_row(client, order_no, ordSt="rejected")
    assert row["rejRsn"] == reason and row["GuiOrdId"] == "np0006"

    # An order that is already in the book can be rejected on demand too.
    other = place_limit(client, "np0007")["nOrdNo"]
    fake.reject(other, "RMS:Blocked for trading")
    wait_row(client, other, ordSt="rejected", rejRsn="RMS:Blocked for trading")


def test_modify_and_cancel(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0008")["nOrdNo"]

    modified = client.modify_order(order_id=order_no, price="2499.90", order_type="L",
                                   quantity="10", validity="DAY")  # fmt: skip
    assert modified == {"stat": "Ok", "nOrdNo": order_no, "stCode": 200}
    row = wait_row(client, order_no, prc="2499.90")
    assert row["qty"] == 10 and row["ordSt"] == "open" and row["GuiOrdId"] == "np0008"

    assert client.cancel_order(order_id=order_no) == {"stat": "Ok", "nOrdNo": order_no, "stCode": 200}
    wait_row(client, order_no, ordSt="cancelled", cnlQty=10)

    again = client.cancel_order(order_id=order_no)
    assert again["stCode"] == 1021 and again["status_code"] == 400  # status_code added by the SDK


def test_rms_rejects_off_tick_price_and_odd_lot(fake: KotakRestFake, client: NeoAPI) -> None:
    off_tick = place_limit(client, "np0009", price="2500.15")["nOrdNo"]  # tick is 0.10
    odd_lot = place_limit(client, "np0010", symbol=NIFTY_FUT, segment="nse_fo", qty="50",
                          price="24100.00")["nOrdNo"]  # fmt: skip
    rows = {n: wait_row(client, n, ordSt="rejected") for n in (off_tick, odd_lot)}
    assert rows[off_tick]["ordSt"] == "rejected" and "tick" in rows[off_tick]["rejRsn"]
    assert rows[odd_lot]["ordSt"] == "rejected" and "lot size 65" in rows[odd_lot]["rejRsn"]


def test_scrip_master_lists_csv_files_served_by_the_fake(fake: KotakRestFake) -> None:
    client = new_client(fake)  # no login needed: the consumer key is enough
    listing = client.scrip_master()
    assert all(url.startswith(fake.base_url) for url in listing["filesPaths"])
    nse_cm = client.scrip_master(exchange_segment="nse_cm")
    assert isinstance(nse_cm, str) and nse_cm.endswith("/transformed-v1/nse_cm-v1.csv")

    with urllib.request.urlopen(nse_cm, timeout=5) as response:
        lines = response.read().decode().splitlines()
    header = lines[0].split(",")
    assert {"pSymbol", "pExchSeg", "pTrdSymbol", "lLotSize", "dTickSize ", "lFreezeQty"} <= set(header)
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    reliance = next(r for r in rows if r["pTrdSymbol"] == "RELIANCE-EQ")
    assert (reliance["pSymbol"], reliance["pExchSeg"]) == ("2885", "nse_cm")
    assert reliance["dTickSize "] == "10.000000"  # paise: a 0.10 rupee tick


def test_state_survives_a_restart_of_the_fake(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0011")["nOrdNo"]
    fake.fill(order_no, qty=2)
    fake.restart()

    row = wait_row(client, order_no)  # the session survived the restart too
    assert (row["fldQty"], row["GuiOrdId"]) == (2, "np0011")
    assert len(client.trade_report()["data"]) == 1
    second = place_limit(client, "np0012")["nOrdNo"]
    assert second != order_no and int(second[-9:]) == int(order_no[-9:]) + 1


def test_request_timestamps_are_recorded(fake: KotakRestFake, client: NeoAPI) -> None:
    for i in range(3):
        assert place_limit(client, f"np002{i}")["stat"] == "Ok"
    stamps = [r["ts"] for r in fake.requests(api="place_order")]
    assert len(stamps) == 3 and stamps == sorted(stamps)
    assert all(r["path"] == "/quick/order/rule/ms/place" for r in fake.requests(api="place_order"))


# --------------------------------------------------------------------------------------------
# Fault switches (issue 10): status before trade, a cancel that fails once, an empty book,
# a place whose fate is unknown.


NO_DATA = {"stCode": 5203, "errMsg": "No Data", "stat": "Not_Ok"}


def faults(fake: KotakRestFake, api: str) -> list[tuple[str | None, str | None]]:
    """(order_no, fault) of every request of ``api`` the fake logged."""
    return [(r.get("order_no"), r.get("fault")) for r in fake.requests(api=api)]


def test_status_before_trade_the_book_says_complete_while_the_trade_book_lags(
    fake: KotakRestFake, client: NeoAPI
) -> None:
    order_no = place_limit(client, "np0040", qty="5")["nOrdNo"]

    fake.fill(order_no, trade_after_polls=2)

    row = wait_row(client, order_no, ordSt="complete")
    assert (row["fldQty"], row["unFldSz"], row["avgPrc"]) == (5, 0, "2500.10")
    assert client.positions() == NO_DATA  # positions follow the trade book
    assert client.trade_report() == NO_DATA
    assert client.trade_report() == NO_DATA
    [trade] = client.trade_report()["data"]  # the third look finds it
    assert (trade["nOrdNo"], trade["fldQty"], trade["GuiOrdId"]) == (order_no, 5, "np0040")
    assert client.positions()["data"][0]["flBuyQty"] == "5"
    assert [f for _, f in faults(fake, "trade_report")] == ["trade_held", "trade_held", None]


def test_a_held_trade_appears_only_when_released(fake: KotakRestFake, client: NeoAPI) -> None:
    first = place_limit(client, "np0041")["nOrdNo"]
    fake.fill(first)  # an ordinary fill: its trade is there at once
    held = place_limit(client, "np0042")["nOrdNo"]

    fake.fill(held, hold_trade=True)

    wait_row(client, held, ordSt="complete", fldQty=5)
    for _ in range(3):
        assert [t["nOrdNo"] for t in client.trade_report()["data"]] == [first]
    fake.release_trades()
    assert [t["nOrdNo"] for t in client.trade_report()["data"]] == [first, held]


def test_a_cancel_that_times_out_once_leaves_the_order_live_then_the_retry_cancels(
    fake: KotakRestFake,
) -> None:
    client = new_client(fake, timeout=1.0)
    login(client, fake)
    order_no = place_limit(client, "np0043")["nOrdNo"]
    other = place_limit(client, "np0044")["nOrdNo"]
    fake.fail_next_cancel(order_no, mode="timeout", seconds=2.0)

    # Another order's cancel is not the one armed.
    assert client.cancel_order(order_id=other)["stat"] == "Ok"
    reply = client.cancel_order(order_id=order_no)

    assert set(reply) == {"error"} and isinstance(reply["error"], ApiException)
    assert "timeout" in str(reply["error"].reason).lower()
    assert book_row(client, order_no)["ordSt"] == "open"  # type: ignore[index]
    assert client.cancel_order(order_id=order_no) == {"stat": "Ok", "nOrdNo": order_no, "stCode": 200}
    wait_row(client, order_no, ordSt="cancelled", cnlQty=5)
    assert faults(fake, "cancel_order") == [(other, None), (order_no, "cancel_timeout"), (order_no, None)]


def test_a_cancel_answered_5xx_once_leaves_the_order_live_then_the_retry_cancels(
    fake: KotakRestFake, client: NeoAPI
) -> None:
    order_no = place_limit(client, "np0045")["nOrdNo"]
    fake.fail_next_cancel(order_no, mode="error", status=503)

    reply = client.cancel_order(order_id=order_no)

    assert reply == {"stat": "Not_Ok", "errMsg": "Service Unavailable"}  # no stCode: not a refusal
    assert book_row(client, order_no)["ordSt"] == "open"  # type: ignore[index]
    assert client.cancel_order(order_id=order_no)["stat"] == "Ok"
    wait_row(client, order_no, ordSt="cancelled")

    # A gateway page, every time until cleared.
    again = place_limit(client, "np0046")["nOrdNo"]
    fake.fail_next_cancel(mode="error", status=502, body="<html>502 Bad Gateway</html>", count=None)
    for _ in range(2):
        assert isinstance(client.cancel_order(order_id=again).get("Error"), ValueError)
    fake.clear_faults()
    assert client.cancel_order(order_id=again)["stat"] == "Ok"


def test_a_cancel_whose_answer_is_lost_after_it_took_effect(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0047")["nOrdNo"]
    fake.fail_next_cancel(order_no, mode="error", status=504, after_handling=True)

    assert client.cancel_order(order_id=order_no)["stat"] == "Not_Ok"

    wait_row(client, order_no, ordSt="cancelled")
    assert client.cancel_order(order_id=order_no)["stCode"] == 1021  # already final


def test_empty_books_answer_no_data_while_the_orders_stay_live(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0048", qty="5")["nOrdNo"]
    fake.fill(order_no, qty=2)

    fake.empty_books(order_book=2, trade_book=1)

    assert client.order_report() == NO_DATA
    assert client.order_report(order_id=order_no) == NO_DATA  # single-order lookups count too
    assert client.trade_report() == NO_DATA
    assert book_row(client, order_no)["ordSt"] == "open"  # type: ignore[index]
    assert len(client.trade_report()["data"]) == 1
    assert [f for _, f in faults(fake, "order_book")][-3:] == ["empty_book", "empty_book", None]

    fake.empty_books(order_book=1, trade_book=1, positions=1, shape="empty_list")
    assert client.order_report() == {"stat": "Ok", "stCode": 200, "data": []}
    assert client.trade_report() == {"stat": "ok", "stCode": 200, "data": []}
    assert client.positions() == {"stat": "ok", "stCode": 200, "data": []}
    assert fake.order(order_no)["ordSt"] == "open"  # the control view shows the truth


def test_empty_books_for_a_while_or_until_cleared(fake: KotakRestFake, client: NeoAPI) -> None:
    order_no = place_limit(client, "np0049")["nOrdNo"]

    fake.empty_books(order_book=-1, seconds=0.5)
    assert client.order_report() == NO_DATA and client.order_report() == NO_DATA
    eventually(lambda: book_row(client, order_no), timeout=3)

    fake.empty_books(order_book=-1, trade_book=-1)  # no deadline
    time.sleep(0.2)
    assert client.order_report() == NO_DATA
    fake.clear_faults()
    assert book_row(client, order_no) is not None


def test_a_place_lost_on_the_way_never_reaches_the_book(fake: KotakRestFake) -> None:
    client = new_client(fake, timeout=1.0)
    login(client, fake)
    fake.hang_next_place(seconds=2.0, placed=False)

    reply = place_limit(client, "np0050")

    assert set(reply) == {"error"} and isinstance(reply["error"], ApiException)
    assert client.order_report() == NO_DATA
    received = [(r["tag"], r["outcome"], r["nOrdNo"]) for r in fake.received_orders()]
    assert received == [("np0050", "lost", None)]
    assert place_limit(client, "np0051")["stat"] == "Ok"  # only the armed one is lost
