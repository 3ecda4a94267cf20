"""Services as real processes for integration and end-to-end tests: start one with its
output in ``$NEOPULSE_HOME/<name>.out``, read that output, stop it (SIGKILL if it
overstays), ask a service over the bus, and a NEOPULSE_HOME that embedded PostgreSQL can use."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from libs.common.bus import Bus, RequestTimeout
from libs.common.config import Config
from libs.common.messages import GetStatus, Message, Reply

ROOT = Path(__file__).resolve().parents[2]


def spawn(
    home: Path, name: str, env: dict[str, str], *args: str, module: str = ""
) -> subprocess.Popen[bytes]:
    """``python -m services.<name> *args`` (or ``module``) with stdout and stderr appended to
    ``home/<name>.out``."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / f"{name}.out").open("ab") as out:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", module or f"services.{name}", *args], cwd=ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def output(home: Path, name: str) -> str:
    """What ``spawn`` collected from ``name`` so far ("" before it started)."""
    path = home / f"{name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Send ``sig`` and wait ``timeout`` seconds, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def ask(bus: Bus, cfg: Config, endpoint_name: str, msg: Message, timeout_ms: int = 3000,
        credential: Any = None) -> Message:  # fmt: skip
    """One request to ``cfg.bus.<endpoint_name>`` on a fresh client. ``credential`` (the
    ``present_credential`` function) signs it for services that check the sender."""
    client = bus.client(cfg.bus.endpoint(endpoint_name), timeout_ms)
    if credential is not None:
        credential(client)
    try:
        return client.request(msg)
    finally:
        client.close()


def ask_execution(bus: Bus, cfg: Config, home: Path, msg: Message, timeout_ms: int = 5000) -> Message:
    """A request to execution signed with the stack's credential (the test plays risk)."""
    from libs.common.security import present_credential

    return ask(bus, cfg, "execution_rep", msg, timeout_ms,
               credential=lambda client: present_credential(client, cfg, home))  # fmt: skip


def answers(proc: subprocess.Popen[bytes], home: Path, name: str, ask_status: Any) -> bool:
    """True once ``ask_status()`` gets an ok ``GetStatus`` reply; raises with the output if
    the process has exited."""
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output(home, name)[-3000:]}")
    try:
        reply = ask_status(GetStatus())
    except RequestTimeout:
        return False
    return isinstance(reply, Reply) and reply.ok


class OwnHome:
    """A NEOPULSE_HOME outside pytest's tmp tree, removed by ``remove()``.

    pytest re-applies mode 0700 to ``/tmp/pytest-of-<user>`` at every session start; the
    embedded PostgreSQL runs as another user when the tests run as root, so a pgdata under
    that tree is locked out as soon as a second pytest session starts."""

    def __init__(self, prefix: str = "neopulse-home-") -> None:
        self.parent = Path(tempfile.mkdtemp(prefix=prefix))
        self.path = self.parent / "home"
        self.path.mkdir()

    def remove(self) -> None:
        shutil.rmtree(self.parent, ignore_errors=True)
