"""Kotak's order feed at the lowest layer: frame parsing, the LIVE / DOWN / polling state
machine, the announcer (services/execution/brokers/kotak_orderfeed.py), and the fake's auth
frame reading (tests/fakes/kotak_orderfeed.py)."""

from __future__ import annotations

import json

import pytest

from services.execution.brokers.kotak_orderfeed import (
    ACK_WAIT_S,
    DOWN,
    LIVE,
    MAX_FAILURES,
    POLLING,
    RECONNECT_S,
    STABLE_S,
    FeedAnnouncer,
    FeedHealth,
    parse_frame,
    realtime_url,
)
from tests.fakes.kotak_orderfeed import parse_auth

ORDER = {"nOrdNo": "261202000000001", "ordSt": "open", "qty": 10, "fldQty": 0, "avgPrc": "0.00",
         "GuiOrdId": "np0001"}  # fmt: skip


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (json.dumps({"type": "order", "data": ORDER}), "order"),
        # a JSON number where the SDK's model wants a string: the SDK falls back to a raw dict; we read it
        (json.dumps({"type": "order", "data": {**ORDER, "avgPrc": 1.5, "nOrdNo": 261202000000001}}), "order"),
        (json.dumps({"type": "order", "data": json.dumps(ORDER)}), "order"),  # double-encoded data
        (json.dumps({"type": "position", "data": {"tok": "2885", "flBuyQty": "10"}}), "position"),
        ('{"ak":"ok","type":"cn","task":"cn","msg":"connected"}', "ack"),
        ('{"ak":"nk","type":"cn","task":"cn","msg":"Authentication Failed"}', "refused"),
        ('{"ak":"nk","type":"failed to process request","msg":"invalid request format"}', "refused"),
        ('{"type":"trade","data":{}}', "other"),
        (json.dumps({"type": "order", "data": {"ordSt": "open"}}), "bad"),  # no order number
        ('{"type":"order"}', "bad"),
        ('{"type":"order","data":"not json"}', "bad"),
        ("not json", "bad"),
        ("42", "bad"),
        ("[1,2]", "bad"),
        ("", "bad"),
        (b"\xff\xfe", "bad"),
        (b'{"ak":"ok","type":"cn"}', "ack"),
        ("\x00" * 10, "bad"),
        ("x" * 2_000_000, "bad"),
    ],
)
def test_every_frame_shape_is_read_without_raising(raw: str | bytes, kind: str) -> None:
    assert parse_frame(raw).kind == kind


def test_an_order_frame_with_sdk_unfriendly_types_keeps_its_values() -> None:
    frame = parse_frame(json.dumps({"type": "order", "data": {**ORDER, "fldQty": "10", "avgPrc": 1.5}}))
    assert frame.row["fldQty"] == "10" and frame.row["avgPrc"] == 1.5


def test_the_refusal_text_is_the_servers_message() -> None:
    frame = parse_frame('{"ak":"nk","type":"cn","task":"cn","msg":"Authentication Failed"}')
    assert frame.text == "Authentication Failed" and frame.row["type"] == "cn"


@pytest.mark.parametrize(
    ("args", "url"),
    [
        (("ws://127.0.0.1:9/realtime", "wss://a/x", "", ""), "ws://127.0.0.1:9/realtime"),
        (("", "https://dc.example/realtime", "", ""), "wss://dc.example/realtime"),
        (("", "", "http://127.0.0.1:5/rt", "https://b"), "ws://127.0.0.1:5/rt"),
        (("", "", "", "https://gw.example:8443/api/x?q=1"), "wss://gw.example:8443/realtime"),
        (("", "", "", "http://127.0.0.1:7"), "ws://127.0.0.1:7/realtime"),
        (("", "", "", "127.0.0.1:7"), ""),  # no scheme: the SDK would guess wss and mangle it
        (("", "", "", ""), ""),
    ],
)
def test_the_feed_url_follows_the_sdks_precedence_and_never_falls_back_to_a_default_host(
    args: tuple[str, str, str, str], url: str
) -> None:
    assert realtime_url(*args) == url


# ------------------------------------------------------------------ state machine


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_live_only_after_the_ack_or_a_frame_and_down_at_once_when_the_socket_goes() -> None:
    c = Clock()
    h = FeedHealth(c)
    assert h.state == POLLING
    h.want()
    h.socket_open()
    assert h.state == DOWN  # connected but not proven
    h.on_frame(parse_frame('{"ak":"ok","type":"cn","msg":"connected"}'))
    assert h.state == LIVE and h.live_since == c.t
    delay = h.lost("connection closed")
    assert h.state == DOWN and delay is not None and delay <= 1.0 and h.note == "connection closed"


def test_an_order_frame_proves_the_session_without_an_ack() -> None:
    h = FeedHealth(Clock())
    h.want()
    h.socket_open()
    h.on_frame(parse_frame(json.dumps({"type": "order", "data": ORDER})))
    assert h.state == LIVE


def test_no_ack_in_time_is_said_once_and_stays_down() -> None:
    c = Clock()
    h = FeedHealth(c)
    h.want()
    h.socket_open()
    assert not h.check_ack()
    c.t += ACK_WAIT_S
    assert h.check_ack() and "no ack" in h.note
    assert not h.check_ack()
    assert h.state == DOWN


def test_reconnects_back_off_and_give_up_after_max_failures_until_the_next_login() -> None:
    h = FeedHealth(Clock())
    h.want()
    delays = []
    for _ in range(MAX_FAILURES - 1):
        d = h.lost("connect failed")
        assert d is not None
        delays.append(d)
    assert delays == sorted(delays) and delays[-1] <= 30.0
    assert h.lost("connect failed") is None
    assert h.state == POLLING and "gave up" in h.note
    h.want()  # a login
    assert h.state == DOWN and h.failures == 0


def test_a_connection_that_became_live_resets_the_failure_count() -> None:
    c = Clock()
    h = FeedHealth(c)
    h.want()
    for _ in range(5):
        h.lost("connect failed")
    h.socket_open()
    h.on_frame(parse_frame('{"ak":"ok","type":"cn"}'))
    assert h.failures == 0
    c.t += STABLE_S
    assert h.lost("connection closed") == 0.5  # it had stayed up: reconnect at once
    h.socket_open()
    h.on_frame(parse_frame('{"ak":"ok","type":"cn"}'))
    assert h.lost("connection closed") == RECONNECT_S[1]  # up for no time: one step back


def test_a_refused_session_stops_until_the_next_login() -> None:
    h = FeedHealth(Clock())
    h.want()
    h.refused("Authentication Failed")
    assert h.state == POLLING and "refused" in h.note and h.lost("closed") is None
    h.on_frame(parse_frame('{"ak":"ok","type":"cn"}'))  # a late frame of the refused socket
    assert h.state == POLLING


# ------------------------------------------------------------------ announcements


def test_down_and_back_are_announced_once_each_after_holding() -> None:
    a = FeedAnnouncer(hold_s=3.0, quiet_s=300.0)
    assert a.step(False, 0.0) is None and a.step(False, 10.0) is None  # never LIVE yet: nothing to say
    assert a.step(True, 11.0) is None
    assert a.step(False, 20.0) is None and a.step(False, 22.9) is None
    assert a.step(False, 23.0) == "down" and a.step(False, 30.0) is None
    assert a.step(True, 31.0) is None and a.step(True, 34.0) == "back" and a.step(True, 40.0) is None


def test_a_flapping_feed_gives_one_pair_not_a_storm() -> None:
    a = FeedAnnouncer(hold_s=3.0, quiet_s=300.0)
    said = []
    t = 0.0
    a.step(True, t)
    for _ in range(50):  # 4 s down, 4 s up, for 400 s
        for live in (False, True):
            for _ in range(8):
                t += 0.5
                if (x := a.step(live, t)) is not None:
                    said.append(x)
    assert said == ["down", "back", "down", "back"]  # once per quiet_s
    assert a.step(True, t) is None


def test_a_blip_shorter_than_the_hold_is_not_announced() -> None:
    a = FeedAnnouncer(hold_s=3.0)
    a.step(True, 0.0)
    assert [a.step(False, 1.0), a.step(False, 2.0), a.step(True, 3.5), a.step(True, 10.0)] == [None] * 4


# ------------------------------------------------------------------ the fake's auth frame


@pytest.mark.parametrize(
    ("frame", "got"),
    [
        ("{type:cn,Authorization:TOK,Sid:SID,src:WEB}", ("TOK", "SID")),
        ('{"type":"cn","Authorization":"TOK","Sid":"SID","src":"WEB"}', ("TOK", "SID")),
        ("{type:hb}", None),
        ("garbage", None),
    ],
)
def test_the_fake_reads_both_spellings_of_the_connect_frame(frame: str, got: tuple[str, str] | None) -> None:
    assert parse_auth(frame) == got
