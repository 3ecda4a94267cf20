"""The notifier's judgement (pure, with a manual clock): what is said, when, and once."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec

from libs.common.clock import IST, ManualClock
from libs.common.config import NotifierConfig
from libs.common.messages import (
    Alert,
    BasketVerdict,
    DayState,
    FeedStatus,
    Fill,
    Heartbeat,
    OrderUpdate,
    RiskState,
    RiskVerdict,
)
from services.notifier.channels.base import TokenBucket, merge
from services.notifier.monitor import CRITICAL, Monitor, Notice, money, parse_time_of_day

WATCHED = {"risk": "tcp://127.0.0.1:7202", "feed": "tcp://127.0.0.1:7101"}


def _clock_at(hh: int, mm: int, ss: int = 0) -> ManualClock:
    # 2024-05-02 is a Thursday
    dt = datetime(2024, 5, 2, hh, mm, ss, tzinfo=IST)
    return ManualClock(int(dt.timestamp() * 1e9))


def _monitor(clock: ManualClock | None = None, **cfg: object) -> Monitor:
    return Monitor(NotifierConfig(**cfg), clock or _clock_at(10, 0), WATCHED)  # type: ignore[arg-type]


def _fill(symbol: str = "RELIANCE-EQ", side: str = "BUY", qty: int = 10) -> Fill:
    return Fill(fill_id="t1", order_id="o1", strategy_id="mom1", symbol=symbol, segment="nse_cm",
                token="2885", side=side, quantity=qty, price=Decimal("2500.05"))


def test_a_fill_is_announced_naming_side_quantity_symbol_and_price() -> None:
    mon = _monitor()

    [notice] = mon.on_message("execution", _fill())

    assert notice.kind == "fill"
    assert notice.symbol == "RELIANCE-EQ"
    assert "BUY 10 RELIANCE-EQ @ 2500.05" in notice.text
    assert mon.day.fills == 1
    assert mon.day.turnover == Decimal("25000.50")


def test_a_rejection_is_announced_with_its_reason_and_an_approval_is_not() -> None:
    mon = _monitor()

    no = RiskVerdict(request_id="r1", approved=False, reason="quantity 5000 > max 1000")
    yes = RiskVerdict(request_id="r2", approved=True, quantity=10)

    rejected = mon.on_message("risk", no, b"verdict.mom1.")
    approved = mon.on_message("risk", yes, b"verdict.mom1.")

    assert [n.kind for n in rejected] == ["rejection"]
    assert "quantity 5000 > max 1000" in rejected[0].text
    assert "[mom1]" in rejected[0].text
    assert approved == []


def test_a_refused_basket_is_announced_with_every_failing_leg_and_an_accepted_one_is_not() -> None:
    mon = _monitor()
    reason = "leg 2 SELL 650 NIFTY25DEC25900PE: quantity 650 > max 500"
    legs = [RiskVerdict(request_id="b1:leg1", approved=True),
            RiskVerdict(request_id="b1:leg2", approved=False)]  # fmt: skip

    refused = mon.on_message("risk", BasketVerdict(request_id="b1", approved=False, reason=reason, legs=legs),
                             b"verdict.cli.")  # fmt: skip
    ok = BasketVerdict(request_id="b2", approved=True, legs=legs)
    accepted = mon.on_message("risk", ok, b"verdict.cli.")

    text = f"⛔ BASKET REJECTED [cli] (b1, 2 legs): {reason}"
    assert [(n.kind, n.text) for n in refused] == [("rejection", text)]
    assert accepted == []


def test_broker_rejection_and_alerts_are_announced() -> None:
    mon = _monitor()
    upd = OrderUpdate(order_id="o", request_id="r", strategy_id="mom1", client_tag="t", symbol="INFY-EQ",
                      segment="nse_cm", token="1594", side="SELL", quantity=5, status="REJECTED",
                      price=Decimal("1500"), reason="RMS: margin exceeded")

    [rej] = mon.on_message("execution", upd)
    [alert] = mon.on_message("risk", Alert(level="CRITICAL", source="risk", text="daily loss limit breached"))
    none = mon.on_message("execution", msgspec.structs.replace(upd, status="COMPLETE"))

    assert "INFY-EQ" in rej.text and "RMS: margin exceeded" in rej.text
    assert alert.level == CRITICAL and "daily loss limit breached" in alert.text
    assert none == []


def test_kill_switch_changes_are_announced_once_each() -> None:
    mon = _monitor()

    start = mon.on_message("risk", RiskState(state="ACTIVE"))
    same = mon.on_message("risk", RiskState(state="ACTIVE"))
    halted = RiskState(state="HALTED", kill_switch=True, reason="operator", net_pnl=-1200.5)
    on = mon.on_message("risk", halted)
    still = mon.on_message("risk", RiskState(state="HALTED", kill_switch=True, reason="operator"))
    off = mon.on_message("risk", RiskState(state="ACTIVE"))

    assert start == [] and same == [] and still == []
    assert [n.kind for n in on] == ["kill_switch"]
    assert on[0].urgent and "KILL SWITCH ON: operator" in on[0].text and "-₹1,200.50" in on[0].text
    assert any(n.kind == "kill_switch" and "OFF" in n.text for n in off)


def test_kill_switch_already_on_at_startup_is_announced() -> None:
    [n] = _monitor().on_message("risk", RiskState(state="HALTED", kill_switch=True, reason="loss"))

    assert n.kind == "kill_switch" and "ON" in n.text


def test_risk_state_reducing_is_announced() -> None:
    mon = _monitor()
    mon.on_message("risk", RiskState(state="ACTIVE"))

    [n] = mon.on_message("risk", RiskState(state="REDUCING", reason="daily loss limit", net_pnl=-5001))

    assert n.kind == "risk" and "ACTIVE → REDUCING" in n.text


def test_feed_live_stale_down_are_announced_on_change_only() -> None:
    mon = _monitor()

    seq = [mon.on_message("feed", FeedStatus(state=s, source="sim", subscribed=5))
           for s in ("CONNECTING", "LIVE", "LIVE", "STALE", "RECONNECTING", "DOWN", "LIVE")]

    texts = [n[0].text if n else None for n in seq]
    assert texts[0] is None and texts[2] is None and texts[4] is None
    assert "Feed LIVE" in texts[1]
    assert "Feed STALE" in texts[3]
    assert "Feed DOWN" in texts[5] and seq[5][0].urgent
    assert "Feed LIVE" in texts[6]


def test_a_silent_service_is_named_once_and_its_return_is_announced() -> None:
    clock = _clock_at(10, 0)
    mon = _monitor(clock)
    mon.on_message("risk", Heartbeat(service="risk", pid=100))
    mon.on_message("feed", Heartbeat(service="feed", pid=200))

    clock.advance(4.5)
    mon.on_message("feed", Heartbeat(service="feed", pid=200))
    assert mon.check() == []
    clock.advance(1.0)
    down = mon.check()
    again = mon.check()
    clock.advance(3)
    back = mon.on_message("risk", Heartbeat(service="risk", pid=300))

    assert [n.kind for n in down] == ["down"]
    assert "risk is DOWN" in down[0].text and "tcp://127.0.0.1:7202" in down[0].text and down[0].urgent
    assert again == []
    assert [n.kind for n in back] == ["up"] and "risk is back" in back[0].text and "300" in back[0].text
    assert mon.down_services() == []


def test_a_service_never_heard_is_reported_after_the_startup_grace() -> None:
    clock = _clock_at(10, 0)
    mon = _monitor(clock)
    mon.on_message("risk", Heartbeat(service="risk", pid=1))

    clock.advance(14)
    mon.on_message("risk", Heartbeat(service="risk", pid=1))
    early = mon.check()
    clock.advance(2)
    mon.on_message("risk", Heartbeat(service="risk", pid=1))
    late = mon.check()

    assert early == []
    assert [n.text.split(" is ")[0] for n in late] == ["🚨 feed"]


def test_a_restart_without_silence_is_noticed_by_the_new_pid() -> None:
    mon = _monitor()
    mon.on_message("risk", Heartbeat(service="risk", pid=1))

    [n] = mon.on_message("risk", Heartbeat(service="risk", pid=2))

    assert "restarted" in n.text


def test_summary_is_due_once_when_the_clock_crosses_summary_at() -> None:
    clock = _clock_at(15, 44, 58)
    mon = _monitor(clock, summary_at="15:45")
    mon.on_message("execution", _fill())

    first = mon.summary_due()
    clock.advance(1)
    before = mon.summary_due()
    clock.advance(2)
    due = mon.summary_due()
    clock.advance(60)
    later = mon.summary_due()

    assert (first, before, due, later) == (False, False, True, False)


def test_summary_is_not_due_when_started_after_summary_at() -> None:
    clock = _clock_at(16, 0)
    mon = _monitor(clock, summary_at="15:45")

    due = [mon.summary_due() for _ in range(3)]

    assert due == [False, False, False]


def test_summary_reports_net_pnl_trades_and_prefers_executions_counts() -> None:
    clock = _clock_at(15, 0)
    mon = _monitor(clock)
    for i in range(3):
        mon.on_message("execution", _fill())
        mon.on_message("risk", RiskState(state="ACTIVE", net_pnl=-100.0 * i, gross_pnl=50.0, cost=12.5,
                                         ts_ns=clock.now_ns()))
        clock.advance(10)

    own = mon.build_summary()
    from_exec = mon.build_summary(DayState(trading_day="2024-05-02", fills=42, turnover=Decimal("123456")))

    assert "daily summary 2024-05-02" in own.text
    assert "Net PnL: -₹200.00" in own.text and "3 fills" in own.text
    assert "42 fills" in from_exec.text and "₹123,456.00" in from_exec.text
    assert len(mon.equity_points()) == 3


def test_equity_chart_is_a_png() -> None:
    from services.notifier.chart import equity_png

    base = 1_714_620_000_000_000_000
    png = equity_png([(base + i * 60_000_000_000, float(i * i - 50)) for i in range(30)], "test")

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 2000


def test_parse_time_of_day_and_money_format() -> None:
    assert parse_time_of_day("15:45") == 15 * 3600 + 45 * 60
    assert parse_time_of_day("09:15:30") == 9 * 3600 + 15 * 60 + 30
    assert money(-1234.5) == "-₹1,234.50"
    assert money(Decimal("1000000")) == "₹1,000,000.00"


def test_merge_counts_fills_and_keeps_critical_first() -> None:
    notices = [Notice("fill", f"FILL BUY 1 SYM{i}-EQ @ 1", symbol=f"SYM{i}-EQ") for i in range(60)]
    notices.insert(30, Notice("down", "risk is DOWN", CRITICAL))

    text = merge(notices, limit=1000)

    assert text.startswith("risk is DOWN\n60 fills: ")
    assert len(text) <= 1000
    assert "more lines" in text


def test_token_bucket_paces_and_pauses() -> None:
    bucket = TokenBucket(rate=2.0, capacity=1)

    assert bucket.wait_time() == 0
    bucket.take()
    assert 0.4 < bucket.wait_time() <= 0.5
    bucket.pause(3)
    assert bucket.wait_time() > 2.9
