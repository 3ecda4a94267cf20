"""Every wire type survives an encode/decode round trip with every field set."""

from __future__ import annotations

import typing
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from libs.common import messages as m


def _sample(t: msgspec.inspect.Type, depth: int = 0) -> Any:
    """A non-default value for a field of type ``t`` (so defaults cannot hide a bug)."""
    ti = msgspec.inspect
    match t:
        case ti.StrType():
            return "x-42"
        case ti.BoolType():
            return True
        case ti.IntType():
            return 42
        case ti.FloatType():
            return 2.5
        case ti.DecimalType():
            return Decimal("2500.05")
        case ti.UnionType(types=types):
            return _sample(next(x for x in types if not isinstance(x, ti.NoneType)), depth)
        case ti.ListType(item_type=item):
            return [_sample(item, depth + 1)]
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
