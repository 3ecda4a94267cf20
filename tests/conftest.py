"""Root fixtures: every test gets its own NEOPULSE_HOME and bus ports."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The Kotak SDK opens ./logs/neo-api-client.log on import unless told not to.
os.environ.setdefault("NEO_LOG_FILE_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import free_base_port  # noqa: E402
from tests.kit.fixtures import clock, master  # noqa: E402, F401 - the kit's fixtures, for every test


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's NEOPULSE_* variables, .env or neopulse.toml."""
    for key in list(os.environ):
        if key.startswith("NEOPULSE_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NEOPULSE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NEOPULSE_ENV_FILE", str(tmp_path / "no.env"))
    yield
    import structlog

    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def base_port() -> int:
    return free_base_port()
