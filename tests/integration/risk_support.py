"""Helpers for the risk integration tests: start services as real processes, talk to them over
the real bus, run the real CLI."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from libs.common.bus import Bus
from libs.common.config import Config, load_config
from libs.common.messages import GetStatus, Message, Reply
from tests.helpers import eventually, stack_env
from tests.kit import processes

ROOT = Path(__file__).resolve().parents[2]
# The installed console script, as an operator runs it (the venv's, next to this python).
_SCRIPT = Path(sys.executable).parent / "neopulse"
NEOPULSE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c",
                                                    "from services.admin.cli import main; main()"]


class Stack:
    """One isolated NEOPULSE_HOME + base port; starts services and runs the CLI against it."""

    def __init__(self, home: Path, base_port: int, **env: Any) -> None:
        self.home = home
        self.base_port = base_port
        self.env = stack_env(home, base_port, NEOPULSE_ENV_FILE=str(home / "no.env"), **env)
        self.cfg: Config = load_config(env=self.env)
        self.bus = Bus(self.cfg)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, service: str, ready: bool = True) -> subprocess.Popen[bytes]:
        proc = processes.spawn(self.home, service, self.env)
        self.procs[service] = proc
        if ready:
            endpoint = {"risk": "risk_rep", "execution": "execution_rep", "feed": "feed_rep"}[service]
            status = functools.partial(self.ask, endpoint, timeout_ms=300)
            eventually(lambda: processes.answers(proc, self.home, service, status),
                       timeout=30, message=f"{service} to answer")  # fmt: skip
        return proc

    def output(self, service: str) -> str:
        return processes.output(self.home, service)

    def ask(self, endpoint_name: str, msg: Message, timeout_ms: int = 3000) -> Message:
        return processes.ask(self.bus, self.cfg, endpoint_name, msg, timeout_ms)

    def status(self, endpoint_name: str = "risk_rep") -> dict[str, Any]:
        reply = self.ask(endpoint_name, GetStatus())
        assert isinstance(reply, Reply) and reply.ok, reply
        data: dict[str, Any] = reply.data
        return data

    def stop(self, service: str, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        return processes.stop(self.procs.pop(service), sig, timeout)

    def kill(self, service: str) -> None:
        self.stop(service, signal.SIGKILL)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*NEOPULSE, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)

    def cli_many(self, *commands: tuple[str, ...], timeout: float = 60) -> list[tuple[int, str, str]]:
        """Run several CLI commands at once (each its own process); (rc, stdout, stderr) each."""
        procs = [subprocess.Popen([*NEOPULSE, *args], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args in commands]
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            out.append((proc.returncode, stdout, stderr))
        return out

    def cli_json(self, *args: str) -> tuple[int, Any]:
        res = self.cli(*args, "--json")
        try:
            return res.returncode, json.loads(res.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"not JSON (rc={res.returncode}): {res.stdout!r} {res.stderr!r}") from None

    def log_lines(self, service: str) -> list[dict[str, Any]]:
        path = self.home / "log" / f"{service}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def close(self) -> None:
        for proc in self.procs.values():  # signal all first: they stop in parallel
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in list(self.procs):
            self.stop(name)
        self.bus.close()


@contextmanager
def stack(home: Path, base_port: int, **env: Any) -> Iterator[Stack]:
    s = Stack(home, base_port, **env)
    try:
        yield s
    finally:
        s.close()


def has_execution_service() -> bool:
    return (ROOT / "services" / "execution" / "service.py").exists() and \
        (ROOT / "services" / "execution" / "__main__.py").exists()


__all__ = ["Stack", "eventually", "has_execution_service", "os", "stack"]
