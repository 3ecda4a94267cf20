"""``neopulse chain NIFTY [--expiry weekly] [--strikes 10]`` — a live option chain.

The chain (which contracts, which expiry) comes from the local instrument master
(``$NEOPULSE_HOME/master/*.csv``, else the bundled sample), the prices from the feed's last
ticks. Contracts the feed is not publishing yet are subscribed first (they stay subscribed,
like ``neopulse feed subscribe``), then the command waits up to ``--wait`` seconds for their
first ticks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from decimal import Decimal
from typing import Any

import msgspec
import typer

from libs.common.chain import Chain, ChainError, chain, spot_instrument
from libs.common.clock import IST, Clock
from libs.common.config import ConfigError, home_dir
from libs.common.instruments import Instrument, MasterData
from libs.common.messages import GetLastTicks, Reply, Subscribe, Tick
from services.admin.cli import app
from services.admin.common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    JSON_OPT,
    AdminClient,
    emit,
    fail,
    get_config,
)

POLL_S = 0.1
REQUESTER = "neopulse-chain"


def _strike_text(strike: Decimal) -> str:
    return format(strike.normalize(), "f")


def _refused(what: str, reply: Any) -> None:
    if isinstance(reply, Reply) and reply.ok:
        return
    error = reply.error if isinstance(reply, Reply) else type(reply).__name__
    hint = ""
    if isinstance(reply, Reply) and reply.code == "unknown_instrument":
        hint = (" — the feed's instrument master lacks contracts this one lists (restart the feed "
                "after a new trading day or `neopulse sync-master`)")
    fail(f"refused: the feed would not {what}: {error}{hint}", EXIT_REFUSED)


def _last_ticks(admin: AdminClient, keys: list[str]) -> dict[str, Tick]:
    if not keys:
        return {}
    reply = admin.ask("feed_rep", GetLastTicks(instruments=keys))
    _refused("give the last ticks", reply)
    assert isinstance(reply, Reply)
    out: dict[str, Tick] = {}
    for raw in reply.data if isinstance(reply.data, list) else []:
        with contextlib.suppress(msgspec.ValidationError):
            tick = msgspec.convert(raw, Tick)
            out[f"{tick.segment}|{tick.token}"] = tick  # instrument_key, inlined
    return out


def _live_ticks(admin: AdminClient, keys: list[str], wait_s: float) -> dict[str, Tick]:
    """The last tick of each key, subscribing those without one and waiting for them."""
    ticks = _last_ticks(admin, keys)
    missing = [k for k in keys if k not in ticks]
    if not missing:
        return ticks
    reply = admin.ask("feed_rep", Subscribe(instruments=missing, requester=REQUESTER))
    _refused("subscribe the chain", reply)
    deadline = time.monotonic() + wait_s
    while missing and time.monotonic() < deadline:
        time.sleep(POLL_S)
        ticks.update(_last_ticks(admin, missing))
        missing = [k for k in keys if k not in ticks]
    return ticks


def _side(inst: Instrument | None, ticks: dict[str, Tick]) -> dict[str, Any] | None:
    if inst is None:
        return None
    tick = ticks.get(inst.key)
    row: dict[str, Any] = {"symbol": inst.symbol, "key": inst.key}
    if tick is None:
        return {**row, "ltp": None}
    change = tick.ltp - tick.close if tick.close else None
    return {
        **row,
        "ltp": tick.ltp,
        "change": round(change, 2) if change is not None else None,
        "change_pct": round(change / tick.close * 100, 2) if change is not None else None,
        "oi": tick.oi,
        "bid": tick.bid,
        "ask": tick.ask,
        "volume": tick.volume,
    }


def build_rows(
    ch: Chain, strikes: list[Decimal], atm: Decimal, ticks: dict[str, Tick]
) -> list[dict[str, Any]]:
    """One row per strike: the call's and the put's prices (None for a contract not listed)."""
    return [
        {
            "strike": _strike_text(strike),
            "atm": strike == atm,
            "CE": _side(ch.get(strike, "CE"), ticks),
            "PE": _side(ch.get(strike, "PE"), ticks),
        }
        for strike in strikes
    ]


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _render(data: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    spot = data["spot"]
    spot_text = (f"{spot['symbol']} {_money(spot['ltp'])}" if spot and spot.get("ltp") is not None
                 else f"{spot['symbol']} (no price yet)" if spot else "no index in the master")
    title = (f"{data['underlying']} options expiring {data['expiry']} ({data['expiry_spec']})  ·  "
             f"spot {spot_text}  ·  ATM {data['atm']}  ·  lot {data['lot_size']}")
    table = Table(title=title, title_justify="left", expand=False)
    for name in ("CE OI", "CE CHG", "CE LTP", "CE BID / ASK"):
        table.add_column(name, justify="right")
    table.add_column("STRIKE", justify="center")
    for name in ("PE BID / ASK", "PE LTP", "PE CHG", "PE OI"):
        table.add_column(name, justify="right")

    def cells(side: dict[str, Any] | None) -> list[Any]:
        if side is None:
            return ["", "", "not listed", ""]
        if side["ltp"] is None:
            return ["-", "-", "no tick", "-"]
        chg = side["change"]
        colour = "green" if chg and chg > 0 else "red" if chg and chg < 0 else ""
        return [f"{side['oi']:,}", Text("-" if chg is None else f"{chg:+,.2f}", style=colour),
                _money(side["ltp"]), f"{_money(side['bid'])} / {_money(side['ask'])}"]

    for row in data["rows"]:
        ce, pe = cells(row["CE"]), cells(row["PE"])
        strike = Text(f"▶ {row['strike']} ◀" if row["atm"] else row["strike"],
                      style="bold reverse" if row["atm"] else "bold")
        table.add_row(*ce, strike, pe[3], pe[2], pe[1], pe[0], style="bold" if row["atm"] else "")
    return table


@app.command("chain")
def chain_cmd(
    underlying: str = typer.Argument(..., help="The underlying: NIFTY, BANKNIFTY, FINNIFTY, MIDCPNIFTY, "
                                               "SENSEX, or a stock with options (RELIANCE)."),
    expiry: str = typer.Option("weekly", "--expiry", "-e",
                               help="weekly (the nearest listed expiry), next-weekly, monthly (the "
                                    "nearest month's last expiry) or a date YYYY-MM-DD."),
    strikes: int = typer.Option(10, "--strikes", "-n", min=0, max=200,
                                help="Strikes shown on each side of the at-the-money strike."),
    wait: float = typer.Option(3.0, "--wait", min=0, max=60,
                               help="Seconds to wait for the first ticks of contracts the feed was "
                                    "not publishing yet."),
    as_json: bool = JSON_OPT,
) -> None:
    """A live option chain: the call's and the put's OI, change, LTP and bid/ask per strike.

    The at-the-money strike, the one nearest the index's last price, is marked.
    Contracts come from the local instrument master, for today's trading day.
    Prices come from the feed, which is asked to subscribe contracts it is not publishing yet.
    Exit codes: 0 shown, 1 the feed refused, 2 no such underlying or expiry, 3 feed unreachable.
    """
    cfg = get_config()
    try:
        master = MasterData.load_for_home(home_dir())
        today = Clock().now(IST).date()
    except (OSError, ValueError, ConfigError) as exc:
        fail(f"cannot read the instrument master: {exc}", EXIT_USAGE)
    try:
        ch = chain(master, underlying, expiry, today)
    except ChainError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        admin = AdminClient(cfg)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        data = _chain_data(admin, master, ch, expiry, strikes, wait, today)
    finally:
        admin.close()
    if as_json:
        emit(data, True)
        return
    from rich.console import Console

    console = Console(width=None if _tty() else 160)
    console.print(_render(data))
    missing = sum(1 for r in data["rows"] for k in ("CE", "PE") if r[k] is not None and r[k]["ltp"] is None)
    if missing:
        console.print(f"{missing} contracts had no tick within {wait:g} s "
                      "(is the feed LIVE? see `neopulse feed status`)")


def _tty() -> bool:
    import sys

    return sys.stdout.isatty()


def _chain_data(  # noqa: PLR0917 - one command's inputs
    admin: AdminClient, master: MasterData, ch: Chain, spec: str, strikes: int, wait: float, today: dt.date
) -> dict[str, Any]:
    spot = spot_instrument(master, ch.underlying)
    spot_tick = _live_ticks(admin, [spot.key], wait).get(spot.key) if spot is not None else None
    # Centre on the index's last price; without one, on the middle of the listed strikes.
    centre = Decimal(str(spot_tick.ltp)) if spot_tick is not None else ch.strikes[len(ch.strikes) // 2]
    atm = ch.atm(centre)
    window = ch.near(atm, strikes)
    insts = ch.instruments(window)
    ticks = _live_ticks(admin, [i.key for i in insts], wait)
    return {
        "underlying": ch.underlying,
        "expiry": ch.expiry.isoformat(),
        "expiry_spec": spec,
        "trading_day": today.isoformat(),
        "spot": {"symbol": spot.symbol, "key": spot.key, "ltp": spot_tick.ltp if spot_tick else None}
        if spot is not None else None,
        "atm": _strike_text(atm),
        "step": _strike_text(ch.step),
        "lot_size": insts[0].lot_size if insts else None,
        "rows": build_rows(ch, window, atm, ticks),
    }
