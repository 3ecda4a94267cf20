"""The closed vocabularies: each word defined once, read as its plain text everywhere, checked
on decode; and the one order-status transition rule."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common import messages as m
from libs.common.messages import (
    ACK,
    CANCELLED,
    COMPLETE,
    OPEN,
    PARTIAL,
    PENDING_BROKER,
    REJECTED,
    TERMINAL_STATES,
    UNKNOWN,
    BracketState,
    BrokerName,
    Codec,
    FeedSource,
    FlattenPhase,
    OrderStatus,
    OrderType,
    Product,
    Purpose,
    RiskEvent,
    Side,
    Vocabulary,
)
from services.execution import model
from services.execution.brokers import kotak_protocol
from services.execution.model import next_status

VOCABULARIES: list[type[Vocabulary]] = [
    Side, OrderType, Product, Purpose, OrderStatus, BracketState, FlattenPhase, RiskEvent,
    FeedSource, BrokerName,
]  # fmt: skip

_CODEC = Codec()


def _decode(**fields: Any) -> m.Message:
    return _CODEC.decode(msgspec.msgpack.encode(fields))


def _request(**fields: Any) -> dict[str, Any]:
    return {"kind": "OrderRequest", "request_id": "r1", "strategy_id": "s1", "side": "BUY", **fields}


# --------------------------------------------------------------------------- a word is its text


@pytest.mark.parametrize("vocab", VOCABULARIES, ids=lambda v: v.__name__)
def test_every_word_compares_hashes_prints_and_encodes_as_its_plain_text(vocab: type[Vocabulary]) -> None:
    for word in vocab:
        text = word.value

        assert word == text and hash(word) == hash(text) and {text: 1}[word] == 1
        assert str(word) == f"{word}" == "%s" % word == text  # noqa: UP031 - the old style too
        assert repr(word) == repr(text)  # key=value log lines read the same
        assert msgspec.msgpack.encode(word) == msgspec.msgpack.encode(text)
        assert msgspec.json.encode({word: word}) == msgspec.json.encode({text: text})
        assert json.dumps(word) == json.dumps(text)
        built = msgspec.to_builtins({"w": word})["w"]
        assert built == text and type(built) is str


def test_the_old_module_level_names_are_the_members() -> None:
    statuses = (PENDING_BROKER, ACK, OPEN, PARTIAL, COMPLETE, REJECTED, CANCELLED, UNKNOWN)
    purposes = (model.ENTRY, model.EXIT, model.FLATTEN_P, model.MANUAL, model.STOP, model.TARGET)
    brackets = (model.B_PENDING, model.B_ACTIVE, model.B_CLOSED, model.B_CANCELLED, model.B_FLATTENED)

    assert all(a is b for a, b in zip(statuses, OrderStatus, strict=True))
    assert all(a is b for a, b in zip(purposes, Purpose, strict=True))
    assert all(a is b for a, b in zip(brackets, BracketState, strict=True))
    assert sorted(model.REQUEST_PURPOSES) == ["ENTRY", "EXIT", "FLATTEN", "MANUAL"]
    assert sorted(model.LEG_PURPOSES) == ["STOP", "TARGET"]


def test_terminal_is_defined_once_and_the_kotak_map_is_built_from_it() -> None:
    kotak = kotak_protocol.TERMINAL

    assert sorted(TERMINAL_STATES) == [CANCELLED, COMPLETE, REJECTED]
    assert model.TERMINAL is TERMINAL_STATES
    assert kotak == {"complete": "COMPLETE", "rejected": "REJECTED", "cancelled": "CANCELLED"}
    assert set(kotak.values()) == TERMINAL_STATES
    assert kotak_protocol.map_status(" Complete ", 5) == COMPLETE
    assert kotak_protocol.map_status("open", 0) == OPEN
    assert kotak_protocol.map_status("open", 1) == PARTIAL
    assert kotak_protocol.map_status("put order req received", 0) == ACK


def test_postgres_receives_a_word_as_text() -> None:
    from psycopg.adapt import PyFormat, Transformer

    dumper = Transformer().get_dumper(OrderType.SL_M, PyFormat.AUTO)

    assert bytes(dumper.dump(OrderType.SL_M)) == b"SL-M"


# --------------------------------------------------------------------------- decode-time checks


@pytest.mark.parametrize(
    ("field", "vocab"),
    [("side", Side), ("order_type", OrderType), ("product", Product)],
)
def test_decoder_accepts_every_word_of_a_request_field_and_keeps_it_plain_text(
        field: str, vocab: type[Vocabulary]) -> None:
    for word in vocab:
        msg = _decode(**_request(**{field: word.value}))

        assert isinstance(msg, m.OrderRequest)
        value = getattr(msg, field)
        assert value == word and type(value) is str


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (_request(side="buy"), "$.side"),
        (_request(side="HOLD"), "$.side"),
        (_request(order_type="STOP"), "$.order_type"),
        (_request(product="MTF"), "$.product"),
        (_request(purpose="STOP"), "$.purpose"),  # a leg purpose: execution's own, never asked for
        (_request(purpose="TARGET"), "$.purpose"),
        ({"kind": "RecordRiskEvent", "event": "kill_switch", "reason": "a"}, "$.event"),
        ({"kind": "RecordRiskEvent", "event": "loss_breached\n", "reason": "a"}, "$.event"),
    ],
)
def test_decoder_refuses_a_word_outside_its_closed_set_naming_the_field_and_the_words(
        fields: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        _decode(**fields)

    text = str(err.value)
    assert text.endswith(f"at `{where}`")
    assert "matching regex '^(?:" in text  # the allowed words, in order


def test_every_request_purpose_and_risk_event_decodes() -> None:
    for purpose in model.REQUEST_PURPOSES:
        msg = _decode(**_request(purpose=purpose))
        assert isinstance(msg, m.OrderRequest) and msg.purpose == purpose
    for event in RiskEvent:
        msg = _decode(kind="RecordRiskEvent", event=event.value, reason="why")
        assert isinstance(msg, m.RecordRiskEvent) and msg.event == event


def test_in_process_messages_encode_and_print_as_before() -> None:
    # omit_defaults compares by identity: the request fields stay ``str`` with ``str``
    # defaults, so a request built from plain strings drops the same fields as before.
    req = m.OrderRequest(request_id="r1", strategy_id="s1", side="BUY", purpose="ENTRY", ts_ns=1)
    event = m.RecordRiskEvent(event=RiskEvent.KILL_SWITCH_ON, reason="why", ts_ns=1)
    update = m.OrderUpdate(order_id="o", request_id="r", strategy_id="s", client_tag="t", symbol="X",
                           segment="nse_cm", token="1", side=Side.SELL, quantity=1, status=COMPLETE,
                           price=Decimal("1.5"), ts_ns=1)  # fmt: skip

    assert m.to_builtins(req) == {"kind": "OrderRequest", "request_id": "r1", "strategy_id": "s1",
                                  "side": "BUY", "ts_ns": 1}  # fmt: skip
    assert m.to_builtins(event) == {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "why",
                                    "ts_ns": 1}  # fmt: skip
    built = m.to_builtins(update)
    assert built["status"] == "COMPLETE" and type(built["status"]) is str and built["side"] == "SELL"
    again = _decode(**msgspec.msgpack.decode(_CODEC.encode(update)))
    assert again == m.OrderUpdate(**{**msgspec.structs.asdict(update), "side": "SELL", "status": "COMPLETE"})


# --------------------------------------------------------------------------- the status rule

_NO = None
# (current, reported, expected): the rule the engine applied in ``_transition``.
TRANSITIONS: list[tuple[str, str, str | None]] = [
    (PENDING_BROKER, ACK, ACK),
    (PENDING_BROKER, UNKNOWN, UNKNOWN),
    (PENDING_BROKER, REJECTED, REJECTED),
    (PENDING_BROKER, COMPLETE, COMPLETE),
    (PENDING_BROKER, PENDING_BROKER, _NO),  # same status: no move
    (UNKNOWN, ACK, ACK),  # the book showed it after all
    (UNKNOWN, CANCELLED, CANCELLED),
    (UNKNOWN, PENDING_BROKER, _NO),  # never to a lower rank
    (ACK, OPEN, OPEN),
    (ACK, PARTIAL, PARTIAL),
    (ACK, UNKNOWN, _NO),
    (ACK, ACK, _NO),
    (OPEN, PARTIAL, PARTIAL),
    (OPEN, ACK, _NO),  # a stale book row
    (PARTIAL, OPEN, _NO),  # a late OPEN after a fill
    (PARTIAL, PARTIAL, _NO),
    (PARTIAL, COMPLETE, COMPLETE),
    (PARTIAL, CANCELLED, CANCELLED),
    (OPEN, REJECTED, REJECTED),
    (COMPLETE, CANCELLED, _NO),  # nothing leaves a terminal state, even at the same rank
    (COMPLETE, COMPLETE, _NO),
    (CANCELLED, COMPLETE, _NO),
    (REJECTED, OPEN, _NO),
    (REJECTED, ACK, _NO),
    ("OPEN", "COMPLETE", COMPLETE),  # plain strings (a decoded or stored row) work the same
]


@pytest.mark.parametrize(("current", "reported", "expected"), TRANSITIONS)
def test_next_status_moves_only_forward_and_never_out_of_a_terminal_state(
        current: str, reported: str, expected: str | None) -> None:
    assert next_status(current, reported) == expected


def test_next_status_covers_every_pair_by_rank() -> None:
    for current in OrderStatus:
        for reported in OrderStatus:
            moved = next_status(current, reported)

            if current in TERMINAL_STATES or current == reported:
                assert moved is None, (current, reported)
            else:
                expect = reported if model.RANK[reported] >= model.RANK[current] else None
                assert moved == expect, (current, reported)


def test_next_status_refuses_a_status_it_does_not_know() -> None:
    with pytest.raises(KeyError):
        next_status(ACK, "FILLED")
