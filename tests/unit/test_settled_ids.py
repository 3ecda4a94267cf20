"""The compact tables of settled ids (``services/execution/settled.py``): exact for the
broker's ids and the client tags, a maybe for request ids, and the same answers before and
after the recent ids are merged into the sorted arrays."""

from __future__ import annotations

import random

from services.execution.model import new_client_tag, new_id
from services.execution.settled import CodeMap, CodeSet, SettledIds, broker_id_code, tag_code


def test_broker_ids_of_the_usual_shapes_get_codes_no_other_string_shares() -> None:
    ids = ["0", "1", "9", "10", "251121000000123", "999999999999999999", "T251121000000123",
           "T1", "t1", "A0", "Z99999999999999999", "250428000001234"]  # fmt: skip

    codes = [broker_id_code(s) for s in ids]

    assert None not in codes and len(set(codes)) == len(ids)
    assert all(c is not None and 0 <= c < 2**63 for c in codes)


def test_ids_a_code_would_confuse_are_kept_as_strings() -> None:
    # a leading zero ("0123" is not "123"), too many digits, two letters, signs, spaces, unicode
    for s in ("0123", "00", "1234567890123456789", "TT1", "T0123", "-1", "+1", " 1", "1 ", "١٢٣", "", "T"):
        assert broker_id_code(s) is None, s


def test_client_tags_are_coded_exactly_and_other_tags_are_not() -> None:
    tags = {new_client_tag() for _ in range(2000)}

    assert len({tag_code(t) for t in tags}) == len(tags)
    for other in ("NPabcdefghij", "np", "npabcdefghi1", "xxabcdefghij", "npabcdefghijk"):
        assert tag_code(other) is None, other


def test_a_code_map_answers_the_same_before_and_after_its_merges_and_keeps_the_newest_value() -> None:
    m = CodeMap(broker_id_code)
    rng = random.Random(7)
    want: dict[str, int] = {}
    for n in range(20_000):
        s = str(rng.randrange(1, 10**15)) if n % 10 else f"odd-{n}"
        want[s] = n
        m.put(s, n)
    for s in rng.sample(sorted(want), 500):  # re-added ids, some merged already
        want[s] = 7
        m.put(s, 7)

    assert all(m.get(s) == v for s, v in want.items())
    assert m.get("0") is None and m.get("odd-x") is None and "10000000000000000" not in m


def test_a_code_set_holds_each_trade_id_once_across_merges() -> None:
    ids = [f"T{251121000000000 + n}" for n in range(5000)] + [str(n + 1) for n in range(5000)]
    ids += ["X-1", "y 2"]
    s = CodeSet()
    for x in ids:
        s.add(x)
    for x in ids[:100]:
        s.add(x)

    assert len(s) == len(ids)
    assert all(x in s for x in ids)
    assert "T251121000005000" not in s and "0" not in s and "X-2" not in s and 5 not in s


def test_settled_ids_name_a_group_by_broker_id_or_tag_and_give_its_order_ids_back_root_first() -> None:
    s = SettledIds()
    rows = [(new_id(), f"r{n}", new_client_tag(), f"25112100000000{n}") for n in range(3)]
    rows.append((new_id(), "r-never-sent", new_client_tag(), ""))  # never reached the broker
    g = s.add("NSE_FO", rows)

    assert s.group_of(rows[1][3], "") == g and s.group_of("", rows[3][2]) == g
    assert s.group_of("251121000000009", "") == -1 and s.group_of("", new_client_tag()) == -1
    assert s.order_ids(g) == [r[0] for r in rows] and s.segment(g) == "NSE_FO"
    assert all(s.maybe_request(r[1]) for r in rows) and all(s.has_tag(r[2]) for r in rows)
    assert len(s) == 4

    s.forget(g)  # loaded back into memory

    assert s.group_of(rows[1][3], "") == -1 and not s.has_tag(rows[0][2])
    assert s.maybe_request("r0")  # a hash only: the ledger answers it (the row is in memory again)
    assert len(s) == 0


def test_a_group_settled_again_is_named_by_its_new_handle_and_odd_order_ids_survive() -> None:
    s = SettledIds()
    oid = new_id()
    first = s.add("NSE_CM", [(oid, "r1", new_client_tag(), "1001")])
    s.forget(first)
    again = s.add("NSE_CM", [(oid, "r1", new_client_tag(), "1001")])
    odd = s.add("BSE_CM", [("order-7", "r7", "tag-7", "B-77")])

    assert s.group_of("1001", "") == again != first and s.order_ids(again) == [oid]
    assert s.group_of("B-77", "") == odd and s.order_ids(odd) == ["order-7"] and s.segment(odd) == "BSE_CM"
    s.clear()
    assert not s and s.group_of("1001", "") == -1


def test_a_family_keeps_only_its_roots_order_id_and_every_rows_broker_id_and_tag() -> None:
    s = SettledIds()
    rows = [(new_id(), f"r{n}", new_client_tag(), str(700 + n)) for n in range(3)]  # an entry and two legs
    g = s.add("NSE_CM", rows, family=True)
    single = s.add("NSE_CM", [(new_id(), "solo", new_client_tag(), "800")], family=True)

    assert s.is_family(g) and s.order_ids(g) == [rows[0][0]] and len(s) == 4
    assert all(s.group_of(r[3], "") == g for r in rows)
    assert not s.is_family(single) and len(s.order_ids(single)) == 1
