"""Operator commands: ``status``, ``config show``, ``watch``, ``logs`` and ``keys generate``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import typer
import zmq

from libs.common import config as config_mod
from libs.common import latency
from libs.common.config import Config, ConfigError, redacted
from libs.common.instruments import instrument_key
from libs.common.messages import FeedStatus, GetLastTicks, GetStatus, Heartbeat, Reply, Subscribe, Tick
from services.admin.cli import app
from services.admin.common import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    JSON_OPT,
    AdminClient,
    emit,
    fail,
    get_config,
)

CORE = (("feed", "feed_pub"), ("risk", "risk_pub"), ("execution", "execution_pub"),
        ("notifier", "notifier_pub"))


def _admin(cfg: Config, timeout_ms: int | None = None) -> AdminClient:
    try:
        return AdminClient(cfg, timeout_ms)
    except ConfigError as exc:  # e.g. bus.curve on but no keys yet
        fail(str(exc), EXIT_USAGE)


def strategy_pub_endpoint(strategy_id: str) -> str:
    return f"ipc://{config_mod.home_dir()}/run/strategy-{strategy_id}.pub"


def expected_services(cfg: Config) -> list[tuple[str, str]]:
    """``(service, heartbeat endpoint)`` for every process this configuration runs."""
    out = [(name, cfg.bus.endpoint(ep)) for name, ep in CORE]
    out += [(f"strategy-{s.id}", strategy_pub_endpoint(s.id)) for s in cfg.strategy]
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- status


def collect_heartbeats(admin: AdminClient, services: list[tuple[str, str]],
                       listen_s: float) -> dict[str, tuple[Heartbeat, int]]:
    """Listen to ``hb.`` on every service's PUB; stop early once all have been heard."""
    sub = admin.bus.subscriber([ep for _, ep in services], [b"hb."])
    wanted = {name for name, _ in services}
    seen: dict[str, tuple[Heartbeat, int]] = {}
    deadline = time.monotonic() + listen_s
    try:
        while not wanted <= seen.keys():
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            got = sub.recv(left)
            if got is not None and isinstance(got[1], Heartbeat):
                seen[got[1].service] = (got[1], time.time_ns())
    finally:
        sub.close()
    return seen


def _detail(name: str, info: dict[str, Any]) -> str:
    parts = []
    for key in ("state", "source", "risk_state", "broker", "order_feed"):
        if isinstance(info.get(key), str) and info[key]:
            parts.append(f"{key}={info[key]}")
    for key in ("gaps", "malformed", "timeouts"):
        if info.get(key):
            parts.append(f"{key}={info[key]}")
    session = info.get("broker_session")
    if name == "execution" and isinstance(session, dict):  # the broker login and the IP Kotak sees
        parts.append("session=" + ("logged-in" if session.get("logged_in") else "NOT-logged-in"))
        if session.get("ip"):
            parts.append(f"broker_ip={session['ip']}")
    down = info.get("down")
    if name == "notifier" and down:
        parts.append("sees down: " + ",".join(down))
    return " ".join(parts)


_ONLY_OPT = typer.Option(None, "--service", "-s",
                         help="Check only this service (repeatable; `strategy` means every strategy "
                              "instance), e.g. for a healthcheck.")


def latency_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per service and hop from the heartbeats' ``info["latency"]`` (services up only)."""
    return [hop for r in rows if r["up"] for hop in latency.rows(r["service"], r["info"].get("latency"))]


def _latency_note(row: dict[str, Any]) -> str:
    parts = [f"{row[key]} {what}" for key, what in (("negative", "negative (clock skew)"),
                                                    ("over_range", "over 60 s"), ("invalid", "invalid"))
             if row[key]]  # fmt: skip
    note = "not recorded: " + ", ".join(parts) if parts else ""
    return f"{note}; {row['error']}" if note and row["error"] else note or row["error"]


def _print_latency(hops: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to fit, so do not wrap
        console = Console(width=140)
    if not hops:
        console.print("latency: no heartbeat carried any figures yet (or bus.latency is false)")
        return
    table = Table(title=f"latency per hop, last {latency.WINDOW_S} s", title_justify="left")
    for col in ("SERVICE", "HOP", "COUNT", "P50", "P99", "MAX", "UNITS", "NOTE"):
        table.add_column(col, justify="right" if col in ("COUNT", "P50", "P99", "MAX") else "left")
    for h in hops:
        counted = h["count"] > 0
        table.add_row(h["service"], h["what"], f"{h['count']:,}",
                      *((f"{h[k]:,}" if counted else "-") for k in ("p50", "p99", "max")),
                      h["units"], _latency_note(h))  # fmt: skip
    console.print(table)


_LATENCY_OPT = typer.Option(
    False, "--latency",
    help="Also show each hop's latency over the last minute, from the heartbeats: count, p50, p99 "
         "and max in microseconds, one row per service and hop (feed receive -> publish, tick -> "
         "strategy on_tick, request -> risk verdict, risk -> execution ack, broker call -> broker "
         "ack, broker fill -> strategy on_fill). With --json they are under \"latency\".")


@app.command()
def status(
    as_json: bool = JSON_OPT,
    only: list[str] = _ONLY_OPT,
    listen: float = typer.Option(1.5, "--listen", min=0.2, max=30, help="Seconds to listen for heartbeats."),
    show_latency: bool = _LATENCY_OPT,
) -> None:
    """Every service with its heartbeat age and pid; exit 3 naming each one that is down."""
    cfg = get_config()
    services = expected_services(cfg)
    if only:
        # `-s strategy` stands for every configured strategy instance
        only = [n for o in only for n in ([n for n, _ in services if n.startswith("strategy-")]
                                          if o == "strategy" else [o])]
        unknown = sorted(set(only) - {n for n, _ in services})
        if unknown:
            fail(f"unknown service: {', '.join(unknown)} (known: {', '.join(n for n, _ in services)})",
                 EXIT_USAGE)
        services = [(n, ep) for n, ep in services if n in only]
    admin = _admin(cfg)
    try:
        seen = collect_heartbeats(admin, services, listen)
    finally:
        admin.close()
    now = time.time_ns()
    rows: list[dict[str, Any]] = []
    for name, endpoint in services:
        hb_at = seen.get(name)
        if hb_at is None:
            rows.append({"service": name, "up": False, "endpoint": endpoint, "heartbeat_age_s": None,
                         "pid": None, "uptime_s": None, "info": {}})
            continue
        hb, received = hb_at
        rows.append({
            "service": name, "up": True, "endpoint": endpoint,
            "heartbeat_age_s": round(max(0, now - hb.ts_ns) / 1e9, 3),
            "received_age_s": round((now - received) / 1e9, 3),
            "pid": hb.pid, "state": hb.state, "reason": hb.reason,
            "uptime_s": round((now - hb.started_ns) / 1e9, 1) if hb.started_ns else None,
            "info": hb.info,
        })
    down = [r for r in rows if not r["up"]]
    degraded = [r for r in rows if r["up"] and r["state"] != "ok"]  # running, but cannot do its job
    if as_json:
        out: dict[str, Any] = {"ok": not down and not degraded, "services": rows,
                               "down": [r["service"] for r in down],
                               "degraded": [r["service"] for r in degraded]}
        if show_latency:
            out["latency"] = latency_rows(rows)
        emit(out, True)
    else:
        table = [[r["service"], ("up" if r["state"] == "ok" else r["state"].upper()) if r["up"] else "DOWN",
                  _age(r["heartbeat_age_s"]), str(r["pid"] or "-"), _age(r["uptime_s"]), r["endpoint"],
                  " ".join(x for x in (r.get("reason", ""), _detail(r["service"], r["info"])) if x)]
                 for r in rows]  # fmt: skip
        typer.echo(_table(["SERVICE", "STATE", "HEARTBEAT", "PID", "UPTIME", "ENDPOINT", "DETAIL"], table))
        if show_latency:
            _print_latency(latency_rows(rows))
    problems = []
    if down:
        problems.append("down: " + "; ".join(
            f"{r['service']} (no heartbeat from {r['endpoint']})" for r in down))  # fmt: skip
    if degraded:
        problems.append("degraded: " + "; ".join(
            f"{r['service']} ({r['reason'] or r['state']})" for r in degraded))  # fmt: skip
    if problems:
        fail(" | ".join(problems), EXIT_UNREACHABLE)


# --------------------------------------------------------------------------- config show

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(str(value))


def render_toml(data: dict[str, Any]) -> str:
    out: list[str] = []
    for section, values in data.items():
        if isinstance(values, list):
            for item in values:
                out.append(f"[[{section}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
            continue
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


@config_app.command("show")
def config_show(as_json: bool = JSON_OPT) -> None:
    """The effective configuration (file, .env and environment merged), secrets as ***."""
    cfg = get_config()
    data = redacted(cfg)
    if as_json:
        emit(data, True)
        return
    source = os.environ.get("NEOPULSE_CONFIG") or ("neopulse.toml" if Path("neopulse.toml").is_file()
                                                   else "defaults only")
    typer.echo(f"# config: {source}; NEOPULSE_HOME: {config_mod.home_dir()}")
    typer.echo(render_toml(data), nl=False)


# --------------------------------------------------------------------------- watch


def _fmt_num(x: float) -> str:
    return f"{x:,.2f}"


def _watch_table(rows: list[tuple[str, str]], ticks: dict[str, Tick], feed_state: str,
                 feed_detail: str, now_ns: int) -> Any:
    from rich.table import Table
    from rich.text import Text

    style = {"LIVE": "green", "STALE": "yellow", "RECONNECTING": "yellow", "CONNECTING": "yellow"}
    state = Text(feed_state or "?", style=style.get(feed_state, "bold red"))
    title = Text.assemble("NeoPulse watch — feed ", state, f"  {feed_detail}" if feed_detail else "",
                          f"  {datetime.now().strftime('%H:%M:%S')}")
    table = Table(title=title, title_justify="left", expand=False)
    for col in ("SYMBOL", "LTP", "CHANGE", "CHG %", "VOLUME", "BID", "ASK", "TICK AGE", "FEED"):
        table.add_column(col, justify="left" if col in ("SYMBOL", "FEED") else "right")
    for name, key in rows:
        tick = ticks.get(key)
        if tick is None:
            table.add_row(name, "-", "-", "-", "-", "-", "-", "no tick", state)
            continue
        chg = tick.ltp - tick.close if tick.close else 0.0
        pct = chg / tick.close * 100 if tick.close else 0.0
        colour = "green" if chg > 0 else "red" if chg < 0 else ""
        age = max(0.0, (now_ns - tick.ts_ns) / 1e9)
        table.add_row(
            tick.symbol or name, _fmt_num(tick.ltp), Text(f"{chg:+,.2f}", style=colour),
            Text(f"{pct:+.2f}%", style=colour), f"{tick.volume:,}", _fmt_num(tick.bid), _fmt_num(tick.ask),
            Text(f"{age:.1f}s", style="red" if age > 5 else ""), state,
        )
    return table


_SYMBOLS_ARG = typer.Argument(..., help="Trading symbols (RELIANCE-EQ) or segment|token.")


@app.command()
def watch(  # noqa: PLR0915 - one screen loop reads best in one place
    symbols: list[str] = _SYMBOLS_ARG,
    refresh: float = typer.Option(0.2, "--refresh", min=0.05, max=0.25,
                                  help="Seconds between screen refreshes (at least 4 per second)."),
    duration: float = typer.Option(0.0, "--duration", min=0,
                                   help="Stop after this many seconds (0: until Ctrl-C)."),
) -> None:
    """A live table of LTP, change, volume, tick age and feed state."""
    from rich.console import Console
    from rich.live import Live

    cfg = get_config()
    admin = _admin(cfg)
    data = admin.ask_ok("feed_rep", Subscribe(instruments=list(symbols), requester="neopulse-watch"))
    keys: list[str] = list(data.get("subscribed", [])) if isinstance(data, dict) else []
    if len(keys) != len(symbols):
        fail(f"refused: the feed answered {keys} for {symbols}", EXIT_REFUSED)
    rows = list(zip(symbols, keys, strict=True))
    status_reply = admin.ask("feed_rep", GetStatus())
    feed_state, feed_detail = "", ""
    if isinstance(status_reply, Reply) and status_reply.ok and isinstance(status_reply.data, dict):
        feed_state = str(status_reply.data.get("state", ""))
        feed_detail = str(status_reply.data.get("detail", ""))
    topics = [("tick." + k.replace("|", ".") + ".").encode() for k in keys]
    sub = admin.bus.subscriber([cfg.bus.endpoint("feed_pub")], [*topics, b"feedstatus.", b"hb.feed."])
    ticks: dict[str, Tick] = {}
    last = admin.ask("feed_rep", GetLastTicks(instruments=keys))
    if isinstance(last, Reply) and last.ok and isinstance(last.data, list):
        for raw in last.data:
            with contextlib.suppress(msgspec.ValidationError):
                t = msgspec.convert(raw, Tick)
                ticks[instrument_key(t.segment, t.token)] = t
    last_hb = time.monotonic()
    console = Console() if sys.stdout.isatty() else Console(width=120)
    started = time.monotonic()
    next_frame = started
    tty = console.is_terminal

    def absorb() -> None:
        nonlocal feed_state, feed_detail, last_hb
        while True:
            try:
                frame = sub.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            parsed = sub.parse(frame)
            if parsed is None:
                continue
            msg = parsed[1]
            if isinstance(msg, Tick):
                ticks[f"{msg.segment}|{msg.token}"] = msg  # instrument_key, inlined: hot path
            elif isinstance(msg, FeedStatus):
                feed_state, feed_detail = msg.state, msg.detail
            elif isinstance(msg, Heartbeat):
                last_hb = time.monotonic()

    def frame() -> Any:
        state = feed_state if time.monotonic() - last_hb < 3.5 else "SILENT"
        return _watch_table(rows, ticks, state, feed_detail, time.time_ns())

    try:
        with Live(frame(), console=console, auto_refresh=False, transient=False,
                  redirect_stdout=False) if tty else _NoLive() as live:
            while not duration or time.monotonic() - started < duration:
                wait_ms = max(0, int((next_frame - time.monotonic()) * 1000))
                if sub.sock.poll(wait_ms):
                    absorb()
                if time.monotonic() >= next_frame:
                    if tty:
                        live.update(frame(), refresh=True)
                        next_frame += refresh
                    else:  # piped: a plain snapshot every second
                        console.print(frame())
                        next_frame += 1.0
                    next_frame = max(next_frame, time.monotonic())
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        admin.close()
    raise typer.Exit(EXIT_OK)


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, *_: Any, **__: Any) -> None:
        return None


# --------------------------------------------------------------------------- logs

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SKIP_KEYS = {"ts", "level", "service", "pid", "event", "exception", "logger"}
_LEVEL_STYLE = {"debug": "bright_black", "info": "green", "warning": "yellow", "error": "red",
                "critical": "bright_red"}


def _parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _local_time(ts: str) -> str:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S.%f")[:-3]
    except ValueError:
        return ts[:12]


def _exception_text(exc: Any) -> str:
    if isinstance(exc, str):
        return exc
    if isinstance(exc, list):  # structlog dict_tracebacks
        out = []
        for e in exc:
            frames = e.get("frames") or []
            where = f" at {frames[-1].get('filename')}:{frames[-1].get('lineno')}" if frames else ""
            out.append(f"{e.get('exc_type')}: {e.get('exc_value')}{where}")
        return "\n".join(out)
    return str(exc)


def format_record(rec: dict[str, Any], colour: bool, width: int = 10) -> str:
    level = str(rec.get("level", "info")).lower()
    head = f"{_local_time(str(rec.get('ts', '')))} {level.upper():<7} {rec.get('service', '?')!s:<{width}}"
    event = str(rec.get("event", ""))
    extras = " ".join(f"{k}={_kv(v)}" for k, v in rec.items() if k not in _SKIP_KEYS)
    if colour:
        head = typer.style(head, fg=_LEVEL_STYLE.get(level, "white") if level != "info" else None)
        event = typer.style(event, bold=True)
    text = f"{head} {event}" + (f" {extras}" if extras else "")
    if rec.get("exception"):
        text += "\n    " + _exception_text(rec["exception"]).replace("\n", "\n    ")
    return text


def _kv(value: Any) -> str:
    if isinstance(value, str):
        plain = value and " " not in value and "=" not in value
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)


def _tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a (possibly large) file."""
    if n <= 0:
        return []
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block, data = 65536, b""
        while end > 0 and data.count(b"\n") <= n:
            step = min(block, end)
            end -= step
            fh.seek(end)
            data = fh.read(step) + data
    return data.decode("utf-8", "replace").splitlines()[-n:]


class _Tailer:
    """Follows one log file across rotation (a new inode or a shorter file)."""

    def __init__(self, path: Path, at_end: bool = True) -> None:
        self.path = path
        self.fh: Any = None
        self.inode = -1
        self.buf = ""
        self._open(at_end=at_end)

    def _open(self, at_end: bool) -> None:
        try:
            self.fh = self.path.open("r", encoding="utf-8", errors="replace")
        except FileNotFoundError:
            self.fh = None
            return
        self.inode = os.fstat(self.fh.fileno()).st_ino
        if at_end:
            self.fh.seek(0, os.SEEK_END)

    def read(self) -> list[str]:
        if self.fh is None:
            self._open(at_end=False)
            if self.fh is None:
                return []
        lines: list[str] = []
        chunk = self.fh.read()
        if chunk:
            self.buf += chunk
            *complete, self.buf = self.buf.split("\n")
            lines.extend(complete)
        try:
            st = self.path.stat()
            if st.st_ino != self.inode or st.st_size < self.fh.tell():
                self.fh.close()
                self._open(at_end=False)
        except FileNotFoundError:
            pass
        return lines


def _log_files(home: Path, service: str | None) -> list[Path]:
    log_dir = home / "log"
    files = sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []
    if service is None:
        return files
    path = log_dir / f"{service}.log"
    if not path.exists():
        known = ", ".join(p.stem for p in files) or "none yet"
        fail(f"no log for `{service}` in {log_dir} (logs: {known})", EXIT_USAGE)
    return [path]


def _keep(line: str, rec: dict[str, Any] | None, min_level: int, grep: str | None) -> bool:
    if grep and grep.lower() not in line.lower():
        return False
    if rec is not None and min_level:
        return LEVELS.get(str(rec.get("level", "info")).lower(), 20) >= min_level
    return True


@app.command()
def logs(  # noqa: PLR0917 - each parameter is a CLI option
    service: str = typer.Argument(None, help="One service (feed, risk, execution, notifier, strategy-<id>); "
                                             "default: all, merged by time.", show_default=False),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    level: str = typer.Option(None, "--level", "-l", help="Minimum level: debug, info, warning, error."),
    grep: str = typer.Option(None, "--grep", "-g", help="Only lines containing this text (any case)."),
    lines: int = typer.Option(40, "--lines", "-n", min=0, help="How many past lines to show first."),
    raw: bool = typer.Option(False, "--json", help="Print the JSON lines as they are."),
) -> None:
    """Read the services' JSON logs in a readable form (-f to follow)."""
    min_level = 0
    if level:
        if level.lower() not in LEVELS:
            fail(f"--level must be one of {', '.join(LEVELS)}", EXIT_USAGE)
        min_level = LEVELS[level.lower()]
    home = config_mod.home_dir()
    files = _log_files(home, service)
    if not files and not follow:
        fail(f"no logs yet in {home / 'log'}", EXIT_USAGE)
    colour = sys.stdout.isatty() and not raw
    width = max([len(p.stem) for p in files] + [9])

    def show(batch: list[str]) -> None:
        parsed = [(ln, _parse(ln)) for ln in batch if ln.strip()]
        kept = [(ln, rec) for ln, rec in parsed if _keep(ln, rec, min_level, grep)]
        kept.sort(key=lambda x: str(x[1].get("ts", "")) if x[1] else "")
        for ln, rec in kept:
            typer.echo(ln if raw or rec is None else format_record(rec, colour, width))

    past: list[str] = []
    for path in files:
        # read generously so that filters still leave up to `lines` lines
        past.extend(_tail_lines(path, lines * (20 if (grep or level) else 1) + 1))
    parsed = sorted(((ln, _parse(ln)) for ln in past if ln.strip()),
                    key=lambda x: str(x[1].get("ts", "")) if x[1] else "")
    kept = [ln for ln, rec in parsed if _keep(ln, rec, min_level, grep)][-lines:] if lines else []
    show(kept)
    if not follow:
        return
    tailers = {p: _Tailer(p) for p in files}
    try:
        while True:
            if service is None:  # a service started after us gets followed too
                for p in _log_files(home, None):
                    if p not in tailers:
                        tailers[p] = _Tailer(p, at_end=False)
            batch: list[str] = []
            for t in tailers.values():
                batch.extend(t.read())
            if batch:
                show(batch)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- keys

keys_app = typer.Typer(help="ZeroMQ CURVE keys for `bus.curve = true`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


_NAMES_ARG = typer.Argument(None, help="Identities to create (default: every service of this config "
                                       "and `admin`).", show_default=False)
_DIR_OPT = typer.Option(None, "--dir", help="Where (default: bus.keys_dir, else $NEOPULSE_HOME/keys).")


@keys_app.command("generate")
def keys_generate(
    names: list[str] = _NAMES_ARG,
    directory: Path = _DIR_OPT,
    force: bool = typer.Option(False, "--force", help="Replace existing keypairs."),
    no_allow: bool = typer.Option(False, "--no-allow",
                                  help="Do not put the new public keys on the allow-list."),
    as_json: bool = JSON_OPT,
) -> None:
    """Write CURVE keypairs (``<name>.key_secret``, mode 600) and allow-list their public keys."""
    from libs.common.security import generate_keys, identities, keys_dir

    cfg = get_config()
    target = directory or keys_dir(cfg)
    wanted = list(names) if names else identities(cfg)
    result = generate_keys(target, wanted, force=force, allow=not no_allow)
    rows = [{"name": n, "created": c, "secret": str(target / f"{n}.key_secret"),
             "public": str(target / f"{n}.key")} for n, c in result]
    human = "\n".join(f"{'created' if r['created'] else 'kept   '}  {r['name']:<20} {r['secret']}"
                      for r in rows)
    human += f"\nallow-list: {target / 'allowed'} (delete a .key there to revoke a client)"
    emit({"dir": str(target), "keys": rows}, as_json, human)

