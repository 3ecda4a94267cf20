"""Kotak's static-IP rule (from 2026-04-01): orders only from a whitelisted static IP, in a session
created from that IP. 100008 = IP not whitelisted, 1037 = session created from another IP.

First the adapter (``KotakBroker`` on the real SDK, in process) against the Kotak REST fake: the
refusal is recognised on place, on login and on reads, never re-sent, never answered by a
re-login loop, and only the bounded probe (a fresh login) lifts it. Then execution as a real
process against the fake, for each code: one CRITICAL alert that says what to fix, no retry
storm at the fake, new orders and flatten refused with the reason, ``neopulse status`` exiting 3,
the stops at the broker left alone, and intake back once the block is gone.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.bus import Subscriber
from libs.common.config import ExecutionConfig
from libs.common.messages import Alert, CancelEntries, ExecuteOrder, Reply
from libs.common.sdk import import_sdk
from services.execution.brokers.base import BrokerIpBlocked, BrokerTemporary
from services.execution.brokers.kotak import (
    IP_PROBE_S,
    PROBE_ORDER_NO,
    KotakBroker,
    KotakLoginError,
    PinnedOriginTransport,
)
from services.execution.brokers.kotak_protocol import (
    ST_IP_NOT_WHITELISTED,
    ST_SESSION_IP_MISMATCH,
    Kind,
    classify,
)
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.risk_support import has_execution_service
from tests.integration.test_execution_kotak_faults import kotak_env, live_rows, protected_bracket
from tests.integration.test_execution_service import ExecStack
from tests.integration.test_kotak_broker import kotak_config, reliance

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")

CODES = [ST_IP_NOT_WHITELISTED, ST_SESSION_IP_MISMATCH]
FIX_WORDS = {  # what the operator must read in the alert
    ST_IP_NOT_WHITELISTED: ("whitelist this machine's public IP", "API dashboard"),
    ST_SESSION_IP_MISMATCH: ("log in again from the whitelisted IP",
                             "the session was created from another IP"),
}
PROBE_S = 0.5  # the adapter tests' probe step (execution itself runs with IP_PROBE_S)


def count(fake: KotakRestFake, api: str, since: float = 0.0) -> int:
    return sum(1 for r in fake.requests(api=api) if r["ts"] >= since)


def ip_refused(fake: KotakRestFake, api: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests(api=api) if r.get("fault") == "ip_block"]


# ============================================================================================
# The SDK's envelopes (the fake's refusals, as neo_api_client hands them back)
# ============================================================================================

TRADING_CALLS: dict[str, Callable[[Any, str], Any]] = {
    "place_order": lambda c, _no: c.place_order(
        exchange_segment="nse_cm", product="MIS", price="2500.10", order_type="L", quantity="5",
        validity="DAY", trading_symbol="RELIANCE-EQ", transaction_type="B", tag="np0201"),
    "modify_order": lambda c, no: c.modify_order(order_id=no, price="2500.20", order_type="L",
                                                 quantity="5", validity="DAY"),
    "cancel_order": lambda c, no: c.cancel_order(order_id=no),
    "order_book": lambda c, _no: c.order_report(),
    "order_history": lambda c, no: c.order_history(order_id=no),  # {"data": <broker body>}
    "trade_report": lambda c, _no: c.trade_report(),
    "positions": lambda c, _no: c.positions(),
}  # fmt: skip


@pytest.mark.parametrize("code", CODES)
def test_every_api_refused_for_the_ip_is_recognised_as_the_sdk_returns_it(
    fake: KotakRestFake, code: int
) -> None:
    # Arrange: the raw SDK, logged in, with one order in the book.
    sdk = import_sdk()
    c = fake.credentials
    client = sdk.NeoAPI(consumer_key=c.consumer_key, environment="prod",
                        transport=PinnedOriginTransport(fake.base_url), timeout=5.0)  # fmt: skip
    assert client.totp_login(mobile_number=c.mobile_number, ucc=c.ucc, totp=fake.totp_now())["data"]
    assert client.totp_validate(mpin=c.mpin)["data"]["kType"] == "Trade"
    order_no = TRADING_CALLS["place_order"](client, "")["nOrdNo"]

    # Act: every trading API (and each login step) answers with the static-IP refusal.
    fake.ip_block(code, apis=[*TRADING_CALLS, "totp_login", "totp_validate"])
    replies = {api: call(client, order_no) for api, call in TRADING_CALLS.items()}
    replies["totp_login"] = client.totp_login(mobile_number=c.mobile_number, ucc=c.ucc, totp=fake.totp_now())
    replies["totp_validate"] = client.totp_validate(mpin=c.mpin)

    # Assert: each is read as the IP refusal with its code, whatever its envelope.
    verdicts = {api: (classify(r).kind, classify(r).code) for api, r in replies.items()}
    assert verdicts == dict.fromkeys(replies, (Kind.IP_BLOCKED, code)), replies
    assert "data" in replies["order_history"] and "error" in replies["totp_login"]  # two envelopes
    assert ip_refused(fake, "place_order") and fake.orders()[0]["ordSt"] == "open"  # nothing done


# ============================================================================================
# The adapter
# ============================================================================================


@pytest.fixture
def broker(fake: KotakRestFake) -> Iterator[KotakBroker]:
    b = KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0),
                    ip_probe_s=(PROBE_S, 2 * PROBE_S))  # fmt: skip
    yield b
    b.close()


@pytest.mark.parametrize("code", CODES)
def test_an_order_refused_for_the_ip_is_not_resent_and_nothing_more_is_sent_until_the_probe(
    fake: KotakRestFake, broker: KotakBroker, code: int
) -> None:
    # Arrange: logged in and trading; then Kotak starts refusing the order APIs for the IP.
    broker.login()
    placed = broker.place(reliance("np0101")).broker_order_id
    fake.ip_block(code)

    # Act: a place is refused for the IP; then more order calls come.
    with pytest.raises(BrokerIpBlocked) as first:
        broker.place(reliance("np0102"))
    with pytest.raises(BrokerIpBlocked, match="not sent"):
        broker.place(reliance("np0103"))
    with pytest.raises(BrokerIpBlocked, match="not sent"):
        broker.cancel(placed)

    # Assert: a distinct error with the code and the fix; one place reached Kotak, no re-login,
    # no cancel was sent; reads (which Kotak does not IP-check) go on.
    assert first.value.code == code
    assert all(w in first.value.fix for w in FIX_WORDS[code][:1])
    outcomes = [(r["tag"], r["outcome"]) for r in fake.received_orders()]
    assert outcomes == [("np0101", "ack"), ("np0102", "ip_blocked")]
    assert (count(fake, "totp_login"), count(fake, "cancel_order")) == (1, 0)
    assert [s.client_tag for s in broker.order_book()] == ["np0101"]
    block = broker.ip_block()
    assert block is not None and block.refusing and block.code == code and block.episode == 1
    assert block.ip == "127.0.0.1"  # whatsmyip: the IP Kotak sees, for the alert


def test_a_probe_login_alone_never_lifts_the_refusal_only_an_order_call_past_the_ip_check_does(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: blocked.
    broker.login()
    fake.ip_block(ST_IP_NOT_WHITELISTED)
    with pytest.raises(BrokerIpBlocked):
        broker.place(reliance("np0111"))
    logins = count(fake, "totp_login")

    # Act 1: probe before its time, then at its time, while the IP is still refused.
    assert not broker.ip_probe_due() and not broker.probe_ip_block()
    eventually(broker.ip_probe_due, timeout=3, message="the probe to fall due")
    assert not broker.probe_ip_block()

    # Assert 1: one fresh login (Kotak never IP-checks one, so it proves nothing), then exactly
    # one order call -- the harmless cancel of an order number no order has -- which Kotak
    # refused for the IP: still refusing, same episode, the probe one step later, and an order
    # asked for meanwhile is not sent.
    assert count(fake, "totp_login") == logins + 1
    assert [r.get("fault") for r in fake.requests(api="cancel_order")] == ["ip_block"]
    block = broker.ip_block()
    assert block is not None and block.refusing and block.episode == 1
    with pytest.raises(BrokerIpBlocked, match="not sent"):
        broker.place(reliance("np0112"))
    assert not broker.ip_probe_due()
    time.sleep(2 * PROBE_S)  # nothing lifts it by itself
    assert broker.ip_block() is not None and count(fake, "place_order") == 1

    # Act 2: the operator fixes the whitelist; the next probe's order call passes the IP check.
    fake.clear_faults()
    eventually(broker.ip_probe_due, timeout=5, message="the next probe to fall due")
    assert broker.probe_ip_block()
    ack = broker.place(reliance("np0113"))

    # Assert 2: the episode ended on the probe's cancel (answered "order not found"); placed.
    assert ack.broker_order_id and broker.ip_block() is None
    assert [r.get("fault") for r in fake.requests(api="cancel_order")] == ["ip_block", None]
    outcomes = [(r["tag"], r["outcome"]) for r in fake.received_orders()]
    assert outcomes == [("np0111", "ip_blocked"), ("np0113", "ack")]
    assert count(fake, "totp_login") == logins + 2


def test_the_fake_refuses_an_ip_blocked_cancel_before_it_looks_the_order_up(fake: KotakRestFake) -> None:
    # Kotak checks the IP before anything else: the probe's cancel of an order number that cannot
    # exist is answered with the IP code while blocked, and with a plain refusal when not.
    sdk = import_sdk()
    c = fake.credentials
    client = sdk.NeoAPI(consumer_key=c.consumer_key, environment="prod",
                        transport=PinnedOriginTransport(fake.base_url), timeout=5.0)  # fmt: skip
    client.totp_login(mobile_number=c.mobile_number, ucc=c.ucc, totp=fake.totp_now())
    client.totp_validate(mpin=c.mpin)

    fake.ip_block(ST_SESSION_IP_MISMATCH)
    blocked = classify(client.cancel_order(order_id=PROBE_ORDER_NO))
    fake.ip_block(None)
    passed = classify(client.cancel_order(order_id=PROBE_ORDER_NO))

    assert (blocked.kind, blocked.code) == (Kind.IP_BLOCKED, ST_SESSION_IP_MISMATCH)
    assert passed.kind is Kind.REFUSED and passed.code not in {ST_IP_NOT_WHITELISTED, ST_SESSION_IP_MISMATCH}


def test_a_login_refused_for_the_ip_is_not_retried_until_the_probe(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: the login service itself refuses the IP (its own envelope: an error list).
    fake.ip_block(ST_SESSION_IP_MISMATCH, apis=["totp_login"])

    # Act: the first call logs in lazily and is refused; the pollers go on calling.
    with pytest.raises(BrokerIpBlocked) as refused:
        broker.order_book()
    for _ in range(5):
        with pytest.raises(BrokerIpBlocked):
            broker.order_book()
    with pytest.raises(BrokerIpBlocked):
        broker.place(reliance("np0121"))

    # Assert: one login request, not one per call, and not the sticky "credentials refused".
    assert refused.value.code == ST_SESSION_IP_MISMATCH
    assert count(fake, "totp_login") == 1 and fake.received_orders() == []

    # Act 2: the IP is right again; the probe logs in, its one order call passes, calls work.
    fake.clear_faults()
    eventually(broker.ip_probe_due, timeout=3, message="the probe to fall due")
    assert broker.probe_ip_block()
    assert broker.order_book() == []
    assert broker.place(reliance("np0122")).broker_order_id and broker.ip_block() is None


def probe_times(broker: KotakBroker, seconds: float) -> list[float]:
    """Run the probe whenever it is due for ``seconds``; when each one started."""
    t0, times = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        if broker.ip_probe_due():
            times.append(time.monotonic() - t0)
            broker.probe_ip_block()
        time.sleep(0.01)
    return times


def test_every_failed_probe_moves_the_probe_one_step_on_whatever_failed(fake: KotakRestFake) -> None:
    # Arrange: orders refused for the IP; the probe's first two logins fail (a 503), the third
    # logs in but its order call gets a 503 (no answer past the IP check either).
    b = KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0),
                    ip_probe_s=(0.3, 0.6, 1.2), ip_trial_wait_s=0.05)  # fmt: skip
    try:
        b.login()
        fake.ip_block(ST_IP_NOT_WHITELISTED, apis=["place_order"])
        with pytest.raises(BrokerIpBlocked):
            b.place(reliance("np0131"))
        fake.fail_next("totp_login", 503, {"stat": "Not_Ok", "stCode": 503, "errMsg": "busy"}, count=2)
        fake.fail_next("cancel_order", 503, {"stat": "Not_Ok", "stCode": 503, "errMsg": "busy"}, count=9)

        # Act
        times = probe_times(b, 4.2)

        # Assert: 30 s, 60 s, then 120 s (here 0.3, 0.6, 1.2): every failure stepped on.
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert len(times) >= 3, times
        assert times[0] >= 0.25 and gaps[0] >= 0.55 and all(g >= 1.15 for g in gaps[1:]), times
        assert b.ip_block() is not None and count(fake, "place_order") == 1
    finally:
        b.close()


def test_a_login_refused_for_the_ip_again_and_again_stops_the_probe_and_says_check_the_consumer_key(
    fake: KotakRestFake,
) -> None:
    b = KotakBroker(kotak_config(fake), ExecutionConfig(broker_timeout_s=5.0), ip_probe_s=(0.3, 0.6, 1.2))
    try:
        fake.ip_block(ST_SESSION_IP_MISMATCH, apis=["totp_login"])
        with pytest.raises(BrokerIpBlocked):
            b.order_book()

        times = probe_times(b, 3.0)

        # Two probes, one step apart (0.3 then 0.6), and then no more: three refused logins.
        assert len(times) == 2 and times[1] - times[0] >= 0.55, times
        assert count(fake, "totp_login") == 3
        block = b.ip_block()
        assert block is not None and "consumer key" in block.note and "consumer key" in block.summary
        with pytest.raises(KotakLoginError, match="consumer key"):  # sticky: no session to keep
            b.order_book()
        assert count(fake, "totp_login") == 3
    finally:
        b.close()


def test_a_probe_logs_in_outside_the_session_lock_and_keeps_the_old_session_when_refused(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: trading; blocked; the probe's login is slow (a TOTP window) and then refused.
    broker.login()
    fake.ip_block(ST_IP_NOT_WHITELISTED)
    with pytest.raises(BrokerIpBlocked):
        broker.place(reliance("np0141"))
    slow_login = broker._totp_login  # the seam: make the probe's login slow

    def slow(client: Any, totp: Any) -> Any:
        time.sleep(1.0)
        return slow_login(client, totp)

    broker._totp_login = slow  # type: ignore[method-assign]
    fake.fail_next("totp_validate", 401, {"error": [{"code": "10020", "message": "Invalid MPIN"}]})
    eventually(broker.ip_probe_due, timeout=3, message="the probe to fall due")
    probe = threading.Thread(target=broker.probe_ip_block)

    # Act: reads during the probe's login, and after it was refused.
    probe.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    during = broker.order_book()
    waited = time.monotonic() - t0
    probe.join(10)

    # Assert: reads were not held by the probe, the old session still serves them, nothing is
    # sticky, and the probe stopped (another wrong MPIN could lock the account) saying why.
    assert waited < 0.8 and [s.client_tag for s in during] == []
    assert broker.order_book() == [] and broker._login_error is None
    block = broker.ip_block()
    assert block is not None and block.refusing and "refused" in block.note
    assert not broker.ip_probe_due()


def test_a_read_answered_with_an_ip_code_is_a_session_problem_not_a_block(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    # Kotak does not IP-check reads: 100008 on one is no static-IP block.
    broker.login()
    fake.ip_block(ST_IP_NOT_WHITELISTED, apis=["order_book"], count=1)

    assert broker.order_book() == []  # one re-login, the read repeated
    assert count(fake, "totp_login") == 2 and broker.ip_block() is None
    assert broker.place(reliance("np0151")).broker_order_id  # orders are not refused

    # ... and a read that keeps answering it does not turn into a login loop.
    fake.ip_block(ST_IP_NOT_WHITELISTED, apis=["order_book"])
    for _ in range(4):
        with pytest.raises(BrokerTemporary):
            broker.order_book()
    assert count(fake, "totp_login") == 2 and broker.ip_block() is None


def test_a_fresh_process_sends_one_order_call_first_not_a_batch(
    fake: KotakRestFake, broker: KotakBroker
) -> None:
    # Arrange: the IP is not whitelisted when execution starts; eight order calls come at once.
    fake.ip_block(ST_IP_NOT_WHITELISTED)
    errors: list[BaseException] = []

    def place(n: int) -> None:
        try:
            broker.place(reliance(f"np016{n}"))
        except BaseException as exc:  # collected for the assertions
            errors.append(exc)

    # Act
    threads = [threading.Thread(target=place, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    # Assert: one place reached Kotak (refused), one whatsmyip for the episode (besides the
    # login's own); the other seven were not sent.
    assert len(errors) == 8 and all(isinstance(e, BrokerIpBlocked) for e in errors)
    assert [r["outcome"] for r in fake.received_orders()] == ["ip_blocked"]
    assert count(fake, "client_ip") == 2 and count(fake, "totp_login") == 1
    assert sum("not sent" in e.reason for e in errors if isinstance(e, BrokerIpBlocked)) == 7


# ============================================================================================
# Execution as a process
# ============================================================================================

WINDOW_S = 10.0  # how long the block is watched for a storm
RESUME_S = IP_PROBE_S[0] + 20.0  # the first probe, then slack for a loaded machine


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    s = ExecStack(tmp_path / "home", pg_url, quotes={"RELIANCE-EQ": 1290.0}, **kotak_env(fake))
    try:
        yield s
    finally:
        s.close()


def alerts(sub: Subscriber, into: list[Alert]) -> list[Alert]:
    while (m := sub.recv(50)) is not None:
        if isinstance(m[1], Alert):
            into.append(m[1])
    return into


def new_order(stack: ExecStack) -> ExecuteOrder:
    return stack.order(qty=1, price="1000.00", strategy="s9")


def status(stack: ExecStack) -> Any:
    return stack.cli("status", "-s", "execution", "--listen", "3")


# 100008 only: the whole episode takes ~35 s, and a 1037 on a later order call has its own
# test below (a 1037 on a place goes through the same path: the adapter tests show both codes).
@pytest.mark.parametrize("code", [ST_IP_NOT_WHITELISTED])
def test_execution_alerts_once_refuses_new_orders_and_resumes_after_the_ip_block(
    stack: ExecStack, fake: KotakRestFake, code: int
) -> None:
    # Arrange: execution on Kotak, with a protected position (stop and target live at Kotak).
    stack.start()
    sub = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    seen: list[Alert] = []
    _, stop_no, target_no = protected_bracket(stack, fake)
    resting = stack.ok(new_order(stack))  # an entry resting at Kotak (BUY 1000 with the market at 1290)
    eventually(lambda: stack.find(resting["order_id"])["broker_order_id"], timeout=10,
               message="the resting entry acknowledged")  # fmt: skip
    assert status(stack).returncode == 0

    # Act 1: Kotak starts refusing orders from this IP; the next order meets it.
    fake.ip_block(code)
    t_block = time.time()
    first = stack.ok(new_order(stack))  # accepted: nobody knew yet
    row = eventually(lambda: (o := stack.find(first["order_id"]))["status"] == "REJECTED" and o, timeout=10,
                     message="the order refused for the IP closed in the ledger")  # fmt: skip
    critical = eventually(lambda: [a for a in alerts(sub, seen) if a.code == "broker_ip_blocked"], timeout=5,
                          message="the CRITICAL broker_ip_blocked alert")  # fmt: skip

    # ... and for the next 10 s new orders keep coming, status and flatten are asked.
    refused: dict[str, Reply] = {}
    while time.time() - t_block < WINDOW_S - 4.5:
        msg = new_order(stack)
        reply = stack.ask(msg)
        assert isinstance(reply, Reply), reply
        refused[msg.request_id] = reply
        time.sleep(0.5)
    blocked_status = status(stack)
    flat = stack.cli("flatten", "--yes")
    kill = stack.ask(CancelEntries(request_id=f"ks-{time.time_ns()}", reason="kill switch: test"))
    time.sleep(max(0.0, t_block + WINDOW_S - time.time()))

    # Assert 1: the row says why; one CRITICAL alert that says what to fix.
    assert "not placed" in row["reason"] and str(code) in row["reason"], row
    assert len(critical) == 1 and critical[0].level == "CRITICAL", critical
    assert all(w in critical[0].text for w in FIX_WORDS[code]), critical[0].text
    # No storm at the fake: the one refused place, no re-login, nothing cancelled.
    places = count(fake, "place_order", t_block)
    logins = count(fake, "totp_login", t_block)
    assert places <= 3 and logins <= 3, (places, logins)
    assert len(ip_refused(fake, "place_order")) == 1 and count(fake, "cancel_order", t_block) == 0
    # New orders were refused with the reason, and none of them reached the ledger or Kotak.
    replies = list(refused.values())
    assert replies and all(not r.ok and r.code == "broker_ip" for r in replies), replies[:2]
    assert "refuses orders from this machine's IP" in replies[0].error and str(code) in replies[0].error
    assert not set(refused) & {o["request_id"] for o in stack.orders()}, "a refused order reached the ledger"
    # status exits 3 naming it; flatten was refused and cancelled nothing.
    assert blocked_status.returncode == 3, (blocked_status.stdout, blocked_status.stderr)
    assert "execution" in blocked_status.stderr and "refuses orders" in blocked_status.stderr
    assert flat.returncode == 1 and "nothing was cancelled" in flat.stderr, (flat.stdout, flat.stderr)
    # ... and says how to exit by hand safely: NeoPulse's stop and target first, each named.
    assert "first cancel NeoPulse's stop/target orders" in flat.stderr and stop_no in flat.stderr
    assert "close at Kotak directly" not in flat.stderr
    assert "first cancel NeoPulse's stop/target orders" in critical[0].text and target_no in critical[0].text
    assert "gets no stop or target" in critical[0].text
    # The kill switch does not claim cancels that were never sent.
    assert isinstance(kill, Reply) and kill.ok and kill.data["sent"] is False, kill
    assert kill.data["order_ids"] == [resting["order_id"]] and "refuses orders" in kill.data["not_sent"]
    assert any(a.code == "cancel_entries_not_sent" for a in alerts(sub, seen))
    # The protective exits at the broker are untouched.
    assert [o["nOrdNo"] for o in live_rows(fake, "stop")] == [stop_no]
    assert [o["nOrdNo"] for o in live_rows(fake, "target")] == [target_no]

    # Act 2: the operator fixes it (whitelists the IP / logs in from the whitelisted one).
    fake.clear_faults()
    t_fixed = time.monotonic()

    def accepted() -> dict[str, Any]:
        reply = stack.ask(new_order(stack))
        assert isinstance(reply, Reply), reply
        if not reply.ok:
            assert reply.code == "broker_ip", reply
        return dict(reply.data) if reply.ok else {}

    back = eventually(accepted, timeout=RESUME_S, interval=1.0, message="intake to resume after the block")

    # Assert 2: intake resumed within the probe's bound, the order reached Kotak, the operator
    # hears that it is over, status is ok again, and still only one CRITICAL alert was sent.
    assert time.monotonic() - t_fixed <= RESUME_S
    eventually(lambda: stack.find(back["order_id"])["broker_order_id"], timeout=10,
               message="the order after the block acknowledged by Kotak")  # fmt: skip
    eventually(lambda: any(a.code == "broker_ip_cleared" for a in alerts(sub, seen)), timeout=5,
               message="the INFO broker_ip_cleared alert")  # fmt: skip
    assert eventually(lambda: status(stack).returncode == 0, timeout=10, interval=0.5, message="status ok")
    assert [a.code for a in seen].count("broker_ip_blocked") == 1, [a.code for a in seen]
    assert count(fake, "totp_login", t_block) <= 2  # the probe: one fresh login per step (30 s, 60 s, ...)
    assert [o["nOrdNo"] for o in live_rows(fake, "stop")] == [stop_no]
    # the kill switch's owed cancel went once Kotak accepted orders again
    eventually(lambda: stack.find(resting["order_id"])["status"] == "CANCELLED", timeout=15,
               message="the resting entry cancelled after the block")  # fmt: skip
    sub.close()


def test_a_1037_on_a_later_order_call_alerts_once_is_not_resent_and_refuses_new_orders(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: a protected position; then Kotak refuses cancels for the session's IP (1037: the
    # session was created from another IP), while places and reads still pass.
    stack.start()
    sub = stack.bus.subscriber([stack.cfg.bus.endpoint("execution_pub")], [b"alert."])
    seen: list[Alert] = []
    _, stop_no, target_no = protected_bracket(stack, fake)
    fake.ip_block(ST_SESSION_IP_MISMATCH, apis=["cancel_order"])
    t_block = time.time()

    # Act: the target fills, so the stop must be cancelled: that later call meets the 1037.
    fake.fill(target_no)
    critical = eventually(lambda: [a for a in alerts(sub, seen) if a.code == "broker_ip_blocked"], timeout=10,
                          message="the CRITICAL broker_ip_blocked alert")  # fmt: skip
    refused = stack.ask(new_order(stack))
    time.sleep(4.0)  # a storm would show here: polls, reconciliation and the owed cancel go on

    # Assert: one alert naming the fix, the cancel sent once, the new order refused with the reason.
    assert len(critical) == 1 and critical[0].level == "CRITICAL", critical
    assert all(w in critical[0].text for w in FIX_WORDS[ST_SESSION_IP_MISMATCH]), critical[0].text
    assert len(ip_refused(fake, "cancel_order")) == 1 and count(fake, "cancel_order", t_block) == 1
    assert isinstance(refused, Reply) and not refused.ok and refused.code == "broker_ip", refused
    assert str(ST_SESSION_IP_MISMATCH) in refused.error
    assert [a.code for a in alerts(sub, seen)].count("broker_ip_blocked") == 1
    assert fake.order(stop_no)["ordSt"] == "trigger pending"  # the stop stays at Kotak, owed a cancel
    sub.close()
