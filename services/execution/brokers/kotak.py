"""``KotakBroker``: the Broker contract (brokers/base.py) on Kotak Neo's official SDK.

Every call is synchronous and blocking; execution runs them in its thread pool (``inline`` is
False). One ``NeoAPI`` client is shared by all pool threads (httpx is thread-safe); its login
state is mutable, so logins happen under a lock that new calls wait on. The wire rules live
in ``kotak_protocol.py``; the facts behind them in docs/kotak-rest.md.

Decisions a reviewer should know about
--------------------------------------
* **Session.** TOTP login (code from ``kotak.totp_secret``) then MPIN validate, lazily on the
  first call or explicitly with ``login()``. When a reply says the session is gone (403
  ``100022``, "Authentication Failed", the SDK's "Complete the 2fa process", ...) the broker
  logs in once more and repeats the call once. Credentials the broker refuses are not retried
  on their own (``KotakLoginError`` until ``login()`` is called): repeated wrong MPINs lock the
  account. A refused TOTP is retried once with the next 30 s code (window edge or reuse).
* **place_order is never re-sent blindly.** A timeout, a non-JSON reply, a 5xx or any reply
  we cannot read raises ``BrokerUnknown``: the order may be live, and reconciliation finds it
  by ``client_tag`` (= the SDK's ``tag``, echoed as ``GuiOrdId``). The one exception is an
  expired session: Kotak checks the session before it looks at the order and answers with an
  explicit refusal (403 ``100022``), and the SDK's own "not logged in" answer means nothing
  was sent. Only then do we log in again, check the order book for the tag (belt and braces:
  if it is there, that is the ack), and place it once more. Nothing else leads to a second
  send, and a second refusal is final (``BrokerRejected``).
* **A reply counts as a refusal only when it carries a broker code** (``stCode`` that is not
  5xx). A body without one (a gateway's JSON, an unknown shape) is "unknown" for a place: an
  order wrongly called rejected could stay live at the broker unwatched, while one wrongly
  called unknown costs one reconciliation.
* **Rate limits.** ``execution.orders_per_sec`` for place/modify/cancel and
  ``execution.requests_per_sec`` for every request (logins included). Callers block for a
  token; a token is held for the whole call and comes back one second after the call ended
  (ratelimit.py), so Kotak never counts more than the limit in any second, jitter or not. A
  429 on a place is a refusal (not placed): ``BrokerRejected``.
* **Order shapes.** Only LIMIT (``L``) and stop-limit (``SL``) are sent; market and SL-M
  intents are refused locally (Kotak rejects them from API sessions, and execution turns market
  intent into a protected limit before it gets here). Prices go as strings with the tick's
  decimals, checked against the instrument master when it knows the instrument.
* **Status source: the order feed, polling as reconciliation.** After every login the SDK's
  order feed (``create_order_feed``, kotak_orderfeed.py) is (re)opened with the new session.
  While it is LIVE, ``drain_events()`` returns its order frames as ``BrokerOrderStatus``
  (execution is woken per batch, so no poll interval is waited) and reads the order book only
  every ``execution.reconcile_s`` and right after the feed came (back) up. Whenever it is not
  LIVE, ``drain_events()`` reads the order book every call, as before (execution calls it every
  second). **Fills:** the feed has ``fldQty``/``avgPrc`` but no trade ids, so a filled quantity
  ahead of the trades seen makes the same call read the trade book at once; trades are only
  ever taken from the trade book (Kotak's ``flId``), so the feed and polling cannot count a
  fill twice (and the engine drops a trade id it has seen). A feed frame never moves an order
  back: a status after a final one (COMPLETE, CANCELLED, REJECTED) or a smaller filled
  quantity (a state resent on reconnect, out of order) is dropped; the books stay the source
  of truth (the feed does not replay gaps). In sandbox mode (``kotak.base_url``) the feed's URL
  must be given (``kotak.order_feed_url``, or the session's own on the sandbox host).
* **Static IP** (Kotak's rule since 2026-04-01: orders only from a whitelisted static IP, in a
  session created from that IP). ``100008`` (IP not whitelisted) and ``1037`` (session from
  another IP) are neither a session expiry nor a passing error: the call raises
  ``BrokerIpBlocked`` (no re-login, no second send) and an episode starts (``ip_block()``).
  Only the order calls are read that way: Kotak does not IP-check reads or logins, so an IP
  code on a read is taken for a session problem (one re-login, at most once a minute). While an
  episode is open, no order call is sent (they raise ``BrokerIpBlocked`` locally) and no lazy
  login either when the login itself was refused; reads go on. A login is no proof that the
  block is gone (Kotak never IP-checks one); only an order call that passes Kotak's IP check
  is. So the probe (``probe_ip_block()``, run by the service, at most once per ``IP_PROBE_S``
  step, each failed probe one step on whatever failed) logs in into a new client outside the
  session lock (Kotak needs a new session after an IP change; one from the right IP cures
  1037), swaps it in only when that worked, and then lets exactly one order call through: a
  real one if it comes within ``IP_TRIAL_WAIT_S``, else a cancel of ``PROBE_ORDER_NO``, which no
  order can have (Kotak checks the IP before it looks the order up). The refusal lasts until
  that call's answer is not the IP code. A fresh process does the same with its first order
  call: the others wait for its answer instead of going out as a batch. A login refused for
  the IP ``LOGIN_IP_REFUSALS_MAX`` times in an episode, or refused for the credentials during a
  probe, stops the probing (it could lock the account) and says to check the consumer key.
* **Daily login** (``login_if_due()``, which the service calls every few seconds): on trading days
  (libs/common/calendar.py, NSE) at ``kotak.login_at`` (IST) the broker logs in afresh, unless it
  already logged in that day (a lazy login, or a restart that logged in on its first call): never
  twice in a row without need. A login that fails for a passing reason (timeout, 5xx, rate limit)
  is tried again after ``LOGIN_RETRY_S`` (the last step repeating), also by lazy logins, which wait
  out the same backoff instead of trying every poll. A refused TOTP is tried again the same way at
  most ``LOGIN_TOTP_TRIES`` times a day (a skewed clock or a reused code heals, a wrong secret does
  not); a refused MPIN or missing credentials never (``KotakLoginError`` until ``login()`` or a
  restart). While a login has failed and none has succeeded since, ``session_refusal()`` says why
  and execution refuses new orders with it ("not logged in"). Every successful login asks Kotak
  which IP it sees (``whatsmyip``, logged and shown by ``session_info()`` in ``neopulse status``)
  and calls the ``on_login`` hooks (execution re-leases the market feed's session from them).
  The session (the SDK's tokens of that login, not the credentials) is kept in
  ``$NEOPULSE_HOME/run/kotak-session.json`` (mode 0600, written atomically, never logged) for the
  trading day: a restart during the day takes it back, checks it with one order-book read, and
  logs in only when Kotak refuses it. A logout, a refused login or another account removes it.
* **Logout** (``logout()``, or ``logout_if_due()`` which the service calls periodically) only
  clears the SDK's tokens: in SDK 3.0.9 ``logout()`` does not call the server, and Kotak ends
  sessions itself at the end of the day. After it, calls raise ``BrokerTemporary`` for the
  rest of that trading day unless ``login()`` is called again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pyotp

from libs.common.calendar import default_calendar
from libs.common.clock import IST, Clock, trading_day
from libs.common.config import ConfigError, ExecutionConfig, KotakConfig
from libs.common.instruments import Instrument, MasterData
from libs.common.log import get_logger
from libs.common.messages import MAX_QTY
from libs.common.sdk import import_sdk
from services.execution.brokers import kotak_history
from services.execution.brokers.base import (
    BrokerAck,
    BrokerError,
    BrokerIpBlocked,
    BrokerOrder,
    BrokerOrderStatus,
    BrokerPosition,
    BrokerRejected,
    BrokerTemporary,
    BrokerTrade,
    BrokerUnknown,
    IpBlock,
    error_reason,
)
from services.execution.brokers.kotak_orderfeed import OrderFeed, realtime_url
from services.execution.brokers.kotak_protocol import (
    IP_CODES,
    MAYBE_DONE,
    ST_SESSION_IP_MISMATCH,
    Kind,
    OrderRefused,
    Verdict,
    carried_position,
    classify,
    ip_block_words,
    order_status,
    place_args,
    price_text,
    rows,
    trade,
)
from services.execution.brokers.ratelimit import RateLimiter

BrokerEvent = BrokerOrderStatus | BrokerTrade
SFEED_DEFAULT_URL = "wss://sfeed.kotaksecurities.com/apifeed"
_TOTP_REFUSED_WORDS = ("totp", "otp")
# While Kotak refuses orders from this IP: seconds before each probe (a fresh login, then one
# order call), the last one repeating. Every failed probe moves one step on. The fix texts
# (kotak_protocol.IP_BLOCK_WORDS) promise a login "within two minutes": keep the last step there.
IP_PROBE_S = (30.0, 60.0, 120.0)
# The probe's harmless order call: a cancel of an order number no order can have (Kotak's start
# with the date). Kotak checks the IP before it looks the order up, so any answer but the IP code
# (the fake's: 1021 "order not found") shows the IP check passed.
PROBE_ORDER_NO = "0"
# After the probe's login, how long a real order call may take the one trial before the probe
# sends its own cancel.
IP_TRIAL_WAIT_S = 0.5
# Kotak does not IP-check logins: a login refused for the IP this often in one episode is more
# likely a consumer-key problem, and probing stops.
LOGIN_IP_REFUSALS_MAX = 3
# A read answered with an IP code (Kotak does not IP-check reads): at most one re-login per this.
READ_IP_RELOGIN_S = 60.0
# The SDK configuration fields that make a logged-in session (``totp_login`` / ``totp_validate``
# set them): kept for the day in the saved session file, never the credentials.
_SESSION_FIELDS = ("edit_token", "edit_sid", "edit_rid", "data_center", "base_url", "ucc", "feed_url",
                   "rt_url", "sid", "view_token")  # fmt: skip
# Kinds of an order-call answer that show the IP check passed (Kotak answered the order itself).
_PAST_IP_CHECK = frozenset({Kind.OK, Kind.REFUSED})
# A failed login for a passing reason (or a refused TOTP): seconds before the next try, the last
# step repeating. Lazy logins wait the same, so a failing login is never hammered.
LOGIN_RETRY_S = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# Logins whose TOTP Kotak refused, per day, before the scheduled login gives up (each already
# tried the next 30 s code once): a wrong secret must not be sent again and again.
LOGIN_TOTP_TRIES = 3
_FINAL = frozenset({"COMPLETE", "REJECTED", "CANCELLED"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class KotakLoginError(BrokerTemporary):
    """Kotak refused our credentials (or some are missing). Not retried automatically:
    repeated wrong MPINs lock the account. Fix the config, then call ``login()``. ``step`` is
    the login step Kotak refused ("TOTP login", "MPIN validate"; "" for a local problem)."""

    step = ""


class PinnedOriginTransport(httpx.HTTPTransport):
    """Sends every request to one origin, keeping path and query (sandbox/test mode).

    The SDK hard-codes its login host and its config-service host; with this transport
    (``NeoAPI(transport=...)``) nothing it sends can leave for anywhere but ``origin``. A custom
    transport also turns off httpx's proxy-from-environment handling, so a proxy cannot
    bypass the pin."""

    def __init__(self, origin: str) -> None:
        super().__init__()
        self._target = httpx.URL(origin)
        if self._target.scheme not in {"http", "https"} or not self._target.host:
            raise ConfigError(f"config error: `kotak.base_url` must be an http(s) origin, got {origin!r}")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = self._target
        request.url = request.url.copy_with(scheme=t.scheme, host=t.host, port=t.port)
        request.headers["Host"] = t.netloc.decode("ascii")
        return super().handle_request(request)


class _IpGate:
    """One episode at a time of Kotak refusing orders from this IP, and the one order call that
    may test it; thread-safe (pool threads record and check, the loop reads ``block``). See
    "Static IP" in the module docstring."""

    def __init__(self, schedule: tuple[float, ...], clock: Clock, log: Any, *, first_wait_s: float) -> None:
        self.schedule = schedule or IP_PROBE_S
        self.clock, self.log = clock, log
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.block: IpBlock | None = None
        self._episodes = 0
        self._misses = 0  # failed probes in this episode (the probe's backoff step)
        self._probe_at = 0.0
        self._probing = False
        self._login_refused = False  # the refusal came from a login: no lazy login either
        self.login_ip_refusals = 0  # logins refused for the IP in this episode
        self.stopped = ""  # why the probe stopped for this episode ("" while it goes on)
        self._verified = False  # an order call passed Kotak's IP check (since start / the last episode)
        self._slot = False  # a probe login let one order call through; nobody has taken it yet
        self._trial = False  # that one order call (or a fresh process's first) is out
        self._probe_trial = False  # ... and it is a probe's (its failure moves the probe on)
        self._first_wait_s = first_wait_s

    def _step(self) -> float:
        return self.schedule[min(self._misses, len(self.schedule) - 1)]

    def starts_episode(self, code: int) -> bool:
        block = self.block
        return block is None or block.code != code

    def record(self, verdict: Verdict, raw: Any, ip: str, *, at_login: bool, trial: bool) -> BrokerIpBlocked:
        """Kotak refused a call for the IP. ``trial``: the one order call let through after a
        probe login (or a fresh process's first), so a failed probe: one step on."""
        code = verdict.code or 0
        reason, fix = ip_block_words(code, verdict.reason, ip)
        with self._cond:
            block, fresh = self.block, self.block is None
            probe_trial = trial and self._probe_trial
            if block is None or block.code != code:
                self._episodes += 1
                block = IpBlock(episode=self._episodes, code=code, reason=reason, fix=fix, ip=ip,
                                since_ns=self.clock.now_ns(), note=self.stopped)  # fmt: skip
                self.log.error("kotak_ip_blocked", code=code, broker_reason=verdict.reason, ip=ip,
                               episode=block.episode)  # fmt: skip
            if fresh:
                self._misses = 0
                self.login_ip_refusals, self.stopped = 0, ""
            elif probe_trial:
                self._misses += 1
                self.log.warning("kotak_ip_still_blocked", code=code, episode=block.episode,
                                 probe_in_s=self._step())  # fmt: skip
            if fresh or probe_trial:
                self._probe_at = time.monotonic() + self._step()
            if at_login:
                self._login_refused = True
                self.login_ip_refusals += 1
            if trial:
                self._trial = self._probe_trial = False
            self._slot = self._verified = False
            self.block = block
            self._cond.notify_all()
        return BrokerIpBlocked(block.summary, code=code, fix=block.fix, raw=raw)

    def _refusal(self, block: IpBlock) -> BrokerIpBlocked:
        return BrokerIpBlocked(f"{block.summary} (not sent)", code=block.code, fix=block.fix)

    def check_order(self) -> bool:
        """Before an order call. While an episode is open: raise (nothing is sent), except for the
        one call a probe login lets through. Before any order call has passed the IP check (a
        fresh process): the first goes alone and the rest wait for its answer (at most
        ``first_wait_s``). True when this call is that one trial: report its answer with
        ``trial_answer`` (or ``record(trial=True)`` for an IP refusal)."""
        deadline = time.monotonic() + self._first_wait_s
        with self._cond:
            while True:
                block = self.block
                if block is not None:
                    if self._slot and not self._trial:
                        self._slot, self._trial, self._probe_trial = False, True, True
                        self._cond.notify_all()  # the probe waiting in slot_open
                        return True
                    raise self._refusal(block)
                if self._verified:
                    return False
                if not self._trial:
                    self._trial = True
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False  # the first call is taking long: do not hold the others forever
                self._cond.wait(left)

    def trial_answer(self, passed: bool, why: str) -> None:
        """The trial's answer, other than an IP refusal: past Kotak's IP check (the episode is
        over) or not (a timeout, a 5xx, no session...: during an episode a failed probe)."""
        with self._cond:
            probe_trial = self._probe_trial
            self._trial = self._probe_trial = False
            block = self.block
            if passed:
                self._verified = True
                self.block = None
                self._misses, self._login_refused = 0, False
                self.login_ip_refusals, self.stopped = 0, ""
            elif block is not None and probe_trial:
                self._probe_failed_locked(why)
            self._cond.notify_all()
        if passed and block is not None:
            self.log.warning("kotak_ip_block_cleared", code=block.code, episode=block.episode)

    def check_login(self) -> None:
        """Before a lazy login: raise while refusing because a login was refused for the IP."""
        block = self.block
        if block is not None and self._login_refused:
            raise self._refusal(block)

    def probe_due(self) -> bool:
        block = self.block
        due = time.monotonic() >= self._probe_at
        return block is not None and not self.stopped and not self._probing and due

    def claim_probe(self) -> bool:
        with self._lock:
            if not self.probe_due():
                return False
            self._probing = True
            self._probe_at = time.monotonic() + self._step()  # a probe never runs twice in a step
            return True

    def probe_done(self) -> None:
        self._probing = False

    def _probe_failed_locked(self, why: str) -> None:
        self._misses += 1
        self._probe_at = time.monotonic() + self._step()
        self.log.warning("kotak_ip_probe_failed", error=why, probe_in_s=self._step())

    def probe_failed(self, why: str) -> None:
        """The probe's login failed (any reason): one step on."""
        with self._lock:
            if self.block is not None:
                self._probe_failed_locked(why)

    def stop_probing(self, note: str) -> None:
        """No more probes this episode (they would not help, or could lock the account)."""
        with self._lock:
            block = self.block
            if block is None or self.stopped:
                return
            self.stopped = note
            self.block = msgspec.structs.replace(block, note=note)
        self.log.error("kotak_ip_probe_stopped", code=block.code, episode=block.episode, note=note)

    def probe_login_ok(self) -> bool:
        """The probe's login worked: let one order call through (the refusal stays until that
        call passes the IP check). False when no episode is open any more."""
        with self._cond:
            block = self.block
            if block is None:
                return False
            self._login_refused = False
            self._slot = True
            self._cond.notify_all()
        self.log.info("kotak_ip_probe_login", code=block.code, episode=block.episode)
        return True

    def slot_open(self, wait_s: float = 0.0) -> bool:
        """Whether the probe's one order call is still untaken (waiting up to ``wait_s`` for a
        real order call to take it)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._slot and self.block is not None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._slot and self.block is not None


@dataclass(frozen=True, slots=True)
class _Seen:
    status: str
    filled: int
    avg: Decimal | None
    reason: str


def _mobile(number: str) -> str:
    digits = number.strip().replace(" ", "")
    if digits.isdigit() and len(digits) == 10:
        return "+91" + digits
    if digits.isdigit() and len(digits) == 12 and digits.startswith("91"):
        return "+" + digits
    return digits


def _hhmm(text: str, key: str = "execution.logout_at", example: str = "15:45") -> tuple[int, int] | None:
    if not text.strip():
        return None  # no daily logout / login
    try:
        hh, mm = (int(x) for x in text.strip().split(":"))
    except ValueError:
        raise ConfigError(f"config error: `{key}` must look like {example}, got {text!r}") from None
    return hh, mm


class KotakBroker:
    """Implements ``brokers.base.Broker`` against Kotak Neo (or the fake, via ``kotak.base_url``)."""

    name = "kotak"
    inline = False  # blocking HTTP: execution calls it from its thread pool

    def __init__(  # noqa: PLR0915 - one statement per piece of the broker's state
        self, kotak: KotakConfig, execution: ExecutionConfig, master: MasterData | None = None,
                 clock: Clock | None = None, log: Any = None, *,
                 ip_probe_s: tuple[float, ...] = IP_PROBE_S, ip_trial_wait_s: float = IP_TRIAL_WAIT_S,
                 login_retry_s: tuple[float, ...] = LOGIN_RETRY_S, totp_window_wait: bool = True,
                 session_file: Path | None = None,
                 ) -> None:  # fmt: skip
        if kotak.environment != "prod":
            # In "uat" the SDK ignores the validate reply's baseUrl, so nothing could be pinned.
            raise ConfigError(f"config error: `kotak.environment` must be prod, got {kotak.environment!r}")
        sdk = import_sdk()
        self.cfg = kotak
        self.execution = execution
        self.master = master
        self.clock = clock or Clock()
        self.log = log or get_logger("execution.kotak")
        self.sandbox = bool(kotak.base_url)
        # After a place of unknown outcome, how long the book may still lack the order.
        self.book_lag_s = execution.book_lag_s or max(30.0, 3 * execution.broker_timeout_s)
        self._logout_at = _hhmm(execution.logout_at)
        self._sdk = sdk
        self._client = self._new_client()
        self._retired: list[Any] = []  # clients a probe's login replaced (closed in close())
        self.orders_limiter = RateLimiter(execution.orders_per_sec, name="orders")
        self.requests_limiter = RateLimiter(execution.requests_per_sec, name="requests")
        self.history_budget = kotak_history.CallBudget(kotak.history_calls_per_min)
        self._session_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._session_gen = 0
        self._logged_in = False
        self._login_error: KotakLoginError | None = None
        self._logged_out_day = ""
        self._seen: dict[str, _Seen] = {}
        self._seen_trades: set[str] = set()
        self._traded_qty: dict[str, int] = {}
        self._book_filled: dict[str, int] = {}
        self._seen_day = trading_day(self.clock)
        # An order call waits this long for a fresh process's first order call (its lazy login
        # may wait out a TOTP window) before it goes anyway.
        first_wait = 2 * execution.broker_timeout_s + 35.0
        self._ip = _IpGate(ip_probe_s, self.clock, self.log, first_wait_s=first_wait)
        self._ip_trial_wait_s = ip_trial_wait_s
        self._ip_lookup_lock = threading.Lock()  # one whatsmyip per episode, however many were refused
        self._read_ip_relogin_at = 0.0
        # The daily session (see "Daily login" in the module docstring).
        self._login_at = _hhmm(kotak.login_at, "kotak.login_at", "08:45")
        self._login_retry_s = login_retry_s or LOGIN_RETRY_S
        # False (tests against the fake only): a refused TOTP is sent again without waiting for
        # the next 30 s window
        self._totp_window_wait = totp_window_wait
        self.calendar = default_calendar()
        self.on_login: list[Callable[[], None]] = []  # called after every login, under the session lock
        self.public_ip = ""  # the IP Kotak saw at the last login (whatsmyip), "" before / unknown
        self._login_day = ""  # the trading day of the last successful login
        self._login_ok_ns = 0
        self._login_failures = 0  # failed logins since the last success
        self._login_failure = ""  # why the last one failed
        self._login_retry_at = 0.0  # monotonic: no login before this (after a failure)
        self._totp_refusals: dict[str, int] = {}  # trading day -> logins whose TOTP Kotak refused
        self._login_stopped = ""  # why the scheduled login gave up today ("" while it goes on)
        self._session_file = session_file
        self._restore_tried = False  # a fresh process looks for a saved session once
        self._restored_gen = -1  # the session generation taken back from the saved file
        self.order_feed = OrderFeed(self.log)
        self._book_due = 0.0  # with the order feed LIVE: when drain_events reads the order book next
        self._feed_live_since = 0.0  # the LIVE period the last book read covered

    def _new_client(self) -> Any:
        k = self.cfg
        return self._sdk.NeoAPI(
            consumer_key=k.consumer_key, environment=k.environment, timeout=self.execution.broker_timeout_s,
            transport=PinnedOriginTransport(k.base_url) if self.sandbox else None,
        )  # fmt: skip

    # ------------------------------------------------------------------ static IP

    def ip_block(self) -> IpBlock | None:
        """Kotak refuses orders from this machine's IP (100008 / 1037), or None."""
        return self._ip.block

    def ip_probe_due(self) -> bool:
        return self._ip.probe_due()

    def probe_ip_block(self) -> bool:
        """While Kotak refuses orders from this IP, at most once per probe step: log in into a new
        client (outside the session lock; it replaces the current one only if the login worked),
        then let exactly one order call through -- a real one if it comes within the trial wait,
        else a cancel of ``PROBE_ORDER_NO``. Blocking: run it in the pool. True when that call
        passed Kotak's IP check (the episode is over); every failure moves the probe one step on."""
        if not self._ip.claim_probe():
            return False
        try:
            return self._probe()
        finally:
            self._ip.probe_done()

    def _probe(self) -> bool:
        block = self._ip.block
        self.log.info("kotak_ip_probe", code=block.code if block else None)
        try:
            if self._login_error is not None:
                raise self._login_error
            self._check_not_logged_out()
            client = self._new_client()
            self._login_into(client, sticky=False)
        except BrokerIpBlocked as exc:  # recorded (at_login) by _refuse_login
            self._ip.probe_failed(exc.reason)
            self._stop_if_login_keeps_refusing()
            return False
        except KotakLoginError as exc:  # credentials refused: another try could lock the account
            self._ip.probe_failed(exc.reason)
            self._ip.stop_probing(f"the probe's login was refused ({exc.reason}): check kotak.consumer_key, "
                                  "kotak.mpin and kotak.totp_secret, then restart execution")  # fmt: skip
            return False
        except BrokerError as exc:
            self._ip.probe_failed(exc.reason)
            return False
        with self._session_lock:
            self._adopt(client)
        if not self._ip.probe_login_ok():
            return self._ip.block is None
        if self._ip.slot_open(self._ip_trial_wait_s):  # no real order call took it: our harmless one
            with contextlib.suppress(BrokerError):
                self._send(lambda: self._client.cancel_order(order_id=PROBE_ORDER_NO), order=True)
        return self._ip.block is None

    def _stop_if_login_keeps_refusing(self) -> None:
        n = self._ip.login_ip_refusals
        block = self._ip.block
        if n < LOGIN_IP_REFUSALS_MAX or block is None or self._ip.stopped:
            return
        note = (f"Kotak refused the login itself {n} times with {block.code}, and Kotak does not IP-check "
                "logins: check the consumer key (kotak.consumer_key) and the IP, then restart execution")
        self._ip.stop_probing(note)
        if not self._logged_in:  # no session to keep: every call says so until the restart
            self._login_error = KotakLoginError(f"Kotak login refused for the IP: {note}")

    def _ip_refused(self, verdict: Verdict, reply: Any, *, at_login: bool = False,
                    trial: bool = False) -> BrokerIpBlocked:  # fmt: skip
        """Kotak refused a call for the static-IP rule: record it (asking Kotak once per episode
        which IP it sees, for the operator) and return the error to raise."""
        code = verdict.code or 0
        if code == ST_SESSION_IP_MISMATCH:  # a session tied to another IP: a restart must not take it back
            self._drop_saved_session()
        with self._ip_lookup_lock:
            block = self._ip.block
            ip = self._public_ip() if self._ip.starts_episode(code) else ""
            if not ip and block is not None:
                ip = block.ip
            return self._ip.record(verdict, _safe(reply), ip, at_login=at_login, trial=trial)

    def _public_ip(self) -> str:
        """This machine's public IP as Kotak sees it (``whatsmyip``), or "" (best effort)."""
        try:
            with self.requests_limiter.hold():
                reply = self._client.whatsmyip()
            data = reply.get("data") if isinstance(reply, dict) else None
            row = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
            ip = str(row.get("ip") or "").strip()
        except Exception:  # noqa: BLE001 - only a hint for the alert; never fail the call for it
            return ""
        return ip if len(ip) <= 45 and all(c in "0123456789abcdefABCDEF.:" for c in ip) else ""

    # ------------------------------------------------------------------ session

    def login(self) -> None:
        """Log in now (TOTP + MPIN). Clears a previous credential refusal or day logout."""
        with self._session_lock:
            self._login_error = None
            self._logged_out_day = ""
            self._login_locked()

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    def logout(self) -> None:
        """End of day: drop the session tokens. Calls fail until ``login()`` or the next day."""
        with self._session_lock:
            if self._logged_in:
                self._client.logout()  # local only in SDK 3.0.9: clears edit_token/edit_sid
            self._logged_in = False
            self._logged_out_day = trading_day(self.clock)
            self._drop_saved_session()
        self.order_feed.stop("logged out")
        self.log.info("kotak_logout", day=self._logged_out_day)

    def logout_if_due(self) -> bool:
        """Log out once per day at ``execution.logout_at`` (IST). Returns True when it did."""
        now = self.clock.now(IST)
        if self._logout_at is None:
            return False
        today = now.strftime("%Y-%m-%d")
        if (now.hour, now.minute) < self._logout_at or self._logged_out_day == today:
            return False
        self.logout()
        return True

    def _session(self) -> int:
        """Wait out a login in progress; log in if needed. Returns the session generation."""
        with self._session_lock:
            if self._login_error is not None:
                raise self._login_error
            self._check_not_logged_out()
            if not self._logged_in:
                self._ip.check_login()  # a login refused for the IP waits for the probe
                self._check_login_backoff()
                try:
                    self._login_locked()
                except BrokerIpBlocked:
                    self._stop_if_login_keeps_refusing()
                    raise
            return self._session_gen

    def _check_login_backoff(self) -> None:
        """Before a lazy login: raise while the backoff after a failed login runs."""
        left = self._login_retry_at - time.monotonic()
        if left > 0:
            raise BrokerTemporary(f"not logged in to Kotak: the last login failed ({self._login_failure}); "
                                  f"next try in {left:.0f} s")  # fmt: skip

    def _check_not_logged_out(self) -> None:
        if self._logged_out_day and self._logged_out_day == trading_day(self.clock):
            raise BrokerTemporary(f"logged out for the day at {self.execution.logout_at}; "
                                  "call login() to trade again")  # fmt: skip

    def _relogin(self, seen_gen: int, why: str) -> None:
        """Log in again unless another thread already did since ``seen_gen``."""
        with self._session_lock:
            if self._login_error is not None:
                raise self._login_error
            self._check_not_logged_out()
            if self._session_gen != seen_gen and self._logged_in:
                return
            self._ip.check_login()
            self._check_login_backoff()
            self.log.warning("kotak_session_expired", reason=why)
            self._logged_in = False
            try:
                self._login_locked()
            except BrokerIpBlocked:
                self._stop_if_login_keeps_refusing()
                raise

    def _login_locked(self) -> None:
        if self._restore_locked():
            return
        try:
            self._login_into(self._client, sticky=True)
        except BrokerError as exc:
            self._login_failed(exc)
            raise
        self._session_gen += 1
        self._logged_in = True
        self._login_error = None
        self._logged_in_now(probe=False, save=True)

    # ------------------------------------------------------------------ the saved session

    def _session_key(self) -> str:
        """Which account a saved session belongs to (a digest: no credential on disk)."""
        return hashlib.sha256(f"{self.cfg.consumer_key}|{self.cfg.ucc}".encode()).hexdigest()[:16]

    def _save_session(self, ip: str) -> None:
        """Save the session for a restart today, with the IP Kotak saw at its login ("" unknown)."""
        path = self._session_file
        if path is None:
            return
        conf = self._client.configuration
        data = {"day": trading_day(self.clock), "key": self._session_key(), "ip": ip,
                "tokens": {k: getattr(conf, k, None) for k in _SESSION_FIELDS}}  # fmt: skip
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            tmp.chmod(0o600)
            tmp.replace(path)
        except OSError as exc:  # the next restart logs in instead: no harm
            self.log.warning("kotak_session_not_saved", error=f"{type(exc).__name__}: {exc.strerror}")

    def _drop_saved_session(self) -> None:
        if self._session_file is not None:
            with contextlib.suppress(OSError):
                self._session_file.unlink(missing_ok=True)

    def _restore_locked(self) -> bool:
        """A fresh process's first login: take back today's saved session of this account if
        Kotak still accepts it (one order-book read), instead of logging in. Under the lock."""
        if self._restore_tried or self._session_file is None:
            return False
        self._restore_tried = True
        try:
            saved = json.loads(self._session_file.read_text())
        except (OSError, ValueError):
            return False
        tokens = saved.get("tokens") if isinstance(saved, dict) else None
        if (not isinstance(tokens, dict) or saved.get("day") != trading_day(self.clock)
                or saved.get("key") != self._session_key() or not tokens.get("edit_token")):  # fmt: skip
            self._drop_saved_session()
            return False
        conf = self._client.configuration
        for k in _SESSION_FIELDS:
            value = tokens.get(k)
            setattr(conf, k, value if isinstance(value, str) else None)
        try:
            conf.resolve_dynamic_urls(self._client.api_client.rest_client)
            with self.requests_limiter.hold():
                reply = self._client.order_report()
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiException on transport errors
            reply = {"Error": exc}
        verdict = classify(reply)
        # Kotak ties a session to the IP that made it, but does not check it on reads: a session
        # made from another IP would answer this read and refuse the first order (1037).
        saved_ip = saved.get("ip") if isinstance(saved.get("ip"), str) else ""
        ip = self._public_ip() if verdict.kind in (Kind.OK, Kind.EMPTY) else ""
        if verdict.kind not in (Kind.OK, Kind.EMPTY) or (saved_ip and ip and ip != saved_ip):
            reason = verdict.reason if not ip else f"made from {saved_ip}, this machine is now {ip}"
            self.log.info("kotak_saved_session_refused", kind=str(verdict.kind), reason=reason)
            for k in _SESSION_FIELDS:
                setattr(conf, k, None)
            self._drop_saved_session()
            return False
        self._session_gen += 1
        self._logged_in = True
        self._login_error = None
        self._restored_gen = self._session_gen
        self.log.info("kotak_session_reused", day=saved.get("day"))
        self._logged_in_now(probe=False, ip=ip)
        return True

    def _login_failed(self, exc: BrokerError) -> None:
        """Count a failed login and set the backoff before the next one (under the session lock)."""
        if isinstance(exc, BrokerIpBlocked):
            return  # the static-IP gate and its probe own this one
        self._login_failures += 1
        self._login_failure = exc.reason
        step = self._login_retry_s[min(self._login_failures - 1, len(self._login_retry_s) - 1)]
        self._login_retry_at = time.monotonic() + step
        if isinstance(exc, KotakLoginError) and exc.step == "TOTP login":
            day = trading_day(self.clock)
            self._totp_refusals[day] = self._totp_refusals.get(day, 0) + 1
        self.log.warning("kotak_login_failed", failures=self._login_failures, error=exc.reason,
                         retry_in_s=step)  # fmt: skip

    def _logged_in_now(self, *, probe: bool, save: bool = False, ip: str = "") -> None:
        """A login worked (under the session lock): ask Kotak which IP it sees (unless ``ip`` is
        known already), save the session with it (``save``), reset the failure count, and call
        the ``on_login`` hooks."""
        self._login_day = trading_day(self.clock)
        self._login_ok_ns = self.clock.now_ns()
        failures, self._login_failures, self._login_failure = self._login_failures, 0, ""
        self._login_retry_at = 0.0
        self._login_stopped = ""
        ip = ip or self._public_ip()
        if ip:
            self.public_ip = ip
        if save:
            self._save_session(ip)
        self.log.info("kotak_login", session=self._session_gen, sandbox=self.sandbox, ip=ip or None,
                      after_failures=failures or None, probe=probe or None)  # fmt: skip
        self._open_order_feed()  # the feed authenticates with this session's token
        for hook in list(self.on_login):
            try:
                hook()
            except Exception as exc:  # noqa: BLE001 - a hook must never fail a login
                self.log.warning("kotak_on_login_hook_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ daily login

    def login_if_due(self) -> bool:
        """The scheduled daily login (blocking: run it in the pool, every few seconds). On a trading
        day from ``kotak.login_at`` until ``execution.logout_at``: log in unless a login already
        worked today, or the backoff after a failed one has not passed. True when it logged in."""
        if self._restored_session_refused_by_feed():
            return True
        if self._login_at is None:
            return False
        now = self.clock.now(IST)
        today = now.strftime("%Y-%m-%d")
        if not self.calendar.is_trading_day("NSE", now.date()) or (now.hour, now.minute) < self._login_at:
            return False
        if self._logout_at is not None and (now.hour, now.minute) >= self._logout_at:
            return False  # the day's session is over (logout_if_due)
        if not self._daily_login_wanted(today):
            return False
        with self._session_lock:
            # Again under the lock: a lazy login may have finished (or been refused) meanwhile,
            # and a refused MPIN must never be sent a second time.
            if not self._daily_login_wanted(today):
                return False
            self.log.info("kotak_daily_login", day=today, login_at=self.cfg.login_at,
                          attempt=self._login_failures + 1)  # fmt: skip
            self._login_error = None
            self._logged_in = False
            self._login_locked()
        return True

    def _restored_session_refused_by_feed(self) -> bool:
        """A session taken back from the saved file that the order feed refuses (REST still
        answers on it) is replaced by a fresh login, once: otherwise the day would run on
        polling until the next morning's login."""
        if not (self._logged_in and self._restored_gen == self._session_gen
                and self.order_feed.health.session_refused and self._ip.block is None):  # fmt: skip
            return False
        with self._session_lock:
            if self._restored_gen != self._session_gen or not self._logged_in:
                return False
            self._restored_gen = -1
            self.log.warning("kotak_saved_session_refused_by_order_feed",
                             note="logging in afresh for the order feed")  # fmt: skip
            self._logged_in = False
            self._login_locked()
        return True

    def _daily_login_wanted(self, today: str) -> bool:
        """Whether the daily login should try now: not logged out or stopped for the day, not
        logged in today, no backoff running, no refusal a retry could make worse (a wrong MPIN
        sent again and again locks the account), no static-IP block (its probe logs in)."""
        if self._logged_out_day == today or self._login_stopped:
            return False
        if (self._logged_in and self._login_day == today) or time.monotonic() < self._login_retry_at:
            return False
        error = self._login_error
        if error is not None:
            if error.step != "TOTP login":  # MPIN refused, credentials missing: could lock the account
                self._login_stopped = (f"{error.reason}: not retried (wrong MPINs again and again lock the "
                                       "account); fix the kotak settings and restart execution")  # fmt: skip
                self.log.error("kotak_login_stopped", reason=self._login_stopped)
                return False
            if self._totp_refusals.get(today, 0) >= LOGIN_TOTP_TRIES:
                self._login_stopped = (f"{error.reason}: Kotak refused the TOTP {LOGIN_TOTP_TRIES} times "
                                       "today; check kotak.totp_secret and this machine's clock, then "
                                       "restart execution")  # fmt: skip
                self.log.error("kotak_login_stopped", reason=self._login_stopped)
                return False
        return self._ip.block is None

    def session_refusal(self) -> str:
        """Why new orders must be refused for the session ("not logged in: ..."), or "" (a login
        failed and none has worked since; or the credentials were refused)."""
        if self._logged_in:
            return ""
        if self._login_stopped:
            return f"not logged in to Kotak: {self._login_stopped}"
        if self._login_error is not None and self._login_failures:
            return f"not logged in to Kotak: {self._login_error.reason}"
        if self._login_failures:
            left = max(0.0, self._login_retry_at - time.monotonic())
            return (f"not logged in to Kotak: the login failed {self._login_failures} time(s), last: "
                    f"{self._login_failure}; next try in {left:.0f} s")  # fmt: skip
        return ""

    def session_info(self) -> dict[str, Any]:
        """The session for the heartbeat and ``neopulse status`` (no secret in it)."""
        return {
            "logged_in": self._logged_in, "login_day": self._login_day, "login_ok_ns": self._login_ok_ns,
            "ip": self.public_ip, "login_at": self.cfg.login_at, "login_failures": self._login_failures,
            "login_error": self._login_failure or (self._login_error.reason if self._login_error else ""),
            "login_stopped": self._login_stopped, "session": self._session_gen,
        }  # fmt: skip

    def _adopt(self, client: Any) -> None:
        """A client whose login worked becomes the session (under the session lock)."""
        self._retired.append(self._client)
        while len(self._retired) > 1:  # two probe steps old: nothing can still be in flight on it
            self._close_client(self._retired.pop(0))
        self._client = client
        self._session_gen += 1
        self._logged_in = True
        self._login_error = None
        self._logged_in_now(probe=True, save=True)

    def _login_into(self, client: Any, *, sticky: bool) -> None:
        """TOTP login and MPIN validate on ``client``. ``sticky``: a refusal of the credentials
        is kept (``_login_error``) until ``login()``; the probe's is not (its old session stays)."""
        c = self.cfg
        missing = [f"kotak.{k}" for k in ("consumer_key", "mobile", "ucc", "mpin", "totp_secret")
                   if not getattr(c, k)]  # fmt: skip
        if missing:
            self._login_error = KotakLoginError(f"Kotak credentials missing: {', '.join(missing)}")
            raise self._login_error
        try:
            totp = pyotp.TOTP(c.totp_secret.replace(" ", "").upper())
            totp.now()
        except Exception:  # noqa: BLE001 - pyotp raises binascii/ValueError/TypeError for bad secrets
            self._login_error = KotakLoginError("kotak.totp_secret is not a valid base32 TOTP secret")
            raise self._login_error from None
        view = self._totp_login(client, totp)
        if view is not None and self._is_totp_refusal(view):
            # The code may have been at the edge of its window, or already used: next window.
            if self._totp_window_wait:
                self._wait_next_totp_window(totp)
            view = self._totp_login(client, totp)
        if view is not None:
            self._refuse_login("TOTP login", view, sticky=sticky)
        try:
            with self.requests_limiter.hold(2):  # validate also fetches the SDK's dynamic config
                reply = client.totp_validate(mpin=c.mpin)
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiException on transport errors
            raise BrokerTemporary(f"Kotak MPIN validate failed: {_reason(exc)}") from None
        data = reply.get("data") if isinstance(reply, dict) else None
        if not (isinstance(data, dict) and data.get("kType") == "Trade" and data.get("status") == "success"):
            self._refuse_login("MPIN validate", reply, sticky=sticky)

    def _totp_login(self, client: Any, totp: pyotp.TOTP) -> Any:
        """Returns None on success, else the reply."""
        if totp.interval - time.time() % totp.interval < 2:
            self._wait_next_totp_window(totp)  # a code about to expire may arrive stale
        counter = int(time.time() // totp.interval)
        try:
            with self.requests_limiter.hold():
                reply = client.totp_login(mobile_number=_mobile(self.cfg.mobile), ucc=self.cfg.ucc,
                                                totp=totp.at(counter * totp.interval))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiException on transport errors
            raise BrokerTemporary(f"Kotak TOTP login failed: {_reason(exc)}") from None
        data = reply.get("data") if isinstance(reply, dict) else None
        if isinstance(data, dict) and data.get("kType") == "View":
            return None
        return reply

    @staticmethod
    def _wait_next_totp_window(totp: pyotp.TOTP) -> None:
        time.sleep(totp.interval - time.time() % totp.interval + 0.05)

    @staticmethod
    def _is_totp_refusal(reply: Any) -> bool:
        verdict = classify(reply)
        return any(w in verdict.reason.lower() for w in _TOTP_REFUSED_WORDS)

    def _refuse_login(self, step: str, reply: Any, *, sticky: bool = True) -> None:
        verdict = classify(reply)
        if verdict.kind is Kind.IP_BLOCKED:  # never sticky at once, never retried here
            raise self._ip_refused(verdict, reply, at_login=True)
        if verdict.kind in MAYBE_DONE or verdict.kind is Kind.RATE_LIMITED:
            raise BrokerTemporary(f"Kotak {step} failed: {verdict.reason}", raw=_safe(reply))
        why = verdict.reason or "no reason given"
        error = KotakLoginError(f"Kotak {step} refused: {why}", raw=_safe(reply))
        error.step = step
        if sticky:
            self._login_error = error
            self._drop_saved_session()
        self.log.error("kotak_login_refused", step=step, reason=verdict.reason, sticky=sticky)
        raise error

    # ------------------------------------------------------------------ plumbing

    def _send(self, call: Callable[[], Any], *, order: bool) -> tuple[Verdict, Any, int]:
        """One SDK call under the rate limits, the session gate and (for order calls) the
        static-IP gate. A static-IP refusal raises ``BrokerIpBlocked``."""
        trial = self._ip.check_order() if order else False  # during a block nothing is sent
        settled = not trial
        try:
            gen = self._session()  # before taking tokens: a login needs request tokens itself
            orders = self.orders_limiter.hold() if order else contextlib.nullcontext()
            with orders, self.requests_limiter.hold():
                try:
                    reply = call()
                except Exception as exc:  # noqa: BLE001 - the SDK should not raise; treat it as its error dict
                    reply = {"Error": exc}
            verdict = classify(reply, ip_checked=order)  # Kotak IP-checks only the order calls
            if verdict.kind is Kind.IP_BLOCKED:
                settled = True
                raise self._ip_refused(verdict, reply, trial=trial)
            if trial:
                settled = True
                self._ip.trial_answer(verdict.kind in _PAST_IP_CHECK, f"{verdict.kind}: {verdict.reason}")
        except BaseException as exc:
            if not settled:  # the trial got no answer at all (no session, ...): a failed probe
                self._ip.trial_answer(False, error_reason(exc))
            raise
        return verdict, reply, gen

    def _request(self, what: str, call: Callable[[], Any], *, order: bool = False) -> tuple[Verdict, Any]:
        """A call that is safe to repeat: on an expired session, log in again and repeat once."""
        verdict, reply, gen = self._send(call, order=order)
        if verdict.kind is Kind.SESSION and verdict.code in IP_CODES:  # a read: Kotak does not IP-check it
            now = time.monotonic()
            if now < self._read_ip_relogin_at:
                raise BrokerTemporary(f"{what}: Kotak {verdict.code} ({verdict.reason}) on a call it does "
                                      "not IP-check; logged in again less than a minute ago",
                                      raw=_safe(reply))  # fmt: skip
            self._read_ip_relogin_at = now + READ_IP_RELOGIN_S
        if verdict.kind is Kind.SESSION:
            self._relogin(gen, f"{what}: {verdict.reason}")
            verdict, reply, _ = self._send(call, order=order)
            if verdict.kind is Kind.SESSION:
                raise BrokerTemporary(f"{what}: session refused again after re-login: {verdict.reason}",
                                      raw=_safe(reply))  # fmt: skip
        return verdict, reply

    def _instrument(self, segment: str, token: str) -> Instrument | None:
        return self.master.get(segment, token) if self.master is not None else None

    # ------------------------------------------------------------------ Broker: orders

    def place(self, order: BrokerOrder) -> BrokerAck:
        try:
            args = place_args(order, self._instrument(order.segment, order.token))
        except OrderRefused as exc:
            raise BrokerRejected(f"refused before sending: {exc}") from None

        def send() -> Any:
            return self._client.place_order(**args)

        try:
            verdict, reply, gen = self._send(send, order=True)
        except BrokerIpBlocked:  # static IP: not placed, not re-sent, no re-login
            raise
        except BrokerError as exc:  # no session and none to be had: nothing was sent
            raise BrokerRejected(f"not sent: {exc.reason}", raw=exc.raw) from None
        if verdict.kind is Kind.SESSION:
            verdict, reply = self._place_after_session_refusal(order, send, gen, verdict)
            if isinstance(reply, BrokerAck):
                return reply
        return self._place_outcome(order, verdict, reply)

    def _place_after_session_refusal(self, order: BrokerOrder, send: Callable[[], Any], gen: int,
                                     refusal: Verdict) -> tuple[Verdict, Any]:  # fmt: skip
        """The broker said the session is invalid, so it did not take the order. Log in again;
        if the tag is (unexpectedly) in the book, that order is the ack; otherwise send once more."""
        tag = order.client_tag
        self.log.warning("kotak_place_session_refused", client_tag=tag, reason=refusal.reason)
        try:
            self._relogin(gen, f"place_order: {refusal.reason}")
            existing = self.find_by_tag(tag)
        except BrokerIpBlocked:
            raise
        except BrokerError as exc:
            raise BrokerRejected(f"not placed: session expired ({refusal.reason}) and could not be "
                                 f"restored: {exc.reason}") from None  # fmt: skip
        if existing is not None:
            self.log.warning("kotak_place_found_after_refusal", client_tag=tag,
                             broker_order_id=existing.broker_order_id)  # fmt: skip
            return Verdict(Kind.OK), BrokerAck(broker_order_id=existing.broker_order_id, raw=existing.raw)
        try:
            verdict, reply, _ = self._send(send, order=True)
        except BrokerIpBlocked:
            raise
        except BrokerError as exc:
            raise BrokerRejected(f"not sent: {exc.reason}", raw=exc.raw) from None
        if verdict.kind is Kind.SESSION:
            raise BrokerRejected(f"not placed: session refused again after re-login: {verdict.reason}",
                                 raw=_safe(reply))  # fmt: skip
        return verdict, reply

    def _place_outcome(self, order: BrokerOrder, verdict: Verdict, reply: Any) -> BrokerAck:
        tag = order.client_tag
        if verdict.kind is Kind.OK:
            order_no = str(reply.get("nOrdNo") or "").strip()
            if order_no:
                self.log.info("kotak_place_ack", client_tag=tag, broker_order_id=order_no)
                return BrokerAck(broker_order_id=order_no, raw=_safe(reply))
            raise BrokerUnknown(f"place_order said Ok without an order number: {reply!r}", raw=_safe(reply))
        if verdict.kind in MAYBE_DONE or verdict.kind is Kind.EMPTY:
            self.log.error("kotak_place_unknown", client_tag=tag, kind=str(verdict.kind),
                           reason=verdict.reason)  # fmt: skip
            raise BrokerUnknown(f"place_order outcome unknown ({verdict.kind}): {verdict.reason}",
                                raw=_safe(reply))  # fmt: skip
        if verdict.kind is Kind.RATE_LIMITED:
            reason = f"not placed: broker rate limit ({verdict.reason})"
        else:  # REFUSED, INVALID
            reason = verdict.reason
        self.log.warning("kotak_place_rejected", client_tag=tag, reason=reason, code=verdict.code)
        raise BrokerRejected(reason, raw=_safe(reply))

    def cancel(self, broker_order_id: str) -> None:
        verdict, reply = self._request(
            "cancel_order", lambda: self._client.cancel_order(order_id=broker_order_id), order=True
        )
        self._order_call_outcome("cancel", broker_order_id, verdict, reply)

    def modify(self, broker_order_id: str, *, quantity: int | None = None, price: Decimal | None = None,
               trigger_price: Decimal | None = None) -> None:  # fmt: skip
        """Kotak's modify takes the whole order (price, type, quantity, validity, trigger), so the
        current row is read first and only the given fields change. ``quantity`` is the new
        total (it must cover what is already filled)."""
        current = self._order_row(broker_order_id)
        if current is None:
            raise BrokerRejected(f"order {broker_order_id} is not in the order book")
        status = order_status(current)
        if status.status in {"COMPLETE", "REJECTED", "CANCELLED"}:
            raise BrokerRejected(f"order {broker_order_id} is already {status.status}", raw=current)
        pt = str(current.get("prcTp") or "L")
        if pt not in {"L", "SL"}:
            raise BrokerRejected(f"order {broker_order_id} has type {pt}; only L and SL are modified")
        inst = self._instrument(str(current.get("exSeg") or ""), str(current.get("tok") or ""))
        tick = inst.tick_size if inst is not None and inst.tick_size > 0 else _tick_of(current)
        new_qty = status.quantity if quantity is None else quantity
        new_price = Decimal(str(current.get("prc"))) if price is None else price
        trigger = trigger_price
        if pt == "SL" and trigger is None:
            trigger = Decimal(str(current.get("trgPrc") or "0"))
        if new_qty <= status.filled_qty:
            raise BrokerRejected(f"quantity {new_qty} must exceed the filled quantity {status.filled_qty}")
        for label, value in (("price", new_price), ("trigger", trigger if pt == "SL" else None)):
            if value is not None and (value <= 0 or (tick is not None and tick > 0 and value % tick)):
                raise BrokerRejected(f"{label} {value} is not a positive multiple of tick size {tick}")
        args = {
            "order_id": broker_order_id, "price": price_text(new_price, tick), "order_type": pt,
            "quantity": str(new_qty), "validity": str(current.get("vldt") or "DAY"),
            "trigger_price": price_text(trigger, tick) if pt == "SL" and trigger is not None else "0",
        }  # fmt: skip
        verdict, reply = self._request("modify_order", lambda: self._client.modify_order(**args), order=True)
        self._order_call_outcome("modify", broker_order_id, verdict, reply)

    def _order_call_outcome(self, what: str, broker_order_id: str, verdict: Verdict, reply: Any) -> None:
        if verdict.kind is Kind.OK:
            self.log.info(f"kotak_{what}_ok", broker_order_id=broker_order_id)
            return
        if verdict.kind in {Kind.REFUSED, Kind.INVALID}:
            self.log.warning(f"kotak_{what}_rejected", broker_order_id=broker_order_id, reason=verdict.reason)
            raise BrokerRejected(verdict.reason, raw=_safe(reply))
        # Modify and cancel carry absolute values: repeating them is harmless.
        raise BrokerTemporary(f"{what} {broker_order_id}: {verdict.kind}: {verdict.reason}", raw=_safe(reply))

    # ------------------------------------------------------------------ Broker: books

    def _book(self, what: str, call: Callable[[], Any]) -> list[dict[str, Any]]:
        verdict, reply = self._request(what, call)
        if verdict.kind is Kind.OK:
            return rows(reply)
        if verdict.kind is Kind.EMPTY:  # "No Data": an empty book, not an error
            return []
        raise BrokerTemporary(f"{what}: {verdict.kind}: {verdict.reason}", raw=_safe(reply))

    def order_book(self) -> list[BrokerOrderStatus]:
        """Today's orders at Kotak, newest first, mapped to our states."""
        return [order_status(r) for r in self._book("order_report", self._client.order_report)]

    def trade_book(self) -> list[BrokerTrade]:
        """Today's fills (one row per fill; ``trade_id`` is Kotak's unique ``flId``)."""
        out = []
        for row in self._book("trade_report", self._client.trade_report):
            t = trade(row)
            if t is not None:
                out.append(t)
        return out

    def _order_row(self, broker_order_id: str) -> dict[str, Any] | None:
        found = self._book("order_report", lambda: self._client.order_report(order_id=broker_order_id))
        return next((r for r in found if str(r.get("nOrdNo")) == broker_order_id), None)

    def find_by_tag(self, client_tag: str) -> BrokerOrderStatus | None:
        """The broker's order carrying ``client_tag`` (reconciliation after ``BrokerUnknown``)."""
        key = client_tag.strip().lower()
        matches = [s for s in self.order_book() if s.client_tag.strip().lower() == key]
        if len(matches) > 1:
            self.log.error("kotak_duplicate_tag", client_tag=client_tag,
                           broker_order_ids=[m.broker_order_id for m in matches])  # fmt: skip
        return matches[0] if matches else None

    def positions(self) -> list[dict[str, Any]]:
        """Kotak's net positions: ``segment``, ``token``, ``symbol``, ``product``, ``quantity``
        (net, carry-forward included), ``buy_amount``, ``sell_amount`` (Decimal)."""
        out = []
        for r in self._book("positions", self._client.positions):
            def q(key: str, row: dict[str, Any] = r) -> int:
                return int(Decimal(str(row.get(key) or "0")))

            net = q("cfBuyQty") + q("flBuyQty") - q("cfSellQty") - q("flSellQty")
            def amount(key: str, row: dict[str, Any] = r) -> Decimal:
                return Decimal(str(row.get(key) or "0"))

            out.append({
                "segment": r.get("exSeg"), "token": str(r.get("tok")), "symbol": r.get("trdSym"),
                "product": r.get("prod"), "quantity": net,
                "buy_amount": amount("buyAmt") + amount("cfBuyAmt"),
                "sell_amount": amount("sellAmt") + amount("cfSellAmt"),
            })  # fmt: skip
        return out

    def carried_positions(self) -> list[BrokerPosition]:
        """Positions carried from earlier days (NRML / CNC), from Kotak's positions."""
        rows_ = self._book("positions", self._client.positions)
        return [p for p in (carried_position(r) for r in rows_) if p is not None]

    # ------------------------------------------------------------------ order feed, status polling

    def _open_order_feed(self) -> None:
        """(Re)open the order feed with the session just made (under the session lock)."""
        if not self.cfg.order_feed:
            self.order_feed.stop("order feed off (kotak.order_feed = false)")
            return
        client = self._client
        conf = client.configuration
        base = "" if self.sandbox else str(conf.base_url or "")  # sandbox: only a URL it was given
        url = realtime_url(self.cfg.order_feed_url, str(conf.order_feed_url or ""),
                           str(conf.rt_url or ""), base)  # fmt: skip
        host = httpx.URL(url).host if url.startswith(("ws://", "wss://")) else ""
        if not host:
            self.order_feed.stop("no order-feed URL for this session")
            return
        if self.sandbox and host not in _LOOPBACK and host != httpx.URL(self.cfg.base_url).host:
            self.order_feed.stop(f"sandbox: order-feed host {host} is not the sandbox host")
            return

        def factory() -> Any:
            return client.create_order_feed(url=url, max_reconnect_attempts=0, max_connect_retries=0,
                                            reconnect_delay=0)  # fmt: skip

        self.order_feed.open(factory)

    def set_wake(self, wake: Callable[[], None] | None) -> None:
        """``wake`` is called (on the feed thread) when the order feed brought something, or went
        down: the caller should run ``drain_events()`` soon."""
        self.order_feed.wake = wake

    def order_feed_status(self) -> dict[str, Any]:
        """The order feed's state (LIVE / DOWN / polling), why it is not LIVE, and counters."""
        return self.order_feed.status()

    def drain_events(self) -> list[BrokerEvent]:
        """What changed since the previous call: new fills (``BrokerTrade``) first, then order
        rows whose status, filled quantity, average price or reason moved
        (``BrokerOrderStatus``). The first call returns the whole day.

        Same meaning as ``PaperBroker.drain_events``, but blocking: call it from the pool, every
        second or so, and when ``set_wake``'s callback fires. With the order feed LIVE it
        returns the feed's rows and reads the order book only every ``execution.reconcile_s``
        (and once the feed came up); otherwise it reads the order book every call. The trade
        book is read whenever a filled quantity is ahead of the fills seen. ``BrokerTemporary``
        means "try again next time"; nothing is lost, because the next call reads the books (the
        order book too, when this call had taken rows off the feed's queue)."""
        with self._poll_lock:
            today = trading_day(self.clock)
            if self._logged_out_day == today:
                self.order_feed.take()
                return []  # logged out for the day on purpose: nothing to poll, nothing to warn
            if not self._logged_in and self._login_at is not None:
                # The daily login (login_if_due) owns logging in: a poll every second must not
                # log in at midnight, on a holiday, or again and again while Kotak is down.
                self.order_feed.take()
                return []
            if today != self._seen_day:
                self._seen.clear()
                self._seen_trades.clear()
                self._traded_qty.clear()
                self._book_filled.clear()
                self._seen_day = today
                self._book_due = 0.0
            rows, lost = self.order_feed.take()  # before the book: the book is newer than these
            live_since = self.order_feed.health.live_since
            now = time.monotonic()
            from_feed = (self.order_feed.live and not lost and now < self._book_due
                         and live_since == self._feed_live_since)  # fmt: skip
            if from_feed:
                statuses = [s for s in (order_status(r) for r in rows) if self._feed_moves(s)]
                for s in statuses:
                    self._book_filled[s.broker_order_id] = s.filled_qty
            else:
                statuses = list(reversed(self.order_book()))  # oldest first
                self._book_due = now + self.execution.reconcile_s
                self._feed_live_since = live_since
                for s in statuses:
                    self._book_filled[s.broker_order_id] = s.filled_qty
            events: list[BrokerEvent] = []
            if any(filled > self._traded_qty.get(oid, 0) for oid, filled in self._book_filled.items()):
                try:
                    trades = self.trade_book()
                except BrokerError:
                    if from_feed:  # the feed's rows are off its queue: the next call reads the book
                        self._book_due = 0.0
                    raise
                for t in trades:
                    if t.trade_id in self._seen_trades:
                        continue
                    self._seen_trades.add(t.trade_id)
                    oid = t.broker_order_id
                    self._traded_qty[oid] = self._traded_qty.get(oid, 0) + t.quantity
                    events.append(t)
            for s in statuses:
                seen = _Seen(s.status, s.filled_qty, s.avg_price, s.reason)
                if self._seen.get(s.broker_order_id) != seen:
                    self._seen[s.broker_order_id] = seen
                    events.append(s)
            return events

    def _feed_moves(self, s: BrokerOrderStatus) -> bool:
        """Whether a feed row may change what we know: never back from a final status, never to a
        smaller filled quantity (a resent or late frame)."""
        if not s.broker_order_id:
            return False
        if (not 0 <= s.filled_qty <= MAX_QTY or s.quantity > MAX_QTY
                or 0 < s.quantity < s.filled_qty):  # fmt: skip
            # malformed (1e30, more filled than ordered): taking it as the known filled quantity
            # would make every later, true row of the order look stale
            self.log.warning("kotak_order_feed_bad_row", broker_order_id=s.broker_order_id,
                             quantity=s.quantity, filled=s.filled_qty)  # fmt: skip
            return False
        prev = self._seen.get(s.broker_order_id)
        if prev is None:
            return True
        if (prev.status in _FINAL and s.status != prev.status) or s.filled_qty < prev.filled:
            self.log.info("kotak_order_feed_stale_row", broker_order_id=s.broker_order_id, status=s.status,
                          known=prev.status, filled=s.filled_qty, known_filled=prev.filled)  # fmt: skip
            return False
        return True

    # ------------------------------------------------------------------ feed lease, master

    def feed_session(self) -> dict[str, str]:
        """What the feed needs to open SFeed for this session (``GetFeedSession``):
        ``SFeedWebSocket(url=..., user=..., auth=...)``. ``user`` is the UCC and ``auth`` the
        session's ``edit_sid`` (docs/kotak-sfeed.md §1). No trading token is handed out."""
        self._session()
        conf = self._client.configuration
        url = self.cfg.sfeed_url or conf.sfeed_websocket_url or conf.feed_url or ""
        if not url:
            if self.sandbox:  # never hand a sandbox session the real broker's address
                raise BrokerTemporary("no SFeed URL for this sandbox session (set kotak.sfeed_url)")
            url = SFEED_DEFAULT_URL
        return {"url": str(url), "user": str(conf.ucc or self.cfg.ucc), "auth": str(conf.edit_sid or ""),
                "issued_ns": str(self.clock.now_ns())}  # fmt: skip

    def scrip_master_urls(self) -> list[str]:
        """The day's scrip-master CSV URLs (needs only the consumer key, no login)."""
        try:
            with self.requests_limiter.hold():
                reply = self._client.scrip_master()
        except Exception as exc:  # noqa: BLE001 - the SDK may raise ApiException here
            raise BrokerTemporary(f"scrip_master: {_reason(exc)}") from None
        paths = reply.get("filesPaths") if isinstance(reply, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            verdict = classify(reply)
            raise BrokerTemporary(f"scrip_master: {verdict.kind}: {verdict.reason}", raw=_safe(reply))
        return list(paths)

    def historical_candles(self, segment: str, token: str, interval: str, first_day: Any,
                           last_day: Any) -> list[list[Any]]:  # fmt: skip
        """One ``historical_data()`` call: ``interval`` candles (Kotak's spelling: ``1min``,
        ``D``...) of the IST days ``first_day..last_day`` (``datetime.date``, within Kotak's
        range limit), as ``[ts_ns, open, high, low, close, volume, oi]`` rows. Counted against
        ``kotak.history_calls_per_min``; raises ``kotak_history.HistoryError`` (a 429 blocks the
        budget for its Retry-After and never logs in again)."""
        kh = kotak_history
        budget = self.history_budget
        wait = budget.take()
        if wait > 0:
            raise kh.HistoryRateLimited(
                f"history budget of {budget.per_min} calls/min (kotak.history_calls_per_min) spent", wait
            )
        from_date, to_date = kh.request_range(first_day, last_day, interval)
        # The endpoint needs only the consumer key, but may answer only on the session's host
        # (``baseUrl``): log in if need be, except after the day's logout, when the host the
        # last session gave is still set (history is fetched after the close).
        if not (self._logged_out_day and getattr(self._client.configuration, "base_url", None)):
            self._session()
        try:
            with self.requests_limiter.hold():
                reply = self._client.historical_data(neosymbol=f"{segment}|{token}", interval=interval,
                                                     from_date=from_date, to_date=to_date)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiException on timeouts and network errors
            raise kh.HistoryUnavailable(f"historical_data: {_reason(exc)}") from None
        try:
            return kh.read_reply(reply, first_day, last_day)
        except kh.HistoryRateLimited as exc:
            budget.back_off(exc.retry_after_s)
            self.log.warning("history_rate_limited", instrument=f"{segment}|{token}",
                             retry_after_s=exc.retry_after_s)  # fmt: skip
            raise

    def http_client(self) -> httpx.Client:
        """An httpx client on the same transport rules as the SDK (pinned in sandbox mode)."""
        transport = PinnedOriginTransport(self.cfg.base_url) if self.sandbox else None
        return httpx.Client(transport=transport, timeout=max(30.0, self.execution.broker_timeout_s),
                            follow_redirects=True)  # fmt: skip

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.order_feed.close()
        for client in (*self._retired, self._client):
            self._close_client(client)

    @staticmethod
    def _close_client(client: Any) -> None:
        rest = getattr(getattr(client, "api_client", None), "rest_client", None)
        if rest is not None:
            rest.close()


def _tick_of(row: dict[str, Any]) -> Decimal | None:
    try:
        tick = Decimal(str(row.get("tckSz") or "0"))
    except ArithmeticError:
        return None
    return tick if tick > 0 else None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", "") or exc.__class__.__name__)


def _safe(reply: Any) -> Any:
    """A reply as JSON-able data for the ledger's raw payloads (exceptions become text)."""
    if isinstance(reply, dict):
        return {str(k): _safe(v) for k, v in reply.items()}
    if isinstance(reply, list):
        return [_safe(v) for v in reply]
    if isinstance(reply, BaseException):
        return f"{reply.__class__.__name__}: {_reason(reply)}"
    if reply is None or isinstance(reply, (str, int, float, bool)):
        return reply
    return str(reply)


__all__ = ["KotakBroker", "KotakLoginError", "PinnedOriginTransport"]
