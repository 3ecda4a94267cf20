"""The feed process: one tick source published on the bus, with a request port.

PUB ``feed_pub``:
    ``tick.<segment>.<token>.``  ``Tick`` — hot path: a dict lookup and a msgspec encode
    ``feedstatus.``              ``FeedStatus`` on every connection-state change
    ``hb.feed.``                 ``Heartbeat`` every second (from the Service base)

ROUTER ``feed_rep``:
    ``Subscribe``     add instruments (trading symbol or ``segment|token``); the feed keeps
                      the union of ``feed.instruments`` and every request, up to
                      ``feed.max_subscriptions``. An unknown name refuses the whole request
                      with ``code="unknown_instrument"`` and names it.
    ``GetStatus``     state, source, counters
    ``GetLastTicks``  the latest tick of the named (or every subscribed) instrument
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from libs.common.bus import Responder, Server, topic
from libs.common.clock import Clock
from libs.common.config import Config, ConfigError
from libs.common.instruments import Instrument, MasterData, UnknownInstrument
from libs.common.messages import (
    Codec,
    FeedStatus,
    GetLastTicks,
    GetStatus,
    Message,
    Reply,
    Subscribe,
    Tick,
    to_builtins,
)
from libs.common.service import Service
from services.feed.recorder import TickRecorder
from services.feed.sources import CONNECTING, Source
from services.feed.watchdog import MarketHours

FEEDSTATUS_TOPIC = topic("feedstatus")


class FeedService(Service):
    name = "feed"

    def __init__(self, cfg: Config, clock: Clock | None = None, master: MasterData | None = None) -> None:
        super().__init__(cfg, pub_endpoint=cfg.bus.endpoint("feed_pub"))
        self.clock = clock or Clock()
        self.hours = MarketHours.from_config(cfg.feed)  # validates hours, days and timezone
        self._master_stamp = self._master_cache_stamp()
        self.master = master if master is not None else MasterData.load_for_home(self.home)
        self.subs: dict[str, Instrument] = {}
        try:
            initial = self._resolve(cfg.feed.instruments)
        except UnknownInstrument as exc:
            raise ConfigError(f"config error: `feed.instruments`: {exc}") from None
        if len(initial) > cfg.feed.max_subscriptions:
            raise ConfigError(f"config error: `feed.instruments` lists {len(initial)} instruments, "
                              f"more than feed.max_subscriptions ({cfg.feed.max_subscriptions})")
        for inst in initial:
            self.subs[inst.key] = inst
        self.state = ""
        self.detail = ""
        self.ticks = 0
        self._rate_mark = (time.monotonic(), 0)
        self.tick_rate = 0.0
        # hot-path state
        assert self.pub is not None
        self._publish_raw = self.pub.raw_sender()
        self._encode = Codec().encode
        self._topics: dict[tuple[str, str], bytes] = {}
        self._last: dict[bytes, bytes] = {}  # topic -> the last tick published on it, encoded
        # one latency sample per published batch (see publish_ticks); None when bus.latency is off
        self._latency = self.latency.hop("feed_publish")
        self.recorder: TickRecorder | None = None
        self._rec_append: Any = None
        self.source: Source = self._make_source()
        if cfg.feed.record and self.source.name != "replay":
            self.recorder = TickRecorder(self.home / "ticks", self.clock, self.hours.tz, self.log)
            self._rec_append = self.recorder.buf.append
        self.server: Server | None = None

    # ----------------------------------------------------------------- wiring
    def _make_source(self) -> Source:
        kind = self.cfg.feed.source
        if kind == "sim":
            from services.feed.sources.sim import SimSource

            return SimSource(self)
        if kind == "replay":
            from services.feed.sources.replay import ReplaySource

            return ReplaySource(self)
        from services.feed.sources.kotak import KotakSource

        return KotakSource(self)

    def on_start(self) -> None:
        self.server = self.bus.server(self.cfg.bus.endpoint("feed_rep"))
        self.server.handler = self.handle_request
        server = self.server
        self.reactor.add_reader(server.sock, server.drain)
        if self.recorder is not None:
            self.recorder.flush()  # opens today's file now, so a bad ticks dir shows at start
            self.add_task("recorder_flush", 0.25, self._flush_recorder)
        self.add_task("tick_rate", 1.0, self._update_rate)
        self.set_state(CONNECTING, f"source {self.source.name}")
        self.source.start(list(self.subs.values()))
        self.log.info("feed_started", source=self.source.name, subscribed=len(self.subs),
                      pub=self.cfg.bus.endpoint("feed_pub"), rep=self.cfg.bus.endpoint("feed_rep"),
                      recording=str(self.recorder.path) if self.recorder else None)

    def on_stop(self) -> None:
        self.source.stop()
        if self.state:
            self.set_state("DOWN", "feed stopped")
        if self.recorder is not None:
            self.recorder.close()
        if self.server is not None:
            self.reactor.remove_reader(self.server.sock)
            self.server.close()

    def _flush_recorder(self) -> None:
        assert self.recorder is not None
        self.recorder.flush()

    def _update_rate(self) -> None:
        now = time.monotonic()
        t0, n0 = self._rate_mark
        self.tick_rate = (self.ticks - n0) / max(now - t0, 1e-6)
        self._rate_mark = (now, self.ticks)

    # ----------------------------------------------------------------- hot path
    def _topic_for(self, key: tuple[str, str]) -> bytes:
        t = topic("tick", key[0], key[1])
        self._topics[key] = t
        return t

    def publish_tick(self, tick: Tick) -> None:
        self.publish_ticks([tick])

    def publish_ticks(self, ticks: list[Tick]) -> None:
        """Publish ticks in order: per tick a topic lookup, an encode and a send.

        The sim and Kotak sources stamp ``ts_ns`` when they make a tick from what arrived, so
        the batch's first (oldest) tick, from its stamp to the end of the batch's sends, is the
        feed hop's one sample per batch: the slowest tick of the batch, at one clock read and
        one histogram update per batch rather than per tick."""
        topics, last, enc, send = self._topics, self._last, self._encode, self._publish_raw
        rec = self._rec_append
        for tick in ticks:
            key = (tick.segment, tick.token)
            t = topics.get(key) or self._topic_for(key)
            payload = enc(tick)
            send(t, payload)
            last[t] = payload
            if rec is not None:
                rec((t, payload))
        if self._latency is not None and ticks:
            self._latency.record(ticks[0].ts_ns, time.time_ns())
        self._count(len(ticks))

    def publish_frames(self, topics: list[bytes], payloads: list[bytes]) -> None:
        """Publish ticks that are already encoded, with their topics (a replay at ``max``).
        Their ``ts_ns`` is the recorded time, so the feed hop's sample is the batch's own time
        here: from the call to the end of its sends."""
        lat = self._latency
        start_ns = time.time_ns() if lat is not None else 0
        last, send, rec = self._last, self._publish_raw, self._rec_append
        for t, payload in zip(topics, payloads, strict=True):
            send(t, payload)
            last[t] = payload
            if rec is not None:
                rec((t, payload))
        if lat is not None:
            lat.record(start_ns, time.time_ns())
        self._count(len(topics))

    def _count(self, n: int) -> None:
        self.ticks += n
        self.pub.stats.sent += n  # type: ignore[union-attr]
        if self._rec_append is not None and len(self.recorder.buf) > 50_000:  # type: ignore[union-attr]
            self._flush_recorder()

    # ----------------------------------------------------------------- state
    def set_state(self, state: str, detail: str = "") -> None:
        """Publish ``FeedStatus`` when the connection state changes."""
        if state == self.state:
            self.detail = detail or self.detail
            return
        self.state, self.detail = state, detail
        self.log.info("feed_state", state=state, detail=detail, source=self.source.name)
        self.publish_status(detail)

    def publish_status(self, detail: str) -> None:
        """Publish the current state with ``detail`` (also used for exchange market-status news)."""
        if self.pub is None:
            return
        self.pub.publish(FEEDSTATUS_TOPIC, FeedStatus(
            state=self.state, source=self.cfg.feed.source, detail=detail,
            reconnects=int(getattr(self.source, "reconnects", 0)),
            subscribed=len(self.subs),
        ))

    # ----------------------------------------------------------------- requests
    def _master_cache_stamp(self) -> tuple[tuple[str, int], ...]:
        d = self.home / "master"
        if not d.is_dir():
            return ()
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in d.glob("*.csv")))

    def _reload_master_if_synced(self) -> bool:
        """``neopulse sync-master`` rewrote the cache since we loaded it: load it again."""
        stamp = self._master_cache_stamp()
        if stamp == self._master_stamp:
            return False
        self._master_stamp = stamp
        try:
            master = MasterData.load_for_home(self.home)
        except (OSError, ValueError) as exc:
            self.log.error("master_reload_failed", error=str(exc))
            return False
        self.master = master
        self.log.info("master_reloaded", instruments=len(master))
        return True

    def _resolve(self, names: list[str], reload: bool = True) -> list[Instrument]:
        """Resolve every name or raise ``UnknownInstrument`` naming all the unknown ones.
        An unknown name first makes the feed pick up a newer master cache, if there is one."""
        found: list[Instrument] = []
        unknown: list[str] = []
        for name in names:
            try:
                found.append(self.master.resolve(name))
            except UnknownInstrument:
                unknown.append(name)
        if unknown:
            if reload and self._reload_master_if_synced():
                return self._resolve(names, reload=False)
            raise UnknownInstrument(", ".join(unknown))
        return found

    def handle_request(self, msg: Message, _responder: Responder) -> Message | None:
        match msg:
            case Subscribe():
                return self.add_subscriptions(msg.instruments, msg.requester)
            case GetStatus():
                return Reply(ok=True, data=self.status())
            case GetLastTicks():
                return self.last_ticks(msg.instruments)
            case _:
                return Reply(ok=False, code="unsupported",
                             error=f"the feed does not handle {type(msg).__name__}")

    def add_subscriptions(self, names: list[str], requester: str = "") -> Reply:
        try:
            insts = self._resolve(names)
        except UnknownInstrument as exc:
            return Reply(ok=False, code="unknown_instrument", error=str(exc))
        new: list[Instrument] = []
        seen: set[str] = set()
        for inst in insts:
            if inst.key not in self.subs and inst.key not in seen:
                seen.add(inst.key)
                new.append(inst)
        limit = self.cfg.feed.max_subscriptions
        if len(self.subs) + len(new) > limit:
            return Reply(ok=False, code="subscription_limit",
                         error=f"subscription limit: {requester or 'a request'} asked for {len(insts)} "
                               f"instruments ({len(new)} new); with the {len(self.subs)} already subscribed "
                               f"that is {len(self.subs) + len(new)}, over feed.max_subscriptions "
                               f"({limit}): none added")
        for inst in new:
            self.subs[inst.key] = inst
        self.source.requested()
        if new:
            self.source.add_instruments(new)
            self.log.info("feed_subscribed", requester=requester, added=[i.key for i in new][:50],
                          added_count=len(new), total=len(self.subs))
        return Reply(ok=True, data={"subscribed": [i.key for i in insts], "added": [i.key for i in new],
                                    "total": len(self.subs)})

    def last_ticks(self, names: list[str]) -> Reply:
        if names:
            try:
                keys = [topic("tick", i.segment, i.token) for i in self._resolve(names)]
            except UnknownInstrument as exc:
                return Reply(ok=False, code="unknown_instrument", error=str(exc))
        else:
            keys = list(self._last)
        decode = msgspec.msgpack.Decoder(Tick).decode
        ticks = [decode(self._last[k]) for k in keys if k in self._last]
        return Reply(ok=True, data=to_builtins(ticks))

    def status(self) -> dict[str, Any]:
        server = self.server
        return {
            "service": self.name,
            "source": self.source.name,
            "state": self.state,
            "detail": self.detail,
            "subscribed": len(self.subs),
            "instruments": list(self.subs)[:100],
            "ticks": self.ticks,
            "ticks_per_s": round(self.tick_rate, 1),
            "market_open": self.hours.is_open(self.clock),
            "source_stats": self.source.stats(),
            "recorder": self.recorder.stats() if self.recorder else None,
            "requests": server.stats.as_dict() if server else {},
        }

    def status_info(self) -> dict[str, Any]:
        server = self.server
        return {"state": self.state, "source": self.source.name, "subscribed": len(self.subs),
                "ticks": self.ticks, "ticks_per_s": round(self.tick_rate, 1),
                "malformed_requests": server.stats.malformed if server else 0}
