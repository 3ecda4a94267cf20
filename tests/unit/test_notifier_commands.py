"""Telegram commands as logic: reading updates, commands, the /flatten code, the replies, the
saved offset and the config that turns it on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.common.config import ConfigError, load_config
from libs.common.messages import RiskState
from services.notifier.channels.telegram_updates import OffsetStore, bot_id
from services.notifier.commands import (
    Command,
    FlattenCode,
    Health,
    Update,
    clean,
    flatten_text,
    kill_switch_text,
    parse_command,
    parse_update,
    pnl_text,
    positions_text,
    same_chat,
    status_text,
)


def _raw(text: object, chat: object = -1001234, date: object = 1_700_000_000, uid: object = 7001) -> dict:
    return {"update_id": uid, "message": {"message_id": 1, "date": date, "chat": {"id": chat}, "text": text}}


# --------------------------------------------------------------------------- updates


def test_a_message_update_gives_chat_date_and_text() -> None:
    assert parse_update(_raw("/status")) == Update(7001, "-1001234", 1_700_000_000, "/status")


@pytest.mark.parametrize("raw", [None, [], "x", {}, {"update_id": "7"}, {"update_id": -1},
                                 {"update_id": True}, {"update_id": 1.5}])
def test_an_update_without_a_usable_update_id_is_none(raw: object) -> None:
    assert parse_update(raw) is None


def test_an_edit_or_a_channel_post_is_kept_by_kind_and_never_carries_text() -> None:
    edited = parse_update({"update_id": 9, "edited_message": {"text": "/flatten 1234", "chat": {"id": 1}}})
    post = parse_update({"update_id": 10, "channel_post": {"text": "/halt"}})

    assert edited == Update(9, kind="edited_message")
    assert post is not None and post.kind == "channel_post" and post.text == ""


@pytest.mark.parametrize("message", [
    {"chat": "nope", "date": "today", "text": 5},
    {"chat": {"id": [1]}, "text": None},
    {},
])
def test_a_malformed_message_reads_as_empty_fields(message: dict) -> None:
    update = parse_update({"update_id": 3, "message": message})

    assert update is not None and update.kind == "message"
    assert (update.chat_id, update.text) == ("", "")
    assert not same_chat(update, "-1001234")


def test_only_the_configured_chat_is_the_same_chat() -> None:
    assert same_chat(Update(1, chat_id="-1001234"), "-1001234")
    assert same_chat(Update(1, chat_id="-1001234"), " -1001234 ")
    assert not same_chat(Update(1, chat_id="1001234"), "-1001234")
    assert not same_chat(Update(1, chat_id=""), "")


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(("text", "expected"), [
    ("/status", Command("status", "", "/status")),
    ("  /PnL  ", Command("pnl", "", "/PnL")),
    ("/positions@neopulse_bot", Command("positions", "", "/positions@neopulse_bot")),
    ("/flatten 4821", Command("flatten", "4821", "/flatten")),
    ("/flatten   0042  ", Command("flatten", "0042", "/flatten")),
    ("/halt now please", Command("halt", "now please", "/halt")),
    ("/resume", Command("resume", "", "/resume")),
    ("/buy RELIANCE 10", Command("unknown", "", "/buy")),
])
def test_commands_are_read_from_the_first_word(text: str, expected: Command) -> None:
    assert parse_command(text) == expected


def test_text_that_is_not_a_command_is_none() -> None:
    assert parse_command("halt") is None
    assert parse_command("") is None


def test_nul_bytes_huge_and_non_ascii_text_come_out_short_and_printable() -> None:
    nul = parse_command("/sta\x00tus\x00 \x00")
    huge = parse_command("/" + "ü" * 100_000)
    flatten = parse_command("/flatten " + "9" * 10_000 + "\x07")

    assert nul == Command("unknown", "", "/sta?tus?")
    assert huge is not None and huge.name == "unknown" and len(huge.word) <= 40
    assert flatten is not None and flatten.name == "flatten" and len(flatten.arg) <= 32
    assert all(c.isprintable() for c in flatten.arg)
    assert clean("a\nb\x00c" + "x" * 100, 10) == "a?b?cxxxx…"


# --------------------------------------------------------------------------- the /flatten code


def test_the_code_is_good_once_within_its_time() -> None:
    code = FlattenCode(ttl_s=60)
    sent = code.issue(now=100.0)

    assert len(sent) == 4 and sent.isdigit()
    assert code.redeem(sent, now=159.0) is None
    assert code.redeem(sent, now=159.5) == "no flatten code is pending"


def test_an_expired_code_is_refused() -> None:
    code = FlattenCode(ttl_s=60)
    sent = code.issue(now=100.0)

    assert code.redeem(sent, now=160.5) == f"code {sent} expired (codes last 60 s)"


def test_a_wrong_code_is_refused_and_spends_the_pending_one() -> None:
    code = FlattenCode(ttl_s=60)
    sent = code.issue(now=0.0)
    wrong = f"{(int(sent) + 1) % 10_000:04d}"

    assert code.redeem(wrong, now=1.0) == f"code {wrong} is not the one sent"
    assert code.redeem(sent, now=2.0) == "no flatten code is pending"


def test_no_code_pending_refuses_any_code_and_a_new_code_replaces_the_old() -> None:
    code = FlattenCode(ttl_s=60)

    assert code.redeem("1234", now=0.0) == "no flatten code is pending"
    first = code.issue(now=0.0)
    second = code.issue(now=1.0)
    if first != second:
        assert code.redeem(first, now=2.0) == f"code {first} is not the one sent"
    else:
        assert code.redeem(first, now=2.0) is None


def test_codes_vary() -> None:
    code = FlattenCode()

    assert len({code.issue(0.0) for _ in range(50)}) > 10


# --------------------------------------------------------------------------- replies


def test_status_names_the_kill_switch_risk_and_each_service() -> None:
    risk = {"state": "HALTED", "kill_switch": True, "reason": "telegram /halt", "net_pnl": -12.3}
    health = [Health("feed", True, 0.4), Health("risk", True, 0.2),
              Health("execution", True, 0.9, "degraded", "ledger unavailable: gone"),
              Health("strategy-mom1", False, 12.0), Health("strategy-x", False, None),
              Health("strategy-new", True, None)]

    text = status_text(risk, health)

    assert text.splitlines() == [
        "NeoPulse status",
        "Kill switch ON (telegram /halt) — risk HALTED; net PnL -₹12.30",
        "feed: ok (0.4s ago)",
        "risk: ok (0.2s ago)",
        "execution: DEGRADED (ledger unavailable: gone)",
        "strategy-mom1: DOWN (silent 12s)",
        "strategy-x: DOWN (never heard)",
        "strategy-new: no heartbeat yet",
    ]


def test_status_without_risk_says_so() -> None:
    assert status_text(None, [], "risk did not answer (RequestTimeout)").splitlines()[1] == \
        "Risk: no answer (risk did not answer (RequestTimeout))"
    assert kill_switch_text({"state": "ACTIVE", "kill_switch": False, "net_pnl": "5"}) == \
        "Kill switch off — risk ACTIVE; net PnL ₹5.00"


def test_positions_are_one_line_each_and_flat_ones_are_left_out() -> None:
    rows = [
        {"strategy_id": "mom1", "symbol": "RELIANCE-EQ", "quantity": 5, "avg_price": "1290.5",
         "last_price": 1292.0},
        {"strategy_id": "manual", "symbol": "INFY-EQ", "quantity": -2, "avg_price": "1510", "last_price": 0},
        {"strategy_id": "mom1", "symbol": "TCS-EQ", "quantity": 0, "avg_price": "3100"},
    ]

    assert positions_text(rows).splitlines() == [
        "Open positions: 2",
        "RELIANCE-EQ +5 @ 1,290.50, ltp 1,292.00, MTM ₹7.50 [mom1]",
        "INFY-EQ -2 @ 1,510.00 [manual]",
    ]
    assert positions_text(rows[2:]) == "No open positions"


def test_many_positions_are_cut_short() -> None:
    rows = [{"strategy_id": "s", "symbol": f"S{i}-EQ", "quantity": 1, "avg_price": 1} for i in range(40)]

    lines = positions_text(rows).splitlines()

    assert len(lines) == 27 and lines[-1] == "… and 15 more (neopulse positions)"


def test_pnl_leads_with_net_after_costs() -> None:
    state = RiskState(state="ACTIVE", gross_pnl=100.0, realised_pnl=80.0, unrealised_pnl=20.0, cost=7.25,
                      net_pnl=92.75, turnover=20714.0, open_positions=1)

    assert pnl_text(state).splitlines() == [
        "Net PnL (after costs): ₹92.75",
        "Realised ₹80.00 · unrealised ₹20.00 · costs ₹7.25",
        "Turnover ₹20,714.00 · 1 open · risk ACTIVE",
    ]


def test_the_flatten_report_is_short() -> None:
    report = {"cancelled": 2, "closing": [{"side": "SELL", "quantity": 5, "symbol": "RELIANCE-EQ",
                                          "price": "1289.0", "status": "COMPLETE"}],
              "skipped": [{"symbol": "TCS-EQ", "reason": "no price"}]}

    assert flatten_text(report).splitlines() == [
        "Flatten: cancelled 2 open order(s)",
        "close SELL 5 RELIANCE-EQ @ 1289.0: COMPLETE",
        "NOT closed TCS-EQ: no price",
    ]
    assert flatten_text({"cancelled": 0, "closing": [], "skipped": []}).endswith("no open positions")


# --------------------------------------------------------------------------- the offset on disk


def test_the_offset_survives_a_new_store_and_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "telegram-offset.json"
    store = OffsetStore(path, "424242")

    assert store.load() is None
    store.save(7003)
    store.save(7004)

    assert OffsetStore(path, "424242").load() == 7004
    assert json.loads(path.read_text()) == {"bot": "424242", "offset": 7004}
    assert path.stat().st_mode & 0o077 == 0
    assert [p.name for p in path.parent.iterdir()] == ["telegram-offset.json"]  # no temporary left


def test_an_offset_of_another_bot_or_a_damaged_file_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "telegram-offset.json"
    OffsetStore(path, "111").save(50)

    assert OffsetStore(path, "222").load() is None
    path.write_text("{not json")
    assert OffsetStore(path, "111").load() is None
    path.write_text('{"bot": "111", "offset": -4}')
    assert OffsetStore(path, "111").load() is None


def test_the_bot_id_is_the_public_part_of_the_token_only() -> None:
    assert bot_id("424242:FAKE-secret") == "424242"
    assert bot_id("no-colon-token") == ""


# --------------------------------------------------------------------------- config


def _cfg(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    return load_config(env={"NEOPULSE_ENV_FILE": str(tmp_path / "none.env"), **env})


def test_commands_are_on_by_default_with_a_25s_poll(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)

    assert (cfg.telegram.commands, cfg.telegram.poll_timeout_s, cfg.telegram.confirm_s) == (True, 25, 60.0)


@pytest.mark.parametrize(("env", "needle"), [
    ({"NEOPULSE_TELEGRAM__POLL_TIMEOUT_S": "0"},
     "NEOPULSE_TELEGRAM__POLL_TIMEOUT_S: `telegram.poll_timeout_s`"),
    ({"NEOPULSE_TELEGRAM__POLL_TIMEOUT_S": "90"}, "`telegram.poll_timeout_s`: Expected `int` <= 50"),
    ({"NEOPULSE_TELEGRAM__COMMANDS": "maybe"}, "`telegram.commands`: Expected `bool`"),
    ({"NEOPULSE_TELEGRAM__CONFIRM_S": "0.1"}, "`telegram.confirm_s`"),
    ({"NEOPULSE_TELEGRAM__TOKEN": "1:x", "NEOPULSE_TELEGRAM__CHAT_ID": "@my_channel"},
     "NEOPULSE_TELEGRAM__CHAT_ID: `telegram.chat_id` must be the numeric chat id"),
])
def test_bad_telegram_command_settings_are_one_clear_line(tmp_path: Path, env: dict[str, str],
                                                          needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, **env)

    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "@my_channel" not in str(err.value)  # the chat id is a secret


def test_a_channel_name_is_fine_with_commands_off(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, NEOPULSE_TELEGRAM__TOKEN="1:x", NEOPULSE_TELEGRAM__CHAT_ID="@my_channel",
               NEOPULSE_TELEGRAM__COMMANDS="false")

    assert cfg.telegram.commands is False
