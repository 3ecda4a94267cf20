"""``neopulse feed status|subscribe|last|inspect`` — the market-data feed."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from libs.common.clock import IST
from libs.common.instruments import instrument_key
from libs.common.messages import GetLastTicks, GetStatus, Subscribe
from services.admin.cli import app
from services.admin.common import EXIT_USAGE, JSON_OPT, AdminClient, emit, fail

feed_app = typer.Typer(help="The market-data feed: status, subscriptions, last ticks, recordings.",
                       no_args_is_help=True)
app.add_typer(feed_app, name="feed")


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, IST).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ns else "-"


@feed_app.command("status")
def status(as_json: bool = JSON_OPT) -> None:
    """Connection state, source, subscriptions and counters."""
    client = AdminClient()
    try:
        data: dict[str, Any] = client.ask_ok("feed_rep", GetStatus())
    finally:
        client.close()
    src = data.get("source_stats") or {}
    lines = [
        f"feed {data['state']} ({data['source']})  {data.get('detail', '')}",
        f"subscribed {data['subscribed']}  ticks {data['ticks']:,}  {data['ticks_per_s']:,.0f}/s  "
        f"market {'open' if data.get('market_open') else 'closed'}",
    ]
    if data["source"] == "kotak":
        lines.append(f"reconnects {src.get('reconnects', 0)}  garbage {src.get('garbage', 0)}  "
                     f"last packet {src.get('last_packet_age_s', 0):.1f}s ago"
                     + (f"  last error: {src['last_error']}" if src.get("last_error") else ""))
    rec = data.get("recorder")
    if rec:
        lines.append(f"recording {rec['path']}  ({rec['ticks']:,} ticks written)")
    emit(data, as_json, "\n".join(lines))


@feed_app.command("subscribe")
def subscribe(instruments: list[str] = typer.Argument(..., help="Trading symbols or segment|token."),  # noqa: B008
              as_json: bool = JSON_OPT) -> None:
    """Add instruments to the feed (by trading symbol or ``segment|token``)."""
    client = AdminClient()
    try:
        data = client.ask_ok("feed_rep", Subscribe(instruments=instruments, requester="cli"))
    finally:
        client.close()
    emit(data, as_json, f"subscribed {', '.join(data['subscribed'])} "
                        f"({len(data.get('added', []))} new, {data['total']} in total)")


@feed_app.command("last")
def last(instruments: list[str] = typer.Argument(None, help="Instruments (default: all)."),  # noqa: B008
         as_json: bool = JSON_OPT) -> None:
    """The latest tick of each instrument."""
    client = AdminClient()
    try:
        ticks: list[dict[str, Any]] = client.ask_ok("feed_rep", GetLastTicks(instruments=instruments or []))
    finally:
        client.close()
    rows = [f"{'instrument':<22}{'ltp':>12}{'bid':>12}{'ask':>12}{'volume':>14}  time"]
    for t in ticks:
        name = t.get("symbol") or instrument_key(t["segment"], t["token"])
        rows.append(f"{name:<22}{t['ltp']:>12,.2f}{t.get('bid', 0):>12,.2f}{t.get('ask', 0):>12,.2f}"
                    f"{t.get('volume', 0):>14,}  {_time(t.get('exch_ts_ns') or t.get('ts_ns', 0))}")
    emit(ticks, as_json, "\n".join(rows) if ticks else "no ticks yet")


@feed_app.command("inspect")
def inspect(path: Path = typer.Argument(..., help="A .ticks recording, a CSV, or a directory."),  # noqa: B008
            as_json: bool = JSON_OPT) -> None:
    """Summarise a tick recording (what ``feed.source=replay`` would play)."""
    from services.feed.recorder import ReadStats
    from services.feed.sources.replay import iter_ticks

    stats = ReadStats()
    per: dict[str, int] = {}
    first = last_ts = 0
    try:
        for t in iter_ticks(path, stats=stats):
            key = t.symbol or f"{t.segment}|{t.token}"  # instrument_key, inlined: hot path
            per[key] = per.get(key, 0) + 1
            first = first or t.ts_ns
            last_ts = t.ts_ns
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)
    data = {"path": str(path), "ticks": stats.records, "corrupt": stats.corrupt, "instruments": per,
            "first": _time(first), "last": _time(last_ts), "seconds": (last_ts - first) / 1e9}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:10]
    emit(data, as_json, f"{path}: {stats.records:,} ticks, {len(per)} instruments, "
                        f"{data['first']} .. {data['last']}"
                        + (f", {stats.corrupt} corrupt records skipped" if stats.corrupt else "")
                        + "".join(f"\n  {k:<22}{v:>10,}" for k, v in top))
