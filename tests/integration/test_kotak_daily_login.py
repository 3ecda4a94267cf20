"""The daily Kotak session: the login at ``kotak.login_at`` on trading days, its retries with
backoff, "not logged in" refusals until one works, and the IP Kotak sees.

First the adapter (``KotakBroker`` on the real SDK, in process) against the Kotak REST fake
with an injected clock (``ManualClock`` on IST dates); the backoff runs on the real monotonic
clock, shortened here. Then execution as a real process against the fake: a failed login at
start is announced once, orders are refused with "not logged in", and the retry brings intake
back with the IP in ``neopulse status``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.clock import IST, ManualClock
from libs.common.config import ExecutionConfig
from libs.common.messages import Alert, GetRiskState, RiskState
from services.execution.brokers.base import BrokerIpBlocked, BrokerTemporary
from services.execution.brokers.kotak import LOGIN_TOTP_TRIES, KotakBroker, KotakLoginError
from services.execution.brokers.kotak_protocol import ST_SESSION_IP_MISMATCH
from tests.fakes.kotak_rest import KotakRestFake, login_error
from tests.helpers import eventually, free_base_port
from tests.integration.risk_support import Stack, has_execution_service
from tests.integration.test_execution_kotak_faults import REQUEST_TIMEOUT_MS, ask_risk, kotak_env
from tests.integration.test_kotak_broker import kotak_config, reliance

pytestmark = pytest.mark.skipif(not has_execution_service(), reason="services/execution is not built yet")

RETRY_S = 0.3  # the adapter tests' login backoff (execution itself runs with LOGIN_RETRY_S)
THURSDAY = dt.date(2026, 12, 3)  # an NSE trading day
SATURDAY = dt.date(2026, 12, 5)
INVALID_TOTP = login_error("10020", "Invalid TOTP")
INVALID_MPIN = login_error("401", "Invalid MPIN")


def ist_ns(day: dt.date, hh: int, mm: int) -> int:
    return int(dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=IST).timestamp() * 1e9)


def logins(fake: KotakRestFake) -> int:
    return len(fake.requests(api="totp_login"))


def make_broker(fake: KotakRestFake, clock: ManualClock, session_file: Path | None = None,
                **kotak: Any) -> KotakBroker:  # fmt: skip
    return KotakBroker(kotak_config(fake, **kotak), ExecutionConfig(broker_timeout_s=5.0), clock=clock,
                       login_retry_s=(RETRY_S,), totp_window_wait=False,
                       session_file=session_file)  # fmt: skip


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(ist_ns(THURSDAY, 8, 44))


@pytest.fixture
def broker(fake: KotakRestFake, clock: ManualClock) -> Iterator[KotakBroker]:
    b = make_broker(fake, clock)
    yield b
    b.close()


def test_the_morning_login_runs_at_login_at_on_trading_days_once_a_day(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    # Arrange: 08:44 IST on a trading day, login_at 08:45 (the default); a hook records logins.
    seen: list[int] = []
    broker.on_login.append(lambda: seen.append(broker.session_info()["session"]))

    # Act / Assert: nothing before 08:45; at 08:45 one login; then none again that day.
    assert broker.login_if_due() is False and logins(fake) == 0
    clock.advance(60)
    assert broker.login_if_due() is True
    assert broker.login_if_due() is False
    clock.advance(3600)
    assert broker.login_if_due() is False and logins(fake) == 1
    info = broker.session_info()
    assert info["logged_in"] and info["ip"] == "127.0.0.1" and info["login_day"] == "2026-12-03", info
    assert seen == [1] and broker.session_refusal() == ""
    assert "Auth" not in json.dumps(info) and fake.credentials.mpin not in json.dumps(info)

    # The next morning the session Kotak ended overnight is replaced, also when still "logged in".
    clock.set_ns(ist_ns(THURSDAY + dt.timedelta(days=1), 8, 45))
    assert broker.login_if_due() is True and logins(fake) == 2 and seen == [1, 2]
    # No login on a weekend.
    clock.set_ns(ist_ns(SATURDAY, 9, 0))
    assert broker.login_if_due() is False and logins(fake) == 2


def test_a_process_started_during_the_day_logs_in_once_not_again_at_the_schedule(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    # Arrange: started at 10:00, after login_at; its first call logs in (lazily).
    clock.set_ns(ist_ns(THURSDAY, 10, 0))
    broker.order_book()

    # Act: the daily login looks whether it is due.
    due = broker.login_if_due()

    # Assert: one login that day, not two in a row.
    assert due is False and logins(fake) == 1


def test_a_refused_totp_is_retried_with_backoff_and_orders_are_refused_until_a_login_works(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    # Arrange: Kotak refuses the TOTP of the next login (both codes it sends).
    clock.advance(60)
    fake.fail_next("totp_login", status=401, body=INVALID_TOTP, count=2)

    # Act 1: the morning login.
    with pytest.raises(KotakLoginError, match="Invalid TOTP"):
        broker.login_if_due()

    # Assert 1: not logged in, and said so; nothing more is sent during the backoff (a lazy
    # login neither).
    assert broker.session_refusal().startswith("not logged in to Kotak") and "Invalid TOTP" in (
        broker.session_refusal()
    )
    sent = logins(fake)
    assert broker.login_if_due() is False
    with pytest.raises(BrokerTemporary):
        broker.order_book()
    assert logins(fake) == sent == 2

    # Act 2: the backoff passes; the next look logs in.
    time.sleep(RETRY_S + 0.05)
    assert broker.login_if_due() is True

    # Assert 2: logged in, orders no longer refused, the books readable.
    assert broker.session_refusal() == "" and broker.session_info()["login_failures"] == 0
    assert broker.order_book() == [] and logins(fake) == 3


def test_a_totp_kotak_keeps_refusing_is_tried_a_bounded_number_of_times(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    clock.advance(60)
    fake.fail_next("totp_login", status=401, body=INVALID_TOTP, count=100)
    for _ in range(LOGIN_TOTP_TRIES):
        with pytest.raises(KotakLoginError):
            broker.login_if_due()
        time.sleep(RETRY_S + 0.05)
    assert broker.login_if_due() is False  # gave up for the day
    assert logins(fake) == 2 * LOGIN_TOTP_TRIES
    assert "check kotak.totp_secret" in broker.session_refusal()


def test_a_refused_mpin_is_never_sent_again(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    clock.advance(60)
    fake.fail_next("totp_validate", status=401, body=INVALID_MPIN)
    with pytest.raises(KotakLoginError, match="Invalid MPIN"):
        broker.login_if_due()
    time.sleep(RETRY_S + 0.05)
    assert broker.login_if_due() is False
    with pytest.raises(KotakLoginError):
        broker.order_book()
    assert len(fake.requests(api="totp_validate")) == 1
    assert "not retried" in broker.session_refusal()


def test_a_login_that_times_out_or_meets_a_5xx_is_retried_after_the_backoff(
    fake: KotakRestFake, clock: ManualClock, broker: KotakBroker
) -> None:
    clock.advance(60)
    fake.fail_next("totp_login", status=503)
    with pytest.raises(BrokerTemporary):
        broker.login_if_due()
    assert "503" in broker.session_refusal() or "Service Unavailable" in broker.session_refusal()
    with pytest.raises(BrokerTemporary, match="not logged in"):
        broker.order_book()  # a lazy login waits out the backoff too
    assert logins(fake) == 1
    time.sleep(RETRY_S + 0.05)
    assert broker.order_book() == [] and logins(fake) == 2  # the next call after it logs in
    assert broker.login_if_due() is False  # and the schedule needs no second login


def test_a_restart_during_the_day_takes_back_the_saved_session_and_logs_in_only_when_kotak_refuses_it(
    fake: KotakRestFake, clock: ManualClock, tmp_path: Path
) -> None:
    # Arrange: a process logs in at 10:00 and keeps its session for the day.
    saved = tmp_path / "run" / "kotak-session.json"
    clock.set_ns(ist_ns(THURSDAY, 10, 0))
    first = make_broker(fake, clock, session_file=saved)
    first.order_book()
    first.close()
    text = saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o600
    assert not any(secret in text for secret in (fake.credentials.mpin, fake.credentials.totp_secret,
                                                 fake.credentials.consumer_key))  # fmt: skip

    # Act 1: a restart the same day.
    second = make_broker(fake, clock, session_file=saved)
    second.order_book()
    due = second.login_if_due()
    second.close()

    # Assert 1: no login: the saved session was taken back (checked with one read).
    assert logins(fake) == 1 and due is False and second.session_info()["logged_in"]

    # Act 2: Kotak ended that session; another restart.
    fake.expire_session()
    third = make_broker(fake, clock, session_file=saved)
    third.order_book()
    third.close()

    # Assert 2: the refused session is dropped and one login replaces it; the next morning's
    # process does not take yesterday's; a logout removes the file.
    assert logins(fake) == 2
    clock.set_ns(ist_ns(THURSDAY + dt.timedelta(days=1), 8, 50))
    fourth = make_broker(fake, clock, session_file=saved)
    fourth.order_book()
    assert logins(fake) == 3
    fourth.logout()
    fourth.close()
    assert not saved.exists()


def test_a_session_kotak_refuses_for_another_ip_is_not_kept_for_a_restart(
    fake: KotakRestFake, clock: ManualClock, tmp_path: Path
) -> None:
    saved = tmp_path / "run" / "kotak-session.json"
    b = make_broker(fake, clock, session_file=saved)
    b.order_book()
    assert saved.exists()
    fake.ip_block(ST_SESSION_IP_MISMATCH)
    with pytest.raises(BrokerIpBlocked):
        b.place(reliance("np0301"))
    b.close()
    assert not saved.exists()


def test_a_restart_on_another_ip_logs_in_afresh_instead_of_taking_back_the_saved_session(
    fake: KotakRestFake, clock: ManualClock, tmp_path: Path
) -> None:
    # Arrange: a session saved with the IP Kotak saw at its login; then the machine's IP
    # changed (the file says another one: Kotak would answer reads on it and refuse orders, 1037).
    saved = tmp_path / "run" / "kotak-session.json"
    clock.set_ns(ist_ns(THURSDAY, 10, 0))
    first = make_broker(fake, clock, session_file=saved)
    first.order_book()
    first.close()
    data = json.loads(saved.read_text())
    assert data["ip"] == "127.0.0.1"
    saved.write_text(json.dumps({**data, "ip": "203.0.113.7"}))

    # Act: a restart the same day.
    second = make_broker(fake, clock, session_file=saved)
    second.order_book()
    second.close()

    # Assert: a fresh login, saved with the IP this machine has now.
    assert logins(fake) == 2
    assert json.loads(saved.read_text())["ip"] == "127.0.0.1"


# ============================================================================================
# Execution and risk
# ============================================================================================


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[Stack]:
    s = Stack(tmp_path / "home", free_base_port(), NEOPULSE_DATABASE__URL=pg_url,
              NEOPULSE_BUS__REQUEST_TIMEOUT_MS=REQUEST_TIMEOUT_MS, **kotak_env(fake))  # fmt: skip
    try:
        yield s
    finally:
        s.close()


def test_a_failed_login_is_announced_halts_risk_with_not_logged_in_until_a_login_works(
    stack: Stack, fake: KotakRestFake
) -> None:
    # Arrange: Kotak answers the first login with a 5xx.
    fake.fail_next("totp_login", status=503)
    s = stack
    sub = s.bus.subscriber([s.cfg.bus.endpoint("execution_pub")], [b"alert.", b"session."])
    seen: list[Alert] = []

    def alerts() -> list[Alert]:
        while (m := sub.recv(50)) is not None:
            if isinstance(m[1], Alert):
                seen.append(m[1])
        return seen

    # Act: execution starts (its first calls log in, and fail), then risk; a strategy orders.
    s.start("execution")
    s.start("risk")
    critical = eventually(lambda: [a for a in alerts() if a.code == "broker_login_failed"], timeout=10,
                          message="the CRITICAL broker_login_failed alert")  # fmt: skip

    def risk_state() -> RiskState:
        reply = s.ask("risk_rep", GetRiskState())
        assert isinstance(reply, RiskState), reply
        return reply

    halted = eventually(lambda: (st := risk_state()).state == "HALTED" and st, timeout=10,
                        message="risk HALTED for the login")  # fmt: skip
    refused = ask_risk(s, f"login-{time.monotonic_ns()}", "1000.0")

    # Assert 1: announced once, risk HALTED with the reason, the order refused with it, and the
    # login not hammered meanwhile.
    assert critical[0].level == "CRITICAL" and "keeps trying" in critical[0].text
    assert "not logged in to Kotak" in halted.reason, halted
    assert not refused.approved and "HALTED: not logged in to Kotak" in refused.reason, refused
    assert logins(fake) == 1

    # Act 2 / Assert 2: the retry after the backoff logs in: announced, risk ACTIVE, orders pass,
    # and status shows the IP Kotak sees.
    eventually(lambda: any(a.code == "broker_login_ok" for a in alerts()), timeout=15,
               message="the INFO broker_login_ok alert")  # fmt: skip
    eventually(lambda: risk_state().state == "ACTIVE", timeout=10, message="risk ACTIVE after the login")
    back = ask_risk(s, f"login-{time.monotonic_ns()}", "1000.0")
    assert back.approved and back.order_id, back
    assert logins(fake) == 2 and [a.code for a in seen].count("broker_login_failed") == 1
    assert any(a.code == "broker_login" for a in seen)  # the feed's cue to re-lease its session
    rc, shown = s.cli_json("status", "-s", "execution", "--listen", "3")
    session = shown["services"][0]["info"]["broker_session"]
    assert rc == 0 and session["ip"] == "127.0.0.1" and session["logged_in"], shown
    table = s.cli("status", "-s", "execution", "--listen", "3")
    assert "broker_ip=127.0.0.1" in table.stdout, table.stdout
    sub.close()


def test_an_ip_block_halts_risk_with_the_ip_reason_and_strategies_hear_it(
    stack: Stack, fake: KotakRestFake
) -> None:
    # Arrange: execution on Kotak and risk; an order goes through, to show the path works.
    s = stack
    s.start("execution")
    s.start("risk")
    eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
    first = eventually(lambda: (v := ask_risk(s, f"ip-ok-{time.monotonic_ns()}", "1000.0")).approved and v,
                       timeout=15, message="an order through risk and execution")  # fmt: skip
    assert first.order_id

    def risk_state() -> RiskState:
        reply = s.ask("risk_rep", GetRiskState())
        assert isinstance(reply, RiskState), reply
        return reply

    # Act: Kotak starts refusing orders from this IP; the next order meets it at the broker.
    fake.ip_block(100008)
    ask_risk(s, f"ip-first-{time.monotonic_ns()}", "1000.0")
    halted = eventually(lambda: (st := risk_state()).state == "HALTED" and st, timeout=10,
                        message="risk HALTED for the IP block")  # fmt: skip
    refused = ask_risk(s, f"ip-next-{time.monotonic_ns()}", "1000.0")

    # Assert: risk says why (the IP and the code), and a strategy's next order is refused with it
    # by risk itself (no order id: it never reached execution's ledger).
    assert "IP" in halted.reason and "100008" in halted.reason, halted
    assert not refused.approved and refused.reason.startswith("HALTED"), refused
    assert "100008" in refused.reason and not refused.order_id, refused
