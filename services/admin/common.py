"""Shared plumbing for ``neopulse`` commands: config, bus requests, output, exit codes.

Exit codes, the same for every command: 0 ok, 1 refused/rejected, 2 usage or config error, 3 a service
is unreachable (the message names the service and its endpoint) or, for ``status``, reports itself
degraded (the message names the service and why, e.g. "execution (ledger unavailable: ...)").
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer

from libs.common.bus import Bus, Client, RequestTimeout
from libs.common.config import Config, ConfigError, home_dir, load_config
from libs.common.messages import Message, Reply, to_builtins
from libs.common.security import GUARDED_COMMANDS, UNAUTHORISED, present_credential
from libs.common.stack_secret import StackSecretError

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# endpoint config name → the service that binds it
ENDPOINT_OWNER = {
    "feed_rep": "feed", "feed_pub": "feed", "risk_rep": "risk", "risk_pub": "risk",
    "execution_rep": "execution", "execution_pub": "execution", "notifier_pub": "notifier",
}


def fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def get_config() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


class AdminClient:
    """One bus context for a CLI invocation; ``ask`` exits 3 naming the service when down."""

    def __init__(self, cfg: Config | None = None, timeout_ms: int | None = None) -> None:
        self.cfg = cfg or get_config()
        self.bus = Bus(self.cfg)
        if self.cfg.bus.curve:
            from libs.common.security import install_curve

            try:
                install_curve(self.bus, self.cfg, "admin")
            except ConfigError as exc:  # no keys yet: a usage error, not a traceback
                self.bus.close()
                fail(str(exc), EXIT_USAGE)
        self.timeout_ms = timeout_ms or self.cfg.bus.request_timeout_ms

    def open_client(self, endpoint_name: str, msg: Message, timeout_ms: int | None = None) -> Client:
        """A client for one request. A command that places or cancels orders at execution
        presents the stack secret (read, never created, here); with no secret file yet it goes
        without one and execution, if it is running at all, says why it refused."""
        client = self.bus.client(self.cfg.bus.endpoint(endpoint_name), timeout_ms or self.timeout_ms)
        if endpoint_name == "execution_rep" and isinstance(msg, GUARDED_COMMANDS):
            try:
                present_credential(client, self.cfg, home_dir(), create=False)
            except StackSecretError as exc:
                client.close()
                fail(str(exc), EXIT_USAGE)
        return client

    def ask(self, endpoint_name: str, msg: Message, timeout_ms: int | None = None) -> Message:
        endpoint = self.cfg.bus.endpoint(endpoint_name)
        client = self.open_client(endpoint_name, msg, timeout_ms)
        try:
            return client.request(msg)
        except RequestTimeout:
            owner = ENDPOINT_OWNER.get(endpoint_name, endpoint_name)
            fail(f"{owner} is unreachable at {endpoint} (no reply within "
                 f"{timeout_ms or self.timeout_ms} ms) — is it running?", EXIT_UNREACHABLE)
        finally:
            client.close()

    def ask_or_none(self, endpoint_name: str, msg: Message, timeout_ms: int | None = None) -> Message | None:
        """Like ``ask``, but ``None`` when the service does not answer (the caller decides)."""
        client = self.open_client(endpoint_name, msg, timeout_ms)
        try:
            return client.request(msg)
        except RequestTimeout:
            return None
        finally:
            client.close()

    def ask_ok(self, endpoint_name: str, msg: Message, timeout_ms: int | None = None) -> Any:
        """Send a request whose answer is a ``Reply``; exit 1 with its error when not ok."""
        reply = self.ask(endpoint_name, msg, timeout_ms)
        if not isinstance(reply, Reply):
            return reply
        if not reply.ok:
            fail(f"refused: {reply.error}{unauthorised_hint(reply)}", EXIT_REFUSED)
        return reply.data

    def close(self) -> None:
        self.bus.close()


def unauthorised_hint(reply: Message | None) -> str:
    """What the operator can do about an ``unauthorised`` refusal (empty for any other reply)."""
    if not (isinstance(reply, Reply) and reply.code == UNAUTHORISED):
        return ""
    return (f" — run neopulse as the user that runs the stack, with its NEOPULSE_HOME "
            f"(here {home_dir()})")


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or the human text."""
    if as_json:
        sys.stdout.write(json.dumps(to_builtins(data), indent=2, default=str) + "\n")
    else:
        typer.echo(human if human is not None else json.dumps(to_builtins(data), indent=2, default=str))


JSON_OPT = typer.Option(False, "--json", help="Print machine-readable JSON.")
