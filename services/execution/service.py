"""Execution service: the ``ExecutionEngine`` wired to the bus, the ledger and a broker.

* ROUTER ``execution_rep``: ``ExecuteOrder`` (answered once the ``PENDING_BROKER`` row is
  committed; a burst is committed in one transaction), ``ExecuteBasket`` (every leg's row
  and the ``baskets`` row in one transaction, answered after it), ``Flatten``, ``CancelEntries``,
  ``GetPositions``, ``GetOrders``, ``GetDayState``, ``GetFeedSession``, ``SyncMaster``,
  ``FetchHistory`` (one chunk of Kotak candles, on a worker of its own), ``RecordRiskEvent``,
  ``GetStatus``.
* PUB ``execution_pub``: ``order.<sid>.`` OrderUpdate, ``fill.<sid>.`` Fill,
  ``position.<sid>.`` Position, ``alert.execution.`` Alert, ``hb.execution.``.
* SUB feed ``tick.``: paper fills, marks, prices for market intent and flatten.
* Broker calls: the paper broker runs inline on the loop; a real broker's calls run in a
  ``ThreadPoolExecutor(execution.pool_workers)`` and come back via ``call_soon_threadsafe``.
  Its order status is polled every ``STATUS_POLL_S`` from the pool, and at once when the
  broker's push channel (Kotak's order feed) wakes us; the feed's state is in the heartbeat
  (``order_feed``) and announced when it goes down and comes back.
* Reconciliation at startup and every ``execution.reconcile_s``.

``NEOPULSE_TEST_CRASH_AT`` (tests only, ignored unless set): ``after_pending`` kills the
process with SIGKILL right after the PENDING commit and before the broker call;
``after_broker`` right after the broker accepted an order and before the ack is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from libs.common.bus import Responder, Server, topic
from libs.common.clock import Clock
from libs.common.config import Config
from libs.common.instruments import MasterData
from libs.common.messages import (
    Alert,
    CancelEntries,
    ExecuteBasket,
    ExecuteOrder,
    FetchHistory,
    Flatten,
    GetDayState,
    GetFeedSession,
    GetOrders,
    GetPositions,
    GetStatus,
    Message,
    RecordRiskEvent,
    Reply,
    SyncMaster,
    Tick,
    to_builtins,
)
from libs.common.security import GUARDED_COMMANDS, SenderCheck
from libs.common.service import Service
from services.execution.brokers.base import Broker, BrokerIpBlocked, InlineBroker, LiveBroker, error_reason
from services.execution.brokers.kotak_orderfeed import LIVE, FeedAnnouncer
from services.execution.embedded_pg import Database, DatabaseError, open_database
from services.execution.engine import ExecutionEngine, Intent, PlaceIntent, run_intent
from services.execution.ledger import PgOrderStore, connect
from services.execution.model import LEG_PURPOSES, OrderQuery
from services.execution.store import LedgerError

FLUSH_DELAY_S = 0.002  # acks and fills wait this long for the next PENDING commit to share it
STATUS_POLL_S = 1.0  # real brokers: order-book poll while running (the paper broker pushes)
DUE_CHECK_S = 0.25
LOGIN_CHECK_S = 5.0  # real brokers: how often the daily login looks whether it is due
LEDGER_CHECK_S = 0.25  # how often the loop looks for a lost ledger (and a dead embedded postmaster)
# A ledger call with no answer for this long fails (server frozen). A write's is below risk's
# per-attempt ExecuteOrder timeout (2/5 of bus.request_timeout_ms), so even the order that meets
# a frozen server is answered "ledger unavailable" within risk's budget.
LEDGER_WRITE_DEADLINE_S = 1.5
LEDGER_READ_DEADLINE_S = 5.0
RECOVER_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)  # between reconnect attempts (then the last)
RECOVER_CONNECT_TIMEOUT_S = 2
LEDGER_LOG_EVERY_S = 10.0
CRASH_ENV = "NEOPULSE_TEST_CRASH_AT"


def live_guard(cfg: Config, live: bool) -> str | None:
    """Why execution must not start, or None. Real orders need ``--live`` or NEOPULSE_LIVE=1."""
    if cfg.execution.broker != "kotak":
        return None
    if not (live or os.environ.get("NEOPULSE_LIVE", "") == "1"):
        return (
            "refusing to start: execution.broker=kotak places REAL orders; "
            "pass --live or set NEOPULSE_LIVE=1 to confirm"
        )
    return None


def _failed(code: str, what: str, exc: BaseException) -> Reply:
    """The answer to a request whose broker call failed: what failed, in the broker's words."""
    return Reply(ok=False, code=code, error=f"{what}: {error_reason(exc)}")


class LedgerRecovery:
    """Brings a lost ledger back without blocking the loop. ``check`` (on the loop, every
    ``LEDGER_CHECK_S``) notices a broken connection or an embedded postmaster that exited; a
    thread then restarts the embedded server when its postmaster is gone (never an external
    ``database.url``, which is only retried), opens a new connection with backoff, and hands it
    to the loop, where the store adopts it and ``on_back`` lets the held changes flush."""

    def __init__(self, db: Database, store: PgOrderStore, reactor: Any, log: Any, on_back: Any) -> None:
        self.db, self.store, self.reactor, self.log, self.on_back = db, store, reactor, log, on_back
        self.reason = ""  # why the ledger is unavailable; "" while it is up
        self.down_since = 0.0
        self.restarts = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def check(self) -> None:
        if self._thread is not None:
            return
        if self.db.embedded and self.db.postmaster_gone():
            self.store.drop(f"embedded PostgreSQL (postmaster {self.db.postmaster_pid()}) exited")
        if self.store.connected():
            return
        self.reason = self.store.last_error or "connection lost"
        self.down_since = time.monotonic()
        self.log.error("ledger_down", reason=self.reason, embedded=self.db.embedded)
        self._thread = threading.Thread(target=self._recover, name="ledger-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _recover(self) -> None:
        attempt, logged_at = 0, 0.0
        while not self._stopping.is_set():
            try:
                if self.db.embedded and self.db.postmaster_gone():
                    self.reason = "restarting the embedded PostgreSQL"
                    self.log.warning("embedded_pg_restarting", postmaster_pid=self.db.postmaster_pid())
                    self.db.restart(self.log)
                    self.restarts += 1
                conn = connect(self.db.url, RECOVER_CONNECT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure here is retried with backoff
                self.reason = f"{type(exc).__name__}: {str(exc).strip()}"[:300]
                now = time.monotonic()
                if now - logged_at >= LEDGER_LOG_EVERY_S:
                    logged_at = now
                    self.log.warning("ledger_reconnect_failed", attempts=attempt + 1, error=self.reason)
                self._stopping.wait(RECOVER_BACKOFF_S[min(attempt, len(RECOVER_BACKOFF_S) - 1)])
                attempt += 1
                continue
            with contextlib.suppress(Exception):  # the loop may be closing
                self.reactor.call_soon_threadsafe(lambda c=conn: self._adopt(c))
            return

    def _adopt(self, conn: Any) -> None:
        self.store.adopt(conn)
        outage_s = time.monotonic() - self.down_since
        self.log.warning("ledger_recovered", outage_s=round(outage_s, 2), restarts=self.restarts)
        self.reason = ""
        self._thread = None
        self.on_back(outage_s)


@dataclass(frozen=True)
class Brokers:
    """The configured broker, and what kind it is: exactly one of ``inline`` (paper, run on the
    loop and fed the ticks) and ``live`` (a real account, run in the thread pool) is set."""

    broker: Broker
    inline: InlineBroker | None = None
    live: LiveBroker | None = None


def make_broker(cfg: Config, master: MasterData, clock: Clock, home: Path, log: Any) -> Brokers:
    """The configured broker: ``paper`` (journal under ``$NEOPULSE_HOME/run``) or ``kotak``."""
    if cfg.execution.broker == "paper":
        from services.execution.brokers.paper import PaperBroker

        paper = PaperBroker(
            master,
            clock,
            slippage_bps=cfg.paper.slippage_bps,
            journal=home / "run" / "paper-book.jsonl",
            log=log,
            capital=cfg.paper.capital,
        )
        return Brokers(paper, inline=paper)
    from services.execution.brokers.kotak import KotakBroker

    kotak = KotakBroker(cfg.kotak, cfg.execution, master, clock, log,
                        session_file=home / "run" / "kotak-session.json")  # fmt: skip
    return Brokers(kotak, live=kotak)


class ExecutionService(Service):
    name = "execution"

    def __init__(self, cfg: Config, live: bool = False) -> None:
        super().__init__(cfg, pub_endpoint=cfg.bus.endpoint("execution_pub"))
        self.live = live
        self.clock = Clock()
        self.crash_at = os.environ.get(CRASH_ENV, "")
        self.db: Database | None = None
        self.store: PgOrderStore | None = None
        self.engine: ExecutionEngine = None  # type: ignore[assignment]
        self.broker: Broker = None  # type: ignore[assignment]
        self.inline_broker: InlineBroker | None = None  # paper: runs on the loop, fed the ticks
        self.live_broker: LiveBroker | None = None  # a real account: runs in the thread pool
        self.inline = True
        self.pool: ThreadPoolExecutor | None = None
        self.server: Server | None = None
        self._batch: list[tuple[ExecuteOrder, Responder]] = []
        self._polling = False
        self._pool_busy = 0
        self._flush_scheduled = False
        self._ledger_errors = 0
        self._ledger_alert_at = 0.0
        self._task_error_at = 0.0
        self.recovery: LedgerRecovery | None = None
        self._ip_alerted = 0  # the IpBlock episode last alerted (0: none open)
        self._ip_note = ""  # the probe's "stopped trying" note last alerted
        self._ip_probing = False
        self._ip_poll_logged_at = 0.0
        self._history_pool: ThreadPoolExecutor | None = None  # history downloads: never the order pool
        self._history_busy = False
        self._logging_in = False  # the daily login's pool call is out
        self._login_alerted = ""  # the login failure last alerted ("" while none is open)
        self._login_session = 0  # the broker session generation last seen
        self._poll_again = False  # a wake came while a poll was running
        self._feed_announcer = FeedAnnouncer()
        # risk's ExecuteOrder ts_ns → PENDING row committed and the ack sent; the broker place
        # call → its answer (None when bus.latency is off)
        self._ack_latency = self.latency.hop("risk_to_ack")
        self._place_latency = self.latency.hop("broker_place")
        self._place_timer: Any = None  # the broker_place recorder as the pool's workers report to it

    # ----------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        cfg = self.cfg
        master = MasterData.load_for_home(self.home)
        brokers = make_broker(cfg, master, self.clock, self.home, self.log)
        self.broker, self.inline_broker, self.live_broker = brokers.broker, brokers.inline, brokers.live
        self.inline = self.inline_broker is not None
        try:
            self.db = open_database(cfg, self.home, self.log)
            self.store = PgOrderStore(self.db.url, self.log, reconnect=False)
            applied = self.store.migrate()
        except (DatabaseError, LedgerError) as exc:
            raise RuntimeError(f"ledger unavailable: {exc}") from None
        self.log.info(
            "ledger_ready",
            embedded=self.db.embedded,
            startup_ms=round(self.db.startup_ms, 1),
            migrations=applied,
        )
        self.engine = ExecutionEngine(
            self.store, self.broker, master, self.clock, cfg.execution, log=self.log
        )
        if self.crash_at == "after_broker":
            self.engine.after_place = self._crash_after_place
        if self._place_latency is not None:
            self.engine.place_timer = self._place_latency.record  # paper: the calls run on the loop
            rec, reactor = self._place_latency.record, self.reactor
            self._place_timer = lambda start, end: reactor.call_soon_threadsafe(lambda: rec(start, end))
        if not self.inline:
            self.pool = ThreadPoolExecutor(cfg.execution.pool_workers, thread_name_prefix="broker")
        # Only risk may place orders; risk or the CLI may flatten, cancel entries, record risk events.
        self.senders = SenderCheck(cfg, self.home, self.log)
        self.server = self.bus.server(cfg.bus.endpoint("execution_rep"))
        self.server.handler = self._handle
        self.reactor.add_reader(self.server.sock, self._on_requests)
        sub = self.bus.subscriber([cfg.bus.endpoint("feed_pub")], [b"tick."])
        self.subscribers.append(sub)
        self._sub = sub
        self.reactor.add_reader(sub.sock, self._on_ticks)
        self.engine.start()  # the day's loads may take long: deadlines only from here on
        self.store.arm_deadlines(LEDGER_WRITE_DEADLINE_S, LEDGER_READ_DEADLINE_S)
        self.recovery = LedgerRecovery(self.db, self.store, self.reactor, self.log, self._ledger_back)
        self.add_task("ledger", LEDGER_CHECK_S, self.recovery.check)
        self._pump()
        self.add_task("reconcile", cfg.execution.reconcile_s, self._reconcile)
        self.add_task("due", DUE_CHECK_S, self._due)
        if not self.inline:
            self.add_task("status_poll", STATUS_POLL_S, self._poll_status)
            live = self.live_broker
            if live is not None:
                self.add_task("logout", 30.0, lambda: self._in_pool(live.logout_if_due, lambda r: None))
                self.add_task("broker_ip", DUE_CHECK_S, self._watch_broker_ip)
                live.on_login.append(self._on_broker_login)
                self.add_task("login", LOGIN_CHECK_S, self._login_if_due)
                self.add_task("broker_session", DUE_CHECK_S, self._watch_session)
                reactor = self.reactor
                live.set_wake(lambda: reactor.call_soon_threadsafe(self._poll_now))
                self.add_task("order_feed", DUE_CHECK_S, self._watch_order_feed)
        self.log.info(
            "execution_ready",
            broker=self.engine.broker_name,
            live=self.live,
            open_orders=self.engine.open_count(),
            positions=len(self.engine.position_list()),
        )

    def on_stop(self) -> None:
        if self.recovery is not None:
            self.recovery.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self._history_pool is not None:
            self._history_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.flush()
        if self.broker is not None:
            try:
                self.broker.close()
            except Exception as exc:  # noqa: BLE001 - a broker failing to close must not block the exit
                self.log.warning("broker_close_failed", error=str(exc))
        if self.store is not None:
            self.store.close()
        if self.db is not None:
            self.db.close()

    def status_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"live": self.live}
        if self.engine is not None:
            info.update(self.engine.status())
        if self.server is not None:
            info["rep_malformed"] = self.server.stats.malformed
        if self.db is not None:
            info["db_embedded"] = self.db.embedded
        if self.recovery is not None:
            info["ledger_restarts"] = self.recovery.restarts
        if self.live_broker is not None:
            info["broker_session"] = self.live_broker.session_info()
            feed = self.live_broker.order_feed_status()
            info["order_feed"] = feed.get("state", "")
            if feed.get("note"):
                info["order_feed_note"] = feed["note"]
        return info

    def ledger_unavailable(self) -> str:
        """Why the ledger cannot be used right now, or "" when it can."""
        if self.recovery is not None and self.recovery.reason:
            return self.recovery.reason
        if self.store is not None and not self.store.connected():
            return self.store.last_error or "connection lost"
        return ""

    def broker_unavailable(self) -> str:
        """Why the broker takes no orders from here right now (Kotak's static-IP rule), or ""."""
        block = self.live_broker.ip_block() if self.live_broker is not None else None
        return block.summary if block is not None and block.refusing else ""

    def not_logged_in(self) -> str:
        """Why the broker has no session to trade with right now (a failed login), or ""."""
        return self.live_broker.session_refusal() if self.live_broker is not None else ""

    def health(self) -> tuple[str, str]:
        why = self.ledger_unavailable()
        if why:
            return "degraded", f"ledger unavailable: {why}"
        why = self.broker_unavailable() or self.not_logged_in()
        return ("degraded", why) if why else ("ok", "")

    def _login_if_due(self) -> None:
        """The daily login (``kotak.login_at``), in the pool; the broker keeps its own backoff."""
        live = self.live_broker
        if live is None or self._logging_in:
            return
        self._logging_in = True

        def done(result: Any) -> None:
            self._logging_in = False
            if isinstance(result, BaseException):  # counted and backed off by the broker
                self.log.warning("daily_login_failed", error=error_reason(result))
            self._watch_session()

        self._in_pool(live.login_if_due, done)

    def _on_broker_login(self) -> None:
        """A login worked (pool thread, under the broker's session lock): tell the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.reactor.call_soon_threadsafe(self._watch_session)

    def _watch_session(self) -> None:
        """Announce a failed login once per streak (CRITICAL: orders are refused until a login
        works), its end (INFO, with the IP Kotak sees), and tell the feed to take a fresh lease
        of the new session (``session.execution.``)."""
        live = self.live_broker
        assert live is not None and self.pub is not None
        info = live.session_info()
        gen = int(info.get("session") or 0)
        if gen != self._login_session and info.get("logged_in"):
            first = self._login_session == 0
            self._login_session = gen
            self.pub.publish(topic("session", "execution"), Alert(  # stamped with the login's time
                level="INFO", source="execution", code="broker_login",
                ts_ns=int(info.get("login_ok_ns") or 0),
                text=f"logged in to Kotak (session {gen}); Kotak sees this machine as IP "
                     f"{info.get('ip') or 'unknown'}"))  # fmt: skip
            if self._login_alerted:
                self._login_alerted = ""
                self.log.warning("broker_login_recovered", ip=info.get("ip"))
                self.pub.publish(topic("alert", "execution"), Alert(
                    level="INFO", source="execution", code="broker_login_ok",
                    text=f"logged in to Kotak again (Kotak sees IP {info.get('ip') or 'unknown'}): new "
                         "orders are accepted"))  # fmt: skip
            elif not first:
                self.log.info("broker_session_renewed", session=gen, ip=info.get("ip"))
            return
        why = live.session_refusal()
        key = str(info.get("login_stopped") or "") or ("failed" if why else "")
        if why and key != self._login_alerted:
            self._login_alerted = key
            self.log.error("broker_login_failed", reason=why)
            self.pub.publish(topic("alert", "execution"), Alert(
                level="CRITICAL", source="execution", code="broker_login_failed",
                text=f"{why}. New orders are refused until a login works"
                     + ("" if info.get("login_stopped") else "; NeoPulse keeps trying with backoff")
                     + ". Orders and stops already at Kotak keep working"))  # fmt: skip

    def _watch_broker_ip(self) -> None:
        """One CRITICAL alert per episode of the broker refusing this IP (and when its code
        changes), INFO when it ends; and the bounded probe (a fresh login) while it refuses."""
        live = self.live_broker
        assert live is not None and self.pub is not None
        block = live.ip_block()
        if block is not None and block.episode != self._ip_alerted:
            self._ip_alerted, self._ip_note = block.episode, block.note
            self.log.error("broker_ip_blocked", code=block.code, reason=block.reason, ip=block.ip)
            self.pub.publish(topic("alert", "execution"), Alert(
                level="CRITICAL", source="execution", code="broker_ip_blocked",
                text=f"Kotak refuses orders from this machine: {block.reason}. To fix: {block.fix}. "
                     "Until then new orders and flatten are refused and nothing is sent; orders and stops "
                     "already at Kotak keep working, but an entry that fills meanwhile gets no stop or "
                     "target until Kotak accepts orders again (then they are placed at once). To exit "
                     "by hand in the Kotak app, first cancel NeoPulse's stop/target orders there (tags "
                     f"np…), then exit: {self._working_legs()}"))  # fmt: skip
        elif block is not None and block.note and block.note != self._ip_note:
            self._ip_note = block.note
            self.log.error("broker_ip_probe_stopped", code=block.code, note=block.note)
            self.pub.publish(topic("alert", "execution"), Alert(
                level="CRITICAL", source="execution", code="broker_ip_probe_stopped",
                text=f"Kotak still refuses orders from this machine and NeoPulse stopped trying: "
                     f"{block.note}"))  # fmt: skip
        elif block is None and self._ip_alerted:
            self._ip_alerted, self._ip_note = 0, ""
            self.log.warning("broker_ip_cleared")
            self.pub.publish(topic("alert", "execution"), Alert(
                level="INFO", source="execution", code="broker_ip_cleared",
                text="Kotak accepts orders from this machine again: new orders are accepted, and stops, "
                     "targets and cancels that waited are sent now"))  # fmt: skip
            self.engine.broker_accepts_again()
            self._pump()
        if block is not None and not self._ip_probing and live.ip_probe_due():
            self._ip_probing = True

            def done(result: Any) -> None:
                self._ip_probing = False
                if isinstance(result, BaseException):
                    self.log.warning("broker_ip_probe_failed", error=f"{type(result).__name__}: {result}")

            self._in_pool(live.probe_ip_block, done)

    def _watch_order_feed(self) -> None:
        """A WARNING when the order feed has been down 5 s (polling took over), INFO when it has
        been back 5 s; a flapping feed gives one such pair per FeedAnnouncer.quiet_s."""
        live = self.live_broker
        assert live is not None and self.pub is not None
        feed = live.order_feed_status()
        said = self._feed_announcer.step(feed.get("state") == LIVE, time.monotonic())
        if said == "down":
            self.log.warning("order_feed_down", note=feed.get("note", ""))
            self.pub.publish(topic("alert", "execution"), Alert(
                level="WARNING", source="execution", code="order_feed_down",
                text=f"Kotak's order feed is down ({feed.get('note') or 'no reason given'}): order "
                     "status is polled every second instead, so fills may show a second late"))  # fmt: skip
        elif said == "back":
            self.log.info("order_feed_back")
            self.pub.publish(topic("alert", "execution"), Alert(
                level="INFO", source="execution", code="order_feed_back",
                text="Kotak's order feed is back: order updates arrive live again"))  # fmt: skip

    def _working_legs(self) -> str:
        """NeoPulse's stop and target orders working at the broker, for an operator who exits
        by hand (they stay live after a manual exit, and could open a reverse position)."""
        legs = [o for o in self.engine.orders.values()
                if not o.terminal and not o.sliced and o.purpose in LEG_PURPOSES]  # fmt: skip
        if not legs:
            return "none are working now"
        shown = ", ".join(f"{o.purpose.lower()} {o.side} {o.open_qty} {o.symbol} tag {o.client_tag}"
                          + (f" (Kotak order {o.broker_order_id})" if o.broker_order_id else "")
                          for o in legs[:10])  # fmt: skip
        return shown + (f" and {len(legs) - 10} more" if len(legs) > 10 else "")

    def _ledger_back(self, outage_s: float) -> None:
        """The ledger is back: flush what was held, tell the operator."""
        assert self.pub is not None
        self.pub.publish(topic("alert", "execution"), Alert(
            level="INFO", source="execution", code="ledger_recovered",
            text=f"the ledger is back after {outage_s:.1f} s: orders are accepted again"))  # fmt: skip
        self._pump()

    def _on_task_error(self, what: str, exc: BaseException) -> None:
        if not isinstance(exc, LedgerError):
            super()._on_task_error(what, exc)
            return
        now = time.monotonic()  # the ledger is down: one line every LEDGER_LOG_EVERY_S, no traceback
        if now - self._task_error_at >= LEDGER_LOG_EVERY_S:
            self._task_error_at = now
            self.log.warning("task_ledger_unavailable", where=what, error=str(exc))

    # ----------------------------------------------------------------- pumping
    def _pump(self, settle: bool = True) -> None:
        """Run what the engine wants done, then publish what became durable. With ``settle``
        False (the hot paths) the acks and fills of the paper broker are committed a moment
        later, together with the next batch of PENDING rows when one arrives (group commit);
        a PENDING row is always committed before its broker call."""
        engine = self.engine
        if self.inline:
            engine.pump(settle=settle)
            if not settle and engine.pending_writes() and not self._flush_scheduled:
                self._flush_scheduled = True
                self.reactor.call_later(FLUSH_DELAY_S, self._deferred_flush)
        else:
            engine.flush()
            for intent in engine.take_intents():
                self._dispatch(intent)
            engine.finish_jobs()
        pub = self.pub
        assert pub is not None
        for tpc, msg in engine.take_messages():
            pub.publish(tpc, msg)
        errors = engine.stats["ledger_errors"]
        if errors != self._ledger_errors:
            self._ledger_errors = errors
            now = time.monotonic()
            if now - self._ledger_alert_at > 10.0:  # direct: held messages wait for the ledger
                self._ledger_alert_at = now
                pub.publish(topic("alert", "execution"), Alert(
                    level="CRITICAL", source="execution", code="ledger_unavailable",
                    text="the ledger cannot be written: new orders are refused and nothing is sent to "
                         "the broker until it recovers"))  # fmt: skip

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self._pump()

    def _dispatch(self, intent: Intent) -> None:
        self._in_pool(
            lambda: run_intent(self.broker, intent, self.clock, self._place_timer),
            lambda res: self._on_pool_result(intent, res),
        )

    def _in_pool(self, fn: Any, on_done: Any) -> None:
        assert self.pool is not None
        self._pool_busy += 1
        fut: Future[Any] = self.pool.submit(fn)

        def done(f: Future[Any]) -> None:
            def back() -> None:
                self._pool_busy -= 1
                if f.cancelled():
                    return
                exc = f.exception()
                on_done(exc if exc is not None else f.result())

            self.reactor.call_soon_threadsafe(back)

        fut.add_done_callback(done)

    def _on_pool_result(self, intent: Intent, result: Any) -> None:
        if isinstance(intent, PlaceIntent):
            self._crash_after_place(intent, result)
        self.engine.on_result(intent, result)
        self._pump()

    def _poll_now(self) -> None:
        """The broker's push channel has news: drain it now (or right after the running poll)."""
        if self._polling:
            self._poll_again = True
        else:
            self._poll_status()

    def _poll_status(self) -> None:
        if self._polling:
            return
        self._polling = True

        def done(events: Any) -> None:
            self._polling = False
            if self._poll_again:
                self._poll_again = False
                self.reactor.call_later(0, self._poll_status)
            if isinstance(events, BrokerIpBlocked):  # alerted once; one line per 10 s, not per poll
                now = time.monotonic()
                if now - self._ip_poll_logged_at >= LEDGER_LOG_EVERY_S:
                    self._ip_poll_logged_at = now
                    self.log.warning("status_poll_failed", error=events.reason, code=events.code)
                return
            if isinstance(events, BaseException):
                self.log.warning("status_poll_failed", error=f"{type(events).__name__}: {events}")
                return
            for ev in events:
                self.engine.on_broker_event(ev)
            self._pump()

        self._in_pool(self.broker.drain_events, done)

    def _reconcile(self) -> None:
        self.engine.request_reconcile("periodic")
        self._pump()

    def _due(self) -> None:
        if self.engine.check_day():
            self.log.info("trading_day_changed", day=self.engine.day)
        self.engine.reconcile_if_due()
        if self.engine.intents or self.engine.messages or self.engine.pending_writes():
            self._pump()

    def _crash_after_place(self, intent: PlaceIntent, result: Any) -> None:
        if self.crash_at == "after_broker":
            self.log.warning("test_crash", at="after_broker", client_tag=intent.order.client_tag)
            os.kill(os.getpid(), signal.SIGKILL)

    # ----------------------------------------------------------------- ticks
    def _on_ticks(self) -> None:
        engine_tick = self.engine.on_tick
        paper = self.inline_broker
        broker_tick = paper.on_tick if paper is not None else None

        trailed = False

        def on_msg(_topic: bytes, msg: Message) -> None:
            nonlocal trailed
            if type(msg) is Tick:
                if engine_tick(msg):
                    trailed = True
                if broker_tick is not None:
                    broker_tick(msg)

        self._sub.drain(on_msg)
        if trailed or (paper is not None and paper.events):
            self._pump(settle=False)

    # ----------------------------------------------------------------- requests
    def _on_requests(self) -> None:
        assert self.server is not None
        self.server.drain(1000)
        if self._batch:
            self._submit_batch()

    def _submit_batch(self) -> None:
        batch, self._batch = self._batch, []
        why, code = self.broker_unavailable(), "broker_ip"
        if not why:
            why, code = self.not_logged_in(), "not_logged_in"
        if why:  # the broker refuses this IP / no login: new orders are refused, nothing written or sent
            known = {m.request_id for m, _ in batch if self.engine.request_known(m.request_id)}
            # a repeat of an accepted order (settled ones too: the ledger says) still gets its answer
            for msg, responder in [(m, r) for m, r in batch if m.request_id not in known]:
                self.log.info("order_refused", request_id=msg.request_id, order_id="", code=code,
                              reason=why)  # fmt: skip
                responder.send(Reply(ok=False, code=code, error=f"not placed: {why}"))
            batch = [(m, r) for m, r in batch if m.request_id in known]
            if not batch:
                return
        results = self.engine.submit([m for m, _ in batch])
        if self.crash_at == "after_pending" and any(r.ok for r in results):
            self.log.warning("test_crash", at="after_pending", orders=len(results))
            os.kill(os.getpid(), signal.SIGKILL)
        lat = self._ack_latency
        for (msg, responder), res in zip(batch, results, strict=True):
            if not res.ok:
                self.log.info(
                    "order_refused", request_id=msg.request_id, order_id=res.order_id, reason=res.reason
                )
            responder.send(Reply(ok=res.ok, data=res.data(), error=res.reason, code=res.code))
            if lat is not None and res.ok:
                lat.record(msg.ts_ns, time.time_ns())
        self._pump(settle=False)

    def _submit_basket(self, msg: ExecuteBasket, responder: Responder) -> None:
        """A basket is committed in a transaction of its own (orders that came before it
        first), answered once its rows are durable, then its long legs go out."""
        if self._batch:
            self._submit_batch()
        why, code = self.broker_unavailable(), "broker_ip"
        if not why:
            why, code = self.not_logged_in(), "not_logged_in"
        if why and msg.request_id not in self.engine._kby_request:
            self.log.info("basket_refused", request_id=msg.request_id, code=code, reason=why)
            responder.send(Reply(ok=False, code=code, error=f"not placed: {why}"))
            return
        res = self.engine.submit_basket(msg)
        if self.crash_at == "after_pending" and res.ok:
            self.log.warning("test_crash", at="after_pending", basket=msg.request_id)
            os.kill(os.getpid(), signal.SIGKILL)
        if not res.ok:
            self.log.info("basket_refused", request_id=msg.request_id, basket_id=res.basket_id,
                          code=res.code, reason=res.reason)  # fmt: skip
        responder.send(Reply(ok=res.ok, data=res.data(), error=res.reason, code=res.code))
        if self._ack_latency is not None and res.ok:
            self._ack_latency.record(msg.ts_ns, time.time_ns())
        self._pump(settle=False)

    def _handle(self, msg: Message, responder: Responder) -> Message | None:
        try:
            return self._dispatch_request(msg, responder)
        except LedgerError as exc:  # a read the ledger could not answer: say so, no traceback
            return Reply(ok=False, code="ledger", error=f"ledger unavailable: {exc}")

    def _dispatch_request(self, msg: Message, responder: Responder) -> Message | None:
        engine = self.engine
        if isinstance(msg, GUARDED_COMMANDS):
            refusal = self.senders.refusal(msg, responder)
            if refusal is not None:  # nothing reaches the engine or the ledger
                return refusal
        if isinstance(msg, ExecuteOrder):
            self._batch.append((msg, responder))
            return None
        if isinstance(msg, ExecuteBasket):
            self._submit_basket(msg, responder)
            return None
        if isinstance(msg, GetDayState):  # with why the broker takes no orders now (risk halts on it)
            halt = self.broker_unavailable() or self.not_logged_in()
            return msgspec.structs.replace(engine.day_state(), broker_halt=halt)
        if isinstance(msg, GetPositions):
            engine.flush()
            return Reply(ok=True, data=[to_builtins(p) for p in engine.position_list(msg.strategy_id)])
        if isinstance(msg, GetOrders):
            try:
                rows = engine.orders_query(
                    OrderQuery(
                        status=msg.status, symbol=msg.symbol, strategy_id=msg.strategy_id, limit=msg.limit
                    )
                )
            except LedgerError as exc:
                return Reply(ok=False, code="ledger", error=str(exc))
            return Reply(ok=True, data=rows)
        if isinstance(msg, Flatten):
            why = self.ledger_unavailable()
            if why:
                self.log.warning("flatten_refused", request_id=msg.request_id, reason=why)
                return Reply(ok=False, code="ledger", error=(
                    f"ledger unavailable: {why}; nothing was cancelled or closed — flatten again once "
                    "`neopulse status` shows execution ok"))  # fmt: skip
            why = self.broker_unavailable()
            if why:  # its cancels could go while its closes cannot: stops would be lost, nothing closed
                self.log.warning("flatten_refused", request_id=msg.request_id, code="broker_ip", reason=why)
                return Reply(ok=False, code="broker_ip", error=(
                    f"{why}; nothing was cancelled or closed (stops at the broker keep working) — "
                    "flatten again once `neopulse status` shows execution ok; to exit in the Kotak app "
                    "instead, first cancel NeoPulse's stop/target orders there (tags np…), then exit "
                    f"(NeoPulse does not see a manual exit, and its stops could open a reverse position): "
                    f"{self._working_legs()}"))  # fmt: skip
            self.log.info(
                "flatten_requested",
                request_id=msg.request_id,
                symbol=msg.symbol,
                strategy_id=msg.strategy_id,
                source=msg.source,
            )

            answered = False

            def done(report: dict[str, Any]) -> None:
                nonlocal answered
                self.log.info(
                    "flatten_done",
                    request_id=msg.request_id,
                    closing=len(report["closing"]),
                    cancelled=report["cancelled"],
                    skipped=len(report["skipped"]),
                )
                if not answered:
                    answered = True
                    responder.send(Reply(ok=True, data=report))

            engine.flatten(msg, done)
            self._pump()
            why = self.ledger_unavailable()
            if why and not answered:  # the ledger went away while this flatten started
                answered = True
                return Reply(ok=False, code="ledger", error=(
                    f"ledger unavailable: {why}; the flatten is held and runs once the ledger is "
                    "back"))  # fmt: skip
            return None
        if isinstance(msg, CancelEntries):
            return self._cancel_entries(msg)
        if isinstance(msg, RecordRiskEvent):
            engine.record_risk_event(msg)
            if not engine.flush():
                return Reply(ok=False, code="ledger", error="ledger unavailable: risk event not recorded")
            self.log.info(
                "risk_event_recorded",
                risk_event=msg.event,
                reason=msg.reason,
                source=msg.source,
                request_id=msg.request_id,
            )
            self._pump()
            return Reply(ok=True, data={"recorded": msg.event})
        if isinstance(msg, GetFeedSession):
            return self._feed_session(responder)
        if isinstance(msg, SyncMaster):
            return self._sync_master(msg, responder)
        if isinstance(msg, FetchHistory):
            return self._fetch_history(msg, responder)
        if isinstance(msg, GetStatus):
            state, reason = self.health()
            return Reply(ok=True, data={"service": self.name, "pid": os.getpid(), "state": state,
                                        "reason": reason, **self.status_info()})  # fmt: skip
        return Reply(ok=False, code="unsupported", error=f"execution does not handle {type(msg).__name__}")

    def _cancel_entries(self, msg: CancelEntries) -> Reply:
        """The kill switch's cancels. While the broker refuses this IP they are owed, not sent:
        the reply and a CRITICAL alert say so (never a plain "cancelled N")."""
        ids = self.engine.cancel_entries(msg.reason or "kill switch")
        self._pump()
        why = self.broker_unavailable()
        if why:  # requested and owed, but the broker takes no order call from here
            if ids:
                self.log.error("cancel_entries_not_sent", count=len(ids), reason=why)
                assert self.pub is not None
                self.pub.publish(topic("alert", "execution"), Alert(
                    level="CRITICAL", source="execution", code="cancel_entries_not_sent",
                    text=f"kill switch: {len(ids)} open entry order(s) are NOT cancelled at Kotak yet: "
                         f"{why}. They are cancelled as soon as Kotak accepts orders again; cancel them "
                         "in the Kotak app now to be sure"))  # fmt: skip
            not_sent = f"none of these cancels reached Kotak: {why}"
            return Reply(ok=True, data={"cancelled": len(ids), "order_ids": ids, "sent": False,
                                        "not_sent": not_sent})  # fmt: skip
        return Reply(ok=True, data={"cancelled": len(ids), "order_ids": ids})

    def _feed_session(self, responder: Responder) -> Message | None:
        live = self.live_broker
        if live is None:
            return Reply(
                ok=False,
                code="no_session",
                error="no broker session to lease: execution.broker=paper has no Kotak login "
                "(run execution with broker=kotak, or set kotak.feed_user/kotak.feed_auth)",
            )

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                responder.send(_failed("no_session", "feed session unavailable", result))
            else:
                responder.send(Reply(ok=True, data=result))

        self._in_pool(live.feed_session, done)
        return None

    def _sync_master(self, msg: SyncMaster, responder: Responder) -> Message | None:
        live = self.live_broker
        if live is None:
            return Reply(ok=False, code="needs_kotak", error="sync-master needs execution.broker=kotak")
        from services.execution.master_sync import fetch_kotak_master

        def done(result: Any) -> None:
            if isinstance(result, BaseException):
                responder.send(_failed("sync_failed", "scrip master download failed", result))
                return
            try:
                master = MasterData.load_for_home(self.home)
                assert self.store is not None
                n = self.store.replace_instruments(master)
            except (LedgerError, ValueError, OSError) as exc:
                responder.send(Reply(ok=False, code="sync_failed", error=f"scrip master not loaded: {exc}"))
                return
            self.engine.master = master
            live.master = master
            self.log.info("master_synced", files=[str(p) for p in result], instruments=n)
            responder.send(Reply(ok=True, data={"files": [str(p) for p in result], "instruments": n}))

        self._in_pool(lambda: fetch_kotak_master(live, self.home), done)
        return None

    def _fetch_history(self, msg: FetchHistory, responder: Responder) -> Message | None:
        """One chunk of candles, downloaded on a single worker of its own (an order call never
        waits behind a download; a second download waits for the first: ``code="busy"``)."""
        from services.execution.brokers import kotak_history as kh

        live = self.live_broker
        if live is None or not hasattr(live, "historical_candles"):
            return Reply(ok=False, code="needs_kotak", error=(
                f"history needs execution.broker=kotak: the {self.engine.broker_name} broker has no "
                "candle history (Kotak's historical_data() is the only source)"))  # fmt: skip
        if msg.instrument not in self.engine.master.by_key:
            return Reply(ok=False, code="unknown_instrument",
                         error=f"unknown instrument {msg.instrument} (not in the master)")  # fmt: skip
        try:
            first, last = dt.date.fromisoformat(msg.from_date), dt.date.fromisoformat(msg.to_date)
        except ValueError as exc:
            return Reply(ok=False, code="bad_request", error=f"bad date: {exc}")
        if self._history_busy:
            return Reply(ok=False, code="rate_limited", data={"retry_after_s": 1.0},
                         error="another history download is running")  # fmt: skip
        if self._history_pool is None:
            self._history_pool = ThreadPoolExecutor(1, thread_name_prefix="history")
        seg, tok = msg.instrument.split("|", 1)
        self._history_busy = True
        fut: Future[Any] = self._history_pool.submit(live.historical_candles, seg, tok, msg.interval,
                                                     first, last)  # fmt: skip

        def back(f: Future[Any]) -> None:
            self._history_busy = False
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                candles = f.result()
                self.log.info("history_chunk", request_id=msg.request_id, instrument=msg.instrument,
                              interval=msg.interval, from_date=msg.from_date, to_date=msg.to_date,
                              candles=len(candles))  # fmt: skip
                responder.send(Reply(ok=True, data={"candles": candles}))
            elif isinstance(exc, kh.HistoryRateLimited):
                responder.send(Reply(ok=False, code="rate_limited", error=exc.reason,
                                     data={"retry_after_s": round(exc.retry_after_s, 3)}))  # fmt: skip
            elif isinstance(exc, kh.HistoryRefused):
                responder.send(Reply(ok=False, code="refused", error=exc.reason))
            else:
                self.log.warning("history_failed", request_id=msg.request_id, instrument=msg.instrument,
                                 error=error_reason(exc))  # fmt: skip
                responder.send(Reply(ok=False, code="unavailable", error=f"history: {error_reason(exc)}"))

        fut.add_done_callback(lambda f: self.reactor.call_soon_threadsafe(lambda: back(f)))
        return None
