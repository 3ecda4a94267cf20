"""Kotak Neo's wire shapes, as plain functions: what we send, and what each reply means.

No SDK calls and no I/O here (the SDK is only imported, through ``import_sdk``, for its
exception classes), so every rule can be read in one place. Facts come from
docs/kotak-rest.md (checked against ``kotakneoapi`` 3.0.9): the SDK never raises for trading
calls; it returns dicts whose keys say what happened (``Error``, ``error``, ``Error Message``
or the broker's own body).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from enum import StrEnum
from json import JSONDecodeError
from typing import Any

from libs.common.clock import IST
from libs.common.instruments import Instrument, instrument_key
from libs.common.messages import ACK, OPEN, PARTIAL, TERMINAL_STATES
from libs.common.sdk import import_sdk
from services.execution.brokers.base import BrokerOrder, BrokerOrderStatus, BrokerPosition, BrokerTrade

SEGMENTS = frozenset({"nse_cm", "bse_cm", "nse_fo", "bse_fo", "mcx_fo"})
PRODUCTS = frozenset({"CNC", "NRML", "MIS", "MTF"})
VALIDITIES = frozenset({"DAY", "IOC"})
# Short and alphanumeric: Kotak echoes it as GuiOrdId but documents no length limit.
TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")

ST_NO_DATA = 5203
ST_RATE_LIMITED = 429
# Expired or invalid session: 100022 "invalid session token" (HTTP 403), 10020
# "Authentication Failed", 900901 "Invalid Credentials".
SESSION_CODES = frozenset({100022, 10020, 900901})
SESSION_WORDS = ("invalid session", "session expired", "authentication failed",
                 "invalid credentials", "unauthorized", "invalid token", "2fa")  # fmt: skip
# Kotak's static-IP rule (since 2026-04-01): the order APIs (place, modify, cancel) take
# requests only from a whitelisted static IP, in a session created from that same IP.
# 100008 "unauthorized": the IP is not whitelisted. 1037 "session ip does not match": the
# session was created from another IP. Neither a retry nor a re-login from the same IP helps.
ST_IP_NOT_WHITELISTED = 100008
ST_SESSION_IP_MISMATCH = 1037
IP_CODES = frozenset({ST_IP_NOT_WHITELISTED, ST_SESSION_IP_MISMATCH})
# Where a code may sit in a reply: the order/report envelope (stCode), other Kotak bodies
# (errCode), login and gateway errors (code).
_CODE_KEYS = ("stCode", "errCode", "code")
_MESSAGE_KEYS = ("errMsg", "emsg", "message", "description")
# Words for a reply that carries no code (checked only on replies that are not "Ok").
_IP_WORDS = (("not whitelisted", ST_IP_NOT_WHITELISTED), ("session ip", ST_SESSION_IP_MISMATCH))


class Kind(StrEnum):
    OK = "ok"
    EMPTY = "empty"  # "No Data": an empty book
    SESSION = "session"  # not logged in, or the session expired: nothing was done
    IP_BLOCKED = "ip_blocked"  # static-IP rule (100008 / 1037): nothing was done, retry is useless
    RATE_LIMITED = "rate_limited"  # 429: nothing was done
    REFUSED = "refused"  # the broker said no, with its own code and reason
    INVALID = "invalid"  # the SDK's own validation refused it: nothing was sent
    TRANSPORT = "transport"  # timeout / connection error: may have been done
    UNREADABLE = "unreadable"  # reply not JSON (gateway page): may have been done
    SERVER = "server"  # 5xx from the broker: may have been done
    UNRECOGNISED = "unrecognised"  # a shape we do not know: may have been done


# Outcomes after which a place_order may still have reached the broker.
MAYBE_DONE = frozenset({Kind.TRANSPORT, Kind.UNREADABLE, Kind.SERVER, Kind.UNRECOGNISED})


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    reason: str = ""
    code: int | None = None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _exception_verdict(exc: BaseException) -> Verdict:
    import_sdk()  # the SDK's logging set-up must never win, even here
    from neo_api_client.exceptions import ApiException

    if isinstance(exc, JSONDecodeError):  # before ValueError: it is one
        return Verdict(Kind.UNREADABLE, "reply is not JSON")
    if isinstance(exc, ApiException):
        status = _int(getattr(exc, "status", None)) or 0
        reason = str(getattr(exc, "reason", "") or exc.__class__.__name__)
        if 500 <= status < 600:
            return Verdict(Kind.SERVER, f"HTTP {status}: {reason}", status)
        return Verdict(Kind.TRANSPORT, reason, status or None)
    if isinstance(exc, (ValueError, TypeError, KeyError)):  # ApiValueError & co: never sent
        return Verdict(Kind.INVALID, str(exc).strip() or exc.__class__.__name__)
    return Verdict(Kind.UNRECOGNISED, f"{exc.__class__.__name__}: {exc}")


def _ip_code(value: Any, depth: int = 0) -> int | None:
    """100008 or 1037 wherever an error envelope carries it: the top level, a ``data`` object
    (``order_history`` wraps the broker's body), an ``error``/``Error``/``fault`` object or list
    (login and gateway errors), or the body of an SDK exception; as an int or a string. A
    ``data`` list (book rows) is never searched: rows are data, not errors."""
    if depth > 3:
        return None
    if isinstance(value, BaseException):
        body = getattr(value, "body", None)
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body)
            except ValueError:
                return None
        return _ip_code(body, depth + 1) if isinstance(body, dict) else None
    if isinstance(value, list):
        codes = (_ip_code(v, depth + 1) for v in value[:5] if isinstance(v, dict))
        return next((c for c in codes if c), None)
    if not isinstance(value, dict) or str(value.get("stat", "")).strip().lower() == "ok":
        return None
    for key in _CODE_KEYS:
        code = _int(value.get(key))
        if code in IP_CODES:
            return code
    for key in ("data", "error", "Error", "fault"):
        inner = value.get(key)
        if key == "data" and not isinstance(inner, dict):
            continue
        if isinstance(inner, (dict, list, BaseException)) and (code := _ip_code(inner, depth + 1)):
            return code
    return None


def _has_code(value: Any, depth: int = 0) -> bool:
    """Whether an error envelope carries any code (``stCode``/``errCode``/``code``) in the places
    ``_ip_code`` looks: then that code decides, never the words around it."""
    if depth > 3:
        return False
    if isinstance(value, BaseException):
        body = getattr(value, "body", None)
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body)
            except ValueError:
                return False
        return _has_code(body, depth + 1)
    if isinstance(value, list):
        return any(_has_code(v, depth + 1) for v in value[:5] if isinstance(v, dict))
    if not isinstance(value, dict):
        return False
    if any(_int(value.get(key)) is not None for key in _CODE_KEYS):
        return True
    for key in ("data", "error", "Error", "fault"):
        inner = value.get(key)
        if key == "data" and not isinstance(inner, dict):
            continue
        if isinstance(inner, (dict, list, BaseException)) and _has_code(inner, depth + 1):
            return True
    return False


def _messages(value: Any, depth: int = 0) -> list[str]:
    """The message texts of an error envelope (same places as ``_ip_code``)."""
    if depth > 3:
        return []
    if isinstance(value, list):
        return [m for v in value[:5] for m in _messages(v, depth + 1)]
    if not isinstance(value, dict):
        return []
    out = [str(value[k]) for k in _MESSAGE_KEYS if isinstance(value.get(k), str) and value[k].strip()]
    for key in ("data", "error", "Error", "fault"):
        inner = value.get(key)
        if isinstance(inner, dict) or (key != "data" and isinstance(inner, list)):
            out += _messages(inner, depth + 1)
    return out


def ip_verdict(reply: Any) -> Verdict | None:
    """The static-IP refusal in a reply (any call, any envelope), or None."""
    if isinstance(reply, dict) and "Error Message" in reply:
        return None  # the SDK's own "not logged in": nothing reached Kotak
    code = _ip_code(reply)
    texts = _messages(reply)
    ok = isinstance(reply, dict) and str(reply.get("stat", "")).strip().lower() == "ok"
    if code is None and not ok and not _has_code(reply):  # words only when no code says otherwise
        low = " ".join(texts).lower()
        code = next((c for word, c in _IP_WORDS if word in low), None)
    if code is None:
        return None
    return Verdict(Kind.IP_BLOCKED, texts[0].strip() if texts else IP_BLOCK_WORDS[code][0], code)


# What each static-IP code means and what the operator must do, in the trader's words. "Within
# two minutes" is the adapter's probe schedule (kotak.IP_PROBE_S).
IP_BLOCK_WORDS: dict[int, tuple[str, str]] = {
    ST_IP_NOT_WHITELISTED: (
        "this machine's IP is not whitelisted for orders",
        "whitelist this machine's public IP{ip} in Kotak Neo's API dashboard (More > Trade API > "
        "Add IP); NeoPulse then logs in again by itself within two minutes (Kotak wants a new "
        "session after an IP change), or restart execution",
    ),
    ST_SESSION_IP_MISMATCH: (
        "the Kotak session was created from another IP than the one now sending orders",
        "log in again from the whitelisted IP (the session was created from another IP): keep this "
        "machine on its whitelisted static IP ({now}a VPN, a second line or a router change moves "
        "it); NeoPulse logs in again by itself within two minutes, or restart execution",
    ),
}


def ip_block_words(code: int, broker_words: str = "", ip: str = "") -> tuple[str, str]:
    """``(reason, fix)`` for a static-IP refusal: what happened (with Kotak's code and words) and
    what the operator must do. ``ip`` is this machine's public IP as Kotak sees it, if known."""
    what, fix = IP_BLOCK_WORDS.get(code, ("Kotak refuses orders from this IP", "check the static IP{ip}"))
    said = f": {broker_words.strip()}" if broker_words.strip() and broker_words.strip() != what else ""
    fix = fix.format(ip=f", which Kotak sees as {ip}," if ip else "",
                     now=f"Kotak now sees {ip}; " if ip else "")  # fmt: skip
    return f"{what} (Kotak {code}{said})", fix


def _is_session_text(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in SESSION_WORDS)


def _coded(code: int | None, message: str) -> Verdict:
    """A broker answer that carries a code: session, rate limit, server error or refusal."""
    if code in SESSION_CODES or _is_session_text(message):
        return Verdict(Kind.SESSION, message or "session expired", code)
    if code == ST_RATE_LIMITED or "too many requests" in message.lower():
        return Verdict(Kind.RATE_LIMITED, message or "too many requests", code)
    if code == ST_NO_DATA or message.strip().lower() == "no data":
        return Verdict(Kind.EMPTY, message, code)
    if code is not None and 500 <= code < 600:
        return Verdict(Kind.SERVER, message or f"server error {code}", code)
    return Verdict(Kind.REFUSED, message or f"refused with code {code}", code)


def classify(reply: Any, *, ip_checked: bool = True) -> Verdict:
    """What one SDK reply means (docs/kotak-rest.md §4, §7, §12). ``ip_checked``: the call is one
    Kotak checks the IP on (place, modify, cancel; a login is read the same way). On any other
    call (books, positions) Kotak does not check the IP, so 100008/1037 there are read as a
    session problem (a re-login, bounded), never as the static-IP rule."""
    if (blocked := ip_verdict(reply)) is not None:  # before the session check: 100008 is no session error
        if not ip_checked:
            return Verdict(Kind.SESSION, blocked.reason, blocked.code)
        return blocked
    if not isinstance(reply, dict):
        return Verdict(Kind.UNRECOGNISED, f"reply of type {type(reply).__name__}")
    if "Error Message" in reply:  # the SDK has no session: nothing was sent
        return Verdict(Kind.SESSION, str(reply["Error Message"]))
    for key in ("Error", "error"):
        if key not in reply:
            continue
        value = reply[key]
        if isinstance(value, BaseException):
            return _exception_verdict(value)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            # {"error": [{"code": "10020", "message": "Authentication Failed"}]}
            first = value[0]
            return _coded(_int(first.get("code")), str(first.get("message") or ""))
        text = str(value)
        if "not found" in text.lower() or "not available" in text.lower():
            return Verdict(Kind.INVALID, text)
        return Verdict(Kind.UNREADABLE, text)
    stat = str(reply.get("stat", "")).strip().lower()
    code = _int(reply.get("stCode"))
    if stat == "ok":
        return Verdict(Kind.OK, code=code)
    message = str(reply.get("errMsg") or reply.get("emsg") or reply.get("message") or "")
    if code is not None or (stat == "not_ok" and _is_session_text(message)):
        return _coded(code, message)
    if message.strip().lower() == "no data":
        return Verdict(Kind.EMPTY, message)
    # No broker code: a gateway or an unknown body. Never read it as "the broker said no".
    return Verdict(Kind.UNRECOGNISED, message or f"unrecognised reply {sorted(reply)!r}")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class OrderRefused(ValueError):
    """An order we refuse to send (it would break Kotak's or the exchange's rules)."""


def price_text(price: Decimal, tick: Decimal | None) -> str:
    """A price as Kotak takes it: a string with the tick's decimals (at least two)."""
    ref = tick if tick is not None and tick > 0 else price
    exponent = ref.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return str(price.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def place_args(order: BrokerOrder, inst: Instrument | None) -> dict[str, str]:
    """The keyword arguments for ``NeoAPI.place_order``; raises ``OrderRefused`` first when the
    order cannot be legal. Only LIMIT and stop-limit reach Kotak: it refuses market and SL-M
    orders from API sessions, and execution has already turned market intent into a
    protected limit, so one arriving here is a bug upstream."""
    kind = order.order_type.strip().upper()
    if kind in {"MARKET", "MKT", "SL-M", "SLM", "SL_M", "STOP_MARKET"}:
        raise OrderRefused(f"order type {order.order_type} is not sent to Kotak (market and SL-M "
                           "orders are refused for API sessions; send a protected LIMIT)")  # fmt: skip
    if kind not in {"LIMIT", "L", "SL"}:
        raise OrderRefused(f"unknown order type {order.order_type!r}")
    pt = "SL" if kind == "SL" else "L"
    side = {"BUY": "B", "SELL": "S"}.get(order.side.strip().upper())
    if side is None:
        raise OrderRefused(f"unknown side {order.side!r}")
    if not TAG_RE.match(order.client_tag):
        raise OrderRefused(f"client tag {order.client_tag!r} is not 1-20 letters/digits")
    if order.segment not in SEGMENTS:
        raise OrderRefused(f"unknown exchange segment {order.segment!r}")
    if order.product not in PRODUCTS:
        raise OrderRefused(f"product {order.product!r} is not one of {', '.join(sorted(PRODUCTS))}")
    if order.validity not in VALIDITIES:
        raise OrderRefused(f"validity {order.validity!r} is not DAY or IOC")
    if order.quantity <= 0:
        raise OrderRefused(f"quantity {order.quantity} must be positive")
    if not order.price.is_finite() or order.price <= 0:
        raise OrderRefused(f"limit price {order.price} must be positive")
    trigger = order.trigger_price
    if pt == "SL":
        if trigger is None or not trigger.is_finite() or trigger <= 0:
            raise OrderRefused("a stop-limit order needs a positive trigger price")
        # Exchange rule: a buy stop triggers at or below its limit, a sell stop at or above.
        if side == "B" and trigger > order.price:
            raise OrderRefused(f"buy stop-limit trigger {trigger} is above its limit {order.price}")
        if side == "S" and trigger < order.price:
            raise OrderRefused(f"sell stop-limit trigger {trigger} is below its limit {order.price}")
    tick: Decimal | None = None
    if inst is not None:
        if inst.symbol != order.symbol:
            key = instrument_key(order.segment, order.token)
            raise OrderRefused(f"token {key} is {inst.symbol}, not {order.symbol}")
        if inst.lot_size > 1 and order.quantity % inst.lot_size:
            raise OrderRefused(f"quantity {order.quantity} is not a multiple of lot size {inst.lot_size}")
        if inst.freeze_qty and order.quantity > inst.freeze_qty:
            raise OrderRefused(f"quantity {order.quantity} exceeds freeze quantity {inst.freeze_qty}")
        if inst.tick_size > 0:
            tick = inst.tick_size
            for label, value in (("price", order.price), ("trigger", trigger if pt == "SL" else None)):
                if value is not None and value % tick:
                    raise OrderRefused(f"{label} {value} is not a multiple of tick size {tick}")
    return {
        "exchange_segment": order.segment,
        "product": order.product,
        "price": price_text(order.price, tick),
        "order_type": pt,
        "quantity": str(order.quantity),
        "validity": order.validity,
        "trading_symbol": order.symbol,
        "transaction_type": side,
        "amo": "NO",
        "disclosed_quantity": "0",
        "trigger_price": price_text(trigger, tick) if pt == "SL" and trigger is not None else "0",
        "tag": order.client_tag,
    }


# --------------------------------------------------------------------------------------------
# Replies: order book and trade book rows
# --------------------------------------------------------------------------------------------

# Kotak's final ``ordSt`` words ("complete", "rejected", "cancelled") → our terminal states.
TERMINAL = {s.lower(): s for s in TERMINAL_STATES}
# Accepted by Kotak but not yet working at the exchange.
PRE_OPEN = frozenset({"put order req received", "validation pending", "open pending",
                      "after market order req received"})  # fmt: skip
# Working at the exchange (a stop waits as "trigger pending"; modify/cancel in flight).
WORKING = frozenset({"open", "trigger pending", "modify validation pending", "modify pending",
                     "modified", "not modified", "cancel pending", "not cancelled"})  # fmt: skip


def _dec(value: Any) -> Decimal | None:
    try:
        d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def _qty(value: Any) -> int:
    """A share count; anything that is not a whole number reads as 0 (which execution refuses
    as a fill and ignores as an order quantity)."""
    n = _int(value)
    if n is None:
        d = _dec(value)
        return int(d) if d is not None and d == d.to_integral_value() else 0
    return n


def _id(value: Any) -> str:
    """An order number or tag as text; one that is not short printable ASCII matches nothing."""
    text = str(value or "").strip()
    return text if len(text) <= 64 and text.isascii() and text.isprintable() else ""


def carried_position(row: dict[str, Any]) -> BrokerPosition | None:
    """The carry-forward part of one positions row (``cfBuyQty`` - ``cfSellQty``) of an NRML or
    CNC position, at its carry-forward price; None when nothing is carried."""
    product = str(row.get("prod") or "").strip().upper()
    if product not in ("NRML", "CNC"):
        return None
    cf_buy, cf_sell = _qty(row.get("cfBuyQty")), _qty(row.get("cfSellQty"))
    net = cf_buy - cf_sell
    if not net:
        return None
    qty, amount = (cf_buy, _dec(row.get("cfBuyAmt"))) if net > 0 else (cf_sell, _dec(row.get("cfSellAmt")))
    avg = (amount / qty).quantize(Decimal("0.0001")) if amount is not None and qty else Decimal(0)
    return BrokerPosition(segment=str(row.get("exSeg") or ""), token=str(row.get("tok") or ""),
                          symbol=str(row.get("trdSym") or ""), product=product, quantity=net,
                          avg_price=avg, raw=row)  # fmt: skip


def map_status(ord_st: str, filled: int) -> str:
    """Kotak's ``ordSt`` → our status. There is no "partially filled" status at Kotak: a
    partial fill is ``open`` with ``0 < fldQty``. Unknown strings stay non-terminal (ACK)."""
    st = ord_st.strip().lower()
    if st in TERMINAL:
        return TERMINAL[st]
    if st in WORKING:
        return PARTIAL if filled > 0 else OPEN
    return PARTIAL if filled > 0 else ACK


def order_status(row: dict[str, Any]) -> BrokerOrderStatus:
    filled = _qty(row.get("fldQty"))
    reason = str(row.get("rejRsn") or "").strip()
    avg = _dec(row.get("avgPrc")) if filled > 0 else None
    return BrokerOrderStatus(
        broker_order_id=_id(row.get("nOrdNo")),
        client_tag=_id(row.get("GuiOrdId")),
        status=map_status(str(row.get("ordSt") or ""), filled),
        quantity=_qty(row.get("qty")),
        filled_qty=filled,
        avg_price=avg,
        reason="" if reason in {"--", "NA"} else reason,
        raw=row,
    )


def _trade_ts_ns(row: dict[str, Any]) -> int:
    """Fill time: ``flDt`` + ``flTm`` (IST), else ``exTm``; 0 when neither parses."""
    for text, fmt in ((f"{row.get('flDt', '')} {row.get('flTm', '')}", "%d-%b-%Y %H:%M:%S"),
                      (str(row.get("exTm", "")), "%d-%b-%Y %H:%M:%S")):  # fmt: skip
        try:
            return int(datetime.strptime(text.strip(), fmt).replace(tzinfo=IST).timestamp()) * 1_000_000_000
        except ValueError:
            continue
    return 0


def trade(row: dict[str, Any]) -> BrokerTrade | None:
    """One trade-book row (one fill: ``fldQty`` is this fill's quantity, ``avgPrc`` its price)."""
    price = _dec(row.get("avgPrc"))
    trade_id = _id(row.get("flId"))
    if price is None or not trade_id:
        return None
    side = "BUY" if str(row.get("trnsTp", "")).strip().upper() in {"B", "BUY"} else "SELL"
    return BrokerTrade(
        trade_id=trade_id,
        broker_order_id=_id(row.get("nOrdNo")),
        client_tag=_id(row.get("GuiOrdId")),
        side=side,
        quantity=_qty(row.get("fldQty")),
        price=price,
        ts_ns=_trade_ts_ns(row),
        raw=row,
    )


def rows(reply: dict[str, Any]) -> list[dict[str, Any]]:
    data = reply.get("data")
    if not isinstance(data, list):
        return []
    return [r for r in data if isinstance(r, dict)]
