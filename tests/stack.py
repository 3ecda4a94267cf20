"""Run a whole NeoPulse stack from the Procfile under honcho, isolated by home and ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import stack_env
from tests.kit.processes import OwnHome, spawn, stop

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


class Stack:
    """A honcho-managed stack. ``stop()`` sends Ctrl-C to the whole process group.

    Without ``home`` the stack gets its own NEOPULSE_HOME outside pytest's tmp tree (the
    embedded PostgreSQL keeps its pgdata there; see ``OwnHome``); ``remove()`` kills what
    is left and deletes it."""

    def __init__(self, base_port: int, procfile: Path | None = None, *, home: Path | None = None,
                 **env: Any) -> None:  # fmt: skip
        self._own = OwnHome("neopulse-stack-") if home is None else None
        home = self._own.path if self._own is not None else home
        assert home is not None
        self.home = home
        self.base_port = base_port
        self.env = stack_env(home, base_port, **env)
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.setdefault("NEOPULSE_ENV_FILE", str(home / "no.env"))
        self.procfile = procfile or ROOT / "Procfile"
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = home / "honcho.out"
        self.services: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *processes: str) -> Stack:
        """Start every Procfile process, or only the ones named."""
        self.home.mkdir(parents=True, exist_ok=True)
        out = self.output.open("wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "honcho"), "-f", str(self.procfile), "-d", str(ROOT), "start", *processes],
            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def start_service(self, name: str, **env: Any) -> subprocess.Popen[bytes]:
        """Start one service as its own process, outside honcho, with extra environment (for
        example ``NEOPULSE_CLOCK_OFFSET_S``), so it can be stopped and restarted alone.
        Its output goes to ``$NEOPULSE_HOME/<name>.out``."""
        proc = spawn(self.home, name, {**self.env, **{k: str(v) for k, v in env.items()}})
        self.services[name] = proc
        return proc

    def stop_service(self, name: str, timeout: float = 10.0) -> int:
        """SIGTERM a service from ``start_service`` (SIGKILL after ``timeout``); its exit code."""
        return stop(self.services.pop(name), timeout=timeout)

    def service_output(self, *names: str, tail: int = 2000) -> str:
        """The last ``tail`` characters of each named service's output (all when none named)."""
        paths = [self.home / f"{n}.out" for n in names] if names else sorted(self.home.glob("*.out"))
        tails = (f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in paths if p.exists())
        return "\n".join(tails)

    def cli(
        self, *args: str, timeout: float = 20, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.admin.cli", *args], cwd=ROOT, env=self.env,
            capture_output=True, text=True, timeout=timeout, input=input,
        )

    def cli_json(self, *args: str) -> Any:
        res = self.cli(*args, "--json")
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    def member_pids(self) -> list[int]:
        """Every live process that belongs to this stack (by NEOPULSE_HOME or pgdata path)."""
        home = str(self.home)
        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                mine = home in cmd or p.environ().get("NEOPULSE_HOME") == home
                if mine and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids

    def stop(self, timeout: float = 10.0) -> float:
        """Ctrl-C the stack (SIGINT to the process group) and return seconds until all exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        deadline = time.monotonic() + timeout
        while self.member_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        return time.monotonic() - t0

    def kill_all(self) -> None:
        for proc in self.services.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        self.services.clear()
        for pid in self.member_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def remove(self) -> None:
        """Kill whatever still runs and delete the home this stack created (if it did)."""
        self.kill_all()
        if self._own is not None:
            self._own.remove()
