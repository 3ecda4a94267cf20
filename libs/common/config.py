"""Configuration: ``neopulse.toml`` → environment → flags, as frozen msgspec Structs.

Layering (later wins):
1. defaults in the Structs below;
2. the TOML file named by ``NEOPULSE_CONFIG``, else ``./neopulse.toml`` if present;
3. ``.env`` (in the working directory, or ``NEOPULSE_ENV_FILE``) — for secrets;
4. environment variables ``NEOPULSE_<SECTION>__<KEY>`` (lists/tables as JSON).

Unknown sections or keys are rejected. A bad config raises ``ConfigError`` with one line
naming the key; service entry points turn that into exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from libs.common.messages import STRATEGY_ID_PATTERN, BrokerName, FeedSource, Product, Vocabulary, choices

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Volatility = Annotated[float, Meta(gt=0, le=5)]  # annual, 0.12 = 12 %

ENV_PREFIX = "NEOPULSE_"
# Environment variables that are not config keys.
RESERVED_ENV = {"NEOPULSE_HOME", "NEOPULSE_CONFIG", "NEOPULSE_LIVE", "NEOPULSE_ENV_FILE", "NEOPULSE_SERVICE"}


class ConfigError(Exception):
    """A bad configuration value. ``str(err)`` is the one line shown to the operator."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class BusConfig(_Section, frozen=True):
    """ZeroMQ endpoints. ``base_port`` shifts every default endpoint together."""

    host: str = "127.0.0.1"
    base_port: Port = 7100
    request_timeout_ms: PositiveInt = 2500
    max_frame_bytes: PositiveInt = 1_048_576
    sndhwm: NonNegInt = 1_000_000
    curve: bool = False
    keys_dir: str = ""  # default: $NEOPULSE_HOME/keys
    # Per-hop latency histograms in every heartbeat (`neopulse status --latency`); false: none kept.
    latency: bool = True
    # After handling a message a service's loop keeps polling without blocking for this long
    # (microseconds) before it sleeps, so a reply or the next message that comes within it is
    # read without a wake-up; 0: never. Spins only right after traffic, never while idle.
    spin_us: NonNegInt = 0
    # Explicit endpoint overrides; empty means derived from host and base_port.
    feed_pub: str = ""
    feed_rep: str = ""
    risk_rep: str = ""
    risk_pub: str = ""
    execution_rep: str = ""
    execution_pub: str = ""
    notifier_pub: str = ""

    def endpoint(self, name: str) -> str:
        explicit = getattr(self, name)
        if explicit:
            return str(explicit)
        offsets = {
            "feed_pub": 1, "feed_rep": 2, "risk_rep": 101, "risk_pub": 102,
            "execution_rep": 201, "execution_pub": 202, "notifier_pub": 401,
        }
        return f"tcp://{self.host}:{self.base_port + offsets[name]}"


# The simulator's implied volatility per underlying (annual), near the indices' usual levels.
SIM_IV_DEFAULTS = {"NIFTY": 0.12, "BANKNIFTY": 0.15, "FINNIFTY": 0.13, "MIDCPNIFTY": 0.16, "SENSEX": 0.12}


class FeedConfig(_Section, frozen=True):
    source: FeedSource = FeedSource.SIM
    instruments: list[str] = msgspec.field(
        default_factory=lambda: ["RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "SBIN-EQ"]
    )
    sim_rate: PositiveFloat = 20.0  # ticks per second per instrument
    sim_seed: int = 42
    sim_volatility: NonNegFloat = 0.0008  # per-tick relative step
    # Option premiums on the sim (Black-Scholes from the simulated underlying):
    sim_iv: dict[str, Volatility] = msgspec.field(default_factory=lambda: dict(SIM_IV_DEFAULTS))
    """Implied volatility per underlying (``sim_iv = { NIFTY = 0.12 }``). Entries given replace
    the defaults for those underlyings only; an underlying listed nowhere uses 0.25."""
    sim_smile: NonNegFloat = 0.8  # IV added per unit of |ln(strike / spot)|
    sim_spread_pct: Annotated[float, Meta(ge=0, le=50)] = 0.2  # option bid-ask, % of premium; >= 1 tick/side
    sim_interest_rate: Annotated[float, Meta(ge=0, le=0.5)] = 0.065  # annual: option pricing, futures carry
    replay_path: str = ""
    replay_speed: str = "1"  # a factor, or "max"
    replay_loop: bool = False
    replay_delay_s: NonNegFloat = 2.0  # replay starts at the first Subscribe request, or after this
    watchdog_s: PositiveFloat = 10.0
    market_hours: str = "09:15-15:30"
    market_days: list[int] = msgspec.field(default_factory=lambda: [0, 1, 2, 3, 4])  # Mon=0 .. Sun=6
    timezone: str = "Asia/Kolkata"
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    record: bool = True
    max_subscriptions: PositiveInt = 3000


class RiskConfig(_Section, frozen=True):
    max_qty: PositiveInt = 1000
    max_notional: PositiveFloat = 1_000_000.0
    max_open_positions: PositiveInt = 10
    max_orders_per_sec: PositiveInt = 10
    max_daily_loss: PositiveFloat = 5_000.0
    cost_rate: Fraction = 0.00035
    default_capital: PositiveFloat = 100_000.0
    # "HH:MM" (IST): from then on, new entries in contracts expiring today are refused (exits
    # still pass). Empty: entries are allowed until the contract stops trading.
    expiry_day_cutoff: str = ""
    # "HH:MM" (IST): from then on each trading day, orders that open or add to a position are
    # refused; orders that close one still pass (the intraday square-off needs them). Empty: off.
    no_new_entries_after: str = "15:00"
    # Entries (orders that open or add) allowed per strategy and instrument each trading day;
    # the next is refused with that reason. 0: no limit.
    max_entries_per_day: NonNegInt = 0


class ExecutionConfig(_Section, frozen=True):
    broker: BrokerName = BrokerName.PAPER
    protection_pct: Annotated[float, Meta(gt=0, le=20)] = 1.0
    reconcile_s: PositiveFloat = 60.0
    pool_workers: PositiveInt = 20
    orders_per_sec: PositiveFloat = 10.0
    requests_per_sec: PositiveFloat = 25.0
    broker_timeout_s: PositiveFloat = 10.0
    # The daily Kotak logout (IST): empty for none (then the session lasts until Kotak ends it).
    logout_at: str = "15:45"
    # How long a live broker's order book may lag behind an accepted order. An order of
    # unknown outcome still missing from the book after this long is taken as never sent.
    # 0 = the broker's default (Kotak: max(30 s, 3 * broker_timeout_s)).
    book_lag_s: NonNegFloat = 0.0
    # A basket leg that fails: cancel the basket's working legs and close its filled ones
    # (true), or only stop placing its legs and leave the rest as they are (false).
    basket_rollback: bool = True
    # A basket's short legs go out only once every long leg is filled in full; a long leg
    # not filled this many seconds after the basket was accepted fails the basket (rollback).
    basket_fill_timeout_s: PositiveFloat = 30.0
    # A bracket's stop that the broker rejects (RMS, a price it refuses: not a timeout or an
    # IP block, which are retried) leaves its position without a stop: close that position
    # (a flatten of its strategy and instrument: the target is cancelled first) rather than
    # hold it unprotected. false: keep it, with the CRITICAL alert only.
    close_unprotected: bool = True
    # "HH:MM" (IST): each day from then on, working orders in these products are cancelled and
    # every strategy's positions in them closed (a flatten per strategy, instrument and
    # product), before the broker's own auto square-off (about 15:20, with a charge). A
    # position opened later (a late fill), or found at a start after the time, is closed too.
    # Empty: off. NRML and CNC stay unless listed.
    square_off_at: str = "15:15"
    square_off_products: list[str] = msgspec.field(default_factory=lambda: ["MIS"])
    # A trailing stop (an order's ``trail_points``/``trail_pct``) modifies its stop leg at the
    # broker at most this often (seconds); meanwhile only the latest stop is kept, and sent next.
    trail_modify_every_s: PositiveFloat = 1.0


class PaperConfig(_Section, frozen=True):
    slippage_bps: NonNegFloat = 2.0
    # The paper account's funds. An order needing more margin than is free (what open
    # positions and working orders block) is rejected as a real broker's RMS would: a sold
    # option blocks 12% of its strike's value, a bought one its premium, a future 12%, MIS
    # equity 20% and delivery 100% (services/execution/brokers/paper_margin.py).
    capital: PositiveFloat = 1_000_000.0


class DatabaseConfig(_Section, frozen=True):
    url: str = ""  # empty: embedded PostgreSQL under $NEOPULSE_HOME/pgdata


class KotakConfig(_Section, frozen=True):
    environment: str = "prod"
    consumer_key: str = ""
    mobile: str = ""
    ucc: str = ""
    mpin: str = ""
    totp_secret: str = ""
    base_url: str = ""  # test/sandbox override for the REST endpoints
    sfeed_url: str = ""  # test/sandbox override for the market-data websocket
    feed_user: str = ""  # use these SFeed credentials directly instead of asking execution
    feed_auth: str = ""
    history_calls_per_min: PositiveInt = 30
    """At most this many ``historical_data()`` calls a minute (``neopulse history fetch``);
    Kotak answers 429 for hours from about 35-50 a minute (kotak-neo-python #35)."""
    # The daily login (IST): on trading days execution logs in at this time (TOTP + MPIN), and
    # again with backoff until it succeeds. Empty: no scheduled login (only on first use).
    login_at: str = "08:45"
    order_feed: bool = True
    """Take order updates from Kotak's order feed (``/realtime`` websocket), with the order book
    polled every ``execution.reconcile_s`` while it is up and every second while it is down."""
    order_feed_url: str = ""  # test/sandbox override for the order-feed websocket


class TelegramConfig(_Section, frozen=True):
    token: str = ""
    chat_id: str = ""
    api_url: str = "https://api.telegram.org"
    max_per_sec: PositiveFloat = 1.0
    commands: bool = True
    """Accept ``/status``, ``/positions``, ``/pnl``, ``/halt``, ``/resume`` and ``/flatten``
    from ``chat_id`` (and from no other chat). Needs the numeric chat id."""
    poll_timeout_s: Annotated[int, Meta(ge=1, le=50)] = 25
    """How long one ``getUpdates`` long poll waits for a command (seconds)."""
    confirm_s: Annotated[float, Meta(ge=1, le=600)] = 60.0
    """How long the code ``/flatten`` replies with stays valid (seconds; single use)."""


class NotifierConfig(_Section, frozen=True):
    silence_s: PositiveFloat = 5.0
    summary_at: str = "15:45"
    webhook_url: str = ""
    aggregate_ms: PositiveInt = 1000


class LogConfig(_Section, frozen=True):
    level: str = "INFO"
    max_bytes: PositiveInt = 20_000_000
    backups: NonNegInt = 5
    console_level: str = ""
    """What a service prints on the console (the JSON log file always keeps everything).
    Empty, the default: one short line per event an operator acts on (order approved or
    refused, fill, bracket, risk state, feed state, alerts) and one line per warning or
    error. ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``: every line at that level or above
    in full, as the ``--verbose`` flag of a service (``DEBUG``) does."""


class StrategyInstance(_Section, frozen=True):
    """One ``[[strategy]]`` entry: which strategy runs, under which id, with which params."""

    name: str
    id: str  # 1-32 of A-Z a-z 0-9 _ -, starting with a letter or digit: it names topics and files
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    instruments: list[str] = msgspec.field(default_factory=list)
    on_error: str = "continue"  # continue | stop
    # Rupees of this strategy's net MTM today (realised + unrealised - costs): at -max_loss or
    # +target_profit its positions are squared off and it is stopped for the day (its orders
    # that open or add are refused; exits pass). 0: no such limit.
    max_loss: NonNegFloat = 0.0
    target_profit: NonNegFloat = 0.0


def _default_strategies() -> list[StrategyInstance]:
    return [StrategyInstance(name="momentum", id="mom1")]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    feed: FeedConfig = msgspec.field(default_factory=FeedConfig)
    risk: RiskConfig = msgspec.field(default_factory=RiskConfig)
    execution: ExecutionConfig = msgspec.field(default_factory=ExecutionConfig)
    paper: PaperConfig = msgspec.field(default_factory=PaperConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    kotak: KotakConfig = msgspec.field(default_factory=KotakConfig)
    telegram: TelegramConfig = msgspec.field(default_factory=TelegramConfig)
    notifier: NotifierConfig = msgspec.field(default_factory=NotifierConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    strategy: list[StrategyInstance] = msgspec.field(default_factory=_default_strategies)

    @property
    def home(self) -> Path:
        return home_dir()


SECRET_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("kotak", "consumer_key"), ("kotak", "mobile"), ("kotak", "ucc"), ("kotak", "mpin"),
        ("kotak", "totp_secret"), ("kotak", "feed_auth"),
        ("telegram", "token"), ("telegram", "chat_id"),
    }
)

_SECTIONS = {f: t for f, t in zip(Config.__struct_fields__, Config.__annotations__.values(), strict=True)}


def home_dir() -> Path:
    return Path(os.environ.get("NEOPULSE_HOME", "./var")).resolve()


def _read_env_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(
            f"warning: {path} is readable by other users; run `chmod 600 {path}` (it holds secrets)",
            file=sys.stderr,
        )
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _coerce_env(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _apply_env(data: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """Merge ``NEOPULSE_<SECTION>__<KEY>`` values into ``data``; returns ``section.key`` → variable."""
    origins: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        section, key = section.lower(), key.lower()
        if section not in _SECTIONS or section == "strategy":
            raise ConfigError(f"config error: {name}: unknown config section `{section}`")
        value = _coerce_env(raw)
        sect = data.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"{name}: section `{section}` is not a table")
        sect[key] = value
        origins[f"{section}.{key}"] = name
    return origins


def _env_var_for(path: str, origins: dict[str, str]) -> str | None:
    """The environment variable that set ``path`` (``risk.max_qty``, ``feed.instruments[0]``)."""
    section, _, rest = path.partition(".")
    key = rest.split(".")[0].split("[")[0]
    return origins.get(f"{section}.{key}")


# Keys whose value is one word of a closed set: a wrong word is refused naming the allowed ones.
_CLOSED: dict[str, type[Vocabulary]] = {"feed.source": FeedSource, "execution.broker": BrokerName}


def _explain(err: msgspec.ValidationError, source: str, origins: dict[str, str] | None = None) -> str:
    text = str(err)
    # msgspec: "Object contains unknown field `foo` - at `$.risk`"
    msg, _, path = text.partition(" - at `")
    path = path.rstrip("`").removeprefix("$").lstrip(".")
    if msg.startswith("Object contains unknown field"):
        field = msg.split("`")[1]
        where = f"{path}.{field}" if path else field
        var = _env_var_for(where, origins or {})
        if var:
            return f"config error: {var}: unknown key `{where}`"
        return f"config error: unknown key `{where}` ({source})"
    var = _env_var_for(path, origins or {})
    closed = _CLOSED.get(path)
    if closed is not None and msg.startswith("Invalid enum value"):
        return f"config error: {var + ': ' if var else ''}`{path}` must be {choices(closed)}"
    if var:
        return f"config error: {var}: `{path}`: {msg}"
    return f"config error: {path or 'config'}: {msg} ({source})"


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Load and validate the configuration. Raises ``ConfigError`` with one clear line."""
    environ = dict(os.environ if env is None else env)
    env_file = Path(environ.get("NEOPULSE_ENV_FILE", ".env"))
    if env_file.is_file():
        merged = _read_env_file(env_file)
        merged.update(environ)
        environ = merged

    cfg_path: Path | None
    if path is not None:
        cfg_path = Path(path)
    elif environ.get("NEOPULSE_CONFIG"):
        cfg_path = Path(environ["NEOPULSE_CONFIG"])
    else:
        cfg_path = Path("neopulse.toml") if Path("neopulse.toml").is_file() else None

    data: dict[str, Any] = {}
    source = "defaults"
    if cfg_path is not None:
        try:
            data = tomllib.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: file not found: {cfg_path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {cfg_path}: invalid TOML: {exc}") from None
        source = str(cfg_path)
    origins = _apply_env(data, environ)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, source + " + environment", origins)) from None
    _validate(cfg, origins)
    return cfg


def _validate(cfg: Config, origins: dict[str, str] | None = None) -> None:
    checks = [
        (cfg.log.level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}, "log.level", "must be DEBUG..ERROR"),
        (cfg.log.console_level.upper() in {"", "DEBUG", "INFO", "WARNING", "ERROR"}, "log.console_level",
         "must be empty (short operator lines) or DEBUG..ERROR"),
        (cfg.feed.replay_speed == "max" or _is_positive_number(cfg.feed.replay_speed),
         "feed.replay_speed", "must be a positive number or `max`"),
        (cfg.feed.reconnect_min_s <= cfg.feed.reconnect_max_s, "feed.reconnect_min_s",
         "must not exceed feed.reconnect_max_s"),
        (len({s.id for s in cfg.strategy}) == len(cfg.strategy), "strategy.id", "ids must be unique"),
        (not cfg.risk.expiry_day_cutoff or hhmm_minutes(cfg.risk.expiry_day_cutoff) is not None,
         "risk.expiry_day_cutoff", "must be empty or a time of day HH:MM (IST), e.g. 15:00"),
        (not cfg.risk.no_new_entries_after or hhmm_minutes(cfg.risk.no_new_entries_after) is not None,
         "risk.no_new_entries_after", "must be empty or a time of day HH:MM (IST), e.g. 15:00"),
        (not cfg.execution.square_off_at or hhmm_minutes(cfg.execution.square_off_at) is not None,
         "execution.square_off_at", "must be empty or a time of day HH:MM (IST), e.g. 15:15"),
        (not cfg.execution.logout_at or hhmm_minutes(cfg.execution.logout_at) is not None,
         "execution.logout_at", "must be empty (no daily logout) or a time of day HH:MM (IST), e.g. 15:45"),
        (not cfg.kotak.login_at or hhmm_minutes(cfg.kotak.login_at) is not None,
         "kotak.login_at", "must be empty (no scheduled login) or a time of day HH:MM (IST), e.g. 08:45"),
        (all(p in set(Product) for p in cfg.execution.square_off_products), "execution.square_off_products",
         f"must list products among {', '.join(Product)}"),
        *((re.match(STRATEGY_ID_PATTERN, s.id) is not None, "strategy.id",
           f"must be 1-32 letters, digits, `_` or `-`, starting with a letter or digit "
           f"(it names bus topics and files), got {s.id!r}") for s in cfg.strategy),
    ]
    for ok, key, problem in checks:
        if not ok:
            var = (origins or {}).get(key)
            raise ConfigError(f"config error: {var + ': ' if var else ''}`{key}` {problem}")
    _parse_hours(cfg.feed.market_hours)
    _check_telegram(cfg.telegram, origins or {})
    if not cfg.bus.curve:
        _check_loopback(cfg.bus, origins or {})


def _check_telegram(tg: TelegramConfig, origins: dict[str, str]) -> None:
    """Commands are taken from one chat, named by its numeric id (what a message carries)."""
    if not (tg.commands and tg.token and tg.chat_id):
        return
    if re.fullmatch(r"-?[0-9]{1,20}", tg.chat_id.strip()) is None:
        var = origins.get("telegram.chat_id")
        # The value itself is a secret: never in the message.
        raise ConfigError(f"config error: {var + ': ' if var else ''}`telegram.chat_id` must be the "
                          f"numeric chat id (like 123456789 or -1001234567890) while telegram.commands "
                          f"is on: commands are accepted from that chat only; set "
                          f"telegram.commands = false to send to a @channel name")


_LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def _check_loopback(bus: BusConfig, origins: dict[str, str]) -> None:
    """Without CURVE nothing may listen beyond this machine: anyone who can reach a port
    could send orders or trip the kill switch."""
    names = ["host", *(n for n in BusConfig.__struct_fields__ if n.endswith(("_pub", "_rep")))]
    for name in names:
        value = str(getattr(bus, name))
        if not value:
            continue
        host = value.removeprefix("tcp://").rsplit(":", 1)[0] if name != "host" else value
        if value.startswith(("ipc://", "inproc://")) or host.startswith(_LOOPBACK):
            continue
        var = origins.get(f"bus.{name}")
        raise ConfigError(f"config error: {var + ': ' if var else ''}`bus.{name}` {value} is reachable from "
                          f"other machines; set bus.curve = true (and run `neopulse keys generate`) "
                          f"or use 127.0.0.1")


def _is_positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def hhmm_minutes(text: str) -> int | None:
    """``"15:00"`` → minutes after midnight (900); None unless a valid 24-hour ``HH:MM``."""
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text.strip())
    return int(match[1]) * 60 + int(match[2]) if match else None


def _parse_hours(text: str) -> tuple[int, int]:
    """``"09:15-15:30"`` → minutes since midnight (start, end)."""
    try:
        start, end = text.split("-")
        h1, m1 = (int(x) for x in start.split(":"))
        h2, m2 = (int(x) for x in end.split(":"))
    except ValueError:
        raise ConfigError(
            f"config error: `feed.market_hours` must look like 09:15-15:30, got {text!r}"
        ) from None
    return h1 * 60 + m1, h2 * 60 + m2


def secret_values(cfg: Config) -> list[str]:
    """Every non-empty secret string, for log redaction."""
    out = []
    for section, key in SECRET_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value and len(value) >= 4:
            out.append(value)
    password = _url_password(cfg.database.url)
    if password and len(password) >= 4:
        out.append(password)
    return out


def _url_password(url: str) -> str:
    """The password in ``postgresql://user:password@host/db`` (empty when there is none)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def redacted(cfg: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced — safe to print."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    for section, key in SECRET_KEYS:
        if data.get(section, {}).get(key):
            data[section][key] = "***"
    password = _url_password(cfg.database.url)
    if password:
        data["database"]["url"] = cfg.database.url.replace(f":{password}@", ":***@", 1)
    return data
