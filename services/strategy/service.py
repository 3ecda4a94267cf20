"""One strategy instance on the bus (``strategy-<id>``).

Wiring only; the logic is the pure ``Strategy`` (base.py):

- asks the feed (``feed_rep``) to ``Subscribe`` its instruments by symbol, retrying until
  the feed answers and again every 30 s (a restarted feed forgets strategy requests);
- follows the instruments the strategy adds while it runs (``self.chain()``'s index and strike
  window, ``self.subscribe()``): each batch is a ``Subscribe`` of its own, so a request the feed
  refuses (over ``feed.max_subscriptions``, an unknown name) is logged as an error with the
  feed's counts and never takes the configured instruments down with it; a refused batch is
  asked for again with the 30 s refresh, not sooner;
- SUB feed ``tick.<seg>.<token>.`` for those instruments → ``dispatch_tick``;
- SUB execution ``order.<id>.`` and ``fill.<id>.`` → ``dispatch_order``/``dispatch_fill``;
- on start, ``GetPositions`` from execution so a restarted instance never re-enters what
  it holds;
- each ``OrderRequest`` goes to risk (``risk_rep``) through an ``AsyncClient``; the
  ``RiskVerdict`` (or the timeout) goes back to the strategy;
- heartbeats on ``ipc://$NEOPULSE_HOME/run/strategy-<id>.pub``.

A strategy hook that raises is isolated in ``Strategy``; with ``on_error = "stop"`` the
process exits 1 with the reason in its log.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import msgspec

from libs.common import config as config_mod
from libs.common.bus import RequestTimeout, topic
from libs.common.config import Config, ConfigError, StrategyInstance
from libs.common.instruments import Instrument, MasterData, UnknownInstrument
from libs.common.messages import (
    BasketRequest,
    BasketVerdict,
    Fill,
    GetPositions,
    OrderRequest,
    OrderUpdate,
    Position,
    Reply,
    RiskVerdict,
    Subscribe,
    Tick,
    VerdictCode,
)
from libs.common.service import EXIT_ERROR, Service
from services.strategy import registry
from services.strategy.base import ParamsError, Strategy, StrategyContext

SUBSCRIBE_RETRY_S = 2.0
SUBSCRIBE_REFRESH_S = 30.0
POSITIONS_RETRY_S = 2.0
POSITIONS_ATTEMPTS = 30


def pub_endpoint(strategy_id: str) -> str:
    """Where instance ``strategy_id`` publishes its heartbeats."""
    return f"ipc://{config_mod.home_dir()}/run/strategy-{strategy_id}.pub"


def build_strategy(cfg: Config, instance: StrategyInstance, ctx_kw: dict[str, Any]) -> Strategy:
    """Load the class, validate params and instruments; ``ConfigError`` on any problem."""
    try:
        cls = registry.load(instance.name)
        master = ctx_kw.get("master")
        names = instance.instruments or list(cfg.feed.instruments)
        if master is not None:
            for name in names:
                master.resolve(name)
        ctx = StrategyContext(instance.id, instruments=names, on_error=instance.on_error, **ctx_kw)
        return cls(ctx, instance.params)
    except (registry.UnknownStrategy, ParamsError, UnknownInstrument) as exc:
        raise ConfigError(f"config error: strategy `{instance.id}`: {exc}") from None


class StrategyService(Service):
    """Hosts one ``Strategy`` instance: feed and execution in, risk out."""

    def __init__(self, cfg: Config, instance: StrategyInstance) -> None:
        super().__init__(cfg, name=f"strategy-{instance.id}", pub_endpoint=pub_endpoint(instance.id))
        self.instance = instance
        self.master = MasterData.load_for_home(self.home)
        self.strategy = build_strategy(
            cfg,
            instance,
            {
                "master": self.master,
                "log": self.log.bind(strategy_id=instance.id),
            },
        )
        self.ready = False
        self.ticks = 0
        self.orders_sent = 0
        self.rejected = 0
        self.subscribed: list[str] = []
        self._sub_pending = False
        self.extra: dict[str, Instrument] = {}  # key → added by the strategy while running (chains)
        self._extra_queue: list[str] = []  # keys to ask the feed for
        self._extra_pending = False
        self._extra_refusal = ""  # the feed's last refusal, logged once
        self._position_attempts = 0
        # tick's ts_ns → on_tick and broker fill's ts_ns → on_fill (None when bus.latency is off)
        self._tick_latency = self.latency.hop("tick_to_strategy")
        self._fill_latency = self.latency.hop("fill_to_strategy")

    # ----------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        cfg, sid = self.cfg, self.instance.id
        strat = self.strategy
        self.risk = self.client(cfg.bus.endpoint("risk_rep"))
        self.feed = self.client(cfg.bus.endpoint("feed_rep"))
        self.execution = self.client(cfg.bus.endpoint("execution_rep"))
        self.exec_sub = self.subscribe(
            [cfg.bus.endpoint("execution_pub")], [topic("order", sid), topic("fill", sid)], self._on_execution
        )
        self._send(strat.dispatch_start())
        if strat.halted:
            raise RuntimeError(strat.halted)
        topics = [topic("tick", i.segment, i.token) for i in strat.instruments]
        self.feed_sub = self.subscribe([cfg.bus.endpoint("feed_pub")], topics, self._on_feed)
        self._request_subscribe()
        self._follow_subscriptions()
        self.add_task("subscribe_refresh", SUBSCRIBE_REFRESH_S, self._request_subscribe)
        self.add_task("strategy_timer", 1.0, self._on_timer)
        self._ask_positions()
        self.log.info(
            "strategy_starting",
            strategy=self.instance.name,
            strategy_id=sid,
            instruments=[i.symbol for i in strat.instruments],
            params=msgspec.to_builtins(strat.params),
        )

    def on_stop(self) -> None:
        orders = self.strategy.dispatch_stop()
        if orders:  # best effort: the loop is ending, so no verdict will be read
            self._send(orders)
        self.log.info("strategy_stopped", **self.status_info())

    def status_info(self) -> dict[str, Any]:
        return {
            **self.strategy.status(),
            "ticks": self.ticks,
            "orders_sent": self.orders_sent,
            "rejected": self.rejected,
            "ready": self.ready,
            "subscribed": len(self.subscribed),
            "chain_subscriptions": len(self.extra),
        }

    # ----------------------------------------------------------------- feed
    def _request_subscribe(self) -> None:
        if self.extra and not self._extra_pending:
            self._extra_queue = list(self.extra)  # the refresh: a restarted feed forgot them
            self._request_extra()
        if self._sub_pending:
            return
        self._sub_pending = True
        names = [i.symbol for i in self.strategy.instruments]
        self.feed.request(Subscribe(instruments=names, requester=self.name), self._on_subscribed)

    def _on_subscribed(self, reply: Any) -> None:
        self._sub_pending = False
        if isinstance(reply, Reply) and reply.ok:
            data = reply.data if isinstance(reply.data, dict) else {}
            keys = list(data.get("subscribed", []))
            if keys != self.subscribed:
                self.log.info("feed_subscribed", instruments=keys, total=data.get("total"))
            self.subscribed = keys
            return
        error = reply.error if isinstance(reply, Reply) else str(reply)
        self.log.warning("feed_subscribe_failed", error=error, retry_s=SUBSCRIBE_RETRY_S)
        self.reactor.call_later(SUBSCRIBE_RETRY_S, self._request_subscribe)

    def _follow_subscriptions(self) -> None:
        """Take what the strategy added (a chain's strikes, ``subscribe()``): listen to it on the
        SUB socket and ask the feed for it."""
        added, self.strategy.new_subscriptions = self.strategy.new_subscriptions, []
        for inst in added:
            if inst.key not in self.extra:
                self.extra[inst.key] = inst
                self.feed_sub.subscribe(topic("tick", inst.segment, inst.token))
                self._extra_queue.append(inst.key)
        self._request_extra()

    def _request_extra(self) -> None:
        if self._extra_pending or not self._extra_queue:
            return
        names, self._extra_queue = self._extra_queue, []
        self._extra_pending = True
        self.feed.request(Subscribe(instruments=names, requester=self.name),
                          functools.partial(self._on_extra_subscribed, names))

    def _on_extra_subscribed(self, names: list[str], reply: Any) -> None:
        self._extra_pending = False
        if isinstance(reply, Reply) and reply.ok:
            data = reply.data if isinstance(reply.data, dict) else {}
            if data.get("added") or self._extra_refusal:
                self.log.info("feed_subscribed", instruments=names[:50], asked=len(names),
                              added=len(data.get("added", [])), total=data.get("total"))
            self._extra_refusal = ""
        elif isinstance(reply, Reply) and reply.code in ("subscription_limit", "unknown_instrument"):
            # Asking again at once would be refused again: the 30 s refresh asks for them.
            if reply.error != self._extra_refusal:
                wanted = len(self.extra) + len(self.strategy.instruments)
                self.log.error("feed_subscription_refused", strategy_id=self.instance.id, code=reply.code,
                               error=reply.error, asked=len(names), wanted_in_all=wanted,
                               retry_s=SUBSCRIBE_REFRESH_S)
            self._extra_refusal = reply.error
        else:
            error = reply.error if isinstance(reply, Reply) else str(reply)
            self.log.warning("feed_subscribe_failed", error=error, asked=len(names),
                             retry_s=SUBSCRIBE_RETRY_S)
            asked = set(names)
            self._extra_queue = names + [k for k in self._extra_queue if k not in asked]
            self.reactor.call_later(SUBSCRIBE_RETRY_S, self._request_extra)
            return
        self._request_extra()

    def _on_feed(self, _topic: bytes, msg: Any) -> None:
        if type(msg) is not Tick or not self.ready:
            return
        self.ticks += 1
        if self._tick_latency is not None:
            self._tick_latency.record(msg.ts_ns, time.time_ns())
        orders = self.strategy.dispatch_tick(msg)
        if orders:
            self._send(orders)
        if self.strategy.new_subscriptions:
            self._follow_subscriptions()
        if self.strategy.halted:
            self._check_halted()

    # ----------------------------------------------------------------- execution
    def _ask_positions(self) -> None:
        self._position_attempts += 1
        self.execution.request(GetPositions(strategy_id=self.instance.id), self._on_positions)

    def _on_positions(self, reply: Any) -> None:
        if isinstance(reply, Reply) and reply.ok and isinstance(reply.data, list):
            try:
                positions = [msgspec.convert(p, Position, strict=False) for p in reply.data]
            except msgspec.ValidationError as exc:
                self.log.warning("positions_unreadable", error=str(exc))
                positions = []
            self.strategy.restore(p for p in positions if p.quantity)
            held = {p.symbol: p.quantity for p in positions if p.quantity}
            self.log.info("positions_restored", positions=held)
        else:
            # Execution may still be starting (embedded PostgreSQL): trade meanwhile (risk still
            # guards exposure) and keep asking; its answer, when it comes, is adopted as the truth.
            error = reply.error if isinstance(reply, Reply) else str(reply)
            retry = self._position_attempts < POSITIONS_ATTEMPTS
            self.log.warning(
                "positions_unavailable",
                error=error,
                attempt=self._position_attempts,
                detail="trading from flat until execution reports positions"
                if retry
                else "giving up: trading from the strategy's own fills",
            )
            if retry:
                self.reactor.call_later(POSITIONS_RETRY_S, self._ask_positions)
        self.ready = True

    def _on_execution(self, _topic: bytes, msg: Any) -> None:
        match msg:
            case OrderUpdate():
                self._send(self.strategy.dispatch_order(msg))
            case Fill():
                self.log.info(
                    "fill",
                    order_id=msg.order_id,
                    symbol=msg.symbol,
                    side=msg.side,
                    quantity=msg.quantity,
                    price=str(msg.price),
                )
                if self._fill_latency is not None and not self.strategy.has_fill(msg.fill_id):
                    self._fill_latency.record(msg.ts_ns, time.time_ns())
                self._send(self.strategy.dispatch_fill(msg))
            case _:
                return
        self._check_halted()

    # ----------------------------------------------------------------- risk
    def _send(self, orders: Any) -> None:
        baskets, self.strategy.new_baskets = self.strategy.new_baskets, []
        for basket in baskets:
            self.orders_sent += 1
            self.log.info("basket_request", request_id=basket.request_id, legs=len(basket.legs),
                          symbols=[x.symbol for x in basket.legs])  # fmt: skip
            self.risk.request(basket, functools.partial(self._on_basket_verdict, basket))
        for req in orders:
            self.orders_sent += 1
            self.log.info(
                "order_request",
                request_id=req.request_id,
                symbol=req.symbol,
                side=req.side,
                quantity=req.quantity,
                price=str(req.price) if req.price is not None else None,
                stop_loss=str(req.stop_loss) if req.stop_loss is not None else None,
                target=str(req.target) if req.target is not None else None,
                purpose=req.purpose,
            )
            self.risk.request(req, functools.partial(self._on_verdict, req))

    def _on_verdict(self, req: OrderRequest, reply: Any) -> None:
        verdict: RiskVerdict | Exception
        if isinstance(reply, RiskVerdict):
            verdict = reply
        elif isinstance(reply, Reply):
            verdict = RiskVerdict(request_id=req.request_id, approved=False, reason=reply.error or "refused",
                                  code=VerdictCode.REFUSED)
        elif isinstance(reply, Exception):
            verdict = reply
        else:
            verdict = RequestTimeout(self.risk.endpoint, 0)
        if isinstance(verdict, RiskVerdict):
            if verdict.approved:
                self.log.info("order_approved", request_id=req.request_id, order_id=verdict.order_id)
            else:
                self.rejected += 1
                self.log.warning("order_rejected", request_id=req.request_id, reason=verdict.reason)
        self._send(self.strategy.dispatch_verdict(req, verdict))
        self._check_halted()

    def _on_basket_verdict(self, req: BasketRequest, reply: Any) -> None:
        verdict: BasketVerdict | Exception
        if isinstance(reply, BasketVerdict):
            verdict = reply
            if not reply.approved:
                self.rejected += 1
            self.log.info("basket_approved" if reply.approved else "basket_rejected",
                          request_id=req.request_id, reason=reply.reason)  # fmt: skip
        elif isinstance(reply, Reply):
            verdict = BasketVerdict(request_id=req.request_id, approved=False,
                                    reason=reply.error or "refused", code=VerdictCode.REFUSED)
        elif isinstance(reply, Exception):
            verdict = reply
        else:
            verdict = RequestTimeout(self.risk.endpoint, 0)
        self._send(self.strategy.dispatch_basket_verdict(req, verdict))
        self._check_halted()

    def _on_timer(self) -> None:
        self._send(self.strategy.dispatch_timer(self.strategy.ctx.clock.now_ns()))
        self._check_halted()

    def _check_halted(self) -> None:
        if self.strategy.new_subscriptions:  # after every hook: a chain used in on_fill, on_bar...
            self._follow_subscriptions()
        reason = self.strategy.halted
        if reason and self.reactor.running:
            self.log.error("strategy_halted", strategy_id=self.instance.id, reason=reason)
            self.stop(reason, exit_code=EXIT_ERROR)
