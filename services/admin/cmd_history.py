"""``neopulse history fetch``: download Kotak candles through execution into Parquet files.

Execution holds the Kotak session, so the CLI asks it (``FetchHistory``, the operator's CLI
only) for one chunk at a time: every request is short (one ``historical_data()`` call within
Kotak's range limit), none can time out for the length of the whole fetch, and a fetch
stopped half way keeps every chunk it stored. Execution counts the calls against
``kotak.history_calls_per_min`` and answers ``rate_limited`` with how long to wait (its own
budget, or Kotak's 429 and its Retry-After); the CLI waits that long and asks again. Chunks
already stored and complete are not fetched again. See services/history/store.py for the
files. Exit codes: 0 ok, 1 refused or given up, 2 usage, 3 execution unreachable.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from libs.common.config import home_dir
from services.admin.cli import app
from services.admin.common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    JSON_OPT,
    AdminClient,
    emit,
    fail,
    get_config,
    unauthorised_hint,
)
from services.history.store import INTERVALS, IST, WIRE_INTERVAL, HistoryInputError

if TYPE_CHECKING:
    from libs.common.instruments import Instrument
    from services.history.store import Chunk

history_app = typer.Typer(help="Historical candles from Kotak (historical_data), stored as Parquet.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(history_app, name="history")

UNAVAILABLE_TRIES = 4  # a 5xx or a network error: this many attempts a chunk, 2, 4, 8 s apart
REQUEST_TIMEOUT_MS = 60_000  # one Kotak call (the SDK's own timeout is execution.broker_timeout_s)


class _Again(Exception):
    def __init__(self, reason: str, wait_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s


class _GiveUp(Exception):
    pass


def today_ist() -> dt.date:
    from libs.common.clock import Clock

    return Clock().now(IST).date()


def resolve(names: list[str], home: Path) -> list[Instrument]:
    from libs.common.instruments import MasterData, UnknownInstrument

    master = MasterData.load_for_home(home)
    out: list[Instrument] = []
    for name in names:
        for part in (p.strip() for p in name.split(",")):
            if not part:
                continue
            try:
                inst = master.resolve(part)
            except UnknownInstrument:
                where = home / "master"
                raise HistoryInputError(f"unknown symbol {part!r} (not in the instrument master under "
                                        f"{where}; run `neopulse sync-master`)") from None  # fmt: skip
            if inst.key not in {i.key for i in out}:
                out.append(inst)
    if not out:
        raise HistoryInputError("no symbol given")
    return out


def _fetch_chunk(client: AdminClient, key: str, wire: str, first: dt.date, last: dt.date, *,
                 max_wait_s: float, on_wait: Any) -> list[list[Any]]:  # fmt: skip
    """One chunk, asked again while execution says to wait (up to ``max_wait_s`` in all) and
    after a passing failure (``UNAVAILABLE_TRIES``)."""
    from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay

    from libs.common.messages import FetchHistory, Reply

    failures = 0

    def wait(state: Any) -> float:
        exc = state.outcome.exception()
        return exc.wait_s if isinstance(exc, _Again) else 1.0

    def attempt() -> list[list[Any]]:
        nonlocal failures
        msg = FetchHistory(request_id=f"cli-hist-{uuid.uuid4().hex[:12]}", instrument=key, interval=wire,
                           from_date=first.isoformat(), to_date=last.isoformat())  # fmt: skip
        reply = client.ask("execution_rep", msg, timeout_ms=max(client.timeout_ms, REQUEST_TIMEOUT_MS))
        if not isinstance(reply, Reply):
            raise _GiveUp(f"execution answered {type(reply).__name__}")
        if reply.ok:
            candles = reply.data.get("candles") if isinstance(reply.data, dict) else None
            if not isinstance(candles, list):
                raise _GiveUp("execution's reply holds no candles")
            return candles
        if reply.code == "rate_limited":
            secs = reply.data.get("retry_after_s") if isinstance(reply.data, dict) else None
            secs = float(secs) if isinstance(secs, int | float) and 0 < secs <= 3600 else 60.0
            on_wait(f"{reply.error}: waiting {secs:.0f} s")
            raise _Again(reply.error, secs)
        if reply.code == "unavailable" and failures + 1 < UNAVAILABLE_TRIES:
            failures += 1
            on_wait(f"{reply.error}: trying again in {2**failures} s")
            raise _Again(reply.error, float(2**failures))
        raise _GiveUp(f"{reply.error}{unauthorised_hint(reply)}")

    retrying = Retrying(retry=retry_if_exception_type(_Again), wait=wait, stop=stop_after_delay(max_wait_s),
                        sleep=time.sleep, reraise=False)  # fmt: skip
    try:
        return retrying(attempt)
    except RetryError as exc:
        last_exc = exc.last_attempt.exception()
        why = last_exc.reason if isinstance(last_exc, _Again) else str(last_exc)
        raise _GiveUp(f"still refused after {max_wait_s:.0f} s ({why}); run the same command later: "
                      "the chunks stored so far are kept") from None  # fmt: skip


SymbolsArg = Annotated[list[str], typer.Argument(metavar="SYMBOL...", help="Symbols or segment|token.")]
FromOpt = Annotated[str, typer.Option("--from", metavar="YYYY-MM-DD", help="First day (IST).")]
ToOpt = Annotated[str, typer.Option("--to", metavar="YYYY-MM-DD", help="Last day (IST), included.")]
IntervalOpt = Annotated[str, typer.Option("--interval", help=f"Candle length: {', '.join(INTERVALS)}.")]
MaxWaitOpt = Annotated[
    float, typer.Option("--max-wait", min=1.0, help="Give up on a chunk still refused after this long (s).")
]


@history_app.command("fetch")
def fetch(  # noqa: PLR0917 - one parameter per CLI option
    symbols: SymbolsArg,
    from_: FromOpt,
    to: ToOpt,
    interval: IntervalOpt = "1m",
    max_wait: MaxWaitOpt = 900.0,
    as_json: bool = JSON_OPT,
) -> None:
    """Download candles through execution (needs execution.broker=kotak) into
    $NEOPULSE_HOME/history/. Long ranges go as many small requests within Kotak's range limits
    and kotak.history_calls_per_min; a 429 is waited out (Retry-After); chunks already stored
    are not fetched again, so the same command resumes a fetch that stopped."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from services.history.store import check_range, parse_day

    cfg = get_config()
    home = home_dir()
    try:
        if interval not in INTERVALS:
            raise HistoryInputError(f"--interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
        first, last = parse_day(from_, "--from"), parse_day(to, "--to")
        today = today_ist()
        check_range(first, last, today)
        last = min(last, today)
        insts = resolve(symbols, home)
    except HistoryInputError as exc:
        fail(f"history: {exc}", EXIT_USAGE)
    plan, stored = _plan(home, insts, first, last, interval)
    wire = WIRE_INTERVAL[interval]
    fetched = candles_n = 0
    err = Console(stderr=True)
    client = AdminClient(cfg) if plan else None
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=False, disable=not plan) as bar:
            task = bar.add_task("history", total=len(plan))
            for inst, chunk, path in plan:
                bar.update(task, description=f"{inst.symbol} {chunk.first}..{chunk.last}")
                assert client is not None

                def note(text: str, symbol: str = inst.symbol) -> None:
                    err.print(f"  {symbol}: {text}", soft_wrap=True, markup=False, highlight=False)

                try:
                    rows = _fetch_chunk(client, inst.key, wire, chunk.first, chunk.last, max_wait_s=max_wait,
                                        on_wait=note)  # fmt: skip
                except _GiveUp as exc:
                    fail(f"history: {inst.symbol} {chunk.first}..{chunk.last}: {exc} "
                         f"({fetched} chunk(s) fetched, {stored} already stored)", EXIT_REFUSED)  # fmt: skip
                _store(path, chunk, rows, today, inst.symbol)
                fetched += 1
                candles_n += len(rows)
                bar.advance(task)
    finally:
        if client is not None:
            client.close()
    where = home / "history"
    summary = {"fetched_chunks": fetched, "stored_chunks": stored, "candles": candles_n,
               "symbols": [i.symbol for i in insts], "interval": interval, "from": first.isoformat(),
               "to": last.isoformat(), "path": str(where)}  # fmt: skip
    emit(summary, as_json, f"history: {', '.join(i.symbol for i in insts)} {interval} {first}..{last}: "
                           f"{fetched} chunk(s) fetched ({candles_n} candles), {stored} already stored, "
                           f"in {where}")  # fmt: skip


def _plan(home: Path, insts: list[Instrument], first: dt.date, last: dt.date,
          interval: str) -> tuple[list[tuple[Instrument, Chunk, Path]], int]:  # fmt: skip
    """The chunks still to fetch, and how many are stored already (complete, covering the days)."""
    from services.history.store import chunk_path, chunks, stored_covers, widened

    plan: list[tuple[Instrument, Chunk, Path]] = []
    stored = 0
    for inst in insts:
        for chunk in chunks(first, last, interval):
            path = chunk_path(home, inst.key, interval, chunk.start)
            if stored_covers(path, chunk):
                stored += 1
            else:
                plan.append((inst, widened(path, chunk), path))
    return plan, stored


def _store(path: Path, chunk: Chunk, rows: list[list[Any]], today: dt.date, symbol: str) -> None:
    from services.history.store import write_chunk

    try:
        write_chunk(path, chunk, rows, today, symbol)
    except (OSError, ValueError, TypeError) as exc:  # disk full, no permission, a bad row
        fail(f"history: {symbol} {chunk.first}..{chunk.last} not stored in {path}: {exc}", EXIT_REFUSED)


def history_ticks(home: Path, names: list[str], interval: str, from_: str, to: str) -> tuple[Any, list[str]]:
    """The ticks ``neopulse backtest --history`` replays, and the instrument keys."""
    from services.history.replay import candle_ticks, merged
    from services.history.store import INTERVAL_S, check_range, parse_day, read_candles

    if interval not in INTERVALS:
        raise HistoryInputError(f"--interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    if not from_ or not to:
        raise HistoryInputError("--history needs --from and --to (YYYY-MM-DD)")
    first, last = parse_day(from_, "--from"), parse_day(to, "--to")
    check_range(first, last, today_ist())
    streams = []
    keys = []
    for inst in resolve(names, home):
        rows = read_candles(home, inst.key, interval, first, last)
        if not rows:
            raise HistoryInputError(f"no stored {interval} candles of {inst.symbol} in {first}..{last}; "
                                    f"run `neopulse history fetch {inst.symbol} --from {first} --to {last} "
                                    f"--interval {interval}`")  # fmt: skip
        streams.append(candle_ticks(inst.key, inst.symbol, rows, INTERVAL_S[interval]))
        keys.append(inst.key)
    return merged(streams), keys
