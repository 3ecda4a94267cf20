"""ZeroMQ CURVE on every NeoPulse socket (``bus.curve = true``).

Key layout under ``bus.keys_dir`` (default ``$NEOPULSE_HOME/keys``), written by
``neopulse keys generate``::

    <name>.key_secret   this process's keypair (secret; mode 600): feed, risk, execution,
                        notifier, strategy-<id>, admin
    <name>.key          its public key
    allowed/*.key       public keys allowed to connect to our servers (the allow-list)

Servers (ROUTER and binding PUB sockets) present their own keypair and ask the ZAP
authenticator about every client; it accepts only public keys found in ``allowed/``
(re-read when the directory changes, so revoking is deleting a file). Clients present
their own keypair and the public key of the service that owns the endpoint they connect
to. A refused client is logged (rate limited) with its public key; it gets no reply, no
publication — no order, kill switch or flatten gets through.

Being on the allow-list lets a client talk; it does not let it trade. ``SenderCheck`` is
execution's gate for the commands that place or cancel orders: ``ExecuteOrder`` only from
risk, ``CancelEntries``/``RecordRiskEvent`` from risk or the operator's CLI (``admin``),
``Flatten`` from those two or the notifier (a trader's ``/flatten`` from Telegram). With CURVE
the sender is known by its public key (the ZAP User-Id of the connection); without CURVE it
presents the per-stack secret of ``libs.common.stack_secret`` — the notifier its own secret,
which is good for ``Flatten`` only. ``OrderSourceCheck`` is risk's: with CURVE an order or a
basket from the notifier's key is refused (without CURVE risk cannot tell who sent it).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from libs.common.config import Config, ConfigError, home_dir
from libs.common.messages import (
    CancelEntries,
    ExecuteBasket,
    ExecuteOrder,
    FetchHistory,
    Flatten,
    Message,
    RecordRiskEvent,
    Reply,
)
from libs.common.stack_secret import FILE_NAME, NOTIFIER_FILE, StackSecret

if TYPE_CHECKING:
    from libs.common.bus import Responder

ZAP_DOMAIN = "neopulse"
ALLOWED_DIR = "allowed"
# endpoint config name → the service that binds it
ENDPOINT_OWNERS = {
    "feed_pub": "feed", "feed_rep": "feed", "risk_rep": "risk", "risk_pub": "risk",
    "execution_rep": "execution", "execution_pub": "execution", "notifier_pub": "notifier",
}
CORE_SERVICES = ("feed", "risk", "execution", "notifier")


def keys_dir(cfg: Config) -> Path:
    return Path(cfg.bus.keys_dir).expanduser() if cfg.bus.keys_dir else home_dir() / "keys"


def strategy_endpoint(strategy_id: str) -> str:
    return f"ipc://{home_dir()}/run/strategy-{strategy_id}.pub"


def identities(cfg: Config) -> list[str]:
    """Every name that needs a keypair in this configuration."""
    return [*CORE_SERVICES, *(f"strategy-{s.id}" for s in cfg.strategy), "admin"]


def endpoint_owners(cfg: Config) -> dict[str, str]:
    owners = {cfg.bus.endpoint(name): owner for name, owner in ENDPOINT_OWNERS.items()}
    owners.update({strategy_endpoint(s.id): f"strategy-{s.id}" for s in cfg.strategy})
    return owners


def generate_keys(directory: Path, names: list[str], force: bool = False,
                  allow: bool = True) -> list[tuple[str, bool]]:
    """Write a keypair per name (skipping existing ones unless ``force``) and put each
    public key on the allow-list. Returns ``(name, created)`` pairs."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    allowed = directory / ALLOWED_DIR
    allowed.mkdir(exist_ok=True)
    out = []
    for name in names:
        secret = directory / f"{name}.key_secret"
        created = force or not secret.exists()
        if created:
            for stale in (secret, directory / f"{name}.key"):
                stale.unlink(missing_ok=True)
            zmq.auth.create_certificates(str(directory), name)
        secret.chmod(0o600)
        if allow:
            (allowed / f"{name}.key").write_bytes((directory / f"{name}.key").read_bytes())
        out.append((name, created))
    return out


def _load_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    path = directory / f"{name}.key_secret"
    if not path.is_file():
        raise ConfigError(f"config error: bus.curve is on but {path} is missing; "
                          f"run `neopulse keys generate`")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ConfigError(f"config error: {path} holds no secret key")
    return public, secret


class _AllowList:
    """Public keys in ``allowed/``; re-read when the directory changes."""

    def __init__(self, directory: Path, log: Any) -> None:
        self.directory = directory
        self.log = log
        self._mtime = -1.0
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()
        self._last_denied: dict[bytes, float] = {}
        self.denied = 0

    def _reload(self) -> None:
        try:
            mtime = self.directory.stat().st_mtime
        except FileNotFoundError:
            self._keys = set()
            return
        if mtime == self._mtime:
            return
        keys = set()
        for path in self.directory.glob("*.key"):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
                keys.add(public)
            except (OSError, ValueError):
                self.log.warning("curve_bad_allowed_key", path=str(path))
        self._keys, self._mtime = keys, mtime

    def callback(self, domain: str, client_key: bytes) -> bool:
        with self._lock:
            self._reload()
            if client_key in self._keys:
                return True
            self.denied += 1
            now = time.monotonic()
            if now - self._last_denied.get(client_key, 0.0) > 10.0:
                self._last_denied[client_key] = now
                self.log.warning("curve_client_refused", client_key=client_key.decode("ascii", "replace"),
                                 domain=domain, denied_total=self.denied,
                                 reason="public key not on the allow-list")
            return False


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class _HandshakeWatcher:
    """Logs clients that fail the CURVE handshake on our servers (no CURVE at all, or a
    wrong server key) — the ZAP callback only sees clients that got that far. One thread per
    process reads the servers' monitor sockets."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._new: list[zmq.Socket[Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last: dict[tuple[str, int], float] = {}
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="curve-watch", daemon=True)
        self._thread.start()

    def watch(self, sock: zmq.Socket[Any]) -> None:
        mon = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        with self._lock:
            self._new.append(mon)

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        monitors: list[zmq.Socket[Any]] = []
        try:
            while not self._stop.is_set():
                with self._lock:
                    fresh, self._new = self._new, []
                for mon in fresh:
                    poller.register(mon, zmq.POLLIN)
                    monitors.append(mon)
                for mon, _ in poller.poll(200):
                    try:
                        event = recv_monitor_message(mon, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        continue
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(mon)
                        monitors.remove(mon)
                        mon.close(0)
                    elif event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP logged those
                        self._report(event)
        finally:
            with self._lock:
                monitors += self._new
            for mon in monitors:
                mon.close(0)

    def _report(self, event: dict[str, Any]) -> None:
        self.failed += 1
        endpoint = event.get("endpoint", b"")
        endpoint = endpoint.decode("ascii", "replace") if isinstance(endpoint, bytes) else str(endpoint)
        key = (endpoint, int(event["event"]))
        now = time.monotonic()
        if now - self._last.get(key, 0.0) > 10.0:
            self._last[key] = now
            self.log.warning("curve_handshake_failed", endpoint=endpoint, failed_total=self.failed,
                             reason="client without CURVE or with a wrong server key")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class _QuietLog:
    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_a, **_k: None


class CurveSecurity:
    """Applied by ``Bus.socket`` to every socket it makes."""

    def __init__(self, cfg: Config, service_name: str, log: Any) -> None:
        self.dir = keys_dir(cfg)
        self.public, self.secret = _load_pair(self.dir, service_name)
        self.owners = endpoint_owners(cfg)
        self._server_keys: dict[str, bytes] = {}
        self.log = log
        self.allow_list = _AllowList(self.dir / ALLOWED_DIR, log)
        self.watcher: _HandshakeWatcher | None = None

    def server_key(self, endpoint: str) -> bytes:
        owner = self.owners.get(endpoint)
        if owner is None:
            raise ConfigError(f"config error: no CURVE server key known for {endpoint}")
        if owner not in self._server_keys:
            path = self.dir / f"{owner}.key"
            if not path.is_file():
                raise ConfigError(f"config error: bus.curve is on but {path} is missing; "
                                  f"run `neopulse keys generate`")
            self._server_keys[owner] = zmq.auth.load_certificate(str(path))[0]
        return self._server_keys[owner]

    def apply(self, sock: zmq.Socket[Any], *, server: bool) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if server:
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
            if self.watcher is None:
                self.watcher = _HandshakeWatcher(self.log)
            self.watcher.watch(sock)
            return
        connect: Callable[[str], Any] = sock.connect

        def connect_with_server_key(endpoint: str) -> Any:
            # The server key is a per-connection option: set it just before each connect.
            sock.curve_serverkey = self.server_key(endpoint)
            return connect(endpoint)

        sock.connect = connect_with_server_key  # type: ignore[method-assign,assignment]


def install_curve(bus: Any, cfg: Config, service_name: str) -> CurveSecurity:
    """Turn CURVE on for every socket ``bus`` makes from now on, with a ZAP authenticator."""
    # The CLI configures no logging (its stdout may be --json): stay quiet there.
    log = bus.log if bus.log is not None else _QuietLog()
    security = CurveSecurity(cfg, service_name, log)
    auth = ThreadAuthenticator(bus.ctx)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=security.allow_list)
    bus.security = security
    close = bus.close

    def close_with_auth() -> None:
        if security.watcher is not None:
            security.watcher.stop()
        auth.stop()
        close()

    bus.close = close_with_auth
    log.info("curve_enabled", identity=service_name, keys_dir=str(security.dir))
    return security


# --------------------------------------------------------------------------- who may trade

# The commands that place or cancel orders, and who may send each to execution. Only risk
# places orders; the operator's CLI (identity ``admin``) also flattens, cancels entries and
# records the kill switch, which it does when risk is unreachable. The notifier flattens (a
# confirmed ``/flatten`` from Telegram) and does nothing else here: its kill switch goes to risk.
# ``FetchHistory`` spends the Kotak account's history budget: only the operator's CLI asks for it.
GUARDED_COMMANDS: tuple[type, ...] = (ExecuteOrder, ExecuteBasket, Flatten, CancelEntries, RecordRiskEvent,
                                      FetchHistory)  # fmt: skip
ORDER_SENDERS = ("risk",)
HISTORY_SENDERS = ("admin",)
CONTROL_SENDERS = ("risk", "admin")
FLATTEN_SENDERS = ("risk", "admin", "notifier")
_SENDER_WORDS = {"admin": "the neopulse CLI", "notifier": "the notifier"}


def senders_of(msg: Message) -> tuple[str, ...]:
    """Who may send this guarded command to execution."""
    if isinstance(msg, ExecuteOrder | ExecuteBasket):
        return ORDER_SENDERS
    if isinstance(msg, Flatten):
        return FLATTEN_SENDERS
    if isinstance(msg, FetchHistory):
        return HISTORY_SENDERS
    return CONTROL_SENDERS
UNAUTHORISED = "unauthorised"
_WARN_EVERY_S = 10.0


def _public_key(directory: Path, name: str) -> bytes | None:
    for path in (directory / f"{name}.key", directory / ALLOWED_DIR / f"{name}.key"):
        if path.is_file():
            return zmq.auth.load_certificate(str(path))[0]
    return None


class SenderCheck:
    """Execution's gate: ``refusal(msg, responder)`` is None for an authorised sender, else the
    ``Reply(ok=False, code="unauthorised")`` to send back. A refusal is logged (rate limited)
    with its reason, never with a credential."""

    def __init__(self, cfg: Config, home: Path, log: Any) -> None:
        self.log = log
        self.curve = cfg.bus.curve
        self.refused = 0
        self._last_warned: dict[tuple[str, str], float] = {}
        self._keys: dict[str, bytes] = {}
        self.secret: StackSecret | None = None
        self.notifier_secret: StackSecret | None = None
        if self.curve:
            directory = keys_dir(cfg)
            for name in FLATTEN_SENDERS:
                key = _public_key(directory, name)
                if key is not None:
                    self._keys[name] = key
            if "risk" not in self._keys:
                raise ConfigError(f"config error: bus.curve is on but {directory / 'risk.key'} is "
                                  f"missing (execution takes orders only from risk's key); "
                                  f"run `neopulse keys generate`")
        else:
            self.secret = StackSecret(home, create=True)
            self.notifier_secret = StackSecret(home, create=True, name=NOTIFIER_FILE)

    def refusal(self, msg: Message, responder: Responder) -> Reply | None:
        senders = senders_of(msg)
        reason = (self._curve_reason(senders, responder) if self.curve
                  else self._secret_reason(senders, responder))
        if reason is None:
            return None
        kind = type(msg).__name__
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warned.get((kind, reason), 0.0) > _WARN_EVERY_S:
            self._last_warned[(kind, reason)] = now
            self.log.warning("sender_refused", kind=kind, reason=reason, refused_total=self.refused,
                             request_id=getattr(msg, "request_id", ""))
        who = " or ".join(_SENDER_WORDS.get(s, s) for s in senders)
        return Reply(ok=False, code=UNAUTHORISED,
                     error=f"unauthorised: execution takes {kind} only from {who}; {reason}")

    def _curve_reason(self, senders: tuple[str, ...], responder: Responder) -> str | None:
        sender = responder.user_id.encode("ascii", "replace")
        for name in senders:
            key = self._keys.get(name)
            if key is not None and hmac.compare_digest(sender, key):
                return None
        known = next((n for n, k in self._keys.items() if hmac.compare_digest(sender, k)), "")
        return (f"the sender's CURVE key is {known}'s" if known else
                f"the sender's CURVE key {responder.user_id or '(none)'} is not {' or '.join(senders)}'s")

    def _secret_reason(self, senders: tuple[str, ...], responder: Responder) -> str | None:
        assert self.secret is not None and self.notifier_secret is not None
        if not responder.credential:
            return f"the request carried no stack credential (from {self.secret.path})"
        notifier = False
        for recheck in (False, True):  # a mismatch looks once more, in case the file was replaced
            expected = self.secret.current(recheck=recheck)
            if expected is not None and hmac.compare_digest(responder.credential, expected):
                return None
            theirs = self.notifier_secret.current(recheck=recheck)
            notifier = theirs is not None and hmac.compare_digest(responder.credential, theirs)
            if notifier:
                break
        if notifier:
            return None if "notifier" in senders else "the request carried the notifier's credential"
        return f"the request's stack credential does not match {self.secret.path}"


def present_credential(client: Any, cfg: Config, home: Path, *, create: bool = True,
                       name: str = FILE_NAME) -> None:
    """Make ``client`` (a bus Client or AsyncClient to execution) present the stack secret (or,
    with ``name=NOTIFIER_FILE``, the notifier's) with each request. With CURVE nothing is
    needed: the client's key says who it is."""
    if not cfg.bus.curve:
        client.credential = StackSecret(home, create=create, name=name)


class OrderSourceCheck:
    """Risk's gate for ``OrderRequest`` and ``BasketRequest``: with CURVE the notifier's key
    (``keys/notifier.key``) may trip, reset and ask about the kill switch but never send an
    order. Without CURVE every local client looks alike (strategies send orders unsigned), so
    nothing is refused here; execution still takes orders only from risk."""

    def __init__(self, cfg: Config) -> None:
        self._refused: dict[bytes, str] = {}
        if cfg.bus.curve:
            key = _public_key(keys_dir(cfg), "notifier")
            if key is not None:
                self._refused[key] = "notifier"

    def reason(self, responder: Responder) -> str | None:
        """None when the sender may send orders, else why not (for the verdict)."""
        if not self._refused or not responder.user_id:
            return None
        sender = responder.user_id.encode("ascii", "replace")
        for key, name in self._refused.items():
            if hmac.compare_digest(sender, key):
                return f"unauthorised: risk takes no orders from the {name}'s CURVE key"
        return None
