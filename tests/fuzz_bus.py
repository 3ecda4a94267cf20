"""Structured fuzzing of the bus: every request kind at every ROUTER, and tick frames into the
subscribers, against real risk and execution processes (paper, embedded PostgreSQL).

    python -m tests.fuzz_bus [--cases 100000] [--seed N] [--batch 500]

Cases come from hypothesis strategies: every message kind of the union (and unknown ones) as
msgpack maps whose fields take hostile values — wrong types, huge and negative numbers, NaN
and infinity, ``"1E+26"``, NUL, non-ASCII and megabyte strings — plus truncated frames and raw
bytes; half of them carry the stack's credential, so the checks behind the sender guard are
reached too. The ``feed_pub`` endpoint is bound by the fuzzer itself, so risk and execution
subscribe to it and take hostile tick frames as well.

After each batch a valid ``GetStatus`` must be answered by every service within 1 s (no wedge)
and every process must still run (no crash). Every reply to a fuzz request must be a ``Reply``
or the request's own answer type; a refusal must carry its reason. Exit 1 on any violation.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from libs.common.bus import Bus
from libs.common.config import load_config
from libs.common.messages import ALL_TYPES, Codec, GetStatus, Reply, Tick
from libs.common.stack_secret import read_secret
from tests.helpers import eventually, free_base_port
from tests.kit.processes import answers
from tests.kit.processes import ask as kit_ask
from tests.stack import Stack

TARGETS = ("risk_rep", "execution_rep")
FLATTEN_ANSWER_S = 15.0  # execution's flatten may wait 10 s for cancel confirmations
_ENC = msgspec.msgpack.Encoder()

NASTY = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),  # all msgpack can carry
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "1E+26", "NaN", "-Infinity", "-1", "0", "\x00", "BUY\x00", "नमस्ते", "é" * 40,
                     "RELIANCE-EQ", "nse_cm", "2885", "ENTRY", "LIMIT", "MIS", "kill_switch_on"]),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(min_value=-(2**63), max_value=2**63), max_size=3),
    st.binary(max_size=20),
    st.just("x" * 1_000_000),
)


_ORDER = {"kind": "OrderRequest", "request_id": "fz1", "strategy_id": "fuzz", "side": "BUY", "quantity": 1,
          "symbol": "RELIANCE-EQ", "price": "1200.00", "order_type": "LIMIT", "product": "MIS",
          "stop_loss": "1100.00", "target": "1300.00", "purpose": "ENTRY"}  # fmt: skip
# valid requests, one field of which a case replaces: the checks behind the decoder are reached
VALID = [
    _ORDER,
    {"kind": "ExecuteOrder", "request_id": "fz1", "order": _ORDER, "quantity": 1, "segment": "nse_cm",
     "token": "2885", "symbol": "RELIANCE-EQ"},
    {"kind": "KillSwitch", "query": True, "reason": "fuzz"},
    {"kind": "Flatten", "request_id": "fz-flatten", "symbol": "RELIANCE-EQ"},
    {"kind": "CancelEntries", "request_id": "fz-cancel", "reason": "fuzz"},
    {"kind": "RecordRiskEvent", "event": "kill_switch_off", "reason": "fuzz", "request_id": "fz-ev"},
    {"kind": "GetOrders", "limit": 5},
    {"kind": "GetPositions"},
]  # fmt: skip


@st.composite
def frames(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(target, payload, with credential)."""
    target = draw(st.sampled_from(TARGETS))
    shapes = ["message", "message", "mutated", "mutated", "truncated", "raw", "unknown_kind"]
    shape = draw(st.sampled_from(shapes))
    if shape == "mutated":
        base = dict(draw(st.sampled_from(VALID)))
        key = draw(st.sampled_from(sorted(base)))
        if key != "kind":
            base[key] = draw(NASTY)
        if "request_id" in base and draw(st.booleans()):
            base["request_id"] = f"fz{draw(st.integers(min_value=0, max_value=10**9))}"
            if base["kind"] == "ExecuteOrder" and isinstance(base.get("order"), dict):
                base["order"] = {**base["order"], "request_id": base["request_id"]}
        return target, _ENC.encode(base), draw(st.booleans())
    cls = draw(st.sampled_from(ALL_TYPES))
    body: dict[str, Any] = {"kind": cls.__name__ if shape != "unknown_kind" else "Bogus"}
    for name in msgspec.structs.fields(cls):
        if draw(st.booleans()):
            body[name.name] = draw(NASTY)
    if cls.__name__ == "ExecuteOrder" and draw(st.booleans()):
        fields = ("request_id", "strategy_id", "side", "quantity", "price", "stop_loss")
        body["order"] = {"kind": "OrderRequest", **{k: draw(NASTY) for k in fields}}
    payload = _ENC.encode(body)
    if shape == "truncated":
        payload = payload[: draw(st.integers(min_value=0, max_value=max(0, len(payload) - 1)))]
    elif shape == "raw":
        payload = draw(st.binary(max_size=300))
    return target, payload, draw(st.booleans())


def _describe(payload: bytes) -> str:
    """A short name for a case in the report: its kind and first fields, or its first bytes."""
    try:
        body = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return f"bytes {payload[:24].hex()}"
    if isinstance(body, dict):
        short = {k: (v[:30] if isinstance(v, str | bytes) else v) for k, v in list(body.items())[:6]}
        return repr(short)[:200]
    return repr(body)[:80]


@dataclass
class Report:
    sent: Counter[str] = field(default_factory=Counter)
    replied: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    unanswered: Counter[str] = field(default_factory=Counter)
    reasonless: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # a sample of the requests nobody answered
    oversize: Counter[str] = field(default_factory=Counter)  # dropped by libzmq with the connection
    unexpected: list[str] = field(default_factory=list)
    ticks: int = 0
    wedges: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # a process that died, or a handler that raised

    def ok(self) -> bool:
        return not (self.reasonless or self.unexpected or self.wedges or self.crashes or self.silent)

    def table(self) -> str:
        heads = ("target", "sent", "replied", "refused", "no reply", "oversize")
        lines = [f"{heads[0]:16s} " + " ".join(f"{h:>8s}" for h in heads[1:])]
        for t in TARGETS:
            lines.append(f"{t:16s} {self.sent[t]:8d} {self.replied[t]:8d} {self.refused[t]:8d} "
                         f"{self.unanswered[t]:8d} {self.oversize[t]:8d}")  # fmt: skip
        lines.append(f"tick frames into subscribers: {self.ticks}")
        lines.append(f"crashes {len(self.crashes)}, wedges {len(self.wedges)}, refusals without a reason "
                     f"{len(self.reasonless)}, unexpected replies {len(self.unexpected)}")  # fmt: skip
        for what in (self.crashes, self.wedges, self.reasonless[:5], self.unexpected[:5], self.silent):
            lines.extend(f"  {x}" for x in what)
        return "\n".join(lines)


class Fuzzer:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.cfg = load_config(env=stack.env)
        self.ctx = zmq.Context.instance()
        self.codec = Codec()
        self.socks = {t: self._dealer(t) for t in TARGETS}
        self.max_frame = self.cfg.bus.max_frame_bytes
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.cfg.bus.endpoint("feed_pub"))
        self.secret = read_secret(stack.home) or b""
        self.corr = 0
        self.pending: dict[tuple[str, bytes], str] = {}
        self.report = Report()

    def _dealer(self, target: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.cfg.bus.endpoint(target))
        return sock

    def send(self, target: str, payload: bytes, credential: bool) -> None:
        if len(payload) > self.max_frame:
            # libzmq drops the connection of a peer that sends a frame above ZMQ_MAXMSGSIZE
            # (bus.max_frame_bytes): settle what is in flight, send it, then reconnect
            self.collect(2.0)
            self.socks[target].send_multipart([b"", b"\0" * 8, payload])
            self.socks[target].close(0)
            self.socks[target] = self._dealer(target)
            self.report.oversize[target] += 1
            return
        self.corr += 1
        corr = self.corr.to_bytes(8, "big")
        parts = [b"", corr, payload] + ([self.secret] if credential and self.secret else [])
        self.socks[target].send_multipart(parts)
        self.pending[(target, corr)] = _describe(payload)
        self.report.sent[target] += 1

    def tick_frame(self, rng: random.Random) -> None:
        topic = rng.choice([b"tick.nse_cm.2885.", b"tick.", b"tick.nse_cm.\xff\x00.", b"x"])
        header = struct.pack(">IQ", rng.randrange(2**32), rng.randrange(2**64))
        body = rng.choice([
            self.codec.encode(Tick(segment="nse_cm", token="2885", ltp=rng.choice([math.nan, -1.0, 1e308]))),
            rng.randbytes(rng.randrange(0, 200)),
            b"",
        ])  # fmt: skip
        self.pub.send(topic + b"\x00" + header + body)
        self.report.ticks += 1

    def collect(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            for target, sock in self.socks.items():
                while sock.poll(0):
                    frames_ = sock.recv_multipart()
                    if len(frames_) < 3:
                        continue
                    name = self.pending.pop((target, frames_[1]), None)
                    if name is None:
                        continue
                    self._judge(target, name, frames_[2])
            time.sleep(0.002)

    def _judge(self, target: str, name: str, payload: bytes) -> None:
        try:
            msg = self.codec.decode(payload)
        except msgspec.DecodeError as exc:
            self.report.unexpected.append(f"{target}: undecodable reply to {name}: {exc}")
            return
        self.report.replied[target] += 1
        if isinstance(msg, Reply) and not msg.ok:
            self.report.refused[target] += 1
            if not msg.error.strip():
                self.report.reasonless.append(f"{target}: {msg.code or '?'} without a reason for {name}")

    def finish_batch(self) -> None:
        self.collect(3.0)
        if any("'Flatten'" in name for name in self.pending.values()):
            # a flatten answers once the broker has confirmed its cancels, or after its 10 s wait
            self.collect(FLATTEN_ANSWER_S)
        for key, name in list(self.pending.items()):
            self.report.unanswered[key[0]] += 1
            if len(self.report.silent) < 20:
                self.report.silent.append(f"{key[0]}: {name}")
        self.pending.clear()
        for name, proc in self.stack.services.items():
            if proc.poll() is not None:
                self.report.crashes.append(f"{name} exited with {proc.returncode}")
        for t in TARGETS:  # a fresh client each time: the check must not depend on the fuzz socket
            probe = self._dealer(t)
            try:
                probe.send_multipart([b"", b"\1" * 8, self.codec.encode(GetStatus())])
                if not probe.poll(1000):
                    self.report.wedges.append(f"{t}: GetStatus unanswered within 1 s")
                else:
                    probe.recv_multipart()
            finally:
                probe.close(0)

    def close(self) -> None:
        for s in (*self.socks.values(), self.pub):
            s.close(0)


def start_stack() -> Stack:
    stack = Stack(free_base_port())
    for name in ("execution", "risk"):
        stack.start_service(name)
    cfg = load_config(env=stack.env)
    bus = Bus(cfg)
    try:
        for name, ep in (("execution", "execution_rep"), ("risk", "risk_rep")):
            proc = stack.services[name]
            def up(p: Any = proc, n: str = name, e: str = ep) -> bool:
                return answers(p, stack.home, n, lambda m: kit_ask(bus, cfg, e, m, 1000))

            eventually(up, timeout=60, message=f"{name} up")
    finally:
        bus.close()
    return stack


def run(cases: int, seed: int, batch: int = 500) -> Report:
    stack = start_stack()
    fuzzer = Fuzzer(stack)
    rng = random.Random(seed)
    count = 0

    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)  # fmt: skip
    @given(frames())
    def one(case: tuple[str, bytes, bool]) -> None:
        nonlocal count
        fuzzer.send(*case)
        if rng.random() < 0.2:
            fuzzer.tick_frame(rng)
        count += 1
        if count % 50 == 0:
            fuzzer.collect(0.0)
        if count % batch == 0:
            fuzzer.finish_batch()

    try:
        from hypothesis import seed as hseed

        hseed(seed)(one)()
        fuzzer.finish_batch()
        for name in ("execution", "risk"):  # a handler that raised was caught by the reactor: still a defect
            log = stack.home / "log" / f"{name}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            fuzzer.report.crashes.extend(
                f"{name}: {line[:300]}" for line in text.splitlines()
                if '"task_failed"' in line or '"request_handler_failed"' in line
            )
        return fuzzer.report
    finally:
        fuzzer.close()
        for name in list(stack.services):
            stack.stop_service(name)
        stack.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "big"))
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    report = run(args.cases, args.seed, args.batch)
    print(report.table())
    print(f"{args.cases} cases in {time.monotonic() - t0:.0f} s, seed {args.seed}: "
          f"{'ok' if report.ok() else 'FAILED'}")  # fmt: skip
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
