"""Every wire type survives an encode/decode round trip with every field set."""

from __future__ import annotations

import re
import typing
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common import messages as m

# A value for each constrained text field: the first that matches its pattern.
_STR_SAMPLES = ("x-42", "BUY", "LIMIT", "MIS", "ENTRY", "nse_cm", "kill_switch_on", "halted", "5min",
                "2026-12-01")  # fmt: skip


def _sample(t: msgspec.inspect.Type, depth: int = 0) -> Any:
    """A non-default value for a field of type ``t`` (so defaults cannot hide a bug)."""
    ti = msgspec.inspect
    match t:
        case ti.StrType(pattern=pattern) if pattern:
            return next(v for v in _STR_SAMPLES if re.search(pattern, v))
        case ti.StrType():
            return "x-42"
        case ti.BoolType():
            return True
        case ti.IntType():
            return 42
        case ti.FloatType():
            return 2.5
        case ti.DecimalType():
            return Decimal("25.05")  # within every money bound (risk_pct is at most 100)
        case ti.UnionType(types=types):
            return _sample(next(x for x in types if not isinstance(x, ti.NoneType)), depth)
        case ti.ListType(item_type=item):
            return [_sample(item, depth + 1)]
        case ti.DictType(key_type=key, value_type=value) if not isinstance(value, ti.AnyType):
            return {_sample(key, depth + 1): _sample(value, depth + 1)}
        case ti.DictType():
            return {"k": [1, "v"], "n": {"x": 1.5}}
        case ti.AnyType():
            return {"rows": [{"a": 1}], "total": 1}
        case ti.StructType(cls=cls):
            return _build(cls, depth + 1)
        case ti.LiteralType(values=values):
            return values[0]
    raise AssertionError(f"no sample for {t}")


def _build(cls: type, depth: int = 0) -> Any:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    kwargs = {f.name: _sample(f.type, depth) for f in info.fields}
    return cls(**kwargs)


def test_all_types_lists_exactly_the_union() -> None:
    assert set(m.ALL_TYPES) == set(typing.get_args(m.Message))


@pytest.mark.parametrize("cls", m.ALL_TYPES, ids=lambda c: c.__name__)
def test_every_message_round_trips_with_all_fields_set(cls: type) -> None:
    codec = m.Codec()
    msg = _build(cls)

    back = codec.decode(codec.encode(msg))

    assert type(back) is cls
    assert back == msg


@pytest.mark.parametrize("cls", m.ALL_TYPES, ids=lambda c: c.__name__)
def test_every_message_round_trips_with_only_required_fields(cls: type) -> None:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    msg = cls(**{f.name: _sample(f.type) for f in info.fields if f.required})
    codec = m.Codec()

    back = codec.decode(codec.encode(msg))

    assert back == msg
    assert back.ts_ns > 0


def test_decimal_money_keeps_exact_value() -> None:
    codec = m.Codec()
    fill = m.Fill(fill_id="t1", order_id="o1", strategy_id="mom1", symbol="RELIANCE-EQ",
                  segment="nse_cm", token="2885", side="BUY", quantity=10, price=Decimal("2500.05"))

    back = codec.decode(codec.encode(fill))

    assert isinstance(back, m.Fill)
    assert back.price == Decimal("2500.05")
    assert isinstance(back.price, Decimal)


def test_unknown_kind_is_a_validation_error_not_a_crash() -> None:
    payload = msgspec.msgpack.encode({"kind": "NoSuchMessage", "x": 1})

    with pytest.raises(msgspec.ValidationError):
        m.Codec().decode(payload)


def test_newer_writer_with_extra_field_is_read_by_older_reader() -> None:
    payload = msgspec.msgpack.encode({"kind": "Heartbeat", "service": "risk", "pid": 7,
                                      "added_in_a_later_version": [1, 2]})

    msg = m.Codec().decode(payload)

    assert msg == m.Heartbeat(service="risk", pid=7, ts_ns=msg.ts_ns)


def test_messages_are_frozen() -> None:
    hb = m.Heartbeat(service="risk", pid=1)

    with pytest.raises(AttributeError):
        hb.service = "feed"  # type: ignore[misc]


def test_to_builtins_renders_decimals_as_strings() -> None:
    pos = m.Position(strategy_id="s", symbol="INFY-EQ", segment="nse_cm", token="1594",
                     quantity=-5, avg_price=Decimal("1500.10"))

    data = m.to_builtins(pos)

    assert data["avg_price"] == "1500.10"
    assert data["kind"] == "Position"


# --------------------------------------------------------------------------- the wire boundary
# Requests that change state are refused by the decoder, with the field named, before any
# service logic sees them. Raw msgpack maps stand in for a buggy or hostile client.

_ORDER = {"kind": "OrderRequest", "request_id": "r1#2", "strategy_id": "mom1", "side": "BUY",
          "symbol": "RELIANCE-EQ", "quantity": 10, "price": "1290.5"}


def _decode(**fields: Any) -> m.Message:
    return m.Codec().decode(msgspec.msgpack.encode(fields))


def test_a_valid_order_request_decodes_with_the_ids_the_code_uses() -> None:
    for rid in ("r1#2", "cli-0123456789abcdef", "flatten:f1:mom1", "risk-ks-on-1700000000000000000"):
        msg = _decode(**{**_ORDER, "request_id": rid, "symbol": "Nifty 50", "sizing":
                         {"capital": "100000", "risk_pct": "1"}, "quantity": 0})
        assert isinstance(msg, m.OrderRequest) and msg.request_id == rid


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("price", "NaN", "price must be a finite number above 0 and at most 10000000, got NaN"),
        ("price", "Infinity", "got Infinity - at `$.price`"),
        ("price", "-1290.5", "got -1290.5 - at `$.price`"),
        ("price", "0", "got 0 - at `$.price`"),
        ("stop_loss", "1E+26", "got 1E+26 - at `$.stop_loss`"),
        ("trigger_price", float("nan"), "got NaN - at `$.trigger_price`"),
        ("quantity", -5, "Expected `int` >= 0 - at `$.quantity`"),
        ("quantity", 10**12, "Expected `int` <= 10000000 - at `$.quantity`"),
        ("side", "HOLD", "at `$.side`"),
        ("order_type", "ICEBERG", "at `$.order_type`"),
        ("product", "BO", "at `$.product`"),
        ("purpose", "STOP", "at `$.purpose`"),
        ("strategy_id", "mömentum", "at `$.strategy_id`"),
        ("strategy_id", "a.b", "at `$.strategy_id`"),
        ("request_id", "r1\x00", "at `$.request_id`"),
        ("request_id", "r1\n", "at `$.request_id`"),
        ("request_id", "", "at `$.request_id`"),
        ("symbol", "X" * 1_000_000, "Expected `str` of length <= 64 - at `$.symbol`"),
        ("symbol", "RELIANCE\x00", "at `$.symbol`"),
        ("sizing", {"capital": "1E+30", "risk_pct": "1"}, "at `$.sizing.capital`"),
        ("sizing", {"capital": "1000", "risk_pct": "150"}, "at `$.sizing.risk_pct`"),
    ],
)
def test_decoder_refuses_an_order_request_with_a_field_out_of_bounds(field: str, value: Any,
                                                                     text: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        _decode(**{**_ORDER, field: value})

    assert text in str(err.value)


def test_decoder_refuses_an_execute_order_with_a_bad_nested_order_quantity_or_deadline() -> None:
    good = {"kind": "ExecuteOrder", "request_id": "r1", "order": {**_ORDER, "request_id": "r1"},
            "quantity": 10, "segment": "nse_cm", "token": "2885", "symbol": "RELIANCE-EQ",
            "expires_ns": 1_700_000_000_000_000_000}
    assert isinstance(_decode(**good), m.ExecuteOrder)

    cases = [
        ({"order": {**_ORDER, "request_id": "r1", "stop_loss": "1E+26"}}, "at `$.order.stop_loss`"),
        ({"order": {**_ORDER, "request_id": "other"}}, "at `$.order.request_id`"),
        ({"quantity": 0}, "Expected `int` >= 1 - at `$.quantity`"),
        ({"expires_ns": -1}, "at `$.expires_ns`"),
        ({"segment": "nse cm"}, "at `$.segment`"),
    ]
    for change, text in cases:
        with pytest.raises(msgspec.ValidationError) as err:
            _decode(**{**good, **change})
        assert text in str(err.value), change


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "KillSwitch", "on": True, "reason": "fat\x00finger"},
        {"kind": "KillSwitch", "on": True, "reason": "x" * (m.MAX_TEXT + 1)},
        {"kind": "KillSwitch", "on": True, "reason": "ok", "source": "cli\n"},
        {"kind": "CancelEntries", "request_id": "c1", "reason": "line\r\nbreak"},
        {"kind": "Flatten", "request_id": "f1", "strategy_id": "µ"},
        {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "a\x00"},
        {"kind": "RecordRiskEvent", "event": "Kill Switch", "reason": "a"},
        {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "a", "data": {"why": "nul\x00"}},
        {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "a", "data": {"pnl": float("nan")}},
        {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "a", "data": {"raw": b"\x00"}},
        {"kind": "RecordRiskEvent", "event": "kill_switch_on", "reason": "a",
         "data": {"rows": list(range(100))}},
    ],
    ids=lambda f: f["kind"],
)
def test_decoder_refuses_admin_requests_with_control_characters_or_unbounded_text(
        fields: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        _decode(**fields)


def test_free_text_may_hold_unicode_but_not_control_characters() -> None:
    msg = _decode(kind="KillSwitch", on=True, reason="बाज़ार बंद — ₹ crash")

    assert isinstance(msg, m.KillSwitch) and msg.reason == "बाज़ार बंद — ₹ crash"


def test_ticks_and_replies_are_not_constrained() -> None:
    # Only requests that change state are checked; a Reply may carry any msgpack data.
    msg = _decode(kind="Reply", ok=True, data={"x": float("nan"), "s": "\x00"})

    assert isinstance(msg, m.Reply) and msg.ok
