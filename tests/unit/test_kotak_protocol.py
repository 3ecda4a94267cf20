"""Kotak's static-IP refusals (100008, 1037) in services/execution/brokers/kotak_protocol.py:
recognised in every envelope the SDK hands back, and never taken for a session expiry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from libs.common.sdk import import_sdk
from services.execution.brokers.kotak_protocol import (
    SESSION_CODES,
    ST_IP_NOT_WHITELISTED,
    ST_SESSION_IP_MISMATCH,
    Kind,
    classify,
    ip_block_words,
)

NOT_WHITELISTED = ST_IP_NOT_WHITELISTED
MISMATCH = ST_SESSION_IP_MISMATCH


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        # place / modify / cancel / books / positions: Kotak's documented bodies
        ({"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"}, NOT_WHITELISTED),
        ({"stCode": 1037, "errMsg": "session ip does not match", "stat": "Not_Ok"}, MISMATCH),
        # the code as a string, or under errCode / code
        ({"stCode": "100008", "errMsg": "unauthorized", "stat": "Not_Ok"}, NOT_WHITELISTED),
        ({"stat": "Not_Ok", "errCode": "1037", "errMsg": "session ip does not match"}, MISMATCH),
        ({"code": "100008", "message": "unauthorized", "description": "IP not allowed"}, NOT_WHITELISTED),
        # modify of a finished order gets status_code added by the SDK; the code still wins
        ({"stCode": 1037, "errMsg": "session ip does not match", "stat": "Not_Ok", "status_code": 400},
         MISMATCH),
        # login / validate: the login service's error list, code as a string
        ({"error": [{"code": "100008", "message": "unauthorized"}]}, NOT_WHITELISTED),
        ({"stat": "Not_Ok", "error": [{"code": 1037, "message": "session ip does not match"}]}, MISMATCH),
        ({"error": {"code": "1037", "message": "session ip does not match"}}, MISMATCH),
        # order_history wraps the broker's body in {"data": ...}
        ({"data": {"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"}}, NOT_WHITELISTED),
        # a gateway fault object
        ({"fault": {"code": 1037, "message": "session ip does not match"}}, MISMATCH),
        # no code at all, but the words say it
        ({"stat": "Not_Ok", "errMsg": "Session IP does not match"}, MISMATCH),
        ({"stat": "Not_Ok", "emsg": "Request IP not whitelisted"}, NOT_WHITELISTED),
    ],
)
def test_static_ip_refusals_are_recognised_in_every_envelope(reply: dict[str, Any], code: int) -> None:
    verdict = classify(reply)
    assert (verdict.kind, verdict.code) == (Kind.IP_BLOCKED, code)
    assert verdict.reason  # Kotak's words, or ours when it gave none


def test_an_sdk_exception_carrying_the_body_is_recognised() -> None:
    import_sdk()  # the SDK's import-time logging set-up must not leak into other tests
    from neo_api_client.exceptions import ApiException

    body = json.dumps({"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"})
    verdict = classify({"error": ApiException(status=401, reason="Unauthorized", body=body)})  # type: ignore[no-untyped-call]
    assert (verdict.kind, verdict.code) == (Kind.IP_BLOCKED, NOT_WHITELISTED)


def test_100008_is_no_longer_a_session_expiry() -> None:
    assert not SESSION_CODES & {NOT_WHITELISTED, MISMATCH}
    assert classify({"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"}).kind is Kind.IP_BLOCKED


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ({"stCode": 100022, "errMsg": "invalid session token", "stat": "Not_Ok"}, Kind.SESSION),
        ({"stCode": 900901, "errMsg": "Invalid Credentials", "stat": "Not_Ok"}, Kind.SESSION),
        ({"stat": "Not_Ok", "errMsg": "unauthorized"}, Kind.SESSION),  # no code: the old reading
        ({"Error Message": "Complete the 2fa process before accessing this application"}, Kind.SESSION),
        ({"stCode": 1021, "errMsg": "order is completed", "stat": "Not_Ok"}, Kind.REFUSED),
        ({"stCode": 10037, "errMsg": "something else", "stat": "Not_Ok"}, Kind.REFUSED),
        ({"stCode": 1008, "errMsg": "something else", "stat": "Not_Ok"}, Kind.REFUSED),
        # book rows are data: a row field that looks like a code is never an error
        ({"stat": "Ok", "stCode": 200, "data": [{"code": 100008, "nOrdNo": "1"}]}, Kind.OK),
        ({"stat": "Not_Ok", "stCode": 5203, "errMsg": "No Data", "data": [{"code": 1037}]}, Kind.EMPTY),
    ],
)
def test_other_replies_keep_their_meaning(reply: dict[str, Any], kind: Kind) -> None:
    assert classify(reply).kind is kind


def test_a_successful_order_history_is_never_a_static_ip_refusal() -> None:
    # order_history wraps the broker's body in {"data": ...}; its rows are data
    reply = {"data": {"stat": "Ok", "stCode": 200, "data": [{"errCode": 1037, "nOrdNo": "1"}]}}
    assert classify(reply).kind is not Kind.IP_BLOCKED


def test_words_say_what_happened_and_what_to_fix() -> None:
    reason, fix = ip_block_words(NOT_WHITELISTED, "unauthorized", "203.0.113.7")
    assert "not whitelisted" in reason and "100008" in reason and "unauthorized" in reason
    assert "whitelist this machine's public IP, which Kotak sees as 203.0.113.7, in" in fix
    assert "API dashboard" in fix

    reason, fix = ip_block_words(MISMATCH, "session ip does not match")
    assert "another IP" in reason and "1037" in reason
    assert fix.startswith("log in again from the whitelisted IP (the session was created from another IP)")
    assert "{ip}" not in fix and "Kotak sees" not in fix  # no IP known: no placeholder left


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        # a code that is not an IP code decides, whatever the words around it say
        ({"stCode": 1007, "errMsg": "Scrip not whitelisted", "stat": "Not_Ok"}, Kind.REFUSED, 1007),
        ({"stCode": 100022, "errMsg": "invalid session ip token", "stat": "Not_Ok"}, Kind.SESSION, 100022),
        ({"error": [{"code": "10020", "message": "session ip expired"}]}, Kind.SESSION, 10020),
    ],
)
def test_words_never_override_an_explicit_non_ip_code(reply: dict[str, Any], kind: Kind, code: int) -> None:
    verdict = classify(reply)
    assert (verdict.kind, verdict.code) == (kind, code)
    # under errCode too (whatever else such a body means, it is not the static-IP rule)
    assert classify({"stat": "Not_Ok", "errCode": "1009", "errMsg": "symbol not whitelisted"}).kind is not (
        Kind.IP_BLOCKED
    )


@pytest.mark.parametrize(
    "reply",
    [
        {"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"},
        {"stCode": 1037, "errMsg": "session ip does not match", "stat": "Not_Ok"},
        {"data": {"stCode": 100008, "errMsg": "unauthorized", "stat": "Not_Ok"}},
        {"stat": "Not_Ok", "emsg": "Request IP not whitelisted"},
    ],
)
def test_an_ip_code_on_a_call_kotak_does_not_ip_check_is_a_session_problem(reply: dict[str, Any]) -> None:
    # Kotak IP-checks only place/modify/cancel: on a read the code means a session to renew.
    assert classify(reply).kind is Kind.IP_BLOCKED  # an order call (and a login)
    verdict = classify(reply, ip_checked=False)
    assert verdict.kind is Kind.SESSION and verdict.code in {NOT_WHITELISTED, MISMATCH} and verdict.reason
