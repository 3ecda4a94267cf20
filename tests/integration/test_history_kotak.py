"""``neopulse history fetch`` through execution on the Kotak REST fake (the real SDK), with a 429
that is waited out, a resume that fetches nothing again, then ``neopulse backtest --history``
running MACD over the stored candles."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.common.messages import FetchHistory, Reply
from tests.fakes.kotak_rest import KotakRestFake
from tests.helpers import eventually
from tests.integration.test_execution_service import ExecStack

ROOT = Path(__file__).resolve().parents[2]
NEOPULSE = str(Path(sys.executable).parent / "neopulse")
RATE_LIMITED = {"code": 429, "error": "Rate limit exceeded", "message": "too many request received"}


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, fake: KotakRestFake) -> Iterator[ExecStack]:
    c = fake.credentials
    s = ExecStack(
        tmp_path / "home",
        pg_url,
        quotes={"RELIANCE-EQ": 1290.0},
        NEOPULSE_EXECUTION__BROKER="kotak",
        NEOPULSE_LIVE="1",
        NEOPULSE_KOTAK__CONSUMER_KEY=c.consumer_key,
        NEOPULSE_KOTAK__MOBILE=c.mobile_number,
        NEOPULSE_KOTAK__UCC=c.ucc,
        NEOPULSE_KOTAK__MPIN=c.mpin,
        NEOPULSE_KOTAK__TOTP_SECRET=c.totp_secret,
        NEOPULSE_KOTAK__BASE_URL=fake.base_url,
        NEOPULSE_KOTAK__SFEED_URL="ws://127.0.0.1:9/feed",
    )
    yield s
    s.close()


def cli(stack: ExecStack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = stack.env
    if args[0] == "backtest":  # a trader's defaults: the intraday square-off and the entry cut-off
        drop = ("NEOPULSE_EXECUTION__SQUARE_OFF_AT", "NEOPULSE_RISK__NO_NEW_ENTRIES_AFTER")
        env = {k: v for k, v in env.items() if k not in drop}
    return subprocess.run([NEOPULSE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def last_week() -> tuple[str, str]:
    """Monday to Friday of the week before this one: wholly past, so its chunks are complete."""
    today = dt.date.today()
    monday = today - dt.timedelta(days=today.weekday() + 7)
    return monday.isoformat(), (monday + dt.timedelta(days=4)).isoformat()


def test_history_fetch_absorbs_a_429_resumes_and_feeds_a_macd_backtest(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: Kotak answers the first historical_data call 429 with Retry-After: 1.
    stack.start()
    first, last = last_week()
    fake.fail_next("historical_data", status=429, body=RATE_LIMITED, headers={"Retry-After": "1"})

    # Act: fetch two symbols.
    run = cli(stack, "history", "fetch", "RELIANCE-EQ", "TCS-EQ", "--from", first, "--to", last,
              "--interval", "1m", "--json")  # fmt: skip

    # Assert: the 429 was waited out and each chunk asked once more only for it.
    assert run.returncode == 0, run.stderr + stack.output()[-2000:]
    summary = json.loads(run.stdout)
    chunks = summary["fetched_chunks"]
    assert chunks >= 2 and summary["stored_chunks"] == 0
    assert summary["candles"] == 2 * 5 * 375  # two symbols, five weekdays, 09:15-15:29
    assert "rate limited" in run.stderr and "waiting 1 s" in run.stderr
    assert len(fake.requests(api="historical_data")) == chunks + 1
    files = sorted((stack.home / "history").rglob("*.parquet"))
    assert {f.parts[-3] for f in files} == {"nse_cm_2885", "nse_cm_11536"} and len(files) == chunks

    # Act/Assert: the same fetch again is a resume with nothing left to fetch (no Kotak call).
    again = cli(stack, "history", "fetch", "RELIANCE-EQ", "TCS-EQ", "--from", first, "--to", last, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["fetched_chunks"] == 0
    assert len(fake.requests(api="historical_data")) == chunks + 1

    # a fetch stopped half way (here: one chunk's file gone) fetches only what is missing
    files[0].unlink()
    resumed = cli(stack, "history", "fetch", "RELIANCE-EQ", "TCS-EQ", "--from", first, "--to", last, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert (json.loads(resumed.stdout)["fetched_chunks"], json.loads(resumed.stdout)["stored_chunks"]) == (
        1, chunks - 1)  # fmt: skip
    assert len(fake.requests(api="historical_data")) == chunks + 2 and files[0].is_file()

    # Act: MACD over the stored candles, through risk and paper execution.
    bt = cli(stack, "backtest", "--history", "RELIANCE-EQ,TCS-EQ", "--from", first, "--to", last,
             "--strategy", "macd", "--json")  # fmt: skip

    # Assert: a report with trades, costs at 0.035 % of turnover.
    assert bt.returncode == 0, bt.stderr
    report = json.loads(bt.stdout)
    s = report["summary"]
    assert report["strategy"] == "macd" and report["ticks"] == 4 * 2 * 5 * 375
    assert report["instruments"] == ["RELIANCE-EQ", "TCS-EQ"]
    assert s["closed_trades"] > 0 and s["turnover"] > 0
    assert len({t["entry_time"][:10] for t in report["trade_list"]}) == 5, report["rejections"]  # every day
    assert s["cost"] == pytest.approx(s["turnover"] * 0.00035, abs=0.02)
    text = cli(stack, "backtest", "--history", "RELIANCE-EQ", "--from", first, "--to", last,
               "--strategy", "macd")  # fmt: skip
    assert text.returncode == 0 and "net PnL" in text.stdout and "cost" in text.stdout


def test_history_refusals_are_one_line(stack: ExecStack, fake: KotakRestFake) -> None:
    stack.start()
    first, last = last_week()

    # a request without the stack's credential (not the operator's CLI) is refused by execution
    client = stack.bus.client(stack.cfg.bus.endpoint("execution_rep"), 3000)
    try:
        reply = client.request(FetchHistory(request_id="h-1", instrument="nse_cm|2885", interval="1min",
                                            from_date=first, to_date=last))  # fmt: skip
    finally:
        client.close()
    assert isinstance(reply, Reply) and not reply.ok and reply.code == "unauthorised"

    unknown = cli(stack, "history", "fetch", "NOSUCH-EQ", "--from", first, "--to", last)
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0
    assert "unknown symbol 'NOSUCH-EQ'" in unknown.stderr

    backwards = cli(stack, "history", "fetch", "RELIANCE-EQ", "--from", last, "--to", first)
    assert backwards.returncode == 2 and "is before --from" in backwards.stderr

    bad_day = cli(stack, "history", "fetch", "RELIANCE-EQ", "--from", "2026-02-30", "--to", last)
    assert bad_day.returncode == 2 and "is not a date" in bad_day.stderr

    nothing = cli(stack, "backtest", "--history", "INFY-EQ", "--from", first, "--to", last,
                  "--strategy", "macd")  # fmt: skip
    assert nothing.returncode == 2 and "no stored 1m candles of INFY-EQ" in nothing.stderr
    assert "Traceback" not in unknown.stderr + backwards.stderr + bad_day.stderr + nothing.stderr
    assert fake.requests(api="historical_data") == []

    # Kotak keeps answering 429: the fetch gives up after --max-wait, in one line, and says so
    fake.fail_next("historical_data", status=429, body=RATE_LIMITED, headers={"Retry-After": "1"}, count=3)
    gave_up = cli(
        stack, "history", "fetch", "RELIANCE-EQ", "--from", first, "--to", first, "--max-wait", "1.5"
    )
    assert gave_up.returncode == 1, gave_up.stderr
    [line] = [x for x in gave_up.stderr.splitlines() if x.startswith("history:")]
    assert "still refused after 2 s" in line and "run the same command later" in line
    assert len(fake.requests(api="historical_data")) == 3


def test_a_slow_history_call_does_not_hold_up_orders_and_a_5xx_is_tried_again(
    stack: ExecStack, fake: KotakRestFake
) -> None:
    # Arrange: the first historical_data call is answered 503 after 3 s.
    stack.start()
    day = last_week()[0]
    fake.fail_next("historical_data", status=503, body={"stat": "Not_Ok", "errMsg": "Service Unavailable"},
                   delay_s=3.0)  # fmt: skip
    proc = subprocess.Popen([NEOPULSE, "history", "fetch", "INFY-EQ", "--from", day, "--to", day, "--json"],
                            cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        eventually(lambda: fake.requests(api="historical_data"), timeout=15, message="the history call")

        # Act: an order while the download is in flight.
        t0 = time.monotonic()
        placed = stack.ok(stack.order(qty=1, price="1200.00"))
        eventually(lambda: stack.find(placed["order_id"])["broker_order_id"], timeout=5)
        took = time.monotonic() - t0
        out, err = proc.communicate(timeout=40)
    finally:
        proc.kill()

    # Assert: the order reached Kotak before the slow history reply; the 503 was tried again.
    assert took < 2.5
    assert proc.returncode == 0, err
    assert "trying again in 2 s" in err and json.loads(out)["candles"] == 375
    assert len(fake.requests(api="historical_data")) == 2


def test_the_paper_broker_has_no_history(tmp_path: Path, pg_url: str) -> None:
    stack = ExecStack(tmp_path / "home", pg_url)
    try:
        stack.start()
        first, last = last_week()
        run = cli(stack, "history", "fetch", "RELIANCE-EQ", "--from", first, "--to", last)
    finally:
        stack.close()
    assert run.returncode == 1
    [line] = [x for x in run.stderr.splitlines() if x.startswith("history:")]
    assert "history needs execution.broker=kotak: the paper broker has no candle history" in line


def test_the_broker_spends_its_budget_backs_off_on_a_429_without_a_relogin_and_fetches_after_logout(
    fake: KotakRestFake,
) -> None:
    from libs.common.config import ExecutionConfig
    from services.execution.brokers import kotak_history as kh
    from services.execution.brokers.kotak import KotakBroker
    from tests.integration.test_kotak_broker import kotak_config

    day = dt.date.fromisoformat(last_week()[0])
    broker = KotakBroker(kotak_config(fake, history_calls_per_min=2), ExecutionConfig(broker_timeout_s=5.0))
    now = [1000.0]
    broker.history_budget = kh.CallBudget(2, clock=lambda: now[0])  # a hand-driven clock
    try:
        # Kotak's 429 (Retry-After 5): refused with that wait, the budget holds it, no new login
        fake.fail_next("historical_data", status=429, body=RATE_LIMITED, headers={"Retry-After": "5"})
        with pytest.raises(kh.HistoryRateLimited) as first:
            broker.historical_candles("nse_cm", "2885", "1min", day, day)
        assert first.value.retry_after_s == 5.0
        with pytest.raises(kh.HistoryRateLimited) as held:
            broker.historical_candles("nse_cm", "2885", "1min", day, day)
        assert held.value.retry_after_s == 5.0
        assert len(fake.requests(api="historical_data")) == 1 and len(fake.requests(api="totp_login")) == 1

        # after the 429's wait: the second call of the minute works; the third is over budget
        now[0] += 5.0
        assert len(broker.historical_candles("nse_cm", "2885", "1min", day, day)) == 375
        with pytest.raises(kh.HistoryRateLimited, match="history_calls_per_min"):
            broker.historical_candles("nse_cm", "2885", "1min", day, day)
        assert len(fake.requests(api="historical_data")) == 2

        # after the day's logout the session's host still serves history
        broker.logout()
        now[0] += 60.0
        assert len(broker.historical_candles("nse_cm", "11536", "D", day, day)) == 1
        with pytest.raises(kh.HistoryRefused, match="invalid or missing input"):
            broker.historical_candles("nse_cm", "99999", "1min", day, day)  # not a Kotak instrument
        assert len(fake.requests(api="totp_login")) == 1
    finally:
        broker.close()
