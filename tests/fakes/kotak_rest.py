"""Protocol-level fake of Kotak Neo's REST API, for the official SDK (``neo_api_client``).

Run it as its own process::

    python -m tests.fakes.kotak_rest --port 8765 --state-file /tmp/kotak-fake.json

or from a test with :class:`KotakRestFake`, which launches it on a free port, waits until it
answers and drives its control API. The SDK reaches it through two seams (see docs/kotak-rest.md):

* ``NeoAPI(environment="prod", transport=pinned_origin_transport(fake.base_url))`` -- the
  SDK's documented ``transport`` hook. The login/validate host and the dynamic-config host are
  hard-coded in the SDK, so every request is re-pointed at the fake's origin (path and query
  kept). Nothing the SDK sends can leave the machine.
* ``totp_validate`` answers with ``baseUrl`` = the fake's own origin; the SDK then sends every
  trading call there by itself (``NeoUtility.get_domain`` prefers ``base_url`` in prod).

Endpoints (paths exactly as the SDK 3.0.9 builds them for ``environment="prod"``)::

    POST /login/1.0/tradeApiLogin                    totp_login      JSON {mobileNumber, ucc, totp}
    POST /login/1.0/tradeApiValidate                 totp_validate   JSON {mpin}
    GET  /login/1.0/get-client-ip                    whatsmyip
    GET  /5config/config                             dynamic config (feed URLs), best effort
    POST /quick/order/rule/ms/place                  place_order     form jData={...}
    POST /quick/order/vr/modify                      modify_order    form jData={...}
    POST /quick/order/cancel                         cancel_order    form jData={on, am}
    POST /quick/order/history                        order_history   form jData={nOrdNo}
    GET  /quick/user/orders[/<nOrdNo>]               order_report
    GET  /quick/user/trades                          trade_report
    GET  /portfolio/v2/positions                     positions
    POST /quick/user/limits                          limits
    GET  /script-details/1.0/masterscrip/file-paths  scrip_master
    GET  /market-data/1.0/historical/details         historical_data  ?neosymbol=nse_cm|2885&interval=
                                                     1min&fromdate=YYYY-MM-DD&todate=YYYY-MM-DD
    GET  /wso2-scripmaster/v1/prod/<date>/...csv     the scrip-master CSV files themselves
    POST /apim/login/2.0/logout                      (the SDK's logout() never calls it)

Control API (JSON in, JSON out), for tests only::

    GET  /_control/health
    GET  /_control/received            every place_order request received, in arrival order
    GET  /_control/requests[?api=NAME] every broker request: {ts, mono, method, path, api}
    GET  /_control/orders              order-book rows (also of expired sessions)
    GET  /_control/trades              trade-book rows
    POST /_control/hang_next_place     {"seconds": 5, "count": 1, "placed": true}
                                        placed=false: the order never reaches the book
    POST /_control/reject_next_place   {"reason": "...", "delay_s": 0.2}  ack, then rejected
    POST /_control/orders/<no>/reject  {"reason": "..."}
    POST /_control/orders/<no>/fill    {"qty": 65, "price": "123.45"}  (both optional)
                                       + "trade_after_polls": N   the order row says filled at
                                         once; the trade book (and positions) show the trade
                                         only after N more trade-book requests
                                       + "hold_trade": true       ... only after release_trades
    POST /_control/release_trades      {}   every held-back trade appears now
    POST /_control/orders/<no>/cancel  {}   exchange-side cancel (e.g. IOC remainder)
    POST /_control/expire_session      {}   every session token becomes invalid
    POST /_control/fail_next           {"api": "order_book", "status": 503, "body": {...},
                                        "count": 1, "after_handling": false,
                                        "headers": {"Retry-After": "1"}, "delay_s": 0}
    POST /_control/fail_next_cancel    {"order_no": "..." (null = any order), "mode": "timeout",
                                        "seconds": 3.0, "count": 1, "after_handling": false}
                                        mode "timeout": the reply comes after `seconds` (past the
                                        client's timeout); mode "error": {"status": 503,
                                        "body": ...} at once. Unless after_handling, the order
                                        is NOT cancelled; the next cancel is handled normally.
                                        count null = every cancel until clear_faults.
    POST /_control/empty_books         {"order_book": 1, "trade_book": 1, "positions": 0,
                                        "seconds": null, "shape": "no_data"}
                                        the next N requests of each book are answered as an
                                        empty book (shape "no_data": Kotak's stCode 5203 reply;
                                        "empty_list": stat Ok with data []) while the orders
                                        really remain. A count of -1 = every request until
                                        `seconds` pass (null: until clear_faults).
                                        "order_book" covers GET /quick/user/orders[/<no>].
    POST /_control/ip_block            {"code": 100008, "apis": null, "count": null}
                                        static-IP refusal (100008 IP not whitelisted | 1037
                                        session created from another IP) for the APIs named
                                        (null: place/modify/cancel, the ones Kotak IP-checks),
                                        for `count` requests (null: until cleared; code null
                                        lifts it). Nothing is done for a refused request: as at
                                        Kotak, the IP is checked before anything else, so a
                                        cancel of an order number that does not exist gets the
                                        IP code too (unblocked: 1021 "order not found").
    POST /_control/clear_faults        {}   drop every armed fault, release held-back trades
    POST /_control/rate_limit          {"orders_per_s": 10, "requests_per_s": 25}  (null = off)
    POST /_control/reset               {}   forget orders, trades, sessions and logs
    GET  /_control/order_feed          the order-feed fake's URL, controls and counters
    POST /_control/order_feed          {"mode": "live"|"hold", "delay_s": 0, "ack": true,
                                        "refuse_auth": false, "refuse_connections": false,
                                        "resend": true}   (with ``--order-feed``; see
                                        tests/fakes/kotak_orderfeed.py)
    POST /_control/order_feed/release  {}   send the frames held in mode "hold"
    POST /_control/order_feed/drop     {}   cut every order-feed connection (no close frame)
    POST /_control/order_feed/push     {"frame": "<text>"}  send this frame as it is

Every request log row (``/_control/requests``) also carries ``order_no`` for cancel and
modify, and ``fault`` when an armed fault changed the answer (``cancel_timeout``,
``cancel_error``, ``empty_book``, ``trade_held``, ``place_lost``, ``ip_block`` with its ``code``).

Orders, trades, sessions and the received-order log live in the JSON state file (rewritten
atomically after every change), so the fake can be restarted without losing the book. Armed
faults are not persisted: a restart of the fake drops them (held-back trades appear).
Only the standard library and pyotp are used by the server itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import hashlib
import hmac
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyotp

if TYPE_CHECKING:
    import httpx

IST = timezone(timedelta(hours=5, minutes=30))
REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_VERSION = 1
SAVE_EVERY_S = 0.1  # the state file is rewritten at most this often

# --------------------------------------------------------------------------------------------
# Credentials the fake accepts (test-only values; never real secrets)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeCredentials:
    consumer_key: str = "fake-consumer-key"
    mobile_number: str = "+919876543210"
    ucc: str = "FAKE01"
    mpin: str = "123456"
    totp_secret: str = "NEOPULSEFAKETOTPSECRET23"  # base32

    def totp_now(self) -> str:
        return pyotp.TOTP(self.totp_secret).now()


# --------------------------------------------------------------------------------------------
# Broker error bodies. Shapes follow what Kotak returns (docs / public issue reports):
# a "Not_Ok" envelope with a numeric stCode and errMsg.
# --------------------------------------------------------------------------------------------

ST_INVALID_SESSION = 100022  # {"stCode":100022,"errMsg":"invalid session token","stat":"Not_Ok"}
# A wrong consumer key (the API gateway's "Invalid Credentials"). It used to be 100008 here, but
# Kotak's 100008 means the request came from an IP that is not whitelisted (below).
ST_INVALID_CREDENTIALS = 900901
# Static-IP rule (Kotak, from 2026-04-01): the order APIs take requests only from a whitelisted
# static IP, in a session created from that IP. Kotak documents these two bodies.
ST_IP_NOT_WHITELISTED = 100008  # {"stCode":100008,"errMsg":"unauthorized","stat":"Not_Ok"}
ST_SESSION_IP_MISMATCH = 1037  # {"stCode":1037,"errMsg":"session ip does not match",...}
IP_ERRORS = {  # code -> (HTTP status, errMsg): the statuses and 1037's full text are the fake's choice
    ST_IP_NOT_WHITELISTED: (401, "unauthorized"),
    ST_SESSION_IP_MISMATCH: (403, "session ip does not match"),
}
# The APIs Kotak checks the IP on ("IP validation is enforced only on order APIs").
ORDER_APIS = frozenset({"place_order", "modify_order", "cancel_order"})
LOGIN_APIS = frozenset({"totp_login", "totp_validate"})
ST_INVALID_ACCESS_TYPE = 100021  # observed for MKT orders from API sessions
ST_BODY_INVALID = 1007
ST_INVALID_SYMBOL = 1009
ST_ORDER_COMPLETE = 1021  # modify/cancel of a finished order (the SDK adds status_code=400)
ST_NO_DATA = 5203  # empty order book / trade book / positions
ST_RATE_LIMITED = 429

TERMINAL_STATUSES = frozenset({"complete", "rejected", "cancelled"})
MARKET_ORDER_TYPES = frozenset({"MKT", "SL-M"})


def not_ok(st_code: int, err_msg: str, stat: str = "Not_Ok") -> dict[str, Any]:
    return {"stCode": st_code, "errMsg": err_msg, "stat": stat}


def login_error(code: str, message: str) -> dict[str, Any]:
    """The shape the login service uses (the SDK mirrors it for client-side checks)."""
    return {"error": [{"code": code, "message": message}]}


# --------------------------------------------------------------------------------------------
# Instruments and the scrip master CSV
# --------------------------------------------------------------------------------------------

# Column names as Kotak's transformed scrip-master files spell them -- including the
# trailing spaces ("dTickSize ", "lExpiryDate ", ...) and the ';' in "dStrikePrice;".
SCRIP_MASTER_HEADER: tuple[str, ...] = (
    "pSymbol", "pGroup", "pExchSeg", "pInstType", "pSymbolName", "pTrdSymbol", "pOptionType",
    "pScripRefKey", "pISIN", "pAssetCode", "pSubGroup", "pCombinedSymbol", "pDesc", "pAmcCode",
    "pContractId", "dTickSize ", "lLotSize", "lExpiryDate ", "lMultiplier ", "lPrecision",
    "dStrikePrice;", "pExchange", "pInstName", "pExpiryDate", "pIssueDate", "pMaturityDate",
    "pListingDate", "pNoDelStartDate", "pNoDelEndDate", "pBookClsStartDate", "pBookClsEndDate",
    "pRecordDate", "pCreditRating", "pReAdminDate", "pExpulsionDate", "pLocalUpdateTime",
    "pDeliveryUnits", "pPriceUnits", "pLastTradingDate", "pTenderPeridEndDate",
    "pTenderPeridStartDate", "pSellVarMargin", "pBuyVarMargin", "pInstrumentInfo",
    "pRemarksText", "pSegment", "pNav", "pNavDate", "pMfAmt", "pSipSecurity", "pFaceValue",
    "pTrdUnits", "pExerciseStartDate", "pExerciseEndDate", "pElmMargin", "pVarMargin",
    "pTotProposedLimitValue", "pScripBasePrice", "pSettlementType", "pCurrectionTime",
    "iPermittedToTrade", "iBoardLotQty ", "iMaxOrderSize ", "iLotSize", "dOpenInterest ",
    "dHighPriceRange ", "dLowPriceRange ", "dPriceNum   ", "dGenDen", "dGenNum",
    "dPriceQuatation ", "dIssuerate ", "dPriceDen", "dWarningQty ", "dIssueCapital ",
    "dExposureMargin ", "dMinRedemptionQty ", "lFreezeQty", "CASEligible",
)  # fmt: skip

# NSE F&O expiries in Kotak's master count seconds from 1980-01-01 00:00 (not 1970).
NSE_EPOCH_OFFSET_S = 315_513_000


@dataclass(frozen=True)
class Instrument:
    segment: str
    token: str
    trading_symbol: str
    symbol: str
    group: str
    inst_type: str
    lot_size: int
    tick_paise: Decimal
    freeze_qty: int = 0  # 0 = no freeze limit
    description: str = ""
    isin: str = ""
    option_type: str = ""
    strike_paise: str = ""
    expiry_epoch: str = ""

    @property
    def tick(self) -> Decimal:
        return self.tick_paise / 100

    @property
    def exchange(self) -> str:
        return self.segment.split("_", 1)[0].upper()


def _nse_fo_expiry(day: date) -> str:
    close = datetime(day.year, day.month, day.day, 15, 30, tzinfo=IST)
    return str(int(close.timestamp()) - NSE_EPOCH_OFFSET_S)


def _monthly_expiry(today: date) -> date:
    """Last Tuesday of next month: always in the future, like a live F&O contract."""
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    last = (date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)) - timedelta(days=1)
    return last - timedelta(days=(last.weekday() - 1) % 7)


def default_instruments(today: date | None = None) -> tuple[Instrument, ...]:
    """A small sample master: NSE cash stocks and one month of NIFTY futures/options."""
    expiry = _monthly_expiry(today or datetime.now(IST).date())
    month = f"{expiry:%y}{expiry.strftime('%b').upper()}"  # 26DEC
    exp = _nse_fo_expiry(expiry)
    return (
        Instrument("nse_cm", "2885", "RELIANCE-EQ", "RELIANCE", "EQ", "EQ", 1, Decimal(10),
                   description="RELIANCE INDUSTRIES LTD", isin="INE002A01018"),
        Instrument("nse_cm", "11536", "TCS-EQ", "TCS", "EQ", "EQ", 1, Decimal(10),
                   description="TATA CONSULTANCY SERV LT", isin="INE467B01029"),
        Instrument("nse_cm", "1594", "INFY-EQ", "INFY", "EQ", "EQ", 1, Decimal(10),
                   description="INFOSYS LIMITED", isin="INE009A01021"),
        Instrument("nse_cm", "1333", "HDFCBANK-EQ", "HDFCBANK", "EQ", "EQ", 1, Decimal(10),
                   description="HDFC BANK LTD", isin="INE040A01034"),
        Instrument("nse_cm", "3045", "SBIN-EQ", "SBIN", "EQ", "EQ", 1, Decimal(5),
                   description="STATE BANK OF INDIA", isin="INE062A01020"),
        Instrument("nse_cm", "14366", "IDEA-EQ", "IDEA", "EQ", "EQ", 1, Decimal(1),
                   description="VODAFONE IDEA LIMITED", isin="INE669E01016"),
        Instrument("nse_fo", "52175", f"NIFTY{month}FUT", "NIFTY", "", "FUTIDX", 65, Decimal(10),
                   freeze_qty=1800, description="NIFTY", option_type="XX", strike_paise="-1",
                   expiry_epoch=exp),
        Instrument("nse_fo", "52201", f"NIFTY{month}24000CE", "NIFTY", "", "OPTIDX", 65,
                   Decimal(5), freeze_qty=1800, description="NIFTY", option_type="CE",
                   strike_paise="2400000", expiry_epoch=exp),
        Instrument("nse_fo", "52202", f"NIFTY{month}24000PE", "NIFTY", "", "OPTIDX", 65,
                   Decimal(5), freeze_qty=1800, description="NIFTY", option_type="PE",
                   strike_paise="2400000", expiry_epoch=exp),
    )  # fmt: skip


def scrip_master_csv(instruments: Sequence[Instrument]) -> str:
    """Render instruments in Kotak's scrip-master CSV format (tick size and strike in paise)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SCRIP_MASTER_HEADER)
    for inst in instruments:
        values = {
            "pSymbol": inst.token,
            "pGroup": inst.group,
            "pExchSeg": inst.segment,
            "pInstType": inst.inst_type,
            "pSymbolName": inst.symbol,
            "pTrdSymbol": inst.trading_symbol,
            "pOptionType": inst.option_type,
            "pScripRefKey": inst.symbol,
            "pISIN": inst.isin,
            "pDesc": inst.description,
            "dTickSize ": f"{inst.tick_paise:.6f}",
            "lLotSize": str(inst.lot_size),
            "lExpiryDate ": inst.expiry_epoch,
            "lMultiplier ": "1",
            "lPrecision": "2",
            "dStrikePrice;": inst.strike_paise,
            "pExchange": inst.exchange,
            "iPermittedToTrade": "1",
            "iBoardLotQty ": str(inst.lot_size),
            "iLotSize": str(inst.lot_size),
            "dPriceNum   ": "1",
            "dGenDen": "1",
            "dGenNum": "1",
            "dPriceDen": "1",
            "lFreezeQty": str(inst.freeze_qty) if inst.freeze_qty else "",
        }
        writer.writerow([values.get(col, "") for col in SCRIP_MASTER_HEADER])
    return out.getvalue()


def _int_cell(raw: str | None) -> int:
    try:
        return int(Decimal((raw or "").strip() or "0"))
    except InvalidOperation:
        return 0


def parse_scrip_master_csv(text: str) -> list[Instrument]:
    """Read a Kotak-format scrip master (header names are matched after stripping spaces)."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    result: list[Instrument] = []
    for raw_row in reader:
        row = dict(zip(header, raw_row, strict=False))
        token = (row.get("pSymbol") or "").strip()
        trd = (row.get("pTrdSymbol") or "").strip()
        if not token or not trd:
            continue
        try:
            tick = Decimal((row.get("dTickSize") or "").strip() or "0")
        except InvalidOperation:
            tick = Decimal(0)
        result.append(
            Instrument(
                segment=(row.get("pExchSeg") or "").strip(),
                token=token,
                trading_symbol=trd,
                symbol=(row.get("pSymbolName") or "").strip(),
                group=(row.get("pGroup") or "").strip(),
                inst_type=(row.get("pInstType") or "").strip(),
                lot_size=max(_int_cell(row.get("lLotSize")) or _int_cell(row.get("iLotSize")), 1),
                tick_paise=tick,
                freeze_qty=_int_cell(row.get("lFreezeQty")),
                description=(row.get("pDesc") or "").strip(),
                option_type=(row.get("pOptionType") or "").strip(),
                strike_paise=(row.get("dStrikePrice;") or "").strip(),
                expiry_epoch=(row.get("lExpiryDate") or "").strip(),
            )
        )
    return result


def _scrip_file_path(segment: str, day: date) -> str:
    """Kotak serves cash segments from transformed-v1/<seg>-v1.csv, the rest from transformed/."""
    base = f"/wso2-scripmaster/v1/prod/{day.isoformat()}"
    if segment.endswith("_cm"):
        return f"{base}/transformed-v1/{segment}-v1.csv"
    return f"{base}/transformed/{segment}.csv"


# --------------------------------------------------------------------------------------------
# Broker state (persisted)
# --------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(IST)


HISTORY_MAX_DAYS = {"1min": 30, "3min": 30, "5min": 30, "10min": 60, "15min": 60, "30min": 90, "60min": 90,
                    "D": 180, "W": 180}  # fmt: skip
_HISTORY_STEP_MIN = {"1min": 1, "3min": 3, "5min": 5, "10min": 10, "15min": 15, "30min": 30, "60min": 60}


def _history_fault(message: str) -> dict[str, Any]:
    return {"status": "ERROR", "fault": {"code": 400, "message": message}}


def _history_price(token: str, minute: int) -> float:
    """A deterministic price path: waves of 45 minutes and of a day around a per-token base."""
    import math

    base = 100.0 + int(hashlib.sha256(token.encode()).hexdigest()[:6], 16) % 2000
    wobble = int(hashlib.sha256(f"{token}:{minute}".encode()).hexdigest()[:4], 16) / 65535 - 0.5
    p = base * (1 + 0.01 * math.sin(2 * math.pi * minute / 45) + 0.004 * math.sin(2 * math.pi * minute / 375))
    return round(round((p + 0.0005 * base * wobble) * 20) / 20, 2)  # a 0.05 tick


def history_candles(token: str, interval: str, first: date, last: date) -> list[list[Any]]:
    """The candles the fake serves: ``[ts "+0530", open, high, low, close, volume, 0]``."""
    rows: list[list[Any]] = []
    day = first
    while day <= last:
        if day.weekday() < 5:
            step = _HISTORY_STEP_MIN.get(interval, 375)
            start = datetime(day.year, day.month, day.day, 9, 15, tzinfo=IST)
            origin = (day - date(2020, 1, 1)).days * 375
            for k in range(0, 375, step):
                o, c = _history_price(token, origin + k), _history_price(token, origin + k + step)
                lo = min(_history_price(token, origin + k + j) for j in range(step + 1))
                hi = max(_history_price(token, origin + k + j) for j in range(step + 1))
                vol = 1000 + (origin + k) % 97 * 10
                ts = (start + timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%S%z")
                rows.append([ts, o, hi, lo, c, vol, 0])
        day += timedelta(days=1)
    return rows


def _dt_long(d: datetime) -> str:
    return d.strftime("%d-%b-%Y %H:%M:%S")  # 22-Jan-2025 14:28:01


def _dt_hs(d: datetime) -> str:
    return d.strftime("%Y/%m/%d %H:%M:%S")  # 2025/01/22 14:28:01


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@dataclass
class FakeOrder:
    n_ord_no: str
    ex_ord_id: str
    gui_ord_id: str
    segment: str
    trading_symbol: str
    token: str
    symbol: str
    series: str
    inst_type: str
    lot_size: int
    tick: str
    transaction_type: str
    product: str
    order_type: str
    validity: str
    quantity: int
    price: str
    trigger_price: str
    disclosed_qty: int
    amo: str
    status: str
    entered_at: str
    updated_at: str
    updated_ns: int
    filled_qty: int = 0
    fill_value: str = "0"
    cancelled_qty: int = 0
    reject_reason: str = "--"
    modifications: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def unfilled(self) -> int:
        return self.quantity - self.filled_qty

    def avg_price(self) -> Decimal:
        if not self.filled_qty:
            return Decimal(0)
        return Decimal(self.fill_value) / self.filled_qty


@dataclass
class FakeTrade:
    fill_id: str
    n_ord_no: str
    quantity: int
    price: str
    filled_at: str
    filled_ns: int


@dataclass
class FakeSession:
    sid: str
    view_token: str
    trade_token: str | None
    rid: str
    created_at: str
    expired: bool = False


@dataclass
class BrokerState:
    order_seq: int = 0
    trade_seq: int = 0
    orders: dict[str, FakeOrder] = field(default_factory=dict)
    trades: list[FakeTrade] = field(default_factory=list)
    sessions: list[FakeSession] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "order_seq": self.order_seq,
            "trade_seq": self.trade_seq,
            "orders": [asdict(o) for o in self.orders.values()],
            "trades": [asdict(t) for t in self.trades],
            "sessions": [asdict(s) for s in self.sessions],
            "received": self.received,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BrokerState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state file version {data.get('version')!r}")
        known = {f.name for f in fields(FakeOrder)}
        orders = [FakeOrder(**{k: v for k, v in o.items() if k in known}) for o in data["orders"]]
        return cls(
            order_seq=int(data["order_seq"]),
            trade_seq=int(data["trade_seq"]),
            orders={o.n_ord_no: o for o in orders},
            trades=[FakeTrade(**t) for t in data["trades"]],
            sessions=[FakeSession(**s) for s in data["sessions"]],
            received=list(data["received"]),
        )


# --------------------------------------------------------------------------------------------
# Requests, replies and fault injection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    client_ip: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    delay_s: float = 0.0  # the handler sleeps this long before answering
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (e.g. Retry-After)


def json_reply(status: int, payload: Any, delay_s: float = 0.0) -> Reply:
    return Reply(status, json.dumps(payload).encode(), "application/json", delay_s)


@dataclass
class FailRule:
    api: str
    status: int
    body: Any
    count: int
    after_handling: bool
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0  # the failure is answered this late


@dataclass
class CancelFault:
    """A cancel that fails: ``mode`` "timeout" (answer after ``seconds``) or "error" (at once)."""

    order_no: str | None  # None: any order
    mode: str
    seconds: float
    status: int
    body: Any
    count: int | None  # None: until cleared
    after_handling: bool  # the cancel takes effect, only its answer is lost


@dataclass
class IpBlockRule:
    """Answer ``apis`` (None: the order APIs) with a static-IP refusal ``code``, for ``count``
    requests (None: until cleared)."""

    code: int
    apis: frozenset[str] | None
    count: int | None

    def covers(self, api: str) -> bool:
        left = self.count is None or self.count > 0
        return left and api in (ORDER_APIS if self.apis is None else self.apis)


@dataclass
class EmptyBookRule:
    """Answer one book API as empty: for ``count`` requests (None: any number) until ``until``
    (a monotonic deadline; None: no deadline)."""

    count: int | None
    until: float | None
    shape: str  # "no_data" | "empty_list"

    def live(self, now: float) -> bool:
        return (self.count is None or self.count > 0) and (self.until is None or now < self.until)


class _BadBody(Exception):
    pass


_CURRENT = threading.local()  # the request-log row of the request this thread is handling


def _note(**values: Any) -> None:
    """Add fields to the current request's log row (what a fault did to it)."""
    row = getattr(_CURRENT, "row", None)
    if row is not None:
        row.update(values)


# --------------------------------------------------------------------------------------------
# The fake broker
# --------------------------------------------------------------------------------------------


class FakeKotakBroker:
    """Everything the fake knows and does. ``handle`` maps one HTTP request to one Reply."""

    def __init__(
        self,
        state_file: Path,
        *,
        credentials: FakeCredentials,
        advertise_url: str,
        instruments: Sequence[Instrument] | None = None,
        master_files: dict[str, str] | None = None,
        data_center: str = "E21",
        sfeed_url: str | None = None,
        order_feed_url: str | None = None,
    ) -> None:
        self.state_file = state_file
        self.creds = credentials
        self.advertise_url = advertise_url.rstrip("/")
        self.data_center = data_center
        self.sfeed_url = sfeed_url
        self.order_feed_url = order_feed_url
        self._lock = threading.RLock()
        self._jwt_key = secrets.token_bytes(32)
        self._master_day = _now().date()
        # segment -> CSV text served; overrides from files replace the built-in rows.
        self._master_csv: dict[str, str] = {}
        by_segment: dict[str, list[Instrument]] = {}
        for inst in instruments if instruments is not None else default_instruments():
            by_segment.setdefault(inst.segment, []).append(inst)
        for segment, rows in by_segment.items():
            self._master_csv[segment] = scrip_master_csv(rows)
        for segment, text in (master_files or {}).items():
            self._master_csv[segment] = text
        self._instruments: dict[tuple[str, str], Instrument] = {}
        for segment, text in self._master_csv.items():
            for inst in parse_scrip_master_csv(text):
                self._instruments[(inst.segment or segment, inst.trading_symbol)] = inst
        # Volatile (not persisted) test controls and logs.
        self._requests: list[dict[str, Any]] = []
        self._hang_next: list[tuple[float, bool]] = []  # (seconds, placed)
        self._reject_next: list[tuple[str, float]] = []
        self._fail_rules: list[FailRule] = []
        self._cancel_faults: list[CancelFault] = []
        self._empty_books: dict[str, EmptyBookRule] = {}
        self._ip_block: IpBlockRule | None = None
        # Kotak rewrites an order's GuiOrdId on modify and cancel (v2 SDK issue #33): None = off,
        # else the prefix of the tag it makes up (``rewrite_tags``).
        self._rewrite_tags: str | None = None
        # fill_id -> trade-book requests still to miss it (None: until release_trades)
        self._held_trades: dict[str, int | None] = {}
        self._orders_per_s: float | None = None
        self._requests_per_s: float | None = None
        self.order_feed: Any = None  # FakeOrderFeed with --order-feed (attach_order_feed)
        self.state = self._load()
        self._dirty = False
        self._saved_at = 0.0
        self._save_every = SAVE_EVERY_S  # grows with the time a rewrite takes (``flush``)
        self._save()

    # ---- persistence ----------------------------------------------------------------------

    def _load(self) -> BrokerState:
        if self.state_file.exists() and self.state_file.stat().st_size > 0:
            return BrokerState.from_json(json.loads(self.state_file.read_text()))
        return BrokerState()

    def _save(self) -> None:
        """Persist the book: at once when the last write is older than ``SAVE_EVERY_S``, else
        by the saver thread within that long (a busy book is not rewritten per change). A
        stop (SIGTERM, Ctrl-C) writes what is pending; only kill -9 can lose the last moment."""
        with self._lock:
            self._dirty = True
            if time.monotonic() - self._saved_at >= self._save_every:
                self.flush()
            elif not getattr(self, "_saver", None):
                self._saver = threading.Thread(target=self._save_loop, daemon=True)
                self._saver.start()

    def _save_loop(self) -> None:
        while True:
            time.sleep(self._save_every)
            self.flush()

    def flush(self) -> None:
        """Write the state file now if anything changed."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            began = time.monotonic()
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(self.state.to_json(), separators=(",", ":")))
            tmp.replace(self.state_file)
            self._saved_at = time.monotonic()
            # The rewrite holds the lock every request waits on, and a long day's book takes
            # longer to write: the next one waits 20 times as long as this one took, so saving
            # never takes more than a twentieth of the fake's time (a slow fake times out calls
            # the test did not mean to fail).
            self._save_every = max(SAVE_EVERY_S, 20 * (self._saved_at - began))

    # ---- routing --------------------------------------------------------------------------

    def handle(self, req: HttpRequest) -> Reply:
        if req.path.startswith("/_control/"):
            try:
                return self._control(req)
            except _BadBody as exc:
                return json_reply(400, {"error": str(exc)})
        api, handler = self._route(req)
        row: dict[str, Any] = {"ts": time.time(), "mono": time.monotonic(), "method": req.method,
                               "path": req.path, "api": api}  # fmt: skip
        _CURRENT.row = row
        with self._lock:
            self._requests.append(row)
            limited = self._rate_limited(api)
            ip_refusal = self._take_ip_block(api) if limited is None else None
            rule = self._take_fail_rule(api) if limited is None and ip_refusal is None else None
        if limited is not None:
            if api == "place_order":
                self._log_received(req, outcome="rate_limited", response=limited)
            return json_reply(429, limited)
        if ip_refusal is not None:  # checked before the order is looked at: nothing is done
            if api == "place_order":
                self._log_received(req, outcome="ip_blocked", response=json.loads(ip_refusal.body))
            return ip_refusal
        if rule is not None and not rule.after_handling:
            return self._fail_reply(rule)
        try:
            reply = handler(req)
        except _BadBody:
            reply = json_reply(400, not_ok(ST_BODY_INVALID, "body invalid", "bad request"))
        if rule is not None:
            return Reply(**{**asdict(self._fail_reply(rule)), "delay_s": reply.delay_s})
        return reply

    def _route(self, req: HttpRequest) -> tuple[str, Callable[[HttpRequest], Reply]]:
        m, p = req.method, req.path.rstrip("/")
        table: dict[tuple[str, str], tuple[str, Callable[[HttpRequest], Reply]]] = {
            ("POST", "/login/1.0/tradeApiLogin"): ("totp_login", self._totp_login),
            ("POST", "/api/1.0/login/v6/totp/login"): ("totp_login", self._totp_login),
            ("POST", "/login/1.0/tradeApiValidate"): ("totp_validate", self._totp_validate),
            ("POST", "/api/1.0/login/v6/totp/validate"): ("totp_validate", self._totp_validate),
            ("GET", "/login/1.0/get-client-ip"): ("client_ip", self._client_ip),
            ("GET", "/5config/config"): ("config", self._config_service),
            ("POST", "/quick/order/rule/ms/place"): ("place_order", self._place_order),
            ("POST", "/quick/order/vr/modify"): ("modify_order", self._modify_order),
            ("POST", "/quick/order/cancel"): ("cancel_order", self._cancel_order),
            ("POST", "/quick/order/history"): ("order_history", self._order_history),
            ("GET", "/quick/user/orders"): ("order_book", self._order_book),
            ("GET", "/quick/user/trades"): ("trade_report", self._trade_book),
            ("GET", "/portfolio/v2/positions"): ("positions", self._positions),
            ("POST", "/quick/user/limits"): ("limits", self._limits),
            ("GET", "/script-details/1.0/masterscrip/file-paths"): ("scrip_master", self._file_paths),
            ("GET", "/market-data/1.0/historical/details"): ("historical_data", self._historical),
            ("POST", "/apim/login/2.0/logout"): ("logout", self._logout),
            ("POST", "/api/1.0/logout"): ("logout", self._logout),
        }
        if (m, p) in table:
            return table[(m, p)]
        if m == "GET" and p.startswith("/quick/user/orders/"):
            return "order_book", self._order_book
        if m == "GET" and p.startswith("/wso2-scripmaster/"):
            return "scrip_file", self._scrip_file
        return "unknown", self._not_found

    def _not_found(self, req: HttpRequest) -> Reply:
        return json_reply(404, {"stat": "Not_Ok", "errMsg": f"no route {req.method} {req.path}"})

    # ---- volatile controls ----------------------------------------------------------------

    def _rate_limited(self, api: str) -> dict[str, Any] | None:
        if self._requests_per_s is None and self._orders_per_s is None:
            return None
        now = time.monotonic()
        window = []  # the requests of the last second, newest first: the log only grows
        for r in reversed(self._requests[:-1]):
            if now - r["mono"] >= 1.0:
                break
            window.append(r)
        if self._requests_per_s is not None and len(window) >= self._requests_per_s:
            return not_ok(ST_RATE_LIMITED, "Too many requests")
        if api == "place_order" and self._orders_per_s is not None:
            placed = sum(1 for r in window if r["api"] == "place_order")
            if placed >= self._orders_per_s:
                return not_ok(ST_RATE_LIMITED, "Too many requests")
        return None

    def _take_fail_rule(self, api: str) -> FailRule | None:
        for rule in self._fail_rules:
            if rule.api == api:
                rule.count -= 1
                if rule.count <= 0:
                    self._fail_rules.remove(rule)
                return rule
        return None

    def _take_ip_block(self, api: str) -> Reply | None:
        """The static-IP refusal for this request when an ``ip_block`` rule covers it. Login
        APIs answer in the login service's shape, the rest in the order/report envelope."""
        rule = self._ip_block
        if rule is None or not rule.covers(api):
            return None
        if rule.count is not None:
            rule.count -= 1
        status, message = IP_ERRORS[rule.code]
        _note(fault="ip_block", code=rule.code)
        if api in LOGIN_APIS:
            return json_reply(status, login_error(str(rule.code), message))
        return json_reply(status, not_ok(rule.code, message))

    @staticmethod
    def _fail_reply(rule: FailRule) -> Reply:
        if isinstance(rule.body, str):
            return Reply(rule.status, rule.body.encode(), "text/html", rule.delay_s, rule.headers)
        return Reply(rule.status, json.dumps(rule.body).encode(), delay_s=rule.delay_s, headers=rule.headers)

    # ---- sessions and tokens --------------------------------------------------------------

    def _jwt(self, kind: str) -> str:
        def b64(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        now = int(time.time())
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64(json.dumps({
            "sub": self.creds.ucc, "ucc": self.creds.ucc, "kType": kind, "iat": now,
            "exp": now + 86_400, "jti": secrets.token_hex(8),
        }).encode())  # fmt: skip
        signature = hmac.new(self._jwt_key, f"{header}.{payload}".encode(), hashlib.sha256)
        return f"{header}.{payload}.{b64(signature.digest())}"

    def _trade_session(self, req: HttpRequest) -> FakeSession | None:
        sid, auth = req.header("Sid"), req.header("Auth")
        for s in self.state.sessions:
            if not s.expired and s.trade_token and s.sid == sid and s.trade_token == auth:
                return s
        return None

    def _auth_error(self, req: HttpRequest, *, needs_consumer_key: bool) -> Reply | None:
        """None when the request carries a live trade session (and consumer key if needed)."""
        if needs_consumer_key and req.header("Authorization") != self.creds.consumer_key:
            return json_reply(401, not_ok(ST_INVALID_CREDENTIALS, "Invalid Credentials"))
        if self._trade_session(req) is None:
            return json_reply(403, not_ok(ST_INVALID_SESSION, "invalid session token"))
        return None

    def _totp_login(self, req: HttpRequest) -> Reply:
        body = _json_body(req)
        if req.header("Authorization") != self.creds.consumer_key:
            return json_reply(401, login_error("401", "Invalid consumer key"))
        for key, name in (("mobileNumber", "MobileNumber"), ("ucc", "Ucc"), ("totp", "Totp")):
            if not body.get(key):
                return json_reply(400, login_error("400", f"Missing required field '{name}'"))
        if body["mobileNumber"] != self.creds.mobile_number or body["ucc"] != self.creds.ucc:
            return json_reply(401, login_error("401", "Invalid mobile number or UCC"))
        if not pyotp.TOTP(self.creds.totp_secret).verify(str(body["totp"]), valid_window=1):
            return json_reply(401, login_error("10020", "Invalid TOTP"))
        with self._lock:
            session = FakeSession(
                sid=str(_uuid()), view_token=self._jwt("View"), trade_token=None,
                rid=str(_uuid()), created_at=_dt_hs(_now()),
            )  # fmt: skip
            self.state.sessions.append(session)
            self._save()
        return json_reply(200, {"data": self._session_data(session, session.view_token, "View")})

    def _totp_validate(self, req: HttpRequest) -> Reply:
        body = _json_body(req)
        if req.header("Authorization") != self.creds.consumer_key:
            return json_reply(401, login_error("401", "Invalid consumer key"))
        if not body.get("mpin"):
            return json_reply(400, login_error("400", "Missing required field 'Mpin'"))
        with self._lock:
            session = next(
                (s for s in self.state.sessions if not s.expired and s.sid == req.header("sid")
                 and s.view_token == req.header("Auth")),
                None,
            )  # fmt: skip
            if session is None:
                return json_reply(401, login_error("401", "Invalid session, please login again"))
            if body["mpin"] != self.creds.mpin:
                return json_reply(401, login_error("401", "Invalid MPIN"))
            session.trade_token = self._jwt("Trade")
            self._save()
            data = self._session_data(session, session.trade_token, "Trade")
        data["baseUrl"] = self.advertise_url
        return json_reply(200, {"data": data})

    def _session_data(self, s: FakeSession, token: str, kind: str) -> dict[str, Any]:
        return {
            "token": token, "sid": s.sid, "rid": s.rid, "hsServerId": "",
            "isUserPwdExpired": False, "ucc": self.creds.ucc, "greetingName": "FAKE USER",
            "isTrialAccount": False, "dataCenter": self.data_center, "mfAccess": 1,
            "dataCenterMap": None, "dormancyStatus": "A", "asbaStatus": "", "clientType": "RI",
            "isNRI": False, "kId": "FAKEPAN0000", "kType": kind, "status": "success",
            "incRange": 0, "incUpdFlag": "", "clientGroup": "", "kraStatus": "", "rcFlag": 0,
        }  # fmt: skip

    def _client_ip(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=True)) is not None:
            return err
        data = [{"ip": req.client_ip, "time": _dt_hs(_now())}]
        return json_reply(200, {"data": data, "stCode": 1000, "status": "success"})

    def _config_service(self, req: HttpRequest) -> Reply:
        configs: dict[str, str] = {}
        if self.sfeed_url or self.order_feed_url:
            dc = self.data_center
            configs[f"{dc}_broadcast_source"] = "fake"
            if self.sfeed_url:
                configs[f"{dc}_fake_broadcast_endpoint"] = self.sfeed_url
            if self.order_feed_url:
                configs[f"{dc}_fake_interactive_endpoint"] = self.order_feed_url
        return json_reply(200, {"data": {"configs": configs}})

    def _logout(self, req: HttpRequest) -> Reply:
        with self._lock:
            session = self._trade_session(req)
            if session is None:
                return json_reply(403, not_ok(ST_INVALID_SESSION, "invalid session token"))
            session.expired = True
            self._save()
        return json_reply(200, {"stat": "Ok", "stCode": 200, "data": {"msg": "logged out"}})

    # ---- orders ---------------------------------------------------------------------------

    def _next_order_ids(self) -> tuple[str, str]:
        self.state.order_seq += 1
        seq = self.state.order_seq
        return f"{_now():%y%m%d}{seq:09d}", str(1_100_000_000_000_000 + seq)

    def _log_received(self, req: HttpRequest, *, outcome: str, response: Any,
                      n_ord_no: str | None = None) -> None:  # fmt: skip
        try:
            body: Any = _form_jdata(req)
        except _BadBody:
            body = req.body.decode(errors="replace")
        with self._lock:
            self.state.received.append({
                "seq": len(self.state.received) + 1, "ts": time.time(), "body": body,
                "tag": body.get("ig") if isinstance(body, dict) else None,
                "outcome": outcome, "nOrdNo": n_ord_no, "response": response,
            })  # fmt: skip
            self._save()

    def _place_order(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=True)) is not None:
            self._log_received(req, outcome="auth_error", response=json.loads(err.body))
            return err
        with self._lock:
            lost = self._hang_next.pop(0) if self._hang_next and not self._hang_next[0][1] else None
        if lost is not None:  # the request died on the way: late gateway page, nothing placed
            _note(fault="place_lost")
            self._log_received(req, outcome="lost", response=None)
            return Reply(504, b"<html><body>504 Gateway Time-out</body></html>", "text/html", lost[0])
        try:
            body = _form_jdata(req)
        except _BadBody:
            self._log_received(req, outcome="bad_body", response=None)
            raise
        required = ("am", "dq", "es", "mp", "pc", "pr", "pt", "qt", "rt", "tp", "ts", "tt")
        if any(body.get(k) in (None, "") for k in required):
            resp = not_ok(ST_BODY_INVALID, "body invalid", "bad request")
            self._log_received(req, outcome="rejected", response=resp)
            return json_reply(400, resp)
        order_type = str(body["pt"])
        if order_type in MARKET_ORDER_TYPES:
            resp = not_ok(ST_INVALID_ACCESS_TYPE, "invalid  access type")
            self._log_received(req, outcome="rejected", response=resp)
            return json_reply(400, resp)
        inst = self._instruments.get((str(body["es"]), str(body["ts"])))
        if inst is None or order_type not in {"L", "SL"}:
            resp = not_ok(ST_INVALID_SYMBOL, "Invalid trading symbol or order type")
            self._log_received(req, outcome="rejected", response=resp)
            return json_reply(400, resp)
        try:
            quantity = int(body["qt"])
            price = Decimal(str(body["pr"]))
            trigger = Decimal(str(body["tp"] or "0"))
        except (ValueError, InvalidOperation):
            resp = not_ok(ST_BODY_INVALID, "body invalid", "bad request")
            self._log_received(req, outcome="rejected", response=resp)
            return json_reply(400, resp)

        now = _now()
        with self._lock:
            n_ord_no, ex_ord_id = self._next_order_ids()
            tag = body.get("ig")
            # Without a tag the broker makes up its own GuiOrdId (this is its format).
            gui = str(tag) if tag else f"{int(now.timestamp())}-{secrets.randbelow(10**6):06d}-ADMINAPI"
            order = FakeOrder(
                n_ord_no=n_ord_no, ex_ord_id=ex_ord_id, gui_ord_id=gui, segment=inst.segment,
                trading_symbol=inst.trading_symbol, token=inst.token, symbol=inst.symbol,
                series=inst.group or "XX", inst_type=inst.inst_type, lot_size=inst.lot_size,
                tick=str(inst.tick), transaction_type=str(body["tt"]), product=str(body["pc"]),
                order_type=order_type, validity=str(body["rt"]), quantity=quantity,
                price=_money(price), trigger_price=_money(trigger),
                disclosed_qty=int(body.get("dq") or 0), amo=str(body["am"]),
                status="put order req received", entered_at=_dt_long(now),
                updated_at=_dt_long(now), updated_ns=time.time_ns(),
            )  # fmt: skip
            self.state.orders[n_ord_no] = order
            self._transition(order, "put order req received")
            self._transition(order, "validation pending")
            reason = self._rms_reject_reason(order, inst, price, trigger)
            if reason is not None:
                self._reject(order, reason)
            else:
                self._transition(order, "open pending")
                self._transition(order, "trigger pending" if order_type == "SL" else "open")
            self._save()
            delay = self._hang_next.pop(0)[0] if self._hang_next and self._hang_next[0][1] else 0.0
            injected = self._reject_next.pop(0) if self._reject_next else None
        if injected is not None:
            self._schedule_reject(n_ord_no, *injected)
        resp = {"stat": "Ok", "nOrdNo": n_ord_no, "stCode": 200}
        self._log_received(req, outcome="ack", response=resp, n_ord_no=n_ord_no)
        return json_reply(200, resp, delay_s=delay)

    @staticmethod
    def _rms_reject_reason(order: FakeOrder, inst: Instrument, price: Decimal,
                           trigger: Decimal) -> str | None:  # fmt: skip
        """Checks the broker/exchange makes after the ack: the order then shows as rejected."""
        if order.quantity <= 0 or order.quantity % inst.lot_size:
            return f"RMS:Quantity {order.quantity} is not a multiple of lot size {inst.lot_size}"
        if inst.freeze_qty and order.quantity > inst.freeze_qty:
            return f"RMS:Order quantity {order.quantity} exceeds freeze quantity {inst.freeze_qty}"
        tick = inst.tick
        if tick > 0 and (price % tick or (order.order_type == "SL" and trigger % tick)):
            return f"RMS:Price is not a multiple of tick size {tick}"
        if order.order_type == "SL" and trigger <= 0:
            return "RMS:Trigger price is required for stop loss orders"
        return None

    def _transition(self, order: FakeOrder, status: str) -> None:
        now = _now()
        order.status = status
        order.updated_at = _dt_long(now)
        order.updated_ns = time.time_ns()
        order.history.append(self._history_row(order))
        if self.order_feed is not None:  # Kotak pushes every order change on the order feed
            self.order_feed.push("order", self._order_row(order))

    def attach_order_feed(self, port: int = 0) -> str:
        """Serve the order feed (tests/fakes/kotak_orderfeed.py) for this book; returns its URL,
        which the dynamic-config call then hands to the SDK."""
        from tests.fakes.kotak_orderfeed import FakeOrderFeed

        def check(token: str, sid: str) -> bool:
            with self._lock:
                return any(s.trade_token == token and s.sid == sid and not s.expired
                           for s in self.state.sessions)  # fmt: skip

        def snapshot() -> list[dict[str, Any]]:
            with self._lock:
                return [self._order_row(o) for o in self.state.orders.values()]

        self.order_feed = FakeOrderFeed(check, snapshot).start(port)
        self.order_feed_url = self.order_feed.url
        return self.order_feed_url

    def _reject(self, order: FakeOrder, reason: str) -> None:
        order.reject_reason = reason
        self._transition(order, "rejected")

    def _schedule_reject(self, n_ord_no: str, reason: str, delay_s: float) -> None:
        def fire() -> None:
            with self._lock:
                order = self.state.orders.get(n_ord_no)
                if order is not None and not order.is_terminal:
                    self._reject(order, reason)
                    self._save()

        timer = threading.Timer(delay_s, fire)
        timer.daemon = True
        timer.start()

    def _find_order(self, n_ord_no: str) -> FakeOrder | None:
        return self.state.orders.get(n_ord_no)

    def _modify_order(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=True)) is not None:
            return err
        body = _form_jdata(req)
        _note(order_no=str(body.get("no") or ""))
        with self._lock:
            order = self._find_order(str(body.get("no") or ""))
            if order is None:
                return json_reply(400, not_ok(ST_ORDER_COMPLETE, "order not found",
                                              "please provide valid order number"))  # fmt: skip
            if order.is_terminal:
                return json_reply(400, not_ok(ST_ORDER_COMPLETE, f"order is {order.status}",
                                              "please provide valid order number"))  # fmt: skip
            order_type = str(body.get("pt") or order.order_type)
            if order_type in MARKET_ORDER_TYPES:
                return json_reply(400, not_ok(ST_INVALID_ACCESS_TYPE, "invalid  access type"))
            try:
                quantity = int(body.get("qt") or order.quantity)
                price = Decimal(str(body.get("pr") or order.price))
                trigger = Decimal(str(body.get("tp") or "0"))
            except (ValueError, InvalidOperation) as exc:
                raise _BadBody from exc
            tick = Decimal(order.tick)
            if quantity < order.filled_qty or quantity % order.lot_size:
                return json_reply(400, not_ok(ST_BODY_INVALID, "invalid quantity", "bad request"))
            if tick > 0 and price % tick:
                return json_reply(400, not_ok(ST_BODY_INVALID, "price not in tick", "bad request"))
            order.quantity = quantity
            order.price = _money(price)
            order.trigger_price = _money(trigger)
            order.order_type = order_type
            order.validity = str(body.get("vd") or order.validity)
            order.disclosed_qty = int(body.get("dq") or 0)
            order.modifications += 1
            self._rewrite_tag(order)
            self._transition(order, "modified")
            if order.filled_qty >= order.quantity:
                self._transition(order, "complete")
            else:
                self._transition(order, "trigger pending" if order_type == "SL" else "open")
            self._save()
        return json_reply(200, {"stat": "Ok", "nOrdNo": order.n_ord_no, "stCode": 200})

    def _cancel_order(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=True)) is not None:
            return err
        body = _form_jdata(req)
        _note(order_no=str(body.get("on") or ""))
        with self._lock:
            order = self._find_order(str(body.get("on") or ""))
            if order is None:
                return json_reply(400, not_ok(ST_ORDER_COMPLETE, "order not found",
                                              "please provide valid order number"))  # fmt: skip
            if order.is_terminal:
                return json_reply(400, not_ok(ST_ORDER_COMPLETE, f"order is {order.status}",
                                              "please provide valid order number"))  # fmt: skip
            fault = self._take_cancel_fault(order.n_ord_no)
            if fault is None or fault.after_handling:
                self._rewrite_tag(order)
                self._cancel(order)
                self._save()
        if fault is not None:
            return self._cancel_fault_reply(fault)
        return json_reply(200, {"stat": "Ok", "nOrdNo": order.n_ord_no, "stCode": 200})

    def _rewrite_tag(self, order: FakeOrder) -> None:
        """With ``rewrite_tags`` armed, a modify or cancel gives the order a new GuiOrdId of the
        broker's making; the order report, its history and the trade book show only the new one."""
        if self._rewrite_tags is not None:
            made = f"{time.time_ns() // 1000}{secrets.randbelow(10**4):04d}"
            order.gui_ord_id = (self._rewrite_tags + made)[:20]

    def _take_cancel_fault(self, n_ord_no: str) -> CancelFault | None:
        for fault in self._cancel_faults:
            if fault.order_no in (None, n_ord_no):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._cancel_faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _cancel_fault_reply(fault: CancelFault) -> Reply:
        if fault.mode == "timeout":
            _note(fault="cancel_timeout")
            return Reply(504, b"<html><body>504 Gateway Time-out</body></html>", "text/html",
                         fault.seconds)  # fmt: skip
        _note(fault="cancel_error")
        if isinstance(fault.body, str):
            return Reply(fault.status, fault.body.encode(), "text/html")
        return json_reply(fault.status, fault.body)

    def _cancel(self, order: FakeOrder) -> None:
        order.cancelled_qty = order.unfilled
        self._transition(order, "cancel pending")
        self._transition(order, "cancelled")

    def fill(self, n_ord_no: str, qty: int | None, price: Decimal | None, *,
             trade_after_polls: int = 0, hold_trade: bool = False) -> dict[str, Any]:  # fmt: skip
        """Fill the order now. The order row shows it at once; with ``trade_after_polls`` the
        trade book misses the trade for that many more requests, with ``hold_trade`` until
        ``release_trades`` (Kotak often reports COMPLETE before the trade)."""
        with self._lock:
            order = self._find_order(n_ord_no)
            if order is None:
                raise _BadBody(f"no order {n_ord_no}")
            if order.is_terminal:
                raise _BadBody(f"order {n_ord_no} is {order.status}")
            fill_qty = order.unfilled if qty is None else qty
            if fill_qty <= 0 or fill_qty > order.unfilled or fill_qty % order.lot_size:
                raise _BadBody(f"fill qty {fill_qty} invalid (unfilled {order.unfilled}, "
                               f"lot {order.lot_size})")  # fmt: skip
            fill_price = Decimal(order.price) if price is None else price
            self.state.trade_seq += 1
            trade = FakeTrade(
                fill_id=str(200_000_000 + self.state.trade_seq), n_ord_no=n_ord_no,
                quantity=fill_qty, price=_money(fill_price), filled_at=_dt_long(_now()),
                filled_ns=time.time_ns(),
            )  # fmt: skip
            self.state.trades.append(trade)
            if hold_trade or trade_after_polls > 0:
                self._held_trades[trade.fill_id] = None if hold_trade else trade_after_polls
            order.filled_qty += fill_qty
            order.fill_value = str(Decimal(order.fill_value) + fill_price * fill_qty)
            self._transition(order, "complete" if order.unfilled == 0 else "open")
            if self.order_feed is not None:
                for row in self._position_rows():
                    if row.get("tok") == order.token and row.get("exSeg") == order.segment:
                        self.order_feed.push("position", row)
            self._save()
            return self._trade_row(trade, order)

    # ---- books ----------------------------------------------------------------------------

    def _order_book(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=False)) is not None:
            return err
        if (empty := self._empty_reply("order_book")) is not None:
            return empty
        prefix = "/quick/user/orders/"
        with self._lock:
            if req.path.startswith(prefix) and req.path != prefix:
                order = self._find_order(req.path[len(prefix) :])
                orders = [order] if order is not None else []
            else:
                orders = list(self.state.orders.values())
            rows = [self._order_row(o) for o in orders]
        if not rows:
            return json_reply(200, not_ok(ST_NO_DATA, "No Data"))
        rows.reverse()  # newest first, like the broker
        return json_reply(200, {"stat": "Ok", "data": rows, "stCode": 200})

    def _order_history(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=False)) is not None:
            return err
        body = _form_jdata(req)
        with self._lock:
            order = self._find_order(str(body.get("nOrdNo") or ""))
            if order is None:
                return json_reply(200, not_ok(ST_NO_DATA, "No Data"))
            rows = list(reversed(order.history))  # newest first
        return json_reply(200, {"stat": "Ok", "stCode": 200, "data": rows})

    def _trade_book(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=False)) is not None:
            return err
        if (empty := self._empty_reply("trade_report")) is not None:
            return empty
        with self._lock:
            rows = []
            held = 0
            for t in self.state.trades:
                if t.fill_id in self._held_trades:
                    left = self._held_trades[t.fill_id]
                    if left is None or left > 0:
                        if left is not None:
                            self._held_trades[t.fill_id] = left - 1
                        held += 1
                        continue
                    del self._held_trades[t.fill_id]
                rows.append(self._trade_row(t, self.state.orders[t.n_ord_no]))
        if held:
            _note(fault="trade_held", held=held)
        if not rows:
            return json_reply(200, not_ok(ST_NO_DATA, "No Data"))
        return json_reply(200, {"stat": "ok", "stCode": 200, "data": rows})

    def _trade_held(self, fill_id: str) -> bool:
        if fill_id not in self._held_trades:
            return False
        left = self._held_trades[fill_id]
        return left is None or left > 0

    def _empty_reply(self, api: str) -> Reply | None:
        """The empty-book answer when an ``empty_books`` rule covers this request."""
        with self._lock:
            rule = self._empty_books.get(api)
            if rule is None:
                return None
            if not rule.live(time.monotonic()):
                del self._empty_books[api]
                return None
            if rule.count is not None:
                rule.count -= 1
            shape = rule.shape
        _note(fault="empty_book")
        if shape == "empty_list":
            return json_reply(200, {"stat": "Ok" if api == "order_book" else "ok", "stCode": 200, "data": []})
        return json_reply(200, not_ok(ST_NO_DATA, "No Data"))

    def _positions(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=False)) is not None:
            return err
        if (empty := self._empty_reply("positions")) is not None:
            return empty
        with self._lock:
            rows = self._position_rows()
        if not rows:
            return json_reply(200, not_ok(ST_NO_DATA, "No Data"))
        return json_reply(200, {"stat": "ok", "stCode": 200, "data": rows})

    def _limits(self, req: HttpRequest) -> Reply:
        if (err := self._auth_error(req, needs_consumer_key=False)) is not None:
            return err
        return json_reply(200, {
            "stat": "Ok", "stCode": 200, "Net": "1000000.00", "CollateralValue": "1000000.00",
            "MarginUsed": "0.00", "Category": "CLIENT", "RmsPayInAmt": "0.00",
        })  # fmt: skip

    # ---- scrip master ---------------------------------------------------------------------

    def _file_paths(self, req: HttpRequest) -> Reply:
        if req.header("Authorization") != self.creds.consumer_key:
            return json_reply(401, not_ok(ST_INVALID_CREDENTIALS, "Invalid Credentials"))
        paths = [
            f"{self.advertise_url}{_scrip_file_path(seg, self._master_day)}"
            for seg in sorted(self._master_csv, key=lambda s: (s.endswith("_cm"), s))
        ]
        base = f"{self.advertise_url}/wso2-scripmaster/v1/prod"
        return json_reply(200, {"data": {"baseFolder": base, "filesPaths": paths}})

    def _historical(self, req: HttpRequest) -> Reply:
        """``historical_data()``: deterministic candles of the weekdays asked for (``todate``
        included), 09:15-15:29 IST for minute intervals, one a day for ``D``. Only the
        ``Authorization`` header (the consumer key) is checked, as Kotak does."""
        if req.header("Authorization") != self.creds.consumer_key:
            return json_reply(401, not_ok(ST_INVALID_CREDENTIALS, "Invalid Credentials"))
        interval = req.query.get("interval", "")
        if interval not in HISTORY_MAX_DAYS:
            return json_reply(400, _history_fault("Invalid interval value"))
        bad = json_reply(400, _history_fault("invalid or missing input"))
        seg, _, token = req.query.get("neosymbol", "").partition("|")
        if not any(i.segment == seg and i.token == token for i in self._instruments.values()):
            return bad
        try:
            first = date.fromisoformat(req.query.get("fromdate", ""))
            last = date.fromisoformat(req.query.get("todate", ""))
        except ValueError:
            return bad
        if last < first or (last - first).days + 1 > HISTORY_MAX_DAYS[interval]:
            return bad
        body = {"status": "success", "interval": interval,
                "data": {"candles": history_candles(token, interval, first, last)}}  # fmt: skip
        return json_reply(200, body)

    def _scrip_file(self, req: HttpRequest) -> Reply:
        for segment, text in self._master_csv.items():
            if req.path == _scrip_file_path(segment, self._master_day):
                return Reply(200, text.encode(), "text/csv")
        return Reply(404, b"<html><body>Not Found</body></html>", "text/html")

    # ---- row builders (field names as the broker sends them) -------------------------------

    def _order_row(self, o: FakeOrder) -> dict[str, Any]:
        entered = datetime.strptime(o.entered_at, "%d-%b-%Y %H:%M:%S").replace(tzinfo=IST)
        updated = datetime.strptime(o.updated_at, "%d-%b-%Y %H:%M:%S").replace(tzinfo=IST)
        return {
            "actId": self.creds.ucc, "algId": "NA", "algCat": "NA", "algSeqNo": "NA",
            "avgPrc": _money(o.avg_price()), "brdLtQty": str(o.lot_size), "brkClnt": "NA",
            "cnlQty": o.cancelled_qty, "coPct": 0, "defMktProV": "0", "dscQtyPct": "0",
            "dscQty": o.disclosed_qty, "exUsrInfo": "NA", "exCfmTm": o.entered_at,
            "exOrdId": o.ex_ord_id, "expDt": "NA", "expDtSsb": "-", "exSeg": o.segment,
            "fldQty": o.filled_qty, "boeSec": int(updated.timestamp()), "mktProPct": "--",
            "mktPro": "0", "mfdBy": "NA", "minQty": 0, "mktProFlg": "0", "noMktProFlg": "0",
            "nOrdNo": o.n_ord_no, "optTp": "- ", "ordAutSt": "NA", "odCrt": "NA",
            "ordDtTm": o.updated_at, "ordEntTm": o.entered_at, "ordGenTp": "NA",
            "ordSrc": "NEOTRADEAPI", "ordValDt": "NA", "prod": o.product, "prc": o.price,
            "prcTp": o.order_type, "qty": o.quantity, "refLmtPrc": 0, "rejRsn": o.reject_reason,
            "rmk": "--", "rptTp": "NA", "reqId": str(o.modifications + 1), "series": o.series,
            "sipInd": "NA", "stat": "Ok", "ordSt": o.status, "stkPrc": "0.00", "sym": o.symbol,
            "symOrdId": "NA", "tckSz": f"{Decimal(o.tick):.4f}", "tok": o.token,
            "trnsTp": o.transaction_type, "trgPrc": o.trigger_price, "trdSym": o.trading_symbol,
            "unFldSz": o.unfilled if o.status not in {"cancelled", "rejected"} else 0,
            "usrId": self.creds.ucc, "uSec": str(int(entered.timestamp())), "vldt": o.validity,
            "classification": "0", "vendorCode": "", "genDen": "1", "genNum": "1",
            "prcNum": "1", "prcDen": "1", "lotSz": str(o.lot_size), "multiplier": "1",
            "precision": "2", "hsUpTm": _dt_hs(updated), "GuiOrdId": o.gui_ord_id,
            "locId": "111111111111100", "appInstlId": "NA",
            "ordModNo": str(o.modifications) if o.modifications else "", "strategyCode": "NA",
            "updRecvTm": o.updated_ns, "it": o.inst_type,
        }  # fmt: skip

    def _history_row(self, o: FakeOrder) -> dict[str, Any]:
        open_at_exchange = o.status not in {"put order req received", "validation pending",
                                            "open pending"} and o.reject_reason == "--"  # fmt: skip
        return {
            "trdSym": o.trading_symbol, "prc": o.price, "qty": o.quantity, "ordSt": o.status,
            "trnsTp": o.transaction_type, "prcTp": o.order_type, "brdLtQty": o.lot_size,
            "exch": o.segment.split("_", 1)[0].upper(), "exSeg": o.segment,
            "exchTmstp": o.updated_at if open_at_exchange else "--", "expDt": "NA",
            "tok": o.token, "nOrdNo": o.n_ord_no, "nReqId": str(o.modifications + 1),
            "sym": o.symbol, "avgPrc": _money(o.avg_price()), "algId": "NA", "algCat": "NA",
            "algSeqNo": "NA", "trgPrc": o.trigger_price, "dclQty": str(o.disclosed_qty),
            "exchOrdId": o.ex_ord_id if open_at_exchange else "NA", "rejRsn": o.reject_reason,
            "ordDur": o.validity, "prod": o.product, "rptTp": "NA", "cstFrm": "C",
            "ordSrc": "NEOTRADEAPI", "flDtTm": o.updated_at, "ordGenTp": "--",
            "scripName": o.symbol, "stkPrc": "0.00", "legOrdInd": "NA", "fldQty": o.filled_qty,
            "ordUsrMsg": "NA", "mfdBy": "XX", "unFldSz": o.unfilled, "vendorCode": "",
            "classification": "0", "prcNum": "1", "series": o.series, "genNum": "1",
            "prcDen": "1", "genDen": "1", "lotSz": str(o.lot_size), "multiplier": "1",
            "precision": "2", "mktPro": "0.00", "GuiOrdId": o.gui_ord_id, "symOrdId": "NA",
            "locId": "111111111111100", "optTp": "XX", "strategyCode": "NA", "ordValDt": "NA",
            "updRecvTm": o.updated_ns, "boeSec": o.updated_ns // 1_000_000_000,
            "uSec": str(o.updated_ns // 1_000_000),
        }  # fmt: skip

    def _trade_row(self, t: FakeTrade, o: FakeOrder) -> dict[str, Any]:
        filled = datetime.strptime(t.filled_at, "%d-%b-%Y %H:%M:%S").replace(tzinfo=IST)
        return {
            "actId": self.creds.ucc, "algCat": "NA", "algId": "NA", "avgPrc": t.price,
            "boeSec": int(filled.timestamp()), "brdLtQty": o.lot_size, "brkClnt": "NA",
            "cstFrm": "C", "exOrdId": o.ex_ord_id, "exp": "-", "expDt": "NA",
            "exSeg": o.segment, "exTm": t.filled_at, "fldQty": t.quantity,
            "flDt": filled.strftime("%d-%b-%Y"), "flId": t.fill_id, "flLeg": 1,
            "flTm": filled.strftime("%H:%M:%S"), "minQty": 0, "nOrdNo": o.n_ord_no,
            "nReqId": "1", "optTp": "- ", "ordDur": o.validity, "ordGenTp": "--",
            "prcTp": o.order_type, "prod": o.product, "rmk": "--", "rptTp": "fill",
            "series": o.series, "stkPrc": "0.00", "sym": o.symbol, "trdSym": o.trading_symbol,
            "trnsTp": o.transaction_type, "usrId": self.creds.ucc, "genDen": "1", "genNum": "1",
            "hsUpTm": _dt_hs(filled), "GuiOrdId": o.gui_ord_id, "locId": "111111111111100",
            "lotSz": str(o.lot_size), "multiplier": "1", "ordSrc": "NEOTRADEAPI",
            "prcNum": "1", "prcDen": "1", "strategyCode": "", "precision": "2", "tok": o.token,
            "updRecvTm": t.filled_ns, "uSec": str(int(filled.timestamp())), "posFlg": "",
            "prc": o.price, "qty": o.quantity, "tm": "", "it": o.inst_type,
        }  # fmt: skip

    def _position_rows(self) -> list[dict[str, Any]]:
        grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
        for t in self.state.trades:
            if self._trade_held(t.fill_id):  # positions follow the trade book
                continue
            o = self.state.orders[t.n_ord_no]
            key = (o.segment, o.token, o.product)
            pos = grouped.setdefault(key, {
                "o": o, "buy_qty": 0, "sell_qty": 0, "buy_amt": Decimal(0),
                "sell_amt": Decimal(0), "ltp": Decimal(t.price), "ts": t.filled_at,
            })  # fmt: skip
            amount = Decimal(t.price) * t.quantity
            side = "buy" if o.transaction_type in {"B", "Buy"} else "sell"
            pos[f"{side}_qty"] += t.quantity
            pos[f"{side}_amt"] += amount
            pos["ltp"], pos["ts"] = Decimal(t.price), t.filled_at
        rows = []
        for pos in grouped.values():
            o = pos["o"]
            ts = datetime.strptime(pos["ts"], "%d-%b-%Y %H:%M:%S").replace(tzinfo=IST)
            rows.append({
                "actId": self.creds.ucc, "brdLtQty": o.lot_size, "cfBuyAmt": "0.00",
                "cfSellAmt": "0.00", "cfBuyQty": "0", "cfSellQty": "0", "exSeg": o.segment,
                "buyAmt": _money(pos["buy_amt"]), "sellAmt": _money(pos["sell_amt"]),
                "flBuyQty": str(pos["buy_qty"]), "flSellQty": str(pos["sell_qty"]),
                "prod": o.product, "series": o.series, "tok": o.token, "trdSym": o.trading_symbol,
                "optTp": "XX", "stkPrc": "0.00", "type": o.inst_type, "sym": o.symbol,
                "sqrFlg": "Y", "posFlg": "true", "lotSz": str(o.lot_size), "multiplier": "1",
                "precision": "2", "prcNum": "1", "prcDen": "1", "hsUpTm": _dt_hs(ts),
                "expDt": "NA", "exp": "", "genNum": "1", "genDen": "1", "dscQty": "",
                "upldPrc": "0.00", "updRecvTm": time.time_ns(), "ltp": _money(pos["ltp"]),
            })  # fmt: skip
        return rows

    # ---- control API ----------------------------------------------------------------------

    def _control(self, req: HttpRequest) -> Reply:
        name = req.path[len("/_control/") :].rstrip("/")
        body: dict[str, Any] = {}
        if req.method == "POST" and req.body:
            try:
                body = json.loads(req.body)
            except json.JSONDecodeError as exc:
                raise _BadBody("control body must be JSON") from exc
        if req.method == "GET":
            return self._control_get(name, req)
        if name == "order_feed" or name.startswith("order_feed/"):
            return self._control_order_feed(name, body)
        if name.startswith("orders/"):
            parts = name.split("/")
            if len(parts) != 3:
                return json_reply(404, {"error": f"no control {name}"})
            return self._control_order(parts[1], parts[2], body)
        with self._lock:
            if name == "hang_next_place":
                hang = (float(body["seconds"]), bool(body.get("placed", True)))
                self._hang_next.extend([hang] * int(body.get("count", 1)))
            elif name == "release_trades":
                self._held_trades.clear()
            elif name == "fail_next_cancel":
                mode = str(body.get("mode", "timeout"))
                if mode not in {"timeout", "error"}:
                    raise _BadBody(f"mode must be timeout or error, got {mode!r}")
                count = body.get("count", 1)
                self._cancel_faults.append(CancelFault(
                    order_no=None if body.get("order_no") is None else str(body["order_no"]),
                    mode=mode, seconds=float(body.get("seconds", 3.0)),
                    status=int(body.get("status", 503)),
                    body=body.get("body", {"stat": "Not_Ok", "errMsg": "Service Unavailable"}),
                    count=None if count is None else int(count),
                    after_handling=bool(body.get("after_handling", False)),
                ))  # fmt: skip
            elif name == "empty_books":
                self._arm_empty_books(body)
            elif name == "ip_block":
                self._arm_ip_block(body)
            elif name == "clear_faults":
                self._clear_faults()
            elif name == "rewrite_tags":
                prefix = body.get("prefix")
                if prefix is not None and (not isinstance(prefix, str) or len(prefix) > 8):
                    raise _BadBody("prefix must be a string of at most 8 characters, or null (off)")
                self._rewrite_tags = prefix
            elif name == "reject_next_place":
                self._reject_next.append((str(body["reason"]), float(body.get("delay_s", 0.0))))
            elif name == "expire_session":
                for s in self.state.sessions:
                    s.expired = True
                self._save()
            elif name == "fail_next":
                self._fail_rules.append(FailRule(
                    api=str(body["api"]), status=int(body.get("status", 503)),
                    body=body.get("body", {"stat": "Not_Ok", "errMsg": "Service Unavailable"}),
                    count=int(body.get("count", 1)),
                    after_handling=bool(body.get("after_handling", False)),
                    headers=tuple((str(k), str(v)) for k, v in (body.get("headers") or {}).items()),
                    delay_s=float(body.get("delay_s", 0.0)),
                ))  # fmt: skip
            elif name == "rate_limit":
                ops, rps = body.get("orders_per_s"), body.get("requests_per_s")
                self._orders_per_s = None if ops is None else float(ops)
                self._requests_per_s = None if rps is None else float(rps)
            elif name == "reset":
                self.state = BrokerState()
                self._requests.clear()
                self._clear_faults()
                self._save()
            else:
                return json_reply(404, {"error": f"no control {name}"})
        return json_reply(200, {"ok": True})

    def _control_order_feed(self, name: str, body: dict[str, Any]) -> Reply:
        feed = self.order_feed
        if feed is None:
            return json_reply(404, {"error": "no order feed (start the fake with --order-feed)"})
        action = name.partition("/")[2]
        if action == "":
            try:
                return json_reply(200, feed.control(body))
            except (ValueError, TypeError) as exc:
                raise _BadBody(str(exc)) from exc
        if action == "release":
            feed.release()
        elif action == "drop":
            feed.drop()
        elif action == "push":
            feed.push_raw(str(body.get("frame", "")))
        else:
            return json_reply(404, {"error": f"no order-feed control {action}"})
        return json_reply(200, {"ok": True})

    def _clear_faults(self) -> None:
        self._hang_next.clear()
        self._reject_next.clear()
        self._fail_rules.clear()
        self._cancel_faults.clear()
        self._empty_books.clear()
        self._held_trades.clear()
        self._ip_block = None

    def _arm_ip_block(self, body: dict[str, Any]) -> None:
        code = body.get("code")
        if code is None:  # lift it
            self._ip_block = None
            return
        if int(code) not in IP_ERRORS:
            raise _BadBody(f"code must be one of {sorted(IP_ERRORS)} or null, got {code!r}")
        apis, count = body.get("apis"), body.get("count")
        if apis is not None and (not isinstance(apis, list) or not all(isinstance(a, str) for a in apis)):
            raise _BadBody("apis must be a list of API names or null (the order APIs)")
        self._ip_block = IpBlockRule(int(code), None if apis is None else frozenset(apis),
                                     None if count is None else int(count))  # fmt: skip

    def _arm_empty_books(self, body: dict[str, Any]) -> None:
        shape = str(body.get("shape", "no_data"))
        if shape not in {"no_data", "empty_list"}:
            raise _BadBody(f"shape must be no_data or empty_list, got {shape!r}")
        seconds = body.get("seconds")
        until = None if seconds is None else time.monotonic() + float(seconds)
        for key, api in (("order_book", "order_book"), ("trade_book", "trade_report"),
                         ("trade_report", "trade_report"), ("positions", "positions")):  # fmt: skip
            if key not in body:
                continue
            count = int(body[key])
            if count == 0:
                self._empty_books.pop(api, None)
            else:
                self._empty_books[api] = EmptyBookRule(None if count < 0 else count, until, shape)

    def _control_get(self, name: str, req: HttpRequest) -> Reply:
        with self._lock:
            if name == "health":
                return json_reply(200, {"ok": True, "pid": os.getpid(), "url": self.advertise_url})
            if name == "received":
                return json_reply(200, {"received": self.state.received})
            if name == "requests":
                api = req.query.get("api")
                rows = [r for r in self._requests if api is None or r["api"] == api]
                return json_reply(200, {"requests": rows})
            if name == "orders":
                return json_reply(200, {"orders": [self._order_row(o) for o in self.state.orders.values()]})
            if name == "trades":
                rows = [self._trade_row(t, self.state.orders[t.n_ord_no]) for t in self.state.trades]
                return json_reply(200, {"trades": rows})
            if name == "order_feed" and self.order_feed is not None:
                return json_reply(200, self.order_feed.state())
        return json_reply(404, {"error": f"no control {name}"})

    def _control_order(self, n_ord_no: str, action: str, body: dict[str, Any]) -> Reply:
        if action == "fill":
            qty = body.get("qty")
            price = body.get("price")
            row = self.fill(n_ord_no, None if qty is None else int(qty),
                            None if price is None else Decimal(str(price)),
                            trade_after_polls=int(body.get("trade_after_polls") or 0),
                            hold_trade=bool(body.get("hold_trade", False)))  # fmt: skip
            return json_reply(200, {"ok": True, "trade": row})
        with self._lock:
            order = self._find_order(n_ord_no)
            if order is None:
                return json_reply(404, {"error": f"no order {n_ord_no}"})
            if order.is_terminal:
                return json_reply(409, {"error": f"order {n_ord_no} is {order.status}"})
            if action == "reject":
                self._reject(order, str(body.get("reason", "RMS:Rejected by fake")))
            elif action == "cancel":
                self._cancel(order)
            else:
                return json_reply(404, {"error": f"no order action {action}"})
            self._save()
            return json_reply(200, {"ok": True, "order": self._order_row(order)})


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def _json_body(req: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(req.body or b"{}")
    except json.JSONDecodeError as exc:
        raise _BadBody("invalid JSON") from exc
    if not isinstance(data, dict):
        raise _BadBody("JSON body must be an object")
    return data


def _form_jdata(req: HttpRequest) -> dict[str, Any]:
    """Kotak's trading endpoints take a form body with one field, jData, holding JSON."""
    form = urllib.parse.parse_qs(req.body.decode(errors="replace"), keep_blank_values=True)
    values = form.get("jData")
    if not values:
        raise _BadBody("missing jData")
    try:
        data = json.loads(values[0])
    except json.JSONDecodeError as exc:
        raise _BadBody("jData is not JSON") from exc
    if not isinstance(data, dict):
        raise _BadBody("jData must be an object")
    return data


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class FakeKotakHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], broker_factory: Callable[[int], FakeKotakBroker],
                 *, verbose: bool = False) -> None:  # fmt: skip
        super().__init__(address, _Handler)
        self.verbose = verbose
        self.broker = broker_factory(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: FakeKotakHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK add
        # ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"kotak-fake {self.address_string()} {format % args}\n")

    def _dispatch(self, method: str) -> None:
        split = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        req = HttpRequest(
            method=method,
            path=split.path,
            query={k: v[-1] for k, v in urllib.parse.parse_qs(split.query).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=raw,
            client_ip=self.client_address[0],
        )
        try:
            reply = self.server.broker.handle(req)
        except Exception as exc:  # a bug in the fake must show up as a 500, not a hang
            reply = json_reply(500, {"stat": "Not_Ok", "errMsg": f"fake error: {exc!r}"})
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its timeout fired)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_master_arg(values: Sequence[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        segment, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--master-csv wants SEGMENT=PATH, got {value!r}")
        result[segment] = Path(path).read_text()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    defaults = FakeCredentials()
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.kotak_rest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--reset-state", action="store_true", help="ignore an existing state file")
    parser.add_argument("--advertise-url", help="baseUrl sent in totp_validate (default: own URL)")
    parser.add_argument("--consumer-key", default=defaults.consumer_key)
    parser.add_argument("--mobile", default=defaults.mobile_number)
    parser.add_argument("--ucc", default=defaults.ucc)
    parser.add_argument("--mpin", default=defaults.mpin)
    parser.add_argument("--totp-secret", default=defaults.totp_secret)
    parser.add_argument("--data-center", default="E21")
    parser.add_argument("--sfeed-url", help="served by the dynamic config service endpoint")
    parser.add_argument("--order-feed-url", help="served by the dynamic config service endpoint")
    parser.add_argument("--order-feed", action="store_true",
                        help="serve the order feed (/realtime) too, on its own port")  # fmt: skip
    parser.add_argument("--order-feed-port", type=int, default=0, help="with --order-feed; 0 = any free port")
    parser.add_argument("--master-csv", action="append", default=[], metavar="SEGMENT=PATH",
                        help="serve this CSV as the segment's scrip master (repeatable)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.reset_state and args.state_file.exists():
        args.state_file.unlink()
    creds = FakeCredentials(args.consumer_key, args.mobile, args.ucc, args.mpin, args.totp_secret)
    master_files = _parse_master_arg(args.master_csv)

    def factory(port: int) -> FakeKotakBroker:
        return FakeKotakBroker(
            args.state_file,
            credentials=creds,
            advertise_url=args.advertise_url or f"http://{args.host}:{port}",
            master_files=master_files,
            data_center=args.data_center,
            sfeed_url=args.sfeed_url,
            order_feed_url=args.order_feed_url,
        )

    server = FakeKotakHTTPServer((args.host, args.port), factory, verbose=args.verbose)
    if args.order_feed:
        print(f"kotak-fake order feed on {server.broker.attach_order_feed(args.order_feed_port)}", flush=True)
    print(f"kotak-fake listening on {server.broker.advertise_url} pid={os.getpid()}", flush=True)

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # KotakRestFake.stop/restart: the pending state is written
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.broker.flush()
        server.server_close()
    return 0


# --------------------------------------------------------------------------------------------
# Test-side helpers: launcher + control client, and the SDK transport seam
# --------------------------------------------------------------------------------------------


def pinned_origin_transport(origin: str) -> httpx.BaseTransport:
    """An httpx transport that sends every request to ``origin`` (path and query kept).

    Pass it as ``NeoAPI(..., transport=...)``. The SDK hard-codes the login host
    (``mis.kotaksecurities.com``) and the dynamic-config host (``lapi.kotaksecurities.com``);
    this re-points them, and anything else, at the fake. A custom transport also turns off
    httpx's proxy-from-environment handling, so an HTTPS_PROXY cannot bypass the pin.
    """
    import httpx

    target = httpx.URL(origin)

    class _PinnedOrigin(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.url = request.url.copy_with(scheme=target.scheme, host=target.host,
                                                port=target.port)  # fmt: skip
            request.headers["Host"] = target.netloc.decode("ascii")
            return super().handle_request(request)

    return _PinnedOrigin()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KotakRestFake:
    """Runs the fake in a subprocess and drives its control API (stdlib HTTP only)."""

    def __init__(
        self,
        state_file: Path,
        *,
        credentials: FakeCredentials | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.state_file = Path(state_file)
        self.credentials = credentials or FakeCredentials()
        self.port = port
        self.extra_args = list(extra_args)
        self.log_file = self.state_file.with_suffix(".log")
        self.control_timeout_s = 5.0  # a long chaos run on a busy machine may raise it
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> KotakRestFake:
        fixed_port = self.port is not None
        for _attempt in range(3):
            self.port = self.port if fixed_port else _free_port()
            self._spawn()
            if self._wait_ready(timeout):
                return self
            self._terminate()
        raise RuntimeError(f"Kotak fake did not start; see {self.log_file}")

    def stop(self) -> None:
        self._terminate()

    def restart(self, timeout: float = 15.0) -> None:
        """Stop and start again on the same port with the same state file."""
        self._terminate()
        self._spawn()
        if not self._wait_ready(timeout):
            raise RuntimeError(f"Kotak fake did not restart; see {self.log_file}")

    def __enter__(self) -> KotakRestFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self) -> None:
        c = self.credentials
        cmd = [
            sys.executable, "-m", "tests.fakes.kotak_rest", "--port", str(self.port),
            "--state-file", str(self.state_file), "--consumer-key", c.consumer_key,
            "--mobile", c.mobile_number, "--ucc", c.ucc, "--mpin", c.mpin,
            "--totp-secret", c.totp_secret, *self.extra_args,
        ]  # fmt: skip
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("ab")
        self._proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, ValueError):
                if self._call("GET", "health", timeout=0.5).get("ok"):
                    return True
            time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---- control API ----------------------------------------------------------------------

    def _call(self, method: str, name: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        timeout = self.control_timeout_s if timeout is None else timeout
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/_control/{name}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result: dict[str, Any] = json.loads(response.read())
                return result
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"control {name} failed: {exc.code} {exc.read()!r}") from exc

    def totp_now(self) -> str:
        return self.credentials.totp_now()

    def hang_next_place(self, seconds: float, count: int = 1, placed: bool = True) -> None:
        """The next ``count`` place_order calls are recorded, then answered after ``seconds``.
        With ``placed=False`` the order never reaches the book (answer: a late 504 page)."""
        self._call("POST", "hang_next_place", {"seconds": seconds, "count": count, "placed": placed})

    def reject_next_place(self, reason: str, delay_s: float = 0.0) -> None:
        """The next place_order is acked (nOrdNo), then rejected with ``reason`` after ``delay_s``."""
        self._call("POST", "reject_next_place", {"reason": reason, "delay_s": delay_s})

    def reject(self, order_no: str, reason: str) -> dict[str, Any]:
        row: dict[str, Any] = self._call("POST", f"orders/{order_no}/reject", {"reason": reason})["order"]
        return row

    def exchange_cancel(self, order_no: str) -> dict[str, Any]:
        row: dict[str, Any] = self._call("POST", f"orders/{order_no}/cancel", {})["order"]
        return row

    def fill(self, order_no: str, qty: int | None = None, price: Decimal | str | None = None, *,
             trade_after_polls: int = 0, hold_trade: bool = False) -> dict[str, Any]:  # fmt: skip
        """Fill ``qty`` (default: all that is open) at ``price`` (default: the limit price).

        Status before trade: the order-book row shows the fill at once (``complete``,
        ``fldQty`` = qty), while the trade book (and positions) miss the trade for the next
        ``trade_after_polls`` trade-book requests, or with ``hold_trade`` until
        ``release_trades()``."""
        body: dict[str, Any] = {"qty": qty, "price": None if price is None else str(price),
                                "trade_after_polls": trade_after_polls, "hold_trade": hold_trade}  # fmt: skip
        row: dict[str, Any] = self._call("POST", f"orders/{order_no}/fill", body)["trade"]
        return row

    def release_trades(self) -> None:
        """Every trade held back by ``fill(..., hold_trade=True)`` appears in the trade book."""
        self._call("POST", "release_trades", {})

    def fail_next_cancel(self, order_no: str | None = None, *, mode: str = "timeout",
                         seconds: float = 3.0, status: int = 503, body: Any = None,
                         count: int | None = 1, after_handling: bool = False) -> None:  # fmt: skip
        """Fail the next ``count`` cancels of ``order_no`` (None: of any order); ``count`` None
        fails every one until ``clear_faults()``. ``mode="timeout"``: the fake answers only
        after ``seconds`` (set it past the client's timeout); ``mode="error"``: ``status`` and
        ``body`` at once (a str body is sent as HTML). Unless ``after_handling``, the order
        stays live; the cancel after the last failure is handled normally."""
        payload: dict[str, Any] = {"order_no": order_no, "mode": mode, "seconds": seconds,
                                   "status": status, "count": count,
                                   "after_handling": after_handling}  # fmt: skip
        if body is not None:
            payload["body"] = body
        self._call("POST", "fail_next_cancel", payload)

    def empty_books(self, order_book: int = 1, trade_book: int = 0, positions: int = 0, *,
                    seconds: float | None = None, shape: str = "no_data") -> None:  # fmt: skip
        """Answer the next ``order_book`` order-book requests (whole book and single-order
        lookups), ``trade_book`` trade-book requests and ``positions`` positions requests as an
        empty book, while the orders really stay live. -1 = every request, for ``seconds``
        (None: until ``clear_faults()``); 0 = leave that book alone. ``shape="no_data"`` is
        Kotak's answer (``{"stat":"Not_Ok","errMsg":"No Data","stCode":5203}``);
        ``"empty_list"`` is ``{"stat":"Ok","stCode":200,"data":[]}``."""
        self._call("POST", "empty_books", {"order_book": order_book, "trade_book": trade_book,
                                           "positions": positions, "seconds": seconds,
                                           "shape": shape})  # fmt: skip

    def clear_faults(self) -> None:
        """Drop every armed fault (hangs, failures, empty books, the IP block) and release
        held-back trades."""
        self._call("POST", "clear_faults", {})

    def ip_block(self, code: int | None = ST_IP_NOT_WHITELISTED, apis: Sequence[str] | None = None,
                 count: int | None = None) -> None:  # fmt: skip
        """Kotak's static-IP rule: answer ``apis`` (None: the order APIs place/modify/cancel, the
        ones Kotak checks the IP on; or any API names, e.g. ``"order_book"``, ``"totp_login"``)
        with ``code`` -- 100008 (IP not whitelisted) or 1037 (session created from another IP) --
        for the next ``count`` requests (None: until ``clear_faults()`` or ``ip_block(None)``).
        Nothing is done for a refused request; a refused place_order shows in
        ``received_orders()`` with outcome ``ip_blocked``."""
        self._call("POST", "ip_block", {"code": code, "apis": None if apis is None else list(apis),
                                        "count": count})  # fmt: skip

    def rewrite_tags(self, prefix: str | None = "") -> None:
        """Rewrite an order's tag (``GuiOrdId``) on every modify and cancel, as Kotak does: the
        new tag is ``prefix`` followed by digits of the broker's making (``"np"`` makes it look
        like one of NeoPulse's own, so a match by tag would find nothing and call it an orphan).
        None: off (the default; ``reset`` leaves it alone, ``clear_faults`` too)."""
        self._call("POST", "rewrite_tags", {"prefix": prefix})

    def expire_session(self) -> None:
        self._call("POST", "expire_session", {})

    def fail_next(self, api: str, status: int = 503, body: Any = None, count: int = 1,
                  after_handling: bool = False, headers: dict[str, str] | None = None,
                  delay_s: float = 0.0) -> None:  # fmt: skip
        """Answer the next ``count`` calls of ``api`` with ``status``/``body`` (a str body is sent
        as HTML) and ``headers`` (e.g. ``{"Retry-After": "1"}``), ``delay_s`` late. With
        ``after_handling`` the call takes effect first (an order is placed)."""
        payload: dict[str, Any] = {"api": api, "status": status, "count": count,
                                   "after_handling": after_handling, "headers": headers or {},
                                   "delay_s": delay_s}  # fmt: skip
        if body is not None:
            payload["body"] = body
        self._call("POST", "fail_next", payload)

    def set_rate_limit(self, orders_per_s: float | None = None, requests_per_s: float | None = None) -> None:
        self._call("POST", "rate_limit", {"orders_per_s": orders_per_s, "requests_per_s": requests_per_s})

    def reset(self) -> None:
        self._call("POST", "reset", {})

    def received_orders(self) -> list[dict[str, Any]]:
        """Every place_order request the fake received, with its outcome and nOrdNo."""
        rows: list[dict[str, Any]] = self._call("GET", "received")["received"]
        return rows

    def requests(self, api: str | None = None) -> list[dict[str, Any]]:
        """Broker requests (not control calls): ``ts`` (epoch s), ``mono``, method, path, api."""
        query = "" if api is None else "?" + urllib.parse.urlencode({"api": api})
        rows: list[dict[str, Any]] = self._call("GET", f"requests{query}")["requests"]
        return rows

    def orders(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "orders")["orders"]
        return rows

    def trades(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "trades")["trades"]
        return rows

    def order(self, order_no: str) -> dict[str, Any]:
        return next(o for o in self.orders() if o["nOrdNo"] == order_no)

    def iter_orders_with_tag(self, tag: str) -> Iterator[dict[str, Any]]:
        return (o for o in self.orders() if o["GuiOrdId"] == tag)

    # ---- the order feed (the fake started with --order-feed) -------------------------------

    def order_feed(self, **controls: Any) -> dict[str, Any]:
        """Set order-feed controls (tests/fakes/kotak_orderfeed.py ``FeedControls``); with none,
        just read its URL, controls and counters."""
        if not controls:
            return self._call("GET", "order_feed")
        return self._call("POST", "order_feed", controls)

    def order_feed_release(self) -> None:
        self._call("POST", "order_feed/release", {})

    def order_feed_drop(self) -> None:
        self._call("POST", "order_feed/drop", {})

    def order_feed_push(self, frame: str) -> None:
        self._call("POST", "order_feed/push", {"frame": frame})


if __name__ == "__main__":
    raise SystemExit(main())
