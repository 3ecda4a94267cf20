"""Fixtures of the kit; a conftest makes them available with
``pytest_plugins = ["tests.kit.fixtures"]`` or a test module imports them by name."""

from __future__ import annotations

import pytest

from libs.common.clock import ManualClock
from libs.common.instruments import MasterData
from tests.kit.builders import MASTER, T0


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock at the market open (``T0``); ``clock.advance(s)`` moves it."""
    return ManualClock(T0)


@pytest.fixture
def master() -> MasterData:
    """The repository's sample instrument master (loaded once, shared read-only)."""
    return MASTER
