"""The per-stack secret that proves a request to execution comes from risk or the operator.

Used when ``bus.curve`` is off (with CURVE on, the sender's public key proves who it is;
see ``libs.common.security.SenderCheck``). ``$NEOPULSE_HOME/run/stack.secret`` holds 64 hex
characters, mode 0600, owned by the user the stack runs as. Risk and execution each create
it at start if it is missing — whichever comes first wins: the value is written to a private
temporary file, then hard-linked into place (``os.link`` fails if the name exists), so a
concurrent reader sees either no file or the whole value, never half of it. The file stays
across restarts; deleting it (with the stack stopped) gives a new one.

Risk and the ``neopulse`` CLI send the value as an extra request frame, never inside a
message, so it cannot reach a log line or the ledger. Anything that cannot read this file
(another user on the host, a container that shares only the network) cannot place, cancel
or flatten through execution. It does not protect against code running as the stack's own
user, which can read the file.

``$NEOPULSE_HOME/run/notifier.secret`` (``NOTIFIER_FILE``) is made and kept the same way, by
whichever of the notifier and execution starts first. The notifier presents it instead of the
stack secret: execution takes a ``Flatten`` with it (a trader's ``/flatten`` from Telegram) and
nothing else, so the notifier holds no credential that could place an order.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from pathlib import Path

FILE_NAME = "stack.secret"
NOTIFIER_FILE = "notifier.secret"  # the notifier's own: execution takes only Flatten with it
_LENGTH = 64  # hex characters: 256 bits
_RECHECK_S = 1.0  # how often a StackSecret looks whether the file was replaced


class StackSecretError(Exception):
    """The secret file exists but cannot be trusted or read; the message says what to do."""


def secret_path(home: Path, name: str = FILE_NAME) -> Path:
    return home / "run" / name


def read_secret(home: Path, name: str = FILE_NAME) -> bytes | None:
    """The secret, or None when the file does not exist yet."""
    path = secret_path(home, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StackSecretError(f"cannot read the stack secret {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StackSecretError(f"the stack secret {path} is not a regular file; remove it")
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise StackSecretError(
                f"the stack secret {path} is not private (mode {stat.S_IMODE(st.st_mode):o}, "
                f"owner uid {st.st_uid}); stop the stack, delete the file and start again")
        value = os.read(fd, _LENGTH + 2).strip()
    finally:
        os.close(fd)
    if len(value) != _LENGTH or any(c not in b"0123456789abcdef" for c in value):
        raise StackSecretError(f"the stack secret {path} is damaged; "
                               f"stop the stack, delete it and start again")
    return value


def load_or_create_secret(home: Path, name: str = FILE_NAME) -> bytes:
    """The secret, created first if no process has made it yet (risk and execution call this)."""
    existing = read_secret(home, name)
    if existing is not None:
        return existing
    path = secret_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secrets.token_hex(_LENGTH // 2).encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process was first: use its value
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    value = read_secret(home, name)
    if value is None:
        raise StackSecretError(f"the stack secret {path} vanished while it was created")
    return value


class StackSecret:
    """The current secret of one home, re-read when the file is replaced (checked at most once
    a second), so a process that outlives a new secret picks it up. ``create`` is for risk and
    execution; the CLI only reads."""

    def __init__(self, home: Path, *, create: bool, name: str = FILE_NAME) -> None:
        self.home = home
        self.name = name
        self.path = secret_path(home, name)
        self._create = create
        self._value = load_or_create_secret(home, name) if create else read_secret(home, name)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def current(self, *, recheck: bool = False) -> bytes | None:
        """The secret now (None: no file yet and this reader does not create it)."""
        now = time.monotonic()
        if recheck or now - self._checked >= _RECHECK_S:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp or self._value is None:
                try:
                    value = (load_or_create_secret(self.home, self.name) if self._create
                             else read_secret(self.home, self.name))
                except StackSecretError:
                    value = None  # keep the last good value; the next check tries again
                if value is not None:
                    self._value = value
                self._stamp = self._file_stamp()
        return self._value

    def __call__(self) -> bytes:
        """The request frame to present (empty when there is no secret to present)."""
        return self.current() or b""
