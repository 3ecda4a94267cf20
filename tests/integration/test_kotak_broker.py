"""KotakBroker (services/execution/brokers/kotak.py) on the real SDK against the Kotak REST fake.

The fake runs as its own process (tests/fakes/kotak_rest.py); the broker reaches it through
``kotak.base_url`` (the pinned-origin transport plus the validate reply's ``baseUrl``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from libs.common.clock import IST, ManualClock
from libs.common.config import ExecutionConfig, KotakConfig
from libs.common.instruments import MasterData
from libs.common.money import protected_limit
from services.execution.brokers.base import (
    BrokerOrder,
    BrokerOrderStatus,
    BrokerRejected,
    BrokerTemporary,
    BrokerTrade,
    BrokerUnknown,
)
from services.execution.brokers.kotak import KotakBroker, KotakLoginError
from services.execution.brokers.kotak_protocol import Kind, classify
from services.execution.master_sync import fetch_kotak_master
from tests.fakes.kotak_rest import FakeCredentials, KotakRestFake, default_instruments
from tests.helpers import eventually

NIFTY_FUT = next(i for i in default_instruments() if i.inst_type == "FUTIDX")


def kotak_config(fake: KotakRestFake, **overrides: Any) -> KotakConfig:
    c = fake.credentials
    values: dict[str, Any] = {
        "consumer_key": c.consumer_key, "mobile": c.mobile_number, "ucc": c.ucc, "mpin": c.mpin,
        "totp_secret": c.totp_secret, "base_url": fake.base_url,
    }  # fmt: skip
    values.update(overrides)
    return KotakConfig(**values)


@pytest.fixture
def master(fake: KotakRestFake, tmp_path: Path) -> MasterData:
    """The fake's own scrip master, fetched the way `SyncMaster` does it."""
    broker = KotakBroker(kotak_config(fake), ExecutionConfig())
    try:
        return MasterData.load(fetch_kotak_master(broker, tmp_path / "home"))
    finally:
        broker.close()


@pytest.fixture
def broker(fake: KotakRestFake, master: MasterData) -> Iterator[KotakBroker]:
    b = KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0), master)
    yield b
    b.close()


def reliance(tag: str, **kw: Any) -> BrokerOrder:
    fields: dict[str, Any] = {"client_tag": tag, "segment": "nse_cm", "token": "2885",
                              "symbol": "RELIANCE-EQ", "side": "BUY", "quantity": 5,
                              "price": Decimal("2500.10")}  # fmt: skip
    fields.update(kw)
    return BrokerOrder(**fields)


def nifty(tag: str, **kw: Any) -> BrokerOrder:
    fields: dict[str, Any] = {"client_tag": tag, "segment": "nse_fo", "token": NIFTY_FUT.token,
                              "symbol": NIFTY_FUT.trading_symbol, "side": "BUY", "quantity": 130,
                              "price": Decimal("24100.10"), "product": "NRML"}  # fmt: skip
    fields.update(kw)
    return BrokerOrder(**fields)


def api_count(fake: KotakRestFake, api: str) -> int:
    return len(fake.requests(api=api))


def status_of(broker: KotakBroker, order_no: str) -> BrokerOrderStatus:
    return next(s for s in broker.order_book() if s.broker_order_id == order_no)


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------


def test_login_uses_totp_then_mpin_and_relogs_in_once_after_session_expiry(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    broker.login()
    assert broker.logged_in
    assert (api_count(fake, "totp_login"), api_count(fake, "totp_validate")) == (1, 1)
    first = broker.place(reliance("np0001")).broker_order_id

    fake.expire_session()
    # Eight pool threads hit the expired session together: one re-login serves them all.
    with ThreadPoolExecutor(8) as pool:
        books = list(pool.map(lambda _: broker.order_book(), range(8)))
    assert all(first in {s.broker_order_id for s in book} for book in books)
    assert (api_count(fake, "totp_login"), api_count(fake, "totp_validate")) == (2, 2)

    # place_order on an expired session: the broker refused it explicitly (403 100022), so the
    # adapter logs in again, finds no order with the tag, and places it once more.
    fake.expire_session()
    second = broker.place(reliance("np0002")).broker_order_id
    outcomes = [(r["tag"], r["outcome"]) for r in fake.received_orders()]
    assert outcomes == [("np0001", "ack"), ("np0002", "auth_error"), ("np0002", "ack")]
    assert [s.broker_order_id for s in broker.order_book() if s.client_tag == "np0002"] == [second]
    assert api_count(fake, "totp_login") == 3


def test_refused_credentials_are_not_retried_on_their_own(fake: KotakRestFake) -> None:
    broker = KotakBroker(kotak_config(fake, mpin="000000"), ExecutionConfig(broker_timeout_s=1.0))
    try:
        with pytest.raises(KotakLoginError, match="MPIN validate refused: Invalid MPIN"):
            broker.order_book()
        with pytest.raises(KotakLoginError):  # sticky: a wrong MPIN again could lock the account
            broker.order_book()
        with pytest.raises(BrokerRejected, match=r"not sent: .*Invalid MPIN"):
            broker.place(reliance("np0003"))
        assert api_count(fake, "totp_validate") == 1
        assert fake.received_orders() == []
    finally:
        broker.close()


def test_logout_at_end_of_day_then_explicit_login(fake: KotakRestFake, master: MasterData) -> None:
    clock = ManualClock(int(datetime(2026, 1, 6, 15, 44, tzinfo=IST).timestamp() * 1e9))
    broker = KotakBroker(kotak_config(fake), ExecutionConfig(logout_at="15:45"), master, clock)
    try:
        broker.login()
        assert broker.logout_if_due() is False
        clock.advance(90)  # 15:45:30
        assert broker.logout_if_due() is True
        assert broker.logout_if_due() is False  # once a day
        with pytest.raises(BrokerTemporary, match="logged out for the day"):
            broker.order_book()
        assert broker.drain_events() == []  # the status poll goes quiet instead of failing
        logins = api_count(fake, "totp_login")
        clock.advance(3600)
        with pytest.raises(BrokerTemporary, match="logged out for the day"):
            broker.trade_book()
        assert api_count(fake, "totp_login") == logins  # no automatic login that day
        broker.login()
        assert broker.order_book() == []
    finally:
        broker.close()


def test_an_empty_logout_at_never_logs_out(fake: KotakRestFake, master: MasterData) -> None:
    clock = ManualClock(int(datetime(2026, 1, 6, 15, 44, tzinfo=IST).timestamp() * 1e9))
    broker = KotakBroker(kotak_config(fake), ExecutionConfig(logout_at=""), master, clock)
    try:
        broker.login()
        clock.advance(6 * 3600)  # 21:44
        assert broker.logout_if_due() is False
        assert broker.order_book() == []
    finally:
        broker.close()


# --------------------------------------------------------------------------------------------
# Orders and their status
# --------------------------------------------------------------------------------------------


def test_ack_then_later_rejection_ends_rejected_with_the_brokers_reason(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    reason = "RMS:Margin Exceeds,Cash Available:0.00,Additional margin required:12500.50"
    fake.reject_next_place(reason, delay_s=0.3)

    ack = broker.place(reliance("np0010"))  # only a receipt
    first = broker.drain_events()
    assert [(e.broker_order_id, e.status) for e in first if isinstance(e, BrokerOrderStatus)] == [
        (ack.broker_order_id, "OPEN")
    ]

    def rejected() -> BrokerOrderStatus | None:
        return next((e for e in broker.drain_events()
                     if isinstance(e, BrokerOrderStatus) and e.status == "REJECTED"), None)  # fmt: skip

    final = eventually(rejected, timeout=5)
    assert (final.broker_order_id, final.client_tag, final.reason) == (ack.broker_order_id, "np0010", reason)
    assert status_of(broker, ack.broker_order_id).status == "REJECTED"
    assert broker.drain_events() == []  # nothing changed since


def test_place_timeout_is_unknown_and_the_book_finds_the_single_order_by_tag(
    fake: KotakRestFake, master: MasterData
) -> None:
    broker = KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=1.0), master)
    try:
        broker.login()
        fake.hang_next_place(2.5)  # recorded at once, answered after the adapter's 1 s timeout

        with pytest.raises(BrokerUnknown, match="timeout"):
            broker.place(reliance("np0020"))

        found = eventually(lambda: broker.find_by_tag("np0020"), timeout=5)
        assert found.status == "OPEN" and found.quantity == 5
        assert [r["tag"] for r in fake.received_orders()] == ["np0020"]  # never re-sent
    finally:
        broker.close()


def test_partial_fill_shows_in_order_book_and_trade_book(fake: KotakRestFake, broker: KotakBroker) -> None:
    order_no = broker.place(nifty("np0030")).broker_order_id
    fake.fill(order_no, qty=65, price="24100.00")

    partial = status_of(broker, order_no)
    assert (partial.status, partial.quantity, partial.filled_qty, partial.avg_price) == (
        "PARTIAL", 130, 65, Decimal("24100.00")
    )
    trades = broker.trade_book()
    assert [(t.broker_order_id, t.client_tag, t.side, t.quantity, t.price) for t in trades] == [
        (order_no, "np0030", "BUY", 65, Decimal("24100.00"))
    ]
    assert trades[0].ts_ns > 0

    events = broker.drain_events()
    assert [type(e).__name__ for e in events] == ["BrokerTrade", "BrokerOrderStatus"]

    fake.fill(order_no, price="24100.10")
    done = broker.drain_events()
    new_trades = [e for e in done if isinstance(e, BrokerTrade)]
    assert [(t.quantity, t.price) for t in new_trades] == [(65, Decimal("24100.10"))]
    final = next(e for e in done if isinstance(e, BrokerOrderStatus))
    assert (final.status, final.filled_qty, final.avg_price) == ("COMPLETE", 130, Decimal("24100.05"))


def test_protected_limit_and_stop_limit_arrive_with_kotak_fields(
    fake: KotakRestFake, broker: KotakBroker, master: MasterData
) -> None:
    inst = master.get("nse_fo", NIFTY_FUT.token)
    assert inst is not None and inst.tick_size == Decimal("0.1") and inst.freeze_qty == 1800
    # Market intent, as execution hands it over: a BUY limit 1 % above the last price, on tick.
    limit = protected_limit("BUY", 24_087.35, 1.0, inst.tick_size)
    entry = broker.place(nifty("np0040", quantity=65, price=limit))
    # An SL-M intent, as a stop-limit: SELL, trigger 24000, limit a band below it.
    stop = broker.place(nifty("np0041", side="SELL", quantity=65, order_type="SL",
                              trigger_price=Decimal("24000"), price=Decimal("23880.5")))  # fmt: skip

    bodies = {r["tag"]: r["body"] for r in fake.received_orders()}
    assert {k: bodies["np0040"][k] for k in ("pt", "pr", "tp", "qt", "tt", "es", "ts", "pc", "rt", "am")} == {
        "pt": "L", "pr": "24328.20", "tp": "0", "qt": "65", "tt": "B", "es": "nse_fo",
        "ts": NIFTY_FUT.trading_symbol, "pc": "NRML", "rt": "DAY", "am": "NO",
    }  # fmt: skip
    assert {k: bodies["np0041"][k] for k in ("pt", "pr", "tp", "qt", "tt")} == {
        "pt": "SL", "pr": "23880.50", "tp": "24000.00", "qt": "65", "tt": "S",
    }  # fmt: skip
    assert status_of(broker, entry.broker_order_id).status == "OPEN"
    stop_row = status_of(broker, stop.broker_order_id)
    assert (stop_row.status, stop_row.raw["ordSt"]) == ("OPEN", "trigger pending")

    # Market and SL-M never reach Kotak (it refuses them from API sessions anyway).
    for kind in ("MARKET", "SL-M"):
        with pytest.raises(BrokerRejected, match="refused before sending"):
            broker.place(nifty(f"np0042{kind[0]}", quantity=65, order_type=kind,
                               trigger_price=Decimal("24000")))  # fmt: skip
    # Nor does an order the exchange would refuse after the ack.
    for bad, why in ((nifty("np0043", quantity=1820), "freeze quantity 1800"),
                     (nifty("np0044", quantity=50), "lot size 65"),
                     (nifty("np0045", quantity=65, price=Decimal("24100.15")), "tick size 0.1")):  # fmt: skip
        with pytest.raises(BrokerRejected, match=why):
            broker.place(bad)
    assert sorted(bodies) == ["np0040", "np0041"] == sorted(r["tag"] for r in fake.received_orders())


def test_modify_and_cancel(fake: KotakRestFake, broker: KotakBroker) -> None:
    stop = nifty("np0050", side="SELL", order_type="SL", quantity=65, trigger_price=Decimal("24000"),
                 price=Decimal("23990"))  # fmt: skip
    order_no = broker.place(stop).broker_order_id
    broker.modify(order_no, trigger_price=Decimal("24010.5"), price=Decimal("24000"))
    row = status_of(broker, order_no).raw
    assert (row["prcTp"], row["trgPrc"], row["prc"], row["qty"]) == ("SL", "24010.50", "24000.00", 65)

    broker.cancel(order_no)
    assert status_of(broker, order_no).status == "CANCELLED"
    with pytest.raises(BrokerRejected, match="already CANCELLED"):
        broker.modify(order_no, price=Decimal("23900"))
    with pytest.raises(BrokerRejected, match="order is cancelled"):
        broker.cancel(order_no)  # the broker's own answer (stCode 1021)


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


def max_in_window(stamps: list[float], window: float = 1.0) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t - start < window) for i, start in enumerate(stamps))


def test_a_burst_of_25_places_is_held_to_10_orders_per_second(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    broker.login()
    fake.set_rate_limit(orders_per_s=10, requests_per_s=25)  # the fake answers 429 beyond that
    tags = [f"np1{i:03d}" for i in range(25)]

    with ThreadPoolExecutor(20) as pool:  # execution's pool size
        acks = list(pool.map(lambda tag: broker.place(reliance(tag, quantity=1)), tags))

    assert len({a.broker_order_id for a in acks}) == 25
    stamps = [r["ts"] for r in fake.requests(api="place_order")]
    assert len(stamps) == 25
    assert max_in_window(stamps) <= 10
    assert stamps[-1] - stamps[0] >= 2.0  # 25 orders at 10/s need more than two seconds
    assert max_in_window([r["ts"] for r in fake.requests()]) <= 25
    assert {r["outcome"] for r in fake.received_orders()} == {"ack"}


# --------------------------------------------------------------------------------------------
# Error dicts
# --------------------------------------------------------------------------------------------


def test_error_replies_map_to_rejected_unknown_or_temporary(fake: KotakRestFake, broker: KotakBroker) -> None:
    # A gateway page after the order was taken: {"Error": JSONDecodeError} -> unknown.
    fake.fail_next("place_order", 502, "<html>502 Bad Gateway</html>", after_handling=True)
    with pytest.raises(BrokerUnknown, match="not JSON"):
        broker.place(reliance("np0060"))
    assert broker.find_by_tag("np0060") is not None

    # A 5xx body without a broker code: nothing proves a refusal -> unknown (here: not placed).
    fake.fail_next("place_order", 503, {"stat": "Not_Ok", "errMsg": "Service Unavailable"})
    with pytest.raises(BrokerUnknown, match="Service Unavailable"):
        broker.place(reliance("np0061"))
    assert broker.find_by_tag("np0061") is None

    # The broker's own refusal, with its code and words.
    with pytest.raises(BrokerRejected, match="Invalid trading symbol") as refused:
        broker.place(reliance("np0062", token="999999", symbol="NOSUCH-EQ"))
    assert refused.value.raw["stCode"] == 1009

    # 429 on a place: not placed, and said so.
    fake.fail_next("place_order", 429, {"stCode": 429, "errMsg": "Too many requests", "stat": "Not_Ok"})
    with pytest.raises(BrokerRejected, match="not placed: broker rate limit"):
        broker.place(reliance("np0063"))

    # Reads: rate limit, 5xx and unreadable replies are temporary; "No Data" is an empty book.
    assert broker.trade_book() == []
    fake.fail_next("order_book", 429, {"stCode": 429, "errMsg": "Too many requests", "stat": "Not_Ok"})
    with pytest.raises(BrokerTemporary, match="rate_limited"):
        broker.order_book()
    fake.fail_next("trade_report", 503)
    with pytest.raises(BrokerTemporary):
        broker.trade_book()
    fake.fail_next("order_book", 504, "<html>504 Gateway Time-out</html>")
    with pytest.raises(BrokerTemporary, match="unreadable"):
        broker.order_book()
    assert [s.client_tag for s in broker.order_book()] == ["np0060"]  # the books recover

    # Only np0060 was taken; np0061 and np0063 were answered before the broker handled them.
    received = [(r["tag"], r["outcome"]) for r in fake.received_orders()]
    assert received == [("np0060", "ack"), ("np0062", "rejected")]


# --------------------------------------------------------------------------------------------
# Feed lease and instrument master
# --------------------------------------------------------------------------------------------


def test_feed_session_leases_url_ucc_and_sid(tmp_path: Path) -> None:
    sfeed = "ws://127.0.0.1:9/feed"
    with KotakRestFake(tmp_path / "kotak.json", extra_args=["--sfeed-url", sfeed]) as fake:
        broker = KotakBroker(kotak_config(fake), ExecutionConfig())
        try:
            lease = broker.feed_session()
            def saved() -> dict[str, Any] | None:  # the fake writes its state within 0.1 s
                d: dict[str, Any] = json.loads(fake.state_file.read_text())
                return d if d["sessions"] and d["sessions"][-1].get("sid") == lease["auth"] else None

            state = eventually(saved, timeout=5, message="the session in the fake's state file")
            assert lease["url"] == sfeed  # from the dynamic config service, pinned to the fake
            assert lease["user"] == FakeCredentials().ucc
            assert lease["auth"] == state["sessions"][-1]["sid"]
            assert set(lease) == {"url", "user", "auth", "issued_ns"}  # no trading token
        finally:
            broker.close()


def test_master_sync_caches_the_days_csv_files(fake: KotakRestFake, tmp_path: Path) -> None:
    broker = KotakBroker(kotak_config(fake), ExecutionConfig())
    try:
        paths = fetch_kotak_master(broker, tmp_path / "home")
    finally:
        broker.close()
    assert sorted(p.name for p in paths) == ["nse_cm.csv", "nse_fo.csv"]
    assert all(p.parent == tmp_path / "home" / "master" for p in paths)
    master = MasterData.load_for_home(tmp_path / "home")
    fut = master.resolve(NIFTY_FUT.trading_symbol)
    assert (fut.lot_size, fut.tick_size, fut.freeze_qty) == (65, Decimal("0.1"), 1800)
    assert master.resolve("RELIANCE-EQ").key == "nse_cm|2885"
    assert {r["api"] for r in fake.requests()} == {"scrip_master", "scrip_file"}  # no login needed


def test_connection_refused_on_place_is_unknown_and_the_book_later_shows_it_never_arrived(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    broker.login()
    fake.stop()
    with pytest.raises(BrokerUnknown, match="Unable to connect"):
        broker.place(reliance("np0070"))
    with pytest.raises(BrokerTemporary):
        broker.order_book()
    fake.restart()  # same port and state file: the session survives
    assert broker.find_by_tag("np0070") is None
    assert fake.received_orders() == []


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ({"stat": "Ok", "nOrdNo": "1", "stCode": 200}, Kind.OK),
        ({"stat": "ok", "stCode": 200, "data": []}, Kind.OK),
        ({"stCode": 5203, "errMsg": "No Data", "stat": "Not_Ok"}, Kind.EMPTY),
        ({"stCode": 100022, "errMsg": "invalid session token", "stat": "Not_Ok"}, Kind.SESSION),
        ({"stat": "Not_Ok", "error": [{"code": "10020", "message": "Authentication Failed"}]}, Kind.SESSION),
        ({"stCode": 900901, "errMsg": "Invalid Credentials", "stat": "Not_Ok"}, Kind.SESSION),
        ({"Error Message": "Complete the 2fa process before accessing this application"}, Kind.SESSION),
        ({"stCode": 429, "errMsg": "Too many requests", "stat": "Not_Ok"}, Kind.RATE_LIMITED),
        ({"stCode": 100021, "errMsg": "invalid  access type", "stat": "Not_Ok"}, Kind.REFUSED),
        ({"stCode": 1021, "errMsg": "order is completed", "stat": "Not_Ok", "status_code": 400},
         Kind.REFUSED),
        ({"stat": "Not_Ok", "emsg": "Order rejected", "stCode": "1009"}, Kind.REFUSED),
        ({"stCode": 502, "errMsg": "not able to communicate with OMS", "stat": "Not_Ok"}, Kind.SERVER),
        ({"stat": "Not_Ok", "errMsg": "Service Unavailable"}, Kind.UNRECOGNISED),
        ({"message": "Internal server error"}, Kind.UNRECOGNISED),
        (None, Kind.UNRECOGNISED),
        ({"Error": "Exception has been occurred while connecting to API"}, Kind.UNREADABLE),
        ({"Error": "Exchange segment not found"}, Kind.INVALID),
    ],
)
def test_reply_shapes_from_the_sdk_notes_are_recognised(reply: Any, kind: Kind) -> None:
    assert classify(reply).kind is kind


def test_sdk_exceptions_in_error_dicts_are_told_apart_by_type() -> None:
    from neo_api_client.exceptions import ApiException, ApiValueError

    not_json = json.JSONDecodeError("Expecting value", "<html>", 0)
    assert classify({"Error": not_json}).kind is Kind.UNREADABLE  # sent; reply unreadable
    assert classify({"Error": ApiValueError("Invalid product.")}).kind is Kind.INVALID  # never sent
    assert classify({"Error": KeyError("NSE")}).kind is Kind.INVALID
    timeout = ApiException(status=0, reason="Request timeout after 10 seconds")
    assert classify({"error": timeout}).kind is Kind.TRANSPORT
    refused = ApiException(status=0, reason="Unable to connect to server")
    assert classify({"Error": refused}).kind is Kind.TRANSPORT
    assert classify({"error": ApiException(status=503, reason="Service Unavailable")}).kind is Kind.SERVER
