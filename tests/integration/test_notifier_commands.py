"""Telegram commands end to end: the fake Bot API's ``getUpdates`` in, real notifier, risk,
execution (paper broker, a database of the session's PostgreSQL) and sim feed processes, the
kill switch and the positions read back over the bus and with the real CLI.

The poller alone (faults of the far end) first; then one stack for the module, whose tests
run in file order (the flatten tests need the position the one before opens).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.config import TelegramConfig
from libs.common.messages import (
    CancelEntries,
    Flatten,
    GetPositions,
    KillSwitch,
    RecordRiskEvent,
    Reply,
)
from libs.common.stack_secret import NOTIFIER_FILE, read_secret
from services.notifier.channels.telegram_updates import OffsetStore, UpdatePoller
from tests.fakes.telegram_server import TelegramFake
from tests.helpers import eventually, free_base_port, free_port
from tests.integration.conftest import cloned_db
from tests.integration.risk_support import Stack
from tests.kit import execute_order, order_request, processes

TOKEN = "424242:FAKE-telegram-TOKEN-commands"
CHAT = "-1009876"
OTHER_CHAT = "555001"
CONFIRM_S = 3.0


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for e, kw in self.events if e == event]


# --------------------------------------------------------------------------- the poller alone


def _poller(api_url: str, tmp_path: Path, log: _Log, sink: list[Any],
            saved: list[int | None] | None = None) -> UpdatePoller:
    cfg = TelegramConfig(token=TOKEN, chat_id=CHAT, api_url=api_url, poll_timeout_s=1)
    offsets = OffsetStore(tmp_path / "state" / "telegram-offset.json", "424242")

    def deliver(batch: list[Any]) -> None:
        if saved is not None:
            saved.append(offsets.load())  # what is on disk when the batch is handed over
        sink.extend(batch)

    poller = UpdatePoller(cfg, log, offsets, deliver, backoff_s=(0.05, 0.2))
    poller.start()
    return poller


def test_updates_are_long_polled_and_the_offset_is_saved_before_they_are_handed_over(
    tmp_path: Path,
) -> None:
    log, got, saved = _Log(), [], []
    with TelegramFake(TOKEN) as tg:
        poller = _poller(tg.api_url, tmp_path, log, got, saved)
        eventually(lambda: tg.polls, 5, message="first poll")
        time.sleep(0.5)  # an idle long poll waits: no busy loop against the server
        idle_polls = len(tg.polls)

        first = tg.inject("/status", CHAT)
        second = tg.inject("/pnl", CHAT)
        eventually(lambda: len(got) == 2, 5, message="both updates handed over")
        eventually(lambda: any(p.offset == second + 1 for p in tg.polls), 5, message="the next poll")
        poller.close()

    assert idle_polls <= 2
    assert [u["update_id"] for u in got] == [first, second]
    assert saved and all(s is not None and s > first for s in saved)
    assert OffsetStore(tmp_path / "state" / "telegram-offset.json", "424242").load() == second + 1
    assert all(p.timeout == 1 for p in tg.polls)
    assert not log.named("telegram_poll_failed")


def test_409_429_5xx_malformed_replies_and_a_dead_port_are_one_line_each_and_polling_goes_on(
    tmp_path: Path,
) -> None:
    log, got = _Log(), []
    with TelegramFake(TOKEN) as tg:
        tg.fail_polls(1, 409)
        tg.fail_polls(1, 502)
        tg.fail_polls(1, 200, body=b"<html>not json</html>")
        tg.fail_polls(1, 200, body=b'{"ok": true, "result": {"not": "a list"}}')
        tg.fail_polls(1, 401)
        tg.fail_polls(1, 429)  # retry_after 1
        uid = tg.inject("/status", CHAT)
        poller = _poller(tg.api_url, tmp_path, log, got)
        eventually(lambda: got, 10, message="the update after the failures")
        poller.close()
    dead_log: _Log = _Log()
    dead = _poller(f"http://127.0.0.1:{free_port()}", tmp_path / "dead", dead_log, [])
    eventually(lambda: len(dead_log.named("telegram_poll_failed")) >= 2, 5, message="network errors")
    dead.close()

    failures = log.named("telegram_poll_failed")
    assert [u["update_id"] for u in got] == [uid]
    assert len(failures) == 6
    errors = [f["error"] for f in failures]
    assert errors[0].startswith("409 Conflict") and errors[1].startswith("502")
    assert "not JSON" in errors[2] and "without a result list" in errors[3]
    assert errors[4].startswith("401") and errors[5].startswith("429")
    assert all(f["wait_s"] <= 1.0 for f in failures)
    assert "network: ConnectError" in dead_log.named("telegram_poll_failed")[0]["error"]
    for event, kw in log.events + dead_log.events:
        assert TOKEN not in repr(kw) and TOKEN.split(":")[1] not in repr(kw), event


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def telegram() -> Iterator[TelegramFake]:
    with TelegramFake(TOKEN) as fake:
        yield fake


class Steered:
    """The stack, the fake Bot API and the notifier process, with the trader's phone."""

    def __init__(self, s: Stack, tg: TelegramFake) -> None:
        self.s = s
        self.tg = tg
        self.notifier: Any = None

    def start_notifier(self) -> None:
        seen, polls = len(self.s.output("notifier")), len(self.tg.polls)
        self.notifier = processes.spawn(self.s.home, "notifier", self.s.env)

        def up() -> bool:
            if self.notifier.poll() is not None:
                raise RuntimeError(f"notifier exited: {self.s.output('notifier')[-3000:]}")
            return "notifier started" in self.s.output("notifier")[seen:] and len(self.tg.polls) > polls
        eventually(up, 20, message="the notifier to start")

    def stop_notifier(self) -> int:
        return processes.stop(self.notifier)

    def say(self, text: str, needle: str, timeout: float = 10.0, **kw: Any) -> str:
        """Send ``text`` from the trader's chat; the first new reply containing ``needle``."""
        before = len(self.tg.replies_to(CHAT))
        self.tg.inject(text, CHAT, **kw)
        return str(eventually(lambda: next((t for t in self.tg.replies_to(CHAT)[before:] if needle in t),
                                           None), timeout, message=f"a reply with {needle!r} to {text!r}"))

    def kill_switch(self) -> bool:
        reply = self.s.ask("risk_rep", KillSwitch(query=True, source="test"))
        assert isinstance(reply, Reply) and reply.ok, reply
        return bool(reply.data.get("kill_switch"))

    def positions(self) -> dict[str, int]:
        reply = self.s.ask("execution_rep", GetPositions())
        assert isinstance(reply, Reply) and reply.ok, reply
        return {f"{p['strategy_id']} {p['symbol']}": p["quantity"] for p in reply.data if p["quantity"]}

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return [ln for ln in self.s.log_lines("notifier") if ln.get("event") == event]


@pytest.fixture(scope="module")
def steered(tmp_path_factory: pytest.TempPathFactory, pg_server: Any,
            telegram: TelegramFake) -> Iterator[Steered]:
    tmp = tmp_path_factory.mktemp("tg-stack")
    toml = tmp / "neopulse.toml"
    toml.write_text("strategy = []\n")
    with cloned_db(pg_server, f"np_tg_{os.getpid()}") as url:
        s = Stack(tmp / "home", free_base_port(), NEOPULSE_CONFIG=str(toml), NEOPULSE_DATABASE__URL=url,
                  NEOPULSE_FEED__INSTRUMENTS='["RELIANCE-EQ"]', NEOPULSE_FEED__RECORD="false",
                  NEOPULSE_FEED__SIM_VOLATILITY="0", NEOPULSE_FEED__SIM_RATE="50",
                  NEOPULSE_TELEGRAM__TOKEN=TOKEN, NEOPULSE_TELEGRAM__CHAT_ID=CHAT,
                  NEOPULSE_TELEGRAM__API_URL=telegram.api_url, NEOPULSE_TELEGRAM__MAX_PER_SEC="20",
                  NEOPULSE_TELEGRAM__POLL_TIMEOUT_S="2", NEOPULSE_TELEGRAM__CONFIRM_S=str(CONFIRM_S),
                  NEOPULSE_NOTIFIER__AGGREGATE_MS="50")
        steered = Steered(s, telegram)
        try:
            s.start("execution")
            s.start("feed")
            s.start("risk")
            steered.start_notifier()
            eventually(lambda: s.status()["day_loaded"], timeout=15, message="risk to load the day")
            yield steered
        finally:
            if steered.notifier is not None:
                steered.stop_notifier()
            s.close()


def test_status_pnl_and_positions_answer_the_configured_chat(steered: Steered) -> None:
    def all_heard() -> str | None:  # the notifier, just started, may not have heard everyone yet
        text = steered.say("/status", "NeoPulse status")
        return text if "yet" not in text else None
    status = eventually(all_heard, 10, 0.2, message="a /status with every service heard")
    pnl = steered.say("/pnl", "Net PnL (after costs)")
    positions = steered.say("/positions@neopulse_bot", "No open positions")
    helped = steered.say("/buy RELIANCE-EQ 10", "Unknown command /buy")

    assert "Kill switch off — risk ACTIVE" in status
    assert re.search(r"^risk: ok", status, re.M) and re.search(r"^execution: ok", status, re.M)
    assert "feed: ok" in status
    assert "Realised ₹0.00" in pnl and "risk ACTIVE" in pnl
    assert positions == "No open positions"
    assert "Commands: /status" in helped and not steered.positions()  # nothing was ordered


def test_halt_from_another_chat_does_nothing_and_gets_no_answer(steered: Steered) -> None:
    uid = steered.tg.inject("/halt", OTHER_CHAT)
    for _ in range(20):  # a stranger's flood
        steered.tg.inject(f"/flatten {'1' * 4}", OTHER_CHAT)
    steered.say("/status", "NeoPulse status")  # everything before it has been handled

    lines = steered.log_events("telegram_foreign_chat")
    assert len(lines) == 1, lines  # one line per chat per 10 s, not one per message
    assert lines[0]["update_id"] == uid and lines[0]["chat_id"] == OTHER_CHAT
    assert lines[0]["level"] == "warning" and lines[0]["text"] == "/halt"
    assert steered.kill_switch() is False
    assert steered.tg.replies_to(OTHER_CHAT) == []


def test_halt_trips_the_kill_switch_and_resume_resets_it(steered: Steered) -> None:
    halted = steered.say("/halt", "Kill switch ON")
    cli_rc, cli_state = steered.s.cli_json("kill-switch", "status")

    assert "risk HALTED" in halted
    assert cli_rc == 0 and cli_state.get("kill_switch") is True and cli_state["state"] == "HALTED"
    assert "telegram /halt" in cli_state["reason"]

    resumed = steered.say("/resume", "Kill switch off")

    assert "risk ACTIVE" in resumed
    assert steered.kill_switch() is False


def test_flatten_without_the_right_code_or_too_late_does_nothing(steered: Steered) -> None:
    reply = steered.s.ask("risk_rep", order_request("RELIANCE-EQ", "BUY", 5, strategy="manual",
                                                    rid=f"tg-open-{os.getpid()}", purpose="MANUAL"),
                          timeout_ms=8000)
    assert getattr(reply, "approved", False), reply
    eventually(lambda: steered.positions() == {"manual RELIANCE-EQ": 5}, 10, message="the position open")

    asked = steered.say("/flatten", "To confirm, send /flatten ")
    code = re.search(r"/flatten (\d{4})", asked)
    assert code is not None
    wrong = f"{(int(code[1]) + 1) % 10_000:04d}"
    refused = steered.say(f"/flatten {wrong}", "Nothing done")
    spent = steered.say(f"/flatten {code[1]}", "Nothing done")  # a wrong code spent the right one too
    late_code = re.search(r"/flatten (\d{4})", steered.say("/flatten", "To confirm"))
    assert late_code is not None
    time.sleep(CONFIRM_S + 0.3)
    late = steered.say(f"/flatten {late_code[1]}", "Nothing done")

    assert f"code {wrong} is not the one sent" in refused
    assert "no flatten code is pending" in spent
    assert "expired" in late
    assert "Risk is ACTIVE" in asked  # strategies could re-enter: it says /halt first
    assert steered.positions() == {"manual RELIANCE-EQ": 5}
    assert not steered.log_events("telegram_flatten")


def test_flatten_with_the_code_closes_every_position(steered: Steered) -> None:
    assert steered.positions() == {"manual RELIANCE-EQ": 5}
    code = re.search(r"/flatten (\d{4})", steered.say("/flatten", "To confirm"))
    assert code is not None

    done = steered.say(f"/flatten {code[1]}", "Flatten: cancelled", timeout=30)

    assert "close SELL 5 RELIANCE-EQ" in done
    eventually(lambda: steered.positions() == {}, 10, message="positions flat")
    assert len(steered.log_events("telegram_flatten")) == 1


def test_a_command_sent_before_the_notifier_started_is_ignored(steered: Steered) -> None:
    stale = int(time.time()) - 600

    ignored = steered.say("/halt", "Ignored /halt", date=stale)

    assert "before the notifier started" in ignored
    assert steered.kill_switch() is False


def test_malformed_huge_and_nul_updates_never_stop_the_notifier(steered: Steered) -> None:
    tg = steered.tg
    tg.inject_raw({"update_id": tg.inject("/status", OTHER_CHAT) + 1, "message": "garbage"})
    tg.inject_raw({"update_id": "nope"})  # alone in a reply: a malformed reply, backed off
    tg.inject_raw({"update_id": tg.inject("x", OTHER_CHAT) + 1, "edited_message": {"text": "/halt"}})

    huge = steered.say("/" + "ж" * 50_000, "Unknown command")
    nul = steered.say("/sta\x00tus", "Unknown command /sta?tus")
    alive = steered.say("/status", "NeoPulse status")

    assert len(huge) < 300 and "risk" in alive
    assert steered.notifier.poll() is None and steered.kill_switch() is False
    assert nul


def test_a_restart_does_not_replay_a_command(steered: Steered) -> None:
    tg = steered.tg
    tg.keep_confirmed = True  # as if Telegram still had every update: only our offset protects us
    # Dated ahead, so the stale check cannot be what keeps it from running twice.
    uid = tg.inject("/halt", CHAT, date=int(time.time()) + 300)
    eventually(steered.kill_switch, 10, message="the kill switch on")
    steered.s.ask("risk_rep", KillSwitch(on=False, source="test", request_id=f"tg-reset-{os.getpid()}"))
    assert steered.kill_switch() is False
    assert steered.stop_notifier() == 0
    polls_before = len(tg.polls)

    steered.start_notifier()
    eventually(lambda: len(tg.polls) >= polls_before + 2, 10, message="two polls after the restart")

    assert tg.polls[polls_before].offset == uid + 1  # the saved offset, from the first poll
    assert steered.kill_switch() is False
    tg.keep_confirmed = False


def test_the_notifiers_credential_flattens_and_cannot_place_or_cancel(steered: Steered) -> None:
    s = steered.s
    secret = read_secret(s.home, NOTIFIER_FILE)
    assert secret is not None and len(secret) == 64

    def as_notifier(msg: Any) -> Any:
        client = s.bus.client(s.cfg.bus.endpoint("execution_rep"), 10_000)
        client.credential = lambda: secret
        try:
            return client.request(msg)
        finally:
            client.close()

    order = as_notifier(execute_order("RELIANCE-EQ", "BUY", 1, "1000.00", strategy="tg-intruder",
                                      rid=f"tg-intruder-{os.getpid()}"))
    cancel = as_notifier(CancelEntries(request_id=f"tg-cancel-{os.getpid()}"))
    record = as_notifier(RecordRiskEvent(event="kill_switch_off", reason="intruder", source="telegram",
                                         request_id=f"tg-rec-{os.getpid()}"))
    flatten = as_notifier(Flatten(request_id=f"tg-flat-{os.getpid()}", strategy_id="nobody",
                                  source="telegram"))

    for reply, kind in ((order, "ExecuteOrder"), (cancel, "CancelEntries"), (record, "RecordRiskEvent")):
        assert isinstance(reply, Reply) and (reply.ok, reply.code) == (False, "unauthorised"), reply
        assert f"execution takes {kind} only from" in reply.error
        assert "the notifier's credential" in reply.error
    assert isinstance(order, Reply) and "only from risk;" in order.error
    assert isinstance(flatten, Reply) and flatten.ok, flatten
    assert not steered.positions()
    texts = [p.read_text(errors="replace") for p in (s.home / "log").glob("*.log*")]
    assert not any(secret.decode() in t for t in texts)
    assert not any(TOKEN in t or TOKEN.split(":")[1] in t for t in texts)
