"""Compact, exact tables of the ids of settled (evicted) orders and of the day's trade ids.

A settled order keeps no Python object in memory: its ids go into sorted 64-bit arrays (a few
bytes per id instead of a ``str`` and a dict slot, 150-250 bytes), so a day of orders costs
the execution process little memory. The broker's ids are *exact*: an id of the usual shapes
(digits, or one letter and digits: Kotak's ``nOrdNo``/``flId``, the paper broker's ids) and a
NeoPulse client tag (``np`` + 10 base32 characters) are packed into an integer that names that
string and no other; any other id is kept as its string. A request id is kept as a 64-bit
hash: a hit is only a *maybe*, and the ledger (``order_ledger.request_id`` UNIQUE) answers it.

Pure data structures: no engine, no ledger.
"""

from __future__ import annotations

import uuid
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable

_DIGITS17 = 10**17
_B32 = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz234567")}
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LETTER_CODE = {c: (8 + i) << 57 for i, c in enumerate(_LETTERS)}  # above every 18-digit number
_MERGE_MIN = 1024  # new ids wait in a small dict or set; merged into the arrays past max(this, n / 32)
_MERGE_SHIFT = 5


def broker_id_code(s: str) -> int | None:
    """An exact code (0 <= code < 2**63) for a broker order or trade id made of digits (at
    most 18, no leading zero) or of one ASCII letter and such digits (at most 17); None for any
    other id. Two different strings never get the same code."""
    n = len(s)
    if 0 < n <= 18 and s.isdigit() and s.isascii() and (n == 1 or s[0] != "0"):
        return int(s)
    if 2 <= n <= 18:
        head = _LETTER_CODE.get(s[0])
        if head is not None and s[1:].isdigit() and s.isascii() and (n == 2 or s[1] != "0"):
            return head | int(s[1:])
    return None


def tag_code(s: str) -> int | None:
    """An exact code for a NeoPulse client tag as ``tag_key`` gives it (``np`` + 10 base32
    characters: 50 bits); None for any other tag."""
    if len(s) != 12 or not s.startswith("np"):
        return None
    v = 0
    for c in s[2:]:
        d = _B32.get(c)
        if d is None:
            return None
        v = (v << 5) | d
    return v


def request_hash(s: str) -> int:
    """A 64-bit hash of a request id (the process's own ``hash``: memory only). Not exact."""
    return hash(s)


class CodeMap:
    """An exact map from id strings to small non-negative ints (< 2**32), compact: ids that
    ``encode`` packs into an integer live in two sorted arrays (12 bytes an id) once merged;
    other ids stay strings in a dict. Re-adding an id replaces its value."""

    __slots__ = ("_encode", "_keys", "_odd", "_recent", "_vals")

    def __init__(self, encode: Callable[[str], int | None]) -> None:
        self._encode = encode
        self._keys = array("q")
        self._vals = array("I")
        self._recent: dict[int, int] = {}
        self._odd: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent) + len(self._odd)  # (a re-added id counts twice)

    def get(self, s: str) -> int | None:
        code = self._encode(s)
        if code is None:
            return self._odd.get(s)
        v = self._recent.get(code)
        if v is not None:
            return v
        keys = self._keys
        i = bisect_left(keys, code)
        if i < len(keys) and keys[i] == code:
            return self._vals[i]
        return None

    def __contains__(self, s: str) -> bool:
        return self.get(s) is not None

    def put(self, s: str, value: int) -> None:
        code = self._encode(s)
        if code is None:
            self._odd[s] = value
            return
        recent = self._recent
        recent[code] = value
        if len(recent) > max(_MERGE_MIN, len(self._keys) >> _MERGE_SHIFT):
            self._merge()

    def _merge(self) -> None:
        """The waiting ids into the sorted arrays: slices copied whole, one bisect per new id."""
        keys, vals = self._keys, self._vals
        new_k, new_v = array("q"), array("I")
        at = 0
        for code in sorted(self._recent):
            i = bisect_left(keys, code, at)
            new_k.extend(keys[at:i])
            new_v.extend(vals[at:i])
            new_k.append(code)
            new_v.append(self._recent[code])
            at = i + 1 if i < len(keys) and keys[i] == code else i  # a re-added id: the new value
        new_k.extend(keys[at:])
        new_v.extend(vals[at:])
        self._keys, self._vals = new_k, new_v
        self._recent = {}

    def clear(self) -> None:
        self._keys, self._vals = array("q"), array("I")
        self._recent, self._odd = {}, {}

    def nbytes(self) -> int:
        """The arrays' payload (for the status and tests)."""
        return self._keys.itemsize * len(self._keys) + self._vals.itemsize * len(self._vals)


class CodeSet:
    """A set of id strings, compact like ``CodeMap`` (8 bytes an encodable id once merged):
    exact with an exact ``encode`` (the day's trade ids of one exchange segment); with
    ``request_hash`` a hit is only a maybe."""

    __slots__ = ("_encode", "_keys", "_odd", "_recent")

    def __init__(
        self, items: Iterable[str] = (), encode: Callable[[str], int | None] = broker_id_code
    ) -> None:
        self._encode = encode
        self._keys = array("q")
        self._recent: set[int] = set()
        self._odd: set[str] = set()
        for s in items:
            self.add(s)

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent) + len(self._odd)

    def __contains__(self, s: object) -> bool:
        if not isinstance(s, str):
            return False
        code = self._encode(s)
        if code is None:
            return s in self._odd
        if code in self._recent:
            return True
        keys = self._keys
        i = bisect_left(keys, code)
        return i < len(keys) and keys[i] == code

    def add(self, s: str) -> None:
        code = self._encode(s)
        if code is None:
            self._odd.add(s)
            return
        keys = self._keys
        i = bisect_left(keys, code)
        if i < len(keys) and keys[i] == code:
            return
        recent = self._recent
        recent.add(code)
        if len(recent) > max(_MERGE_MIN, len(keys) >> _MERGE_SHIFT):
            merged = array("q", sorted(recent))  # small next to the day's ids: merged by slices
            out = array("q")
            at = 0
            for code_ in merged:
                j = bisect_left(keys, code_, at)
                out.extend(keys[at:j])
                out.append(code_)
                at = j
            out.extend(keys[at:])
            self._keys = out
            self._recent = set()


_ODD_GROUP = 1 << 31  # header flag: the group's order ids are not UUIDs (kept as strings)
_FAMILY = 1 << 32  # header flag: only the root's id is kept; the other rows are its children


class SettledIds:
    """The settled groups of the day. A group (an order with its slices, or an entry with its
    slices and bracket legs, root first) is a run in one ``array('Q')``: a header (the number
    of rows, the segment's index) and each order id as a 128-bit UUID in two words — only the
    root's when every other row of the group is a child of it (``parent_id``), as slices and
    bracket legs are: the ledger gives the children back. A group is
    named by its offset there; its rows' broker order ids and client tags map to it exactly,
    its request ids are in a set of hashes (a maybe: ask the ledger). A group loaded back into
    memory is marked gone (its broker ids and tags then name nothing)."""

    __slots__ = ("_gone", "_odd", "_pool", "_segments", "by_broker_id", "by_request", "by_tag", "rows")

    def __init__(self) -> None:
        self._pool = array("Q")
        self._segments: list[str] = []
        self._odd: dict[int, tuple[str, ...]] = {}
        self._gone: set[int] = set()
        self.by_broker_id = CodeMap(broker_id_code)
        self.by_tag = CodeMap(tag_code)
        self.by_request = CodeSet(encode=request_hash)  # a maybe: no group, the ledger answers
        self.rows = 0  # rows of the groups not gone

    def __len__(self) -> int:
        return self.rows

    def __bool__(self) -> bool:
        return bool(self._pool)

    def add(self, segment: str, rows: Iterable[tuple[str, str, str, str]], *, family: bool = False) -> int:
        """A group leaves memory: ``rows`` are (order id, request id, tag key, broker order id),
        root first; ``family``: every other row's parent is the root. Returns the group's handle."""
        rows = list(rows)
        try:
            seg = self._segments.index(segment)
        except ValueError:
            seg = len(self._segments)
            self._segments.append(segment)
        g = len(self._pool)
        ids: list[int] = []
        odd = False
        family = family and len(rows) > 1
        for oid, *_ in rows[:1] if family else rows:
            try:
                ids.append(uuid.UUID(oid).int)
            except ValueError:
                odd = True
                break
        header = len(rows) | (seg << 16) | (_ODD_GROUP if odd else 0) | (_FAMILY if family and not odd else 0)
        self._pool.append(header)
        if odd:
            self._odd[g] = tuple(r[0] for r in rows)
        else:
            for n in ids:
                self._pool.extend((n >> 64, n & 0xFFFF_FFFF_FFFF_FFFF))
        for _oid, request_id, tag, broker_id in rows:
            self.by_request.add(request_id)
            if tag:
                self.by_tag.put(tag, g)
            if broker_id:
                self.by_broker_id.put(broker_id, g)
        self.rows += len(rows)
        return g

    def group_of(self, broker_order_id: str, tag: str) -> int:
        """The settled group holding the order the broker names, or -1."""
        g = self.by_broker_id.get(broker_order_id) if broker_order_id else None
        if g is None and tag:
            g = self.by_tag.get(tag)
        return -1 if g is None or g in self._gone else g

    def maybe_request(self, request_id: str) -> bool:
        """Whether ``request_id`` may be a settled row's (or of one loaded back since): the
        ledger decides."""
        return request_id in self.by_request

    def has_tag(self, tag: str) -> bool:
        """Exact: a settled row (of a group not loaded back) carries this tag key."""
        g = self.by_tag.get(tag)
        return g is not None and g not in self._gone

    def segment(self, g: int) -> str:
        return self._segments[(self._pool[g] >> 16) & 0x7FFF]

    def is_family(self, g: int) -> bool:
        """Whether only the root's id is kept (``order_ids``): its children are the rest."""
        return bool(self._pool[g] & _FAMILY)

    def order_ids(self, g: int) -> list[str]:
        """The group's order ids, root first (only the root's for a family, ``is_family``)."""
        header = self._pool[g]
        if header & _ODD_GROUP:
            return list(self._odd[g])
        n = 1 if header & _FAMILY else header & 0xFFFF
        pool = self._pool
        return [str(uuid.UUID(int=(pool[g + 1 + 2 * i] << 64) | pool[g + 2 + 2 * i])) for i in range(n)]

    def forget(self, g: int) -> None:
        """The group is in memory again (or the ledger lost it): its ids name nothing now."""
        if g not in self._gone:
            self._gone.add(g)
            self.rows -= self._pool[g] & 0xFFFF

    def clear(self) -> None:
        self._pool = array("Q")
        self._segments.clear()
        self._odd.clear()
        self._gone.clear()
        self.by_broker_id.clear()
        self.by_tag.clear()
        self.by_request = CodeSet(encode=request_hash)
        self.rows = 0
